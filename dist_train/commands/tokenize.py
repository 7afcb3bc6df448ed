"""`dist-train tokenize --tokenizer byte|gpt2|PATH.json --out DIR FILES...`: text files (one
document each) to memory-mappable token shards for data.dataset=tokens."""

from __future__ import annotations

import argparse
from pathlib import Path

TAKES_OVERRIDES = False


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("tokenize", help="tokenize text files into token shards (data.dataset=tokens)")
    parser.add_argument("inputs", nargs="+", help="text files or globs; each file is one document")
    parser.add_argument("--out", required=True, help="a new (or empty) directory for the shards")
    parser.add_argument(
        "--tokenizer",
        default="byte",
        help="byte (UTF-8 bytes, vocabulary 256), gpt2 (a byte-level BPE trained "
        "on the training files) or a tokenizers JSON file",
    )
    parser.add_argument("--vocab-size", type=int, default=None, help="gpt2 only: the BPE's vocabulary (default 50257)")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="documents held out for validation")
    parser.add_argument("--shard-tokens", type=int, default=None, help="tokens per shard at most (default 2**28)")


def run(args: argparse.Namespace) -> int:
    from dist_train.data.tokens import DEFAULT_SHARD_TOKENS, tokenize

    manifest = tokenize(
        args.inputs,
        Path(args.out),
        tokenizer=args.tokenizer,
        vocab_size=args.vocab_size,
        val_fraction=args.val_fraction,
        shard_tokens=args.shard_tokens or DEFAULT_SHARD_TOKENS,
    )
    shards = manifest["shards"]
    print(
        f"tokenized {len(manifest['documents'])} documents into {args.out}: "
        f"{manifest['train_tokens']:,} train tokens in {len(shards['train'])} shard(s), "
        f"{manifest['val_tokens']:,} val tokens in {len(shards['val'])}; "
        f"vocabulary {manifest['vocab_size']:,} ({manifest['dtype']}), tokenizer {manifest['tokenizer']}"
    )
    requested = args.vocab_size or 50257
    if args.tokenizer == "gpt2" and manifest["vocab_size"] < requested:
        # The BPE stops merging when no pair repeats: a small corpus cannot fill a large vocabulary.
        print(f"note: the corpus gave {manifest['vocab_size']:,} ids, fewer than --vocab-size {requested:,}")
    return 0
