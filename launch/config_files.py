"""Reading launch and node files: YAML (or JSON), ``${VAR}`` from the environment, ``--set`` overrides.

- ``${NAME}`` anywhere in a string value is replaced by the environment variable
  ``NAME``; ``${NAME:-default}`` falls back to ``default``. An unset variable with no
  default is an error naming it (credentials never silently become empty). A value that is just
  one variable is read as YAML, so ``${PORT}`` can be a number and an empty ``${CA:-}`` means unset.
- ``--set a.b=value`` sets a nested key; the value is read as YAML (``3``, ``true``,
  ``[1, 2]``, ``{x: 1}``), so numbers and lists keep their types.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class ConfigFileError(ValueError):
    """A config file that cannot be read; the message names the file and the key."""


def expand_env(value: Any, where: str = "") -> Any:
    """``${VAR}`` / ``${VAR:-default}`` replaced in every string of a nested structure."""
    if isinstance(value, dict):
        return {k: expand_env(v, f"{where}.{k}" if where else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_env(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def replace(match: re.Match) -> str:
        name, default = match.group(1), match.group(2)
        if name in os.environ:
            return os.environ[name]
        if default is not None:
            return default
        raise ConfigFileError(f"{where}: environment variable {name} is not set")

    expanded = _VAR.sub(replace, value)
    if _VAR.fullmatch(value):  # a whole-value variable keeps YAML typing ("3" -> 3; empty -> null, i.e. unset)
        return yaml.safe_load(expanded)
    return expanded


def apply_sets(data: dict, assignments: list[str]) -> dict:
    """``["a.b=1", ...]`` applied to ``data`` (a new dict)."""
    out = dict(data)
    for item in assignments:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigFileError(f"--set {item!r}: expected KEY=VALUE")
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            node[part] = dict(child) if isinstance(child, dict) else {}
            node = node[part]
        node[parts[-1]] = yaml.safe_load(raw) if raw else ""
    return out


def load_config_file(path: Path, sets: list[str] | None = None, section: str | None = None) -> dict:
    """The file's mapping (its ``section`` when it has one), with the environment and ``sets`` applied."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as err:
        raise ConfigFileError(f"{path}: {err.strerror}") from err
    except yaml.YAMLError as err:
        raise ConfigFileError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigFileError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    if section is not None and isinstance(data.get(section), dict):
        data = data[section]
    return expand_env(apply_sets(data, sets or []), str(path))
