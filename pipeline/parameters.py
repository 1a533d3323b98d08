"""Typed, documented step parameters.

Each step declares a frozen dataclass of parameters::

    @dataclass(frozen=True, kw_only=True)
    class ExtractionParams(StepParams):
        threshold: float = param(5.0, "Detection threshold, in sigma above the background.")
        max_sources: int = param(100_000, "Fail beyond this many.", affects_result=False)

Every field has a type, a default and a doc, and says whether it changes the result; only those
that do are hashed into the provenance.  Values are checked against the type hints (and
``choices``) when the object is built, and unknown names are rejected, naming the step.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

from util.config import ConfigError

__all__ = ["StepParams", "param", "ParameterError"]


class ParameterError(ConfigError):
    """A parameter name or value is wrong; the message names the step and the parameter.

    A configuration error (not a ValueError): it never marks an image bad.
    """


def param(default: Any, doc: str, *, affects_result: bool = True) -> Any:
    """A documented parameter field.

    Parameters
    ----------
    default : object
        The default value (lists are copied for each instance).
    doc : str
        What the parameter means, with units.
    affects_result : bool
        Whether changing it changes the product (and so the provenance).
    """
    metadata = {"doc": doc, "affects_result": affects_result}
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _matches(value: Any, hint: Any) -> bool:
    """Whether ``value`` fits the type hint (the hints used by step parameters)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return True
    if origin is Literal:
        return value in args
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in args)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (tuple, list):
        if not isinstance(value, (tuple, list)):
            return False
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return all(_matches(v, args[0]) for v in value)
        if origin is tuple and args:
            return len(value) == len(args) and all(_matches(v, a) for v, a in zip(value, args))
        return not args or all(_matches(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    return isinstance(value, origin or hint)


@dataclasses.dataclass(frozen=True, kw_only=True)
class StepParams:
    """Base of every step's parameters; subclasses add fields made with `param`."""

    step_name: ClassVar[str] = "step"

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, list) and typing.get_origin(hints[field.name]) is tuple:
                object.__setattr__(self, field.name, tuple(value))
                value = getattr(self, field.name)
            if not _matches(value, hints[field.name]):
                raise ParameterError(
                    f"{self.step_name} parameter '{field.name}' must be {_describe(hints[field.name])}, "
                    f"got {value!r}")
        self.validate()

    def validate(self) -> None:
        """Checks across fields or of ranges; subclasses raise `ParameterError` naming the field."""

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None = None, **overrides: Any) -> StepParams:
        """Build from a config section, then keyword overrides; unknown names are errors."""
        merged = {**(values or {}), **overrides}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(merged) - known)
        if unknown:
            raise ParameterError(f"unknown {cls.step_name} parameter(s) {', '.join(unknown)}; "
                                 f"known: {', '.join(sorted(known))}")
        return cls(**merged)

    def hashed(self) -> dict[str, Any]:
        """The parameters that change the result: what goes into the provenance."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.metadata.get("affects_result", True)}

    def kwargs_for(self, function: Any) -> dict[str, Any]:
        """The parameters named like keyword arguments of ``function`` (passed on unchanged, so a
        parameter and the algorithm's argument are one name)."""
        import inspect

        accepted = inspect.signature(function).parameters
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name in accepted}

    def to_dict(self) -> dict[str, Any]:
        """All parameters."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def yaml_section(cls, width: int = 100) -> str:
        """The step's section of ``default_config.yaml``: every parameter with its doc and default
        (a developer tool: ``tests/test_layout.py`` checks the file against the parameters)."""
        import textwrap

        import yaml

        lines = [f"{cls.step_name}:"]
        summary = (cls.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")
        lines += textwrap.wrap(" ".join(summary.split()), width - 4, initial_indent="  # ",
                               subsequent_indent="  # ")
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            doc = f.metadata.get("doc", "")
            if not f.metadata.get("affects_result", True):
                doc += " (Does not change results; not in the provenance.)"
            lines += textwrap.wrap(doc, width - 4, initial_indent="  # ", subsequent_indent="  # ")
            value = list(default) if isinstance(default, tuple) else default
            text = yaml.safe_dump({f.name: value}, default_flow_style=True, width=1000).strip()
            lines.append("  " + text[1:-1] if text.startswith("{") else "  " + text)
        return "\n".join(lines) + "\n"

    @classmethod
    def describe(cls) -> str:
        """One line per parameter: name, type, default, whether hashed, and the doc."""
        hints = typing.get_type_hints(cls)
        lines = []
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            hashed = "" if f.metadata.get("affects_result", True) else " [not hashed]"
            lines.append(f"{f.name} ({_describe(hints[f.name])}, default {default!r}){hashed}: "
                         f"{f.metadata.get('doc', '')}")
        return "\n".join(lines)


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
