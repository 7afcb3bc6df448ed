"""Pre-tokenized language-model data: the shard format, the writer (`dist-train tokenize`),
the check (`dist-train verify-tokens`) and the memory-mapped dataset (`data.dataset: tokens`).

A shard is a 32-byte header then the token ids, little-endian:

    magic b"DTTOKENS" | version u32 | bytes per token u32 (2 or 4) | token count u64 | vocabulary u64

uint16 when the vocabulary has fewer than 65,536 ids, else uint32. A directory holds
`train_NNNNNN.bin`, `val_NNNNNN.bin`, `index.json` (the manifest: shards, counts, documents)
and `tokenizer.json` (a Hugging Face tokenizer that decodes the ids).
"""

from __future__ import annotations

import bisect
import glob
import itertools
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from dist_train.config import UserError

MAGIC = b"DTTOKENS"
VERSION = 1
HEADER = struct.Struct("<8sIIQQ")  # magic, version, bytes per token, token count, vocabulary
MANIFEST = "index.json"
TOKENIZER_FILE = "tokenizer.json"
EOT = "<|endoftext|>"  # GPT-2's document separator, a special token of the trained BPE
# One shard's size at most (in tokens): 2**28 uint16 tokens are 512 MiB, a file any filesystem
# and copy tool handles, while a corpus of billions of tokens stays a few dozen files.
DEFAULT_SHARD_TOKENS = 2**28
# Verification scans token ids in pieces of this many, so a shard is never read whole.
SCAN_CHUNK = 2**24


class TokensError(UserError):
    pass


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id of the vocabulary fits, else uint32: half the disk and page cache."""
    if not 1 <= vocab_size < 2**32:
        raise TokensError(f"vocabulary size {vocab_size} must be between 1 and 2**32 - 1")
    return np.dtype("<u2") if vocab_size < 65536 else np.dtype("<u4")


@dataclass(frozen=True)
class ShardHeader:
    count: int
    vocab_size: int
    dtype: np.dtype


def read_header(path: Path) -> ShardHeader:
    """A shard's header, checked against the format; the first problem as one line."""
    with open(path, "rb") as f:
        raw = f.read(HEADER.size)
    if len(raw) < HEADER.size:
        raise TokensError(f"{path}: {len(raw)} bytes, shorter than the {HEADER.size}-byte header")
    magic, version, width, count, vocab = HEADER.unpack(raw)
    if magic != MAGIC:
        raise TokensError(f"{path}: not a token shard (magic {magic!r}, expected {MAGIC!r})")
    if version != VERSION:
        raise TokensError(f"{path}: format version {version}, this dist_train reads version {VERSION}")
    if width not in (2, 4):
        raise TokensError(f"{path}: {width} bytes per token in the header, expected 2 or 4")
    dtype = np.dtype(f"<u{width}")
    if vocab < 1 or token_dtype(vocab) != dtype:
        raise TokensError(f"{path}: vocabulary {vocab} does not go with {dtype.name} tokens")
    return ShardHeader(count, vocab, dtype)


class ShardWriter:
    """One shard written in pieces: the header's token count is filled in by close()."""

    def __init__(self, path: Path, vocab_size: int) -> None:
        self.path, self.vocab_size, self.dtype = path, vocab_size, token_dtype(vocab_size)
        self.count = 0
        self._file = open(path, "wb")  # noqa: SIM115 - closed by close()
        self._file.write(HEADER.pack(MAGIC, VERSION, self.dtype.itemsize, 0, vocab_size))

    def write(self, tokens: np.ndarray) -> None:
        if tokens.size and int(tokens.max()) >= self.vocab_size:
            raise TokensError(f"{self.path}: token id {int(tokens.max())} outside the vocabulary of {self.vocab_size}")
        self._file.write(np.ascontiguousarray(tokens, dtype=self.dtype).tobytes())
        self.count += int(tokens.size)

    def close(self) -> None:
        self._file.seek(0)
        self._file.write(HEADER.pack(MAGIC, VERSION, self.dtype.itemsize, self.count, self.vocab_size))
        self._file.close()


def write_shard(path: Path, tokens: np.ndarray, vocab_size: int) -> ShardHeader:
    """All of `tokens` as one shard (tests and small corpora)."""
    writer = ShardWriter(path, vocab_size)
    writer.write(tokens)
    writer.close()
    return ShardHeader(writer.count, vocab_size, writer.dtype)


def open_shard(path: Path) -> np.memmap:
    """A shard's tokens mapped, not read: pages come from disk as windows touch them."""
    header = read_header(path)
    expected = HEADER.size + header.count * header.dtype.itemsize
    size = path.stat().st_size
    if size != expected:
        raise TokensError(
            f"{path}: {size} bytes, but the header's {header.count} tokens of {header.dtype.name} need {expected}"
        )
    if header.count == 0:  # np.memmap cannot map zero bytes
        return np.zeros(0, dtype=header.dtype)
    return np.memmap(path, dtype=header.dtype, mode="r", offset=HEADER.size, shape=(header.count,))


# --------------------------------------------------------------------------- tokenizers


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


def expand_inputs(patterns: list[str]) -> list[Path]:
    """The files the arguments name (paths or globs), sorted, each once."""
    matches = {Path(p) for pattern in patterns for p in glob.glob(os.path.expanduser(pattern), recursive=True)}
    return sorted(p for p in matches if p.is_file())


def split_documents(files: list[Path], val_fraction: float) -> tuple[list[Path], list[Path]]:
    """(train, val) by whole document, seed 0: the rule data.dataset=text uses, so the same files
    are held out either way and validation text never leaks into training windows."""
    order = torch.randperm(len(files), generator=torch.Generator().manual_seed(0)).tolist()
    n_val = max(1, round(len(files) * val_fraction))
    return sorted(files[i] for i in order[n_val:]), sorted(files[i] for i in order[:n_val])


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise TokensError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def tokenize(
    inputs: list[str],
    out: Path,
    tokenizer: str = "byte",
    vocab_size: int | None = None,
    val_fraction: float = 0.1,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
) -> dict:
    """Tokenize the files `inputs` names (one document each) into shards under `out`; returns
    the manifest. Everything is checked first, then written into a temporary directory beside
    `out` and renamed at the end, so bad input or a failure leaves nothing behind."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise TokensError(f"--out {out} exists and is not an empty directory")
    if not 0 < val_fraction < 1:
        raise TokensError(f"--val-fraction must be between 0 and 1, got {val_fraction}")
    if shard_tokens < 1:
        raise TokensError(f"--shard-tokens must be >= 1, got {shard_tokens}")
    if tokenizer != "gpt2" and vocab_size is not None:
        raise TokensError(f"--vocab-size applies to --tokenizer gpt2 (a BPE trained here), not to {tokenizer}")
    if tokenizer == "gpt2":
        vocab_size = 50257 if vocab_size is None else vocab_size
        if not 257 <= vocab_size < 2**32:  # 256 bytes and the separator come first
            raise TokensError(f"--vocab-size must be at least 257 (256 bytes + {EOT}), got {vocab_size}")
    elif tokenizer != "byte" and not (tokenizer.endswith(".json") and Path(tokenizer).is_file()):
        raise TokensError(f"--tokenizer must be byte, gpt2 or an existing tokenizer.json file, got {tokenizer!r}")
    files = expand_inputs(inputs)
    if not files:
        raise TokensError(f"no files matched {' '.join(inputs)}")
    if len(files) < 2:
        raise TokensError(f"splitting by document needs at least 2 files, got {len(files)}")
    train_files, val_files = split_documents(files, val_fraction)

    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    work.chmod(0o777 & ~umask)  # mkdtemp's 0700 would make the renamed --out private
    try:
        manifest = _write_all(work, tokenizer, vocab_size, train_files, val_files, shard_tokens)
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return manifest


def _write_all(
    work: Path, name: str, vocab_size: int | None, train: list[Path], val: list[Path], shard_tokens: int
) -> dict:
    if name == "byte":
        hf, eot = byte_tokenizer(), None

        def encode(path: Path) -> np.ndarray:
            # The bytes are the ids: no decode, so any file (not only UTF-8) tokenizes.
            return np.frombuffer(path.read_bytes(), dtype=np.uint8)
    else:
        if name == "gpt2":
            # Trained on the training documents only: validation stays unseen text.
            hf = train_bpe((_read_text(p) for p in train), vocab_size)
        else:
            from tokenizers import Tokenizer

            try:
                hf = Tokenizer.from_file(name)
            except Exception as exc:  # noqa: BLE001 - a malformed file is the user's, one line
                raise TokensError(f"--tokenizer {name} is not a tokenizers JSON file: {exc}") from None
        eot = hf.token_to_id(EOT)

        def encode(path: Path) -> np.ndarray:
            return np.asarray(hf.encode(_read_text(path)).ids, dtype=np.int64)

    vocab = hf.get_vocab_size(with_added_tokens=True)
    hf.save(str(work / TOKENIZER_FILE))
    # Unigram counts on the way: the baseline loss a text run prints, without a second pass.
    counts = {split: np.zeros(vocab, dtype=np.int64) for split in ("train", "val")}
    shards: dict[str, list[dict]] = {"train": [], "val": []}
    documents = []
    for split, files in (("train", train), ("val", val)):
        writer: ShardWriter | None = None
        for path in files:
            tokens = encode(path)
            if eot is not None:  # the separator lets the model learn where a document ends
                tokens = np.append(tokens, eot)
            if writer is None or (writer.count and writer.count + tokens.size > shard_tokens):
                if writer is not None:
                    writer.close()
                    shards[split].append({"file": writer.path.name, "tokens": writer.count})
                writer = ShardWriter(work / f"{split}_{len(shards[split]):06d}.bin", vocab)
            documents.append(
                {
                    "path": str(path),
                    "split": split,
                    "shard": writer.path.name,
                    "offset": writer.count,
                    "tokens": len(tokens),
                }
            )
            writer.write(tokens)
            counts[split] += np.bincount(tokens, minlength=vocab)
        assert writer is not None  # both splits have at least one document
        writer.close()
        shards[split].append({"file": writer.path.name, "tokens": writer.count})
    manifest = {
        "format": "dist_train tokens",
        "version": VERSION,
        "tokenizer": name,
        "vocab_size": vocab,
        "dtype": token_dtype(vocab).name,
        "eot_id": eot,
        "train_tokens": int(counts["train"].sum()),
        "val_tokens": int(counts["val"].sum()),
        "unigram_val_loss": unigram_loss(counts["train"], counts["val"]),
        "shards": shards,
        "documents": documents,
    }
    (work / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def unigram_loss(train_counts: np.ndarray, val_counts: np.ndarray) -> float:
    """Validation cross-entropy (nats per token) of predicting every token by its add-one
    smoothed training frequency, as data.dataset=text reports for bytes."""
    log_p = np.log((train_counts + 1) / (train_counts.sum() + train_counts.size))
    return float(-(val_counts * log_p).sum() / max(1, val_counts.sum()))


# --------------------------------------------------------------------------- verify


def read_manifest(directory: Path) -> dict:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise TokensError(f"{directory} has no {MANIFEST}: not a directory written by dist-train tokenize")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as exc:
        raise TokensError(f"{path} is not JSON: {exc}") from None
    shards = manifest.get("shards") if isinstance(manifest, dict) else None
    if not (isinstance(shards, dict) and {"train", "val"} <= set(shards) and "vocab_size" in manifest):
        raise TokensError(f"{path} is not a token manifest: it needs shards.train, shards.val and vocab_size")
    return manifest


def verify(directory: Path) -> str:
    """Every shard checked against the format and the manifest, ids against the vocabulary;
    returns a one-line summary, raises TokensError at the first problem."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    listed = {s["file"] for split in ("train", "val") for s in manifest["shards"][split]}
    stray = sorted(p.name for p in directory.glob("*.bin") if p.name not in listed)
    if stray:
        raise TokensError(f"{directory}: shard {stray[0]} is not in {MANIFEST}")
    totals = {}
    for split in ("train", "val"):
        totals[split] = 0
        for entry in manifest["shards"][split]:
            path = directory / entry["file"]
            if not path.is_file():
                raise TokensError(f"{path}: listed in {MANIFEST} but missing")
            tokens = open_shard(path)  # checks header and file size
            header = read_header(path)
            if header.vocab_size != manifest["vocab_size"]:
                raise TokensError(f"{path}: vocabulary {header.vocab_size}, the manifest says {manifest['vocab_size']}")
            if header.count != entry["tokens"]:
                raise TokensError(f"{path}: {header.count} tokens, the manifest says {entry['tokens']}")
            for start in range(0, len(tokens), SCAN_CHUNK):
                top = int(tokens[start : start + SCAN_CHUNK].max())
                if top >= header.vocab_size:
                    raise TokensError(f"{path}: token id {top} is outside the vocabulary of {header.vocab_size}")
            totals[split] += header.count
        listed_total = manifest.get(f"{split}_tokens", totals[split])
        if totals[split] != listed_total:
            raise TokensError(
                f"{directory}: {split} shards hold {totals[split]} tokens, the manifest says {listed_total}"
            )
    n_train, n_val = len(manifest["shards"]["train"]), len(manifest["shards"]["val"])
    return (
        f"{directory}: OK: {n_train} train shard(s) with {totals['train']:,} tokens, {n_val} val shard(s) with "
        f"{totals['val']:,} tokens, vocabulary {manifest['vocab_size']:,} ({manifest.get('dtype', '?')})"
    )


# --------------------------------------------------------------------------- dataset


class TokenWindows(Dataset):
    """Non-overlapping windows of seq_len + 1 tokens over memory-mapped shards: (input,
    next-token targets), as data.dataset=text serves bytes. A window never straddles two
    shards, so item i is found from per-shard window counts; nothing is read until asked."""

    def __init__(self, paths: list[Path], seq_len: int) -> None:
        self.paths, self.seq_len = [Path(p) for p in paths], seq_len
        headers = [read_header(p) for p in self.paths]
        self.vocab_size = max((h.vocab_size for h in headers), default=0)
        per_shard = [max(0, (h.count - 1) // seq_len) for h in headers]
        # Windows before the end of each shard, as Python ints: bisect on a list takes a
        # quarter of np.searchsorted's time per sample.
        self.ends = list(itertools.accumulate(per_shard))
        self.tokens_total = sum(h.count for h in headers)
        self._maps: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.ends[-1] if self.ends else 0

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"window {index} of {len(self)}")
        shard = bisect.bisect_right(self.ends, index)
        local = index - (self.ends[shard - 1] if shard else 0)
        tokens = self._maps.get(shard)
        if tokens is None:
            # A plain ndarray view of the mapping: slicing an np.memmap costs 30x more (it
            # builds a memmap object per slice), which was most of a sample's time.
            tokens = self._maps[shard] = open_shard(self.paths[shard]).view(np.ndarray)
        window = torch.from_numpy(tokens[local * self.seq_len : (local + 1) * self.seq_len + 1].astype(np.int64))
        return window[:-1], window[1:]

    def __getstate__(self) -> dict:
        # A memmap pickles as a full in-memory copy: a spawned loader worker maps its own.
        return {**self.__dict__, "_maps": {}}


def token_datasets(directory: Path, seq_len: int) -> tuple[TokenWindows, TokenWindows, dict]:
    """Train and validation windows of a tokenized directory, and its manifest."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    train, val = (
        TokenWindows([directory / s["file"] for s in manifest["shards"][split]], seq_len) for split in ("train", "val")
    )
    return train, val, manifest


def iter_documents(directory: Path, split: str | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """(source path, token ids) of each document in the manifest, the separator left out."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    maps: dict[str, np.ndarray] = {}
    for doc in manifest["documents"]:
        if split is not None and doc["split"] != split:
            continue
        if doc["shard"] not in maps:
            maps[doc["shard"]] = open_shard(directory / doc["shard"])
        tokens = maps[doc["shard"]]
        ids = tokens[doc["offset"] : doc["offset"] + doc["tokens"]]
        if manifest.get("eot_id") is not None and len(ids) and ids[-1] == manifest["eot_id"]:
            ids = ids[:-1]
        yield doc["path"], np.asarray(ids)
