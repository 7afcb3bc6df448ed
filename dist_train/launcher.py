"""`dist-train launch`: build the torchrun command that starts the workers, print it, run it.

torchrun does all process management (spawn, rendezvous, restarts, signals); this module only
turns our flags into its flags and runs torchrun's own entry point with them, so `launch`
never behaves differently from the command it prints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shlex
import signal
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import torch

from dist_train import checkpoint, slurm, worker_env
from dist_train.config import Config, UserError, check_device
from dist_train.optim import check_fused
from dist_train.parallel import check_backend, check_world_size
from dist_train.preemption import PREEMPTED_EXIT_CODE, STOPPED_MARKER


@dataclass
class LaunchOptions:
    nproc_per_node: str = "auto"  # a number, or "auto": visible GPUs, 1 without any
    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str | None = None  # HOST:PORT of node 0; needed when nnodes > 1
    rdzv_id: str = "dist_train"
    max_restarts: int = 0


def from_slurm(opts: LaunchOptions, given: set[str], environ: Mapping[str, str]) -> LaunchOptions:
    """Fill what the user did not give (`given`: field names) from the SLURM step, if any."""
    step = slurm.detect(environ)
    if step is None or step.nnodes == 1:
        return opts  # one node: a private standalone rendezvous cannot collide with other jobs
    found = {
        "nnodes": step.nnodes,
        "node_rank": step.node_rank,
        "rdzv_endpoint": step.rdzv_endpoint,
        "rdzv_id": f"slurm-{step.job_id}",
    }
    return dataclasses.replace(opts, **{k: v for k, v in found.items() if k not in given})


def resolve_nproc(value: str, share_gpus: bool = False) -> int:
    """--nproc-per-node as a number: `auto` is the visible GPUs (1 without any); more than the
    GPUs only where ranks may share them (parallel.backend=gloo)."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if value == "auto":
        return max(gpus, 1)
    try:
        n = int(value)
    except ValueError:
        raise UserError(f"--nproc-per-node must be a number or 'auto', got {value!r}") from None
    if n < 1:
        raise UserError(f"--nproc-per-node must be >= 1, got {n}")
    if gpus and n > gpus and not share_gpus:
        raise UserError(
            f"--nproc-per-node {n} is more than the {gpus} GPUs visible on this node "
            "(parallel.backend=gloo lets ranks share a GPU)"
        )
    return n


def torchrun_command(
    config_path: str, overrides: list[str], opts: LaunchOptions, verb: str = "train", share_gpus: bool = False
) -> list[str]:
    """torchrun's command line for `dist-train VERB CONFIG OVERRIDES` on every worker."""
    nproc = resolve_nproc(opts.nproc_per_node, share_gpus)
    if opts.nnodes < 1:
        raise UserError(f"--nnodes must be >= 1, got {opts.nnodes}")
    if not 0 <= opts.node_rank < opts.nnodes:
        raise UserError(f"--node-rank must be in [0, {opts.nnodes}), got {opts.node_rank}")
    if opts.max_restarts < 0:
        raise UserError(f"--max-restarts must be >= 0, got {opts.max_restarts}")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={nproc}",
        f"--nnodes={opts.nnodes}",
        f"--max-restarts={opts.max_restarts}",
    ]
    if opts.nnodes == 1 and opts.rdzv_endpoint is None:
        cmd.append("--standalone")  # a private rendezvous on a free local port
    else:
        if opts.rdzv_endpoint is None:
            raise UserError("--rdzv-endpoint HOST:PORT (node 0's address) is required with --nnodes > 1")
        cmd += [
            f"--node-rank={opts.node_rank}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={opts.rdzv_endpoint}",
            f"--rdzv-id={opts.rdzv_id}",
        ]
    return cmd + ["-m", "dist_train.cli", verb, config_path, *overrides]


def preflight(cfg: Config, world_size: int, local_world_size: int | None = None, cuda: bool | None = None) -> None:
    """Mistakes the workers would hit on their first line, caught before any worker starts.
    `cuda`: whether the workers train on GPUs (None: whether this machine has one)."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    check_device(cfg, cuda)
    check_world_size(cfg.parallel, world_size, local_world_size)
    check_backend(cfg.parallel, cuda)
    check_fused(cfg.optim, cfg.parallel)
    if cfg.checkpoint.resume not in ("auto",):
        checkpoint.resolve_resume(cfg.checkpoint.resume, cfg.run_dir / "checkpoints")


def prepare_node(cfg: Config, nnodes: int) -> dict[str, str]:
    """Check this node's network settings and return what to add to the workers' environment:
    the NCCL flight recorder, unless the user configured it."""
    worker_env.check_socket_ifnames(os.environ)
    warning = worker_env.loopback_warning(os.environ, nnodes)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    added = worker_env.flight_recorder_env(os.environ, cfg.run_dir)
    prefix = worker_env.dump_prefix(added)
    if prefix and torch.cuda.is_available():  # NCCL writes there but does not create the folder
        with contextlib.suppress(OSError):  # then it logs the failed dump; training is unaffected
            Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    return added


def launch(cfg: Config, config_path: str, overrides: list[str], opts: LaunchOptions, verb: str = "train") -> int:
    share_gpus = cfg.parallel.backend == "gloo"
    cmd = torchrun_command(config_path, overrides, opts, verb, share_gpus)
    nproc = resolve_nproc(opts.nproc_per_node, share_gpus)
    preflight(cfg, nproc * opts.nnodes, nproc)
    added_env = prepare_node(cfg, opts.nnodes)
    print("+ " + shlex.join(cmd), flush=True)
    cpus = worker_env.available_cpus()  # inherited by the workers
    line, is_warning = worker_env.cpu_report(cpus, nproc)
    added_env.update(worker_env.omp_threads_env(os.environ, cpus, nproc))
    if "OMP_NUM_THREADS" in added_env:
        line += f", {added_env['OMP_NUM_THREADS']} OpenMP thread(s) each"
    print(line, file=sys.stderr if is_warning else sys.stdout, flush=True)
    # torchrun's own entry point, in this process: the same behaviour as the printed command
    # (signals, restarts, rendezvous), but a failed worker ends in one line, not a traceback.
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    # torchrun handles SIGTERM, SIGINT, SIGHUP and SIGQUIT itself; a SIGUSR1 warning would kill it.
    forward = signal.Signals[cfg.checkpoint.preempt_signal]
    if forward not in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(forward, _forward_to_workers)
    try:
        with _environment(added_env):  # torchrun's workers inherit it
            run(get_args_parser().parse_args(cmd[3:]))
    except SignalException as exc:  # SIGTERM/SIGINT/SIGHUP: torchrun has already stopped the workers
        if verb == "train" and _report_early_stop(cfg):  # they checkpointed: resumable, as after the warning
            return PREEMPTED_EXIT_CODE
        print(f"launch: stopped by {exc.sigval.name}; the workers were shut down", file=sys.stderr)
        return 128 + int(exc.sigval)
    except ChildFailedError as exc:
        rank, failure = root_cause(exc.failures)
        if failure.exitcode < 0:  # killed by a signal; SIGABRT is the NCCL watchdog's
            name = failure.signal_name()
            report = worker_env.killed_by_signal_report(rank, name, {**os.environ, **added_env})
            print(report, file=sys.stderr)
            return 128 - failure.exitcode
        print(f"error: worker rank {rank} exited with code {failure.exitcode}; its message is above", file=sys.stderr)
        return failure.exitcode if failure.exitcode > 0 else 1
    # Only training leaves the marker; another verb (eval) must not report an earlier run's stop.
    return PREEMPTED_EXIT_CODE if verb == "train" and _report_early_stop(cfg) else 0


def root_cause(failures: dict[int, Any]) -> tuple[int, Any]:
    """The failure to report: when one worker fails, torchrun SIGTERMs the rest, and a rank it
    killed may be listed first. A worker that exited by itself comes first, then one killed by
    anything but SIGTERM (SIGABRT from the NCCL watchdog, SIGKILL from the OOM killer), then
    the lowest rank."""

    def order(item: tuple[int, Any]) -> tuple[int, int]:
        rank, failure = item
        return (0 if failure.exitcode > 0 else 1 if failure.exitcode != -signal.SIGTERM else 2), rank

    return min(failures.items(), key=order)


@contextlib.contextmanager
def _environment(added: dict[str, str]) -> Iterator[None]:
    """os.environ plus `added` while the block runs; a launch called in-process leaves nothing behind."""
    os.environ.update(added)
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


def _report_early_stop(cfg: Config) -> bool:
    """Whether the workers saved a checkpoint and stopped early; if so, says so on stderr."""
    marker = cfg.run_dir / STOPPED_MARKER
    if not marker.is_file():
        return False
    print(
        f"launch: the workers saved a checkpoint and stopped early ({marker.read_text().strip()}); "
        f"exit {PREEMPTED_EXIT_CODE}: the same command continues the run",
        file=sys.stderr,
    )
    return True


def _forward_to_workers(signum: int, frame: FrameType | None) -> None:
    """Pass a signal on to the worker processes (torchrun starts them as our children)."""
    for pid in child_pids(os.getpid()):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


def child_pids(parent: int) -> list[int]:
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):  # Linux; elsewhere nothing is forwarded
        with contextlib.suppress(OSError, ValueError, IndexError):
            # "pid (comm) state ppid ...": comm may hold spaces, so split after its last ")".
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            if ppid == parent:
                children.append(int(stat.parent.name))
    return children
