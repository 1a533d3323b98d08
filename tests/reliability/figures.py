"""The campaign's figures, gathered while the tests run and printed at the end of the session."""

from __future__ import annotations

import json
import os
from collections import defaultdict

#: figure name -> back end (or "any") -> value
FIGURES: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))

#: Write the figures as JSON here when set (``python -m tests.reliability`` sets it).
OUTPUT_VARIABLE = "SEECHANGE_CAMPAIGN_FIGURES"


def record(name: str, backend: str = "any", value: float = 1.0) -> None:
    """Add ``value`` to a figure."""
    FIGURES[name][backend] += value


def lines() -> list[str]:
    return [f"{name}: " + ", ".join(f"{backend} {value:g}" for backend, value in sorted(per.items()))
            for name, per in sorted(FIGURES.items())]


def dump() -> None:
    path = os.environ.get(OUTPUT_VARIABLE)
    if path and FIGURES:
        with open(path, "w") as handle:
            json.dump({k: dict(v) for k, v in FIGURES.items()}, handle, indent=1, sort_keys=True)
