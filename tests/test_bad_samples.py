"""Unreadable samples (a corrupt image file): one line naming the index and the file, or with
data.skip_bad_samples a deterministic replacement, counted as bad_samples across resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import REPO, metrics_records, tiny_overrides
from PIL import Image

import dist_train
from dist_train import checkpoint
from dist_train.cli import main
from dist_train.data import ResumableDistributedSampler

N_TRAIN, BATCH = 12, 4  # 3 steps an epoch
BAD_TRAIN = 8  # ImageFolder sorts a/0..5, b/0..5: b/2.png is training sample 8


def image_folder(tmp_path: Path, corrupt: tuple[str, ...]) -> Path:
    """train/ (2 classes x 6) and val/ (2 x 2) folders of 8x8 PNGs; `corrupt` files hold no image."""
    root = tmp_path / "images"
    for split, per_class in (("train", 6), ("val", 2)):
        for c, name in enumerate("ab"):
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (8, 8), color=(120 * c, 20 * i, 60)).save(root / split / name / f"{i}.png")
    for path in corrupt:
        (root / path).write_bytes(b"not a PNG: the bytes of a half-copied file")
    return root


def overrides(tmp_path: Path, root: Path, **extra: object) -> list[str]:
    values = {
        "data.dataset": "image_folder",
        "data.root": root,
        "data.image_size": 8,
        "data.batch_size": BATCH,
        "train.max_steps": 12,
        "checkpoint.every_steps": 0,
        **extra,
    }
    return tiny_overrides(tmp_path, **values)


@pytest.mark.unit
@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_corrupt_training_image_is_one_line_naming_its_index_and_file(tmp_path, capfd, num_workers):
    root = image_folder(tmp_path, corrupt=("train/b/2.png",))
    args = overrides(tmp_path, root, **{"data.num_workers": num_workers})
    # The CLI's main in this process; capfd also sees what forked loader workers write.
    assert main(["train", str(REPO / "configs/digits.yaml"), *args]) == 2
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"error: training sample {BAD_TRAIN} ({root / 'train/b/2.png'}) could not be loaded: ")
    assert "UnidentifiedImageError" in err and "data.skip_bad_samples=true" in err


@pytest.mark.unit
def test_a_corrupt_validation_image_is_one_line_with_loader_workers(tmp_path, capfd):
    root = image_folder(tmp_path, corrupt=("val/a/1.png",))
    args = overrides(tmp_path, root, **{"data.num_workers": 2, "train.max_steps": 2})
    assert main(["train", str(REPO / "configs/digits.yaml"), *args]) == 2  # evaluation at the end
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"error: validation sample 1 ({root / 'val/a/1.png'}) could not be loaded: ")


def expected_bad_samples(steps: list[int], seed: int = 0) -> dict[int, int]:
    """How often BAD_TRAIN was drawn by the end of each step: once per epoch, when the epoch's
    permutation reaches it (the global data position of one run)."""
    sampler = ResumableDistributedSampler(N_TRAIN, 1, 0, seed, BATCH)
    per_epoch = sampler.samples_per_epoch
    counts = {}
    for step in steps:
        consumed, count = step * BATCH, 0
        for epoch in range(consumed // per_epoch + 1):
            order = sampler.permutation(epoch)[:per_epoch].tolist()
            count += epoch * per_epoch + order.index(BAD_TRAIN) < consumed
        counts[step] = count
    return counts


def logged(run_dir: Path, key: str) -> dict[int, float]:
    lines = metrics_records(run_dir)
    return {line["step"]: line[key] for line in lines if key in line}


@pytest.mark.system
def test_skip_bad_samples_replaces_them_reproducibly_and_the_count_survives_resume(tmp_path, capfd):
    root = image_folder(tmp_path, corrupt=("train/b/2.png", "val/a/1.png"))
    skip = {"data.skip_bad_samples": True, "train.eval_every": 6}
    straight = dist_train.fit(REPO / "configs/digits.yaml", overrides(tmp_path, root, **skip, **{"run.name": "a"}))
    # Loader workers and a stop in the middle of epoch 1 must change nothing.
    split = overrides(tmp_path, root, **skip, **{"run.name": "b", "data.num_workers": 2})
    first = dist_train.fit(REPO / "configs/digits.yaml", [*split, "train.stop_at_step=5"])
    resumed = dist_train.fit(REPO / "configs/digits.yaml", split)
    assert (straight.step, first.step, resumed.step) == (12, 5, 12)

    expected = expected_bad_samples([2, 4, 5, 6, 8, 10, 12])
    assert expected[5] >= 1 and expected[12] >= 3  # drawn before the stop, and again in later epochs
    runs = tmp_path / "runs"
    assert logged(runs / "a", "bad_samples") == {s: expected[s] for s in (2, 4, 6, 8, 10, 12)}
    assert logged(runs / "b", "bad_samples") == expected  # step 5: the stop's log line
    ckpt = checkpoint.load_train_state(first.checkpoint)
    assert ckpt["data"]["bad_samples"] == expected[5]

    a, b = (checkpoint.read_full_state(r.checkpoint, "model") for r in (straight, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert straight.eval_metrics == resumed.eval_metrics  # the bad validation image replaced the same way
    loss_a, loss_b = logged(runs / "a", "loss"), logged(runs / "b", "loss")
    for step in (2, 4, 8, 10, 12):  # the stop at 5 splits run b's 5-6 interval
        assert loss_a[step] == loss_b[step], step
    err = capfd.readouterr().err
    assert f"warning: training sample {BAD_TRAIN} ({root / 'train/b/2.png'}) could not be loaded" in err
    assert f"warning: validation sample 1 ({root / 'val/a/1.png'}) could not be loaded" in err
