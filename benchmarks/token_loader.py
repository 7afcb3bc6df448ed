"""Training-loader tokens/s: memory-mapped token shards (data.dataset=tokens) against the
in-memory byte path (data.dataset=text), on a synthetic corpus this script writes.

    python benchmarks/token_loader.py                    # 64 MB corpus, seq_len 1024, batch 16
    python benchmarks/token_loader.py --mb 256 --bpe-vocab 0

For each path: the start-up (build_pipeline: text reads every file into memory, tokens maps
the shards), one rank's training loader drained through the resumable sampler (random
windows, collation) as the trainer takes it, best of --reps drains taken in turns with the
other paths, and the process's private memory growth (RssAnon). The
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
from dist_train.data import Batch, DataPipeline, build_pipeline  # noqa: E402
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


def start_loader(cfg: DataConfig) -> tuple[DataPipeline, float, int]:
    """One rank's pipeline, its start-up seconds and the private memory it took."""
    before, start = rss_anon(), time.perf_counter()
    data = build_pipeline(cfg, DistEnv(0, 0, 1, torch.device("cpu")), Batch(1, cfg.batch_size, 1), seed=0)
    data.train.next_micro_batch()  # warm-up: the epoch's permutation
    return data, time.perf_counter() - start, rss_anon() - before


def drain(data: DataPipeline, cfg: DataConfig, batches: int) -> float:
    start = time.perf_counter()
    for _ in range(batches):
        data.train.next_micro_batch()
    return batches * cfg.batch_size * cfg.seq_len / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=64, help="corpus size in MB")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--batches", type=int, default=400)
    parser.add_argument("--reps", type=int, default=5, help="drains of --batches per path; the best is shown")
    parser.add_argument("--bpe-vocab", type=int, default=8192, help="also tokenize with a BPE of this size (0: skip)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    paths, tokenize_s = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        corpus = write_corpus(Path(tmp) / "corpus", args.mb)
        glob = str(Path(tmp) / "corpus" / "*.txt")
        common = dict(seq_len=args.seq_len, batch_size=args.batch_size, val_fraction=0.1, num_workers=0)
        start = time.perf_counter()
        tokenize([glob], Path(tmp) / "byte", tokenizer="byte")
        tokenize_s["tokens (byte shards, memmap)"] = time.perf_counter() - start
        paths["tokens (byte shards, memmap)"] = DataConfig("tokens", paths=[f"{tmp}/byte"], **common)
        if args.bpe_vocab:
            name = f"tokens (BPE {args.bpe_vocab}, memmap)"
            start = time.perf_counter()
            tokenize([glob], Path(tmp) / "bpe", tokenizer="gpt2", vocab_size=args.bpe_vocab)
            tokenize_s[name] = time.perf_counter() - start
            paths[name] = DataConfig("tokens", paths=[f"{tmp}/bpe"], **common)
        paths["text (bytes in memory)"] = DataConfig("text", paths=[glob], **common)
        # Started in this order, the text path last: its in-memory corpus would count in the
        # memory growth of any path started after it.
        loaders = {name: start_loader(cfg) for name, cfg in paths.items()}
        # Drains alternate between the paths and the best of each is kept: other jobs on a
        # shared machine only ever slow one down, and alternating spreads them over all paths.
        rates: dict[str, list[float]] = {name: [] for name in paths}
        for _ in range(args.reps):
            for name, cfg in paths.items():
                rates[name].append(drain(loaders[name][0], cfg, args.batches))
        size = sum(p.stat().st_size for p in corpus)

    print(f"corpus: {len(corpus)} files, {size / 2**20:.0f} MiB; seq_len {args.seq_len}, batch {args.batch_size}, "
          f"best of {args.reps} x {args.batches} batches, 1 rank, no workers")  # fmt: skip
    print("| path | tokenize | start-up | loader tokens/s | private memory growth |")
    print("| --- | --- | --- | --- | --- |")
    for name in paths:
        _, startup, grown = loaders[name]
        tok_text = f"{tokenize_s[name]:.1f} s" if name in tokenize_s else "-"
        print(f"| {name} | {tok_text} | {startup:.2f} s | {max(rates[name]):,.0f} | {grown / 2**20:.0f} MiB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
