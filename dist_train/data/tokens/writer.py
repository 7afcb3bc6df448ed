"""`dist-train tokenize`: text files into train and validation shards, split by document."""

from __future__ import annotations

import glob
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from dist_train.data.tokens.shards import (
    DEFAULT_SHARD_TOKENS,
    EOT,
    MANIFEST,
    TOKENIZER_FILE,
    VERSION,
    ShardWriter,
    TokensError,
    token_dtype,
)
from dist_train.data.tokens.vocab import byte_tokenizer, train_bpe


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
