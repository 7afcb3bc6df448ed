"""The component protocol: a feature that hooks into the training loop at a few fixed points
and keeps its state in the checkpoint, so the loop never grows a branch for it.

The hooks, in the order a step meets them (each gets the Run: model, optimizer, logger...):

    on_start(run)                    once, after a resume restored every component's state
    after_step(run, step)            after each optimizer step (and its LR-schedule step)
    after_eval(run, step, metrics)   after each scheduled evaluation (train.eval_every, the last
                                     step), metrics as logged, the same on every rank
    on_log(run, step, metrics)       each record the run logs (every train.log_every steps: loss,
                                     lr, speed; each evaluation; each save's stall), after rank
                                     0's loggers wrote it: an experiment tracker of your own
    before_save(run, step)           before each checkpoint is written
    at_end(run, step)                once, after the invocation's last step and save

`eval_weights(run)` is a context around each evaluation (train.ema swaps its average in);
`tensors()` are sharded tensors saved through DCP beside the model, resharded on a resume at
another world size, and loaded back in place (train.ema's average).
`stop_reason()` is asked after each evaluation: a component that wants the run to end returns
one line saying why (every rank must answer the same; built-ins decide from all-reduced
metrics). `state_dict()`/`load_state_dict()` go into every checkpoint under the component's
name, so a resumed run continues each component where it was: rank 0's state is saved and every
rank gets it back (a component whose state differs by rank keeps that part in `tensors()`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from dist_train.errors import UserError

if TYPE_CHECKING:
    from dist_train.train.assembly import Run


class Component:
    """Every hook a no-op: a component overrides the ones it needs."""

    name: str = "component"  # its entry in a checkpoint's train state
    notes: list[str] = []  # what it will do, logged once at the start

    def on_start(self, run: Run) -> None:
        pass

    def after_step(self, run: Run, step: int) -> None:
        pass

    def after_eval(self, run: Run, step: int, metrics: dict[str, float]) -> None:
        pass

    def on_log(self, run: Run, step: int, metrics: dict[str, float]) -> None:
        pass

    def before_save(self, run: Run, step: int) -> None:
        pass

    def at_end(self, run: Run, step: int) -> None:
        pass

    def stop_reason(self) -> str | None:
        return None

    def eval_weights(self, run: Run) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def metric_value(metrics: dict[str, float], key: str, metric: str) -> float:
    """The evaluation metric config key `key` names, or one line saying which ones there are."""
    if metric not in metrics:
        raise UserError(
            f"{key}={metric} is not among this run's evaluation metrics: "
            f"{', '.join(metrics)} (train.metrics chooses them)"
        )
    return metrics[metric]


class ComponentError(UserError):
    """A user's component raised: one line naming it, then the user's own frames."""


class Components:
    """The run's components, called in order. Stateful as one part of the train state: a dict
    of each component's state under its name. A component the checkpoint has no state for (one
    turned on at resume) starts fresh; a saved one no longer configured is ignored."""

    missing_ok = True  # a checkpoint from before components were saved restores none of them

    def __init__(self, components: list[Component] = ()) -> None:
        self.components = list(components)
        self._check_names()

    def _check_names(self) -> None:
        names = [c.name for c in self.components]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise UserError(f"two components share the name {duplicated[0]!r}; each needs its own checkpoint entry")

    def put_first(self, component: Component) -> None:
        """A component that must see every hook before the others (the run's loggers: a record
        is written before a component reacts to it)."""
        self.components.insert(0, component)
        self._check_names()

    @property
    def notes(self) -> list[str]:
        return [line for c in self.components for line in c.notes]

    def on_start(self, run: Run) -> None:
        for c in self.components:
            c.on_start(run)

    def after_step(self, run: Run, step: int) -> None:
        for c in self.components:
            c.after_step(run, step)

    def after_eval(self, run: Run, step: int, metrics: dict[str, float]) -> None:
        for c in self.components:
            c.after_eval(run, step, metrics)

    def on_log(self, run: Run, step: int, metrics: dict[str, float]) -> None:
        for c in self.components:
            c.on_log(run, step, metrics)

    def before_save(self, run: Run, step: int) -> None:
        for c in self.components:
            c.before_save(run, step)

    def at_end(self, run: Run, step: int) -> None:
        for c in self.components:
            c.at_end(run, step)

    @contextlib.contextmanager
    def eval_weights(self, run: Run) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for c in self.components:
                stack.enter_context(c.eval_weights(run))
            yield

    def tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        """Each component's sharded tensors under its name, for DCP."""
        return {c.name: found for c in self.components if (found := c.tensors())}

    def stop_reason(self) -> str | None:
        return next((reason for c in self.components if (reason := c.stop_reason())), None)

    def state_dict(self) -> dict[str, Any]:
        return {c.name: state for c in self.components if (state := c.state_dict())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for c in self.components:
            if c.name in state:
                c.load_state_dict(state[c.name])
