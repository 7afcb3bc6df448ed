"""`dist-train quantize`: post-training int8 of a run's model with torchao, for CPU inference.

The model and the validation data are rebuilt as `dist-train eval` rebuilds them
(tools/evaluate.py: build_parts), from a run directory or from an exported safetensors file with
the run's config.yaml. Methods:

- int8-dynamic: Linear weights int8, activations quantized per batch at run time
  (torchao.quantization.quantize_ with Int8DynamicActivationInt8WeightConfig);
- int8-weight-only: Linear weights int8, computed in fp32 (Int8WeightOnlyConfig);
- int8-static: convolutions and Linear layers with activation ranges calibrated on training
  batches. quantize_ has no static int8 for convolutions, so this uses PT2E: torch.export, then
  torchao.quantization.pt2e.quantize_pt2e.prepare_pt2e / convert_pt2e with torchao's
  X86InductorQuantizer (torch.ao.quantization's copy of that flow is deprecated in favour of
  torchao's).

Every result is saved the same way, as a torch.export program (model.pt2, batch size dynamic)
beside recipe.json: `load_quantized(DIR)` needs neither the config nor the model's code, and
the report measures the program read back from disk, so its numbers are those of the file.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

from dist_train import checkpoint
from dist_train.checkpoint.export import weights_checkpoint
from dist_train.config import Config, UserError, load_config
from dist_train.tools import compress_report
from dist_train.tools.evaluate import check_out, eval_config

METHODS = ("int8-dynamic", "int8-weight-only", "int8-static")
# The layers each method quantizes; a model with none of them would come back unchanged.
LAYERS: dict[str, tuple[type[nn.Module], ...]] = {
    "int8-dynamic": (nn.Linear,),
    "int8-weight-only": (nn.Linear,),
    "int8-static": (nn.Conv2d, nn.Linear),
}
PROGRAM, RECIPE = "model.pt2", "recipe.json"
MAX_BATCH = 65536  # the exported program's largest batch (torch.export needs a bound)


def quantize(
    source: Path,
    method: str,
    out: Path,
    config: Path | None = None,
    overrides: list[str] = (),
    calibration_batches: int = 8,
    max_accuracy_drop: float = 0.01,
    force: bool = False,
    timing_runs: int = 30,
) -> compress_report.Report:
    """Quantize, measure, and write --out unless the result lost more than max_accuracy_drop
    accuracy (then it raises UserError after printing the table, and writes nothing) or force."""
    if method not in METHODS:
        raise UserError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    if calibration_batches < 1:
        raise UserError(f"--calibration-batches must be at least 1, got {calibration_batches}")
    compress_report.check_options(timing_runs, max_accuracy_drop)
    check_out(out)
    cfg, load, original_file = _source(source, config, list(overrides))
    model, validation, parts = compress_report.cpu_validation(cfg, load)
    if not any(isinstance(m, LAYERS[method]) for m in model.modules()):
        names = " or ".join(t.__name__ for t in LAYERS[method])
        raise UserError(f"--method {method}: model.name={cfg.model.name} has no {names} layer to quantize")
    example = validation.example

    made = [d for d in out.absolute().parents if not d.exists()]  # removed again unless --out is written
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        scratch = staging / "original"  # measured, then removed: --out holds the result alone
        scratch.mkdir()
        if original_file is None:  # a run directory: its weights as `dist-train export` writes them
            from safetensors.torch import save_model

            original_file = scratch / "model.safetensors"
            save_model(model, str(original_file))
        calibration = [parts.to_device(parts.data.train.next_micro_batch()[0]) for _ in range(calibration_batches)]
        try:
            fp32_program = _program(copy.deepcopy(model), None, example, calibration)
            program = _program(copy.deepcopy(model), method, example, calibration)
        except (torch._dynamo.exc.UserError, GuardOnDataDependentSymNode) as exc:  # torch.export's refusals
            # The saved form is a torch.export program: a model it cannot trace (data-dependent
            # control flow) is refused in one line, not a trace.
            first = str(exc).strip().splitlines()[0]
            raise UserError(f"torch.export cannot trace model.name={cfg.model.name}: {first}") from exc
        torch.export.save(fp32_program, str(scratch / PROGRAM))
        torch.export.save(program, str(staging / PROGRAM))
        recipe = {
            "method": method,
            "source": str(source),
            "model": cfg.model.name,
            "input_shape": list(example.shape[1:]),
            "calibration_batches": calibration_batches if method == "int8-static" else 0,
            "torch": torch.__version__,
            "torchao": _torchao_version(),
        }
        (staging / RECIPE).write_text(json.dumps(recipe, indent=1) + "\n")
        # The fp32 model as the same kind of program tells the cost of torch.export's runtime
        # apart from int8's: on a small model the program's overhead dominates both.
        report = compress_report.compare(
            ("original (fp32)", model, original_file),
            [("fp32 torch.export", _load_program(scratch / PROGRAM), scratch / PROGRAM)]
            + [(method, load_quantized(staging), staging / PROGRAM)],
            validation,
            max_accuracy_drop,
            timing_runs,
        )
        # The files as the user finds them: the result under --out, the measured copies gone.
        report.rows[-1].file = str(out / PROGRAM)
        if original_file.is_relative_to(staging):
            report.rows[0].file = "fp32 safetensors export (measured, not kept)"
        report.rows[1].file = "fp32 program (measured, not kept)"
        print(compress_report.table(report), end="")
        if report.rows[-1].flagged and not force:
            lost = -report.rows[-1].accuracy_change
            raise UserError(
                f"{method} loses {lost:.4f} accuracy, more than --max-accuracy-drop {max_accuracy_drop:g}; "
                "nothing written (--force writes it)"
            )
        shutil.rmtree(scratch)
        compress_report.write(report, staging)
        if out.exists():
            out.rmdir()  # check_out: empty
        staging.rename(out)
        print(f"wrote {out}: {', '.join(sorted(p.name for p in out.iterdir()))}")
        return report
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if not out.exists():
            for d in made:  # innermost first
                d.rmdir()


def load_quantized(directory: Path) -> nn.Module:
    """The quantized model written by `quantize`, ready for inference (inputs as the run's
    validation batches reach the model: normalized, on the CPU)."""
    directory = Path(directory)
    if not (directory / RECIPE).is_file() or not (directory / PROGRAM).is_file():
        raise UserError(f"{directory} holds no quantized model ({RECIPE} and {PROGRAM})")
    return _load_program(directory / PROGRAM)


def _load_program(path: Path) -> nn.Module:
    from torchao.quantization.pt2e import allow_exported_model_train_eval

    # An exported module refuses .eval() unless told that train and eval behave alike here:
    # it was exported in eval mode, so dropout and batch norm are already fixed.
    return allow_exported_model_train_eval(torch.export.load(str(path)).module())


def _source(
    source: Path, config: Path | None, overrides: list[str]
) -> tuple[Config, Callable[[nn.Module], None], Path | None]:
    """The config, a function filling the model's weights, and the file holding them (None: a
    checkpoint directory, measured as an fp32 safetensors export)."""
    if source.suffix == ".safetensors":
        if config is None:
            raise UserError(f"{source}: a safetensors file needs --config, the run's config.yaml")
        if not source.is_file():
            raise UserError(f"{source}: no such file")
        if not config.is_file():
            raise UserError(f"--config {config}: no such file")
        cfg = load_config(config, overrides)
        cfg = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, strategy="none"))

        def load(model: nn.Module) -> None:
            from safetensors.torch import load_model

            try:
                load_model(model, str(source))
            except RuntimeError as exc:
                raise UserError(f"{source} does not hold the weights of model.name={cfg.model.name}") from exc

        return cfg, load, source
    if config is not None:
        raise UserError("--config is for a safetensors input; a run directory has its own config.yaml")
    cfg = eval_config(source, overrides, world_size=1)
    found = weights_checkpoint(source)
    return cfg, lambda model: checkpoint.load_model(found, model), None


def _program(
    model: nn.Module, method: str | None, example: torch.Tensor, calibration: list[torch.Tensor]
) -> torch.export.ExportedProgram:
    # The batch dimension stays free, so the program runs at batch 1, 32 and the split's last batch.
    shapes = ({0: torch.export.Dim("batch", min=1, max=MAX_BATCH)},)
    # strict=False, by name: torch.export's default was strict (TorchDynamo tracing) up to 2.7 and
    # non-strict since 2.8, so leaving it out traced differently by torch version.
    if method == "int8-static":
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as x86

        quantizer = x86.X86InductorQuantizer()
        quantizer.set_global(x86.get_default_x86_inductor_quantization_config())
        captured = torch.export.export(model, (example,), dynamic_shapes=shapes, strict=False).module()
        _one_source_per_call(captured)
        try:
            prepared = prepare_pt2e(captured, quantizer)
        except ValueError as exc:
            # A pattern the quantizer cannot annotate (ResNet's shared ReLU did, before
            # _one_source_per_call): one line, and the other methods remain.
            raise UserError(
                f"--method int8-static: torchao's X86InductorQuantizer cannot annotate this model ({exc})"
            ) from exc
        with torch.no_grad():
            for inputs in calibration:  # observers record activation ranges
                prepared(inputs)
        model = convert_pt2e(prepared)
        _drop_unused_weights(model)
    elif method is not None:  # None: the fp32 model as a program
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_

        recipe = Int8DynamicActivationInt8WeightConfig() if method == "int8-dynamic" else Int8WeightOnlyConfig()
        quantize_(model, recipe)
    return torch.export.export(model, (example,), dynamic_shapes=shapes, strict=False)


def _one_source_per_call(graph_module: torch.fx.GraphModule) -> None:
    """PT2E's quantizers match patterns on "source partitions": the graph nodes grouped by the
    module that produced them. A parameter-free module called twice (torchvision's ResNet blocks
    use one nn.ReLU after the first conv and after the residual add) makes one partition with
    two outputs, which X86InductorQuantizer refuses ("Input partition has more than one output
    node"). Where a module's nodes do not feed each other, each is a call of its own: give each
    its own source name, so each call is its own partition (the graph itself is unchanged)."""
    groups: dict[str, list[torch.fx.Node]] = {}
    for node in graph_module.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if node.op == "call_function" and stack:
            groups.setdefault(list(stack.values())[-1][0], []).append(node)
    for fqn, nodes in groups.items():
        inputs = [arg for node in nodes for arg in node.all_input_nodes]
        stateless = not any(arg.op == "get_attr" for arg in inputs)  # no weights of its own
        independent = not any(arg in nodes for arg in inputs)
        if len(nodes) < 2 or not stateless or not independent:
            continue
        for call, node in enumerate(nodes):
            stack = dict(node.meta["nn_module_stack"])
            key = list(stack)[-1]
            stack[key] = (f"{fqn}@call{call}", stack[key][1])
            node.meta["nn_module_stack"] = stack
            if node.meta.get("source_fn_stack"):
                name, kind = node.meta["source_fn_stack"][-1]
                node.meta["source_fn_stack"] = [*node.meta["source_fn_stack"][:-1], (f"{name}@call{call}", kind)]


def _drop_unused_weights(graph_module: torch.fx.GraphModule) -> None:
    """convert_pt2e folds each quantized weight into a new int8 constant but leaves the fp32
    weight it came from on the module; exported, the program would carry both (ResNet-18: 55
    MiB instead of 13). Weights no node reads any more are deleted."""
    graph_module.graph.eliminate_dead_code()
    read = {node.target for node in graph_module.graph.nodes if node.op == "get_attr"}
    for name, _ in [*graph_module.named_parameters(), *graph_module.named_buffers()]:
        if name not in read:
            owner, _, attribute = name.rpartition(".")
            delattr(graph_module.get_submodule(owner) if owner else graph_module, attribute)
    graph_module.recompile()


def _torchao_version() -> str:
    import torchao

    return torchao.__version__
