"""Users' own datasets, `data.dataset: package.module:factory`: the README's example through the
installed-style `dist-train` command (no PYTHONPATH) on one and two ranks, one-line errors for
bad factories, exact mid-epoch resume, and a validation set every rank can evaluate."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, cli_env, tiny_overrides

import dist_train
from dist_train import checkpoint
from dist_train.cli import main
from dist_train.config import DataConfig
from dist_train.data import Batch, DataError, DataSpec, ResumableDistributedSampler, build_datasets, build_pipeline
from dist_train.distributed import DistEnv


def _env(world: int) -> DistEnv:
    return DistEnv(rank=0, local_rank=0, world_size=world, device=torch.device("cpu"))


@pytest.mark.unit
def test_a_factory_gives_datasets_and_the_config_wins_over_what_it_returns():
    data = build_datasets(DataConfig(dataset="tests.user_datasets:blobs", kwargs={"n_train": 40, "size": 6}))
    assert (len(data.train), len(data.val)) == (40, 20)
    assert data.spec == DataSpec((1, 6, 6), 4)  # num_classes returned, the shape measured
    assert data.train_transform.__name__ == "noisy_flip"
    data = build_datasets(DataConfig(dataset="tests.user_datasets:blobs", num_classes=7, input_shape=[1, 3, 3]))
    assert data.spec == DataSpec((1, 3, 3), 7)
    # Nothing returned: read from the data (a TensorDataset's labels 0..2, the first input).
    assert build_datasets(DataConfig(dataset="tests.user_datasets:tensors")).spec == DataSpec((1, 4, 4), 3)


@pytest.mark.unit
@pytest.mark.parametrize(
    ("factory", "message"),
    [
        ("needs_size", "must accept (cfg, **data.kwargs) with data.kwargs={}: missing a required argument: 'size'"),
        ("missing_file", "raised FileNotFoundError: [Errno 2] No such file or directory: "),
        ("a_pair", "must return a dict with 'train' and 'val' datasets, got tuple"),
        ("stream", "the train dataset is an IterableDataset; dist_train needs a map-style Dataset"),
        ("nowhere", "cannot import tests.user_datasets_nowhere"),
    ],
)
def test_a_bad_factory_is_one_line_and_exit_2(tmp_path, monkeypatch, capfd, factory, message):
    monkeypatch.chdir(REPO)
    name = "tests.user_datasets_nowhere:f" if factory == "nowhere" else f"tests.user_datasets:{factory}"
    code = main(["train", "configs/digits.yaml", *tiny_overrides(tmp_path, **{"data.dataset": name})])
    err = capfd.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith(f"error: data.dataset={name}"), err
    assert message in err
    assert not (tmp_path / "runs").exists()  # refused before anything is written


@pytest.mark.unit
def test_a_validation_set_smaller_than_the_world_is_an_error():
    cfg = DataConfig(dataset="tests.user_datasets:tensors", kwargs={"n_val": 3}, batch_size=4)
    with pytest.raises(DataError, match="has 3 validation samples, fewer than the 4 processes"):
        build_pipeline(cfg, _env(4), Batch(4, cfg.batch_size, 1), seed=0)
    pipe = build_pipeline(cfg, _env(3), Batch(3, cfg.batch_size, 1), seed=0)  # one each is enough
    assert len(pipe.val_loader) == 1


@pytest.mark.system
def test_a_factory_dataset_resumes_mid_epoch_bit_for_bit_with_loader_workers(tmp_path):
    # 96 samples, global batch 8 x 2: 6 steps an epoch; the stop at 7 is one step into epoch 1.
    config = {
        "run": {"output_dir": str(tmp_path / "runs")},
        "data": {"dataset": "tests.user_datasets:blobs", "batch_size": 8},
        "train": {"max_steps": 14, "grad_accum_steps": 2, "log_every": 1, "eval_every": 0, "progress_bar": False},
        "optim": {"lr": 0.05},
        "checkpoint": {"every_steps": 0},
    }
    straight = dist_train.fit(config, ["run.name=straight"])
    split = ["run.name=split", "data.num_workers=2"]
    assert dist_train.fit(config, [*split, "train.stop_at_step=7"]).step == 7
    resumed = dist_train.fit(config, split)
    a, b = (checkpoint.read_full_state(r.checkpoint, "model") for r in (straight, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert straight.eval_metrics == resumed.eval_metrics

    def losses(name: str) -> list[float]:
        lines = (tmp_path / "runs" / name / "metrics.jsonl").read_text().splitlines()
        return [record["loss"] for record in map(json.loads, lines) if "loss" in record]

    assert losses("straight") == losses("split") and len(losses("split")) == 14


def _installed_command(tmp_path: Path) -> tuple[list[str], dict[str, str]]:
    """`dist-train` as pip installs it: a script whose sys.path starts with its own folder, and
    dist_train importable from elsewhere, so the repository root is on sys.path only if
    dist_train puts the current directory there as `python -m` does."""
    site, script = tmp_path / "site", tmp_path / "bin" / "dist-train"
    site.mkdir()
    (site / "dist_train").symlink_to(REPO / "dist_train")
    script.parent.mkdir()
    script.write_text("import sys\nfrom dist_train.cli import main\nsys.exit(main())\n")
    return [sys.executable, str(script)], {**cli_env(), "PYTHONPATH": str(site)}


@pytest.mark.system
def test_the_example_runs_from_the_repository_root_on_one_and_two_ranks_with_a_bad_file(tmp_path):
    from examples.my_dataset import draw_shapes  # the files the factory would draw, drawn here first

    per_class = 40  # 32 training images of each of 3 shapes: 96, 6 steps of 16 an epoch
    folder = tmp_path / "data" / f"shapes_16px_{per_class}"
    draw_shapes(folder, 16, per_class)
    with open(folder / "train" / "labels.csv", newline="") as f:
        files = [row["file"] for row in csv.DictReader(f)]
    bad = 40  # a square; the run must skip it and count it
    (folder / "train" / files[bad]).write_bytes(b"\x89PNG truncated")

    command, env = _installed_command(tmp_path)
    common = [f"run.output_dir={tmp_path / 'runs'}", f"data.root={tmp_path / 'data'}", "data.batch_size=8"]
    common += [f"data.kwargs.per_class={per_class}", "data.skip_bad_samples=true", "train.max_epochs=null"]
    common += ["train.max_steps=12", "train.log_every=2", "train.eval_every=0", "train.progress_bar=false"]

    def dist_train_cli(*args: str) -> subprocess.CompletedProcess:
        proc = subprocess.run([*command, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    # One rank with two loader workers, accumulating 2 micro-batches of 8.
    dist_train_cli("train", "examples/my_dataset.yaml", *common, "run.name=one", "train.grad_accum_steps=2")
    # Two ranks of 8 without workers until step 5, then one rank resumes (accumulation adapts).
    two = ["run.name=two", "data.num_workers=0"]
    dist_train_cli("launch", "examples/my_dataset.yaml", "--nproc-per-node", "2", *common, *two, "train.stop_at_step=5")
    resumed = dist_train_cli("train", "examples/my_dataset.yaml", *common, *two)
    assert "written by 2 processes, resumed on 1" in resumed.stdout

    def bad_samples(name: str) -> dict[int, int]:
        lines = (tmp_path / "runs" / name / "metrics.jsonl").read_text().splitlines()
        return {r["step"]: r["bad_samples"] for r in map(json.loads, lines) if "bad_samples" in r}

    # The global data position decides when the bad file comes up: once an epoch.
    sampler = ResumableDistributedSampler(96, 1, 0, seed=0, global_batch=16)
    first_seen = [sampler.permutation(epoch).tolist().index(bad) // 16 + 1 for epoch in (0, 1)]
    expected = {step: sum(step >= first_seen[e] + 6 * e for e in (0, 1)) for step in (2, 4, 5, 6, 8, 10, 12)}
    assert expected[5] >= 1 and expected[12] == 2  # counted before the stop, and again in epoch 1
    assert bad_samples("one") == {s: n for s, n in expected.items() if s != 5}
    assert bad_samples("two") == expected  # the count of both ranks, kept across 2 -> 1 ranks

    one, two_then_one = (
        checkpoint.read_full_state(checkpoint.step_dir(tmp_path / "runs" / n / "checkpoints", 12), "model")
        for n in ("one", "two")
    )
    for key in one:
        torch.testing.assert_close(one[key], two_then_one[key], rtol=1e-4, atol=1e-5)
