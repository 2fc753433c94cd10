"""Recipes: one YAML file mapped onto typed dataclass configs.

A recipe is a YAML mapping whose keys mirror a config dataclass; nested
dataclasses are nested mappings. Overrides on the command line are dotted
`key.sub=value` pairs whose values are parsed as YAML scalars. Unknown keys are
errors with a did-you-mean; values are checked against the field's type
(int, float, bool, str, Literal choices, lists, optional, nested dataclass).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

from posttrain.errors import ConfigError

T = TypeVar("T")


def load_recipe(cls: type[T], path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> T:
    """Read `path` (YAML), apply dotted overrides, and build `cls` strictly."""
    raw: dict[str, Any] = {}
    source = "overrides"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(
                f"recipe file not found: {path}",
                fix="pass the path of a YAML recipe, e.g. recipes/sft_tiny.yaml",
            )
        data = path.read_bytes()
        try:
            raw = yaml.safe_load(data.decode("utf-8-sig")) or {}
        except UnicodeDecodeError as exc:
            line = data[: exc.start].count(b"\n") + 1
            where = f"{path}:{line}"
            raise ConfigError(f"not UTF-8 text (byte 0x{data[exc.start]:02x})", where=where,
                              fix="save the recipe as UTF-8 text") from None  # fmt: skip
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark else str(path)
            raise ConfigError(f"invalid YAML: {getattr(exc, 'problem', exc)}", where=where,
                              fix="fix the YAML syntax at that line (indentation, brackets, quotes)") from None  # fmt: skip
        if not isinstance(raw, dict):
            raise ConfigError("a recipe must be a YAML mapping of keys to values", where=str(path))
    for item in overrides:
        apply_override(raw, item)
    try:
        return from_dict(cls, raw, prefix="", source=source)
    except ConfigError as exc:  # a section's validate() names its key: name the file too
        if path is not None and not str(exc.where or "").startswith(str(path)):
            exc.where = f"{path}: {exc.where}" if exc.where else str(path)
        raise


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Set `a.b.c=value` in a nested dict; the value is parsed as a YAML scalar/flow value."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value", fix="write e.g. train.lr=1e-4")
    key, value = item.split("=", 1)
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key!r}: {part!r} is not a section", where=key)
    try:
        node[parts[-1]] = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        node[parts[-1]] = value


def from_dict(cls: type[T], raw: dict[str, Any], prefix: str = "", source: str = "recipe") -> T:
    """Build dataclass `cls` from `raw`, rejecting unknown keys and ill-typed values."""
    if not isinstance(raw, dict):
        raise ConfigError(f"expected a mapping for section {prefix.rstrip('.') or '<root>'}", where=source)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in raw.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1, cutoff=0.6)
            hint = (
                f"did you mean '{prefix}{close[0]}'?" if close else f"valid keys: {', '.join(sorted(fields))}"
            )
            raise ConfigError(f"unknown key '{prefix}{key}'", where=source, fix=hint)
        kwargs[key] = _coerce(hints[key], _over_default(fields[key], value), f"{prefix}{key}", source)
    try:
        obj = cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"section {prefix.rstrip('.') or '<root>'}: {exc}", where=source) from None
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except ConfigError as exc:
            exc.where = _qualified(exc.where, prefix)
            raise
    return obj


_KEY_RE = re.compile(r"[A-Za-z_][\w\[\]]*(\.[\w\[\]]+)*")


def _qualified(where: str | None, prefix: str) -> str | None:
    """A section's validate() names keys from the section (``dedup.threshold``) or from the recipe
    root (``rollout.temperature``); either way, the full dotted key where the section sits."""
    if not where or not prefix or not _KEY_RE.fullmatch(where):
        return where
    parts = prefix.rstrip(".").split(".")
    head = where.split(".")[0]
    if head in parts:  # already names the section: keep what lies above it
        return ".".join(parts[: parts.index(head)] + [where])
    return prefix + where


def _over_default(f: dataclasses.Field, value: Any) -> Any:
    """A partial section laid over its field's default: overriding ``sft.train.max_steps`` keeps
    the rest of a recipe's own default ``sft`` section, not the bare section class's defaults."""
    if f.default_factory is dataclasses.MISSING or not isinstance(value, dict):
        return value
    default = f.default_factory()
    return _deep_merge(to_dict(default), value) if dataclasses.is_dataclass(default) else value


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _deep_merge(out[key], value) if both else value
    return out


def _coerce(tp: Any, value: Any, key: str, source: str) -> Any:
    origin, args = get_origin(tp), get_args(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value if value is not None else {}, prefix=f"{key}.", source=source)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # X | None: X's own error says what is wrong
            return _coerce(options[0], value, key, source)
        # a value already of one of the plain types keeps it ("all-linear" stays a str, not ["all-linear"])
        options.sort(key=lambda a: not (isinstance(a, type) and type(value) is a))
        for arg in options:
            try:
                return _coerce(arg, value, key, source)
            except ConfigError as exc:
                errors.append(exc.message)
        raise ConfigError(
            f"{key}: {value!r} matches none of the allowed types", where=source, fix="; ".join(errors)
        )
    if origin is Literal:
        if value not in args:
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                f"{key}: {value!r} is not one of {', '.join(map(repr, args))}{hint}",
                where=source,
                fix=f"set {key} to one of the listed values",
            )
        return value
    if origin in (list, tuple):
        if isinstance(value, str) and origin is list:
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}", where=source)
        inner = args[0] if args else Any
        return origin(_coerce(inner, v, f"{key}[{i}]", source) for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}", where=source)
        return dict(value)
    return _coerce_scalar(tp, value, key, source)


def _coerce_scalar(tp: Any, value: Any, key: str, source: str) -> Any:
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}", where=source)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}", where=source)
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}", where=source)
    if tp is str:
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}", where=source)
    return value


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-dict view of a config (for config.yaml and run metadata)."""
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
