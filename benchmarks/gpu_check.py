"""What only a GPU can show, one check at a time: benchmarks/device_session.sh runs this.

    PYTHONPATH=. python3 benchmarks/gpu_check.py --out-dir OUT          # one H200: at most 9 minutes
    PYTHONPATH=. python3 benchmarks/gpu_check.py --out-dir OUT --smoke  # the same checks on a CPU, tiny
    PYTHONPATH=. python3 benchmarks/gpu_check.py --out-dir OUT --only fsdp_sgd nccl_fp16

Every check drives dist_train through its real CLI (`python -m dist_train.cli train|launch`)
with W&B off (the GPU machines have no wandb) and reads the runs' metrics.jsonl. Each runs in a
time box of its own, inside the session's budget; a command past its box is killed with every
process it started (torchrun's workers too), the check is recorded as failed, and the next one
runs; a check the budget cut shorter than its own box is recorded as cut short, not failed. A check
that would start with less than --min-box-s (15 s) of the budget left is recorded as skipped.
The moment a check ends, OUT/results.json holds every finished check (passed, numbers, target,
note, seconds) and OUT/checks.tar.gz one JSON and one log (every command and its output) per check,
so a session cut short keeps what finished; with OUT/environment.json and device_session.sh's
OUT/session.log that is 4 files (a lent GPU machine returns at most 8).

The checks, riskiest first (what has never run on a GPU, then what is measured):
 1. fsdp_sgd, fsdp_adamw: FSDP under NCCL trains with SGD (foreach kernels: DTensor has no fused
    SGD) and AdamW (fused), bf16 mixed precision.
 2. async_checkpoint: checkpoint.async_save under NCCL: DCP's background write on its own gloo
    group, staged into pinned host memory, every 5 steps; no save left partial.
 3. find_batch_oom: data.batch_size=auto with the process capped by
    torch.cuda.set_per_process_memory_fraction, so the search meets real CUDA out-of-memory
    errors (cuDNN and cuBLAS included); then training at the size found, stopped, and a DCP resume.
 4. fsdp_cpu_offload_2_ranks: FSDP with parallel.cpu_offload on 2 ranks of the one GPU over
    gloo (parallel.backend=gloo; NCCL refuses two ranks on one GPU), so the gradient-norm
    all-reduce of CPU shards really crosses ranks.
 5. ddp_2_ranks: DDP on 2 ranks of the one GPU over gloo: with one process `ddp` trains as
    `none`, so this is where DDP's wrapper, buckets and no_sync run on a GPU.
 6. nccl_bf16, nccl_fp16: `dist-train launch` brings up the cpu:gloo,cuda:nccl group and the
    digits job trains with the fused optimizer; fp16 through GradScaler (its inf check on the device).
 7. resnet50: dist_train's samples/s over a hand-written loop's (benchmarks/loops.py) with the same
    data path (uint8 images copied to the device and normalized there), 224x224, bf16,
    channels_last; target >= 0.98.
 8. gpt2_small_eager, gpt2_small_compiled: configs/gpt2_small.yaml tokens/s and MFU, steady state;
    target MFU >= 45%.
Peak allocated and reserved memory and allocator retries (the fullest rank's) are kept for every run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from dist_train.launcher import child_pids  # noqa: E402

QUIET = ["logging.wandb.mode=disabled", "train.progress_bar=false"]
EXTRA_OVERRIDES_ENV = "GPU_CHECK_EXTRA_OVERRIDES"  # space-separated key=value, after each check's own
# A memory cap for the find_batch_oom check, set in the training process before dist_train starts
# (a CPU has none to cap: smoke runs the same entry).
CAPPED = (
    "import sys, torch\n"
    "if torch.cuda.is_available(): torch.cuda.set_per_process_memory_fraction(float(sys.argv[1]))\n"
    "from dist_train.cli import main\n"
    "sys.exit(main(sys.argv[2:]))"
)


@dataclass
class Result:
    passed: bool | None  # None: measured without a target, or skipped
    numbers: dict = field(default_factory=dict)
    target: str = ""
    note: str = ""


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

    def values(self, key: str) -> list:
        return [r[key] for r in self.records if key in r]

    def last(self, key: str):
        found = self.values(key)
        return found[-1] if found else None

    def memory(self) -> dict:
        """The fullest rank's peaks over the run (CUDA only) and the allocator's retries."""
        return {key: max(self.values(key)) for key in ("max_memory_gb", "max_reserved_gb", "alloc_retries")
                if self.values(key)}  # fmt: skip

    def failure(self) -> str:
        return (self.stderr.strip() or self.stdout.strip())[-800:]


class BudgetSpent(TimeoutError):
    """A check killed at a deadline the session's budget cut shorter than its own box."""


class Check:
    """One check's context: its deadline (cut_short: the budget, not its own box, set it), its
    scratch directory and its log."""

    def __init__(self, name: str, smoke: bool, deadline: float, cut_short: bool, scratch: Path, log: Path) -> None:
        self.name, self.smoke, self.deadline, self.scratch, self.log = name, smoke, deadline, scratch, log
        self.cut_short = cut_short

    def command(self, args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """Run a command until the check's deadline; past it, kill it with every process it
        started (torchrun's workers run in sessions of their own) and raise TimeoutError."""
        timeout = self.deadline - time.monotonic()
        if timeout <= 0:
            raise TimeoutError(f"{self.name}: its time box was spent before this command")
        # The repository first, and whatever the session was given (carried wheels) after it.
        path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        full_env = {**os.environ, "PYTHONPATH": path, **(env or {})}
        with self.log.open("a") as log:
            log.write(f"\n$ {shlex.join(args)}\n")
        proc = subprocess.Popen(args, cwd=REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_tree(proc.pid)
            try:
                stdout, stderr = proc.communicate(timeout=15)
            except subprocess.TimeoutExpired:  # a stray process still holds the pipes: give up on them
                stdout, stderr = "", "(output lost: the pipes stayed open after the kill)"
            self._log(stdout, stderr, "killed")
            what = "cut short by the session's budget" if self.cut_short else "killed after its time box"
            error = BudgetSpent if self.cut_short else TimeoutError
            raise error(f"{what} of {timeout:.0f} s ({self.name})") from None
        self._log(stdout, stderr, proc.returncode)
        return subprocess.CompletedProcess(args, proc.returncode, stdout, stderr)

    def _log(self, stdout: str, stderr: str, code: object) -> None:
        with self.log.open("a") as log:
            log.write(f"--- exit {code}\n--- stdout\n{_clip(stdout)}\n--- stderr\n{_clip(stderr)}\n")

    def cli(
        self, verb: str, config: str, overrides: list[str], nproc: int = 1, run_dir: Path | None = None,
        memory_fraction: float | None = None, env: dict[str, str] | None = None,
    ) -> Run:  # fmt: skip
        """`dist-train train` (or `launch` with `nproc` workers) in `run_dir` (a fresh one by default)."""
        run_dir = run_dir or Path(tempfile.mkdtemp(dir=self.scratch))
        if memory_fraction is not None:
            entry = [sys.executable, "-c", CAPPED, str(memory_fraction)]
        else:
            entry = [sys.executable, "-m", "dist_train.cli"]
        # Smoke: validation loss only. torchmetrics imports torchvision, ~4 s of CPU per process,
        # which is most of what a smoke run costs beyond torch itself.
        light = ["train.metrics=[]"] if self.smoke else []
        # EXTRA_OVERRIDES_ENV: appended to every run's overrides (a test holds a run past its box).
        extra = os.environ.get(EXTRA_OVERRIDES_ENV, "").split()
        args = [*entry, verb, config, f"run.output_dir={run_dir}", *QUIET, *light, *overrides, *extra]
        if verb == "launch":
            args += ["--nproc-per-node", str(nproc)]
        proc = self.command(args, env)
        metrics = next(run_dir.glob("*/metrics.jsonl"), None)
        records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics else []
        return Run(proc.returncode, proc.stdout, proc.stderr, records)

    def gpt_data(self) -> list[str]:
        """The GPT runs' corpus: the config's (the Python standard library) on a GPU; a small
        generated one in smoke mode, where reading the library would take most of the time."""
        if not self.smoke:
            return []
        corpus = self.scratch / "corpus"
        corpus.mkdir(exist_ok=True)
        for i in range(6):
            lines = [f"def f{i}_{j}(x):\n    return x * {j} + {i}\n" for j in range(60)]
            (corpus / f"mod{i}.py").write_text("".join(lines))
        return [f"data.paths=[{corpus}/*.py]"]


# --------------------------------------------------------------------------- the checks

FSDP_GPT = "configs/gpt_fsdp.yaml"
SHORT_GPT = ["train.eval_every=0", "train.eval_batches=1", "checkpoint.every_steps=0"]


def fsdp(check: Check, optimizer: str) -> Result:
    """~20 s: torchrun, NCCL, 20 steps of the small GPT sharded by FSDP2 in bf16."""
    steps = 4 if check.smoke else 20
    precision = "fp32" if check.smoke else "bf16"  # FSDP's bf16 policy on a CPU is slow, not different
    optim = ["optim.name=sgd", "optim.lr=0.3"] if optimizer == "sgd" else []
    overrides = [*optim, f"train.max_steps={steps}", "train.log_every=1", f"train.precision={precision}",
                 *SHORT_GPT, *check.gpt_data()]  # fmt: skip
    run = check.cli("launch", FSDP_GPT, overrides)
    losses = run.values("loss")
    if run.returncode != 0 or len(losses) != steps:
        return Result(False, {}, "trains", run.failure())
    fused = "fused optimizer" in run.start_line
    numbers = {"first_loss": losses[0], "last_loss": losses[-1], "fused_optimizer": fused, **run.memory()}
    # On a GPU: AdamW fused, SGD on foreach kernels (DTensor has no sharding rule for fused SGD).
    kernel_ok = check.smoke or fused is (optimizer == "adamw")
    # On a GPU the mean of the last 5 steps against the first 5; smoke (4 steps): finite losses.
    learned = all(map(_finite, losses)) if check.smoke else statistics.mean(losses[-5:]) < statistics.mean(losses[:5])
    return Result(kernel_ok and learned, numbers, "loss falls; fused only for adamw", run.start_line)


def async_checkpoint(check: Check) -> Result:
    """~30 s: the small FSDP GPT saved every 5 steps in the background, the last save synchronous."""
    steps = 10 if check.smoke else 20
    overrides = ["checkpoint.async_save=true", "checkpoint.every_steps=5", f"train.max_steps={steps}",
                 "train.log_every=5", "train.eval_every=0", "train.eval_batches=1", *check.gpt_data()]  # fmt: skip
    run_dir = Path(tempfile.mkdtemp(dir=check.scratch))
    run = check.cli("launch", FSDP_GPT, overrides, run_dir=run_dir)
    stalls = run.values("checkpoint_stall_s")
    partial = [p.name for p in run_dir.glob("*/checkpoints/*.partial")]
    numbers = {"async_stalls_s": stalls[:-1], "final_sync_stall_s": stalls[-1] if stalls else None,
               "partial_left": partial, **run.memory()}  # fmt: skip
    ok = run.returncode == 0 and len(stalls) == steps // 5 and not partial
    return Result(ok, numbers, f"{steps // 5} saves, none partial", run.start_line if ok else run.failure())


def find_batch_oom(check: Check) -> Result:
    """~60 s: data.batch_size=auto for ResNet-50 at 128 pixels under a cap of 4% of the GPU (~5.6
    GiB of an H200): real out-of-memory errors end the doubling; 4 steps at the size found,
    stopped at 2 and resumed from its DCP checkpoint. On a CPU the out-of-memory edge is the
    test hook's (DIST_TRAIN_OOM_ABOVE)."""
    run_dir = Path(tempfile.mkdtemp(dir=check.scratch))
    if check.smoke:
        model, env, fraction = (
            ["model.name=seed_cnn", "data.synthetic_shape=[3,16,16]"],
            {"DIST_TRAIN_OOM_ABOVE": "12"},
            1.0,
        )
    else:
        model, env, fraction = ["model.name=resnet50", "data.synthetic_shape=[3,128,128]"], None, 0.04
    # cuDNN's algorithm search off: it would time every conv of every trial's new batch shape.
    overrides = [*model, "data.synthetic_dtype=uint8", "data.synthetic_size=2048", "data.batch_size=auto",
                 "train.cudnn_benchmark=false",
                 "train.precision=bf16", "train.max_steps=4", "train.log_every=1", "checkpoint.every_steps=2",
                 "train.eval_every=0", "train.eval_batches=1", "parallel.strategy=none"]  # fmt: skip
    first = check.cli("train", "configs/synthetic.yaml", [*overrides, "train.stop_at_step=2"], run_dir=run_dir,
                      memory_fraction=fraction, env=env)  # fmt: skip
    # "data.batch_size=auto: micro-batch 45 per rank (50 fits, 51 does not, less ~10% headroom; 9 trials)"
    found = re.search(r"data\.batch_size=auto: micro-batch (\d+) per rank \((.*); (\d+) trials\)", first.stdout)
    if first.returncode != 0 or found is None:
        return Result(False, {}, "real OOM, train, resume", first.failure())
    second = check.cli("train", "configs/synthetic.yaml", overrides, run_dir=run_dir, memory_fraction=fraction, env=env)
    resumed = "resumed from" in second.stdout and "kept from the checkpoint" in second.stdout
    numbers = {"micro_batch": int(found.group(1)), "why": found.group(2), "trials": int(found.group(3)),
               "memory_bound": "does not" in found.group(2), "resumed": resumed, "final_step": second.last("step"),
               **second.memory()}  # fmt: skip
    ok = second.returncode == 0 and resumed and numbers["memory_bound"] and numbers["final_step"] == 4
    return Result(ok, numbers, "real OOM, train, resume", second.start_line if ok else second.failure())


def fsdp_cpu_offload_2_ranks(check: Check) -> Result:
    """~30 s: 2 ranks on the one GPU over gloo, parameters and optimizer state on the host."""
    overrides = ["parallel.cpu_offload=true", "parallel.backend=gloo", "train.max_steps=3", "train.log_every=1",
                 *SHORT_GPT, *check.gpt_data()]  # fmt: skip
    run = check.cli("launch", FSDP_GPT, overrides, nproc=2)
    norms = run.values("grad_norm")
    ok = run.returncode == 0 and len(norms) == 3 and all(map(_finite, norms))
    return Result(
        ok, {"grad_norms": norms, **run.memory()}, "trains on 2 ranks", run.start_line if ok else run.failure()
    )


def ddp_2_ranks(check: Check) -> Result:
    """~25 s: DDP on 2 ranks sharing the one GPU over gloo (gradients cross through host memory)."""
    steps = 4 if check.smoke else 100
    overrides = ["parallel.strategy=ddp", "parallel.backend=gloo", "train.max_epochs=null", f"train.max_steps={steps}",
                 "train.log_every=10", "train.eval_every=0", "train.eval_batches=1", "checkpoint.every_steps=0",
                 "schedule.warmup_steps=0"]  # fmt: skip
    run = check.cli("launch", "configs/digits.yaml", overrides, nproc=2)
    losses = run.values("loss")
    if run.returncode != 0 or not losses:
        return Result(False, {}, "DDP trains on 2 ranks", run.failure())
    numbers = {"first_loss": losses[0], "last_loss": losses[-1], "samples_per_s": run.last("samples_per_s"),
               **run.memory()}  # fmt: skip
    ok = ", ddp," in run.start_line and (check.smoke or losses[-1] < 0.7 * losses[0])  # smoke: too few steps
    return Result(ok, numbers, "DDP trains on 2 ranks, loss falls", run.start_line)


def nccl_precision(check: Check, precision: str) -> Result:
    """~20 s each: `launch` brings up the process group and 300 steps of the digits CNN train."""
    if check.smoke and precision == "fp16":
        return Result(None, {}, "", "skipped: fp16 needs CUDA")
    steps = 4 if check.smoke else 300
    overrides = [f"train.precision={precision}", "train.max_epochs=null", f"train.max_steps={steps}",
                 "train.log_every=20", "train.eval_every=0", "schedule.warmup_steps=0"]  # fmt: skip
    run = check.cli("launch", "configs/digits.yaml", overrides)
    losses, accuracy = run.values("loss"), run.last("val_acc")
    if run.returncode != 0 or not losses or (accuracy is None and not check.smoke):
        return Result(False, {}, "loss falls, val_acc > 0.8", run.failure())
    group = run.start_line.rsplit("process group ", 1)[-1].split(", ", 1)[0]
    numbers = {"process_group": group, "first_loss": losses[0], "last_loss": losses[-1], "val_acc": accuracy,
               "fused_optimizer": "fused optimizer" in run.start_line, **run.memory()}  # fmt: skip
    # dist.get_backend's wording of a two-backend group varies by release; both must be in it.
    expected = ("gloo",) if check.smoke else ("nccl", "gloo")
    # Smoke: a few CPU steps, no accuracy (metrics off), no fused default there.
    learned = check.smoke or (losses[-1] < 0.7 * losses[0] and accuracy > 0.8 and numbers["fused_optimizer"])
    ok = all(name in group for name in expected) and learned
    return Result(ok, numbers, f"{' and '.join(expected)} group, fused, loss falls, val_acc > 0.8", run.start_line)


def resnet50(check: Check) -> Result:
    """~50 s: the hand-written loop, then dist_train, each 20 warm-up and 100 measured steps."""
    # Smoke: the seed CNN in fp32 (a CPU without bf16 kernels takes seconds per ResNet step).
    workload, model, size, batch = ("cnn", "seed_cnn", 32, 8) if check.smoke else ("resnet50", "resnet50", 224, 128)
    precision, (warmup, steps, samples) = ("fp32", (2, 4, 64)) if check.smoke else ("bf16", (20, 100, 2048))
    plain = [sys.executable, str(REPO / "benchmarks" / "loops.py"), "--framework", "plain", "--workload", workload,
             "--image-size", str(size), "--precision", precision, "--channels-last", "--uint8", "--batch-size",
             str(batch), "--dataset-size", str(samples), "--warmup", str(warmup), "--steps", str(steps)]  # fmt: skip
    overrides = [f"model.name={model}", f"model.small_input_stem={str(size <= 64).lower()}",
                 f"data.synthetic_shape=[3,{size},{size}]", "data.synthetic_dtype=uint8",
                 f"data.synthetic_size={samples}", f"data.batch_size={batch}", f"train.precision={precision}",
                 "train.channels_last=true", f"train.max_steps={warmup + steps}", f"train.log_every={warmup}",
                 "train.eval_every=0", "train.eval_batches=1", "checkpoint.every_steps=0"]  # fmt: skip
    hand = check.command(plain)
    ours = check.cli("train", "configs/synthetic.yaml", overrides)
    if hand.returncode != 0 or ours.returncode != 0:
        return Result(False, {}, ">= 0.98x", (hand.stderr if hand.returncode else ours.failure())[-800:])
    hand_rate = json.loads(hand.stdout.strip().splitlines()[-1])["samples_per_s"]
    logged = {r["step"]: r["time"] for r in ours.train_records()}
    our_rate = steps * batch / (logged[warmup + steps] - logged[warmup])  # the clock of two log lines
    numbers = {"model": f"{model} {size}px batch {batch} {precision}", "hand_written_samples_per_s": hand_rate,
               "dist_train_samples_per_s": our_rate, "ratio": our_rate / hand_rate,
               "data_wait_fraction": ours.last("data_wait_fraction"), **ours.memory()}  # fmt: skip
    return Result(None if check.smoke else numbers["ratio"] >= 0.98, numbers, ">= 0.98x", ours.start_line)


def gpt2_small(check: Check, compile: bool) -> Result:
    """Eager ~40 s (corpus read, model init, 60 steps of 32k tokens); compiled ~2 minutes."""
    if check.smoke and compile:
        return Result(None, {}, "", "skipped: compiling on a CPU takes minutes")
    if check.smoke:
        config, sizes = "configs/gpt_cpu.yaml", ["train.max_steps=12", "train.log_every=4", "train.peak_tflops=1"]
    else:
        config, sizes = "configs/gpt2_small.yaml", [f"train.max_steps={80 if compile else 60}", "train.log_every=10"]
    overrides = [*sizes, *SHORT_GPT, f"train.compile={str(compile).lower()}", *check.gpt_data()]
    run = check.cli("train", config, overrides)
    if run.returncode != 0:
        return Result(False, {}, "MFU >= 45%", run.failure())
    skip = 2 if compile else 1  # warm-up, compilation, first intervals
    numbers = {"tokens_per_s": _steady(run, "tokens_per_s", skip), "mfu": _steady(run, "mfu", skip), **run.memory()}
    return Result(None if check.smoke else numbers["mfu"] >= 0.45, numbers, "MFU >= 45%", run.start_line)


def _clip(text: str, head: int = 4000, tail: int = 16000) -> str:
    """A long output's start (the commands launch ran, the run's setup) and its end (the error)."""
    if len(text) <= head + tail:
        return text
    return f"{text[:head]}\n[... {len(text) - head - tail} characters left out ...]\n{text[-tail:]}"


def _kill_tree(root: int) -> None:
    """SIGKILL a process and every descendant (torchrun's workers run in sessions of their own,
    loader and compile workers fork as they go): each is stopped as it is found, so none forks
    a new one between the search and the kill, and the orphans do not lose their parent."""
    found, frontier = [root], [root]
    while frontier:
        for pid in frontier:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
        frontier = [child for parent in frontier for child in child_pids(parent) if child not in found]
        found += frontier
    for pid in found:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _steady(run: Run, key: str, skip_intervals: int) -> float:
    values = [r[key] for r in run.train_records() if key in r][skip_intervals:]
    if not values:
        raise RuntimeError(f"no {key} logged after {skip_intervals} warm-up intervals")
    return statistics.median(values)


def _finite(value: float) -> bool:
    return value == value and abs(value) != float("inf")


# (name, time box in seconds on a GPU, in smoke mode, the check): riskiest first.
CHECKS: list[tuple[str, float, float, Callable[[Check], Result]]] = [
    # A box bounds a check that hangs; the checks' own estimates add up to about 7 minutes, the
    # boxes to 12: the 520 s budget cuts the last boxes short, and a check cut short by it is
    # recorded as such, not as failed. Smoke boxes are wide: on a busy 2-core CI machine a CPU
    # run is mostly imports, 10-60 s.
    ("fsdp_sgd", 45, 150, lambda c: fsdp(c, "sgd")),
    ("fsdp_adamw", 45, 150, lambda c: fsdp(c, "adamw")),
    ("async_checkpoint", 60, 150, async_checkpoint),
    ("find_batch_oom", 90, 180, find_batch_oom),
    ("fsdp_cpu_offload_2_ranks", 60, 150, fsdp_cpu_offload_2_ranks),
    ("ddp_2_ranks", 45, 150, ddp_2_ranks),
    ("nccl_bf16", 40, 150, lambda c: nccl_precision(c, "bf16")),
    ("nccl_fp16", 40, 150, lambda c: nccl_precision(c, "fp16")),
    ("resnet50", 75, 150, resnet50),
    ("gpt2_small_eager", 60, 150, lambda c: gpt2_small(c, False)),
    ("gpt2_small_compiled", 170, 150, lambda c: gpt2_small(c, True)),
]


def environment() -> dict:
    cuda = torch.cuda.is_available()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    return {
        "device": torch.cuda.get_device_name(0) if cuda else f"CPU ({platform.machine()}, {os.cpu_count()} cores)",
        "torch": torch.__version__,
        "cuda": torch.version.cuda if cuda else None,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if cuda else None,
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


def _write_out(out: Path, results: dict[str, dict], per_check: Path) -> None:
    """OUT after every check, whole: results.json (every check so far) and checks.tar.gz (each
    check's JSON and log). A lent GPU machine hands back at most 8 files from OUT, so one JSON
    per check lives in the archive, not beside it; both are replaced atomically."""
    partial = out / "results.json.partial"
    partial.write_text(json.dumps(results, indent=1) + "\n")
    os.replace(partial, out / "results.json")
    with tarfile.open(out / "checks.tar.gz.partial", "w:gz") as archive:
        for path in sorted(per_check.iterdir()):
            archive.add(path, arcname=f"checks/{path.name}")
    os.replace(out / "checks.tar.gz.partial", out / "checks.tar.gz")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=Path(os.environ.get("OUT", "device_out")))
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on a CPU: the checks' plumbing")
    parser.add_argument("--only", nargs="+", default=None, help="run only these checks (names as listed)")
    parser.add_argument(
        "--budget-s", type=float, default=None, help="every check ends within this many seconds (520; smoke: 1200)"
    )
    parser.add_argument("--min-box-s", type=float, default=15, help="skip a check with less time than this left")
    parser.add_argument("--jobs", type=int, default=1, help="checks at a time: 1 on a GPU; a CPU smoke run may overlap")
    args = parser.parse_args()
    unknown = set(args.only or ()) - {name for name, *_ in CHECKS}
    if unknown:
        parser.error(f"unknown checks: {', '.join(sorted(unknown))}")
    if args.jobs != 1 and not args.smoke:
        parser.error("--jobs applies to --smoke only: GPU checks measure the device and run one at a time")
    if not args.smoke and not torch.cuda.is_available():
        print("error: no CUDA device; --smoke runs the checks on a CPU", file=sys.stderr)
        return 2
    args.out_dir.mkdir(parents=True, exist_ok=True)
    env = environment()
    (args.out_dir / "environment.json").write_text(json.dumps(env, indent=1) + "\n")
    print(" ".join(f"{k}={v}" for k, v in env.items()), flush=True)
    session_end = time.monotonic() + (args.budget_s or (1200 if args.smoke else 520))
    chosen = [check for check in CHECKS if not args.only or check[0] in args.only]
    results: dict[str, dict] = {}
    written = threading.Lock()
    with tempfile.TemporaryDirectory(prefix="device_session_") as scratch:
        per_check = Path(scratch) / "checks"  # <check>.json and <check>.log, packed into OUT
        per_check.mkdir()

        def run_one(name: str, gpu_box: float, smoke_box: float, run_check: Callable[[Check], Result]) -> None:
            start = time.monotonic()
            own_box = smoke_box if args.smoke else gpu_box
            box = min(own_box, session_end - start)
            log = per_check / f"{name}.log"
            log.write_text(f"{name}: time box {box:.0f} s\n")
            if box < args.min_box_s:
                result = Result(None, {}, "", f"skipped: {max(0.0, session_end - start):.0f} s of the budget left")
            else:
                scratch_dir = Path(scratch) / name
                scratch_dir.mkdir()
                try:
                    result = run_check(Check(name, args.smoke, start + box, box < own_box, scratch_dir, log))
                except BudgetSpent as exc:  # not the check's failure: the session ran out of time
                    result = Result(None, {}, "", str(exc))
                except TimeoutError as exc:
                    result = Result(False, {}, "", str(exc))
                except Exception as exc:  # noqa: BLE001 - recorded; the other checks still run
                    result = Result(False, {}, "", f"{type(exc).__name__}: {str(exc)[-600:]}")
            record = {**asdict(result), "seconds": time.monotonic() - start, "box_s": box}
            (per_check / f"{name}.json").write_text(json.dumps({"check": name, **record}, indent=1) + "\n")
            print(f"{name}: {json.dumps(record)}", flush=True)
            with written:
                results[name] = record
                in_order = {n: results[n] for n, *_ in chosen if n in results}  # the session's order
                _write_out(args.out_dir, in_order, per_check)

        # One at a time on a GPU (the checks measure it); --jobs 2 overlaps CPU smoke runs, whose
        # time goes mostly to each process's imports.
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            for future in [pool.submit(run_one, *check) for check in chosen]:
                future.result()
    results = {name: results[name] for name, *_ in chosen}  # in the session's order
    print("\n" + table(results))
    failed = [name for name, r in results.items() if r["passed"] is False]
    print(f"\n{len(results)} checks, {len(failed)} failed{': ' + ', '.join(failed) if failed else ''}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
