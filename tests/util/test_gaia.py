"""Tests of util.gaia: the healpix-chunked Gaia readers and the ADQL builder (no network)."""

from __future__ import annotations

import re

import astropy.units as u
import numpy as np
import pytest
from astropy.table import Table, vstack

from util.gaia import (GAIA_COLUMNS, CatalogError, gaia_adql, healpix_ring_index, query_gaia_astroquery,
                       read_gaia_folder)


def _gaia_dir(shared_data, case: str):
    folder = shared_data / "legacypipe" / case / "gaia"
    if not folder.is_dir():
        pytest.fail(f"Gaia chunks for {case} missing: {folder}")
    return folder


def _brute_force(folder, ra_min, ra_max, dec_min, dec_max):
    """Rows of every file in the folder inside the box, by plain astropy reads."""
    table = vstack([Table.read(p) for p in sorted(folder.glob("chunk-*.fits"))])
    ra, dec = np.asarray(table["ra"]), np.asarray(table["dec"])
    in_ra = (ra >= ra_min) & (ra <= ra_max) if ra_min <= ra_max else (ra >= ra_min) | (ra <= ra_max)
    return table[in_ra & (dec >= dec_min) & (dec <= dec_max)]


@pytest.mark.real_data
def test_healpix_index_matches_legacypipe_chunk_names(shared_data):
    n_checked = 0
    for folder in (_gaia_dir(shared_data, "testcase6"), _gaia_dir(shared_data, "testcase8")):
        for path in sorted(folder.glob("chunk-*.fits")):
            table = Table.read(path)
            chunk = int(re.search(r"chunk-(\d+)", path.name).group(1))
            assert np.all(healpix_ring_index(table["ra"], table["dec"], nside=32) == chunk), path.name
            n_checked += len(table)
    assert n_checked > 1500


def test_healpix_index_is_equal_area_and_covers_the_sphere():
    rng = np.random.default_rng(0)
    n, nside = 400_000, 4
    ra = rng.uniform(0, 360, n)
    dec = np.degrees(np.arcsin(rng.uniform(-1, 1, n)))
    counts = np.bincount(healpix_ring_index(ra, dec, nside=nside), minlength=12 * nside ** 2)
    assert len(counts) == 192
    expected = n / 192
    assert np.all(np.abs(counts - expected) < 5 * np.sqrt(expected))
    # Ring order: pixel 0 touches the north pole, the last one the south pole.
    poles = healpix_ring_index(np.array([10.0, 10.0]), np.array([89.99, -89.99]), nside=nside)
    assert poles.tolist() == [0, 188]  # the last ring's 4 pixels are 188..191, by increasing RA


@pytest.mark.real_data
def test_read_testcase8_box_across_two_chunks(shared_data):
    folder = _gaia_dir(shared_data, "testcase8")
    box = dict(ra_min=120.90, ra_max=121.10, dec_min=4.86, dec_max=5.00)
    table = read_gaia_folder(folder, **box)
    expected = _brute_force(folder, *box.values())
    assert len(table) == len(expected) and len(table) > 200
    assert sorted(table["source_id"]) == sorted(expected["source_id"])
    assert table.colnames == list(GAIA_COLUMNS)
    assert table["ra"].unit == u.deg and table["pmra"].unit == u.mas / u.yr
    assert table["ra_error"].unit == u.mas and table["phot_g_mean_mag"].unit == u.mag
    assert table["ra"].dtype == np.float64 and table["source_id"].dtype == np.int64
    ra, dec = np.asarray(table["ra"]), np.asarray(table["dec"])
    assert np.all((ra >= 120.90) & (ra <= 121.10) & (dec >= 4.86) & (dec <= 5.00))
    assert np.all(table["ref_epoch"] == 2015.5)  # Gaia DR2
    assert np.isnan(table["pmra"]).any()  # two-parameter solutions have no proper motion
    # Stars from both chunks that reach into the box (5483 and 5611) are there.
    chunks = set(healpix_ring_index(ra, dec).tolist())
    assert chunks == {5483, 5611}
    same = read_gaia_folder(folder, nside=None, **box)  # reading every file gives the same stars
    assert sorted(same["source_id"]) == sorted(table["source_id"])


@pytest.mark.real_data
def test_read_testcase6_box_and_empty_box(shared_data):
    folder = _gaia_dir(shared_data, "testcase6")
    box = dict(ra_min=110.2, ra_max=110.3, dec_min=24.0, dec_max=24.1)
    table = read_gaia_folder(folder, **box)
    assert len(table) == len(_brute_force(folder, *box.values())) > 50
    empty = read_gaia_folder(folder, ra_min=200.0, ra_max=201.0, dec_min=-10.0, dec_max=-9.0)
    assert len(empty) == 0 and empty.colnames == list(GAIA_COLUMNS)


@pytest.mark.real_data
def test_read_box_across_ra_zero(shared_data, tmp_path):
    """Real rows moved to straddle RA = 0 (and a corner of four healpix pixels), written as
    chunks named by their pixel."""
    rows = Table.read(_gaia_dir(shared_data, "testcase6") / "chunk-03687.fits")
    rows["ra"] = np.mod(rows["ra"] - 110.2, 360.0)  # now 359.87 .. 0.16
    rows["dec"] += 0.6  # now 24.47 .. 24.73
    pixels = healpix_ring_index(rows["ra"], rows["dec"])
    for pixel in np.unique(pixels):
        rows[pixels == pixel].write(tmp_path / f"chunk-{pixel:05d}.fits")
    assert len(np.unique(pixels)) == 4
    table = read_gaia_folder(tmp_path, ra_min=359.95, ra_max=0.05, dec_min=24.5, dec_max=24.7)
    ra = np.asarray(rows["ra"])
    inside = ((ra >= 359.95) | (ra <= 0.05)) & (rows["dec"] >= 24.5) & (rows["dec"] <= 24.7)
    assert len(table) == inside.sum() > 100
    assert (table["ra"] > 359).any() and (table["ra"] < 1).any()
    east = read_gaia_folder(tmp_path, ra_min=0.0, ra_max=0.05, dec_min=24.5, dec_max=24.7)
    assert len(east) == np.count_nonzero(inside & (ra <= 0.05))


def test_missing_optional_columns_become_nan(tmp_path):
    mini = Table({"RA": [10.0, 10.1], "DEC": [-5.0, -5.1], "phot_g_mean_mag": [15.0, 16.0]})
    mini.write(tmp_path / "mini.fits")
    table = read_gaia_folder(tmp_path, ra_min=9.0, ra_max=11.0, dec_min=-6.0, dec_max=-4.0)
    assert len(table) == 2 and table.colnames == list(GAIA_COLUMNS)
    assert np.all(np.isnan(table["pmra"])) and np.all(np.isnan(table["phot_bp_mean_mag"]))
    assert np.all(table["source_id"] == -1)


def test_wrong_format_files_raise_catalog_error_naming_them(tmp_path):
    bad = tmp_path / "chunk-00001.fits"
    bad.write_bytes(b"this is not a FITS file at all" * 100)
    with pytest.raises(CatalogError, match="chunk-00001.fits"):
        read_gaia_folder(tmp_path, ra_min=0.0, ra_max=360.0, dec_min=-90.0, dec_max=90.0)
    bad.unlink()
    Table({"ra": [1.0], "phot_g_mean_mag": [15.0]}).write(tmp_path / "nodec.fits")
    with pytest.raises(CatalogError, match=r"nodec.fits lacks required column\(s\) \['dec'\]"):
        read_gaia_folder(tmp_path, ra_min=0.0, ra_max=10.0, dec_min=-10.0, dec_max=10.0)
    assert not issubclass(CatalogError, ValueError)   # the set-up's fault: never marks an image bad


def test_read_argument_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_folder"):
        read_gaia_folder(tmp_path / "no_such_folder", ra_min=0.0, ra_max=1.0, dec_min=0.0, dec_max=1.0)
    with pytest.raises(ValueError, match="need -90 <= dec_min <= dec_max <= 90, got dec_min=2.0, dec_max=1"):
        read_gaia_folder(tmp_path, ra_min=0.0, ra_max=1.0, dec_min=2.0, dec_max=1.0)
    with pytest.raises(ValueError, match=r"ra_max must be in \[0, 360\] degrees, got 400.0"):
        read_gaia_folder(tmp_path, ra_min=0.0, ra_max=400.0, dec_min=0.0, dec_max=1.0)


def test_adql_query_text():
    adql = gaia_adql(ra=120.95, dec=5.0, radius_deg=0.15, mag_limit=20.5)
    assert adql.startswith("SELECT source_id, ra, dec, ra_error, dec_error, pmra, pmdec, parallax, "
                           "ref_epoch, phot_g_mean_mag, phot_bp_mean_mag, phot_rp_mean_mag "
                           "FROM gaiadr3.gaia_source ")
    assert "1 = CONTAINS(POINT('ICRS', ra, dec), CIRCLE('ICRS', 120.95, 5.0, 0.15))" in adql
    assert adql.endswith("AND phot_g_mean_mag < 20.5")
    assert "gaiadr2.gaia_source" in gaia_adql(ra=1.0, dec=2.0, radius_deg=0.1, table="gaiadr2.gaia_source")


def test_adql_and_query_reject_bad_arguments_before_any_network_use():
    with pytest.raises(ValueError, match="radius_deg must be in \\(0, 10\\], got 0.0"):
        gaia_adql(ra=1.0, dec=2.0, radius_deg=0.0)
    with pytest.raises(ValueError, match="dec must be a finite number, got nan"):
        gaia_adql(ra=1.0, dec=float("nan"), radius_deg=0.1)
    with pytest.raises(ValueError, match="table must look like 'schema.table'"):
        gaia_adql(ra=1.0, dec=2.0, radius_deg=0.1, table="gaiadr3.gaia_source; DROP TABLE x")
    with pytest.raises(ValueError, match="need 0 <= ra < 360"):
        query_gaia_astroquery(ra=-5.0, dec=0.0, radius_deg=0.1)  # fails in the builder, no connection
