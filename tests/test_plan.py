"""The plan (plan.py): what a run derives from its config, decided once; the config stays what
the user wrote, in config.yaml and in every checkpoint, and the plan is recorded beside it."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from conftest import REPO, tiny_overrides

from dist_train import checkpoint
from dist_train.config import load_config, to_dict
from dist_train.data import Batch
from dist_train.data.loader import load_datasets
from dist_train.distributed import DistEnv
from dist_train.parallel import SingleProcess
from dist_train.train.assembly import UserParts
from dist_train.train.plan import make_plan
from dist_train.train.trainer import train

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: the models are tiny


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    monkeypatch.chdir(REPO)


def _plan(cfg, world: int = 1):
    env = DistEnv(rank=0, local_rank=0, world_size=world, device=torch.device("cpu"))
    return make_plan(cfg, env, SingleProcess(), load_datasets(cfg.data, env), UserParts())


@pytest.mark.unit
def test_the_plan_derives_batch_steps_and_the_end_once(tmp_path):
    # digits: 1,438 training samples. train.global_batch=64 over 2 ranks of 16: 2 accumulation steps.
    overrides = {"train.global_batch": 64, "train.max_epochs": 3, "train.max_steps": None, "train.stop_at_step": 50}
    cfg = load_config("configs/digits.yaml", tiny_overrides(tmp_path, **overrides))
    plan = _plan(cfg, world=2)
    assert plan.batch == Batch(world_size=2, micro=16, accum=2) and plan.batch.global_batch == 64
    assert plan.steps_per_epoch == 1438 // 64 and plan.last_step == 3 * (1438 // 64)
    assert (plan.start_step, plan.end_step, plan.resume) == (0, 50, None)
    assert cfg.train.grad_accum_steps == 1 and cfg.data.batch_size == 16  # the config untouched
    with pytest.raises(AttributeError):
        plan.batch.accum = 3  # frozen as well


@pytest.mark.system
def test_a_run_records_the_config_as_written_and_the_plan_as_it_ran(tmp_path):
    cfg = load_config("configs/digits.yaml", tiny_overrides(tmp_path, **{"train.global_batch": 32}))
    result = train(cfg)
    run_dir = cfg.run_dir
    assert yaml.safe_load((run_dir / "config.yaml").read_text()) == to_dict(cfg)  # grad_accum_steps stays 1
    plan = json.loads((run_dir / "plan.json").read_text())
    assert plan == {
        "world_size": 1, "micro_batch": 16, "grad_accum_steps": 2, "global_batch": 32, "steps_per_epoch": 1438 // 32,
        "last_step": 6, "start_step": 0, "end_step": 6, "resume_from": None, "device": "cpu", "strategy": "none",
    }  # fmt: skip
    state = checkpoint.load_train_state(result.checkpoint)
    assert state["config"] == to_dict(cfg)
    # The checkpoint holds the run's part of the plan, which a resumed run writes alike.
    of_the_run = ("world_size", "micro_batch", "grad_accum_steps", "global_batch", "steps_per_epoch", "last_step")
    assert state["plan"] == {key: plan[key] for key in of_the_run}

    # Resumed with more steps: the plan starts at the checkpoint and says where it came from.
    more = load_config(
        "configs/digits.yaml", tiny_overrides(tmp_path, **{"train.global_batch": 32, "train.max_steps": 9})
    )
    train(more)
    resumed = json.loads((run_dir / "plan.json").read_text())
    assert resumed["start_step"] == 6 and resumed["last_step"] == 9
    assert resumed["resume_from"] == str(result.checkpoint)
