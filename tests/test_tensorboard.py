"""logging.tensorboard: the event stream, read back with TensorBoard's own reader, holds every
scalar of metrics.jsonl at the same steps, each step once after a crash and resume, and the run's
hyperparameters with its real final validation metrics; under 2 ranks, one stream."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO, cli_env, metrics_records, run_cli, tiny_overrides
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader
from tensorboard.compat.proto import event_pb2
from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2

import dist_train
from dist_train.logger import tensorboard_tag

DIGITS = str(REPO / "configs" / "digits.yaml")
JOB = {
    "train.max_steps": 16,
    "train.eval_every": 4,
    "checkpoint.every_steps": 4,
    "logging.tensorboard": "true",
    "parallel.strategy": "none",
}


@dataclass
class Resumed:
    run_dir: Path
    eval_metrics: dict[str, float]  # what dist_train.fit returned at the end

    @property
    def log_dir(self) -> Path:
        return self.run_dir / "tensorboard"


@pytest.fixture(scope="module")
def resumed(tmp_path_factory) -> Resumed:
    root = tmp_path_factory.mktemp("tensorboard")
    overrides = tiny_overrides(root, **JOB)
    dist_train.fit(DIGITS, [*overrides, "train.stop_at_step=14"])
    run_dir = root / "runs" / "digits"
    # A crash after step 14 was logged but before its checkpoint was complete: the resume starts
    # from step 12 and trains (and logs) 13 and 14 again.
    shutil.rmtree(run_dir / "checkpoints" / "step_00000014")
    result = dist_train.fit(DIGITS, overrides)
    return Resumed(run_dir, result.eval_metrics)


def _accumulator(log_dir: Path) -> EventAccumulator:
    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})  # 0: keep all
    accumulator.Reload()
    return accumulator


def _tensorboard_scalars(accumulator: EventAccumulator) -> dict[str, list[tuple[int, float, float]]]:
    return {
        tag: [(e.step, e.value, e.wall_time) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]
    }


def _jsonl_scalars(run_dir: Path) -> dict[str, list[tuple[int, float, float]]]:
    """metrics.jsonl as TensorBoard should show it: (step, value, wall time) per tag."""
    scalars: dict[str, list[tuple[int, float, float]]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        for key, value in record.items():
            if key not in ("step", "time"):
                scalars.setdefault(tensorboard_tag(key), []).append((record["step"], value, record["time"]))
    return scalars


def _raw_events(log_dir: Path) -> list[list[event_pb2.Event]]:
    """Every event as written, one list per event file in the order TensorBoard reads them."""
    return [list(LegacyEventFileLoader(str(path)).Load()) for path in sorted(log_dir.glob("events.out.tfevents.*"))]


def _assert_same_scalars(log_dir: Path, run_dir: Path) -> dict[str, list[tuple[int, float, float]]]:
    shown, logged = _tensorboard_scalars(_accumulator(log_dir)), _jsonl_scalars(run_dir)
    assert sorted(shown) == sorted(logged)
    for tag, points in logged.items():
        assert [step for step, _, _ in shown[tag]] == [step for step, _, _ in points], tag
        for (_, value, wall_time), (step, expected, expected_time) in zip(shown[tag], points, strict=True):
            # Event files hold float32 scalars: equal up to float32 rounding.
            assert value == pytest.approx(expected, rel=1e-6, abs=1e-30), (tag, step)
            assert wall_time == pytest.approx(expected_time, abs=1e-3), (tag, step)
    return shown


@pytest.mark.unit
def test_the_sections_group_every_key_the_logger_writes():
    sections = {
        "loss": "loss/train",
        "val_loss": "loss/val",
        "lr": "lr",
        "val_acc": "val/acc",
        "val_mae": "val/mae",
        "samples_per_s": "throughput/samples_per_s",
        "tokens_per_s": "throughput/tokens_per_s",
        "mfu": "throughput/mfu",
        "step_time": "throughput/step_time",
        "data_wait_fraction": "throughput/data_wait_fraction",
        "param_optim_mb": "memory/param_optim_mb",
        "max_memory_gb": "memory/max_memory_gb",
        "max_reserved_gb": "memory/max_reserved_gb",
        "alloc_retries": "memory/alloc_retries",
        "grad_norm": "train/grad_norm",
        "epoch": "train/epoch",
        "skipped_steps": "train/skipped_steps",
        "bad_samples": "train/bad_samples",
        "checkpoint_stall_s": "train/checkpoint_stall_s",
    }
    assert {key: tensorboard_tag(key) for key in sections} == sections


@pytest.mark.system
def test_every_scalar_of_metrics_jsonl_is_in_tensorboard_at_its_step(resumed):
    shown = _assert_same_scalars(resumed.log_dir, resumed.run_dir)
    assert {"loss/train", "loss/val", "lr", "val/acc", "throughput/samples_per_s", "memory/param_optim_mb"} <= set(
        shown
    )
    assert [step for step, _, _ in shown["loss/train"]] == list(range(2, 17, 2))
    assert [step for step, _, _ in shown["loss/val"]] == [4, 8, 12, 16]


@pytest.mark.system
def test_a_resume_after_a_crash_shows_each_step_once(resumed):
    first, second = _raw_events(resumed.log_dir)  # one event file per invocation
    written_first = [e.step for e in first for v in e.summary.value if v.tag == "loss/train"]
    assert written_first == [2, 4, 6, 8, 10, 12, 14]  # 14 was logged before the "crash"
    starts = [e.step for e in second if e.session_log.status == event_pb2.SessionLog.START]
    assert starts == [13]  # the resumed invocation purges from its first step on
    written_second = [e.step for e in second for v in e.summary.value if v.tag == "loss/train"]
    assert written_second == [14, 16]

    shown = _tensorboard_scalars(_accumulator(resumed.log_dir))
    for tag, points in shown.items():
        steps = [step for step, _, _ in points]
        assert steps == sorted(set(steps)), tag
    # What the reader shows at step 14 is what the resumed invocation wrote (and metrics.jsonl kept).
    resumed_14 = next(v.simple_value for e in second for v in e.summary.value if v.tag == "loss/train")
    assert [value for step, value, _ in shown["loss/train"] if step == 14] == [resumed_14]


@pytest.mark.system
def test_the_hparams_carry_the_config_and_the_real_final_validation_metrics(resumed):
    accumulator = _accumulator(resumed.log_dir)
    content = {
        tag: plugin_data_pb2.HParamsPluginData.FromString(data)
        for tag, data in accumulator.PluginTagToContent("hparams").items()
    }
    hparams = dict(content["_hparams_/session_start_info"].session_start_info.hparams)
    assert hparams["optim.lr"].number_value == pytest.approx(0.05)  # configs/digits.yaml
    assert hparams["optim.name"].string_value == "sgd"
    assert hparams["data.batch_size"].number_value == 16
    assert hparams["train.max_steps"].number_value == 16
    assert hparams["data.augment"].string_value == "true"  # a bool, as the config writes it
    assert hparams["world_size"].number_value == 1 and hparams["global_batch"].number_value == 16
    assert hparams["micro_batch"].number_value == 16 and hparams["grad_accum_steps"].number_value == 1  # the plan's
    assert not {"train.stop_at_step", "logging.tensorboard", "run.output_dir"} & set(hparams)
    assert content["_hparams_/session_end_info"].session_end_info.status == api_pb2.STATUS_SUCCESS

    metric_tags = {m.name.tag for m in content["_hparams_/experiment"].experiment.metric_infos}
    # The HParams table shows a metric as the last point of the tag it names: the final validation.
    records = metrics_records(resumed.run_dir)
    final_val = [r for r in records if "val_loss" in r][-1]
    assert final_val["step"] == 16
    validation_keys = [key for key in final_val if key.startswith("val_")]
    assert {"val_loss", "val_acc", "val_f1"} <= set(validation_keys)  # the digits task's defaults
    assert metric_tags == {tensorboard_tag(key) for key in validation_keys}
    for key in validation_keys:
        last = accumulator.Scalars(tensorboard_tag(key))[-1]
        assert (last.step, last.value) == (16, pytest.approx(final_val[key], rel=1e-6))
        assert last.value == pytest.approx(resumed.eval_metrics[key], rel=1e-6)
    assert final_val["val_loss"] > 0

    # Written once, when the run trained its last step: not by the invocation that stopped at 14.
    first, second = _raw_events(resumed.log_dir)
    hparams_steps = [
        [e.step for e in events for v in e.summary.value if v.tag == "_hparams_/session_start_info"]
        for events in (first, second)
    ]
    assert hparams_steps == [[], [16]]


@pytest.mark.system
def test_tensorboard_and_matplotlib_are_imported_only_when_used():
    # The GPU machines may have neither package: training and the CLI must not need them.
    code = (
        "import sys; import dist_train.cli, dist_train.train.trainer, dist_train.tools.report; "
        "from dist_train.config import load_config; "
        "assert load_config('configs/digits.yaml').logging.tensorboard is False; "
        "loaded = [m for m in sys.modules if m.split('.')[0] in ('tensorboard', 'matplotlib')]; "
        "loaded += [m for m in sys.modules if m.startswith('torch.utils.tensorboard')]; "
        "print(loaded); sys.exit(1 if loaded else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=cli_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.system
def test_two_ranks_write_one_event_stream_from_rank_0(tmp_path):
    job = {**JOB, "parallel.strategy": "ddp", "train.max_steps": 8, "checkpoint.every_steps": 0}
    proc = run_cli("launch", DIGITS, "--nproc-per-node", "2", *tiny_overrides(tmp_path, **job), cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_dir = tmp_path / "runs" / "digits"
    files = list((run_dir / "tensorboard").iterdir())
    assert len(files) == 1 and files[0].name.startswith("events.out.tfevents."), files
    _assert_same_scalars(run_dir / "tensorboard", run_dir)
    content = _accumulator(run_dir / "tensorboard").PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert hparams["world_size"].number_value == 2 and hparams["global_batch"].number_value == 32
