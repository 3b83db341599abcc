"""YAML files and ``key.sub=value`` overrides into the typed schema: unknown keys and
wrong types are errors naming the key."""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from cope_megatron.config.schema import Config, ConfigError


def merge_dicts(base: dict, new: dict) -> dict:
    """Recursive merge; ``new`` wins, nested mappings merge key by key."""
    out = dict(base)
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_dicts(out[key], value)
        else:
            out[key] = value
    return out


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is not a section")
    node[leaf] = value


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a section (mapping), got {value!r}")
        return _build(hint, value, key)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {list(choices)}")
        return value
    if origin is list:
        (item,) = typing.get_args(hint)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]  # a single path or number where a list is expected
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {hint!r} for {key}")


def _build(cls: type, values: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in names:
            where = f"{prefix}.{key}" if prefix else key
            raise ConfigError(f"unknown config key {where!r}; valid keys here: {sorted(names)}")
    kwargs = {
        k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in values.items()
    }
    return cls(**kwargs)


def _parse(text: str, where: str) -> Any:
    """YAML ``text``; a syntax error names ``where``, the line and the column."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{where}{at}: YAML syntax error ({problem}); fix the YAML there"
                          ) from None


def load_config(sources: list[str]) -> Config:
    """Compose YAML files and ``key.sub=value`` overrides, in order, into a Config."""
    tree: dict = {}
    for src in sources:
        if "=" in src and not src.endswith((".yaml", ".yml")):
            key, raw = src.split("=", 1)
            _set_dotted(tree, key.strip(), _parse(raw, f"override {src!r}") if raw else "")
            continue
        path = Path(src)
        if not path.is_file():
            raise ConfigError(f"config file {src!r} does not exist (pass a YAML path or key=value)")
        loaded = _parse(path.read_text(), f"config file {src!r}") or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {src!r} must hold a mapping of sections")
        tree = merge_dicts(tree, loaded)
    return _build(Config, tree)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def yaml_text(cfg: Config) -> str:
    """``cfg`` as the YAML a run directory keeps (``config.yaml``)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def dump_yaml(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml_text(cfg))


def flat_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted leaf key of the schema (the public flag surface)."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        name = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            keys += flat_keys(hints[f.name], name + ".")
        else:
            keys.append(name)
    return keys
