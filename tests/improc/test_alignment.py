"""Tests of improc.alignment: warping a reference onto a new image's grid, against ground truth.

The simulator's true WCS has no rotation parameter, so `rotated_true_wcs` turns the sky axes of
the WCSs it makes (a camera rotated on the sky; the SIP distortion stays fixed to the pixels).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from astropy.table import Table

from improc import sim_wcs
from improc.sim_wcs import rotated_true_wcs
from improc.alignment import (local_jacobian, map_pixels, pixel_mapping, psf_on_grid,
                              spline_noise_factor, warp_image, warp_noise_power)
from improc.flags import PixelFlag
from improc.sim_psf import PsfField
from improc.simulator import SimulationParams, simulate_image

#: A reference with nothing but stars and galaxies, noiseless, round PSF constant over the chip.
QUIET = SimulationParams(nx=512, ny=512, noise=False, n_cosmic_rays=0, n_bad_columns=0,
                         sky_gradient=0.0, fwhm_variation=0.0, ellipticity=0.0,
                         saturation_adu=1e9, n_galaxies=20, star_density=30000.0, seed=3,
                         fwhm_arcsec=0.9)
#: The new image: 7.3" east, 4.1" south, 0.27"/pixel instead of 0.26", turned by 1.5 degrees.
SHIFT_ARCSEC = (7.3, -4.1)
ROTATION_DEG = 1.5
NEW_SCALE = 0.27


def new_params(params: SimulationParams, *, shift_arcsec=SHIFT_ARCSEC, **changes) -> SimulationParams:
    """The parameters of an image of the same field pointed ``shift_arcsec`` (east, north) away."""
    east, north = shift_arcsec
    return dataclasses.replace(params, ra=params.ra + east / 3600.0 / np.cos(np.deg2rad(params.dec)),
                               dec=params.dec + north / 3600.0, **changes)


@pytest.fixture(scope="module")
def quiet_pair():
    """A noiseless reference and the same scene rendered directly on the new grid."""
    ref = simulate_image(QUIET)
    with rotated_true_wcs(ROTATION_DEG):
        new = simulate_image(new_params(QUIET, pixel_scale=NEW_SCALE), stars=ref.star_catalog,
                             galaxies=ref.galaxies)
    warped = warp_image(ref.data - ref.sky, ref.weight, ref.flags, source_wcs=ref.true_wcs,
                        target_wcs=new.true_wcs, target_shape=new.data.shape)
    return ref, new, warped


def test_pixel_mapping_follows_both_wcs(quiet_pair):
    ref, new, _ = quiet_pair
    mapping = pixel_mapping(source_wcs=ref.true_wcs, target_wcs=new.true_wcs, target_shape=(512, 512))
    rx, ry = np.random.default_rng(0).integers(0, 512, (2, 2000))
    xs, ys = map_pixels(rx.astype(float), ry.astype(float), source_wcs=ref.true_wcs,
                        target_wcs=new.true_wcs)
    # measured: 2e-5 pixel (float32 rounding)
    assert np.abs(mapping.x[ry, rx] - xs).max() < 1e-4
    assert np.abs(mapping.y[ry, rx] - ys).max() < 1e-4
    # a target pixel is (0.27 / 0.26)^2 source pixels
    assert mapping.area.mean() == pytest.approx((NEW_SCALE / 0.26) ** 2, rel=2e-3)
    jac = local_jacobian(256.0, 256.0, source_wcs=ref.true_wcs, target_wcs=new.true_wcs)
    angle = np.degrees(np.arctan2(jac[1, 0], jac[0, 0]))
    assert abs(angle) == pytest.approx(ROTATION_DEG, abs=0.01)


def test_warped_noiseless_reference_matches_the_scene_rendered_on_the_new_grid(quiet_pair):
    _, new, warped = quiet_pair
    truth = new.data - new.sky
    inner = np.s_[20:-20, 20:-20]
    good = warped.flags[inner] == 0
    diff = (warped.data - truth)[inner][good]
    peak = truth[inner].max()
    # measured: max 0.37% of the brightest peak, rms 0.22% of the image's rms
    assert np.abs(diff).max() < 0.006 * peak
    assert diff.std() < 0.004 * truth[inner][good].std()
    # flux is conserved through the change of pixel scale: over the image and star by star
    assert warped.data[inner][good].sum() == pytest.approx(truth[inner][good].sum(), rel=5e-4)
    stars = new.stars
    bright = ((stars["flux_adu"] > 2e4) & (stars["x"] > 40) & (stars["x"] < 472)
              & (stars["y"] > 40) & (stars["y"] < 472))
    yy, xx = np.mgrid[0:512, 0:512]
    assert bright.sum() >= 4
    for star in stars[bright]:
        aperture = np.hypot(xx - star["x"], yy - star["y"]) < 15   # 5 FWHM
        assert warped.data[aperture].sum() == pytest.approx(truth[aperture].sum(), rel=5e-3)


def test_footprint_edges_and_outside(quiet_pair):
    ref, new, warped = quiet_pair
    mapping = pixel_mapping(source_wcs=ref.true_wcs, target_wcs=new.true_wcs, target_shape=(512, 512))
    xs, ys = mapping.x, mapping.y
    off = (xs < -0.5) | (xs >= 511.5) | (ys < -0.5) | (ys >= 511.5)
    assert off.sum() > 1000 and (~off).sum() > 200_000      # the grids overlap partly
    np.testing.assert_array_equal(warped.footprint, ~off)
    assert np.all(warped.flags[off] & PixelFlag.NO_DATA)
    assert np.all(warped.data[off] == 0) and np.all(warped.weight[off] == 0)
    # the 4 x 4 interpolation footprint reaches beyond the source's edge: EDGE, exactly there
    # (and off the image)
    edge = ~off & ((xs < 1) | (xs >= 510) | (ys < 1) | (ys >= 510))
    np.testing.assert_array_equal((warped.flags & PixelFlag.EDGE) != 0, edge | off)
    assert np.all(warped.flags[~off & ~edge] == 0)


def test_flags_spread_to_the_pixels_they_touch_and_bad_values_do_not_leak(quiet_pair):
    ref, new, clean = quiet_pair
    flags = np.zeros_like(ref.flags)
    flags[200, 150] = PixelFlag.CR
    flags[:, 300] = PixelFlag.BAD
    data = (ref.data - ref.sky).copy()
    data[200, 150] = 1e6       # a cosmic ray
    data[:, 300] = -5e5        # a dead, badly calibrated column
    warped = warp_image(data, ref.weight, flags, source_wcs=ref.true_wcs, target_wcs=new.true_wcs,
                        target_shape=new.data.shape)
    mapping = pixel_mapping(source_wcs=ref.true_wcs, target_wcs=new.true_wcs, target_shape=(512, 512))
    dx, dy = mapping.x - 150, mapping.y - 200
    cr = (warped.flags & PixelFlag.CR) != 0
    # the pixels whose 4 x 4 interpolation footprint holds the hit, and only those
    near = (np.abs(dx) < 1) & (np.abs(dy) < 1)
    footprint = (np.floor(dx) >= -2) & (np.floor(dx) <= 1) & (np.floor(dy) >= -2) & (np.floor(dy) <= 1)
    assert near.sum() >= 3 and np.all(cr[near])
    np.testing.assert_array_equal(cr, footprint)
    assert np.all(warped.weight[cr] == 0) and np.all(warped.white_weight[cr] == 0)
    column = (warped.flags & PixelFlag.BAD) != 0
    np.testing.assert_array_equal(column, (mapping.x >= 298) & (mapping.x < 302))
    # the flagged values do not ring into the unflagged pixels (their fill is interpolated)
    good = (warped.flags == 0) & warped.footprint
    peak = np.abs(clean.data).max()
    assert np.abs(warped.data - clean.data)[good].max() < 1e-3 * peak


def test_propagated_weight_matches_the_noise_of_warped_noise(quiet_pair):
    ref, new, _ = quiet_pair
    rng = np.random.default_rng(5)
    sigma = 3.0
    shape = (1024, 1024)
    with rotated_true_wcs(0.0):
        source_wcs = sim_wcs.make_true_wcs(1024, 1024, ra=150.0, dec=2.0, pixel_scale=0.26,
                                           sip_amplitude_pix=2.0)
    with rotated_true_wcs(ROTATION_DEG) as make:
        target_wcs = make(1024, 1024, ra=150.0 + 2.1 / 3600, dec=2.0 - 1.7 / 3600,
                          pixel_scale=NEW_SCALE, sip_amplitude_pix=2.0)
    noise = rng.normal(0.0, sigma, shape).astype(np.float32)
    warped = warp_image(noise, np.full(shape, 1 / sigma**2, np.float32), np.zeros(shape, np.uint16),
                        source_wcs=source_wcs, target_wcs=target_wcs, target_shape=shape)
    good = warped.flags == 0
    pulls = warped.data * np.sqrt(warped.weight)
    # pixel by pixel: unit variance, at every sub-pixel phase (1 / (s s) from 1 to 1.75)
    phase = np.divide(warped.weight, warped.white_weight, where=good,
                      out=np.ones(shape, np.float32)) * (NEW_SCALE / 0.26) ** 2
    assert phase[good].min() < 1.05 and phase[good].max() > 1.6
    for low, high in ((1.0, 1.25), (1.25, 1.45), (1.45, 1.8)):
        part = good & (phase >= low) & (phase < high)
        assert pulls[part].std() == pytest.approx(1.0, abs=0.015)   # measured 0.999-1.005
    # sums over 16 x 16 blocks: the white-noise weight predicts their variance ...
    inner = np.s_[64:960, 64:960]
    assert good[inner].all()
    blocks = warped.data[inner].reshape(56, 16, 56, 16).sum(axis=(1, 3))
    white = (1 / warped.white_weight[inner]).reshape(56, 16, 56, 16).sum(axis=(1, 3))
    pixel = (1 / warped.weight[inner]).reshape(56, 16, 56, 16).sum(axis=(1, 3))
    assert blocks.var() / white.mean() == pytest.approx(1.0, abs=0.07)
    # ... the per-pixel one does not (the noise is correlated): 1 / (A <s s>) = 1.19 times too
    # small here
    assert blocks.var() / pixel.mean() > 1.12


def test_spline_noise_factor_and_noise_power():
    assert spline_noise_factor(np.array([0.0, 0.5, 0.999999]))[[0, 2]] == pytest.approx(1.0, abs=1e-5)
    assert spline_noise_factor(np.array([0.5]))[0] == pytest.approx(0.75613, abs=1e-4)
    nu = np.linspace(-0.5, 0.5, 20001)
    power = warp_noise_power(np.zeros_like(nu), nu)
    assert power[10000] == pytest.approx(1.0) and power[0] == pytest.approx(0.4857, abs=1e-3)
    # the mean power is the mean per-pixel variance factor
    phases = np.linspace(0, 1, 20001)
    assert power.mean() == pytest.approx(spline_noise_factor(phases).mean(), abs=1e-3)
    # target frequencies are the source's through the warp's Jacobian: a quarter turn swaps
    # the axes, a 2x magnification halves the frequencies
    fy, fx = np.array([0.1, 0.3]), np.array([0.45, 0.0])
    turn = np.array([[0.0, -1.0], [1.0, 0.0]])
    np.testing.assert_allclose(warp_noise_power(fy, fx, jacobian=turn), warp_noise_power(fx, fy))
    np.testing.assert_allclose(warp_noise_power(fy, fx, jacobian=np.eye(2) / 2),
                               warp_noise_power(2 * fy, 2 * fx))


def _stars_at_new_pixels(make_new, params: SimulationParams, x, y, g) -> Table:
    """A scene catalog whose stars fall on given pixels of the new image."""
    wcs = make_new(params.nx, params.ny, ra=params.ra, dec=params.dec, pixel_scale=params.pixel_scale,
                   sip_amplitude_pix=params.sip_amplitude_pix)
    ra, dec = wcs.all_pix2world(np.asarray(x, float), np.asarray(y, float), 0)
    g = np.asarray(g, float)
    return Table({"ra": ra, "dec": dec, "pmra": np.zeros(g.size), "pmdec": np.zeros(g.size),
                  "G": g, "BP": g + 0.6, "RP": g - 0.4})


def test_psf_on_grid_is_the_warped_star():
    # an elliptical PSF that varies over the chip, stars on pixel centres of the new grid
    params = dataclasses.replace(QUIET, n_galaxies=0, n_stars=0, fwhm_variation=0.1,
                                 ellipticity=0.15)
    positions = [(100.0, 120.0), (300.0, 260.0), (420.0, 400.0)]
    with rotated_true_wcs(20.0) as make:
        target = new_params(params, pixel_scale=NEW_SCALE)
        catalog = _stars_at_new_pixels(make, target, *zip(*positions), [17.0] * 3)
        target_wcs = make(512, 512, ra=target.ra, dec=target.dec, pixel_scale=NEW_SCALE,
                          sip_amplitude_pix=target.sip_amplitude_pix)
    ref = simulate_image(params, stars=catalog)
    warped = warp_image(ref.data - ref.sky, ref.weight, ref.flags, source_wcs=ref.true_wcs,
                        target_wcs=target_wcs, target_shape=(512, 512))
    for x, y in positions:
        stamp = psf_on_grid(ref.psf, x, y, source_wcs=ref.true_wcs, target_wcs=target_wcs)
        h = stamp.shape[0] // 2
        star = warped.data[int(y) - h:int(y) + h + 1, int(x) - h:int(x) + h + 1]
        star = star / star.sum()
        # measured: 2.5e-4 to 5e-4 of the peak (the Fourier shift of the source stamp)
        assert np.abs(stamp - star).max() < 2e-3 * star.max()


def _moments(stamp: np.ndarray) -> np.ndarray:
    """Second-moment matrix [[xx, xy], [xy, yy]] of a centred stamp."""
    h = stamp.shape[0] // 2
    yy, xx = np.mgrid[-h:h + 1, -h:h + 1]
    w = stamp / stamp.sum()
    return np.array([[(w * xx * xx).sum(), (w * xx * yy).sum()],
                     [(w * xx * yy).sum(), (w * yy * yy).sum()]])


def test_psf_on_grid_turns_and_scales_the_psf():
    field = PsfField(nx=512, ny=512, fwhm_pix=4.0, fwhm_variation=0.0, ellipticity=0.3,
                     position_angle_deg=10.0, beta=3.0)
    source_wcs = sim_wcs.make_true_wcs(512, 512, ra=150.0, dec=2.0, pixel_scale=0.26,
                                       sip_amplitude_pix=0.0)
    with rotated_true_wcs(25.0) as make:
        target_wcs = make(512, 512, ra=150.0, dec=2.0, pixel_scale=0.31, sip_amplitude_pix=0.0)
    stamp = psf_on_grid(field.stamp, 256.0, 256.0, source_wcs=source_wcs, target_wcs=target_wcs,
                        size=61)
    assert stamp.sum() == pytest.approx(1.0)
    jac = local_jacobian(256.0, 256.0, source_wcs=source_wcs, target_wcs=target_wcs)
    inverse = np.linalg.inv(jac)
    expected = inverse @ _moments(field.stamp(256.0, 256.0, 61)) @ inverse.T
    # measured: equal to 0.001 pixel^2 (second moments of ~5 pixel^2)
    np.testing.assert_allclose(_moments(stamp), expected, atol=0.05, rtol=0.01)


def test_errors_name_the_argument():
    data = np.zeros((10, 10), np.float32)
    wcs = sim_wcs.make_true_wcs(10, 10, ra=150.0, dec=2.0, pixel_scale=0.26, sip_amplitude_pix=0.0)
    kw = dict(source_wcs=wcs, target_wcs=wcs, target_shape=(10, 10))
    with pytest.raises(ValueError, match="data must be a 2-d"):
        warp_image(np.zeros(10), np.zeros(10), np.zeros(10, np.uint16), **kw)
    with pytest.raises(ValueError, match="weight must have the shape of data"):
        warp_image(data, np.zeros((5, 5)), np.zeros((10, 10), np.uint16), **kw)
    with pytest.raises(ValueError, match="flags must be an integer array"):
        warp_image(data, data, data, **kw)
    with pytest.raises(ValueError, match="target_shape must be"):
        warp_image(data, data, np.zeros((10, 10), np.uint16), source_wcs=wcs, target_wcs=wcs,
                   target_shape=(0, 10))
    with pytest.raises(ValueError, match="grid_step must be"):
        warp_image(data, data, np.zeros((10, 10), np.uint16), grid_step=0, **kw)
    psf = lambda x, y: np.ones((5, 5))  # noqa: E731
    with pytest.raises(ValueError, match="size must be a positive odd integer"):
        psf_on_grid(psf, 5.0, 5.0, source_wcs=wcs, target_wcs=wcs, size=4)
    with pytest.raises(ValueError, match="square with an odd side"):
        psf_on_grid(lambda x, y: np.ones((4, 4)), 5.0, 5.0, source_wcs=wcs, target_wcs=wcs)
