"""Datasets, the resumable sharded sampler and the checkpointable batch stream."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dist_train.config import DataConfig
from dist_train.data import (
    IN_MEMORY_CHUNK,
    Batch,
    DataError,
    EvalShard,
    RandomShift,
    ResumableDistributedSampler,
    SampleKeys,
    SeededAugment,
    build_datasets,
    build_pipeline,
    total_steps,
)
from dist_train.distributed import DistEnv


def _cpu_env(rank: int = 0, world: int = 1) -> DistEnv:
    return DistEnv(rank=rank, local_rank=rank, world_size=world, device=torch.device("cpu"))


def _indices(sampler) -> list[int]:
    return [index for _, index in sampler]


@pytest.mark.unit
def test_shards_are_disjoint_equal_and_cover_whole_global_batches():
    n, world, global_batch = 103, 4, 12  # 103 // 12 = 8 global batches = 96 samples per epoch
    shards = [
        _indices(ResumableDistributedSampler(n, world, r, seed=1, global_batch=global_batch)) for r in range(world)
    ]
    assert all(len(s) == 24 for s in shards)
    flat = [i for s in shards for i in s]
    assert len(set(flat)) == 96
    # Together the ranks consume exactly the first 96 entries of the epoch's permutation.
    permutation = ResumableDistributedSampler(n, world, 0, seed=1, global_batch=global_batch).permutation(0)
    assert set(flat) == set(permutation[:96].tolist())


@pytest.mark.unit
def test_epochs_reshuffle_and_are_reproducible():
    sampler = ResumableDistributedSampler(50, 1, 0, seed=3, global_batch=10)
    sampler.set_epoch(0)
    first = _indices(sampler)
    sampler.set_epoch(1)
    second = _indices(sampler)
    assert first != second and sorted(first) != first
    sampler.set_epoch(0)
    assert _indices(sampler) == first
    assert all(epoch == 0 for epoch, _ in sampler)


@pytest.mark.unit
@pytest.mark.parametrize("world", [1, 2, 3])
def test_resumed_position_yields_exactly_the_remaining_samples(world):
    n, global_batch, consumed = 120, 6 * world, 4 * 6 * world
    full, resumed = [], []
    for rank in range(world):
        sampler = ResumableDistributedSampler(n, world, rank, seed=0, global_batch=global_batch)
        sampler.set_epoch(2)
        full.append(_indices(sampler))
        sampler.set_start(consumed)
        resumed.append(_indices(sampler))
        assert len(sampler) == len(resumed[-1])
    seen_before = {i for shard in full for i in shard[: consumed // world]}
    remaining = [i for shard in resumed for i in shard]
    assert len(remaining) == len(set(remaining))
    assert seen_before.isdisjoint(remaining)
    assert seen_before | set(remaining) == {i for shard in full for i in shard}
    for rank in range(world):
        assert resumed[rank] == full[rank][consumed // world :]


@pytest.mark.unit
def test_set_start_rejects_positions_that_split_ranks():
    sampler = ResumableDistributedSampler(40, 2, 0, seed=0, global_batch=8)
    with pytest.raises(ValueError):
        sampler.set_start(3)
    with pytest.raises(ValueError):
        sampler.set_start(48)


@pytest.mark.unit
def test_eval_shards_cover_every_sample_once():
    shards = [list(EvalShard(11, 3, r)) for r in range(3)]
    assert sorted(i for s in shards for i in s) == list(range(11))


@pytest.mark.unit
def test_train_batches_state_resumes_the_stream():
    cfg = DataConfig(dataset="digits", batch_size=16)
    pipe = build_pipeline(cfg, _cpu_env(), Batch(1, cfg.batch_size, 2), seed=5)
    assert pipe.global_batch == 32 and pipe.train.steps_per_epoch == 1438 // 32
    for _ in range(10):
        pipe.train.next_micro_batch()
    state = pipe.train.state_dict()
    assert state == {"epoch": 0, "samples_consumed": 160}
    expected = [pipe.train.next_micro_batch() for _ in range(6)]

    fresh = build_pipeline(cfg, _cpu_env(), Batch(1, cfg.batch_size, 2), seed=5)
    fresh.train.load_state_dict(state)
    for (x, y), (ex, ey) in zip((fresh.train.next_micro_batch() for _ in range(6)), expected, strict=True):
        assert torch.equal(x, ex) and torch.equal(y, ey)


@pytest.mark.unit
def test_epoch_rolls_over_after_whole_global_batches():
    cfg = DataConfig(dataset="digits", batch_size=100)
    pipe = build_pipeline(cfg, _cpu_env(), Batch(1, cfg.batch_size, 1), seed=0)
    for _ in range(pipe.train.steps_per_epoch):
        pipe.train.next_micro_batch()
    assert pipe.train.state_dict() == {"epoch": 1, "samples_consumed": 0}


@pytest.mark.unit
def test_dataset_smaller_than_one_global_batch_is_an_error():
    cfg = DataConfig(dataset="digits", batch_size=400)
    with pytest.raises(DataError, match="fewer than one global batch of 1600"):
        build_pipeline(cfg, _cpu_env(rank=0, world=2), Batch(2, cfg.batch_size, 2), seed=0)


@pytest.mark.unit
def test_digits_split_is_fixed_and_complete():
    a, b = build_datasets(DataConfig(dataset="digits")), build_datasets(DataConfig(dataset="digits"))
    assert (len(a.train), len(a.val)) == (1438, 359)
    assert torch.equal(a.val.tensors[1], b.val.tensors[1])
    assert a.spec.input_shape == (1, 8, 8) and a.spec.num_classes == 10


@pytest.mark.unit
def test_augmentation_is_a_function_of_seed_epoch_and_index():
    data = build_datasets(DataConfig(dataset="digits"))
    aug = SeededAugment(data.train, data.train_transform, seed=0)
    state = torch.get_rng_state()
    x1, _ = aug[(0, 7)]
    assert torch.equal(torch.get_rng_state(), state), "augmentation must not disturb the global RNG"
    assert torch.equal(aug[(0, 7)][0], x1)
    variants = {aug[(epoch, 7)][0].flatten().tolist().__repr__() for epoch in range(20)}
    assert len(variants) > 1, "different epochs must see different augmentations"
    plain = build_datasets(DataConfig(dataset="digits", augment=False))
    no_aug = SeededAugment(plain.train, plain.train_transform, seed=0)
    assert torch.equal(no_aug[(0, 7)][0], no_aug[(5, 7)][0])


@pytest.mark.unit
def test_random_shift_is_a_padded_random_crop_over_every_offset_keyed_per_sample():
    image = torch.arange(1.0, 65.0).reshape(1, 8, 8)
    padded = torch.nn.functional.pad(image, (1, 1, 1, 1), value=-3.0)
    windows = {(top, left): padded[..., top : top + 8, left : left + 8] for top in range(3) for left in range(3)}
    shift = RandomShift(1, fill=-3.0)
    keys = list(range(1000, 1200))
    shifted = shift.keyed(image.expand(len(keys), 1, 8, 8), keys)
    seen = []
    for one in shifted:
        match = [offset for offset, window in windows.items() if torch.equal(one, window)]
        assert len(match) == 1  # always one of the 9 windows of the padded image
        seen.append(match[0])
    counts = [seen.count(offset) for offset in windows]
    assert min(counts) >= 10, counts  # every offset occurs, roughly uniformly (200 / 9 each)
    # A sample's shift depends on its key only, not on the batch it is in.
    assert torch.equal(shift.keyed(image[None], [1007])[0], shifted[7])


@pytest.mark.unit
def test_batched_augmentation_equals_per_sample_augmentation():
    datasets = build_datasets(DataConfig(dataset="digits", augment=True))
    augment = SeededAugment(datasets.train, datasets.train_transform, seed=4)
    indices = [5, 0, 99, 17, 5]
    images, labels, replaced = augment.__getitems__(SampleKeys(2, np.array(indices)))  # what DataLoader calls
    assert replaced == 0
    assert torch.equal(images, torch.stack([augment[(2, index)][0] for index in indices]))
    assert torch.equal(labels, torch.stack([augment[(2, index)][1] for index in indices]))


@pytest.mark.unit
def test_synthetic_dataset_shape():
    data = build_datasets(
        DataConfig(dataset="synthetic", synthetic_shape=[3, 16, 16], synthetic_size=64, synthetic_classes=5)
    )
    x, y = data.train[0]
    assert x.shape == (3, 16, 16) and 0 <= int(y) < 5 and len(data.train) == 64


@pytest.mark.unit
def test_synthetic_uint8_images_cross_as_bytes_and_are_normalized_on_the_device():
    """data.synthetic_dtype=uint8: the path cifar10 and mnist take, for throughput runs."""
    from dist_train.data import build_pipeline
    from dist_train.distributed import DistEnv

    cfg = DataConfig(dataset="synthetic", synthetic_shape=[3, 16, 16], synthetic_size=256, synthetic_dtype="uint8")
    pipeline = build_pipeline(cfg, DistEnv(0, 0, 1, torch.device("cpu")), Batch(1, cfg.batch_size, 1), 0)
    inputs, _ = pipeline.train.next_micro_batch()
    assert inputs.dtype == torch.uint8 and inputs.shape == (64, 3, 16, 16)
    normalized = pipeline.inputs_to_device(inputs)
    assert normalized.dtype == torch.float32
    assert abs(normalized.mean().item()) < 0.05 and abs(normalized.std().item() - 1) < 0.05


def _write_images(folder, classes, per_class, size=(12, 10)):
    for c, name in enumerate(classes):
        (folder / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", size, color=(40 * c, 10 * i, 0)).save(folder / name / f"{i}.png")


@pytest.mark.unit
def test_image_folder_with_and_without_val_folder(tmp_path):
    _write_images(tmp_path / "flat", ["cat", "dog", "eel"], 5)
    data = build_datasets(
        DataConfig(dataset="image_folder", root=str(tmp_path / "flat"), image_size=16, val_fraction=0.2)
    )
    assert (len(data.train), len(data.val)) == (12, 3) and data.spec == data.spec.__class__((3, 16, 16), 3)
    x, y = data.train_transform(data.train[0][0]), data.train[0][1]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and y in (0, 1, 2)

    _write_images(tmp_path / "split" / "train", ["a", "b"], 4)
    _write_images(tmp_path / "split" / "val", ["a", "b"], 2)
    data = build_datasets(DataConfig(dataset="image_folder", root=str(tmp_path / "split"), image_size=8))
    assert (len(data.train), len(data.val)) == (8, 4)


@pytest.mark.unit
def test_image_folder_missing_or_empty_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        build_datasets(DataConfig(dataset="image_folder", root=str(tmp_path / "nope")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no usable images"):
        build_datasets(DataConfig(dataset="image_folder", root=str(tmp_path / "empty")))
    _write_images(tmp_path / "no_val" / "train", ["a"], 2)
    (tmp_path / "no_val" / "val").mkdir()
    with pytest.raises(DataError, match="val holds no usable images"):
        build_datasets(DataConfig(dataset="image_folder", root=str(tmp_path / "no_val")))


@pytest.mark.unit
@pytest.mark.parametrize("name", ["cifar10", "mnist"])
def test_torchvision_dataset_missing_offline_says_how_to_download(tmp_path, name):
    with pytest.raises(DataError, match="data.download=true"):
        build_datasets(DataConfig(dataset=name, root=str(tmp_path)))


@pytest.mark.unit
def test_total_steps_takes_the_first_limit():
    assert total_steps(100, None, 44) == 100
    assert total_steps(None, 3, 44) == 132
    assert total_steps(100, 2, 44) == 88


@pytest.mark.unit
def test_worker_processes_do_not_change_the_batches():
    # Per-sample seeding makes augmented batches identical with and without loader workers,
    # also when the stream restarts mid-epoch on persistent workers.
    def batches(num_workers: int, start_state=None, count=5):
        cfg = DataConfig(dataset="digits", batch_size=16, num_workers=num_workers, augment=True)
        pipe = build_pipeline(cfg, _cpu_env(), Batch(1, cfg.batch_size, 1), seed=3)
        if start_state:
            pipe.train.load_state_dict(start_state)
        return [pipe.train.next_micro_batch()[0] for _ in range(count)]

    in_process = batches(0, {"epoch": 1, "samples_consumed": 64})
    with_workers = batches(2, {"epoch": 1, "samples_consumed": 64})
    for a, b in zip(in_process, with_workers, strict=True):
        assert torch.equal(a, b)


@pytest.mark.unit
def test_a_new_world_size_continues_the_epoch_with_every_sample_once():
    # Segments of 2 -> 1 -> 2 ranks inside one epoch, the global batch kept at 12: together they
    # consume exactly the samples one uninterrupted epoch would, none twice.
    n, global_batch = 100, 12  # 8 global batches = 96 samples per epoch
    consumed, position = [], 0
    for world, steps in ((2, 3), (1, 2), (2, 3)):
        for rank in range(world):
            sampler = ResumableDistributedSampler(n, world, rank, seed=5, global_batch=global_batch)
            sampler.set_epoch(0)
            sampler.set_start(position)  # the global count a checkpoint stores
            consumed += _indices(sampler)[: steps * global_batch // world]
        position += steps * global_batch
    uninterrupted = [i for r in range(2) for i in _indices(ResumableDistributedSampler(n, 2, r, 5, global_batch))]
    assert len(consumed) == len(set(consumed)) == 96
    assert set(consumed) == set(uninterrupted)


@pytest.mark.unit
def test_chunked_in_memory_loading_yields_the_per_sample_micro_batches_across_resume_and_epochs():
    # Rank 1 of 2 resumes 4 steps before the end of epoch 0 and reads into epoch 1: the chunks
    # gathered and augmented at once must split into exactly the micro-batches that per-sample
    # loading of the sampler's order gives.
    cfg = DataConfig(dataset="digits", batch_size=16, augment=True)
    pipe = build_pipeline(cfg, _cpu_env(rank=1, world=2), Batch(2, cfg.batch_size, 1), seed=3)
    assert pipe.train.loader.batch_sampler.chunk_size == 16 * IN_MEMORY_CHUNK  # the chunked path
    steps_per_epoch = pipe.train.steps_per_epoch
    pipe.train.load_state_dict({"epoch": 0, "samples_consumed": (steps_per_epoch - 4) * 32})
    got = [pipe.train.next_micro_batch() for _ in range(4 + 20)]

    augment = SeededAugment(build_datasets(cfg).train, build_datasets(cfg).train_transform, seed=3)
    sampler = ResumableDistributedSampler(1438, 2, 1, seed=3, global_batch=32)
    sampler.set_epoch(0)
    sampler.set_start((steps_per_epoch - 4) * 32)
    keys = list(sampler)
    sampler.set_epoch(1)
    sampler.set_start(0)
    keys += list(sampler)[: 20 * 16]
    assert keys[64][0] == 1  # the 5th micro-batch is the first of epoch 1
    for n, (images, labels) in enumerate(got):
        batch = [augment[key] for key in keys[n * 16 : (n + 1) * 16]]
        assert torch.equal(images, torch.stack([x for x, _ in batch]))
        assert torch.equal(labels, torch.stack([y for _, y in batch]))
    assert pipe.train.state_dict() == {"epoch": 1, "samples_consumed": 20 * 32}


@pytest.mark.unit
def test_the_digits_shift_is_unchanged_by_the_uint8_and_flip_work():
    # Digest of the shift before RandomShift learned flips and uint8: old checkpoints' runs
    # (and their exact resume) depend on every sample's offsets staying the same.
    import hashlib

    images = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    shifted = RandomShift(1, fill=-0.5).keyed(images, np.arange(1000, 1064))
    digest = hashlib.sha256(shifted.numpy().tobytes()).hexdigest()
    assert digest == "12d880a3c83276921bf508ed503914b12114bc66104e2d29c1fbf5e89613b4f6"


@pytest.mark.unit
def test_uint8_crop_and_flip_are_keyed_per_sample():
    images = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    padded = torch.nn.functional.pad(images[0], (4, 4, 4, 4), value=0)
    windows = {(t, left): padded[:, t : t + 32, left : left + 32] for t in range(9) for left in range(9)}
    keys = np.arange(5000, 5400)
    augmented = RandomShift(4, fill=0, flip=True).keyed(images.expand(len(keys), 3, 32, 32), keys)
    assert augmented.dtype == torch.uint8
    flipped, offsets = 0, set()
    for one in augmented:
        plain = [o for o, w in windows.items() if torch.equal(one, w)]
        mirrored = [o for o, w in windows.items() if torch.equal(one, w.flip(-1))]
        assert len(plain) + len(mirrored) == 1  # one window of the zero-padded image, mirrored or not
        flipped += bool(mirrored)
        offsets.add((plain or mirrored)[0])
    assert 0.4 < flipped / len(keys) < 0.6 and len(offsets) >= 75  # of 81, about 5 samples each
    # The flip is not a function of the offsets: both flip states occur at the same offset.
    again = RandomShift(4, fill=0, flip=False).keyed(images.expand(len(keys), 3, 32, 32), keys)
    same_offset = [torch.equal(a, b) or torch.equal(a, b.flip(-1)) for a, b in zip(augmented, again, strict=True)]
    assert all(same_offset)
    assert torch.equal(RandomShift(4, 0, flip=True).keyed(images, keys[7:8])[0], augmented[7])  # batch-independent


@pytest.mark.unit
def test_mnist_is_uint8_in_memory_and_normalized_on_the_device(tmp_path):
    from conftest import write_fake_mnist
    from torchvision.transforms import v2

    write_fake_mnist(tmp_path)
    cfg = DataConfig(dataset="mnist", root=str(tmp_path), batch_size=16, augment=False)
    data = build_pipeline(cfg, _cpu_env(), Batch(1, cfg.batch_size, 1), seed=0)
    images, _ = data.train.next_micro_batch()
    assert images.dtype == torch.uint8 and images.shape == (16, 1, 28, 28)
    reference = v2.Normalize((0.1307,), (0.3081,))(v2.ToDtype(torch.float32, scale=True)(images))
    torch.testing.assert_close(data.inputs_to_device(images), reference, rtol=1e-5, atol=1e-5)
    val_images, _ = next(iter(data.val_loader))
    assert val_images.dtype == torch.uint8  # evaluation batches cross as bytes too
    nhwc = data.inputs_to_device(images, torch.channels_last)
    assert nhwc.is_contiguous(memory_format=torch.channels_last) and torch.equal(nhwc, data.inputs_to_device(images))


@pytest.mark.multiprocess
def test_a_dataset_is_downloaded_by_rank_0_first_then_once_per_node(tmp_path):
    import json
    import subprocess
    import sys

    from conftest import REPO, cli_env, write_fake_mnist

    write_fake_mnist(tmp_path / "shared")
    (tmp_path / "a_file").write_text("not a directory")
    out = tmp_path / "findings.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    worker = ["tests/download_worker.py", str(tmp_path / "shared"), str(tmp_path / "a_file" / "mnist"), str(out)]
    proc = subprocess.run([*command, *worker], cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(out.read_text())

    # One node: rank 0 fetches, then its node-mate only reads what is there.
    rank0, rank1 = found["one_node"]
    assert [c["download"] for c in rank0["calls"]] == [True] and [c["download"] for c in rank1["calls"]] == [False]
    assert rank1["calls"][0]["start"] >= rank0["calls"][0]["end"] - 0.05  # monotonic clocks of one machine
    assert rank0["train_samples"] == rank1["train_samples"] == 256
    # Two nodes: the other node's first rank fetches too (finding a shared root complete),
    # only after global rank 0 has finished.
    rank0, rank1 = found["two_nodes"]
    assert [c["download"] for c in rank0["calls"]] == [True] and [c["download"] for c in rank1["calls"]] == [True]
    assert rank1["calls"][0]["start"] >= rank0["calls"][0]["end"] - 0.05
    # A node that cannot fetch: every rank gets the same one line, nobody waits forever.
    errors = {rank["error"] for rank in found["two_nodes_bad"]}
    assert len(errors) == 1 and "rank 1 (its node's first rank) could not get the data" in errors.pop()


@pytest.mark.unit
def test_digits_are_read_as_scikit_learn_reads_them():
    from sklearn.datasets import load_digits

    from dist_train.data.datasets import digits_arrays

    pixels, targets = digits_arrays()
    bunch = load_digits()
    assert pixels.shape == (1797, 8, 8) and np.array_equal(pixels, bunch.images)
    assert np.array_equal(targets, bunch.target)
