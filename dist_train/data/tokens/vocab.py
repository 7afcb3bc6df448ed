"""The tokenizers shards are written with: bytes, a BPE trained here, or a local tokenizer.json."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from dist_train.data.tokens.shards import EOT, TOKENIZER_FILE


def byte_tokenizer():
    """The identity on UTF-8 bytes as a Hugging Face tokenizer (id = byte value), saved beside
    byte shards so that every directory decodes the same way."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    # ByteLevel shows each byte as a printable character; the vocabulary maps it back to its value.
    alphabet = _bytes_to_unicode()
    tokenizer = Tokenizer(models.BPE(vocab={alphabet[b]: b for b in range(256)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2's table: printable bytes stand for themselves, the rest are shifted past 255.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def train_bpe(texts: Iterable[str], vocab_size: int):
    """A byte-level BPE (GPT-2's scheme) trained on `texts`, with EOT as its first id."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def load_tokenizer(directory: Path):
    """The tokenizer a directory's shards were written with, to decode them."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(Path(directory) / TOKENIZER_FILE))


# --------------------------------------------------------------------------- tokenize
