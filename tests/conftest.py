"""Shared test helpers: a clean environment (no torchrun variables leak in or out) and CLI runners."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
TORCHRUN_VARS = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RUN_ID",
    "GROUP_RANK",
)


@pytest.fixture(autouse=True)
def no_torchrun_env(monkeypatch):
    """Tests run single-process unless they start torchrun themselves."""
    for var in [*TORCHRUN_VARS, *(v for v in os.environ if v.startswith("SLURM_"))]:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    yield
    import torch.distributed as dist

    if dist.is_initialized():  # a test that leaked a process group must not poison the next
        dist.destroy_process_group()
        pytest.fail("test left a process group initialized")


def cli_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS and not k.startswith("SLURM_")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["WANDB_SILENT"] = "true"
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `dist-train ARGS` in a fresh interpreter; returns the finished process (text output)."""
    return subprocess.run(
        [sys.executable, "-m", "dist_train.cli", *args],
        cwd=cwd,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def tiny_overrides(tmp_path: Path, **extra: object) -> list[str]:
    """Overrides that make the digits job take seconds: few steps, no W&B, output under tmp_path."""
    values = {
        "run.output_dir": str(tmp_path / "runs"),
        "logging.wandb.mode": "disabled",
        "train.max_steps": 6,
        "train.max_epochs": None,
        "train.log_every": 2,
        "train.eval_every": 0,
        "checkpoint.every_steps": 3,
        "data.batch_size": 16,
        "train.progress_bar": False,
    }
    values.update(extra)
    return [f"{k}={'null' if v is None else v}" for k, v in values.items()]


def write_text_corpus(folder: Path, files: int = 6) -> list[str]:
    """Small Python-like source files for the text pipeline; returns the glob that finds them."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        lines = [f"def f{i}_{j}(x):\n    return x * {j} + {i}\n" for j in range(60)]
        (folder / f"mod{i}.py").write_text("".join(lines))
    return [str(folder / "*.py")]


def write_fake_mnist(root: Path, n_train: int = 256, n_test: int = 64) -> None:
    """MNIST's four idx files under root/MNIST/raw, as torchvision reads them, with random
    28x28 images: the real loading code on data made here (there is no download)."""
    import numpy as np

    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        header = np.array([0x803, n, 28, 28], dtype=">i4").tobytes()  # uint8 (0x08), 3 dimensions
        (raw / f"{split}-images-idx3-ubyte").write_bytes(header + images.tobytes())
        (raw / f"{split}-labels-idx1-ubyte").write_bytes(np.array([0x801, n], dtype=">i4").tobytes() + labels.tobytes())


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module's in-process runs, as cli_env gives the subprocesses:
    their models are tiny, and on a busy 2-core machine a second thread that spin-waits made
    one pretraining take 58 s instead of 5 s. Opt in with pytestmark."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_node_agents(overrides: list[str], nproc_per_node: int, config: str = "configs/digits.yaml") -> list[str]:
    """Two torchrun agents started by launch/multi_node.sh rendezvous on this machine, as two
    nodes would; returns each agent's output once both exited (asserting they succeeded)."""
    port, procs = free_port(), []
    for node_rank in (0, 1):
        env = cli_env() | {
            "PYTHON": sys.executable,
            "NNODES": "2",
            "NODE_RANK": str(node_rank),
            "NPROC": str(nproc_per_node),
            "RDZV_ENDPOINT": f"127.0.0.1:{port}",
            "RDZV_ID": f"agents{port}",
        }
        command = ["bash", "launch/multi_node.sh", config, *overrides]
        procs.append(
            subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        )
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    return outputs


def launch_gpt(root: Path, name: str, gpt: dict, nproc: int, **overrides: object) -> subprocess.CompletedProcess:
    """`dist-train launch` of configs/gpt_cpu.yaml with a tiny GPT (`gpt`: its overrides) on a
    generated corpus, as run `name` under root/runs; asserts it succeeded."""
    import json

    paths = write_text_corpus(root / "corpus")
    values = {"run.name": name, "data.paths": json.dumps(paths), **gpt, **overrides}
    proc = run_cli(
        "launch", "configs/gpt_cpu.yaml", "--nproc-per-node", str(nproc), *tiny_overrides(root, **values), cwd=REPO
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def launch_runs(root: Path, config: str, nproc: int, runs: dict[str, dict]) -> dict[str, str]:
    """Runs `runs` ({run.name: overrides}) of `config` one after another in one torchrun launch
    of `nproc` processes (tests/runs_worker.py), under root/runs; asserts they succeeded and
    returns each run's stdout. For runs compared with each other: one start, not one each."""
    spec = {
        "config": config,
        "runs": [
            {"name": name, "overrides": tiny_overrides(root, **{"run.name": name, **values})}
            for name, values in runs.items()
        ],
    }
    spec_path = root / f"runs_{'_'.join(runs)}.json"
    spec_path.parent.mkdir(parents=True, exist_ok=True)
    spec_path.write_text(json.dumps(spec))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    proc = subprocess.run(
        [*command, str(REPO / "tests" / "runs_worker.py"), str(spec_path)],
        cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    sections = proc.stdout.split("=== run ")[1:]
    return {section.split("\n", 1)[0]: section for section in sections}


def gpt_runs(root: Path, gpt: dict, nproc: int, runs: dict[str, dict]) -> dict[str, str]:
    """launch_runs of configs/gpt_cpu.yaml with a tiny GPT (`gpt`: its overrides) on a generated
    corpus, as launch_gpt trains one."""
    paths = write_text_corpus(root / "corpus")
    shared = {"data.paths": json.dumps(paths), **gpt}
    return launch_runs(
        root, "configs/gpt_cpu.yaml", nproc, {name: {**shared, **values} for name, values in runs.items()}
    )


def metrics_records(run_dir: Path) -> list[dict]:
    """Every record rank 0 wrote to RUN_DIR/metrics.jsonl, in order."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def logged(run_dir: Path, key: str) -> dict[int, Any]:
    """{step: value} of every metrics.jsonl record that holds `key`, in step order."""
    return {record["step"]: record[key] for record in metrics_records(run_dir) if key in record}


def run_logged(root: Path, name: str, key: str) -> dict[int, Any]:
    """logged() of run `name` under root/runs."""
    return logged(root / "runs" / name, key)


def file_hashes(root: Path) -> dict[str, str]:
    """Every path under root -> sha256 of its bytes ('<dir>' for a folder): compare two to see
    that nothing was written, changed or removed."""
    if not root.exists():
        return {}
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "<dir>"
        for p in sorted(root.rglob("*"))
    }


def final_model(root: Path, name: str) -> dict:
    """The model tensors of run `name`'s newest valid checkpoint, whole."""
    from dist_train import checkpoint

    return checkpoint.read_full_state(checkpoint.latest_valid(root / "runs" / name / "checkpoints"), "model")


# --------------------------------------------------------------------------- tiers
# Every test is in exactly one tier (pyproject.toml's markers): `unit` (in-process, no other
# process, under ~2 s: `make test-fast`), `multiprocess` (torchrun, gloo workers or a child
# interpreter of its own), `system` (the CLI, launch, the launch scripts, SLURM, or a whole
# training job). A test with none or several fails its module's collection, so none can fall
# outside `-m unit`, `-m multiprocess` and `-m system` unnoticed.
TIERS = ("unit", "multiprocess", "system")


def _tier_problem(item: pytest.Item) -> str | None:
    tiers = sorted({mark.name for mark in item.iter_markers() if mark.name in TIERS})
    if len(tiers) == 1:
        return None
    has = f"{len(tiers)} tiers ({', '.join(tiers)})" if tiers else "no tier"
    return f"{item.nodeid} has {has}: mark it with exactly one of @pytest.mark.unit, multiprocess, system"


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    """Refuses a module (or class) whose tests are not each in exactly one tier, one line per
    test. Checked as each module is collected, before `-m` deselects anything, so under xdist
    too it is a collection error and not an internal one."""
    report = yield
    if report.passed:
        items = [x for x in report.result if isinstance(x, pytest.Item)]
        problems = [problem for problem in map(_tier_problem, items) if problem]
        if problems:
            report.outcome, report.longrepr, report.result = "failed", "\n".join(problems), []
    return report
