"""Cosmic rays by Laplacian edge detection (`improc.cosmic_rays`), against the simulator's truth."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from improc.cosmic_rays import find_cosmic_rays, laplacian_plus
from improc.sim_detector import FLAG_COSMIC_RAY
from improc.simulator import SimulationParams, simulate_image

GAIN, READ_NOISE = 4.0, 5.0     # the simulator's defaults, e-/ADU and e-


def _variance(image: np.ndarray) -> np.ndarray:
    """The variance preprocessing gives: Poisson from the image itself (a hit raises its own)."""
    return np.maximum(image, 0) / GAIN + (READ_NOISE / GAIN) ** 2


def _gaussian(shape, x, y, fwhm, flux):
    yy, xx = np.indices(shape)
    sigma = fwhm / 2.3548
    return flux * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma**2)) / (2 * np.pi * sigma**2)


def test_laplacian_plus_of_a_spike_and_of_a_plane():
    image = np.full((9, 9), 100.0, np.float32)
    assert np.all(laplacian_plus(image) == 0)
    image[4, 4] += 50.0
    lplus = laplacian_plus(image)
    assert lplus[4, 4] == pytest.approx(100.0)          # 2 A for a one-pixel spike of height A
    assert lplus[4, 3] == 0 and lplus[3, 4] == 0         # beside it the Laplacian is negative


def test_a_spike_is_found_and_a_star_of_the_same_peak_is_not():
    rng = np.random.default_rng(3)
    model = np.full((64, 64), 1000.0) + _gaussian((64, 64), 40.3, 20.7, fwhm=3.0, flux=60000.0)
    image = (model + rng.normal(0, np.sqrt(_variance(model)))).astype(np.float32)
    peak = model[21, 40] - 1000.0                        # the star's peak above the sky, ~6,000 ADU
    image[45, 12] += peak                                # a one-pixel hit as high as the star
    image[50, 30:32] += 0.3 * peak                       # a two-pixel track
    hits = find_cosmic_rays(image, _variance(image))
    assert hits[45, 12] and hits[50, 30] and hits[50, 31]
    assert not hits[15:27, 34:47].any()                  # the star keeps every pixel
    assert hits.sum() <= 5                               # the hits, at most a neighbour more each


def test_simulated_frames_hits_found_stars_and_noise_left(request):
    found, strong, false, star_cores = 0, 0, 0, 0
    for fwhm in (0.7, 1.4):
        sim = simulate_image(SimulationParams(nx=1024, ny=1024, fwhm_arcsec=fwhm, star_density=30000.0,
                                              n_cosmic_rays=150, seed=11))
        truth = (sim.flags & FLAG_COSMIC_RAY) != 0
        bad = (sim.flags & ~np.uint16(FLAG_COSMIC_RAY)) != 0
        hits = find_cosmic_rays(sim.data, _variance(sim.data), bad)
        significance = (sim.data - np.median(sim.data)) / np.sqrt(_variance(sim.data))
        # (a track touching a bad pixel is left alone by design)
        bright = truth & ~ndimage.binary_dilation(bad, structure=np.ones((3, 3)), iterations=3) & (significance > 8)
        found += int(np.sum(hits & bright))
        strong += int(bright.sum())
        false += int(np.sum(hits & ~ndimage.binary_dilation(truth, structure=np.ones((3, 3)))))
        assert not (hits & bad).any()
        stars = sim.stars[sim.stars["in_image"] & (sim.stars["snr"] > 20) & ~sim.stars["saturated"]]
        x, y = np.round(stars["x"]).astype(int), np.round(stars["y"]).astype(int)
        inside = (x > 0) & (x < 1023) & (y > 0) & (y < 1023)
        clean = ~ndimage.binary_dilation(truth, iterations=3)[y[inside], x[inside]]
        star_cores += int(np.sum(hits[y[inside], x[inside]][clean]))
    # measured: 100 % of 8-sigma hit pixels, 4 false pixels over 2 x 1024^2, no star core

    assert strong > 400 and found >= 0.99 * strong
    assert false <= 20
    assert star_cores == 0


def test_what_touches_a_bad_pixel_is_left_alone():
    rng = np.random.default_rng(5)
    model = np.full((48, 48), 1000.0) + _gaussian((48, 48), 24, 24, fwhm=3.0, flux=4e6)
    image = (model + rng.normal(0, np.sqrt(_variance(model)))).astype(np.float32)
    bad = image > 50000.0                                # a saturated core, its wings sharp against it
    image[bad] = 50000.0
    image[5, 5] += 5000.0                                # and a hit far from it
    hits = find_cosmic_rays(image, _variance(image), bad)
    assert hits[5, 5] and not (hits & ndimage.binary_dilation(bad, iterations=6)).any()


def test_bad_arguments_are_refused():
    image = np.zeros((10, 10), np.float32)
    with pytest.raises(ValueError, match="one shape"):
        find_cosmic_rays(image, np.ones((10, 11)))
    with pytest.raises(ValueError, match="must be > 0"):
        find_cosmic_rays(image, np.ones((10, 10)), sigma_clip=0)
    assert not find_cosmic_rays(image, np.zeros((10, 10))).any()     # no pixel with a known noise


@pytest.mark.real_data
def test_a_real_raw_frame_its_sharp_spikes_flagged_its_sources_kept():
    """The SAAO raw frame of ../shared/data/ccdproc_raw: sep finds 21 objects at 5 sigma, 15 of
    them one- or two-pixel spikes (rms size < 0.9 px) that no seeing makes, and one a seven-pixel
    track: all flagged; the round broad objects keep their cores."""
    import sep
    from astropy.io import fits

    from improc.preprocessing import parse_fits_section, preprocess

    path = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "ccdproc_raw" / "a8280271.fits"
    if not path.is_file():
        pytest.fail(f"real test data missing: {path} (see ../shared/data/README.md)")
    with fits.open(path) as hdul:
        raw, header = hdul[0].data, hdul[0].header
    frame = preprocess(raw, overscan=parse_fits_section(header["BIASSEC"]), data=parse_fits_section(header["TRIMSEC"]),
                       gain=float(header["GAIN"]), read_noise=float(header["RDNOISE"]), saturation=65000.0)
    variance = np.where(frame.weight > 0, 1.0 / np.maximum(frame.weight, 1e-30), np.inf)
    hits = find_cosmic_rays(frame.image, variance, frame.flags != 0)
    background = sep.Background(frame.image)
    objects = sep.extract(frame.image - background.back(), 5.0, err=background.globalrms)

    def hit_near(obj, radius):
        y, x = int(round(obj["y"])), int(round(obj["x"]))
        return hits[max(y - radius, 0):y + radius + 1, max(x - radius, 0):x + radius + 1].any()

    sharp = [o for o in objects if o["a"] < 0.9]
    broad = [o for o in objects if o["b"] > 1.2]           # (a track is long but thin)
    assert len(sharp) >= 10 and len(broad) >= 3
    assert all(hit_near(o, 1) for o in sharp)
    assert not any(hit_near(o, 2) for o in broad)
