"""Tests of improc.astrometry and improc.pattern_match on synthetic star lists with a known WCS.

Truth: a TAN-SIP WCS at 0.26"/pixel with a cubic distortion of a few pixels.  Sources are its
pixel positions of catalog stars plus Gaussian centroid noise (0.02 pixel), with some stars
undetected and some spurious sources; the guessed WCS is the truth without distortion, shifted
and rotated.  The few-star tests (1 to 4 stars on a 375 x 280 image) keep the true distortion in
the guess, so that correcting its shift and rotation recovers the truth exactly.
"""

from __future__ import annotations

import numpy as np
import pytest
from astropy.wcs import WCS, Sip

from improc.astrometry import (AstrometryError, fit_wcs, match_few_stars, match_to_catalog,
                               propagate_proper_motion, solve_astrometry)
from improc.pattern_match import from_tangent_plane, mutual_nearest, tangent_plane

SCALE = 0.26  # arcsec / pixel
NOISE_PX = 0.02


def make_wcs(shape, *, ra0=150.0, dec0=2.0, pa_deg=0.0, sip_px=3.0) -> WCS:
    """East-left TAN(-SIP) WCS; the distortion reaches about ``sip_px`` pixels at the edges."""
    ny, nx = shape
    w = WCS(naxis=2)
    w.wcs.crpix = [nx / 2 + 0.5, ny / 2 + 0.5]
    w.wcs.crval = [ra0, dec0]
    th = np.radians(pa_deg)
    w.wcs.cd = SCALE / 3600 * np.array([[-np.cos(th), np.sin(th)], [np.sin(th), np.cos(th)]])
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    if sip_px:
        half = nx / 2
        a, b = np.zeros((4, 4)), np.zeros((4, 4))
        a[2, 0], a[1, 1], a[3, 0], a[1, 2] = np.array([1, -0.5, 0.7 / half, 0.5 / half]) * sip_px / half**2
        b[0, 2], b[1, 1], b[0, 3], b[2, 1] = np.array([1, 0.4, 0.6 / half, -0.5 / half]) * sip_px / half**2
        w.wcs.ctype = ["RA---TAN-SIP", "DEC--TAN-SIP"]
        w.sip = Sip(a, b, None, None, w.wcs.crpix)
    w.wcs.set()
    return w


def offset_wcs(w: WCS, shift_arcsec=(30.0, 0.0), rot_deg=1.0, *, keep_sip=False) -> WCS:
    """``w`` (without its distortion unless keep_sip), CRVAL moved by (east, north) arcsec and
    rotated by rot_deg."""
    g = WCS(naxis=2)
    g.wcs.crpix = w.wcs.crpix
    ra0, dec0 = from_tangent_plane(shift_arcsec[0] / 3600, shift_arcsec[1] / 3600, *w.wcs.crval)
    g.wcs.crval = [float(ra0), float(dec0)]
    th = np.radians(rot_deg)
    g.wcs.cd = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]]) @ w.wcs.cd
    g.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    if keep_sip:
        g.wcs.ctype = ["RA---TAN-SIP", "DEC--TAN-SIP"]
        g.sip = Sip(w.sip.a, w.sip.b, None, None, g.wcs.crpix)
    g.wcs.set()
    return g


def make_field(w: WCS, shape, *, density=1000 / 2048**2, seed=0, margin_px=300, spurious_frac=0.05):
    """Catalog over the image plus a margin, and the sources detected on the image.

    Returns x, y, flux (sources), ra, dec, mag (catalog), truth (catalog index of each source,
    -1 for spurious ones), and the true (noiseless) pixel positions of all catalog stars.
    """
    rng = np.random.default_rng(seed)
    ny, nx = shape
    n = int(density * (nx + 2 * margin_px) * (ny + 2 * margin_px))
    xs, ys = rng.uniform(-margin_px, nx - 1 + margin_px, n), rng.uniform(-margin_px, ny - 1 + margin_px, n)
    mag = 15 + 7 * rng.power(2.5, n)
    ra, dec = w.all_pix2world(xs, ys, 0)
    on_image = (xs >= 0) & (xs <= nx - 1) & (ys >= 0) & (ys <= ny - 1)
    detected = np.flatnonzero(on_image & (rng.random(n) > 0.05))
    n_spur = int(spurious_frac * len(detected))
    noise = rng.normal(0, NOISE_PX, (2, len(detected)))
    x = np.concatenate([xs[detected] + noise[0], rng.uniform(0, nx - 1, n_spur)])
    y = np.concatenate([ys[detected] + noise[1], rng.uniform(0, ny - 1, n_spur)])
    flux = np.concatenate([10 ** (-0.4 * (mag[detected] - 31)) * rng.lognormal(0, 0.2, len(detected)),
                           10 ** (-0.4 * (rng.uniform(17, 23, n_spur) - 31))])
    truth = np.concatenate([detected, -np.ones(n_spur, dtype=int)])
    return x, y, flux, ra, dec, mag, truth, xs, ys


def sky_distance_arcsec(ra1, dec1, ra2, dec2):
    xi, eta = tangent_plane(ra1, dec1, ra2, dec2)
    return np.hypot(xi, eta) * 3600


def truth_rms_mas(wcs: WCS, true_wcs: WCS, xs, ys) -> float:
    """Rms distance (mas) between fitted and true sky positions at the given pixels."""
    r1, d1 = wcs.all_pix2world(xs, ys, 0)
    r2, d2 = true_wcs.all_pix2world(xs, ys, 0)
    return float(np.sqrt(np.mean(sky_distance_arcsec(r1, d1, r2, d2) ** 2)) * 1000)


# --- proper motion and tangent plane ------------------------------------------------------------

def test_proper_motion_moves_by_pm_times_dt():
    ra = np.array([10.0, 200.0, 359.9999, 45.0])
    dec = np.array([0.0, -30.0, 60.0, 89.9])
    pmra, pmdec = np.array([1000.0, -300.0, 500.0, 100.0]), np.array([0.0, 400.0, -50.0, 100.0])
    ra2, dec2 = propagate_proper_motion(ra, dec, pmra, pmdec, from_epoch=2016.0, to_epoch=2026.0)
    expected_arcsec = np.hypot(pmra, pmdec) * 10 / 1000
    np.testing.assert_allclose(sky_distance_arcsec(ra2, dec2, ra, dec), expected_arcsec, rtol=1e-6)
    # Direction: dec changes by pmdec * dt; RA (with cos dec) by pmra * dt, up to the curvature
    # of a great circle against a parallel (0.1 mas for 5" at Dec 60).
    np.testing.assert_allclose((dec2 - dec)[:3] * 3.6e6, pmdec[:3] * 10, atol=0.2)
    d_ra = (ra2 - ra + 180) % 360 - 180
    np.testing.assert_allclose(d_ra[:3] * np.cos(np.radians(dec[:3])) * 3.6e6, pmra[:3] * 10, atol=0.2)
    assert np.all((ra2 >= 0) & (ra2 < 360))


def test_proper_motion_nan_means_no_motion_and_epoch_arrays():
    ra, dec = np.array([120.0, 121.0]), np.array([5.0, 5.1])
    ra2, dec2 = propagate_proper_motion(ra, dec, np.array([np.nan, 100.0]), np.array([np.nan, 0.0]),
                                        from_epoch=np.array([2015.5, 2016.0]), to_epoch=2016.0)
    assert sky_distance_arcsec(ra2[0], dec2[0], ra[0], dec[0]) < 1e-9
    assert sky_distance_arcsec(ra2[1], dec2[1], ra[1], dec[1]) < 1e-9  # dt = 0 for the second star
    with pytest.raises(ValueError, match="epochs must be finite"):
        propagate_proper_motion(ra, dec, ra, dec, from_epoch=np.array([np.nan, 2016.0]), to_epoch=2020.0)


def test_tangent_plane_round_trip_across_ra_zero_and_near_pole():
    for ra0, dec0 in ((0.01, -20.0), (359.99, 45.0), (80.0, 88.0)):
        ra = ra0 + np.linspace(-0.3, 0.3, 7)
        dec = np.clip(dec0 + np.linspace(-0.3, 0.3, 7), -90, 89.99)
        xi, eta = tangent_plane(ra % 360, dec, ra0, dec0)
        ra2, dec2 = from_tangent_plane(xi, eta, ra0, dec0)
        assert np.max(sky_distance_arcsec(ra2, dec2, ra % 360, dec)) < 1e-8


def test_mutual_nearest_is_one_to_one():
    src = np.array([[0.0, 0.0], [0.5, 0.0], [10.0, 0.0]])
    cat = np.array([[0.1, 0.0], [10.0, 5.0]])
    i_s, i_c, dist = mutual_nearest(src, cat, 1.0)
    assert i_s.tolist() == [0] and i_c.tolist() == [0]
    np.testing.assert_allclose(dist, [0.1])


# --- matching -----------------------------------------------------------------------------------

@pytest.mark.parametrize("shift, rot", [((0.0, 0.0), 0.0), ((30.0, 0.0), 1.0), ((-21.2, 21.2), -1.0),
                                        ((0.0, -45.0), 1.8)])
def test_match_recovers_offset_and_rotation(shift, rot):
    shape = (1024, 1024)
    true = make_wcs(shape, pa_deg=30.0)
    x, y, flux, ra, dec, mag, truth, *_ = make_field(true, shape, seed=1)
    # The guess has the true distortion, so its error is exactly the shift and rotation.
    result = match_to_catalog(x, y, flux, ra, dec, mag, wcs_guess=offset_wcs(true, shift, rot, keep_sip=True))
    n_real = np.count_nonzero(truth >= 0)
    correct = truth[result.source_index] == result.catalog_index
    assert len(result.source_index) > 0.9 * n_real
    assert np.count_nonzero(~correct) <= 0.01 * n_real  # only a spurious source may land on a star
    # The correction undoes the error of the guess (the shift is measured at the centre of the
    # sources rather than at CRPIX, a few pixels away: 0.1" is that lever arm times the rotation).
    np.testing.assert_allclose(result.transform.shift_arcsec, -np.array(shift), atol=0.1)
    assert abs(result.transform.rotation_deg + rot) < 1e-3
    assert abs(result.transform.scale - 1) < 1e-4
    assert len(set(result.catalog_index.tolist())) == len(result.catalog_index)


def test_match_tolerates_missing_bright_stars_and_shallow_catalog():
    shape = (1024, 1024)
    true = make_wcs(shape, ra0=0.02, dec0=-30.0)  # field straddles RA = 0
    x, y, flux, ra, dec, mag, truth, *_ = make_field(true, shape, seed=2)
    keep = np.argsort(-flux)[15:]  # the 15 brightest sources are saturated and lost
    shallow = mag < 20.0  # the catalog is shallower than the image
    result = match_to_catalog(x[keep], y[keep], flux[keep], ra[shallow], dec[shallow], mag[shallow],
                              wcs_guess=offset_wcs(true, (25.0, -15.0), 1.0))
    cat_index = np.flatnonzero(shallow)[result.catalog_index]
    correct = truth[keep][result.source_index] == cat_index
    assert correct.sum() > 0.9 * np.count_nonzero(np.isin(truth[keep], np.flatnonzero(shallow)))
    assert np.count_nonzero(~correct) <= 3


def test_match_fails_clearly_outside_search_range():
    shape = (1024, 1024)
    true = make_wcs(shape)
    x, y, flux, ra, dec, mag, *_ = make_field(true, shape, seed=3)
    with pytest.raises(AstrometryError):
        solve_astrometry(x, y, flux, ra, dec, mag, wcs_guess=offset_wcs(true, (400.0, 0.0), 0.0),
                         image_shape=shape)


def test_match_rejects_bad_inputs():
    w = make_wcs((100, 100))
    with pytest.raises(ValueError, match="x, y and flux must have the same length"):
        match_to_catalog(np.zeros(3), np.zeros(4), np.zeros(3), np.zeros(5), np.zeros(5), np.zeros(5),
                         wcs_guess=w)
    with pytest.raises(ValueError, match="max_offset_arcsec must be > 0"):
        match_to_catalog(np.zeros(3), np.zeros(3), np.zeros(3), np.zeros(5), np.zeros(5), np.zeros(5),
                         wcs_guess=w, max_offset_arcsec=-1)
    with pytest.raises(AstrometryError, match="need at least 3 sources"):
        match_to_catalog(np.zeros(2), np.zeros(2), np.ones(2), np.zeros(5), np.zeros(5), np.zeros(5),
                         wcs_guess=w)


# --- WCS fitting --------------------------------------------------------------------------------

def test_fit_wcs_noiseless_recovers_truth_and_inverts():
    shape = (2048, 2048)
    true = make_wcs(shape, ra0=359.95, dec0=-5.0, pa_deg=10.0, sip_px=5.0)
    rng = np.random.default_rng(4)
    x, y = rng.uniform(0, 2047, 400), rng.uniform(0, 2047, 400)
    ra, dec = true.all_pix2world(x, y, 0)
    fit = fit_wcs(x, y, ra, dec, image_shape=shape, sip_order=3)
    assert fit.wcs.wcs.ctype[0] == "RA---TAN-SIP" and fit.wcs.sip.a_order == 3
    assert fit.n_stars >= 395 and fit.rms_arcsec < 1e-5
    gx, gy = (g.ravel() for g in np.meshgrid(np.linspace(0, 2047, 20), np.linspace(0, 2047, 20)))
    assert truth_rms_mas(fit.wcs, true, gx, gy) < 0.01
    px, py = fit.wcs.world_to_pixel(fit.wcs.pixel_to_world(gx, gy))
    assert np.max(np.hypot(px - gx, py - gy)) < 1e-4
    foc = fit.wcs.sip_pix2foc(np.column_stack([gx, gy]), 0)  # A, B inverted by AP, BP
    assert np.max(np.abs(fit.wcs.sip_foc2pix(foc, 0) - np.column_stack([gx, gy]))) < 2e-3
    # The FITS header written from it describes the same mapping.
    again = WCS(fit.wcs.to_header(relax=True))
    assert truth_rms_mas(again, fit.wcs, gx, gy) < 1e-3


def test_fit_wcs_with_noise_and_outliers():
    shape = (2048, 2048)
    true = make_wcs(shape, sip_px=4.0)
    rng = np.random.default_rng(5)
    n = 600
    xs, ys = rng.uniform(0, 2047, n), rng.uniform(0, 2047, n)
    ra, dec = true.all_pix2world(xs, ys, 0)
    bad = rng.choice(n, 30, replace=False)
    dec = dec.copy()
    dec[bad] += rng.choice([-1, 1], 30) * rng.uniform(0.5, 3.0, 30) / 3600  # 0.5" to 3" wrong
    x, y = xs + rng.normal(0, NOISE_PX, n), ys + rng.normal(0, NOISE_PX, n)
    fit = fit_wcs(x, y, ra, dec, image_shape=shape, sip_order=3)
    assert not fit.used[bad].any()
    assert fit.n_stars >= n - 30 - 12  # at most ~2% of good stars clipped
    expected = NOISE_PX * SCALE * np.sqrt(2)  # radial rms of the centroid noise, arcsec
    assert 0.8 * expected < fit.rms_arcsec < 1.2 * expected
    assert truth_rms_mas(fit.wcs, true, xs, ys) < 5.0
    assert np.all(fit.residuals_arcsec[bad] > 0.4)


def test_fit_wcs_order_one_is_plain_tan_and_crpix_is_honoured():
    shape = (500, 400)
    true = make_wcs(shape, sip_px=0.0)
    rng = np.random.default_rng(6)
    x, y = rng.uniform(0, 399, 50), rng.uniform(0, 499, 50)
    ra, dec = true.all_pix2world(x, y, 0)
    fit = fit_wcs(x, y, ra, dec, image_shape=shape, sip_order=1, crpix=(10.0, 20.0))
    assert list(fit.wcs.wcs.ctype) == ["RA---TAN", "DEC--TAN"] and fit.wcs.sip is None
    np.testing.assert_allclose(fit.wcs.wcs.crpix, [11.0, 21.0])
    assert fit.rms_arcsec < 1e-5
    np.testing.assert_allclose(fit.wcs.wcs.crval, true.all_pix2world([[10.0, 20.0]], 0)[0], atol=1e-9)


def test_fit_wcs_errors():
    x = np.arange(8.0)
    with pytest.raises(AstrometryError, match=r"only 8 usable stars .* need >= 11"):
        fit_wcs(x, x ** 2, x, x, image_shape=(100, 100), sip_order=3)
    with pytest.raises(ValueError, match="x, y, ra and dec must have the same length"):
        fit_wcs(x, x[:3], x, x, image_shape=(100, 100))
    with pytest.raises(ValueError, match="sip_order must be in 1..9, got 0"):
        fit_wcs(x, x, x, x, image_shape=(100, 100), sip_order=0)
    with pytest.raises(ValueError, match="weights must have length 8"):
        fit_wcs(x, x, x, x, image_shape=(100, 100), weights=np.ones(3))


# --- full solution ------------------------------------------------------------------------------

def test_solve_astrometry_recovers_true_wcs_from_bad_header():
    """Medium-scale version of the acceptance target: 2048^2 pixels, ~1000 stars, 30" and 1 deg off."""
    shape = (2048, 2048)
    true = make_wcs(shape, ra0=210.0, dec0=54.0, pa_deg=-75.0, sip_px=3.0)
    x, y, flux, ra, dec, mag, truth, xs, ys = make_field(true, shape, seed=7, margin_px=200)
    sol = solve_astrometry(x, y, flux, ra, dec, mag, wcs_guess=offset_wcs(true, (30.0, 0.0), 1.0),
                           image_shape=shape)
    real = truth >= 0
    assert sol.n_matches > 0.9 * real.sum()
    assert np.count_nonzero(truth[sol.source_index] != sol.catalog_index) <= 3
    assert sol.fit.sip_order == 3 and sol.rms_arcsec < 0.012
    assert truth_rms_mas(sol.wcs, true, xs[truth[real]], ys[truth[real]]) < 5.0  # target: 20 mas
    np.testing.assert_allclose(sol.initial_match.transform.shift_arcsec, [-30.0, 0.0], atol=1.0)


def test_solve_astrometry_small_image_lowers_sip_order():
    shape = (280, 375)  # like the legacypipe testcase8 cutout
    true = make_wcs(shape, sip_px=0.3)
    x, y, flux, ra, dec, mag, truth, xs, ys = make_field(true, shape, density=1.5e-4, seed=8, margin_px=250)
    sol = solve_astrometry(x, y, flux, ra, dec, mag, wcs_guess=offset_wcs(true, (-20.0, 10.0), -1.0),
                           image_shape=shape)
    assert 12 <= sol.n_matches < 20 and sol.fit.sip_order == 2
    real = truth >= 0
    assert truth_rms_mas(sol.wcs, true, xs[truth[real]], ys[truth[real]]) < 20.0


def test_solve_astrometry_errors_carry_numbers():
    shape = (1024, 1024)
    true = make_wcs(shape)
    x, y, flux, ra, dec, mag, *_ = make_field(true, shape, seed=9)
    guess = offset_wcs(true, (10.0, 10.0), 0.5)
    with pytest.raises(AstrometryError, match=r"rms 0\.0\d\d\" exceeds max_arcsec_residual 0\.001\""):
        solve_astrometry(x, y, flux, ra, dec, mag, wcs_guess=guess, image_shape=shape,
                         max_arcsec_residual=0.001)
    few = np.argsort(-flux)[:12]
    with pytest.raises(AstrometryError, match=r"only \d+ catalog matches, need >= 100"):
        solve_astrometry(x[few], y[few], flux[few], ra, dec, mag, wcs_guess=guess, image_shape=shape,
                         min_matches=100)
    assert issubclass(AstrometryError, ValueError)


def test_solve_astrometry_fitted_models_report_model_and_uncertainty():
    shape = (280, 375)
    true = make_wcs(shape, sip_px=0.3)
    x, y, flux, ra, dec, mag, truth, xs, ys = make_field(true, shape, density=1.5e-4, seed=8, margin_px=250)
    guess = offset_wcs(true, (-20.0, 10.0), -1.0)
    sol = solve_astrometry(x, y, flux, ra, dec, mag, wcs_guess=guess, image_shape=shape,
                           centroid_err_px=NOISE_PX, systematic_err_arcsec=0.0)
    assert sol.model == "sip" and sol.correction is None and sol.dof == 2 * (sol.n_matches - 6)
    # the centroid errors explain most of the residuals; the rest is the cubic distortion that
    # an order-2 fit of 14 stars cannot follow, which makes the truth 2 sigma away at the corners
    assert 0.4 < sol.chi2 / sol.dof < 2.0
    grid = tuple(g.ravel() for g in np.meshgrid(np.linspace(0, 374, 10), np.linspace(0, 279, 10)))
    assert truth_rms_mas(sol.wcs, true, *grid) < 3000 * sol.uncertainty_arcsec
    tan = solve_astrometry(x, y, flux, ra, dec, mag, wcs_guess=guess, image_shape=shape, stars_per_term=10.0)
    assert tan.model == "tan" and tan.fit.sip_order == 1 and tan.dof == 2 * (tan.n_matches - 3)


# --- few stars: corrections of the header WCS -------------------------------------------------

FEW_SHAPE = (280, 375)          # like the legacypipe testcase8 cutout
FEW_X = np.array([60.2, 300.7, 180.4, 330.1])
FEW_Y = np.array([50.3, 90.8, 240.6, 230.2])
GRID = tuple(g.ravel() for g in np.meshgrid(np.linspace(0, 374, 10), np.linspace(0, 279, 10)))


def few_star_field(n: int, *, shift=(25.0, -15.0), rot=1.0, sip_px=1.0):
    """The true WCS (with distortion), the header guess (same distortion, shifted and rotated),
    n stars on the image, and a catalog of them plus 3 stars more than 100" off the image."""
    true = make_wcs(FEW_SHAPE, sip_px=sip_px, pa_deg=20.0)
    ra, dec = true.all_pix2world(FEW_X[:n], FEW_Y[:n], 0)
    far_ra, far_dec = true.all_pix2world(np.array([-500.0, 900.0, 180.0]), np.array([100.0, 140.0, -500.0]), 0)
    cat_ra, cat_dec = np.r_[ra, far_ra], np.r_[dec, far_dec]
    return true, offset_wcs(true, shift, rot, keep_sip=True), cat_ra, cat_dec, np.r_[np.full(n, 17.0), 18, 18, 18]


@pytest.mark.parametrize("n", [1, 2, 3])
def test_few_stars_correct_the_header(n):
    shift, rot = ((20.0, -10.0), 0.0) if n == 1 else ((25.0, -15.0), 1.0)   # one star cannot see a rotation
    true, guess, cat_ra, cat_dec, mag = few_star_field(n, shift=shift, rot=rot)
    sol = solve_astrometry(FEW_X[:n], FEW_Y[:n], np.ones(n), cat_ra, cat_dec, mag, wcs_guess=guess,
                           image_shape=FEW_SHAPE, simplest_model="shift")
    assert sol.model == ("shift" if n == 1 else "shift_rotation")
    assert sol.n_matches == n and sol.catalog_index.tolist() == list(range(n))
    assert sol.dof == (0 if n == 1 else 2 * n - 3)
    assert sol.wcs.sip is not None                         # the header's distortion is kept
    assert truth_rms_mas(sol.wcs, true, *GRID) < 1.0       # noiseless: exact to ~1e-3 mas
    assert abs(sol.correction.rotation_deg + rot) < 1e-3  # the guess's CD is rotated the other way
    # 0.1 px centroids, 0.02" systematic, the header's scale and (1 star) rotation errors
    assert 0.02 < sol.uncertainty_arcsec < 0.2
    assert sol.initial_match.n_votes >= 1


def test_few_stars_keep_a_shift_rotation_below_min_matches():
    """Four stars: triangle matching works, a TAN fit needs min_matches (10); a shift and rotation of
    the header is fitted instead, or a TAN WCS when min_matches allows it."""
    true, guess, cat_ra, cat_dec, mag = few_star_field(4)
    args = (FEW_X, FEW_Y, np.ones(4), cat_ra, cat_dec, mag)
    sol = solve_astrometry(*args, wcs_guess=guess, image_shape=FEW_SHAPE, simplest_model="shift_rotation")
    assert sol.model == "shift_rotation" and sol.n_matches == 4 and sol.dof == 5
    assert truth_rms_mas(sol.wcs, true, *GRID) < 1.0
    tan = solve_astrometry(*args, wcs_guess=guess, image_shape=FEW_SHAPE, min_matches=4)
    assert tan.model == "tan" and tan.n_matches == 4
    with pytest.raises(AstrometryError, match=r"only 4 catalog matches, need >= 10"):
        solve_astrometry(*args, wcs_guess=guess, image_shape=FEW_SHAPE)       # simplest_model "tan"


@pytest.mark.parametrize("n", [1, 3])
def test_few_star_uncertainty_is_honest(n):
    """Over noisy realizations, the true position error over the image is the stated uncertainty
    (mean of (error / uncertainty)**2 near 1; below 1 for 3 stars where chi2 / dof > 1 inflates it)."""
    rng = np.random.default_rng(20 + n)
    shift, rot = ((20.0, -10.0), 0.0) if n == 1 else ((25.0, -15.0), 1.0)
    true, guess, cat_ra, cat_dec, mag = few_star_field(n, shift=shift, rot=rot)
    sigma_px, cat_err = 0.3, 0.03
    ratio2 = []
    for _ in range(40):
        x, y = FEW_X[:n] + rng.normal(0, sigma_px, n), FEW_Y[:n] + rng.normal(0, sigma_px, n)
        ra, dec = from_tangent_plane(rng.normal(0, cat_err / 3600, cat_ra.size),
                                     rng.normal(0, cat_err / 3600, cat_ra.size), cat_ra, cat_dec)
        sol = solve_astrometry(x, y, np.ones(n), ra, dec, mag, wcs_guess=guess, image_shape=FEW_SHAPE,
                               simplest_model="shift", centroid_err_px=sigma_px, cat_err_arcsec=cat_err,
                               systematic_err_arcsec=0.0, header_scale_err=0.0, header_rotation_err_deg=0.0)
        ratio2.append((truth_rms_mas(sol.wcs, true, *GRID) / 1000 / sol.uncertainty_arcsec) ** 2)
    assert 0.6 < np.mean(ratio2) < 1.4


def test_few_stars_refuse_ambiguous_matches():
    true, guess, *_ = few_star_field(2)
    x, y = np.array([100.0, 180.0]), np.array([140.0, 140.0])
    # Three catalog stars in a row with the sources' spacing: the pair matches two ways.
    cat_ra, cat_dec = true.all_pix2world(np.array([100.0, 180.0, 260.0]), np.array([140.0, 140.0, 140.0]), 0)
    with pytest.raises(AstrometryError, match=r"ambiguous match: 2 different sets of 2 source->catalog pairs"):
        solve_astrometry(x, y, np.ones(2), cat_ra, cat_dec, np.full(3, 17.0), wcs_guess=guess,
                         image_shape=FEW_SHAPE, simplest_model="shift")
    # One source, two catalog stars within the search range (60"): either could be it.
    cat_ra, cat_dec = true.all_pix2world(np.array([100.0, 160.0]), np.array([140.0, 140.0]), 0)
    with pytest.raises(AstrometryError, match=r"ambiguous match: 2 different sets of 1 source->catalog pairs"):
        solve_astrometry(x[:1], y[:1], np.ones(1), cat_ra, cat_dec, np.full(2, 17.0), wcs_guess=guess,
                         image_shape=FEW_SHAPE, simplest_model="shift")
    # One star is not enough for a rotation.
    with pytest.raises(AstrometryError, match=r"no pair of sources matches a pair of catalog stars \(a rotation "
                                              r"needs >= 2 matched stars\)"):
        solve_astrometry(x[:1], y[:1], np.ones(1), cat_ra[:1], cat_dec[:1], np.full(1, 17.0), wcs_guess=guess,
                         image_shape=FEW_SHAPE, simplest_model="shift_rotation")


def test_match_few_stars_with_extra_sources_and_stars():
    """Two stars among spurious sources and undetected catalog stars, header 40" and 1.5 deg off."""
    true = make_wcs(FEW_SHAPE, sip_px=0.5)
    rng = np.random.default_rng(30)
    sx, sy = rng.uniform(0, 374, 8), rng.uniform(0, 279, 8)        # 2 stars + 6 galaxies / artefacts
    cx = np.r_[sx[:2], rng.uniform(-150, 525, 6)]                   # 2 detected + 6 undetected stars
    cy = np.r_[sy[:2], rng.uniform(-150, 430, 6)]
    cat_ra, cat_dec = true.all_pix2world(cx, cy, 0)
    flux = np.r_[1e5, 8e4, rng.uniform(1e3, 5e4, 6)]
    match = match_few_stars(sx, sy, flux, cat_ra, cat_dec, wcs_guess=offset_wcs(true, (-40.0, 5.0), 1.5,
                                                                                keep_sip=True))
    assert sorted(zip(match.source_index.tolist(), match.catalog_index.tolist())) == [(0, 0), (1, 1)]
    assert abs(match.transform.rotation_deg + 1.5) < 0.05
    with pytest.raises(ValueError, match="min_matches must be 1 or 2"):
        match_few_stars(sx, sy, flux, cat_ra, cat_dec, wcs_guess=true, min_matches=3)


def test_solve_astrometry_rejects_bad_options():
    true, guess, cat_ra, cat_dec, mag = few_star_field(3)
    args = (FEW_X[:3], FEW_Y[:3], np.ones(3), cat_ra, cat_dec, mag)
    with pytest.raises(ValueError, match="simplest_model must be 'tan', 'shift_rotation' or 'shift'"):
        solve_astrometry(*args, wcs_guess=guess, image_shape=FEW_SHAPE, simplest_model="sip")
    with pytest.raises(ValueError, match="min_matches must be >= 4"):
        solve_astrometry(*args, wcs_guess=guess, image_shape=FEW_SHAPE, min_matches=3)
    with pytest.raises(ValueError, match=r"centroid_err_px must be a scalar or have shape \(3,\)"):
        solve_astrometry(*args, wcs_guess=guess, image_shape=FEW_SHAPE, centroid_err_px=np.ones(2))
    with pytest.raises(ValueError, match="position errors must be > 0"):
        solve_astrometry(*args, wcs_guess=guess, image_shape=FEW_SHAPE, centroid_err_px=0.0,
                         systematic_err_arcsec=0.0)


def test_few_stars_clip_a_wrong_match():
    """Six stars, one of them 1.5" off its catalog position (within the match radius): the header
    correction leaves it out."""
    true, guess, _, _, _ = few_star_field(4)
    xs, ys = np.r_[FEW_X, 120.0, 250.0], np.r_[FEW_Y, 200.0, 30.0]
    cat_ra, cat_dec = true.all_pix2world(xs, ys, 0)
    cat_dec = cat_dec.copy()
    cat_dec[5] += 1.5 / 3600
    sol = solve_astrometry(xs, ys, np.ones(6), cat_ra, cat_dec, np.full(6, 17.0), wcs_guess=guess,
                           image_shape=FEW_SHAPE, simplest_model="shift_rotation")
    assert sol.model == "shift_rotation" and sol.n_matches == 5 and sol.dof == 7
    assert not sol.fit.used[sol.source_index == 5].any() and sol.fit.residuals_arcsec.max() > 1.4
    assert truth_rms_mas(sol.wcs, true, *GRID) < 1.0


def test_a_dense_field_whose_brightest_catalog_stars_are_saturated_still_matches():
    """The brightest catalog stars are missing among the sources (saturated): the pattern match
    slides to fainter catalog stars instead of failing (at 300k stars/deg2 it used to fall back to
    the few-star search, which took over ten minutes)."""
    from astropy.wcs import WCS

    from improc.pattern_match import match_to_catalog

    rng = np.random.default_rng(12)
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [150.0, 2.0]
    wcs.wcs.crpix = [1024.5, 1024.5]
    wcs.wcs.cdelt = [-0.26 / 3600, 0.26 / 3600]
    n = 3000
    x, y = rng.uniform(0, 2048, n), rng.uniform(0, 2048, n)
    mag = rng.uniform(14.0, 21.0, n)
    ra, dec = wcs.all_pix2world(x, y, 0)
    seen = mag > 16.0                       # the brighter ones are saturated: not among the sources
    guess = wcs.deepcopy()
    guess.wcs.crval = [150.0 + 8.0 / 3600, 2.0 - 5.0 / 3600]    # a pointing error of ~9"
    flux = 10 ** (-0.4 * (mag[seen] - 25.0))
    result = match_to_catalog(x[seen], y[seen], flux, ra, dec, mag, wcs_guess=guess)
    assert len(result.source_index) > 0.9 * seen.sum()
    matched = np.flatnonzero(seen)[result.source_index]
    assert np.array_equal(matched, result.catalog_index)
