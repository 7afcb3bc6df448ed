"""Users' own components: `callbacks: [{target: pkg.mod:Class, ...kwargs}]` in the config, or
objects handed to `dist_train.fit(..., callbacks=[...])`.

A callback implements any of Component's hooks (it need not subclass it) and, to survive a
restart, `state_dict()`/`load_state_dict()`. Its state is checkpointed under its place and
class (`callbacks[0]:pkg.mod:Class`), so reordering the list never hands one callback
another's state. An exception from its code ends the run with one line naming it (the config
key, or the object's class) followed by its own frames, printed once, not dist_train's.
"""

from __future__ import annotations

import traceback
from typing import Any

from dist_train.components.base import Component, ComponentError
from dist_train.config import UserError, import_object

HOOKS = ("on_start", "after_step", "after_eval", "on_log", "before_save", "at_end")


class UserCallback(Component):
    def __init__(self, callback: Any, name: str) -> None:
        self.callback, self.name = callback, name
        self.notes = [f"callback {name}"]

    def _invoke(self, hook: str, *args: Any) -> Any:
        method = getattr(self.callback, hook, None)
        if method is None:  # a callback implements only the hooks it needs
            return None
        try:
            return method(*args)
        except UserError:
            raise
        except Exception as exc:
            where = f" at step {args[1]}" if hook in HOOKS[1:] else ""
            raise ComponentError(_headed(f"{self.name} raised in {hook}{where}", exc)) from exc

    def on_start(self, run) -> None:
        self._invoke("on_start", run)

    def after_step(self, run, step: int) -> None:
        self._invoke("after_step", run, step)

    def after_eval(self, run, step: int, metrics: dict[str, float]) -> None:
        self._invoke("after_eval", run, step, metrics)

    def on_log(self, run, step: int, metrics: dict[str, float]) -> None:
        self._invoke("on_log", run, step, metrics)

    def before_save(self, run, step: int) -> None:
        self._invoke("before_save", run, step)

    def at_end(self, run, step: int) -> None:
        self._invoke("at_end", run, step)

    def stop_reason(self) -> str | None:
        reason = self._invoke("stop_reason")
        return None if reason is None else str(reason)

    def state_dict(self) -> dict[str, Any]:
        state = self._invoke("state_dict")
        return {} if state is None else state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._invoke("load_state_dict", state)


def _headed(headline: str, exc: BaseException) -> str:
    """The headline, then the frames from the user's code down (not dist_train's own above
    them) and the exception, as a traceback would end."""
    frames = traceback.extract_tb(exc.__traceback__)[1:]  # the first is our call of the hook
    lines = [f"{headline}: {type(exc).__name__}: {exc}", "Traceback (most recent call last):"]
    lines += [line.rstrip("\n") for line in traceback.format_list(frames)]
    return "\n".join(lines)


def build_callbacks(specs: list[dict[str, Any]], objects: list[Any] = ()) -> list[UserCallback]:
    """The config's callbacks (each constructed here from its target and keyword arguments),
    then the objects given to dist_train.fit."""
    built = []
    for index, spec in enumerate(specs):
        key = f"callbacks[{index}]"
        kwargs = {k: v for k, v in spec.items() if k != "target"}
        cls = import_object(spec["target"], f"{key}.target")
        try:
            callback = cls(**kwargs)
        except Exception as exc:
            raise ComponentError(_headed(f"{key}: {spec['target']}(**{kwargs!r}) failed", exc)) from exc
        built.append(UserCallback(callback, f"{key}:{spec['target']}"))
    for index, callback in enumerate(objects):
        kind = type(callback)
        built.append(UserCallback(callback, f"fit(callbacks)[{index}]:{kind.__module__}:{kind.__qualname__}"))
    return built
