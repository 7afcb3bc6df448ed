"""`dist-train prune`'s report: a pruned run (prune.*, whose masks live in components/sparsity.py) against
the checkpoint it started from, both exported and measured on the CPU (compress_report)."""

from __future__ import annotations

import copy
from pathlib import Path

from dist_train import checkpoint
from dist_train.checkpoint.export import weights_checkpoint
from dist_train.config import Config, UserError
from dist_train.tools import compress_report


def write_report(
    cfg: Config, timing_runs: int = 30, max_accuracy_drop: float = 0.01, force: bool = False
) -> compress_report.Report:
    """The compression report of a pruned run (compress_report): its source checkpoint (the
    run's model.init_from) against its newest checkpoint, both exported as safetensors into
    RUN_DIR/compress/, measured on the CPU; the table is printed and written there. Unstructured
    zeros keep the file as large and the dense forward as slow: the table shows it.

    A pruned model that lost more than max_accuracy_drop is flagged, and its export is removed
    again unless forced (UserError after the report is written); the run's checkpoints stay, so
    the same command with more train.max_steps fine-tunes it on."""
    from safetensors.torch import save_model

    source = weights_checkpoint(Path(cfg.model.init_from))
    pruned = weights_checkpoint(cfg.run_dir)
    original, validation, _ = compress_report.cpu_validation(cfg, lambda model: checkpoint.load_model(source, model))
    result = copy.deepcopy(original)
    checkpoint.load_model(pruned, result)
    out = cfg.run_dir / "compress"
    out.mkdir(exist_ok=True)
    files = {name: out / f"{name}.safetensors" for name in ("source", "pruned")}
    save_model(original, str(files["source"]))
    save_model(result, str(files["pruned"]))
    report = compress_report.compare(
        (f"source ({source.name})", original, files["source"]),
        [(f"pruned {cfg.prune.sparsity:g} ({pruned.name})", result, files["pruned"])],
        validation,
        max_accuracy_drop,
        timing_runs,
    )
    print(compress_report.table(report), end="")
    compress_report.write(report, out)
    if report.rows[-1].flagged and not force:
        files["pruned"].unlink()
        lost = -report.rows[-1].accuracy_change
        raise UserError(
            f"pruned {cfg.prune.sparsity:g} loses {lost:.4f} accuracy, more than --max-accuracy-drop "
            f"{max_accuracy_drop:g}; {files['pruned']} not written (--force writes it; a larger "
            "train.max_steps continues the fine-tuning)"
        )
    return report
