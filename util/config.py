"""Configuration: ``default_config.yaml``, overridden by a user file, overridden by Python.

The defaults document every key.  A user file (``--config FILE`` on the command line, the
``SEECHANGE_CONFIG`` environment variable, or ``Config.load(path)``) is deep-merged on top, and
keyword overrides given in Python win over both.  A key that is not in the defaults, or a value of
the wrong type, is an error naming the key and the file it came from.

Two defaults depend on the environment: ``storage.data_root`` is ``$SEECHANGE_DATA`` or
``~/.seechange``, and ``db.url`` is a SQLite file inside the data root.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

__all__ = ["Config", "ConfigError", "default_config_path"]


class ConfigError(Exception):
    """A configuration file or value is wrong; the message names the key and the file.

    Not a ValueError: a wrong configuration is the operator's to fix, never a property of the
    data, so a step that meets one does not mark its image bad (see ``pipeline.step``).
    """


def default_config_path() -> Path:
    """Path of ``default_config.yaml``: the repository root, else the copy installed with ``util``."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "default_config.yaml", here / "default_config.yaml"):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"default_config.yaml not found next to {here}")


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level, "
                          f"got {type(loaded).__name__}")
    return loaded


def _type_ok(default: Any, value: Any) -> bool:
    """Whether ``value`` may replace ``default``: same kind of value, ints accepted for floats."""
    if default is None or value is None:
        return True
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, (list, tuple)):
        return isinstance(value, (list, tuple))
    return isinstance(value, type(default))


def _merge(base: dict[str, Any], update: Mapping[str, Any], source: str, prefix: str = "") -> None:
    """Deep-merge ``update`` into ``base`` in place, checking keys and types against ``base``."""
    for key, value in update.items():
        dotted = f"{prefix}{key}"
        if key not in base:
            raise ConfigError(f"unknown config key '{dotted}' in {source}")
        current = base[key]
        if isinstance(current, dict):
            if not isinstance(value, Mapping):
                raise ConfigError(f"config key '{dotted}' in {source} must be a mapping, "
                                  f"got {type(value).__name__}")
            _merge(current, value, source, prefix=f"{dotted}.")
        elif not _type_ok(current, value):
            raise ConfigError(f"config key '{dotted}' in {source} must be of type "
                              f"{type(current).__name__}, got {type(value).__name__} {value!r}")
        else:
            base[key] = copy.deepcopy(value)


def _dotted_to_nested(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Turn ``{"db.url": x}`` into ``{"db": {"url": x}}``; nested mappings are merged (copies:
    the caller's dicts are never changed)."""
    nested: dict[str, Any] = {}
    for key, value in overrides.items():
        parts = key.split(".")
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        leaf = parts[-1]
        if isinstance(value, Mapping) and isinstance(node.get(leaf), dict):
            node[leaf].update(copy.deepcopy(dict(value)))
        else:
            node[leaf] = copy.deepcopy(value)
    return nested


class Config:
    """A loaded, validated configuration.

    Use `Config.load` to build one.  Values are read with ``config.get("db.url")`` or
    ``config.section("extraction")``; the object is not meant to be changed after loading.
    """

    def __init__(self, values: dict[str, Any], sources: list[str]):
        self._values = values
        self.sources = sources

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, **overrides: Any) -> Config:
        """Load the defaults, then the user file, then ``overrides``.

        Parameters
        ----------
        path : str or path-like, optional
            User config file.  None means ``$SEECHANGE_CONFIG`` if set, else none.
        **overrides
            Values that win over both files, as nested dicts (``db={"url": ...}``) or with
            dotted keys passed through a dict (``**{"db.url": ...}``).

        Raises
        ------
        ConfigError
            Unknown key, wrong type, unreadable or invalid file; the message names key and file.
        """
        default_path = default_config_path()
        values = _read_yaml(default_path)
        sources = [str(default_path)]
        if path is None and os.environ.get("SEECHANGE_CONFIG"):
            path = os.environ["SEECHANGE_CONFIG"]
        if path is not None:
            user_path = Path(path).expanduser()
            _merge(values, _read_yaml(user_path), str(user_path))
            sources.append(str(user_path))
        if overrides:
            _merge(values, _dotted_to_nested(overrides), "Python overrides")
            sources.append("Python overrides")
        cls._fill_environment_defaults(values)
        return cls(values, sources)

    @staticmethod
    def _fill_environment_defaults(values: dict[str, Any]) -> None:
        storage = values["storage"]
        if not storage.get("data_root"):
            storage["data_root"] = os.environ.get("SEECHANGE_DATA") or str(Path.home() / ".seechange")
        storage["data_root"] = str(Path(storage["data_root"]).expanduser().resolve())
        if not values["db"].get("url"):
            values["db"]["url"] = f"sqlite:///{Path(storage['data_root']) / 'seechange.sqlite'}"

    def get(self, dotted_key: str) -> Any:
        """The value at ``dotted_key`` (e.g. ``"storage.data_root"``); KeyError names the key."""
        node: Any = self._values
        for part in dotted_key.split("."):
            if not isinstance(node, dict) or part not in node:
                raise KeyError(f"no config key '{dotted_key}'")
            node = node[part]
        return copy.deepcopy(node)

    def section(self, name: str) -> dict[str, Any]:
        """A copy of one top-level section, e.g. the parameters of one pipeline step."""
        value = self.get(name)
        if not isinstance(value, dict):
            raise KeyError(f"config key '{name}' is not a section")
        return value

    def to_dict(self) -> dict[str, Any]:
        """A deep copy of every value."""
        return copy.deepcopy(self._values)

    def __repr__(self) -> str:
        return f"Config(sources={self.sources})"
