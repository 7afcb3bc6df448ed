"""Pre-tokenized language-model data: the shard format, the writer (`dist-train tokenize`),
the check (`dist-train verify-tokens`) and the memory-mapped dataset (`data.dataset: tokens`).

A shard is a 32-byte header then the token ids, little-endian:

    magic b"DTTOKENS" | version u32 | bytes per token u32 (2 or 4) | token count u64 | vocabulary u64

uint16 when the vocabulary has fewer than 65,536 ids, else uint32. A directory holds
`train_NNNNNN.bin`, `val_NNNNNN.bin`, `index.json` (the manifest: shards, counts, documents)
and `tokenizer.json` (a Hugging Face tokenizer that decodes the ids).

shards.py the format, reading and writing a shard, the manifest; vocab.py the tokenizers;
writer.py `tokenize`; checks.py `verify`; dataset.py the windows training reads.
"""

from dist_train.data.tokens.checks import verify
from dist_train.data.tokens.dataset import TokenWindows, iter_documents, token_datasets
from dist_train.data.tokens.shards import (
    DEFAULT_SHARD_TOKENS,
    HEADER,
    TokensError,
    open_shard,
    read_header,
    read_manifest,
    write_shard,
)
from dist_train.data.tokens.vocab import load_tokenizer
from dist_train.data.tokens.writer import split_documents, tokenize

__all__ = [
    "DEFAULT_SHARD_TOKENS",
    "HEADER",
    "TokenWindows",
    "TokensError",
    "iter_documents",
    "load_tokenizer",
    "open_shard",
    "read_header",
    "read_manifest",
    "split_documents",
    "token_datasets",
    "tokenize",
    "verify",
    "write_shard",
]
