"""What only a GPU can show, checked in one run: the first lent GPU verifies it all.

    PYTHONPATH=. python3 benchmarks/gpu_check.py                  # one H100/H200: about 7 minutes
    PYTHONPATH=. python3 benchmarks/gpu_check.py --out gpu.json   # the JSON somewhere else
    PYTHONPATH=. python3 benchmarks/gpu_check.py --smoke          # the same plumbing on a CPU, tiny

Every check drives dist_train through its real CLI (`python -m dist_train.cli train|launch`)
with W&B off (the GPU machines have no wandb), reads the run's metrics.jsonl, and is
independent of the others: one that fails or runs out of time is recorded with the end of
its error and the next one runs. The JSON is rewritten after every check, so a run cut short
keeps what finished. Checks and targets (issue 12):

1. nccl: a process group of one under `dist-train launch` comes up with NCCL (and gloo for CPU
   tensors) and trains.
2. bf16, fp16: the digits job trains in each precision (the loss falls, accuracy far above
   chance); fp16 runs GradScaler with the fused optimizer.
3. gpt2_small: `configs/gpt2_small.yaml` tokens/s and MFU, eager and with `train.compile`,
   steady state (first logging intervals dropped); target MFU >= 45%. Its final checkpoint's
   `checkpoint_stall_s` is the save stall for that model.
4. resnet18/resnet50 at 32x32 (CIFAR stem) and 224x224 (ImageNet stem), bf16, channels_last:
   dist_train's samples/s over a hand-written loop's (benchmarks/loops.py), target >= 0.98.
5. fsdp_cpu_offload: FSDP with `parallel.cpu_offload` trains (this crashed with a NCCL-only
   process group: offloaded gradient norms are CPU collectives).
6. async_checkpoint: `checkpoint.async_save` under NCCL (DCP's background write on its own gloo
   group, staging into pinned host memory) saves every 5 steps and completes; its stalls.
Peak memory per rank (`max_memory_gb`, the maximum over ranks) is reported for every run.
Each command runs in a session of its own, killed whole at its timeout; `--budget-s` (default
480) bounds the whole run, and a check that would start after it is recorded as skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from dist_train.launcher import child_pids  # noqa: E402

QUIET = ["logging.wandb.mode=disabled", "train.progress_bar=false"]
DEADLINE = [float("inf")]  # time.monotonic() by which every check must have ended (--budget-s)


def bounded(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Run a command; past `timeout` (or the whole run's deadline) kill it with every process
    it started, so that torchrun's workers (in sessions of their own) do not outlive their
    launcher holding the GPU and the output pipes."""
    timeout = min(timeout, DEADLINE[0] - time.monotonic())
    if timeout <= 0:
        raise TimeoutError("skipped: the run's --budget-s is spent")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        tree, parents = [], [proc.pid]
        while parents:  # every descendant, found before any is killed (orphans lose their parent)
            parents = [child for parent in parents for child in child_pids(parent)]
            tree += parents
        for pid in [proc.pid, *tree]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.communicate()
        raise TimeoutError(f"killed after {timeout:.0f} s: {' '.join(args[2:6])} ...") from None
    return subprocess.CompletedProcess(args, proc.returncode, stdout, stderr)


@dataclass
class Run:
    """A finished CLI run: its exit code, output and metrics.jsonl records."""

    returncode: int
    stdout: str
    stderr: str
    records: list[dict] = field(default_factory=list)

    @property
    def start_line(self) -> str:
        return next((line for line in self.stdout.splitlines() if line.startswith("training ")), "")

    def train_records(self) -> list[dict]:
        return [r for r in self.records if "loss" in r]

    def value(self, key: str) -> float | None:
        """The last logged value of `key`."""
        return next((r[key] for r in reversed(self.records) if key in r), None)

    def peak_memory_gb(self) -> float | None:
        values = [r["max_memory_gb"] for r in self.records if "max_memory_gb" in r]
        return max(values) if values else None

    def failure(self) -> str:
        return (self.stderr.strip() or self.stdout.strip())[-600:]


def cli(verb: str, config: str, overrides: list[str], timeout: float, nproc: int = 1) -> Run:
    """`dist-train train` (or `launch` with `nproc` workers) in a fresh run directory."""
    with tempfile.TemporaryDirectory() as tmp:
        args = [sys.executable, "-m", "dist_train.cli", verb, config, f"run.output_dir={tmp}", *QUIET, *overrides]
        if verb == "launch":
            args += ["--nproc-per-node", str(nproc)]
        proc = bounded(args, timeout)
        metrics = next(Path(tmp).glob("*/metrics.jsonl"), None)
        records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics else []
        return Run(proc.returncode, proc.stdout, proc.stderr, records)


def steady(run: Run, key: str, skip_intervals: int) -> float:
    """Median of `key` over the logging intervals after the first `skip_intervals` (warm-up,
    compilation, cuDNN's algorithm search)."""
    values = [r[key] for r in run.train_records() if key in r][skip_intervals:]
    if not values:
        raise RuntimeError(f"no {key} logged after {skip_intervals} warm-up intervals")
    return statistics.median(values)


def samples_per_s_between_logs(run: Run, first_step: int, last_step: int, samples_per_step: int) -> float:
    """Throughput from the wall clock of two log lines: what overhead.py reads for dist_train."""
    logged = {r["step"]: r["time"] for r in run.train_records()}
    return (last_step - first_step) * samples_per_step / (logged[last_step] - logged[first_step])


# --------------------------------------------------------------------------- the checks


@dataclass
class Result:
    passed: bool | None  # None: measured, no target, or skipped
    numbers: dict
    target: str = ""
    note: str = ""


def check_nccl(smoke: bool) -> Result:
    # ~20 s: torchrun start, NCCL init, 50 short steps.
    run = cli(
        "launch", "configs/digits.yaml", ["train.max_epochs=null", "train.max_steps=50", "train.log_every=10"], 300
    )
    # The start line's settings go "..., process group nccl:cuda,gloo:cpu, loss cross_entropy".
    after = run.start_line.rsplit("process group ", 1)[-1] if "process group" in run.start_line else ""
    backend = after.split(", ", 1)[0]
    expected = "gloo" if smoke else "nccl"
    ok = run.returncode == 0 and expected in backend and (smoke or "gloo" in backend)
    note = run.start_line if ok else run.failure()
    return Result(ok, {"process_group": backend, "peak_memory_gb": run.peak_memory_gb()}, f"{expected} group", note)


def check_precision(precision: str, smoke: bool) -> Result:
    # ~20 s each: 300 steps of the digits CNN.
    if smoke and precision == "fp16":
        return Result(None, {}, "", "skipped: fp16 needs CUDA")
    steps = 200 if smoke else 300  # the digits job's warm-up alone is 50 steps
    overrides = [f"train.precision={precision}", "train.max_epochs=null", f"train.max_steps={steps}",
                 "train.log_every=20", "train.eval_every=0"]  # fmt: skip
    run = cli("train", "configs/digits.yaml", overrides, 300)
    losses = [r["loss"] for r in run.train_records()]
    accuracy = run.value("val_acc")
    if run.returncode != 0 or not losses or accuracy is None:
        return Result(False, {}, "loss falls", run.failure())
    numbers = {
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "val_acc": accuracy,
        "fused_optimizer": "fused optimizer" in run.start_line,
        "peak_memory_gb": run.peak_memory_gb(),
    }
    good = losses[-1] < 0.7 * losses[0] and (smoke or accuracy > 0.8)
    return Result(good, numbers, "loss falls, val_acc > 0.8", run.start_line)


def check_gpt2_small(compile: bool, smoke: bool) -> Result:
    # Eager ~40 s (corpus read, model init, 60 steps of 32k tokens); compiled ~90 s more.
    if smoke:
        if compile:
            return Result(None, {}, "", "skipped: compiling on a CPU takes minutes")
        config, sizes = "configs/gpt_cpu.yaml", ["train.max_steps=12", "train.log_every=4", "train.peak_tflops=1"]
    else:
        steps = 80 if compile else 60
        config, sizes = "configs/gpt2_small.yaml", [f"train.max_steps={steps}", "train.log_every=10"]
    overrides = [*sizes, "train.eval_every=0", "train.eval_batches=1", "checkpoint.every_steps=0",
                 f"train.compile={str(compile).lower()}"]  # fmt: skip
    run = cli("train", config, overrides, 420)
    if run.returncode != 0:
        return Result(False, {}, "MFU >= 45%", run.failure())
    skip = 2 if compile else 1
    numbers = {
        "tokens_per_s": steady(run, "tokens_per_s", skip),
        "mfu": steady(run, "mfu", skip),
        "peak_memory_gb": run.peak_memory_gb(),
        "checkpoint_stall_s": run.value("checkpoint_stall_s"),
    }
    return Result(None if smoke else numbers["mfu"] >= 0.45, numbers, "MFU >= 45%", run.start_line)


def check_resnet(depth: int, image_size: int, smoke: bool) -> Result:
    # ~25 s a pair at 224 pixels, ~15 s at 32: start-up, warm-up, 100 measured steps each.
    batch = {(18, 32): 256, (50, 32): 256, (18, 224): 128, (50, 224): 64}.get((depth, image_size), 8)
    warmup, steps, samples = (2, 4, 64) if smoke else (20, 100, 1024)
    if smoke:
        batch = 8
    model = [f"model.name=resnet{depth}", f"model.small_input_stem={str(image_size <= 64).lower()}"]
    overrides = [*model, f"data.synthetic_shape=[3,{image_size},{image_size}]", f"data.synthetic_size={samples}",
                 f"data.batch_size={batch}", "train.precision=bf16", "train.channels_last=true",
                 f"train.max_steps={warmup + steps}", f"train.log_every={warmup}", "train.eval_every=0",
                 "train.eval_batches=1", "checkpoint.every_steps=0", "parallel.strategy=ddp"]  # fmt: skip
    plain = [sys.executable, str(REPO / "benchmarks" / "loops.py"), "--framework", "plain",
             "--workload", f"resnet{depth}", "--image-size", str(image_size), "--precision", "bf16",
             "--channels-last", "--batch-size", str(batch), "--dataset-size", str(samples),
             "--warmup", str(warmup), "--steps", str(steps)]  # fmt: skip
    hand = bounded(plain, 300)
    ours = cli("train", "configs/synthetic.yaml", overrides, 300)
    if hand.returncode != 0 or ours.returncode != 0:
        return Result(False, {}, ">= 0.98x", (hand.stderr if hand.returncode else ours.failure())[-600:])
    hand_rate = json.loads(hand.stdout.strip().splitlines()[-1])["samples_per_s"]
    our_rate = samples_per_s_between_logs(ours, warmup, warmup + steps, batch)
    ratio = our_rate / hand_rate
    numbers = {"batch": batch, "hand_written_samples_per_s": hand_rate, "dist_train_samples_per_s": our_rate,
               "ratio": ratio, "data_wait_fraction": steady(ours, "data_wait_fraction", 1),
               "peak_memory_gb": ours.peak_memory_gb()}  # fmt: skip
    return Result(None if smoke else ratio >= 0.98, numbers, ">= 0.98x", ours.start_line)


def check_fsdp_cpu_offload(smoke: bool) -> Result:
    # ~20 s: torchrun, 3 steps of the small FSDP GPT with parameters and optimizer on the host.
    overrides = ["parallel.cpu_offload=true", "train.max_steps=3", "train.log_every=1", "train.eval_batches=1",
                 "checkpoint.every_steps=0"]  # fmt: skip
    run = cli("launch", "configs/gpt_fsdp.yaml", overrides, 300)
    norms = [r["grad_norm"] for r in run.train_records()]
    ok = run.returncode == 0 and len(norms) == 3 and all(map(_finite, norms))
    note = run.start_line if ok else run.failure()
    return Result(ok, {"grad_norms": norms, "peak_memory_gb": run.peak_memory_gb()}, "trains", note)


def check_async_checkpoint(smoke: bool) -> Result:
    # ~30 s: torchrun with NCCL (and a gloo group for the background writes), the small FSDP GPT
    # saved every 5 steps in the background (staged into pinned host memory), the last save synchronous.
    overrides = ["checkpoint.async_save=true", "checkpoint.every_steps=5", "train.max_steps=20",
                 "train.log_every=5", "train.eval_every=0", "train.eval_batches=1"]  # fmt: skip
    run = cli("launch", "configs/gpt_fsdp.yaml", overrides, 300)
    stalls = [r["checkpoint_stall_s"] for r in run.records if "checkpoint_stall_s" in r]
    ok = run.returncode == 0 and len(stalls) == 4
    numbers = {"async_stalls_s": stalls[:-1], "final_sync_stall_s": stalls[-1] if stalls else None}
    return Result(ok, numbers, "4 saves, run completes", run.start_line if ok else run.failure())


def _finite(value: float) -> bool:
    return value == value and abs(value) != float("inf")


def checks(smoke: bool) -> dict[str, Callable[[], Result]]:
    large = 64 if smoke else 224  # the ImageNet-sized case, small enough for a CPU in smoke mode
    return {
        "nccl": lambda: check_nccl(smoke),
        "bf16": lambda: check_precision("bf16", smoke),
        "fp16": lambda: check_precision("fp16", smoke),
        "gpt2_small eager": lambda: check_gpt2_small(False, smoke),
        "gpt2_small compiled": lambda: check_gpt2_small(True, smoke),
        "resnet18 32px": lambda: check_resnet(18, 32, smoke),
        "resnet50 32px": lambda: check_resnet(50, 32, smoke),
        f"resnet18 {large}px": lambda: check_resnet(18, large, smoke),
        f"resnet50 {large}px": lambda: check_resnet(50, large, smoke),
        "fsdp_cpu_offload": lambda: check_fsdp_cpu_offload(smoke),
        "async_checkpoint": lambda: check_async_checkpoint(smoke),
    }


def environment() -> dict:
    cuda = torch.cuda.is_available()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    return {
        "device": torch.cuda.get_device_name(0) if cuda else f"CPU ({platform.machine()}, {os.cpu_count()} cores)",
        "torch": torch.__version__,
        "cuda": torch.version.cuda if cuda else None,
        "date": time.strftime("%Y-%m-%d"),
        "commit": commit.stdout.strip() or None,
    }


def _show(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 10 else f"{value:,.0f}"
    if isinstance(value, list):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return str(value)


def table(results: dict[str, dict]) -> str:
    lines = ["| check | passed | numbers | target | seconds |", "| --- | --- | --- | --- | --- |"]
    for name, r in results.items():
        shown = {True: "yes", False: "**no**", None: "-"}[r["passed"]]
        numbers = ", ".join(f"{k}={_show(v)}" for k, v in r["numbers"].items() if v is not None)
        lines.append(f"| {name} | {shown} | {numbers or r['note'][-120:]} | {r['target']} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on a CPU: the script's plumbing only")
    parser.add_argument("--only", nargs="+", default=None, help="run only these checks (names as in the table)")
    parser.add_argument("--budget-s", type=float, default=480, help="all checks end within this many seconds")
    args = parser.parse_args()
    DEADLINE[0] = time.monotonic() + args.budget_s
    if not args.smoke and not torch.cuda.is_available():
        print("error: no CUDA device; --smoke runs the plumbing on a CPU", file=sys.stderr)
        return 2

    report = {"environment": environment(), "checks": {}}
    print(" ".join(f"{k}={v}" for k, v in report["environment"].items()), flush=True)
    for name, check in checks(args.smoke).items():
        if args.only and name not in args.only:
            continue
        start = time.monotonic()
        try:
            result = check()
        except TimeoutError as exc:  # killed at its timeout (failed), or never started (skipped)
            result = Result(None if str(exc).startswith("skipped") else False, {}, "", str(exc))
        except Exception as exc:  # noqa: BLE001 - recorded; the other checks still run
            result = Result(False, {}, "", f"{type(exc).__name__}: {str(exc)[-500:]}")
        report["checks"][name] = {**vars(result), "seconds": time.monotonic() - start}
        print(f"{name}: {report['checks'][name]}", flush=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    print("\n" + table(report["checks"]))
    failed = [name for name, r in report["checks"].items() if r["passed"] is False]
    print(f"\n{len(report['checks'])} checks, {len(failed)} failed{': ' + ', '.join(failed) if failed else ''}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
