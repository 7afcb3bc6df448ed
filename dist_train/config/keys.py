"""The schema's keys: every dotted key and its type, and the help `dist-train config --keys`
and the README's configuration table show."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, get_args, get_origin

import yaml

from dist_train.config.schema import Config


def leaf_hints(cls: type = Config, prefix: str = "") -> dict[str, Any]:
    """Every dotted key (sections too) mapped to its type hint."""
    hints: dict[str, Any] = {}
    for name, hint in typing.get_type_hints(cls).items():
        hints[prefix + name] = hint
        if dataclasses.is_dataclass(hint):
            hints.update(leaf_hints(hint, prefix + name + "."))
    return hints


def is_settable(key: str, hints: dict[str, Any]) -> bool:
    """A schema key, or a key inside a free-form mapping field such as model.kwargs.depth."""
    if key in hints:
        return True
    parts = key.split(".")
    return any(get_origin(hints.get(".".join(parts[:i]))) is dict for i in range(1, len(parts)))


def all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    keys = []
    for name, hint in typing.get_type_hints(cls).items():
        keys.append(prefix + name)
        if dataclasses.is_dataclass(hint):
            keys.extend(all_keys(hint, prefix + name + "."))
    return keys


@dataclass(frozen=True)
class KeyDoc:
    """One leaf key as `dist-train config --keys` and the README show it."""

    key: str
    type: str  # e.g. "int | auto"
    default: str  # as YAML writes it, e.g. "null", "[3, 32, 32]"
    help: str


def key_docs(cls: type = Config, prefix: str = "") -> list[KeyDoc]:
    """Every leaf key of the schema (sections left out), in schema order, with its help."""
    docs = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            docs.extend(key_docs(hint, prefix + f.name + "."))
            continue
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        docs.append(KeyDoc(prefix + f.name, _type_words(hint), yaml_value(default), f.metadata.get("help", "")))
    return docs


def keys_table(prefix: str = "") -> str:
    """The README's configuration table (markdown), one row per key starting with `prefix`."""
    rows = ["| key | default | meaning |", "| --- | --- | --- |"]
    for doc in key_docs():
        if doc.key.startswith(prefix):
            # A "|" would end the cell, even inside a code span.
            cells = [f"`{doc.key}`", f"`{doc.default}`", doc.help]
            rows.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(rows) + "\n"


def yaml_value(value: Any) -> str:
    """A value as a YAML file (and so a key=value override) writes it: null, true, [3, 32, 32]."""
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).removesuffix("...\n").strip()


def _type_words(hint: Any) -> str:
    """A field's type as users write its values: `int | null`, `sgd | adam | adamw`, `list[int]`."""
    origin, args = get_origin(hint), get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_words(arg) for arg in args)
    if origin is Literal:
        return " | ".join(map(str, args))
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(_type_words(arg) for arg in args)}]"
    return {type(None): "null", Any: "any"}.get(hint) or hint.__name__
