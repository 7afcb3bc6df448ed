"""`dist-train report`: one run or several, from their metrics.jsonl (and config.yaml), as PNG plots,
a self-contained report.html and a text summary.

Everything is read and checked before anything is written, so a bad RUN_DIR leaves no half
report. matplotlib is imported only to draw (the Agg canvas, no display or server).
"""

from __future__ import annotations

import base64
import datetime
import html
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dist_train.errors import UserError

# Metric names that say which way is better; val_* matched by substring (val_top5_acc, val_f1).
HIGHER_IS_BETTER = ("acc", "top", "f1", "precision", "recall", "auc", "iou", "dice")
LOWER_IS_BETTER = ("loss", "err", "mae", "mse", "perplexity", "ppl")


class ReportError(UserError):
    pass


@dataclass
class RunData:
    path: Path
    name: str  # the legend's and the summary's label
    records: list[dict[str, Any]]
    config: dict[str, Any] = field(default_factory=dict)
    plan: dict[str, Any] = field(default_factory=dict)  # plan.json: the batch as it ran

    def series(self, key: str) -> list[tuple[int, float]]:
        """(step, value) of every record holding `key`, in step order."""
        points = [(r["step"], r[key]) for r in self.records if isinstance(r.get(key), (int, float))]
        return sorted(points, key=lambda point: point[0])

    def keys(self) -> set[str]:
        return {key for record in self.records for key in record}

    def describe(self) -> str:
        """What was trained, from config.yaml: model, data, optimizer and batch."""
        if not self.config:
            return ""

        def get(section: str, key: str) -> Any:
            return (self.config.get(section) or {}).get(key)

        plan = self.plan
        if {"global_batch", "world_size", "micro_batch", "grad_accum_steps"} <= plan.keys():
            batch = (
                f"global batch {plan['global_batch']} ({plan['world_size']} x {plan['micro_batch']} x "
                f"{plan['grad_accum_steps']} accumulation)"
            )
        else:  # a run from before plan.json
            batch = f"batch {get('data', 'batch_size')} per rank x {get('train', 'grad_accum_steps')} accumulation"
        optimizer = f"{get('optim', 'name')} lr {get('optim', 'lr')}"
        return f"{get('model', 'name')} on {get('data', 'dataset')}, {optimizer}, {batch}"


@dataclass
class Best:
    key: str
    best: float | None  # None: the metric's name does not say which way is better
    best_step: int | None
    final: float
    final_step: int


@dataclass
class Summary:
    name: str
    steps: int
    wall_time_s: float | None  # from the first to the last record's `time`
    first_step: int  # the first record's: the wall time starts there, after start-up
    mean_samples_per_s: float | None
    validation: list[Best]


def load_run(path: Path) -> RunData:
    """A run directory's records; one line naming the file when there is nothing to report."""
    if not path.exists():
        raise ReportError(f"{path}: no such run directory")
    if not path.is_dir():
        raise ReportError(f"{path} is not a run directory")
    metrics = path / "metrics.jsonl"
    if not metrics.is_file():
        raise ReportError(f"{metrics} not found: not a run directory, or a run that has not logged yet")
    records = []
    for line in metrics.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line torn by a crash mid-write, as the logger skips it
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    if not records:
        raise ReportError(f"{metrics} holds no records: the run has not logged a step yet")
    config: dict[str, Any] = {}
    config_path = path / "config.yaml"
    if config_path.is_file():
        try:
            loaded = yaml.safe_load(config_path.read_text())
        except (yaml.YAMLError, UnicodeDecodeError):
            raise ReportError(f"{config_path} is not readable YAML") from None
        config = loaded if isinstance(loaded, dict) else {}
    plan: dict[str, Any] = {}
    try:
        loaded = json.loads((path / "plan.json").read_text())
        plan = loaded if isinstance(loaded, dict) else {}
    except (OSError, ValueError):
        pass  # no plan (an older run) or a torn one: the config's batch settings instead
    return RunData(path, path.name, records, config, plan)


def load_runs(paths: list[Path]) -> list[RunData]:
    runs = [load_run(path) for path in paths]
    names = [run.name for run in runs]
    for run in runs:
        if names.count(run.name) > 1:  # runs/a/digits and runs/b/digits: the path tells them apart
            run.name = str(run.path)
    return runs


def default_out(runs: list[RunData]) -> Path:
    """One run: RUN_DIR/report. Several: compare-NAME-NAME... beside them (in their shared parent
    directory, or the current one), so no comparison overwrites another's or a run's own report."""
    if len(runs) == 1:
        return runs[0].path / "report"
    names = [run.path.name for run in runs]
    label = "-".join(names[:3]) + (f"-and-{len(names) - 3}-more" if len(names) > 3 else "")
    parents = {run.path.resolve().parent for run in runs}
    return (parents.pop() if len(parents) == 1 else Path(".")) / f"compare-{label}"


def direction(key: str) -> str | None:
    """max or min: which way a validation metric is better; None when its name does not say."""
    name = key.removeprefix("val_").lower()
    if any(word in name for word in HIGHER_IS_BETTER):
        return "max"
    if any(word in name for word in LOWER_IS_BETTER):
        return "min"
    return None


def summarize(run: RunData) -> Summary:
    times = [r["time"] for r in run.records if isinstance(r.get("time"), (int, float))]
    speeds = [value for _, value in run.series("samples_per_s") if math.isfinite(value)]
    validation = []
    for key in sorted((k for k in run.keys() if k.startswith("val_")), key=lambda k: (k != "val_loss", k)):
        points = run.series(key)
        if not points:
            continue
        final_step, final = points[-1]
        finite = [(step, value) for step, value in points if math.isfinite(value)]
        best = best_step = None
        way = direction(key)
        if way and finite:
            pick = max if way == "max" else min
            best_step, best = pick(finite, key=lambda point: point[1])  # the first step that reached it
        validation.append(Best(key, best, best_step, final, final_step))
    return Summary(
        name=run.name,
        steps=max(r["step"] for r in run.records),
        first_step=min(r["step"] for r in run.records),
        wall_time_s=max(times) - min(times) if times else None,
        mean_samples_per_s=sum(speeds) / len(speeds) if speeds else None,
        validation=validation,
    )


def format_summary(summaries: list[Summary]) -> str:
    lines = []
    for s in summaries:
        wall = f"{s.wall_time_s:.1f} s (steps {s.first_step}-{s.steps})" if s.wall_time_s is not None else "unknown"
        speed = f", mean {s.mean_samples_per_s:.1f} samples/s" if s.mean_samples_per_s is not None else ""
        lines.append(f"{s.name}: {s.steps} steps, wall time {wall}{speed}")
        width = max((len(b.key) for b in s.validation), default=0)
        for b in s.validation:
            best = f"best {b.best:.4g} (step {b.best_step})" if b.best is not None else "best n/a"
            lines.append(f"  {b.key:<{width}}  {best:<26}  final {b.final:.4g} (step {b.final_step})")
        if not s.validation:
            lines.append("  no validation records")
    return "\n".join(lines)


# --------------------------------------------------------------------------- plots


@dataclass(frozen=True)
class Series:
    key: str
    label: str
    style: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Panel:
    title: str
    series: tuple[Series, ...]
    log_y: bool = False


VALIDATION_STYLE = {"linestyle": "--", "marker": "o", "markersize": 3}


def figures(runs: list[RunData]) -> list[tuple[str, str, list[Panel]]]:
    """(file name, title, panels) of each plot; a panel whose keys no run has is left out, and a
    plot left without panels is not drawn."""
    keys = set().union(*(run.keys() for run in runs))
    val_metrics = sorted(k for k in keys if k.startswith("val_") and k != "val_loss")
    wanted = [
        (
            "loss.png",
            "Loss",
            [
                Panel(
                    "loss",
                    (Series("loss", "train"), Series("val_loss", "validation", VALIDATION_STYLE)),
                    log_y=True,
                )
            ],
        ),
        ("val_metrics.png", "Validation metrics", [Panel(k, (Series(k, k, VALIDATION_STYLE),)) for k in val_metrics]),
        ("lr.png", "Learning rate", [Panel("lr", (Series("lr", "lr"),))]),
        (
            "throughput.png",
            "Throughput",
            [
                Panel("samples/s", (Series("samples_per_s", "samples/s"),)),
                Panel("tokens/s", (Series("tokens_per_s", "tokens/s"),)),
                Panel("MFU", (Series("mfu", "MFU"),)),
                Panel("data-wait fraction of step time", (Series("data_wait_fraction", "data wait"),)),
            ],
        ),
        (
            "memory.png",
            "Memory",
            [
                Panel("parameters + optimizer state, MiB (rank 0)", (Series("param_optim_mb", "MiB"),)),
                Panel("peak allocated, GiB (fullest rank)", (Series("max_memory_gb", "GiB"),)),
            ],
        ),
    ]
    kept = []
    for name, title, panels in wanted:
        panels = [p for p in panels if any(s.key in keys for s in p.series)]
        if panels:
            kept.append((name, title, panels))
    return kept


def draw(runs: list[RunData], title: str, panels: list[Panel]) -> bytes:
    """One plot as PNG bytes: a panel per metric, every run overlaid in its own colour."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ReportError(f"dist-train report needs matplotlib ({exc}); pip install matplotlib") from None

    columns = min(len(panels), 2)
    rows = math.ceil(len(panels) / columns)
    figure = Figure(figsize=(6 * columns, 3.4 * rows + 0.4), dpi=90, layout="constrained")
    FigureCanvasAgg(figure)  # the Agg (PNG) canvas: no display, no pyplot state
    if len(panels) > 1:
        figure.suptitle(title)
    for index, panel in enumerate(panels):
        axes = figure.add_subplot(rows, columns, index + 1)
        positive = True
        for color, run in enumerate(runs):
            for series in panel.series:
                points = [(s, v) for s, v in run.series(series.key) if math.isfinite(v)]
                if not points:
                    continue
                positive = positive and all(v > 0 for _, v in points)
                # One run: the series names the line; several: the run does (and the series, if two).
                label = series.label if len(runs) == 1 else run.name
                if len(runs) > 1 and len(panel.series) > 1:
                    label = f"{run.name} {series.label}"
                steps, values = zip(*points, strict=True)
                axes.plot(steps, values, color=f"C{color % 10}", label=label, linewidth=1.4, **series.style)
        if panel.log_y and positive:
            axes.set_yscale("log")  # a loss falls by orders of magnitude
        if len(panels) > 1:
            axes.set_title(panel.title, fontsize=10)
        else:  # the plot's title above, the metric beside its axis
            axes.set_title(title)
            axes.set_ylabel(panel.title)
        axes.set_xlabel("step")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


# --------------------------------------------------------------------------- the report


def render_html(runs: list[RunData], summaries: list[Summary], plots: list[tuple[str, str, bytes]]) -> str:
    """report.html: the summary table and every plot as a data: URI, so the file stands alone."""
    val_keys = sorted({b.key for s in summaries for b in s.validation})
    head = "".join(f"<th>{html.escape(h)}</th>" for h in ["run", "steps", "wall time", "mean samples/s"])
    head += "".join(f"<th>{html.escape(k)} best</th><th>{html.escape(k)} final</th>" for k in val_keys)
    body = []
    for run, s in zip(runs, summaries, strict=True):
        by_key = {b.key: b for b in s.validation}
        cells = [
            f'<td class="name">{html.escape(s.name)}<br><small>{html.escape(run.describe())}</small></td>',
            f"<td>{s.steps}</td>",
            f"<td>{s.wall_time_s:.1f} s</td>" if s.wall_time_s is not None else "<td></td>",
            f"<td>{s.mean_samples_per_s:.1f}</td>" if s.mean_samples_per_s is not None else "<td></td>",
        ]
        for key in val_keys:
            b = by_key.get(key)
            best = f"{b.best:.4g} (step {b.best_step})" if b and b.best is not None else ""
            cells.append(f"<td>{best}</td><td>{f'{b.final:.4g} (step {b.final_step})' if b else ''}</td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    images = "".join(
        f"<h2>{html.escape(title)}</h2>\n"
        f'<img alt="{html.escape(title)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">\n'
        for _, title, png in plots
    )
    names = ", ".join(s.name for s in summaries)
    sources = "".join(f"<li><code>{html.escape(str(run.path))}</code></li>" for run in runs)
    made = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>dist_train report: {html.escape(names)}</title>
<style>
body {{ font-family: sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; }}
table {{ border-collapse: collapse; }}
th, td {{ border: 1px solid #ccc; padding: 3px 8px; text-align: right; }}
td.name {{ text-align: left; }}
img {{ max-width: 100%; }}
</style>
</head>
<body>
<h1>dist_train report: {html.escape(names)}</h1>
<p>Made by <code>dist-train report</code> on {made} from:</p>
<ul>{sources}</ul>
<h2>Summary</h2>
<table>
<tr>{head}</tr>
{chr(10).join(body)}
</table>
<p><small>Best: the lowest loss or error, the highest accuracy; wall time from the first to the last
logged record.</small></p>
{images}</body>
</html>
"""


@dataclass
class Report:
    summary: str  # the text summary
    out: Path
    files: list[Path]  # report.html first, then the PNGs


def write_report(paths: list[Path], out: Path | None = None) -> Report:
    runs = load_runs(paths)  # every check before anything is written
    out = out if out is not None else default_out(runs)
    if out.exists() and not out.is_dir():
        raise ReportError(f"--out {out} is a file, not a directory")
    summaries = [summarize(run) for run in runs]
    plots = [(name, title, draw(runs, title, panels)) for name, title, panels in figures(runs)]
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ReportError(f"cannot create the report directory {out}: {exc.strerror}") from None
    files = [out / "report.html"]
    for name, _, png in plots:
        (out / name).write_bytes(png)
        files.append(out / name)
    # Written last and whole (renamed into place), so a report.html is never half a report.
    tmp = out / f".report.html.{os.getpid()}.tmp"
    tmp.write_text(render_html(runs, summaries, plots))
    tmp.replace(files[0])
    return Report(format_summary(summaries), out, files)
