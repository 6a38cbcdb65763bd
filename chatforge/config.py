"""Options, declared once: config dataclasses whose fields carry their help, flag and valid range.

`option(...)` declares a field; the CLI generates its flags from the fields (`cli.add_options`), and
`build` makes a config from defaults < `--config FILE.yaml` < flags typed on the command line, checking
every value's type and range before any work starts. Shared groups of options are base classes (the
YAML stays flat) or nested dataclass fields (their flags are flat all the same).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from chatforge.errors import ChatforgeError

T = TypeVar("T")


def option(default: Any = dataclasses.MISSING, help: str = "", *, flag: str | None = None,
           metavar: str | None = None, choices: tuple | None = None, min: float | None = None,
           max: float | None = None, exclusive_min: bool = False, positional: bool = False,
           cli: bool = True) -> Any:
    """A config field with its documentation and valid range (checked by `check_fields`)."""
    meta = {"help": help, "flag": flag, "metavar": metavar, "choices": choices, "min": min, "max": max,
            "exclusive_min": exclusive_min, "positional": positional, "cli": cli}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@functools.cache
def type_hints(cls) -> dict:
    """The resolved field types of a config class (computed once: requests validate their sampling)."""
    return typing.get_type_hints(cls)


def flag_name(f: dataclasses.Field) -> str:
    if f.metadata.get("positional"):
        return f.name.upper()
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def field_kind(annotation) -> tuple[type, bool, bool]:
    """(scalar type, may be None, is a list) of a field's annotation such as `int | None` or `list[str]`."""
    optional = False
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional, annotation = True, args[0]
    if typing.get_origin(annotation) is list:
        return typing.get_args(annotation)[0], optional, True
    return annotation, optional, False


def _kind_name(kind: type) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(kind, kind.__name__)


def coerce(f: dataclasses.Field, annotation, value: Any) -> Any:
    """`value` as the field's type (an int for a float field, one string for a list), or ChatforgeError."""
    kind, optional, is_list = field_kind(annotation)
    label = flag_name(f)
    if value is None:
        if optional or f.default is None:
            return None
        raise ChatforgeError(f"{label} needs a value")
    if is_list:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]  # `data: corpus.txt` in YAML means one source
        if not isinstance(value, list):
            raise ChatforgeError(f"{label} must be a list of values ({_kind_name(kind)} each), got {value!r}")
        return [_scalar(label, kind, v) for v in value]
    return _scalar(label, kind, value)


def _scalar(label: str, kind: type, value: Any) -> Any:
    if kind in (int, float) and isinstance(value, str):  # YAML reads 3e-4 as a string
        try:
            number = float(value)
            value = int(number) if kind is int and number.is_integer() and "." not in value else number
        except (ValueError, OverflowError):
            pass
    if kind is bool:
        if not isinstance(value, bool):
            raise ChatforgeError(f"{label} must be true or false, got {value!r}")
        return value
    if kind is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ChatforgeError(f"{label} must be an integer, got {value!r}")
        return value
    if kind is float:
        try:
            finite = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        except OverflowError:  # an int too large for a float
            finite = False
        if not finite:
            raise ChatforgeError(f"{label} must be a finite number, got {str(value)[:40]}")
        return float(value)
    if kind is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)  # a YAML `model: 1234` is a folder named 1234
        if not isinstance(value, str):
            raise ChatforgeError(f"{label} must be a string, got {value!r}")
        try:  # bytes that are not UTF-8 reach argv as lone surrogates, which no tokenizer or JSON file takes
            value.encode("utf-8")
        except UnicodeEncodeError:
            if not os.path.lexists(value):  # the name of an existing file or folder is taken as it is
                raise ChatforgeError(f"{label}: not valid UTF-8 text, got {value!r}") from None
        return value
    return value


def check_range(f: dataclasses.Field, value: Any) -> None:
    meta, label = f.metadata, flag_name(f)
    for v in value if isinstance(value, list) else [value]:
        if v is None:
            continue
        if meta.get("choices") and v not in meta["choices"]:
            raise ChatforgeError(f"{label} must be one of {', '.join(map(str, meta['choices']))}, got {v!r}")
        low, high = meta.get("min"), meta.get("max")
        if low is not None and (v < low or (meta.get("exclusive_min") and v == low)):
            bound = f"> {low}" if meta.get("exclusive_min") else f">= {low}"
            raise ChatforgeError(f"{label} must be {bound}" + (f" and <= {high}" if high is not None else "")
                                 + f", got {v}")
        if high is not None and v > high:
            raise ChatforgeError(f"{label} must be <= {high}, got {v}")


def check_fields(obj) -> None:
    """Check (and normalise in place) every field of a config object: type, then range."""
    hints = type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            check_fields(value)
            continue
        value = coerce(f, hints[f.name], value)
        check_range(f, value)
        object.__setattr__(obj, f.name, value)


def nested_groups(cls) -> dict[str, type]:
    """Fields of `cls` that are option groups of their own (a nested dataclass): name -> class."""
    hints = type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if dataclasses.is_dataclass(hints[f.name])}


def option_names(cls) -> set[str]:
    """Every option of `cls`, nested groups' options included (flat)."""
    groups = nested_groups(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.name not in groups}
    for group in groups.values():
        names |= option_names(group)
    return names


class _UniqueKeys(yaml.SafeLoader):
    """safe_load, except that a key given twice in one mapping is an error (YAML would keep the last)."""

    def construct_mapping(self, node, deep=False):
        self.flatten_mapping(node)  # `<<: *anchor` merges first, as safe_load does
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, str) and key.replace("-", "_") in seen:
                raise yaml.constructor.ConstructorError(None, None, f"{key!r} is given twice", key_node.start_mark)
            seen.add(key.replace("-", "_") if isinstance(key, str) else None)
        return super().construct_mapping(node, deep)


def load_yaml(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.load(handle, Loader=_UniqueKeys) or {}
    except OSError as err:
        raise ChatforgeError(f"{path}: cannot read config ({err.strerror})") from None
    except UnicodeDecodeError:
        raise ChatforgeError(f"{path}: the config file is not UTF-8 text") from None
    except yaml.YAMLError as err:
        raise ChatforgeError(f"{path}: invalid YAML ({' '.join(str(err).split())})") from None
    except RecursionError:
        raise ChatforgeError(f"{path}: invalid YAML (nested too deeply)") from None
    if not isinstance(data, dict):
        raise ChatforgeError(f"{path}: a config file must be a mapping of option: value")
    bad = [k for k in data if not isinstance(k, str)]
    if bad:
        raise ChatforgeError(f"{path}: option names must be text, got {bad[0]!r}")
    return {k.replace("-", "_"): v for k, v in data.items()}


def build(cls: type[T], yaml_path: str | None = None, **overrides: Any) -> T:
    """`cls` from its defaults, an optional YAML file and explicit overrides; every value checked, then
    the class's own `validate()` (checks across options) when it has one."""
    values = load_yaml(yaml_path) if yaml_path else {}
    values.update(overrides)
    unknown = sorted(set(values) - option_names(cls))
    if unknown:
        raise ChatforgeError(f"{yaml_path or 'options'}: unknown option(s) {', '.join(unknown)} for {cls.__name__}")
    cfg = _construct(cls, values)
    check_fields(cfg)
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


def _construct(cls, values: dict):
    groups = nested_groups(cls)
    own = {k: v for k, v in values.items() if k in {f.name for f in dataclasses.fields(cls)} and k not in groups}
    for name, group in groups.items():
        sub = {k: v for k, v in values.items() if k in option_names(group)}
        default = next(f for f in dataclasses.fields(cls) if f.name == name).default_factory()
        own[name] = _construct(group, {**dataclasses.asdict(default), **sub})
    return cls(**own)


def save(cfg, path: str | Path) -> None:
    """Write the fully resolved config; `--config` on this file reproduces the run."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        yaml.safe_dump(dataclasses.asdict(cfg), handle, sort_keys=False, allow_unicode=True)
