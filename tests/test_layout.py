"""The layers: improc knows nothing of models or pipeline; models knows nothing of pipeline.

Also checks that default_config.yaml documents exactly the parameters each step has.
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

from pipeline.step import step_classes
from util.config import Config, default_config_path

ROOT = Path(__file__).resolve().parents[1]


def _imports(package: str) -> dict[str, set[str]]:
    found = {}
    for path in (ROOT / package).rglob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(ROOT))] = names
    return found


@pytest.mark.parametrize("package, forbidden", [("improc", {"models", "pipeline", "sqlalchemy"}),
                                                ("models", {"pipeline"}),
                                                ("util", {"pipeline", "models"})])
def test_layers(package, forbidden):
    offenders = {path: names & forbidden for path, names in _imports(package).items() if names & forbidden}
    assert offenders == {}


#: The package's own steps (tests may define more).
PACKAGE_STEPS = sorted(p for p, cls in step_classes().items() if cls.__module__.startswith("pipeline."))


@pytest.mark.parametrize("process", PACKAGE_STEPS)
def test_default_config_lists_every_step_parameter(process):
    params = step_classes()[process].Params
    section = Config.load().section(process)
    fields = {f.name: f for f in dataclasses.fields(params)}
    assert set(section) == set(fields), f"{default_config_path()} [{process}] differs from {params.__name__}"
    defaults = params()
    for name, value in section.items():
        expected = getattr(defaults, name)
        assert (tuple(value) if isinstance(value, list) else value) == expected, f"{process}.{name}"


#: The entry points: the only code that reads a configuration file or sets a library global.
ENTRY_POINTS = {"util/config.py", "models/context.py", "pipeline/cli.py", "pipeline/demo.py",
                "pipeline/fingerprints.py"}


def _calls(attribute: str, owner: str) -> set[str]:
    """Files of the packages that call ``owner.attribute(...)``."""
    found = set()
    for package in ("improc", "models", "pipeline", "util"):
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                        and node.func.attr == attribute and isinstance(node.func.value, ast.Name)
                        and node.func.value.id == owner):
                    found.add(str(path.relative_to(ROOT)))
    return found


def test_only_entry_points_load_a_configuration_or_set_sep_globals():
    assert _calls("load", "Config") <= ENTRY_POINTS
    assert _calls("set_extract_pixstack", "sep") <= {"pipeline/cli.py"}
    assert _calls("set_sub_object_limit", "sep") == set()
