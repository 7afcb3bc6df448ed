"""Run under torchrun with 2 processes: what the strategies do with a real process group
(gloo, CPU), measured inside the workers; rank 0 writes the findings as JSON for
tests/test_parallel.py to check.

    python -m torch.distributed.run --nproc-per-node 2 tests/parallel_worker.py OUT.json
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dist_train.config import ModelConfig, OptimConfig, ParallelConfig
from dist_train.data import DataSpec
from dist_train.distributed import DistEnv, all_gather_objects, process_group
from dist_train.gpt import GPT
from dist_train.models import build_model
from dist_train.optim import build_optimizer
from dist_train.parallel import build_strategy


def fsdp_all_gathers_per_micro_batch(env: DistEnv) -> dict:
    """FSDP2's all-gathers in each of 2 micro-batches of 2 steps, counted at FSDP's own call."""
    # FSDP2's internals: where its parameter groups start an all-gather (torch 2.6 to 2.14).
    import torch.distributed.fsdp._fully_shard._fsdp_param_group as param_group

    torch.manual_seed(0)
    strategy = build_strategy(ParallelConfig(strategy="fsdp"), env)
    model = strategy.wrap(GPT(vocab_size=64, context=16, n_layer=2, n_head=2, width=32))
    calls, gather = [0], param_group.foreach_all_gather

    def counted(*args, **kwargs):
        calls[0] += 1
        return gather(*args, **kwargs)

    param_group.foreach_all_gather = counted
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(env.rank))
    per_micro_batch = []
    for _ in range(2):
        for micro in range(2):
            before = calls[0]
            with strategy.gradient_sync(model, enabled=micro == 1):
                model(tokens).float().logsumexp(-1).mean().backward()
            per_micro_batch.append(calls[0] - before)
    param_group.foreach_all_gather = gather
    root_resharded = model._get_fsdp_state()._fsdp_param_group.post_forward_mesh_info is not None
    blocks_resharded = [b._get_fsdp_state()._fsdp_param_group.post_forward_mesh_info is not None for b in model.blocks]
    return {"per_micro_batch": per_micro_batch, "root_resharded": root_resharded, "blocks_resharded": blocks_resharded}


def fsdp_bf16_batchnorm(env: DistEnv) -> dict:
    """A ResNet under FSDP in bf16 against the same ResNet under bf16 autocast, same batch on
    both ranks (so the sharded run's mean gradient is the single model's)."""
    spec, inputs = DataSpec((3, 8, 8), 10), torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    targets = torch.arange(8) % 10

    def train(sharded: bool) -> tuple[list[float], dict[str, str]]:
        torch.manual_seed(0)
        model = build_model(ModelConfig(name="resnet18"), spec)
        dtypes: dict[str, str] = {}

        def record_weight_dtype(module: nn.Module, args: tuple) -> None:
            dtypes.setdefault(type(module).__name__, str(module.weight.dtype))  # the weight it computes with

        model.conv1.register_forward_pre_hook(record_weight_dtype)
        model.bn1.register_forward_pre_hook(record_weight_dtype)
        if sharded:
            model = build_strategy(ParallelConfig(strategy="fsdp"), env, "bf16").wrap(model)
        optimizer = build_optimizer(OptimConfig(name="sgd", lr=0.05), model)
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=not sharded)
        losses = []
        for _ in range(4):
            with autocast:
                loss = F.cross_entropy(model(inputs).float(), targets)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        return losses, dtypes

    (sharded, sharded_dtypes), (autocast, _) = train(sharded=True), train(sharded=False)
    return {"fsdp_losses": sharded, "autocast_losses": autocast, "fsdp_weight_dtypes": sharded_dtypes}


def ddp_gradients(env: DistEnv) -> dict:
    """Two DDP steps with the strategy's zero_grad, each rank on its own batch; the second
    step's gradients against the mean of both ranks' gradients computed without DDP."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    strategy = build_strategy(ParallelConfig(strategy="ddp"), env)
    ddp = strategy.wrap(model)
    optimizer = build_optimizer(OptimConfig(name="sgd", lr=0.1, momentum=0.0), ddp)

    def batch(step: int, rank: int) -> torch.Tensor:
        return torch.randn(6, 4, generator=torch.Generator().manual_seed(10 * step + rank))

    zeroed, gradients, expected = [], [], []
    for step in range(2):
        reference = copy.deepcopy(model)
        for rank in range(env.world_size):
            (reference(batch(step, rank)).square().mean() / env.world_size).backward()
        expected.append([p.grad for p in reference.parameters()])
        ddp(batch(step, env.rank)).square().mean().backward()
        gradients.append([p.grad.clone() for p in model.parameters()])
        optimizer.step()
        strategy.zero_grad(optimizer)
        zeroed.append([None if p.grad is None else p.grad.abs().max().item() for p in model.parameters()])
    pairs = [pair for step in range(2) for pair in zip(gradients[step], expected[step], strict=True)]
    errors = [(got - want).abs().max().item() for got, want in pairs]
    return {"grads_after_zero_grad": zeroed, "max_gradient_error": max(errors), "is_ddp": type(ddp).__name__}


def find_batch_frees_its_trials(env: DistEnv) -> dict:
    """Which trial objects (the wrapped model, the module, the optimizer) are still alive when
    the batch-size search returns under DDP and FSDP, whose wrappers sit in reference cycles:
    nothing here calls gc.collect."""
    import weakref

    import dist_train.train.assembly as assembly
    import dist_train.train.batch_search as batch_finder
    from dist_train.config import load_config

    build_trial, alive = assembly.build_trainable, {}
    os.environ[batch_finder.OOM_ABOVE_ENV] = "20"  # a short search, with failed trials
    for strategy_name in ("ddp", "fsdp"):
        trial_objects: list[weakref.ref] = []

        def watched(cfg, env, strategy, *args, trial_objects=trial_objects, **kwargs):
            trainable = build_trial(cfg, env, strategy, *args, **kwargs)
            held = (trainable.model, strategy.unwrap(trainable.model), trainable.optimizer)
            trial_objects.extend(weakref.ref(o) for o in held)
            return trainable

        assembly.build_trainable = watched  # what assemble() builds the trials' model with
        cfg = load_config(Path(__file__).parents[1] / "configs" / "digits.yaml", [f"parallel.strategy={strategy_name}"])
        strategy = build_strategy(cfg.parallel, env)
        found = batch_finder.search(cfg, env, strategy)
        alive[strategy_name] = {"micro_batch": found.micro_batch, "alive": [ref() is not None for ref in trial_objects]}
    assembly.build_trainable = build_trial
    del os.environ[batch_finder.OOM_ABOVE_ENV]
    return alive


def main(out: Path) -> None:
    with process_group() as env:
        findings = {
            "fsdp_gathers": fsdp_all_gathers_per_micro_batch(env),
            "fsdp_bf16_batchnorm": fsdp_bf16_batchnorm(env),
            "ddp": all_gather_objects(ddp_gradients(env)),
            "find_batch": find_batch_frees_its_trials(env),
        }
        if env.is_main:
            out.write_text(json.dumps(findings))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
