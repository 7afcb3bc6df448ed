"""Components hooked into the loop: early stopping, users' callbacks (config and dist_train.fit),
their checkpointed state across a resume, and agreement between ranks."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import REPO, final_model, logged, run_cli, tiny_overrides

from dist_train import checkpoint
from dist_train.components.early_stop import EarlyStopping
from dist_train.config import ConfigError, EarlyStopConfig, load_config
from dist_train.train.trainer import train


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    monkeypatch.chdir(REPO)


def _train(tmp_path, name="digits", **overrides):
    cfg = load_config("configs/digits.yaml", tiny_overrides(tmp_path, **{"run.name": name, **overrides}))
    return train(cfg)


def _hooks(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


# --------------------------------------------------------------------------- early stopping


@pytest.mark.unit
def test_early_stopping_counts_evaluations_without_improvement():
    stop = EarlyStopping(EarlyStopConfig(metric="val_loss", mode="min", patience=2, min_delta=0.1))
    for step, value in [(1, 1.0), (2, 0.95), (3, 0.85), (4, 0.8)]:
        stop.after_eval(None, step, {"val_loss": value})
    # 0.95 is not 0.1 below 1.0; 0.85 is; 0.8 is not 0.1 below 0.85.
    assert (stop.best, stop.best_step, stop.evals_without_improvement) == (0.85, 3, 1)
    assert stop.stop_reason() is None
    stop.after_eval(None, 5, {"val_loss": math.nan})  # never an improvement
    assert stop.stopped_at == 5 and "early stop at step 5: val_loss" in stop.stop_reason()

    resumed = EarlyStopping(stop.cfg)
    resumed.load_state_dict(stop.state_dict())
    assert resumed.state_dict() == stop.state_dict()

    higher = EarlyStopping(EarlyStopConfig(metric="val_acc", mode="max", patience=1))
    higher.after_eval(None, 1, {"val_acc": 0.5})
    higher.after_eval(None, 2, {"val_acc": 0.6})
    assert higher.stopped_at is None
    higher.after_eval(None, 3, {"val_acc": 0.6})  # equal is not better
    assert higher.stopped_at == 3


@pytest.mark.unit
def test_an_unknown_metric_is_named_at_the_first_evaluation():
    stop = EarlyStopping(EarlyStopConfig(metric="val_f1"))
    with pytest.raises(Exception, match=r"train.early_stop.metric=val_f1 is not among .*val_loss, val_acc"):
        stop.after_eval(None, 1, {"val_loss": 1.0, "val_acc": 0.5})


@pytest.mark.unit
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.early_stop.metric=val_los", "train.early_stop.metric must be one of val_loss, val_acc"),
        ("train.early_stop.patience=0", "train.early_stop.patience must be >= 1, got 0"),
        ("train.early_stop.min_delta=-1", "train.early_stop.min_delta must be >= 0"),
        ("callbacks=[{kwargs: 1}]", "callbacks[0].target must name a class as 'package.module:Class'; got None"),
        ("callbacks=[{target: nodots}]", "callbacks[0].target must name a class"),
    ],
)
def test_component_settings_are_checked_naming_the_key(override, message):
    with pytest.raises(ConfigError) as caught:
        load_config("configs/digits.yaml", ["train.early_stop.metric=val_loss", override])
    assert message in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.system
def test_early_stop_saves_ends_and_a_rerun_trains_nothing_more(tmp_path):
    # min_delta 100: nothing improves on the first evaluation (step 2), so steps 4 and 6 use the patience.
    stop = {"train.early_stop.metric": "val_loss", "train.early_stop.patience": 2, "train.early_stop.min_delta": 100}
    common = {"train.max_steps": 40, "train.eval_every": 2, "checkpoint.every_steps": 0, **stop}
    result = _train(tmp_path, **common)
    assert result.step == 6 and result.checkpoint.name == "step_00000006"
    assert result.early_stop.startswith("early stop at step 6: val_loss did not improve")
    assert checkpoint.load_train_state(result.checkpoint)["components"]["early_stop"]["stopped_at"] == 6

    again = _train(tmp_path, **common)  # resume: auto finds the stopped run
    assert again.step == 6 and again.checkpoint is None
    assert [c.name for c in checkpoint.list_checkpoints(tmp_path / "runs" / "digits" / "checkpoints")] == [
        "step_00000006"
    ]


@pytest.mark.system
def test_resume_mid_patience_with_every_component_on_is_bitwise(tmp_path):
    """Early stop (evaluations at 3, 6, 9, 12: the first is the best, the run stops at 12),
    the best 2 checkpoints by val_loss kept beside the newest, gradual pruning and a stateful
    user callback all on; interrupted at step 7, one evaluation into the patience, and resumed:
    the same stop step, the same weights bit for bit, the same checkpoints kept, and the
    callback's count continues."""
    common = {
        "train.max_steps": 30,
        "train.eval_every": 3,
        "checkpoint.every_steps": 3,
        "checkpoint.keep_last": 1,
        "checkpoint.keep_best.metric": "val_loss",
        "checkpoint.keep_best.k": 2,
        "train.early_stop.metric": "val_loss",
        "train.early_stop.patience": 3,
        "train.early_stop.min_delta": 100,
        "prune.sparsity": 0.5,
        "prune.schedule": "gradual",
        "prune.end_step": 10,
        "train.ema.decay": 0.8,
    }

    def run(name, **extra):
        hook_file = tmp_path / f"{name}.jsonl"
        callbacks = f'[{{target: "tests.user_callbacks:HookLog", path: "{hook_file}"}}]'
        return _train(tmp_path, name, callbacks=callbacks, **common, **extra), hook_file

    straight, straight_hooks = run("straight")
    first, split_hooks = run("split", **{"train.stop_at_step": 7})
    assert first.step == 7 and first.early_stop is None
    state = checkpoint.load_train_state(first.checkpoint)["components"]
    assert state["early_stop"]["evals_without_improvement"] == 1
    assert state["callbacks[0]:tests.user_callbacks:HookLog"] == {"steps_seen": 7}
    resumed, _ = run("split")

    assert straight.step == resumed.step == 12 and straight.early_stop == resumed.early_stop
    a, b = final_model(tmp_path, "straight"), final_model(tmp_path, "split")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ema_a, ema_b = (checkpoint.read_full_state(r.checkpoint, "ema") for r in (straight, resumed))
    assert ema_a.keys() == ema_b.keys() and all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)
    assert not all(torch.equal(ema_a[k], a[k]) for k in ema_a)  # an average, not the weights
    assert straight.eval_metrics == resumed.eval_metrics
    assert 0.45 < sum(int((t == 0).sum()) for t in a.values()) / sum(t.numel() for t in a.values())
    ends = [r for r in _hooks(split_hooks) if r["hook"] in ("on_start", "at_end")]
    assert ends == [
        {"hook": "on_start", "steps_seen": 0},
        {"hook": "at_end", "step": 7, "steps_seen": 7},
        {"hook": "on_start", "steps_seen": 7},
        {"hook": "at_end", "step": 12, "steps_seen": 12},
    ]
    assert _hooks(straight_hooks)[-1] == {"hook": "at_end", "step": 12, "steps_seen": 12}

    val_loss = logged(tmp_path / "runs" / "straight", "val_loss")
    best_two = sorted(val_loss, key=lambda step: (val_loss[step], step))[:2]
    for name in ("straight", "split"):
        kept = checkpoint.list_checkpoints(tmp_path / "runs" / name / "checkpoints")
        assert {checkpoint.step_of(c) for c in kept} == {12, *best_two}, name


# --------------------------------------------------------------------------- EMA


class _Tied(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(5, 3)
        self.head = torch.nn.Linear(3, 5, bias=False)
        self.head.weight = self.embed.weight  # tied, as GPT's embedding and head


@pytest.mark.unit
def test_ema_averages_each_parameter_once_with_its_warmup():
    from types import SimpleNamespace

    from dist_train.components.ema import EMA
    from dist_train.config import EmaConfig

    torch.manual_seed(0)
    model = _Tied()
    ema = EMA(EmaConfig(decay=0.9, warmup=True), model)
    assert set(ema.tensors()) == {"embed.weight", "head.weight"}  # both names of the tied weight
    assert ema.tensors()["embed.weight"] is ema.tensors()["head.weight"]
    ema.on_start(None)
    expected = model.embed.weight.detach().clone()
    for n in range(30):
        with torch.no_grad():
            model.embed.weight.add_(torch.randn(5, 3))
        ema.after_step(None, n + 1)
        decay = min(0.9, (1 + n) / (10 + n))  # warm-up: 0.1, 0.18, ... until 0.9
        expected = decay * expected + (1 - decay) * model.embed.weight.detach()
    torch.testing.assert_close(ema.tensors()["embed.weight"], expected, rtol=1e-6, atol=1e-6)

    raw = model.embed.weight.detach().clone()
    with ema.eval_weights(SimpleNamespace()):
        assert torch.equal(model.head.weight, ema.tensors()["head.weight"])
    assert torch.equal(model.embed.weight, raw)  # training continues from its own weights

    resumed = EMA(ema.cfg, _Tied())
    resumed.load_state_dict(ema.state_dict())
    resumed.on_start(None)  # restored: the average is not reset to the weights
    assert resumed.updates == 30 and resumed.decay() == 31 / 40  # (1 + n) / (10 + n), still below 0.9


@pytest.mark.system
def test_an_ema_run_is_evaluated_and_exported_as_its_average(tmp_path):
    from safetensors.torch import load_file

    from dist_train.cli import main

    result = _train(tmp_path, **{"train.ema.decay": 0.9, "train.max_steps": 8, "train.eval_every": 8})
    ema = checkpoint.read_full_state(result.checkpoint, "ema")
    out = tmp_path / "model.safetensors"
    assert main(["export", str(tmp_path / "runs" / "digits"), "--out", str(out)]) == 0
    exported = load_file(str(out))
    assert ema.keys() <= exported.keys() and all(torch.equal(exported[k], ema[k]) for k in ema)
    # dist-train eval reads the same average: its metrics are the run's own last evaluation.
    proc = run_cli("eval", str(tmp_path / "runs" / "digits"), cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    evaluated = json.loads((tmp_path / "runs" / "digits" / "eval" / "val-step_00000008" / "metrics.json").read_text())
    assert evaluated["metrics"] == result.eval_metrics  # to the last bit: the same weights
    model = checkpoint.read_full_state(result.checkpoint, "model")
    assert not all(torch.equal(model[k], ema[k]) for k in ema)


# --------------------------------------------------------------------------- profiler


@pytest.mark.system
def test_the_profile_covers_its_window_of_steps(tmp_path):
    _train(tmp_path, "window", **{"logging.profile.start_step": 2, "logging.profile.steps": 3})
    out = tmp_path / "runs" / "window" / "profile"
    assert sorted(p.name for p in out.iterdir()) == ["top_ops_rank0.txt", "trace_rank0_steps3-5.json"]
    events = json.loads((out / "trace_rank0_steps3-5.json").read_text())["traceEvents"]
    steps = sorted({e["name"] for e in events if e.get("name", "").startswith("ProfilerStep#")})
    assert len(steps) == 3  # one annotation per optimizer step in the window
    assert any(e.get("name") == "aten::convolution_backward" for e in events)
    assert "aten::" in (out / "top_ops_rank0.txt").read_text()

    # From the first step, on a rank list without this one: nothing; ending inside the window: what it has.
    _train(tmp_path, "other_rank", **{"logging.profile.start_step": 0, "logging.profile.ranks": "[1]"})
    assert not (tmp_path / "runs" / "other_rank" / "profile").exists()
    _train(tmp_path, "cut", **{"logging.profile.start_step": 0, "logging.profile.steps": 50})
    assert (tmp_path / "runs" / "cut" / "profile" / "trace_rank0_steps1-6.json").is_file()


# --------------------------------------------------------------------------- best checkpoints


class _Recorder:
    def __init__(self):
        self.lines, self.keepers = [], []

    def message(self, line):
        self.lines.append(line)

    def keep_also(self, steps):
        self.keepers.append(steps)


@pytest.mark.unit
def test_keep_best_ranks_the_checkpoints_saved_at_evaluations():
    from types import SimpleNamespace

    from dist_train.components.keep_best import KeepBest
    from dist_train.config import KeepBestConfig

    recorder = _Recorder()
    run = SimpleNamespace(logger=recorder, checkpointer=recorder)
    best = KeepBest(KeepBestConfig(metric="val_acc", mode="max", k=2))
    best.on_start(run)
    for step, acc in [(2, 0.5), (4, 0.7), (6, 0.6), (8, 0.7), (10, math.nan)]:
        best.after_eval(run, step, {"val_acc": acc})
        best.before_save(run, step)
    best.before_save(run, 11)  # a stop signal's save: no evaluation of its own, not a candidate
    assert recorder.keepers[0]() == {4, 8}  # 0.7 twice; 0.6 and the NaN are out
    assert recorder.lines[-1] == "best val_acc: step 4 (0.7), step 8 (0.7)"

    resumed = KeepBest(best.cfg)
    resumed.load_state_dict(best.state_dict())
    assert resumed.best_steps() == {4, 8}
    resumed.after_eval(run, 12, {"val_acc": 0.9})
    resumed.before_save(run, 12)
    assert resumed.best_steps() == {12, 4}  # of equals, the earlier stays


@pytest.mark.unit
def test_keep_best_needs_an_evaluation_at_every_checkpoint():
    with pytest.raises(
        ConfigError, match=r"checkpoint.every_steps \(10\) must be a multiple of train.eval_every \(4\)"
    ):
        load_config(
            "configs/digits.yaml",
            ["checkpoint.keep_best.metric=val_loss", "checkpoint.every_steps=10", "train.eval_every=4"],
        )


# --------------------------------------------------------------------------- users' callbacks


@pytest.mark.system
def test_fit_calls_a_callback_object_at_each_hook(tmp_path):
    import dist_train
    from tests.user_callbacks import HookLog

    hook_file = tmp_path / "hooks.jsonl"
    overrides = tiny_overrides(tmp_path, **{"train.max_steps": 6, "train.eval_every": 4, "checkpoint.every_steps": 3})
    dist_train.fit("configs/digits.yaml", overrides, callbacks=[HookLog(str(hook_file), every=2)])
    calls = [(r["hook"], r.get("step")) for r in _hooks(hook_file)]
    assert calls == [
        ("on_start", None),
        ("before_save", 3),
        ("after_eval", 4),
        ("after_eval", 6),
        ("before_save", 6),
        ("at_end", 6),
    ]
    assert logged(tmp_path / "runs" / "digits", "callback_steps_seen") == {2: 2, 4: 4, 6: 6}


@pytest.mark.system
def test_a_failing_callback_is_one_line_naming_it_then_its_own_frames(tmp_path):
    callbacks = '[{target: "tests.user_callbacks:FailsAt", step: 2}]'
    proc = run_cli("train", "configs/digits.yaml", *tiny_overrides(tmp_path, callbacks=callbacks), cwd=REPO)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    head = "error: callbacks[0]:tests.user_callbacks:FailsAt raised in after_step at step 2: ValueError: the user's bug"
    assert lines[0].startswith(head), proc.stderr[-2000:]
    frames = "\n".join(lines[1:])
    assert "user_callbacks.py" in frames and "_users_helper" in frames
    assert "dist_train/" not in frames  # the user's frames, not ours
    assert proc.stderr.count("error:") == 1


@pytest.mark.system
def test_a_callback_class_that_cannot_be_built_is_named(tmp_path):
    callbacks = '[{target: "tests.user_callbacks:FailsAt", stepp: 2}]'
    proc = run_cli("train", "configs/digits.yaml", *tiny_overrides(tmp_path, callbacks=callbacks), cwd=REPO)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: callbacks[0]: tests.user_callbacks:FailsAt(**{'stepp': 2}) failed: TypeError")
    assert not (tmp_path / "runs").exists()  # refused before the run directory was made


@pytest.mark.multiprocess
def test_a_stop_asked_on_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    callbacks = '[{target: "tests.user_callbacks:StopsOnOneRank", rank: 1}]'
    overrides = tiny_overrides(tmp_path, callbacks=callbacks, **{"train.max_steps": 20, "train.eval_every": 4})
    proc = run_cli("launch", "configs/digits.yaml", "--nproc-per-node", "2", *overrides, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "a component on another rank asked the run to stop; checkpoint saved" in proc.stdout + proc.stderr
    checkpoints = checkpoint.list_checkpoints(tmp_path / "runs" / "digits" / "checkpoints")
    assert checkpoints[-1].name == "step_00000004"


@pytest.mark.system
def test_the_callbacks_example_stops_at_its_accuracy_and_stays_stopped(tmp_path):
    import csv
    import subprocess
    import sys

    from conftest import cli_env

    command = [sys.executable, "examples/callbacks.py", f"run.output_dir={tmp_path}", "train.max_steps=600"]
    proc = subprocess.run(command, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "callbacks"
    accuracy = logged(run_dir, "val_acc")
    stopped = next(step for step, value in accuracy.items() if value >= 0.9)  # the first evaluation there
    assert f"val_acc reached 0.9 at step {stopped}; checkpoint saved" in proc.stdout
    assert max(accuracy) == stopped < 600
    norms, running_max = logged(run_dir, "weight_norm"), logged(run_dir, "max_weight_norm")
    assert list(norms) == list(range(10, stopped + 1, 10))
    assert all(running_max[s] == max(v for t, v in norms.items() if t <= s) for s in norms)
    # The tracker's on_log got every record metrics.jsonl got, the callback's own included.
    with open(run_dir / "tracked.csv", newline="") as f:
        tracked = [(int(row["step"]), row["name"], float(row["value"])) for row in csv.DictReader(f)]
    for name in ("loss", "val_acc", "weight_norm"):
        assert [(step, value) for step, key, value in tracked if key == name] == list(logged(run_dir, name).items())

    again = subprocess.run(command, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and f"nothing to do: val_acc reached 0.9 at step {stopped}" in again.stdout


@pytest.mark.multiprocess
def test_ema_under_fsdp_matches_ddp_and_reshards_onto_another_world_size(tmp_path):
    """A tiny GPT (its embedding and head tied) on 2 gloo ranks: FSDP's average, kept shard by
    shard, equals DDP's whole one; saved on 2 ranks and resumed on 1 it continues to the same."""
    from conftest import gpt_runs, launch_gpt

    gpt = {
        "data.dataset": "text", "data.seq_len": 32, "data.batch_size": 4, "model.name": "gpt",
        "model.n_layer": 2, "model.width": 32, "model.n_head": 2, "optim.name": "adamw", "optim.lr": 0.003,
        "train.max_steps": 4, "train.log_every": 1, "train.eval_batches": 2, "checkpoint.every_steps": 0,
        "train.ema.decay": 0.5, "train.ema.warmup": False,
    }  # fmt: skip
    runs = {
        "ddp": {"parallel.strategy": "ddp"},
        "fsdp": {"parallel.strategy": "fsdp"},
        "elastic": {"parallel.strategy": "fsdp", "train.stop_at_step": 2},
    }
    gpt_runs(tmp_path, gpt, 2, runs)  # one launch trains the three, one after another
    proc = launch_gpt(tmp_path, "elastic", gpt, 1, **{"parallel.strategy": "fsdp"})
    assert "written by 2 processes, resumed on 1" in proc.stdout

    def ema(name):
        return checkpoint.read_full_state(checkpoint.latest_valid(tmp_path / "runs" / name / "checkpoints"), "ema")

    ddp, fsdp, elastic = ema("ddp"), ema("fsdp"), ema("elastic")
    assert ddp.keys() == fsdp.keys() == elastic.keys() and "blocks.0.attn.qkv.weight" in fsdp
    for key in ddp:
        torch.testing.assert_close(fsdp[key], ddp[key], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(elastic[key], fsdp[key], rtol=1e-4, atol=1e-5)
    model = final_model(tmp_path, "fsdp")
    assert max((model[k] - fsdp[k]).abs().max() for k in fsdp) > 1e-4  # an average, not the weights


# --------------------------------------------------------------------------- loggers


@pytest.mark.system
def test_mlflow_keeps_one_run_across_a_resume(tmp_path):
    from mlflow.tracking import MlflowClient

    mlflow = {"logging.mlflow.enabled": True, "train.max_steps": 6, "train.log_every": 2, "train.eval_every": 6}
    _train(tmp_path, **mlflow, **{"train.stop_at_step": 3})
    _train(tmp_path, **mlflow)
    client = MlflowClient(tracking_uri=(tmp_path / "runs" / "digits" / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("dist_train")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED" and runs[0].info.run_name == "digits"
    run_id = runs[0].info.run_id
    jsonl = logged(tmp_path / "runs" / "digits", "loss")
    history = {m.step: m.value for m in client.get_metric_history(run_id, "loss")}
    assert history == pytest.approx(jsonl) and sorted(history) == [2, 3, 4, 6]
    cfg = load_config("configs/digits.yaml")
    assert runs[0].data.params["optim.lr"] == str(cfg.optim.lr) and "val_acc" in runs[0].data.metrics
