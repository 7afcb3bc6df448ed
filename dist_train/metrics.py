"""Validation metrics through torchmetrics, summed across ranks by dist_train itself.

A Task hands out one Evaluation per pass over a validation split: `update` per batch, then
`all_reduce` once, then `compute` (the logged numbers) and `save` (the confusion matrix as CSV
and PNG, on rank 0).

torchmetrics can sync its states itself inside compute(), but that sync is a collective that
hangs when only some ranks reach it (Lightning #20223), and it gathers state by state. Here
every metric is made with syncing off, and `all_reduce` adds up all of a pass's states, the
loss sums included, in one all-reduce that evaluate() makes on every rank. Summing is exact
because every state kept here is a sum (counts of true and false positives and negatives, a
confusion matrix, error sums) and EvalShard gives each sample to exactly one rank.

torchmetrics is imported when the first batch is counted: its import takes seconds (it pulls
in scipy, matplotlib and torchvision), which a config error or a CLI start should not pay.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dist_train.config import LOGGED_METRICS as LOGGED
from dist_train.errors import ConfigError

if TYPE_CHECKING:
    from torchmetrics import Metric

REGRESSION = ("mae", "mse")
# Past this many classes the confusion matrix is left out of the defaults: ImageNet's would be a
# million cells written at every evaluation. Named in train.metrics it is made at any size.
CONFUSION_MAX_CLASSES = 100
# Up to this many classes the PNG prints each cell's count and labels every class.
ANNOTATED_MAX_CLASSES = 20

MetricChoice = list[str] | Callable[[torch.Tensor, torch.Tensor], list[str]]


def classification_defaults(outputs: torch.Tensor, targets: torch.Tensor) -> list[str]:
    """cross_entropy's metrics when train.metrics is not set, chosen at the first batch."""
    if targets.ndim != 1:
        # Tokens, (batch, seq) over a vocabulary: top-5, macro F1 and a 256 x 256 matrix over
        # every token of every evaluation cost more than they tell about a language model.
        return ["accuracy"]
    classes = outputs.shape[-1]
    names = ["accuracy", *(["top5"] if classes > 5 else []), "precision", "recall", "f1"]
    return names + (["confusion"] if classes <= CONFUSION_MAX_CLASSES else [])


def per_element(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Outputs shaped as the targets: a (batch, 1) regression head against (batch,) targets."""
    outputs = outputs.float()
    if outputs.shape != targets.shape and outputs.numel() == targets.numel():
        outputs = outputs.reshape(targets.shape)
    return outputs


def _inputs(name: str, outputs: torch.Tensor, targets: torch.Tensor) -> tuple[str, torch.Tensor, torch.Tensor]:
    """(kind, predictions, targets) as torchmetrics takes them for metric `name`."""
    if name in REGRESSION:
        preds = per_element(outputs, targets)
        if preds.shape != targets.shape or not targets.is_floating_point():
            raise ConfigError(
                f"train.metrics: {name} compares outputs with float targets of the same size; got outputs "
                f"{tuple(outputs.shape)} and {targets.dtype} targets {tuple(targets.shape)}"
            )
        return "regression", preds.flatten(), targets.float().flatten()
    if targets.is_floating_point():  # multi-hot labels: each label right or wrong, at logit 0
        if name in ("top5", "confusion"):
            raise ConfigError(f"train.metrics: {name} needs class-index targets, not multi-hot float labels")
        batch = targets.shape[0] if targets.ndim else 1
        # Given as 0/1 integers, so torchmetrics applies no sigmoid-or-not guess of its own.
        labels = (outputs.reshape(targets.shape) > 0).long().reshape(batch, -1)
        return "multilabel", labels, (targets > 0.5).long().reshape(batch, -1)
    # Class indices; flattened so tokens (batch, seq, vocab) count like samples.
    return "multiclass", outputs.float().flatten(0, -2), targets.flatten()


def _build(name: str, kind: str, preds: torch.Tensor) -> Metric:
    import torchmetrics.classification as tc
    from torchmetrics.regression import MeanAbsoluteError, MeanSquaredError

    # No sync of their own (see the module docstring). No argument checks: cross_entropy has
    # already refused out-of-range targets, and the checks cost host syncs on every batch.
    common: dict[str, Any] = {"sync_on_compute": False, "dist_sync_on_step": False}
    if kind == "regression":
        return (MeanAbsoluteError if name == "mae" else MeanSquaredError)(**common).to(preds.device)
    common["validate_args"] = False
    width = preds.shape[-1]
    if kind == "multilabel":
        made = {
            "accuracy": lambda: tc.MultilabelAccuracy(width, average="micro", **common),
            "precision": lambda: tc.MultilabelPrecision(width, average="macro", **common),
            "recall": lambda: tc.MultilabelRecall(width, average="macro", **common),
            "f1": lambda: tc.MultilabelF1Score(width, average="macro", **common),
        }
        return made[name]().to(preds.device)
    if name == "top5" and width < 5:
        raise ConfigError(f"train.metrics: top5 needs at least 5 classes; the model outputs {width}")
    made = {
        "accuracy": lambda: tc.MulticlassAccuracy(width, average="micro", **common),  # the fraction right
        "top5": lambda: tc.MulticlassAccuracy(width, top_k=5, average="micro", **common),
        "precision": lambda: tc.MulticlassPrecision(width, average="macro", **common),
        "recall": lambda: tc.MulticlassRecall(width, average="macro", **common),
        "f1": lambda: tc.MulticlassF1Score(width, average="macro", **common),
        "confusion": lambda: tc.MulticlassConfusionMatrix(width, **common),  # rows: true class
    }
    return made[name]().to(preds.device)


class Evaluation:
    """One pass over a validation split: `update` per counted batch, `all_reduce` once on
    every rank, then `compute` and `save`."""

    def __init__(self, choice: MetricChoice) -> None:
        self._choice = choice  # train.metrics, or a function choosing them from the first batch
        self._loss: torch.Tensor | None = None  # float64 (sum, count), summed like the metrics
        self._metrics: dict[str, Metric] | None = None

    def update(self, loss_sum: torch.Tensor, count: int, outputs: Any, targets: torch.Tensor) -> None:
        if self._metrics is None:  # the first batch tells the kind of targets and the class count
            self._loss = torch.zeros(2, dtype=torch.float64, device=loss_sum.device)
            names = self._choice(outputs, targets) if callable(self._choice) else self._choice
            self._metrics = {name: _build(name, *_inputs(name, outputs, targets)[:2]) for name in names}
        self._loss[0] += loss_sum.detach().to(torch.float64)
        self._loss[1] += count
        for name, metric in self._metrics.items():
            _, preds, target = _inputs(name, outputs.detach(), targets)
            metric.update(preds, target)

    def all_reduce(self, reduce_sum: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Every state summed over the ranks in one collective: every rank calls it once."""
        if self._loss is None or self._metrics is None:
            # EvalShard gives every rank at least one sample (build_pipeline checks it).
            raise RuntimeError("evaluation counted no batch on this rank")
        states: list[tuple[Metric | None, str, torch.Tensor]] = [(None, "loss", self._loss)]
        for metric in self._metrics.values():
            from torchmetrics.utilities.data import dim_zero_sum  # imported: a metric exists

            for name, value in metric.metric_state.items():
                if metric._reductions[name] is not dim_zero_sum:  # private, but where torchmetrics says it
                    raise TypeError(f"{type(metric).__name__}.{name} is not a sum: it cannot be all-reduced")
                states.append((metric, name, value))
        flat = torch.cat([value.reshape(-1).to(torch.float64) for _, _, value in states])
        reduce_sum(flat)  # float64 holds integer counts exactly up to 2**53
        offset = 0
        for metric, name, value in states:
            # Left in float64: torchmetrics then divides in float64 too, so val_acc is k / n
            # exactly (sklearn's number), not float32's nearest value.
            part = flat[offset : offset + value.numel()].reshape(value.shape)
            offset += value.numel()
            if metric is None:
                self._loss = part
            else:
                setattr(metric, name, part)

    def compute(self) -> dict[str, float]:
        """val_loss and the logged metrics, in the order train.metrics names them."""
        assert self._loss is not None and self._metrics is not None
        values = {"val_loss": (self._loss[0] / self._loss[1]).item()}
        for name, metric in self._metrics.items():
            if name in LOGGED:
                values[LOGGED[name]] = metric.compute().item()
        return values

    def confusion_matrix(self) -> torch.Tensor | None:
        """(classes, classes) counts, rows the true class and columns the predicted one."""
        metric = (self._metrics or {}).get("confusion")
        return None if metric is None else metric.compute().round().long().cpu()

    def save(self, directory: Path, tag: str) -> list[Path]:
        """What this evaluation keeps as files: directory/confusion/TAG.csv and .png."""
        matrix = self.confusion_matrix()
        if matrix is None:
            return []
        folder = directory / "confusion"
        folder.mkdir(parents=True, exist_ok=True)
        csv, png = folder / f"{tag}.csv", folder / f"{tag}.png"
        write_confusion_csv(matrix, csv)
        correct = int(matrix.diagonal().sum())
        total = int(matrix.sum())
        plot_confusion(matrix, png, f"{tag}: {correct} of {total} right ({correct / total:.1%})")
        return [csv, png]


def write_confusion_csv(matrix: torch.Tensor, path: Path) -> None:
    """A header row of predicted classes, then one row per true class, its index first."""
    n = matrix.shape[0]
    lines = ["true\\predicted," + ",".join(map(str, range(n)))]
    lines += [f"{i}," + ",".join(str(int(v)) for v in row) for i, row in enumerate(matrix.tolist())]
    _write_atomically(path, lambda target: target.write_text("\n".join(lines) + "\n"))


def plot_confusion(matrix: torch.Tensor, path: Path, title: str) -> None:
    # The Agg canvas on a bare Figure: no pyplot, so no global backend is chosen or changed in
    # the process of a user's script (a notebook keeps its own), and no display is needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    counts = matrix.numpy()
    n = counts.shape[0]
    side = min(3.0 + 0.45 * n, 16.0)
    figure = Figure(figsize=(side + 1.2, side), dpi=100)
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    image = ax.imshow(counts, cmap="Blues", interpolation="nearest")
    figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title, fontsize=10)
    if n <= ANNOTATED_MAX_CLASSES:
        ax.set_xticks(range(n))
        ax.set_yticks(range(n))
        dark = counts.max() / 2
        for (i, j), value in ((ij, counts[ij]) for ij in zip(*counts.nonzero(), strict=True)):
            ax.text(j, i, str(value), ha="center", va="center", fontsize=8, color="white" if value > dark else "black")
    figure.subplots_adjust(left=0.09, right=0.97, bottom=0.08, top=0.94)  # tight_layout would cost a second draw
    _write_atomically(path, lambda target: figure.savefig(target, format="png"))


def _write_atomically(path: Path, write: Callable[[Path], Any]) -> None:
    """Written beside, then renamed: a reader never sees half a file under the final name."""
    partial = path.with_name(path.name + ".partial")
    write(partial)
    partial.replace(path)
