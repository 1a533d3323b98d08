import numpy as np
import pytest
import astropy.units as u
from astropy.coordinates import SkyCoord
from scipy.spatial import cKDTree

from improc.catalog_stars import stars_at_epoch
from improc.matching import match_pixels, match_sky, neighbor_free


def _astropy_match(ra1, dec1, ra2, dec2, radius_arcsec):
    """What pipeline/photo_cal.py did before `match_sky`."""
    idx, sep, _ = SkyCoord(ra1 * u.deg, dec1 * u.deg).match_to_catalog_sky(SkyCoord(ra2 * u.deg, dec2 * u.deg))
    ok = sep.arcsec < radius_arcsec
    return np.flatnonzero(ok), idx[ok], sep.arcsec[ok]


def _field(rng, ra0, dec0, n, half_width_deg):
    """n random positions in a box about (ra0, dec0), RA wrapped to [0, 360)."""
    dec = np.clip(dec0 + rng.uniform(-half_width_deg, half_width_deg, n), -90.0, 90.0)
    ra = (ra0 + rng.uniform(-half_width_deg, half_width_deg, n) / max(np.cos(np.radians(dec0)), 0.02)) % 360.0
    return ra, dec


@pytest.mark.parametrize("ra0, dec0", [(150.0, 2.0), (0.0, -30.0), (359.99, 45.0), (10.0, 89.9),
                                       (200.0, -89.95)])
def test_match_sky_gives_the_pairs_of_astropy(ra0, dec0):
    rng = np.random.default_rng(int(ra0 * 100 + dec0 + 100))
    ra2, dec2 = _field(rng, ra0, dec0, 3000, 0.05)
    # set 1: perturbed copies of some of set 2 (up to ~3"), plus unrelated points
    pick = rng.choice(len(ra2), 800, replace=False)
    ra1, dec1 = _field(rng, ra0, dec0, 400, 0.05)
    dra = rng.normal(0, 1.0, len(pick)) / 3600.0 / np.maximum(np.cos(np.radians(dec2[pick])), 0.02)
    ra1 = np.concatenate([(ra2[pick] + dra) % 360.0, ra1])
    dec1 = np.concatenate([np.clip(dec2[pick] + rng.normal(0, 1.0, len(pick)) / 3600.0, -90, 90), dec1])
    for radius in (0.5, 1.0, 3.0):
        i1, i2, sep = match_sky(ra1, dec1, ra2, dec2, radius_arcsec=radius)
        a1, a2, asep = _astropy_match(ra1, dec1, ra2, dec2, radius)
        assert len(a1) > 100
        np.testing.assert_array_equal(i1, a1)
        np.testing.assert_array_equal(i2, a2)
        np.testing.assert_allclose(sep, asep, rtol=0, atol=1e-9)
        assert np.all(sep < radius)


def test_match_sky_across_ra_zero_and_the_pole():
    # 0.5" apart across RA = 0; 1" apart on either side of the pole
    i1, i2, sep = match_sky([359.99999, 0.0, 90.0], [0.0, 89.99986, 89.99986],
                            [0.0000389, 270.0], [0.0, 89.99986], radius_arcsec=2.0)
    np.testing.assert_array_equal(i1, [0, 1, 2])
    np.testing.assert_array_equal(i2, [0, 1, 1])
    np.testing.assert_allclose(sep[0], 0.1760, atol=1e-3)
    np.testing.assert_allclose(sep[1], np.hypot(0.504, 0.504), atol=1e-2)
    np.testing.assert_allclose(sep[2], 1.008, atol=1e-2)


def test_match_sky_is_strict_and_nearest():
    dec = 1.0 / 3600.0
    i1, i2, sep = match_sky([10.0], [0.0], [10.0, 10.0], [2 * dec, -dec], radius_arcsec=1.5)
    np.testing.assert_array_equal(i2, [1])
    np.testing.assert_allclose(sep, [1.0])
    i1, _, _ = match_sky([10.0], [0.0], [10.0], [dec], radius_arcsec=float(match_sky(
        [10.0], [0.0], [10.0], [dec], radius_arcsec=2.0)[2][0]))
    assert len(i1) == 0     # a pair exactly at the radius does not match


@pytest.mark.parametrize("args", [([], [], [1.0], [1.0]), ([1.0], [1.0], [], [])])
def test_match_sky_empty_inputs(args):
    i1, i2, sep = match_sky(*args, radius_arcsec=1.0)
    assert i1.dtype.kind == "i" and i2.dtype.kind == "i"
    assert len(i1) == len(i2) == len(sep) == 0


def test_match_sky_non_finite_positions_never_match():
    i1, i2, _ = match_sky([10.0, np.nan, 10.0], [0.0, 0.0, 0.0], [np.nan, 10.0], [0.0, 0.0], radius_arcsec=1.0)
    np.testing.assert_array_equal(i1, [0, 2])
    np.testing.assert_array_equal(i2, [1, 1])


@pytest.mark.parametrize("kwargs, match", [
    (dict(radius_arcsec=0.0), "radius_arcsec must be finite and > 0, got 0.0"),
    (dict(radius_arcsec=np.nan), "radius_arcsec must be finite"),
])
def test_match_sky_bad_radius(kwargs, match):
    with pytest.raises(ValueError, match=match):
        match_sky([1.0], [1.0], [1.0], [1.0], **kwargs)


def test_match_sky_bad_shapes_and_declinations():
    with pytest.raises(ValueError, match="ra1 and dec1 must be 1-d arrays of one length"):
        match_sky([1.0, 2.0], [1.0], [1.0], [1.0], radius_arcsec=1.0)
    with pytest.raises(ValueError, match=r"dec2 must be within \[-90, 90\] degrees, got 91.0"):
        match_sky([1.0], [1.0], [1.0], [91.0], radius_arcsec=1.0)


def test_match_pixels_nearest_within_radius():
    rng = np.random.default_rng(3)
    x2, y2 = rng.uniform(0, 500, (2, 400))
    x1 = np.concatenate([x2[:200] + rng.normal(0, 0.7, 200), rng.uniform(0, 500, 50)])
    y1 = np.concatenate([y2[:200] + rng.normal(0, 0.7, 200), rng.uniform(0, 500, 50)])
    i1, i2, sep = match_pixels(x1, y1, x2, y2, radius=2.0)
    dist, nearest = cKDTree(np.column_stack([x2, y2])).query(np.column_stack([x1, y1]))
    np.testing.assert_array_equal(i1, np.flatnonzero(dist < 2.0))
    np.testing.assert_array_equal(i2, nearest[dist < 2.0])
    np.testing.assert_allclose(sep, dist[dist < 2.0])
    assert np.mean(i2[i1 < 200] == i1[i1 < 200]) > 0.95


def test_match_pixels_edge_cases():
    i1, i2, sep = match_pixels([0.0, 5.0], [0.0, 0.0], [3.0, 5.5, np.nan], [4.0, 0.0, 0.0], radius=5.0)
    np.testing.assert_array_equal(i1, [1])      # (0, 0) to (3, 4) is exactly 5: no match
    np.testing.assert_array_equal(i2, [1])
    np.testing.assert_allclose(sep, [0.5])
    i1, i2, sep = match_pixels([], [], [1.0], [1.0], radius=1.0)
    assert i1.dtype.kind == "i" and len(i1) == len(i2) == len(sep) == 0
    with pytest.raises(ValueError, match="radius must be finite and > 0, got -1.0"):
        match_pixels([1.0], [1.0], [1.0], [1.0], radius=-1.0)
    with pytest.raises(ValueError, match="x2 and y2 must be 1-d arrays of one length"):
        match_pixels([1.0], [1.0], [1.0], [1.0, 2.0], radius=1.0)


def test_neighbor_free():
    arcsec = 1.0 / 3600.0
    ra = np.array([10.0, 10.0 + 2 * arcsec, 20.0, 20.0 + 2 * arcsec, 30.0, 30.0 + 2 * arcsec, 40.0, 50.0])
    dec = np.zeros(len(ra))
    g = np.array([15.0, 19.0, 15.0, 17.0, 15.0, np.nan, 16.0, 16.0])
    free = neighbor_free(ra, dec, g, radius_arcsec=3.0, dmag=3.0)
    # a neighbour 4 mag fainter spoils nothing (but the faint one has the bright neighbour);
    # 2 mag fainter spoils both; one without a magnitude spoils both; the lone stars are free
    np.testing.assert_array_equal(free, [True, False, False, False, False, False, True, True])
    np.testing.assert_array_equal(neighbor_free(ra, dec, g, radius_arcsec=1.0, dmag=3.0), np.ones(8, bool))
    np.testing.assert_array_equal(neighbor_free(ra[:1], dec[:1], g[:1], radius_arcsec=3.0, dmag=3.0), [True])
    with pytest.raises(ValueError, match="radius_arcsec must be > 0 and dmag >= 0, got 0.0 and 3.0"):
        neighbor_free(ra, dec, g, radius_arcsec=0.0, dmag=3.0)
    with pytest.raises(ValueError, match="mag must have the shape of ra"):
        neighbor_free(ra, dec, g[:3], radius_arcsec=3.0, dmag=3.0)


def test_stars_at_epoch():
    ra, dec = np.array([359.9999, 150.0, 150.0]), np.array([0.0, 2.0, 2.0])
    pmra, pmdec = np.array([3600.0, np.nan, 0.0]), np.array([0.0, 1800.0, 0.0])
    ref_epoch = np.array([2016.0, np.nan, 2015.5])
    mjd_2026 = 61041.0        # 2026-01-01, 9.9993 Julian years after J2016.0
    out_ra, out_dec = stars_at_epoch(ra, dec, pmra, pmdec, ref_epoch, mjd=mjd_2026)
    years = (mjd_2026 - 57388.5) / 365.25       # J2016.0 is MJD 57388.5
    np.testing.assert_allclose((out_ra[0] - ra[0] + 180.0) % 360.0 - 180.0, 3.6 * years / 3600.0, rtol=1e-6)
    assert 0.0 <= out_ra[0] < 360.0
    np.testing.assert_allclose(out_dec[1], 2.0 + 1.8 * years / 3600.0, rtol=1e-9)
    np.testing.assert_allclose([out_ra[2], out_dec[2]], [150.0, 2.0], rtol=0, atol=1e-12)
    # NaN ref_epoch means default_ref_epoch
    _, dec_2020 = stars_at_epoch(ra, dec, pmra, pmdec, ref_epoch, mjd=mjd_2026, default_ref_epoch=2020.0)
    np.testing.assert_allclose(dec_2020[1], 2.0 + 1.8 * (years - 4.0) / 3600.0, rtol=1e-9)
    with pytest.raises(ValueError, match="mjd must be finite, got nan"):
        stars_at_epoch(ra, dec, pmra, pmdec, ref_epoch, mjd=np.nan)
    with pytest.raises(ValueError, match="pmdec must have the shape of ra"):
        stars_at_epoch(ra, dec, pmra, pmdec[:2], ref_epoch, mjd=mjd_2026)
