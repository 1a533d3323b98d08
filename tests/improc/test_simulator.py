"""Tests of the image simulator (improc.simulator and its sim_* modules) against known truth."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from astropy.coordinates import SkyCoord
from astropy.table import Table
from scipy.optimize import curve_fit

from improc.color_transforms import DECAM_ZHOU2020, BandTransform, gaia_to_band
from improc.sim_detector import (FLAG_BAD_COLUMN, FLAG_BLEED, FLAG_COSMIC_RAY, FLAG_SATURATED,
                                 sky_model)
from improc.sim_psf import PsfField
from improc.sim_wcs import make_true_wcs
from improc.simulator import (SimulationParams, make_star_catalog, place_transients_in_hosts,
                              simulate_image)

#: A small image with nothing but what a test puts in it.
QUIET = SimulationParams(nx=128, ny=128, noise=False, n_galaxies=0, n_cosmic_rays=0,
                         n_bad_columns=0, sky_gradient=0.0, n_stars=0)


def _stars_at(params: SimulationParams, x: list[float], y: list[float], g: list[float]) -> Table:
    """A scene catalog (no proper motion) whose stars fall on the given pixels of ``params``."""
    wcs = make_true_wcs(params.nx, params.ny, ra=params.ra, dec=params.dec,
                        pixel_scale=params.pixel_scale, sip_amplitude_pix=params.sip_amplitude_pix)
    ra, dec = wcs.all_pix2world(np.asarray(x, float), np.asarray(y, float), 0)
    g = np.asarray(g, float)
    return Table({"ra": ra, "dec": dec, "pmra": np.zeros(g.size), "pmdec": np.zeros(g.size),
                  "G": g, "BP": g + 0.6, "RP": g - 0.4})


def _fit_fwhm(stamp: np.ndarray, beta: float) -> float:
    """FWHM (pixels) of a circular Moffat of fixed beta fitted to a centred stamp."""
    h = stamp.shape[0] // 2
    yy, xx = np.mgrid[-h:h + 1, -h:h + 1]

    def moffat(r2, amp, fwhm):
        alpha = fwhm / (2.0 * np.sqrt(2.0 ** (1.0 / beta) - 1.0))
        return amp * (1.0 + r2 / alpha**2) ** -beta

    popt, _ = curve_fit(moffat, (xx**2 + yy**2).ravel(), stamp.ravel(), p0=[stamp.max(), 3.0])
    return float(popt[1])


@pytest.fixture(scope="module")
def default_small():
    """A 256 x 256 image with everything on and header errors."""
    return simulate_image(SimulationParams(nx=256, ny=256, seed=7, pointing_error_arcsec=20.0,
                                           rotation_error_deg=0.5, n_stars=60, n_galaxies=5,
                                           gaia_missing_fraction=0.1))


def test_same_seed_is_identical_and_different_seed_differs(default_small):
    again = simulate_image(default_small.params)
    assert np.array_equal(again.data, default_small.data)
    assert np.array_equal(again.flags, default_small.flags)
    assert np.array_equal(again.weight, default_small.weight)
    other = simulate_image(dataclasses.replace(default_small.params, seed=8))
    assert not np.array_equal(other.data, default_small.data)
    assert not np.array_equal(np.asarray(other.stars["ra"]), np.asarray(default_small.stars["ra"]))


def test_scene_seed_keeps_the_sky_and_changes_the_noise(default_small):
    params = dataclasses.replace(default_small.params, seed=99, scene_seed=7)
    other = simulate_image(params)
    assert np.array_equal(np.asarray(other.stars["ra"]), np.asarray(default_small.stars["ra"]))
    assert np.array_equal(np.asarray(other.galaxies["ra"]),
                          np.asarray(default_small.galaxies["ra"]))
    assert not np.array_equal(other.data, default_small.data)


def test_noiseless_isolated_star_sums_to_its_flux_and_matches_psf():
    sim = simulate_image(QUIET, stars=_stars_at(QUIET, [64.3], [60.0], [18.0]))
    star = sim.stars[0]
    residual = sim.data.astype(float) - sim.sky
    assert residual.sum() == pytest.approx(star["flux_adu"], rel=1e-3)
    assert star["x"] == pytest.approx(64.3, abs=1e-6)
    # a star at a pixel centre is exactly flux * psf
    sim = simulate_image(QUIET, stars=_stars_at(QUIET, [64.0], [60.0], [18.0]))
    psf = sim.psf(64.0, 60.0)
    h = psf.shape[0] // 2
    cut = sim.data.astype(float)[60 - h:61 + h, 64 - h:65 + h] - sim.sky[60 - h:61 + h, 64 - h:65 + h]
    flux = sim.stars["flux_adu"][0]
    np.testing.assert_allclose(cut, flux * psf, atol=1e-4 * flux * psf.max())


def test_star_magnitudes_and_fluxes_follow_gaia_color_transform():
    params = dataclasses.replace(QUIET, n_stars=50, band="g", color_term=0.07, zero_point=30.5)
    sim = simulate_image(params)
    s = sim.stars
    expected = gaia_to_band(s["G"], s["BP"], s["RP"], DECAM_ZHOU2020["g"]) + 0.07 * (s["BP"] - s["RP"] - 1.0)
    np.testing.assert_allclose(s["mag"], expected, atol=1e-12)
    np.testing.assert_allclose(s["flux_adu"], 10 ** (-0.4 * (s["mag"] - 30.5)), rtol=1e-12)
    color = s["BP"] - s["RP"]
    assert color.min() >= 0.5 and color.max() <= 3.0


def test_stars_follow_the_camera_transform_given():
    """Another camera: the simulator renders its band with the transformation it is given (and
    with none for a band DECam's table lacks: m = G)."""
    made_up = BandTransform(coefficients=(0.25, -0.4, 0.05), color_range=(-0.3, 3.2), average_color=1.0)
    params = dataclasses.replace(QUIET, n_stars=50, band="r", transform=made_up, zero_point=30.5)
    assert params.band_transform is made_up
    s = simulate_image(params).stars
    np.testing.assert_allclose(s["mag"], made_up.magnitudes(s["G"], s["BP"], s["RP"]), atol=1e-12)
    assert dataclasses.replace(QUIET, band="r").band_transform is DECAM_ZHOU2020["r"]
    plain = simulate_image(dataclasses.replace(QUIET, n_stars=20, band="VR")).stars
    np.testing.assert_allclose(plain["mag"], plain["G"], atol=1e-12)
    with pytest.raises(ValueError, match="transform must be an improc.color_transforms.BandTransform"):
        SimulationParams(transform=(0.1, 0.2))


def test_star_counts_rise_with_magnitude():
    params = SimulationParams(nx=512, ny=512, n_stars=3000)
    cat = make_star_catalog(params, np.random.default_rng(1))
    counts, _ = np.histogram(cat["G"], bins=[17, 18, 19, 20])
    # counts ~ 10**(0.3 m): each magnitude bin holds about 2 times the previous one
    ratios = counts[1:] / counts[:-1]
    np.testing.assert_allclose(ratios, 10**0.3, rtol=0.15)


def test_sky_median_and_noise_match_the_detector_model():
    params = SimulationParams(nx=256, ny=256, n_stars=0, n_galaxies=0, n_cosmic_rays=0,
                              n_bad_columns=0, sky_gradient=0.0, sky_adu=800.0, gain=2.5,
                              read_noise=7.0, seed=3)
    sim = simulate_image(params)
    assert np.median(sim.data) == pytest.approx(800.0, abs=1.0)
    expected_sigma = np.sqrt(800.0 * 2.5 + 7.0**2) / 2.5
    assert np.std(sim.data) == pytest.approx(expected_sigma, rel=0.02)
    pulls = (sim.data - sim.sky) * np.sqrt(sim.weight)
    assert np.std(pulls) == pytest.approx(1.0, rel=0.02)


def test_sky_gradient_and_default_image_median(default_small):
    assert np.median(default_small.data) == pytest.approx(default_small.params.sky_adu, rel=0.01)
    sky = sky_model((10, 20), level=100.0, gradient=0.2)
    assert sky[5, -1] - sky[5, 0] == pytest.approx(20.0)
    assert sky[-1, 10] - sky[0, 10] == pytest.approx(10.0)


def test_header_wcs_errors_equal_requested(default_small):
    sim = default_small
    cx, cy = (sim.params.nx - 1) / 2, (sim.params.ny - 1) / 2
    true = SkyCoord(*sim.true_wcs.all_pix2world([cx], [cy], 0), unit="deg")
    head = SkyCoord(*sim.header_wcs.all_pix2world([cx], [cy], 0), unit="deg")
    assert true.separation(head).arcsec[0] == pytest.approx(20.0, abs=0.1)
    cd_true, cd_head = sim.true_wcs.wcs.cd, sim.header_wcs.pixel_scale_matrix
    pa_true = np.degrees(np.arctan2(cd_true[0, 1], cd_true[1, 1]))
    pa_head = np.degrees(np.arctan2(cd_head[0, 1], cd_head[1, 1]))
    assert pa_head - pa_true == pytest.approx(0.5, abs=1e-6)
    assert sim.true_wcs.wcs.ctype[0] == "RA---TAN-SIP" and sim.header_wcs.wcs.ctype[0] == "RA---TAN"
    header = sim.header
    for key in ("MJD-OBS", "EXPTIME", "FILTER", "GAIN", "RDNOISE", "SATURATE", "RA", "DEC",
                "INSTRUME", "DATE-OBS", "AIRMASS"):
        assert key in header, key
    assert header["INSTRUME"] == "Synthetic" and header["MJD-OBS"] == sim.params.mjd
    assert header["RA"] == pytest.approx(head.ra.deg[0])


def test_sip_distortion_at_corners_is_a_few_pixels():
    wcs = make_true_wcs(2048, 2048, ra=150.0, dec=2.0, pixel_scale=0.26, sip_amplitude_pix=2.0)
    corners = np.array([[0, 0], [2047, 0], [0, 2047], [2047, 2047]], dtype=float)
    with_sip = np.array(wcs.all_pix2world(corners[:, 0], corners[:, 1], 0)).T
    tan_only = np.array(wcs.wcs_pix2world(corners[:, 0], corners[:, 1], 0)).T
    shift = SkyCoord(with_sip, unit="deg").separation(SkyCoord(tan_only, unit="deg")).arcsec
    shift_pix = shift / 0.26
    assert np.all(shift_pix > 1.0) and np.all(shift_pix < 4.0)
    centre = wcs.all_pix2world([1023.5], [1023.5], 0)
    assert np.allclose(np.ravel(centre), [150.0, 2.0], atol=1e-10)


def test_gaia_catalog_propagates_to_the_truth(default_small):
    sim = default_small
    gaia, stars = sim.gaia, sim.stars
    for name in ("source_id", "ra", "dec", "ra_error", "dec_error", "pmra", "pmdec", "parallax",
                 "ref_epoch", "phot_g_mean_mag", "phot_bp_mean_mag", "phot_rp_mean_mag",
                 "phot_g_mean_flux_over_error"):
        assert name in gaia.colnames, name
    assert np.all(gaia["ref_epoch"] == 2016.0)
    truth = stars[np.isin(stars["source_id"], gaia["source_id"])]
    assert np.array_equal(truth["source_id"], gaia["source_id"])
    assert len(gaia) < len(stars) and np.array_equal(stars["in_gaia"],
                                                    np.isin(stars["source_id"], gaia["source_id"]))
    dt = sim.params.epoch - 2016.0
    assert dt > 7.0
    dec = np.asarray(gaia["dec"]) + np.asarray(gaia["pmdec"]) * dt / 3.6e6
    ra = np.asarray(gaia["ra"]) + np.asarray(gaia["pmra"]) * dt / 3.6e6 / np.cos(
        np.deg2rad(np.asarray(gaia["dec"])))
    np.testing.assert_allclose(ra, truth["ra"], atol=1e-10)   # 0.4 micro-arcsec
    np.testing.assert_allclose(dec, truth["dec"], atol=1e-10)
    motion = np.hypot(gaia["pmra"], gaia["pmdec"])
    assert 0.5 < np.median(motion) < 10.0
    x, y = sim.true_wcs.all_world2pix(truth["ra"], truth["dec"], 0)
    np.testing.assert_allclose(x, truth["x"], atol=1e-6)
    np.testing.assert_allclose(y, truth["y"], atol=1e-6)
    # the catalog reaches beyond the image
    assert np.any(~stars["in_image"]) and np.any(stars["in_image"])


def test_saturated_star_is_flagged_clipped_and_bleeds():
    params = dataclasses.replace(QUIET, nx=96, ny=160)
    stars = _stars_at(params, [40.0, 70.0], [80.0, 20.0], [12.5, 19.0])
    sim = simulate_image(params, stars=stars)
    bright, faint = sim.stars
    assert bright["saturated"] and not faint["saturated"]
    assert sim.data[80, 40] == params.saturation_adu
    assert sim.flags[80, 40] & FLAG_SATURATED
    assert sim.data.max() <= params.saturation_adu
    assert np.all(sim.data[(sim.flags & FLAG_SATURATED) > 0] == params.saturation_adu)
    assert np.all(sim.weight[(sim.flags & (FLAG_SATURATED | FLAG_BLEED)) > 0] == 0)
    rows, cols = np.nonzero(sim.flags & FLAG_SATURATED)
    assert np.ptp(rows) > 2 * np.ptp(cols)      # a trail along the column
    assert np.any(sim.flags & FLAG_BLEED)
    # bleeding moves charge without losing it
    excess = sim.data.astype(float) - sim.sky
    assert excess.sum() == pytest.approx(bright["flux_adu"] + faint["flux_adu"], rel=1e-3)


def test_cosmic_rays_and_bad_columns_are_flagged():
    params = SimulationParams(nx=200, ny=200, n_stars=0, n_galaxies=0, n_cosmic_rays=15,
                              n_bad_columns=3, sky_gradient=0.0, seed=5)
    sim = simulate_image(params)
    cr = (sim.flags & FLAG_COSMIC_RAY) > 0
    assert 15 <= cr.sum() <= 45
    sigma = np.sqrt(params.sky_adu * params.gain + params.read_noise**2) / params.gain
    hits = cr & ((sim.flags & FLAG_BAD_COLUMN) == 0)
    assert np.all(sim.data[hits] > params.sky_adu + 5 * sigma)
    bad = (sim.flags & FLAG_BAD_COLUMN) > 0
    assert np.unique(np.nonzero(bad)[1]).size == 3
    assert np.all(sim.weight[bad] == 0)


def test_detector_seed_fixes_the_bad_columns_of_every_exposure():
    """Exposures of one detector (same ``detector_seed``) share their bad columns, as a real
    camera's defect map; the columns' read noise is the exposure's.  Without a detector seed
    each exposure draws its own."""
    params = SimulationParams(nx=256, ny=256, n_stars=0, n_galaxies=0, n_cosmic_rays=0, n_bad_columns=6,
                              noise=True)

    def columns(**kw):
        sim = simulate_image(dataclasses.replace(params, **kw))
        return sim, (sim.flags & FLAG_BAD_COLUMN) > 0

    first, bad = columns(seed=1, detector_seed=9)
    second, bad_again = columns(seed=2, detector_seed=9)
    assert np.unique(np.nonzero(bad)[1]).size == 6
    assert np.array_equal(bad, bad_again)
    assert not np.array_equal(first.data[bad], second.data[bad])        # new read noise
    assert np.allclose(first.data[bad], second.data[bad], atol=8 * params.read_noise / params.gain)
    assert not np.array_equal(bad, columns(seed=1, detector_seed=10)[1])
    assert not np.array_equal(columns(seed=1)[1], columns(seed=2)[1])

def test_psf_is_normalized_with_requested_fwhm_and_shape():
    params = SimulationParams(nx=256, ny=256, fwhm_arcsec=2.0, ellipticity=0.1,
                              psf_position_angle_deg=40.0)
    sim = simulate_image(dataclasses.replace(params, n_stars=0, n_galaxies=0))
    psf = sim.psf(127.5, 127.5)
    assert psf.sum() == pytest.approx(1.0, abs=1e-12)
    h = psf.shape[0] // 2
    assert np.unravel_index(psf.argmax(), psf.shape) == (h, h)
    assert _fit_fwhm(psf, 3.0) == pytest.approx(2.0 / 0.26, rel=0.03)
    yy, xx = np.mgrid[-h:h + 1, -h:h + 1]
    moments = [[(psf * xx * xx).sum(), (psf * xx * yy).sum()],
               [(psf * xx * yy).sum(), (psf * yy * yy).sum()]]
    lam, vec = np.linalg.eigh(moments)
    assert 1 - np.sqrt(lam[0] / lam[1]) == pytest.approx(0.1, abs=0.01)
    assert np.degrees(np.arctan2(vec[1, 1], vec[0, 1])) % 180 == pytest.approx(40.0, abs=1.0)
    cut = sim.psf(127.5, 127.5, size=11)
    np.testing.assert_array_equal(cut, psf[h - 5:h + 6, h - 5:h + 6])
    padded = sim.psf(127.5, 127.5, size=2 * h + 11)
    assert padded.sum() == pytest.approx(1.0, abs=1e-12) and padded[:5].sum() == 0
    with pytest.raises(ValueError, match="odd"):
        sim.psf(10, 10, size=10)


def test_default_psf_fwhm_at_centre_and_variation_across_chip():
    field = PsfField(nx=2048, ny=2048, fwhm_pix=1.0 / 0.26, fwhm_variation=0.1, ellipticity=0.05,
                     position_angle_deg=30.0, beta=3.0)
    assert _fit_fwhm(field.stamp(1023.5, 1023.5), 3.0) == pytest.approx(1.0 / 0.26, rel=0.03)
    ratio = _fit_fwhm(field.stamp(2047, 2047), 3.0) / _fit_fwhm(field.stamp(0, 0), 3.0)
    assert ratio == pytest.approx(1.1, abs=0.02)


def test_galaxy_is_extended_and_sums_to_its_flux():
    params = dataclasses.replace(QUIET, nx=160, ny=160)
    galaxies = Table({"ra": [params.ra], "dec": [params.dec], "mag": [19.0], "sersic_n": [1.0],
                      "r_eff_arcsec": [1.5], "axis_ratio": [0.5], "pa_deg": [0.0]})
    sim = simulate_image(params, galaxies=galaxies)
    gal = sim.galaxies[0]
    image = sim.data.astype(float) - sim.sky
    assert image.sum() == pytest.approx(gal["flux_adu"], rel=1e-3)
    # major axis along north (= +y): the light extends further along y than along x
    cy, cx = int(round(gal["y"])), int(round(gal["x"]))
    assert image[cy + 8, cx] > 2 * image[cy, cx + 8]
    assert image.max() < 0.3 * sim.psf(cx, cy).max() * gal["flux_adu"]


def test_transients_at_pixels_and_sky_positions_and_in_hosts():
    params = dataclasses.replace(QUIET, nx=160, ny=160)
    base = simulate_image(params)
    wcs = base.true_wcs
    ra, dec = wcs.all_pix2world([100.2], [50.7], 0)
    transients = Table({"x": [40.0], "y": [120.0], "mag": [20.0]})
    by_pixel = simulate_image(params, transients=transients)
    by_sky = simulate_image(params, transients=Table({"ra": ra, "dec": dec, "mag": [20.0]}))
    diff = by_pixel.data.astype(float) - base.data
    flux = by_pixel.transients["flux_adu"][0]
    assert flux == pytest.approx(10 ** (-0.4 * (20.0 - params.zero_point)))
    assert diff.sum() == pytest.approx(flux, rel=1e-3)
    assert np.unravel_index(diff.argmax(), diff.shape) == (120, 40)
    t = by_sky.transients[0]
    assert (t["x"], t["y"]) == (pytest.approx(100.2, abs=1e-6), pytest.approx(50.7, abs=1e-6))
    galaxies = simulate_image(SimulationParams(nx=256, ny=256, n_galaxies=10)).galaxies
    placed = place_transients_in_hosts(galaxies, np.full(30, 21.0), np.random.default_rng(2))
    hosts = galaxies[np.searchsorted(galaxies["galaxy_id"], placed["host_id"])]
    offset = SkyCoord(placed["ra"], placed["dec"], unit="deg").separation(
        SkyCoord(hosts["ra"], hosts["dec"], unit="deg")).arcsec
    assert np.median(offset / hosts["r_eff_arcsec"]) < 1.5 and np.all(offset < 10 * hosts["r_eff_arcsec"])


def test_same_stars_and_galaxies_in_a_second_exposure_with_a_transient_in_a_host():
    ref = simulate_image(SimulationParams(nx=200, ny=200, n_stars=30, n_galaxies=4, seed=1))
    transient = place_transients_in_hosts(ref.galaxies, [20.0], np.random.default_rng(0))
    params = SimulationParams(nx=200, ny=200, seed=2, fwhm_arcsec=1.4, mjd=61000.0,
                              noise=False, n_cosmic_rays=0, n_bad_columns=0)
    without = simulate_image(params, stars=ref.star_catalog, galaxies=ref.galaxies)
    new = simulate_image(params, stars=ref.star_catalog, galaxies=ref.galaxies,
                         transients=transient)
    assert np.array_equal(new.stars["source_id"], ref.stars["source_id"])
    np.testing.assert_allclose(new.stars["flux_adu"], ref.stars["flux_adu"])
    np.testing.assert_allclose(new.galaxies["x"], ref.galaxies["x"], atol=1e-8)
    assert not np.allclose(new.stars["ra"], ref.stars["ra"], atol=1e-9, rtol=0)   # later epoch
    t = new.transients[0]
    diff = new.data.astype(float) - without.data
    assert diff.sum() == pytest.approx(t["flux_adu"], rel=1e-3)
    assert np.unravel_index(diff.argmax(), diff.shape) == (round(t["y"]), round(t["x"]))


def test_invalid_inputs_are_rejected_with_named_messages():
    with pytest.raises(ValueError, match="ellipticity"):
        SimulationParams(ellipticity=0.7)
    with pytest.raises(ValueError, match="nx"):
        SimulationParams(nx=0)
    with pytest.raises(ValueError, match="n_galaxies must be an integer"):
        SimulationParams(n_galaxies=2.5)
    with pytest.raises(ValueError, match="star_mag_range"):
        SimulationParams(star_mag_range=(20.0, 15.0))
    with pytest.raises(ValueError, match="missing"):
        simulate_image(QUIET, stars=Table({"ra": [150.0], "dec": [2.0]}))
    with pytest.raises(ValueError, match="'ra', 'dec' or 'x', 'y'"):
        simulate_image(QUIET, transients=Table({"mag": [20.0]}))


def test_full_size_smoke():
    sim = simulate_image(SimulationParams(nx=2048, ny=2048, seed=1))
    assert sim.data.shape == (2048, 2048) and sim.data.dtype == np.float32
    assert sim.weight.dtype == np.float32 and sim.flags.dtype == np.uint16
    area_deg2 = (2048 * 0.26 / 3600) ** 2
    n_in = int(sim.stars["in_image"].sum())
    assert n_in == pytest.approx(10000 * area_deg2, rel=0.25)
    assert len(sim.gaia) > n_in


def test_a_cuspy_galaxy_is_pixel_integrated_alike_at_every_sub_pixel_phase():
    """A de Vaucouleurs profile's central pixel against a brute-force 400 x 400 integration: with
    5 x 5 samples a galaxy centred on a pixel put a sample on the cusp (19% of its flux too much
    in the central 3 x 3 pixels), so two epochs of one galaxy differed by a point source."""
    from improc import sim_galaxies

    jac = np.array([[-0.263, 0.0], [0.0, 0.263]])
    shape = dict(n=4.0, r_eff=0.4, q=0.7, pa_deg=30.0)
    for phase in ((0.0, 0.0), (0.45, -0.3)):
        stamp = sim_galaxies._sersic_stamp(*phase, jac, **shape)
        h = stamp.shape[0] // 2
        exact = [sim_galaxies._sampled(np.array([dx - phase[0]]), np.array([-phase[1]]), 400, jac=jac,
                                       n=4.0, r_eff=0.4, q=0.7, pa=np.deg2rad(30.0))[0, 0] for dx in (0, 3)]
        assert stamp[h, h] / stamp[h, h + 3] == pytest.approx(exact[0] / exact[1], rel=0.01)
