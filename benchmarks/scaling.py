"""Expected step time and scaling efficiency of the GPT configs at 8, 64 and 512 GPUs, on paper.

    python benchmarks/scaling.py                          # gpt2_small.yaml, H100 SXM nodes
    python benchmarks/scaling.py --mfu 0.45 --config configs/gpt2_small.yaml grad_accum=4

Weak scaling: every GPU keeps the config's per-GPU batch, so compute per GPU per step is fixed
and only communication grows. Compute time is the step's model FLOPs (the trainer's own
`flops_per_token`, 6N + attention) at an assumed MFU; pass a measured `mfu` from a run's
metrics.jsonl to replace the assumption. Communication is bytes over an achievable bus
bandwidth plus a per-collective latency:

- DDP all-reduces fp32 gradients once per optimizer step (no_sync on the other micro-batches):
  2(n-1)/n x 4N bytes per GPU, in `parallel.bucket_cap_mb` buckets that overlap with the last
  micro-batch's backward; the last bucket never overlaps.
- FSDP (bf16 parameters, fp32 reduction) all-gathers 2N bytes of parameters for the first
  forward of a step and for every backward; what a non-final backward gathered stays for the
  next micro-batch's forward. So k micro-batches cost k + 1 gathers, or one per step when
  `reshard_after_forward` is false (parameters then stay gathered through the whole step).
  It reduce-scatters 4N bytes of gradients once per step (every micro-batch with
  `sync_every_micro_batch`), each (n-1)/n per GPU. Block-by-block prefetch overlaps all of it
  with compute except the first block's gather of each pass.
- HSDP (`parallel.replicate_degree: auto`, one replica per node of 8) gathers and
  reduce-scatters as FSDP but within the node, over NVLink, then all-reduces each gradient
  shard (4N/8 bytes) across the nodes' replicas: 2(R-1)/R x 4N/8 bytes per GPU over
  InfiniBand, once per step (HSDP reduce-scatters every micro-batch with
  `sync_every_micro_batch` but all-reduces only on the last). The two kinds of link work at
  once; the all-reduce of the last unit finishing the backward is never hidden. Like the other
  rows it prices every byte crossing nodes at the NIC rate as one flat ring; NCCL's rings send
  most hops over NVLink, so real multi-node DDP and FSDP lose less, and HSDP gains less.

Bandwidths are published link rates at 80% efficiency: NVLink 4 (H100 SXM) 450 GB/s per
direction inside a node of 8; NDR InfiniBand 400 Gb/s = 50 GB/s per GPU (one NIC per GPU)
between nodes, on a non-blocking fat tree. Collective latency: 2 log2(n) hops of 5 us (tree).
A model, not a measurement: it ignores stragglers, congestion and kernel contention.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dist_train.config import load_config  # noqa: E402
from dist_train.data import DataSpec  # noqa: E402
from dist_train.models import build_model  # noqa: E402

NVLINK_GBPS, IB_GBPS, LINK_EFFICIENCY = 450.0, 50.0, 0.8  # GB/s per GPU per direction
GPUS_PER_NODE, HOP_LATENCY_S = 8, 5e-6


@dataclass(frozen=True)
class Workload:
    params: int
    blocks: int
    flops_per_token: int
    tokens_per_step: int  # per GPU
    micro_batches: int
    bucket_bytes: float


def bus_bandwidth(gpus: int) -> float:
    """Bytes/s a collective moves per GPU: NVLink inside one node, InfiniBand across nodes."""
    return (NVLINK_GBPS if gpus <= GPUS_PER_NODE else IB_GBPS) * LINK_EFFICIENCY * 1e9


def latency(gpus: int) -> float:
    return 2 * math.log2(gpus) * HOP_LATENCY_S


def compute_time(w: Workload, peak_flops: float, mfu: float) -> float:
    return w.tokens_per_step * w.flops_per_token / (peak_flops * mfu)


def ddp_step(w: Workload, gpus: int, compute: float) -> tuple[float, float]:
    """(step time, communication time) for DDP."""
    grad_bytes = 4 * w.params
    buckets = math.ceil(grad_bytes / w.bucket_bytes)
    comm = 2 * (gpus - 1) / gpus * grad_bytes / bus_bandwidth(gpus) + buckets * latency(gpus)
    overlap_window = compute * 2 / 3 / w.micro_batches  # backward of the synchronizing micro-batch
    exposed = max(comm / buckets, comm - overlap_window)
    return compute + exposed, comm


def fsdp_step(w: Workload, gpus: int, compute: float, reshard_after_forward: bool, sync_every: bool) -> tuple:
    gathers = w.micro_batches + 1 if reshard_after_forward else 1  # passes that gather, per step
    gather_bytes = gathers * 2 * w.params
    scatter_bytes = (w.micro_batches if sync_every else 1) * 4 * w.params
    collectives = (gathers + (w.micro_batches if sync_every else 1)) * (w.blocks + 1)
    comm = (gpus - 1) / gpus * (gather_bytes + scatter_bytes) / bus_bandwidth(gpus) + collectives * latency(gpus)
    first_gathers = gathers * (gpus - 1) / gpus * 2 * w.params / w.blocks
    exposed = max(first_gathers / bus_bandwidth(gpus), comm - compute)
    return compute + exposed, comm


def hsdp_step(w: Workload, gpus: int, compute: float, sync_every: bool = False) -> tuple[float, float]:
    """(step time, communication time) for HSDP: FSDP within each node, replicas across nodes."""
    shard, replicas = min(gpus, GPUS_PER_NODE), max(1, gpus // GPUS_PER_NODE)
    gathers = w.micro_batches + 1  # reshard_after_forward, as the fsdp row
    scatters = w.micro_batches if sync_every else 1
    intra = (shard - 1) / shard * (gathers * 2 + scatters * 4) * w.params / bus_bandwidth(shard)
    intra += (gathers + scatters) * (w.blocks + 1) * latency(shard)
    inter = 0.0
    if replicas > 1:
        inter = 2 * (replicas - 1) / replicas * 4 * w.params / shard / bus_bandwidth(gpus)
        inter += (w.blocks + 1) * latency(replicas)
    first_gathers = gathers * (shard - 1) / shard * 2 * w.params / w.blocks / bus_bandwidth(shard)
    exposed = max(first_gathers + inter / (w.blocks + 1), max(intra, inter) - compute)
    return compute + exposed, intra + inter


def workload(config: Path, overrides: list[str]) -> Workload:
    cfg = load_config(config, overrides)
    model = build_model(cfg.model, DataSpec((cfg.data.seq_len,), 256))
    return Workload(
        params=sum(p.numel() for p in model.parameters()),
        blocks=len(model.blocks),
        flops_per_token=model.flops_per_token(),
        tokens_per_step=cfg.data.batch_size * cfg.data.seq_len * cfg.train.grad_accum_steps,
        micro_batches=cfg.train.grad_accum_steps,
        bucket_bytes=cfg.parallel.bucket_cap_mb * 2**20,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "gpt2_small.yaml")
    parser.add_argument("--mfu", type=float, default=0.40, help="assumed (or measured) compute MFU")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="H100 SXM dense bf16")
    parser.add_argument("--gpus", type=int, nargs="+", default=[8, 64, 512])
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args()

    w = workload(args.config, args.overrides)
    compute = compute_time(w, args.peak_tflops * 1e12, args.mfu)
    print(
        f"{args.config.name}: {w.params / 1e6:.1f}M parameters, {w.tokens_per_step:,} tokens per GPU per step "
        f"({w.micro_batches} micro-batch{'es' if w.micro_batches > 1 else ''}), "
        f"{w.flops_per_token / 1e6:.0f} MFLOP/token; compute "
        f"{compute * 1e3:.1f} ms per step at {args.mfu:.0%} MFU of {args.peak_tflops:g} TFLOP/s\n"
    )
    print("| GPUs | strategy | communication per step | step time | scaling efficiency |")
    print("| --- | --- | --- | --- | --- |")
    for gpus in args.gpus:
        rows = {
            "ddp": ddp_step(w, gpus, compute),
            "fsdp": fsdp_step(w, gpus, compute, reshard_after_forward=True, sync_every=False),
            "fsdp, reshard_after_forward=false": fsdp_step(w, gpus, compute, False, False),
        }
        if gpus > GPUS_PER_NODE:  # within one node HSDP is FSDP
            rows[f"hsdp {gpus // GPUS_PER_NODE}x{GPUS_PER_NODE}"] = hsdp_step(w, gpus, compute)
        for name, (step, comm) in rows.items():
            print(f"| {gpus} | {name} | {comm * 1e3:.1f} ms | {step * 1e3:.1f} ms | {compute / step:.1%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
