"""The real job: `dist-train launch` -> torchrun -> 2 gloo workers on CPU, offline W&B, then a resume.

The launch and the resume run once per module (fixtures below) and the tests read what they left
behind: the run directory, metrics.jsonl, checkpoints and the offline W&B run files.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from conftest import REPO, cli_env, run_cli, tiny_overrides
from wandb_offline import WandbFileError, read_history, read_records, run_id

from dist_train import checkpoint

LAUNCH = ("launch", "configs/digits.yaml", "--nproc-per-node", "2")
JOB = {"logging.wandb.mode": "offline", "checkpoint.every_steps": 4}  # log_every=2, eval only at the end


@dataclass
class Launch:
    proc: subprocess.CompletedProcess
    run_dir: Path
    metrics_text: str  # metrics.jsonl right after this launch (a later resume rewrites it)
    wandb_dirs: list[Path]  # offline-run-* folders right after this launch

    @property
    def output(self) -> str:
        return f"--- stdout\n{self.proc.stdout}\n--- stderr\n{self.proc.stderr}"

    @property
    def metrics(self) -> list[dict]:
        return [json.loads(line) for line in self.metrics_text.splitlines()]


def _launch(root: Path, max_steps: int) -> Launch:
    proc = run_cli(*LAUNCH, *tiny_overrides(root, **JOB, **{"train.max_steps": max_steps}), cwd=REPO)
    run_dir = root / "runs" / "digits"
    metrics = run_dir / "metrics.jsonl"
    return Launch(
        proc,
        run_dir,
        metrics.read_text() if metrics.is_file() else "",
        sorted((run_dir / "wandb").glob("offline-run-*")),
    )


@pytest.fixture(scope="module")
def first(tmp_path_factory) -> Launch:
    return _launch(tmp_path_factory.mktemp("e2e"), max_steps=8)


@pytest.fixture(scope="module")
def resumed(first) -> Launch:
    assert first.proc.returncode == 0, first.output
    return _launch(first.run_dir.parents[1], max_steps=12)  # same run dir; checkpoint.resume=auto


def _wandb_file(run_folder: Path) -> Path:
    files = list(run_folder.glob("run-*.wandb"))
    assert len(files) == 1, files
    return files[0]


def _losses(rows: list[dict], step_key: str) -> dict[int, float]:
    return {row[step_key]: row["loss"] for row in rows if "loss" in row}


@pytest.mark.system
def test_two_process_launch_writes_one_run(first):
    assert first.proc.returncode == 0, first.output
    commands = [line for line in first.proc.stdout.splitlines() if line.startswith("+ ")]
    assert len(commands) == 1, first.output
    assert "torch.distributed.run" in commands[0] and "--nproc-per-node=2" in commands[0]
    # Only rank 0 talks: one banner although two workers trained.
    assert first.proc.stdout.count("training 8 steps of global batch 32 (2 x 16 x 1 accumulation)") == 1, first.output

    config = yaml.safe_load((first.run_dir / "config.yaml").read_text())
    assert config["train"]["max_steps"] == 8
    assert config["checkpoint"]["every_steps"] == 4
    assert config["logging"]["wandb"]["mode"] == "offline"

    rows = first.metrics
    assert all(set(row) & {"loss", "val_acc", "checkpoint_stall_s"} for row in rows), rows
    assert [row["step"] for row in rows if "loss" in row] == [2, 4, 6, 8]
    evals = [row for row in rows if "val_acc" in row]
    assert [row["step"] for row in evals] == [8] and rows[-2] is evals[0]
    assert 0.0 <= evals[0]["val_acc"] <= 1.0
    saves = [row for row in rows if "checkpoint_stall_s" in row]
    assert [row["step"] for row in saves] == [4, 8] and all(row["checkpoint_stall_s"] > 0 for row in saves)
    assert len(rows) == 7

    checkpoints = first.run_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_00000004", "step_00000008"]
    last = checkpoints / "step_00000008"
    assert {"rng_rank0.pt", "rng_rank1.pt", "train_state.pt", "manifest.json"} <= {p.name for p in last.iterdir()}
    checkpoint.verify(last)
    assert json.loads((last / "manifest.json").read_text())["world_size"] == 2

    assert len(first.wandb_dirs) == 1, first.wandb_dirs  # rank 1 made no W&B run
    wandb_file = _wandb_file(first.wandb_dirs[0])
    rid = run_id(wandb_file)
    assert first.wandb_dirs[0].name.endswith("-" + rid) and wandb_file.name == f"run-{rid}.wandb"
    assert checkpoint.load_train_state(last)["wandb_run_id"] == rid

    history = _losses(read_history(wandb_file), "_step")
    metrics = _losses(rows, "step")
    assert sorted(history) == [2, 4, 6, 8]
    assert history == pytest.approx(metrics, rel=1e-6)


@pytest.mark.system
def test_resume_continues_the_same_run(first, resumed):
    assert resumed.proc.returncode == 0, resumed.output
    assert "resumed from" in resumed.proc.stdout + resumed.proc.stderr, resumed.output
    assert "step_00000008 at step 8" in resumed.proc.stdout, resumed.output

    config = yaml.safe_load((resumed.run_dir / "config.yaml").read_text())
    assert config["train"]["max_steps"] == 12

    rows = resumed.metrics
    train_steps = [row["step"] for row in rows if "loss" in row]
    assert train_steps == [2, 4, 6, 8, 10, 12]  # each step once, in order
    assert [row["step"] for row in rows if "val_acc" in row] == [8, 12]
    assert rows[: len(first.metrics)] == first.metrics  # the first launch's lines are kept as they were

    checkpoints = resumed.run_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_00000008", "step_00000012"]  # keep_last: 2
    assert {"rng_rank0.pt", "rng_rank1.pt"} <= {p.name for p in (checkpoints / "step_00000012").iterdir()}

    assert len(resumed.wandb_dirs) == 2, resumed.wandb_dirs
    (old,) = first.wandb_dirs
    (new,) = [d for d in resumed.wandb_dirs if d != old]
    old_id, new_id = run_id(_wandb_file(old)), run_id(_wandb_file(new))
    assert old_id == new_id
    assert old.name.rsplit("-", 1)[1] == new.name.rsplit("-", 1)[1] == new_id
    assert checkpoint.load_train_state(checkpoints / "step_00000012")["wandb_run_id"] == new_id

    metrics = _losses(rows, "step")
    new_history = _losses(read_history(_wandb_file(new)), "_step")
    assert sorted(new_history) == [10, 12]
    assert new_history == pytest.approx({s: metrics[s] for s in (10, 12)}, rel=1e-6)
    old_history = _losses(read_history(_wandb_file(old)), "_step")
    assert old_history == pytest.approx({s: metrics[s] for s in (2, 4, 6, 8)}, rel=1e-6)


@pytest.mark.system
def test_bad_override_fails_before_any_worker_starts(tmp_path):
    proc = run_cli(*LAUNCH, *tiny_overrides(tmp_path, **{"optim.lr": -1}), cwd=REPO)
    assert proc.returncode != 0
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and "optim.lr" in lines[0], proc.stderr
    assert not any(line.startswith("+ ") for line in proc.stdout.splitlines()), proc.stdout  # torchrun not run
    assert not (tmp_path / "runs").exists()


WRITE_BIG_RUN = textwrap.dedent("""
    import wandb
    run = wandb.init(project="reader", id="bigrun0042", mode="offline", dir=".")
    for step in range(1, 301):
        metrics = {"loss": 1.0 / step, "text": "x" * (70_000 if step % 50 == 0 else step)}
        run.log(metrics, step=step)
    run.finish()
""")


@pytest.mark.multiprocess
def test_offline_reader_reassembles_records_across_blocks(tmp_path):
    # The job's run files stay inside the first 32 KiB block; this one has records that straddle
    # block boundaries and 70 KB records split into first/middle/last fragments.
    proc = subprocess.run(
        [sys.executable, "-c", WRITE_BIG_RUN], cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    (path,) = tmp_path.glob("wandb/offline-run-*/run-bigrun0042.wandb")
    assert path.stat().st_size > 10 * 32 * 1024

    assert run_id(path) == "bigrun0042"
    rows = read_history(path)
    assert [row["_step"] for row in rows] == list(range(1, 301))
    for row in rows:
        step = row["_step"]
        assert row["loss"] == 1.0 / step
        assert row["text"] == "x" * (70_000 if step % 50 == 0 else step)

    data = bytearray(path.read_bytes())
    data[data.find(b"x" * 1000) + 500] ^= 0xFF  # a flipped byte inside a payload: the checksum catches it
    broken = tmp_path / "broken.wandb"
    broken.write_bytes(bytes(data))
    with pytest.raises(WandbFileError):
        read_records(broken)


@pytest.mark.system
def test_the_wandb_api_key_is_never_written_and_nothing_is_world_writable(tmp_path):
    import stat

    from conftest import cli_env

    key = "0123456789abcdef0123456789abcdef01234567"  # the shape of a W&B key; fake
    env = {**cli_env(), "WANDB_API_KEY": key}
    overrides = tiny_overrides(tmp_path, **JOB, **{"train.max_steps": 4})
    proc = subprocess.run(
        [sys.executable, "-m", "dist_train.cli", "train", "configs/digits.yaml", *overrides],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert key not in proc.stdout + proc.stderr
    files = [p for p in (tmp_path / "runs").rglob("*")]
    assert any(p.suffix == ".wandb" for p in files) and any(p.name == "train_state.pt" for p in files)
    for path in files:
        assert not path.stat().st_mode & stat.S_IWOTH, f"{path} is world-writable"
        if path.is_file():
            assert key.encode() not in path.read_bytes(), f"{path} holds the API key"
