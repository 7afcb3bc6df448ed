"""Every optimizer x strategy x optim.fused x precision x device cell the config accepts, on real
workers: each trains, or is refused in one line by the check `dist-train launch` makes before
it starts any worker. Run under torchrun (1 process for `none`, 2 for the others); rank 0
writes one record per cell as JSON for tests/test_optimizer_matrix.py.

    python -m torch.distributed.run --nproc-per-node 2 tests/optimizer_matrix_worker.py OUT.json ddp fsdp

The `cuda` column cannot run here, so it runs what CUDA would: `auto` resolves as it does on a
GPU (fused where the kernel runs on the parameters), and that choice trains on this CPU. The
kernels differ by device, but whether DTensor can dispatch a fused op does not: the FSDP + fused
SGD crash a GPU hits at its first step is the same NotImplementedError here. fp16 cells that a
GPU accepts cannot train on a CPU at all; they are recorded as such (benchmarks/device_session.sh
trains them).
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import sys
import traceback
from pathlib import Path

import torch

from dist_train.config import Config, UserError, load_config
from dist_train.distributed import process_group
from dist_train.launcher import preflight
from dist_train.optim import use_fused
from dist_train.train.trainer import train

OPTIMIZERS = ("sgd", "adam", "adamw")
FUSED = ("auto", "true", "false")
PRECISIONS = ("fp32", "bf16", "fp16")
DEVICES = ("cpu", "cuda")
STRATEGIES = {  # name: overrides
    "none": ["parallel.strategy=none"],
    "ddp": ["parallel.strategy=ddp"],
    "fsdp": ["parallel.strategy=fsdp"],
    "hsdp": ["parallel.strategy=fsdp", "parallel.replicate_degree=2"],
    "fsdp_cpu_offload": ["parallel.strategy=fsdp", "parallel.cpu_offload=true"],
}
DIGITS = Path(__file__).resolve().parents[1] / "configs" / "digits.yaml"
TINY = ["train.max_epochs=null", "train.max_steps=2", "train.log_every=1", "train.eval_every=0",
        "train.eval_batches=1", "checkpoint.every_steps=0", "data.batch_size=16", "logging.wandb.mode=disabled",
        "train.progress_bar=false"]  # fmt: skip


def main() -> None:
    out, strategies = Path(sys.argv[1]), sys.argv[2:]
    records, outcomes = [], {}  # outcomes: of each distinct run, by the config it trains
    with process_group(60.0) as env:
        torch.set_num_threads(1)  # tiny models on a busy 2-core machine
        for optimizer, strategy, fused, precision, device in itertools.product(
            OPTIMIZERS, strategies, FUSED, PRECISIONS, DEVICES
        ):
            record = {"optimizer": optimizer, "strategy": strategy, "fused": fused, "precision": precision,
                      "device": device}  # fmt: skip
            overrides = [f"optim.name={optimizer}", *STRATEGIES[strategy], f"train.precision={precision}", *TINY]
            try:  # the config as the user wrote it, checked as `dist-train launch` checks it
                cfg = load_config(DIGITS, [*overrides, f"optim.fused={fused}"])
                preflight(cfg, env.world_size, env.world_size, cuda=device == "cuda")
            except UserError as exc:
                records.append({**record, "outcome": "refused", "message": str(exc)})
                continue
            if precision == "fp16":  # accepted for a GPU, where GradScaler runs; nothing here can
                records.append({**record, "outcome": "needs a GPU"})
                continue
            runs_fused = use_fused(cfg.optim, cfg.parallel, torch.device(device))  # what that device runs
            name = f"{optimizer}-{strategy}-{precision}-{'fused' if runs_fused else 'unfused'}"
            if name not in outcomes:
                as_run = [*overrides, f"optim.fused={str(runs_fused).lower()}", f"run.output_dir={out.parent / 'runs'}"]
                outcomes[name] = run(load_config(DIGITS, [*as_run, f"run.name={name}"]), env.is_main)
            records.append({**record, "runs_fused": runs_fused, **outcomes[name]})
        if env.is_main:
            out.write_text(json.dumps(records, indent=1))


def run(cfg: Config, is_main: bool) -> dict:
    """Train the cell's run: its outcome (the start line names the kernel), or the traceback."""
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            result = train(cfg)
    except Exception:  # noqa: BLE001 - recorded: the test fails on it and shows the traceback
        return {"outcome": "crashed", "traceback": traceback.format_exc()[-3000:]}
    if not is_main:  # rank 0 prints and writes metrics.jsonl
        return {"outcome": "trained", "step": result.step}
    start = next((line for line in printed.getvalue().splitlines() if line.startswith("training ")), "")
    records = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    return {"outcome": "trained", "step": result.step, "start_line": start, "losses": losses}


if __name__ == "__main__":
    main()
