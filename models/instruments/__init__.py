"""Built-in instruments: DECam, Synthetic, Generic, and the YAML definitions in this folder.

`models.instrument` loads them on first use; add your own with the config key
``instruments.extra_files`` (see ``docs/instruments.md``).
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["builtin_instruments", "builtin_yaml_files"]


def builtin_instruments() -> list:
    """One instance of every instrument defined in Python here."""
    from models.instruments.decam import DECam
    from models.instruments.generic import GENERIC_DEFINITION, GenericInstrument
    from models.instruments.synthetic import Synthetic

    return [DECam(), Synthetic(), GenericInstrument(GENERIC_DEFINITION, source="GENERIC_DEFINITION")]


def builtin_yaml_files() -> list[Path]:
    """The ``*.yaml`` instrument definitions shipped in this folder, sorted."""
    return sorted(Path(__file__).resolve().parent.glob("*.yaml"))
