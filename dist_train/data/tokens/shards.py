"""The token shard format: a 32-byte header, then the ids; reading, writing and the manifest."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dist_train.errors import UserError

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
