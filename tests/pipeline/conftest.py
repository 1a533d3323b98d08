"""Fixtures for pipeline tests: simulated exposures on disk with their Gaia catalog folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from improc.simulator import SimulationParams, simulate_image
from models.instruments.synthetic import write_simulated_file
from util.config import Config
from util.gaia import write_gaia_folder


@dataclass
class SimulatedField:
    """Simulated exposures written as raw files, the simulations, and a Gaia catalog folder."""

    paths: list[Path]
    sims: list
    gaia_folder: Path

    def config(self, database, **overrides) -> Config:
        """A configuration of the test database whose calibration steps read the field's catalog folder."""
        catalog = {"catalog": "gaia_folder", "catalog_folder": str(self.gaia_folder)}
        return database.config(**{"astrocal": catalog, "photocal": catalog, **overrides})


def make_field(folder: Path, *, n: int = 1, size: int = 512, seed: int = 11, raw: bool = True,
               **params) -> SimulatedField:
    """``n`` exposures of one simulated field by one detector (same stars, galaxies and bad
    columns; new noise and pointing)."""
    folder.mkdir(parents=True, exist_ok=True)
    params = {"star_density": 100000.0, "pointing_error_arcsec": 10.0, "rotation_error_deg": 0.3,
              "scene_seed": seed, "detector_seed": seed, **params}
    sims, paths = [], []
    for k in range(n):
        sim = simulate_image(SimulationParams(nx=size, ny=size, seed=seed + 100 + k,
                                              mjd=60000.1 + k, **params))
        sims.append(sim)
        paths.append(write_simulated_file(sim, folder / f"sim_{k}.fits", raw=raw, seed=k))
    write_gaia_folder(sims[0].gaia, folder / "gaia")
    return SimulatedField(paths=paths, sims=sims, gaia_folder=folder / "gaia")


@pytest.fixture(scope="session")
def sim_field(tmp_path_factory) -> SimulatedField:
    """One 1024 x 1024 raw simulated exposure with a Gaia folder (shared, read-only)."""
    return make_field(tmp_path_factory.mktemp("simfield"), n=1, size=1024)
