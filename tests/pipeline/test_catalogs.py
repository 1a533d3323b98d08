"""Reference catalogs: neighbour rejection, proper motions, and the excerpt cache."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from astropy.table import Table
from astropy.time import Time

from models.image import Image
from pipeline.catalogs import CatalogSource, neighbor_free, reference_catalog, stars_at_epoch
from tests.models.synthetic_files import tan_wcs
from util.gaia import write_gaia_folder


def _table(ra, dec, g):
    return Table({"ra": np.asarray(ra, float), "dec": np.asarray(dec, float),
                  "phot_g_mean_mag": np.asarray(g, float)})


def test_neighbor_free_pairs_magnitudes_wrap_and_pole():
    d = 2.0 / 3600.0  # 2" apart
    table = _table([10.0, 10.0 + d, 20.0, 20.0 + d, 359.99995, 0.00005, 30.0, 30.0, 50.0],
                   [0.0, 0.0, 5.0, 5.0, -3.0, -3.0, 89.9999, 89.9999 + 0.5 / 3600, 40.0],
                   [15.0, 16.0, 15.0, 19.5, 16.0, 16.5, 17.0, np.nan, 18.0])
    free = neighbor_free(table)
    # a comparable pair; a 4.5 mag fainter neighbour does not count (for the bright one);
    # a pair across RA = 0; near the pole with a neighbour of unknown G; a lone star
    assert free.tolist() == [False, False, True, False, False, False, False, False, True]
    assert neighbor_free(table, radius_arcsec=1.0).tolist()[:4] == [True, True, True, True]
    with pytest.raises(ValueError, match="radius_arcsec must be > 0"):
        neighbor_free(table, radius_arcsec=0.0)


def test_stars_at_epoch_moves_by_proper_motion():
    table = _table([150.0], [60.0], [15.0])
    table["pmra"], table["pmdec"], table["ref_epoch"] = [100.0], [-50.0], [2016.0]
    mjd = Time(2026.0, format="jyear").mjd
    ra, dec = stars_at_epoch(table, mjd)
    assert (dec[0] - 60.0) * 3.6e6 == pytest.approx(-500.0, abs=0.5)                    # mas
    assert (ra[0] - 150.0) * np.cos(np.radians(60.0)) * 3.6e6 == pytest.approx(1000.0, abs=0.5)


def test_reference_catalog_is_fetched_once_per_field(database, tmp_path):
    rng = np.random.default_rng(3)
    stars = _table(150.0 + rng.uniform(-0.05, 0.05, 200), 2.0 + rng.uniform(-0.05, 0.05, 200),
                   rng.uniform(14, 20, 200))
    folder = tmp_path / "gaia"
    write_gaia_folder(stars, folder)
    image = Image(instrument="Synthetic", filter="r", mjd=60000.0, end_mjd=60000.01, exp_time=60.0,
                  provenance_id="x" * 24, ny=400, nx=400,
                  wcs=tan_wcs(150.0, 2.0, (400, 400), scale_arcsec=0.26))
    source = CatalogSource(kind="gaia_folder", folder=str(folder), mag_limit=19.0)
    first = reference_catalog(image, source)
    inside = np.asarray(first.data["phot_g_mean_mag"]) <= 19.0
    assert len(first.data) == first.num_items > 0 and inside.all()
    assert first.minra < 150.0 - 200 * 0.26 / 3600 and first.maxdec > 2.0 + 200 * 0.26 / 3600
    again = reference_catalog(image, source)
    assert again.id == first.id and len(again.data) == len(first.data)
    # the cache is keyed by content, not by path: the same files elsewhere answer from it ...
    moved = tmp_path / "elsewhere"
    shutil.copytree(folder, moved)
    assert reference_catalog(image, CatalogSource(kind="gaia_folder", folder=str(moved), mag_limit=19.0)).id == first.id
    # ... and changed files, or another magnitude limit or isolation rule, make another excerpt
    other = CatalogSource(kind="gaia_folder", folder=str(folder), mag_limit=20.0)
    assert reference_catalog(image, other).id != first.id
    stricter = CatalogSource(kind="gaia_folder", folder=str(folder), mag_limit=19.0, neighbor_dmag=5.0)
    assert reference_catalog(image, stricter).id != first.id
    write_gaia_folder(stars[:150], moved)
    changed = reference_catalog(image, CatalogSource(kind="gaia_folder", folder=str(moved), mag_limit=19.0))
    assert changed.id != first.id and changed.num_items < first.num_items
    shutil.rmtree(folder)
    with pytest.raises(FileNotFoundError, match="gaia"):      # a configured folder that is gone
        reference_catalog(image, source)
