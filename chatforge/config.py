"""One config dataclass per stage, loadable from YAML and saved into the run directory.

Precedence: dataclass defaults < `--config FILE.yaml` < flags given on the command line. The CLI
declares its flags with `default=argparse.SUPPRESS`, so only flags the user actually typed override.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, TypeVar

import yaml

from chatforge.errors import ChatforgeError

T = TypeVar("T")


def load_yaml(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle) or {}
    except OSError as err:
        raise ChatforgeError(f"{path}: cannot read config ({err.strerror})") from None
    except yaml.YAMLError as err:
        raise ChatforgeError(f"{path}: invalid YAML ({err})") from None
    if not isinstance(data, dict):
        raise ChatforgeError(f"{path}: a config file must be a mapping of option: value")
    return {k.replace("-", "_"): v for k, v in data.items()}


def build(cls: type[T], yaml_path: str | None = None, **overrides: Any) -> T:
    """Instantiate `cls` from defaults, an optional YAML file and explicit overrides."""
    values = load_yaml(yaml_path) if yaml_path else {}
    values.update(overrides)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        where = yaml_path or "options"
        raise ChatforgeError(f"{where}: unknown option(s) {', '.join(unknown)} for {cls.__name__}")
    return cls(**values)


def save(cfg, path: str | Path) -> None:
    """Write the fully resolved config; `--config` on this file reproduces the run."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        yaml.safe_dump(dataclasses.asdict(cfg), handle, sort_keys=False, allow_unicode=True)
