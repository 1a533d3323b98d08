"""Tests of improc.coadd on simulated epochs of one field, all on one pixel grid (same true WCS).

Truth: the simulator's weight is ``1 / (model / gain + (read_noise / gain)**2)`` of the noiseless
model (sky + objects), so the noiseless objects of each epoch are ``model - sky`` recovered from
the weight, and the truth of a weighted-mean coadd where every input was used is
``sum_i c_i s_i objects_i / sum_i c_i``.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from scipy import ndimage

from improc.coadd import (Coadd, CoaddInput, Rejection, coadd_psf, flux_scales, proper_coadd,
                          weighted_mean_coadd)
from improc.flags import PixelFlag
from improc.psf import PixelPSF
from improc.sim_detector import FLAG_COSMIC_RAY
from improc.simulator import SimulationParams, simulate_image

SIZE = 1024
ZP = 31.0
#: Five epochs of various seeing, sky and zero point.
EPOCHS = [dict(fwhm_arcsec=0.8, sky_adu=800.0, zero_point=31.0),
          dict(fwhm_arcsec=1.0, sky_adu=1500.0, zero_point=30.8),
          dict(fwhm_arcsec=1.3, sky_adu=600.0, zero_point=31.1),
          dict(fwhm_arcsec=1.1, sky_adu=2000.0, zero_point=30.9),
          dict(fwhm_arcsec=0.9, sky_adu=1000.0, zero_point=31.0)]
TRAIL_EPOCH = 1


def simulate(epochs, seed: int) -> list:
    return [simulate_image(SimulationParams(nx=SIZE, ny=SIZE, seed=seed + k, scene_seed=seed, detector_seed=seed,
                                            star_density=30000.0, n_galaxies=30, mjd=60000.0 + k, **epoch))
            for k, epoch in enumerate(epochs)]


def objects(sim) -> np.ndarray:
    """The noiseless objects (ADU) of an epoch, NaN where the weight is 0."""
    p = sim.params
    w = np.where(sim.weight > 0, sim.weight, np.nan)
    return (1.0 / w - (p.read_noise / p.gain) ** 2) * p.gain - sim.sky


def make_inputs(sims, trail: np.ndarray | None = None) -> list[CoaddInput]:
    """Inputs with the true sky and PSF; the cosmic-ray truth bit is cleared (rejection finds them)."""
    inputs = []
    for k, sim in enumerate(sims):
        data = sim.data + trail if (trail is not None and k == TRAIL_EPOCH) else sim.data
        inputs.append(CoaddInput(data=data, weight=sim.weight, flags=sim.flags & ~np.uint16(FLAG_COSMIC_RAY),
                                 zero_point=sim.params.zero_point, sky=sim.sky, psf=sim.psf))
    return inputs


def trail_distance() -> np.ndarray:
    """Distance (pixels) of every pixel from the line of the simulated satellite trail."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    return (0.8 * xx - yy + 100.0) / np.hypot(0.8, 1.0)


def truth_of(coadd: Coadd, sims) -> np.ndarray:
    c = coadd.image_weights
    return sum(w * s * objects(sim) for w, s, sim in zip(c, coadd.scales, sims)) / c.sum()


@pytest.fixture(scope="module")
def field():
    sims = simulate(EPOCHS, seed=10)
    # a satellite trail in one epoch: Gaussian profile, sigma 1.3 pixels, peak 150 ADU (~8 sigma)
    trail = (150.0 * np.exp(-0.5 * (trail_distance() / 1.3) ** 2)).astype(np.float32)
    inputs = make_inputs(sims, trail)
    coadd = weighted_mean_coadd(inputs, zero_point=ZP)
    plain = weighted_mean_coadd(inputs, zero_point=ZP, rejection=None)
    objs = np.stack([objects(s) for s in sims])
    source_free = np.all(np.abs(np.nan_to_num(objs, nan=1e9)) < 1.0, axis=0)
    return {"sims": sims, "inputs": inputs, "coadd": coadd, "plain": plain, "truth": truth_of(coadd, sims),
            "source_free": source_free}


def z_of(coadd: Coadd, truth: np.ndarray) -> np.ndarray:
    return (coadd.data - truth) * np.sqrt(coadd.weight)


def test_pixel_noise_matches_the_weight(field):
    coadd, truth = field["coadd"], field["truth"]
    z = z_of(coadd, truth)
    full = coadd.n_used == len(EPOCHS)
    quiet = full & field["source_free"]
    assert quiet.sum() > 500_000
    assert 0.95 < np.std(z[quiet]) < 1.05                # measured 0.999
    assert abs(np.mean(z[quiet])) < 0.02
    assert 0.95 < np.std(z[full]) < 1.05                  # every pixel, stars included: 0.999
    assert coadd.zero_point == ZP
    np.testing.assert_allclose(coadd.scales, flux_scales([e["zero_point"] for e in EPOCHS], ZP))


def _isolated_stars(sims, margin: int = 40):
    stars, galaxies = sims[0].stars, sims[0].galaxies
    x, y = np.asarray(stars["x"]), np.asarray(stars["y"])
    inside = (x > margin) & (x < SIZE - margin) & (y > margin) & (y < SIZE - margin)
    d_star = np.hypot(x[:, None] - x[None, :], y[:, None] - y[None, :]) + np.eye(x.size) * 1e9
    d_gal = np.hypot(x[:, None] - np.asarray(galaxies["x"])[None, :], y[:, None] - np.asarray(galaxies["y"])[None, :])
    saturated = np.any([np.asarray(s.stars["saturated"]) for s in sims], axis=0)
    keep = inside & (d_star.min(axis=1) > 20) & (d_gal.min(axis=1) > 40) & ~saturated
    return stars[keep]


def _psf_flux(image, weight, x, y, stamp, radius=6.0):
    h = stamp.shape[0] // 2
    ix, iy = int(np.floor(x + 0.5)), int(np.floor(y + 0.5))
    d = image[iy - h:iy + h + 1, ix - h:ix + h + 1]
    w = weight[iy - h:iy + h + 1, ix - h:ix + h + 1]
    off = np.arange(-h, h + 1)
    w = np.where(off[:, None] ** 2 + off[None, :] ** 2 <= radius**2, w, 0.0)
    spp = (w * stamp**2).sum()
    return (w * stamp * d).sum() / spp, 1.0 / np.sqrt(spp)


def test_star_fluxes_unbiased(field):
    inputs, coadd = field["inputs"], field["coadd"]
    stars = _isolated_stars(field["sims"])
    ratio, snr = [], []
    for row in stars:
        x, y = float(row["x"]), float(row["y"])
        ix, iy = int(round(x)), int(round(y))
        if np.any(coadd.n_used[iy - 15:iy + 16, ix - 15:ix + 16] < len(inputs)):
            continue
        flux, err = _psf_flux(coadd.data, coadd.weight, x, y, _shifted(coadd_psf(inputs, coadd, x, y), x, y))
        true = 10 ** (-0.4 * (row["mag"] - ZP))
        ratio.append(flux / true - 1)
        snr.append(true / err)
    ratio, snr = np.array(ratio), np.array(snr)
    bright = snr > 100
    assert bright.sum() >= 15                                   # 25 stars, S/N 100 - 6000
    assert abs(np.median(ratio[bright])) < 0.01                 # measured +0.06 % (weighted mean -0.01 %)
    assert abs(np.average(ratio[bright], weights=snr[bright] ** 2)) < 0.01
    assert np.max(np.abs(ratio[bright])) < 0.05


def test_cosmic_rays_rejected(field):
    sims, coadd, plain = field["sims"], field["coadd"], field["plain"]
    hits = np.stack([((s.flags & FLAG_COSMIC_RAY) != 0) & (s.weight > 0) & ((s.flags & ~np.uint16(FLAG_COSMIC_RAY)) == 0)
                     for s in sims])
    any_hit = hits.any(axis=0)
    assert any_hit.sum() > 150
    assert np.all(coadd.n_used[any_hit] <= len(sims) - hits.sum(axis=0)[any_hit])
    assert coadd.n_rejected.sum() >= hits.sum()
    residual = np.abs(coadd.data - plain.data)[any_hit] * np.sqrt(plain.weight[any_hit])
    assert np.median(residual) > 10                             # what the hits did to the plain mean
    quiet = any_hit & field["source_free"]
    z = z_of(coadd, field["truth"])[quiet]
    assert np.max(np.abs(z)) < 5                                # measured 3.2


def test_satellite_trail_rejected(field):
    coadd, plain, truth = field["coadd"], field["plain"], field["truth"]
    distance = np.abs(trail_distance())
    quiet = field["source_free"] & (coadd.weight > 0)
    band = quiet & (distance < 6)
    assert np.mean(z_of(plain, truth)[band]) > 0.3              # unrejected: 0.63 sigma per pixel
    assert abs(np.mean(z_of(coadd, truth)[band])) < 0.05        # measured 0.007
    core = quiet & (distance < 1)
    assert np.mean(coadd.n_used[core] == len(EPOCHS) - 1) > 0.99
    assert coadd.n_rejected[TRAIL_EPOCH] > 3000


@pytest.fixture(scope="module")
def equal_epochs():
    """Five epochs of the same seeing, sky and zero point (only the noise differs)."""
    sims = simulate([dict(fwhm_arcsec=1.0, sky_adu=1000.0, zero_point=ZP)] * 5, seed=30)
    inputs = make_inputs(sims)
    return sims, inputs, weighted_mean_coadd(inputs, zero_point=ZP)


def _blank_positions(sims, weight: np.ndarray, step: int = 16) -> list[tuple[int, int]]:
    """A grid of positions at least 10 pixels from objects, cosmic rays and pixels without data."""
    objs = np.stack([np.nan_to_num(np.abs(objects(s)), nan=1e9) for s in sims]).max(axis=0)
    hits = np.any([(s.flags & FLAG_COSMIC_RAY) != 0 for s in sims], axis=0)
    busy = ndimage.maximum_filter(np.where(hits, 1e9, objs), 21) > 0.5
    busy |= ndimage.minimum_filter(weight, 21) <= 0
    grid = [(x, y) for y in range(40, SIZE - 40, step) for x in range(40, SIZE - 40, step) if not busy[y, x]]
    assert len(grid) > 1000
    return grid


def _blank_sky_flux_scatter(image, positions, psf_of) -> float:
    """Scatter of PSF fluxes forced on source-free positions: the 1-sigma point-source depth."""
    ones = np.ones(image.shape)
    return float(np.std([_psf_flux(image, ones, x, y, psf_of(x, y), radius=7.0)[0] for x, y in positions]))


def test_point_source_depth_gains_sqrt_of_n(equal_epochs):
    sims, inputs, coadd = equal_epochs
    positions = _blank_positions(sims, coadd.weight)
    one, all_five = sims[0].psf(512, 512), coadd_psf(inputs, coadd, 512, 512)   # the chip-centre PSFs
    single = _blank_sky_flux_scatter(sims[0].data - sims[0].sky, positions, lambda x, y: one)
    stacked = _blank_sky_flux_scatter(coadd.data, positions, lambda x, y: all_five)
    gain = 2.5 * np.log10(single / stacked)                     # limiting magnitudes at one zero point
    assert abs(gain - 2.5 * np.log10(np.sqrt(5))) < 0.1         # expected 0.874, measured 0.847


def test_proper_coadd_noise_flux_and_depth(field):
    inputs, coadd, sims = field["inputs"], field["coadd"], field["sims"]
    proper = proper_coadd(inputs, zero_point=ZP)
    assert proper.psf_stamps.shape[:2] == (2, 2)
    assert np.array_equal(proper.flags, coadd.flags)
    objs = np.stack([np.nan_to_num(np.abs(objects(s)), nan=1e9) for s in sims]).max(axis=0)
    far = (ndimage.maximum_filter(objs, 61) < 1.0) & (proper.weight > 0)
    z = proper.data[far] * np.sqrt(proper.weight[far])
    assert far.sum() > 200_000
    assert 0.95 < np.std(z) < 1.05                              # measured 0.998
    assert np.median(proper.weight[far]) == pytest.approx(coadd.image_weights.sum(), rel=0.02)
    ratio = []
    for row in _isolated_stars(sims):
        x, y = float(row["x"]), float(row["y"])
        flux, err = _psf_flux(proper.data, proper.weight, x, y, _shifted(proper.psf_at(x, y), x, y))
        true = 10 ** (-0.4 * (row["mag"] - ZP))
        if true / err > 100:
            ratio.append(flux / true - 1)
    assert len(ratio) >= 15
    assert abs(np.median(ratio)) < 0.01                         # measured -0.26 %
    positions = _blank_positions(sims, coadd.weight)
    centre = coadd_psf(inputs, coadd, 512, 512)
    mean_depth = _blank_sky_flux_scatter(coadd.data, positions, lambda x, y: centre)
    proper_depth = _blank_sky_flux_scatter(proper.data, positions, lambda x, y: proper.psf_at(x, y))
    assert 2.5 * np.log10(mean_depth / proper_depth) > 0.0     # proper is deeper: measured 0.014 mag


def _shifted(stamp: np.ndarray, x: float, y: float) -> np.ndarray:
    """A centred stamp moved by the sub-pixel offset of (x, y) from its nearest pixel (Fourier)."""
    dx, dy = x - np.floor(x + 0.5), y - np.floor(y + 0.5)
    n = stamp.shape[0]
    f = np.fft.fftfreq(n)
    phase = np.exp(-2j * np.pi * (f[None, :] * dx + f[:, None] * dy))
    moved = np.fft.ifft2(np.fft.fft2(np.fft.ifftshift(stamp)) * phase).real
    return np.fft.fftshift(moved)


# --- small synthetic images: scaling, weights, flags, the PSF and the errors -------------------


def _constant(value: float, zp: float, var: float = 4.0, shape=(32, 40), flags=None, sky=0.0) -> CoaddInput:
    return CoaddInput(data=np.full(shape, value + sky, np.float32), weight=np.full(shape, 1 / var, np.float32),
                      flags=np.zeros(shape, np.uint16) if flags is None else flags, zero_point=zp, sky=sky)


def test_flux_scaling_and_weights():
    inputs = [_constant(100.0, 31.0), _constant(100.0 * 10 ** (0.4 * 0.5), 31.5, sky=50.0),
              _constant(100.0 * 10 ** (-0.4 * 0.25), 30.75, var=16.0)]
    coadd = weighted_mean_coadd(inputs, zero_point=31.0)
    np.testing.assert_allclose(coadd.data, 100.0, rtol=1e-5)
    # scaled variances 4, 4 * s**2, 16 * s**2; image weights are their inverses
    s = flux_scales([31.0, 31.5, 30.75], 31.0)
    var = np.array([4.0, 4.0 * s[1] ** 2, 16.0 * s[2] ** 2])
    np.testing.assert_allclose(coadd.image_weights, 1 / var, rtol=1e-5)
    np.testing.assert_allclose(coadd.weight, (1 / var).sum(), rtol=1e-5)     # the sum of the weights
    assert np.all(coadd.n_used == 3) and not coadd.flags.any()
    other = weighted_mean_coadd(inputs, zero_point=32.0, image_weights=[1.0, 0.0, 0.0])
    np.testing.assert_allclose(other.data, 100.0 * 10 ** 0.4, rtol=1e-5)
    np.testing.assert_allclose(other.weight, 1 / (4.0 * 10 ** 0.8), rtol=1e-5)
    assert weighted_mean_coadd(inputs).zero_point == 31.0                    # the median


def test_pixels_without_valid_input_are_flagged():
    shape = (32, 40)
    flags = [np.zeros(shape, np.uint16) for _ in range(3)]
    for k, f in enumerate(flags):
        f[5, 5] = PixelFlag.SATURATED
        f[6, 6] = PixelFlag.BAD if k else 0
    flags[2][7, 7] = PixelFlag.CR
    inputs = [_constant(10.0 * (k + 1), 31.0, flags=f) for k, f in enumerate(flags)]
    inputs[1].weight[8, 8] = 0.0
    coadd = weighted_mean_coadd(inputs, rejection=None)
    assert coadd.flags[5, 5] == PixelFlag.NO_DATA | PixelFlag.SATURATED
    assert coadd.data[5, 5] == 0 and coadd.weight[5, 5] == 0 and coadd.n_used[5, 5] == 0
    assert coadd.flags[6, 6] == 0 and coadd.data[6, 6] == pytest.approx(10.0) and coadd.n_used[6, 6] == 1
    assert coadd.n_used[7, 7] == 2 and coadd.data[7, 7] == pytest.approx(15.0)
    assert coadd.n_used[8, 8] == 2 and coadd.data[8, 8] == pytest.approx(20.0)
    assert coadd.flags.sum() == coadd.flags[5, 5]
    only_saturated = weighted_mean_coadd(inputs, rejection=None, mask_flags=int(PixelFlag.SATURATED))
    assert only_saturated.n_used[7, 7] == 3 and only_saturated.n_used[6, 6] == 3


def test_rejection_of_a_single_outlier_grows_and_needs_three_inputs():
    rng = np.random.default_rng(0)
    shape = (64, 64)
    inputs = [CoaddInput(data=rng.normal(0, 1, shape).astype(np.float32), weight=np.ones(shape, np.float32),
                         flags=np.zeros(shape, np.uint16), zero_point=30.0) for _ in range(4)]
    inputs[2].data[30, 30] += 100.0
    coadd = weighted_mean_coadd(inputs, rejection=Rejection(grow=1))
    assert coadd.n_used[30, 30] == 3
    assert np.all(coadd.n_used[29:32, 29:32] == 3)                       # grown by one pixel
    assert coadd.n_rejected.tolist() == [0, 0, 9, 0]
    two = weighted_mean_coadd(inputs[1:3])
    assert two.n_used[30, 30] == 2 and two.n_rejected.sum() == 0
    assert weighted_mean_coadd(inputs, rejection=None).n_used[30, 30] == 4


def test_coadd_psf_is_the_weighted_sum_of_the_inputs_psfs(field):
    inputs, coadd, sims = field["inputs"], field["coadd"], field["sims"]
    stamp = coadd_psf(inputs, coadd, 300.3, 700.8)
    assert stamp.sum() == pytest.approx(1.0)
    size = stamp.shape[0]
    assert size == max(s.psf(300.3, 700.8).shape[0] for s in sims)
    c = coadd.image_weights / coadd.image_weights.sum()
    expected = sum(ck * s.psf(300.3, 700.8, size) for ck, s in zip(c, sims))
    np.testing.assert_allclose(stamp, expected, atol=1e-12)
    small = coadd_psf(inputs, coadd, 300.0, 700.0, size=31)
    assert small.shape == (31, 31) and small.sum() == pytest.approx(1.0)
    pixel_psf = PixelPSF(basis=sims[0].psf(512, 512)[None], degree=0, x0=512.0, y0=512.0, xscale=512.0,
                         yscale=512.0, image_shape=(SIZE, SIZE))
    one = weighted_mean_coadd([replace(inputs[0], psf=pixel_psf)])
    np.testing.assert_allclose(coadd_psf([replace(inputs[0], psf=pixel_psf)], one, 10.0, 10.0),
                               sims[0].psf(512, 512), atol=1e-12)


def test_bad_arguments():
    good = _constant(1.0, 30.0)
    with pytest.raises(ValueError, match="inputs must hold at least one CoaddInput"):
        weighted_mean_coadd([])
    with pytest.raises(ValueError, match=r"inputs must share one grid: inputs\[1\] has shape \(10, 10\)"):
        weighted_mean_coadd([good, _constant(1.0, 30.0, shape=(10, 10))])
    with pytest.raises(ValueError, match=r"inputs\[0\] must be a CoaddInput"):
        weighted_mean_coadd([np.zeros((3, 3))])
    with pytest.raises(ValueError, match="image_weights must be 2 finite values >= 0"):
        weighted_mean_coadd([good, good], image_weights=[1.0, -1.0])
    with pytest.raises(ValueError, match="rejection must be a Rejection or None"):
        weighted_mean_coadd([good], rejection=5.0)
    with pytest.raises(ValueError, match=r"inputs\[0\] has no psf"):
        proper_coadd([good])
    with pytest.raises(ValueError, match=r"inputs\[0\] has no psf"):
        coadd_psf([good], weighted_mean_coadd([good]), 1.0, 1.0)
    with pytest.raises(ValueError, match="tile_size must be an integer >= 16 or None"):
        proper_coadd([good], tile_size=8)
    with pytest.raises(ValueError, match="coadd was made from 1 inputs, got 2"):
        coadd_psf([good, good], weighted_mean_coadd([good]), 1.0, 1.0)
    with_psf = replace(good, psf=lambda x, y: np.ones((4, 4)))
    with pytest.raises(ValueError, match="a PSF stamp must be square with an odd side"):
        coadd_psf([with_psf], weighted_mean_coadd([with_psf]), 1.0, 1.0)
    with_psf = replace(good, psf=lambda x, y: np.ones((5, 5)))
    with pytest.raises(ValueError, match="size must be a positive odd integer or None"):
        coadd_psf([with_psf], weighted_mean_coadd([with_psf]), 1.0, 1.0, size=4)


@pytest.mark.parametrize("kwargs, match", [
    ({"sigma": 0.0}, "sigma must be > 0"),
    ({"source_tolerance": -1.0}, "source_tolerance must be >= 0"),
    ({"grow": -1}, "grow must be an integer >= 0"),
    ({"source_window": 4}, "source_window must be odd"),
    ({"min_inputs": 2}, "min_inputs must be an integer >= 3"),
])
def test_bad_rejection(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Rejection(**kwargs)


@pytest.mark.parametrize("change, match", [
    ({"data": np.zeros(5)}, "data must be a 2-d"),
    ({"weight": np.zeros((2, 2))}, "weight must have the shape of data"),
    ({"flags": np.zeros((4, 4))}, "flags must be integers"),
    ({"sky": np.zeros((2, 2))}, "sky must be a number or have the shape of data"),
    ({"zero_point": np.nan}, "zero_point must be finite"),
])
def test_bad_coadd_input(change, match):
    args = dict(data=np.zeros((4, 4)), weight=np.ones((4, 4)), flags=np.zeros((4, 4), np.uint16), zero_point=30.0)
    with pytest.raises(ValueError, match=match):
        CoaddInput(**{**args, **change})


def test_white_weights_set_the_image_weights_and_the_white_output_weight():
    inputs = [_constant(100.0, 31.0), _constant(100.0, 31.0), _constant(100.0, 31.0)]
    resampled = replace(inputs[1], white_weight=np.full((32, 40), 1 / 8.0, np.float32))
    coadd = weighted_mean_coadd([inputs[0], resampled, inputs[2]])
    np.testing.assert_allclose(coadd.image_weights, [1 / 4, 1 / 8, 1 / 4])
    den = (5 / 8) ** 2
    np.testing.assert_allclose(coadd.weight, den / (4 / 16 + 4 / 64 + 4 / 16), rtol=1e-5)
    np.testing.assert_allclose(coadd.white_weight, den / (4 / 16 + 8 / 64 + 4 / 16), rtol=1e-5)
    plain = weighted_mean_coadd(inputs)
    assert np.array_equal(plain.white_weight, plain.weight)
    with pytest.raises(ValueError, match="white_weight must have the shape of data"):
        replace(inputs[0], white_weight=np.ones(3))


def _gaussian(sigma: float, size: int = 31):
    def psf(x, y):
        off = np.arange(size) - size // 2
        g = np.exp(-0.5 * (off[:, None] ** 2 + off[None, :] ** 2) / sigma**2)
        return g / g.sum()
    return psf


def test_proper_coadd_of_a_noiseless_star_is_its_flux_times_the_proper_psf():
    shape, flux = (96, 96), 5000.0
    inputs = []
    for sigma, var, zp in ((1.2, 4.0, 30.0), (2.0, 9.0, 30.5), (1.6, 1.0, 29.8)):
        psf = _gaussian(sigma)
        data = np.zeros(shape, np.float32)
        data[48 - 15:48 + 16, 40 - 15:40 + 16] = flux * 10 ** (0.4 * (zp - 30.0)) * psf(40, 48)
        inputs.append(CoaddInput(data=data, weight=np.full(shape, 1 / var, np.float32),
                                 flags=np.zeros(shape, np.uint16), zero_point=zp, psf=psf))
    proper = proper_coadd(inputs, zero_point=30.0, tile_size=None, rejection=None)
    assert proper.psf_stamps.shape == (1, 1, 31, 31)
    model = flux * proper.psf_at(40, 48)
    np.testing.assert_allclose(proper.data[48 - 15:48 + 16, 40 - 15:40 + 16], model, atol=1e-4 * model.max())
    # white noise of variance 1 / F_R**2 = 1 / sum(1 / sigma_j**2) in output units
    s = flux_scales([30.0, 30.5, 29.8], 30.0)
    expected = sum(1 / (var * sj**2) for var, sj in zip((4.0, 9.0, 1.0), s))
    assert np.median(proper.weight) == pytest.approx(expected, rel=1e-3)
