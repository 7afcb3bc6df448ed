"""Loading: schema defaults, then a YAML file (or a mapping, or a Config), then `key=value`
overrides, each value coerced to its field's type; then validation. And back to YAML."""

from __future__ import annotations

import copy
import dataclasses
import datetime
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from dist_train.config.keys import all_keys, is_settable, leaf_hints
from dist_train.config.schema import Config
from dist_train.config.validation import validate
from dist_train.errors import ConfigError


def load_config(source: str | Path | dict[str, Any] | Config | None, overrides: list[str] = ()) -> Config:
    """Build a Config from schema defaults, then a YAML file (or a mapping of the same shape,
    or a Config), then `a.b=value` overrides; validated the same way whichever the source."""
    values: dict[str, Any] = {}
    if isinstance(source, Config):
        values = to_dict(source)
    elif isinstance(source, dict):
        values = copy.deepcopy(source)
    elif source is not None:
        values = _read_yaml(Path(source))
    hints = leaf_hints()
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        if not is_settable(key, hints):
            raise _unknown_key(key)
        value = _parse_override_value(raw)
        if hints.get(key) in (str, str | None) and isinstance(value, (int, float, bool, datetime.date)):
            value = raw.strip()  # a string field takes the text as typed: run.name=0123 must not become 83
        _set_dotted(values, key, value)
    cfg = _build(Config, values, prefix="")
    validate(cfg)
    return cfg


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        loaded = yaml.safe_load(path.read_text())
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not a text (UTF-8) YAML file") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"malformed YAML in {path}{where}: {problem}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path} must hold a mapping of sections, got {type(loaded).__name__}")
    return loaded


def _parse_override_value(raw: str) -> Any:
    # YAML scalars give the CLI the same typing as the file: 0.05 -> float, true -> bool.
    try:
        return yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        return raw


def _set_dotted(values: dict[str, Any], key: str, value: Any) -> None:
    node = values
    parts = key.split(".")
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(parts[: depth + 1])} is not a section, cannot set {key}")
        node = child
    if isinstance(value, dict) and isinstance(node.get(parts[-1]), dict):
        _merge(node[parts[-1]], value)  # `optim={lr: 0.2}` changes lr, keeps the file's other keys
    else:
        node[parts[-1]] = value


def _merge(base: dict[str, Any], update: dict[str, Any]) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


def _unknown_key(key: str) -> ConfigError:
    keys = all_keys()
    by_lower = {k.lower(): k for k in keys}
    close = difflib.get_close_matches(key.lower(), list(by_lower), n=1, cutoff=0.5)
    leaf = key.rsplit(".", 1)[-1].lower()
    same_leaf = [k for k in keys if k.rsplit(".", 1)[-1].lower() == leaf]
    # train.lr is closer to "train.loss" as text, but the user meant the lr that lives in optim:
    # a key that exists under another section beats a look-alike.
    suggestion = same_leaf[0] if len(same_leaf) == 1 else None
    suggestion = suggestion or (by_lower[close[0]] if close else None)
    hint = f"; did you mean {suggestion}?" if suggestion else ""
    shown = " ".join(key.split())  # a YAML key may hold a newline; the error stays one line
    return ConfigError(f"unknown config key {shown}{hint}")


def _build(cls: type, values: Any, prefix: str) -> Any:
    if values is None:
        values = {}  # a section whose keys are all commented out
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.')} must be a section (mapping), got {values!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in names:
            raise _unknown_key(prefix + str(key))
    kwargs = {}
    for name in names:
        if name not in values:
            continue
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, values[name], prefix + name + ".")
        else:
            kwargs[name] = _coerce(values[name], hint, prefix + name)
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin, args = get_origin(hint), get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _coerce(value, inner[0], key)
        for option in inner:  # bool | Literal["auto"]: the first type that takes the value
            try:
                return _coerce(value, option, key)
            except ConfigError:
                pass
        words = [word for option in inner for word in _describe(option)]
        raise ConfigError(f"{key} must be {', '.join(words[:-1])} or {words[-1]}; got {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key} must be one of {', '.join(map(str, args))}; got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return {str(k): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):
            # PyYAML (YAML 1.1) reads 1e-3 as a string; users mean a number.
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{key} must be a finite number, got {value!r}")
        return float(value)
    if hint is str:
        if isinstance(value, bool) or value is None or isinstance(value, (dict, list)):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return str(value)
    if hint is Any:
        return value
    raise TypeError(f"unsupported config type {hint} for {key}")  # a schema bug, not user error


def _describe(hint: Any) -> list[str]:
    """The values a type takes, in words, for an error message."""
    if get_origin(hint) is Literal:
        return [str(arg) for arg in get_args(hint)]
    return {bool: ["true", "false"], int: ["an integer"], float: ["a number"], str: ["a string"]}.get(hint, [str(hint)])


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
