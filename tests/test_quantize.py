"""dist-train quantize: int8 with torchao on a briefly trained digits CNN, the loader, the
compression report's numbers, the accuracy-drop gate and the one-line refusals."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_cli, tiny_overrides

import dist_train
from dist_train.distributed import DistEnv
from dist_train.errors import UserError
from dist_train.tools.evaluate import build_parts, eval_config
from dist_train.tools.quantize import PROGRAM, load_quantized, quantize

CPU = DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory) -> Path:
    """The seed CNN on digits, trained 150 steps of 32: about 0.4 accuracy, well above chance."""
    root = tmp_path_factory.mktemp("quant")
    overrides = tiny_overrides(
        root, **{"train.max_steps": 150, "checkpoint.every_steps": 150, "train.log_every": 75, "data.batch_size": 32}
    )
    dist_train.fit(REPO / "configs" / "digits.yaml", [*overrides, "schedule.warmup_steps=10"])
    return root / "runs" / "digits"


def _validation(run: Path) -> tuple[list[torch.Tensor], list[torch.Tensor], int]:
    """The full validation split as the model takes it, read here without the report's code."""
    parts = build_parts(eval_config(run, [], 1), CPU, "val", lambda model: None)
    batches = list(parts.data.val_loader)
    return [parts.to_device(x) for x, _ in batches], [y for _, y in batches], len(parts.data.val_loader.loader.dataset)


def _accuracy(model: torch.nn.Module, inputs: list[torch.Tensor], targets: list[torch.Tensor]) -> float:
    with torch.inference_mode():
        right = sum(int((model(x).argmax(-1) == y).sum()) for x, y in zip(inputs, targets, strict=True))
    return right / sum(len(y) for y in targets)


@pytest.mark.system
@pytest.mark.parametrize("method", ["int8-dynamic", "int8-weight-only", "int8-static"])
def test_quantize_writes_a_loadable_model_and_a_report_with_its_true_numbers(digits_run, tmp_path, method, capsys):
    out, source, config = tmp_path / "q", digits_run, None
    if method == "int8-weight-only":  # from an exported file and the run's config, measured as that file
        source, config = tmp_path / "model.safetensors", digits_run / "config.yaml"
        dist_train.checkpoint.export.export(digits_run, source)
    report = quantize(source, method, out, config=config, timing_runs=3, max_accuracy_drop=0.05)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["compress_report.json", "compress_report.md", PROGRAM, "recipe.json"]
    )
    assert json.loads((out / "recipe.json").read_text())["method"] == method
    original, exported, result = report.rows
    assert exported.accuracy == original.accuracy  # the same fp32 model, as a program
    assert result.file == str(out / PROGRAM) and result.size_bytes == os.path.getsize(out / PROGRAM)
    assert original.size_bytes == (os.path.getsize(source) if config else original.size_bytes) > 0
    assert result.size_ratio == result.size_bytes / original.size_bytes

    inputs, targets, samples = _validation(digits_run)
    assert sum(len(y) for y in targets) == samples == 359  # the whole digits validation split (1,797 x 0.2)
    model = load_quantized(out)
    assert result.accuracy == pytest.approx(_accuracy(model, inputs, targets), abs=1e-6)
    assert result.accuracy > 0.2  # ten classes: chance is 0.1
    assert result.accuracy_change == pytest.approx(result.accuracy - original.accuracy)
    # The loader gives the outputs the report measured: a second load computes the same logits.
    with torch.inference_mode():
        assert torch.equal(model(inputs[0]), load_quantized(out)(inputs[0]))
    # Quantized weights are int8 values: the sparsity counts their exact zeros.
    ints = [t for t in dist_train.tools.compress_report.weight_tensors(model) if t.dtype == torch.int8]
    assert ints, "no int8 weights in the quantized program"
    assert 0 <= result.sparsity < 0.05 and original.sparsity == 0.0
    for b in ("1", "32"):
        assert result.latency_ms[b] > 0 and result.latency_ratio[b] == result.latency_ms[b] / original.latency_ms[b]
    saved = json.loads((out / "compress_report.json").read_text())
    assert saved["rows"][-1]["accuracy"] == result.accuracy and saved["threads"] == torch.get_num_threads()
    table = (out / "compress_report.md").read_text()
    assert method in table and table in capsys.readouterr().out


@pytest.mark.system
def test_a_result_losing_too_much_accuracy_is_flagged_and_written_only_with_force(digits_run, tmp_path, capsys):
    out = tmp_path / "q"
    # A negative allowance flags any result that does not gain accuracy; the original never is.
    with pytest.raises(UserError, match="nothing written"):  # not even the folders --out would be in
        quantize(digits_run, "int8-weight-only", tmp_path / "a" / "b" / "q", timing_runs=1, max_accuracy_drop=-1)
    assert "drop > -1" in capsys.readouterr().out
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == []
    report = quantize(digits_run, "int8-weight-only", out, timing_runs=1, max_accuracy_drop=-1, force=True)
    assert report.rows[0].flagged is False and report.rows[-1].flagged is True
    assert "drop > -1" in (out / "compress_report.md").read_text()


@pytest.mark.system
def test_bad_inputs_are_one_line_and_write_nothing(digits_run, tmp_path):
    import safetensors.torch
    from user_models import conv_only, data_dependent

    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    (tmp_path / "empty_run").mkdir()
    (tmp_path / "empty_run" / "config.yaml").write_text((digits_run / "config.yaml").read_text())
    safetensors.torch.save_model(conv_only(10, (1, 8, 8)), str(tmp_path / "conv.safetensors"))
    (tmp_path / "conv.yaml").write_text(
        (digits_run / "config.yaml").read_text().replace("name: seed_cnn", "name: user_models:conv_only")
    )
    cases = [
        ([str(digits_run), "--method", "int8-dynamic", "--out", str(tmp_path / "full")], "not an empty folder"),
        ([str(tmp_path / "empty_run"), "--method", "int8-dynamic", "--out", str(tmp_path / "o")], "no valid"),
    ]
    safetensors.torch.save_model(data_dependent(10, (1, 8, 8)), str(tmp_path / "branchy.safetensors"))
    (tmp_path / "branchy.yaml").write_text(
        (digits_run / "config.yaml").read_text().replace("name: seed_cnn", "name: user_models:data_dependent")
    )
    before = sorted(p.name for p in tmp_path.iterdir())
    # In this process: user_models is importable here (the CLI's interpreter has no tests/ on its path).
    conv, conv_config = tmp_path / "conv.safetensors", tmp_path / "conv.yaml"
    with pytest.raises(UserError, match=r"^--method int8-dynamic: model.name=user_models:conv_only has no Linear"):
        quantize(conv, "int8-dynamic", tmp_path / "o", config=conv_config)
    with pytest.raises(UserError, match=r"^torch.export cannot trace model.name=user_models:data_dependent: "):
        quantize(tmp_path / "branchy.safetensors", "int8-dynamic", tmp_path / "o", config=tmp_path / "branchy.yaml")
    with pytest.raises(UserError, match=r"conv.safetensors: a safetensors file needs --config"):
        quantize(conv, "int8-dynamic", tmp_path / "o")
    with pytest.raises(UserError, match=r"^--method must be one of int8-dynamic, int8-weight-only, int8-static"):
        quantize(digits_run, "int4", tmp_path / "o")
    with pytest.raises(UserError, match=r"^--timing-runs must be at least 1, got 0$"):
        quantize(digits_run, "int8-dynamic", tmp_path / "o", timing_runs=0)
    for args, message in cases:
        done = run_cli("quantize", *args, cwd=tmp_path)
        assert done.returncode == 2, done.stderr
        assert done.stdout == "" and done.stderr.count("\n") == 1 and done.stderr.startswith("error: "), done.stderr
        assert message in done.stderr.splitlines()[-1]
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.unit
def test_int8_static_quantizes_a_residual_block_that_calls_one_relu_twice():
    """torchvision's ResNet blocks call one nn.ReLU twice; PT2E grouped both calls into one
    partition, which X86InductorQuantizer refused. Now every convolution gets int8 weights, kept
    without their fp32 originals, and the program's outputs stay near the fp32 model's."""
    from user_models import residual_convnet

    from dist_train.tools.quantize import _program

    torch.manual_seed(0)
    model = residual_convnet(10, (3, 8, 8)).eval()
    example = torch.randn(4, 3, 8, 8)
    calibration = [torch.randn(16, 3, 8, 8) for _ in range(4)]
    program = _program(model, "int8-static", example, calibration)
    # Every convolution's weight is stored once, as int8: the fp32 one it was folded from is gone.
    conv_weights = [t for t in program.state_dict.values() if t.dim() == 4]
    assert len(conv_weights) == 3 and all(t.dtype == torch.int8 for t in conv_weights)
    quantized = program.module()
    with torch.no_grad():
        want, got = model(example), quantized(example)
    assert (got - want).abs().max() < 0.05 * want.abs().max()


@pytest.mark.unit
def test_the_cli_offers_the_methods_quantize_knows():
    from dist_train.commands import quantize as command
    from dist_train.tools import quantize as tool

    assert command.METHODS == tool.METHODS
