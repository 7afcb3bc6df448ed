"""What `dist-train launch` checks on its node and puts into its workers' environment before
torchrun starts them: the CPUs they may use, the network interfaces the gloo and NCCL groups
bind to, and the NCCL flight recorder that turns a collective timeout into readable dumps.

An NCCL collective that times out ends in the watchdog's SIGABRT, not in a Python exception
the trainer could report as it does under gloo; what is left to read afterwards is each
rank's flight-recorder dump: its last collectives and which of them never completed.
"""

from __future__ import annotations

import importlib.util
import os
import re
import socket
from collections.abc import Mapping
from pathlib import Path

import torch

from dist_train.errors import UserError

FLIGHT_RECORDER_DIR = "nccl_flight_recorder"  # inside the run directory
FLIGHT_RECORDER_PREFIX = "rank_"  # each rank dumps to DIR/rank_<global rank>
TRACE_BUFFER_ENTRIES = "2000"  # collectives kept per rank: PyTorch's recommended size

# torch renamed two of the settings: recent releases read TORCH_FR_* first and warn, in every
# worker, about the TORCH_NCCL_* names (2.14); releases before the rename read only those.
# TORCH_FR_* is in 2.10 (and 2.11); 2.6 has only TORCH_NCCL_*. Each setting's names are
# listed together: the user's value under either name leaves the setting to the user.
_BUFFER_SIZE = ("TORCH_NCCL_TRACE_BUFFER_SIZE", "TORCH_FR_BUFFER_SIZE")
_DUMP_ON_TIMEOUT = ("TORCH_NCCL_DUMP_ON_TIMEOUT",)
_DUMP_FILE_PREFIX = ("TORCH_NCCL_DEBUG_INFO_TEMP_FILE", "TORCH_FR_DUMP_TEMP_FILE")
RENAMED_IN = (2, 10)


def reads_fr_names(version: str = torch.__version__) -> bool:
    """Whether this torch reads the TORCH_FR_* names (and warns about the old ones)."""
    major_minor = tuple(int(part) for part in re.findall(r"\d+", version)[:2])
    return major_minor >= RENAMED_IN


def flight_recorder_env(environ: Mapping[str, str], run_dir: Path, fr_names: bool | None = None) -> dict[str, str]:
    """The variables to add to the workers' environment so that an NCCL collective timeout
    dumps every rank's recent collectives into run_dir, under the names this torch reads
    (`fr_names`: the TORCH_FR_* ones; None asks the installed torch); none the user has set."""
    new = reads_fr_names() if fr_names is None else fr_names
    settings = {
        _BUFFER_SIZE: TRACE_BUFFER_ENTRIES,
        _DUMP_ON_TIMEOUT: "1",
        _DUMP_FILE_PREFIX: str(run_dir / FLIGHT_RECORDER_DIR / FLIGHT_RECORDER_PREFIX),
    }
    added: dict[str, str] = {}
    for names, value in settings.items():
        if not any(name in environ for name in names):
            added[names[-1] if new else names[0]] = value
    return added


def dump_prefix(environ: Mapping[str, str]) -> str | None:
    """Where the workers' flight recorders dump (a path prefix), as their environment says."""
    return next((environ[name] for name in _DUMP_FILE_PREFIX if environ.get(name)), None)


def analyzer_command(prefix: str) -> str:
    """How to read the dumps written at `prefix`: torch's own analyzer, which recent releases
    ship as torch.distributed.flight_recorder.fr_trace (also the `torchfrtrace` command); older
    ones (2.6 included) keep it in PyTorch's source tree only, their `torchfrtrace` is broken."""
    folder, name = os.path.split(prefix)
    if importlib.util.find_spec("torch.distributed.flight_recorder.fr_trace") is not None:
        return f"python -m torch.distributed.flight_recorder.fr_trace {folder} -p {name}"
    return f"python tools/flight_recorder/fr_trace.py {folder} -p {name} (from a PyTorch source checkout)"


def killed_by_signal_report(rank: int, signal_name: str, environ: Mapping[str, str]) -> str:
    """One line for a worker that died of a signal. SIGABRT is how the NCCL watchdog ends a
    collective that timed out, so say where the dumps are and how to read them."""
    line = f"error: worker rank {rank} was killed by {signal_name}"
    prefix = dump_prefix(environ)
    if prefix is None or environ.get("TORCH_NCCL_DUMP_ON_TIMEOUT", "1") in ("0", "false", "False"):
        return line + " (no NCCL flight-recorder dumps: TORCH_NCCL_DUMP_ON_TIMEOUT or the dump file is unset)"
    dumps = sorted(Path(prefix).parent.glob(Path(prefix).name + "*")) if Path(prefix).parent.is_dir() else []
    found = f"{len(dumps)} there now" if dumps else "none there now: NCCL writes them only on a collective timeout"
    return (
        f"{line}; an NCCL collective timeout leaves each rank's flight-recorder dump at {prefix}<rank> "
        f"({found}); read them with: {analyzer_command(prefix)}"
    )


def available_cpus() -> int:
    """CPUs this process may run on, which torchrun's workers inherit: under SLURM the CPUs
    of the srun step, under a container or taskset its limit, not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def cpu_report(cpus: int, workers: int) -> tuple[str, bool]:
    """(one line, whether it is a warning) on the CPUs this node's workers share."""
    if cpus >= workers:
        return f"launch: {cpus} CPUs available to this node's {workers} worker(s)", False
    return (
        f"warning: only {cpus} CPU(s) available to this node's {workers} workers, who will share them "
        "(with their loader workers); give the job more (--cpus-per-task) and, under SLURM, pass "
        "--cpus-per-task to srun too: since Slurm 22.05 srun does not inherit it (slurm/train.sbatch does)",
        True,
    )


def omp_threads_env(environ: Mapping[str, str], cpus: int, workers: int) -> dict[str, str]:
    """OMP_NUM_THREADS for the workers: the node's CPUs shared out, unless the user set it.
    (torchrun would otherwise set 1 and print a four-line warning at every start.)"""
    if "OMP_NUM_THREADS" in environ:
        return {}
    return {"OMP_NUM_THREADS": str(max(1, cpus // workers))}


def check_socket_ifnames(environ: Mapping[str, str], interfaces: list[str] | None = None) -> None:
    """Refuse GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME naming no interface of this node, which
    would otherwise fail inside every worker (gloo) or hang the rendezvous (NCCL)."""
    names = interfaces if interfaces is not None else [name for _, name in socket.if_nameindex()]
    gloo = environ.get("GLOO_SOCKET_IFNAME")
    if gloo:
        missing = [name for name in gloo.split(",") if name not in names]
        if missing:
            raise UserError(
                f"GLOO_SOCKET_IFNAME={gloo}: no interface {', '.join(missing)} on {socket.gethostname()} "
                f"(it has {', '.join(names)})"
            )
    nccl = environ.get("NCCL_SOCKET_IFNAME")
    if nccl and not nccl.startswith("^"):  # "^eth" excludes; anything left may match
        exact = nccl.startswith("=")
        wanted = nccl.lstrip("=").split(",")
        if not any(n == w if exact else n.startswith(w) for n in names for w in wanted):
            raise UserError(
                f"NCCL_SOCKET_IFNAME={nccl}: no interface of {socket.gethostname()} matches (it has {', '.join(names)})"
            )


def loopback_warning(environ: Mapping[str, str], nnodes: int) -> str | None:
    """A warning when several nodes would reach this one through a loopback address: gloo
    binds to what the host name resolves to (127.0.1.1 on stock Ubuntu and Debian)."""
    if nnodes <= 1 or environ.get("GLOO_SOCKET_IFNAME"):
        return None
    host = socket.gethostname()
    try:
        address = socket.gethostbyname(host)
    except OSError:
        address = None
    if address is not None and not address.startswith("127."):
        return None
    return (
        f"warning: {host} resolves to {address or 'nothing'}, which other nodes cannot reach, and "
        "GLOO_SOCKET_IFNAME is unset: gloo groups will fail to connect; set GLOO_SOCKET_IFNAME and "
        "NCCL_SOCKET_IFNAME to the interface the nodes share (SOCKET_IFNAME=... in slurm/train.sbatch "
        "and launch/multi_node.sh sets both)"
    )
