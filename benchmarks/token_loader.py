"""Training-loader tokens/s: memory-mapped token shards (data.dataset=tokens) against the
in-memory byte path (data.dataset=text), on a synthetic corpus this script writes.

    python benchmarks/token_loader.py                    # 64 MB corpus, seq_len 1024, batch 16
    python benchmarks/token_loader.py --mb 256 --bpe-vocab 0

For each path: the start-up (build_pipeline: text reads every file into memory, tokens maps
the shards), one rank's training loader drained through the resumable sampler (random
windows, collation) as the trainer takes it, and the process's private memory growth. The
shards were just written, so their pages are in the page cache: the numbers are the loader's
own cost, not the disk's. `--bpe-vocab N` also times tokenizing with a BPE of N ids.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dist_train.config import DataConfig  # noqa: E402
from dist_train.data import build_pipeline  # noqa: E402
from dist_train.data.tokens import tokenize  # noqa: E402
from dist_train.distributed import DistEnv  # noqa: E402


def write_corpus(folder: Path, megabytes: int, files: int = 64) -> list[Path]:
    """Documents of words drawn from a Zipf-like distribution: text-shaped, compressible by BPE."""
    rng = np.random.default_rng(0)
    words = np.array(["".join(rng.choice(list("etaoinshrdlucmfwyp"), rng.integers(2, 9))) for _ in range(5000)])
    weights = 1 / np.arange(1, len(words) + 1)
    weights /= weights.sum()
    folder.mkdir(parents=True, exist_ok=True)
    per_file = megabytes * 2**20 // files
    for i in range(files):
        chosen = words[rng.choice(len(words), per_file // 5, p=weights)]
        (folder / f"doc{i:04d}.txt").write_text(" ".join(chosen)[:per_file] + "\n")
    return sorted(folder.glob("*.txt"))


def rss_anon() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


def loader_rate(cfg: DataConfig, batches: int) -> tuple[float, float, int]:
    """(start-up seconds, training tokens/s, private memory growth in bytes) of one rank."""
    before = rss_anon()
    start = time.perf_counter()
    data = build_pipeline(cfg, DistEnv(0, 0, 1, torch.device("cpu")), grad_accum_steps=1, seed=0)
    data.train.next_micro_batch()  # warm-up: the epoch's permutation
    startup = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(batches):
        data.train.next_micro_batch()
    rate = batches * cfg.batch_size * cfg.seq_len / (time.perf_counter() - start)
    return startup, rate, rss_anon() - before


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=64, help="corpus size in MB")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--batches", type=int, default=400)
    parser.add_argument("--bpe-vocab", type=int, default=8192, help="also tokenize with a BPE of this size (0: skip)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        corpus = write_corpus(Path(tmp) / "corpus", args.mb)
        glob = str(Path(tmp) / "corpus" / "*.txt")
        common = dict(seq_len=args.seq_len, batch_size=args.batch_size, val_fraction=0.1, num_workers=0)
        start = time.perf_counter()
        tokenize([glob], Path(tmp) / "byte", tokenizer="byte")
        byte_time = time.perf_counter() - start
        # The tokens path first: the text path's in-memory corpus would inflate its RssAnon.
        rows.append(
            (
                "tokens (byte shards, memmap)",
                byte_time,
                *loader_rate(DataConfig("tokens", paths=[f"{tmp}/byte"], **common), args.batches),
            )
        )
        if args.bpe_vocab:
            start = time.perf_counter()
            tokenize([glob], Path(tmp) / "bpe", tokenizer="gpt2", vocab_size=args.bpe_vocab)
            bpe_time = time.perf_counter() - start
            cfg = DataConfig("tokens", paths=[f"{tmp}/bpe"], **common)
            rows.append((f"tokens (BPE {args.bpe_vocab}, memmap)", bpe_time, *loader_rate(cfg, args.batches)))
        rows.append(
            ("text (bytes in memory)", None, *loader_rate(DataConfig("text", paths=[glob], **common), args.batches))
        )
        size = sum(p.stat().st_size for p in corpus)

    print(f"corpus: {len(corpus)} files, {size / 2**20:.0f} MiB; seq_len {args.seq_len}, batch {args.batch_size}, "
          f"{args.batches} batches, 1 rank, no workers")  # fmt: skip
    print("| path | tokenize | start-up | loader tokens/s | private memory growth |")
    print("| --- | --- | --- | --- | --- |")
    for name, tok, startup, rate, grown in rows:
        tok_text = "-" if tok is None else f"{tok:.1f} s"
        print(f"| {name} | {tok_text} | {startup:.2f} s | {rate:,.0f} | {grown / 2**20:.0f} MiB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
