"""Optimizer parameter groups and LR schedules."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from dist_train.config import OptimConfig, ScheduleConfig
from dist_train.optim import build_optimizer, build_scheduler, lr_multiplier, param_groups

pytestmark = pytest.mark.unit


def _model():
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2), nn.LayerNorm(2))


def test_weight_decay_skips_biases_and_norm_weights():
    model = _model()
    decay, no_decay = param_groups(model, 0.1)
    named = dict(model.named_parameters())
    assert {id(p) for p in decay["params"]} == {id(named["0.weight"]), id(named["3.weight"])}
    assert len(no_decay["params"]) == len(named) - 2 and no_decay["weight_decay"] == 0.0
    assert decay["weight_decay"] == 0.1


@pytest.mark.parametrize(
    "name, cls", [("sgd", torch.optim.SGD), ("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW)]
)
def test_build_optimizer(name, cls):
    opt = build_optimizer(OptimConfig(name=name, lr=0.01, weight_decay=0.05, nesterov=name == "sgd"), _model())
    assert type(opt) is cls and opt.param_groups[0]["lr"] == 0.01
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]


def test_warmup_then_cosine_to_min_ratio():
    cfg = ScheduleConfig(name="cosine", warmup_steps=10, min_lr_ratio=0.1)
    assert lr_multiplier(cfg, 0, 110) == pytest.approx(0.1)
    assert lr_multiplier(cfg, 9, 110) == pytest.approx(1.0)
    assert lr_multiplier(cfg, 10, 110) == pytest.approx(1.0)
    assert lr_multiplier(cfg, 60, 110) == pytest.approx(0.55)
    assert lr_multiplier(cfg, 110, 110) == pytest.approx(0.1)


def test_step_and_constant_schedules():
    step = ScheduleConfig(name="step", warmup_steps=0, step_size=5, gamma=0.5)
    assert [lr_multiplier(step, s, 100) for s in (0, 4, 5, 10)] == [1.0, 1.0, 0.5, 0.25]
    assert lr_multiplier(ScheduleConfig(name="constant", warmup_steps=4), 1, 100) == pytest.approx(0.5)


def test_onecycle_peaks_at_the_configured_lr():
    opt = build_optimizer(OptimConfig(name="sgd", lr=0.4), _model())
    sched = build_scheduler(ScheduleConfig(name="onecycle", warmup_steps=5), opt, 20)
    lrs = []
    for _ in range(20):
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert max(lrs) == pytest.approx(0.4, rel=1e-3) and lrs.index(max(lrs)) == 3  # peak once warmup ends
    assert lrs[-1] < 0.4 / 50


@pytest.mark.parametrize("name", ["cosine", "onecycle", "step", "constant"])
def test_scheduler_state_survives_weights_only_load(name):
    cfg = ScheduleConfig(name=name, warmup_steps=3)
    opt = build_optimizer(OptimConfig(), _model())
    sched = build_scheduler(cfg, opt, 50)
    for _ in range(7):
        opt.step()
        sched.step()
    buffer = io.BytesIO()
    torch.save(sched.state_dict(), buffer)
    buffer.seek(0)
    opt2 = build_optimizer(OptimConfig(), _model())
    sched2 = build_scheduler(cfg, opt2, 50)
    sched2.load_state_dict(torch.load(buffer, weights_only=True))
    opt.step(), sched.step(), opt2.step(), sched2.step()
    assert sched2.get_last_lr() == pytest.approx(sched.get_last_lr())


def test_onecycle_warmup_longer_than_the_run_is_a_config_error():
    from dist_train.config import ConfigError

    opt = build_optimizer(OptimConfig(), _model())
    with pytest.raises(ConfigError, match="schedule.warmup_steps=50 must be < the run's 44 steps"):
        build_scheduler(ScheduleConfig(name="onecycle", warmup_steps=50), opt, 44)


def test_fused_steps_where_parameters_live_on_a_gpu_and_the_kernel_runs_on_them():
    from dist_train.config import ParallelConfig
    from dist_train.optim import use_fused

    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    ddp, fsdp = ParallelConfig(strategy="ddp"), ParallelConfig(strategy="fsdp")
    offloaded = ParallelConfig(strategy="fsdp", cpu_offload=True)
    for name in ("sgd", "adam", "adamw"):
        auto, on, off = (OptimConfig(name=name, fused=setting) for setting in ("auto", True, False))
        assert use_fused(auto, ddp, cuda) and not use_fused(auto, ddp, cpu)
        assert not use_fused(auto, offloaded, cuda)  # the step then runs on CPU shards
        assert use_fused(on, ddp, cpu) and not use_fused(off, ddp, cuda)
        # DTensor has a sharding rule for fused Adam and AdamW, none for fused SGD (torch 2.6-2.14).
        assert use_fused(auto, fsdp, cuda) is (name != "sgd")


def test_a_fused_kernel_fsdp_cannot_run_is_refused_in_one_line():
    from dist_train.config import ConfigError, ParallelConfig
    from dist_train.optim import check_fused, fused_runs_on_dtensor

    assert not fused_runs_on_dtensor("sgd") and fused_runs_on_dtensor("adam") and fused_runs_on_dtensor("adamw")
    with pytest.raises(ConfigError, match=r"^optim.fused=true: torch [\d.]+ has no fused sgd kernel for FSDP"):
        check_fused(OptimConfig(name="sgd", fused=True), ParallelConfig(strategy="fsdp"))
    check_fused(OptimConfig(name="sgd", fused=True), ParallelConfig(strategy="ddp"))
    check_fused(OptimConfig(name="sgd", fused="auto"), ParallelConfig(strategy="fsdp"))
    check_fused(OptimConfig(name="adamw", fused=True), ParallelConfig(strategy="fsdp"))


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_a_fused_optimizer_takes_the_same_step(name):
    # CPU has fused kernels too (torch >= 2.4), so the choice is checked for numbers here. Every
    # parameter has a real gradient: Adam's step on a ~0 one (a bias before BatchNorm) is noise.
    steps = []
    for fused in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(9, 4), nn.Tanh(), nn.Linear(4, 2), nn.LayerNorm(2))
        optimizer = build_optimizer(OptimConfig(name=name, lr=0.01, weight_decay=0.1), model, fused=fused)
        assert bool(optimizer.defaults["fused"]) is fused
        for _ in range(3):
            model(torch.randn(4, 9, generator=torch.Generator().manual_seed(1))).square().sum().backward()
            optimizer.step()
            optimizer.zero_grad()
        steps.append([p.detach().clone() for p in model.parameters()])
    for unfused, fused in zip(*steps, strict=True):
        torch.testing.assert_close(fused, unfused, rtol=1e-4, atol=1e-5)  # steps move ~1e-2


def test_a_resumed_run_keeps_its_own_kernel_choice():
    # load_state_dict replaces each group's settings with the saved ones, `fused` included.
    from dist_train.optim import keep_kernel_choice

    model = _model()
    saved = build_optimizer(OptimConfig(name="adamw"), model, fused=False).state_dict()
    resumed = build_optimizer(OptimConfig(name="adamw"), model, fused=True)
    resumed.load_state_dict(saved)
    assert not any(group["fused"] for group in resumed.param_groups)
    keep_kernel_choice(resumed, True)
    assert all(group["fused"] for group in resumed.param_groups)
