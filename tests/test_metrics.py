"""Validation metrics across ranks, and `dist-train eval`.

One digits run trained by 2 FSDP ranks under torchrun is shared by every test here. Its logged
metrics, a 1-process `dist-train eval` and a 2-rank one with uneven shards all equal what this
process computes with scikit-learn from the checkpoint's weights over the whole validation split
(359 samples: odd, so the ranks' shards differ).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, file_hashes, metrics_records, run_cli, tiny_overrides

from dist_train import checkpoint, cli
from dist_train.config import DataConfig
from dist_train.data import build_datasets
from dist_train.models import MLP

pytestmark = pytest.mark.system

DIGITS = str(REPO / "configs" / "digits.yaml")
VAL_SIZE = 359
COUNTED = ("acc", "top5", "precision", "recall", "f1")  # from counts: equal to the last bit


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory) -> Path:
    """Digits, 20 steps of an MLP on 2 FSDP ranks (gloo), evaluated and checkpointed at steps 10 and 20."""
    tmp = tmp_path_factory.mktemp("metrics")
    overrides = tiny_overrides(
        tmp,
        **{
            "run.name": "fsdp",
            "parallel.strategy": "fsdp",
            "train.max_steps": 20,
            "train.eval_every": 10,
            "train.log_every": 10,
            "checkpoint.every_steps": 10,
            # An MLP learns digits in few steps (the seed CNN sits at chance for dozens).
            "model.name": "mlp",
            "optim.lr": 0.1,
            "schedule.warmup_steps": 0,
        },
    )
    proc = run_cli("train", DIGITS, "--nproc-per-node", "2", *overrides, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return tmp / "runs" / "fsdp"


def _eval_record(run_dir: Path, step: int) -> dict[str, float]:
    (row,) = [r for r in metrics_records(run_dir) if r["step"] == step and "val_loss" in r]
    return {k: v for k, v in row.items() if k not in ("step", "time")}


def _reference(run_dir: Path, step: int, split: str = "val") -> tuple[dict[str, float], np.ndarray]:
    """The split's metrics computed here, in one process, with scikit-learn: the checkpoint's
    full weights in a plain model over every sample at once."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support, top_k_accuracy_score

    model = MLP(64, [256, 128], 10)
    model.load_state_dict(checkpoint.read_full_state(checkpoint.step_dir(run_dir / "checkpoints", step)))
    inputs, targets = getattr(build_datasets(DataConfig()), split).tensors  # digits: a fixed split
    with torch.no_grad():
        logits = model.eval()(inputs)
    predicted, labels = logits.argmax(1).numpy(), targets.numpy()
    precision, recall, f1, _ = precision_recall_fscore_support(labels, predicted, average="macro", zero_division=0)
    values = {
        "loss": F.cross_entropy(logits.double(), targets).item(),
        "acc": float((predicted == labels).mean()),
        "top5": top_k_accuracy_score(labels, logits.numpy(), k=5, labels=range(10)),
        "precision": precision,
        "recall": recall,
        "f1": f1,
    }
    return {f"{split}_{name}": value for name, value in values.items()}, confusion_matrix(labels, predicted)


def _assert_same(got: dict[str, float], expected: dict[str, float]) -> None:
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        if name.endswith(COUNTED):
            assert got[name] == pytest.approx(value, abs=1e-12), name
        else:  # the loss: the same sum in another order (shards, batches, FSDP's gathered weights)
            assert got[name] == pytest.approx(value, rel=1e-5), name


def _read_confusion(path: Path) -> np.ndarray:
    table = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.int64)
    assert (table[:, 0] == np.arange(10)).all()  # the true class leads each row
    return table[:, 1:]


def test_two_fsdp_ranks_log_what_one_process_computes_with_sklearn(fsdp_run):
    for step in (10, 20):
        logged = _eval_record(fsdp_run, step)
        expected, confusion = _reference(fsdp_run, step)
        _assert_same(logged, expected)
        assert logged["val_top5"] >= logged["val_acc"]
        saved = _read_confusion(fsdp_run / "confusion" / f"step_{step:08d}.csv")
        assert saved.sum() == VAL_SIZE  # every validation sample once, over two uneven shards
        assert (saved == confusion).all()
        assert np.trace(saved) / VAL_SIZE == pytest.approx(logged["val_acc"], abs=1e-12)
        assert (fsdp_run / "confusion" / f"step_{step:08d}.png").read_bytes()[:4] == b"\x89PNG"
    # A model partway trained, so the numbers discriminate: neither hopeless nor perfect.
    assert 0.25 < logged["val_acc"] < logged["val_top5"] < 1.0


def test_eval_on_one_process_gives_the_numbers_logged_by_two_fsdp_ranks(fsdp_run, capsys):
    before = file_hashes(fsdp_run)
    assert cli.main(["eval", str(fsdp_run)]) == 0
    out = capsys.readouterr().out
    first = fsdp_run / "eval" / "val-step_00000020"
    record = json.loads((first / "metrics.json").read_text())
    assert (record["step"], record["split"], record["samples"], record["processes"]) == (20, "val", VAL_SIZE, 1)
    _assert_same(record["metrics"], _eval_record(fsdp_run, 20))
    assert f"| val_acc       | {record['metrics']['val_acc']:.6g}" in out
    assert (_read_confusion(first / "confusion" / "step_00000020.csv") == _reference(fsdp_run, 20)[1]).all()
    # Again: a folder of its own; nothing the run or the first evaluation wrote changes.
    evaluated = file_hashes(fsdp_run)
    assert cli.main(["eval", str(fsdp_run)]) == 0
    assert (fsdp_run / "eval" / "val-step_00000020.2" / "metrics.json").is_file()
    after = file_hashes(fsdp_run)
    assert {k: after[k] for k in evaluated} == evaluated and {k: evaluated[k] for k in before} == before


def test_eval_on_two_ranks_whose_shards_take_different_batch_counts(fsdp_run, tmp_path):
    # 179 per batch: rank 0's 180 samples take two batches, rank 1's 179 one, so rank 1 runs
    # its last batch again uncounted while rank 0's FSDP forward needs it.
    out = tmp_path / "eval_out"
    args = ["eval", str(fsdp_run), "--nproc-per-node", "2", "--step", "10", "--out", str(out)]
    proc = run_cli(*args, "data.eval_batch_size=179", cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    record = json.loads((out / "metrics.json").read_text())
    assert (record["processes"], record["samples"], record["step"]) == (2, VAL_SIZE, 10)
    _assert_same(record["metrics"], _eval_record(fsdp_run, 10))
    assert proc.stdout.count("| val_loss ") == 1  # rank 0 alone prints the table


def test_eval_of_the_training_split_sees_every_training_sample_unaugmented(fsdp_run, tmp_path, capsys):
    out = tmp_path / "train_split"
    assert cli.main(["eval", str(fsdp_run), "--split", "train", "--step", "10", "--out", str(out)]) == 0
    record = json.loads((out / "metrics.json").read_text())
    expected, confusion = _reference(fsdp_run, 10, "train")
    _assert_same(record["metrics"], expected)
    assert record["samples"] == confusion.sum() == 1438
    assert (_read_confusion(out / "confusion" / "step_00000010.csv") == confusion).all()
    assert "| train_acc " in capsys.readouterr().out


def test_bad_input_is_one_line_and_writes_nothing(fsdp_run, tmp_path, capsys):
    corrupt = tmp_path / "corrupt"
    shutil.copytree(fsdp_run / "checkpoints", corrupt / "checkpoints")
    shutil.copy(fsdp_run / "config.yaml", corrupt)
    shard = corrupt / "checkpoints" / "step_00000020" / checkpoint.MODEL_OPTIM / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    no_checkpoints = tmp_path / "fresh"
    no_checkpoints.mkdir()
    shutil.copy(fsdp_run / "config.yaml", no_checkpoints)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    cases = {
        (str(tmp_path / "nope"),): "no such run directory",
        (str(tmp_path / "taken"),): "is not a run directory: it has no config.yaml",
        (str(no_checkpoints),): "has no valid checkpoint",
        (str(fsdp_run), "--step", "7"): f"{fsdp_run} has no checkpoint for step 7",
        (str(fsdp_run), "--step", "7", "--nproc-per-node", "2"): "has no checkpoint for step 7",
        (str(corrupt), "--step", "20"): "is corrupted: model_optim/__0_0.distcp does not match its recorded checksum",
        (str(fsdp_run), "data.eval_batch_sizee=8"): "unknown config key data.eval_batch_sizee",
        (str(fsdp_run), "--out", str(taken)): "already exists and is not an empty folder",
    }
    trees = {path: file_hashes(path) for path in (fsdp_run, corrupt, no_checkpoints, taken)}
    for args, message in cases.items():
        assert cli.main(["eval", *args]) == 2, args
        captured = capsys.readouterr()
        assert captured.err.startswith("error: ") and captured.err.count("\n") == 1, (args, captured.err)
        assert message in captured.err, (args, captured.err)
        assert not captured.out, args
    assert {path: file_hashes(path) for path in trees} == trees
    assert not (tmp_path / "nope").exists()
