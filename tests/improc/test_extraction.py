"""Tests of improc.extraction: detection, windowed centroids, aperture photometry, star/galaxy."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from astropy.io import fits
from scipy.special import erf

from improc.background import estimate_background
from improc.extraction import (FWHM_APERTURE_MULTIPLES, SourceFlag, aperture_photometry,
                               estimate_fwhm, extract_sources, stellar_locus)

SIGMA = 1.4                      # Gaussian PSF sigma of the synthetic images, pixels
SKY, GAIN, READ_NOISE = 200.0, 2.0, 5.0   # ADU, e-/ADU, e-
SKY_NOISE = np.sqrt(SKY * GAIN + READ_NOISE**2) / GAIN   # ADU per pixel
FWHM_PIXEL = 2.3548 * np.sqrt(SIGMA**2 + 1 / 12)         # FWHM of the pixel-integrated PSF


def _render(shape, xs, ys, fluxes, sigma) -> np.ndarray:
    """Pixel-integrated circular Gaussians (exact total flux), 0-based pixel-centre coordinates."""
    image = np.zeros(shape)
    half = int(np.ceil(6 * sigma))
    for x, y, flux in zip(xs, ys, fluxes):
        ix, iy = int(round(x)), int(round(y))
        x0, x1 = max(ix - half, 0), min(ix + half + 1, shape[1])
        y0, y1 = max(iy - half, 0), min(iy + half + 1, shape[0])
        edges_x = (np.arange(x0, x1 + 1) - 0.5 - x) / (np.sqrt(2) * sigma)
        edges_y = (np.arange(y0, y1 + 1) - 0.5 - y) / (np.sqrt(2) * sigma)
        image[y0:y1, x0:x1] += flux * np.outer(np.diff(erf(edges_y)), np.diff(erf(edges_x))) / 4
    return image


def _observe(signal: np.ndarray, rng) -> np.ndarray:
    """ADU image of sky + signal with Poisson noise at GAIN and Gaussian read noise."""
    electrons = rng.poisson((signal + SKY) * GAIN) + rng.normal(0, READ_NOISE, signal.shape)
    return (electrons / GAIN).astype(np.float32)


@pytest.fixture(scope="module")
def star_field():
    """225 stars on a jittered 25-pixel grid, 3e3 to 1e5 ADU (S/N 20 to 1000), 400 x 400 pixels."""
    rng = np.random.default_rng(5)
    grid = np.arange(20, 390, 25.0)
    xs, ys = (g.ravel() + rng.uniform(-0.5, 0.5, g.size) for g in np.meshgrid(grid, grid))
    fluxes = 10 ** rng.uniform(3.5, 5, xs.size)
    image = _observe(_render((400, 400), xs, ys, fluxes, SIGMA), rng)
    radii = [FWHM_PIXEL * m for m in (1, 2, 3)]
    table = extract_sources(image, background=SKY, noise=SKY_NOISE, gain=GAIN, aperture_radii=radii)
    return image, xs, ys, fluxes, table


def _match(table, xs, ys, radius=1.0):
    """Index of the nearest true source for each row, and whether it is within ``radius``."""
    dist = np.hypot(np.asarray(table["x"])[:, None] - xs[None], np.asarray(table["y"])[:, None] - ys[None])
    return dist.argmin(axis=1), dist.min(axis=1) < radius


def test_all_stars_found_with_accurate_positions(star_field):
    _, xs, ys, _, table = star_field
    nearest, matched = _match(table, xs, ys)
    assert len(table) == xs.size and matched.all()
    assert len(set(nearest)) == xs.size
    bright = np.asarray(table["snr"]) > 100
    assert bright.sum() > 100
    assert np.max(np.abs(table["x"][bright] - xs[nearest[bright]])) < 0.05
    assert np.max(np.abs(table["y"][bright] - ys[nearest[bright]])) < 0.05
    assert table["x"].unit == "pix" and table["theta"].unit == "rad"


@pytest.mark.parametrize("index", [1, 2])
def test_aperture_flux_and_errors(star_field, index):
    """2 and 3 FWHM apertures: flux within 1% in the median, flux/error pulls have std ~ 1."""
    _, xs, ys, fluxes, table = star_field
    nearest, _ = _match(table, xs, ys)
    radius = table.meta["aperture_radii"][index]
    truth = fluxes[nearest] * (1 - np.exp(-0.5 * (radius / SIGMA) ** 2))
    flux, err = np.asarray(table[f"apflux_{index}"]), np.asarray(table[f"apfluxerr_{index}"])
    assert np.median(flux / truth) == pytest.approx(1.0, abs=0.01)
    pull = (flux - truth) / err
    assert abs(np.mean(pull)) < 0.25
    assert 0.8 < np.std(pull) < 1.25


def test_small_aperture_sees_pixelised_profile(star_field):
    """At 1 FWHM the flux is that of the PSF widened by two pixel boxes (pixel + aperture)."""
    _, xs, ys, fluxes, table = star_field
    nearest, _ = _match(table, xs, ys)
    radius = table.meta["aperture_radii"][0]
    sigma_eff = np.sqrt(SIGMA**2 + 2 / 12)
    truth = fluxes[nearest] * (1 - np.exp(-0.5 * (radius / sigma_eff) ** 2))
    assert np.median(np.asarray(table["apflux_0"]) / truth) == pytest.approx(1.0, abs=0.01)


def test_fwhm_and_star_classification(star_field):
    _, _, _, _, table = star_field
    assert estimate_fwhm(table) == pytest.approx(FWHM_PIXEL, rel=0.03)
    bright = np.asarray(table["snr"]) > 50
    assert np.median(table["fwhm"][bright]) == pytest.approx(FWHM_PIXEL, rel=0.04)
    assert np.mean(table["is_star"]) > 0.95
    assert np.all((table["class_star"] >= 0) & (table["class_star"] <= 1))


def test_star_galaxy_separation_when_galaxies_outnumber_stars():
    rng = np.random.default_rng(8)
    grid = np.arange(20, 300, 20.0)
    gx, gy = (g.ravel() for g in np.meshgrid(grid, grid))
    is_galaxy = rng.uniform(size=gx.size) < 0.6
    fluxes = 10 ** rng.uniform(3.5, 5, gx.size) * np.where(is_galaxy, 3.0, 1.0)
    signal = (_render((310, 310), gx[~is_galaxy], gy[~is_galaxy], fluxes[~is_galaxy], SIGMA)
              + _render((310, 310), gx[is_galaxy], gy[is_galaxy], fluxes[is_galaxy], 3.0))
    table = extract_sources(_observe(signal, rng), background=SKY, noise=SKY_NOISE, gain=GAIN,
                            aperture_radii=[5.0])
    nearest, matched = _match(table, gx, gy)
    assert matched.all() and len(table) == gx.size
    galaxy = is_galaxy[nearest]
    assert np.mean(table["is_star"][~galaxy]) > 0.95
    assert np.mean(table["is_star"][galaxy]) < 0.05
    assert estimate_fwhm(table) == pytest.approx(FWHM_PIXEL, rel=0.05)


def test_stellar_locus_picks_smallest_populated_size():
    rng = np.random.default_rng(2)
    sizes = np.r_[rng.normal(3.0, 0.05, 30), rng.normal(6.0, 0.5, 60), [0.9, 1.0]]
    centre, spread = stellar_locus(sizes)
    assert centre == pytest.approx(3.0, abs=0.05)
    assert 0.02 < spread < 0.1
    with pytest.raises(ValueError, match="need at least 5 sources"):
        stellar_locus([1.0, 2.0, np.nan])


@pytest.mark.real_data
def test_recovers_sextractor_catalog(shared_data):
    """sep image with default.sex settings: >= 95% of image.cat within 1 px; same aperture fluxes."""
    folder = shared_data / "sep"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # non-standard ESO-LOG header cards
        image = fits.getdata(folder / "image.fits")
    catalog = np.loadtxt(folder / "image.cat", comments="#")
    header = [line.split() for line in (folder / "image.cat").read_text().splitlines()
              if line.startswith("#")]
    column = {words[2]: int(words[1]) - 1 for words in header}
    mesh = estimate_background(image, box_size=64, filter_size=3)       # BACK_SIZE, BACK_FILTERSIZE
    table = extract_sources(image, background=mesh.counts(), noise=mesh.rms_map(), threshold=1.5,
                            minarea=5, deblend_cont=1.0, aperture_radii=[5.0])  # PHOT_APERTURES 10
    xwin = catalog[:, column["XWIN_IMAGE"]] - 1  # SExtractor positions are 1-based
    ywin = catalog[:, column["YWIN_IMAGE"]] - 1
    nearest, matched = _match(table, xwin, ywin)
    found = np.zeros(len(catalog), bool)
    found[nearest[matched]] = True
    assert len(catalog) == 65 and found.mean() >= 0.95
    rows = np.flatnonzero(matched)
    ratio = table["apflux_0"][rows] / catalog[nearest[rows], column["FLUX_APER"]]
    assert np.median(ratio) == pytest.approx(1.0, abs=0.005)
    assert np.mean(np.abs(ratio - 1) < 0.03) >= 0.9
    err_ratio = table["apfluxerr_0"][rows] / catalog[nearest[rows], column["FLUXERR_APER"]]
    assert np.median(err_ratio) == pytest.approx(1.0, abs=0.02)


def _flag_scene():
    rng = np.random.default_rng(4)
    xs, ys = np.array([40.0, 100.0, 160.0, 1.0, 100.0]), np.array([40.0, 40.0, 40.0, 120.0, 150.0])
    image = _observe(_render((200, 200), xs, ys, [3e4, 3e4, 3e5, 3e4, 3e4], SIGMA), rng)
    return image, xs, ys


def test_flags_for_mask_nan_saturation_and_edge():
    image, xs, ys = _flag_scene()
    mask = np.zeros(image.shape, bool)
    mask[30:50, 42:44] = True           # a bad column pair beside star 0
    image[40, 100] = np.nan             # a NaN at the core of star 1
    table = extract_sources(image, background=SKY, noise=SKY_NOISE, mask=mask, gain=GAIN,
                            saturation=float(image[40, 160]) - 1.0, aperture_radii=[4.0])
    nearest, matched = _match(table, xs, ys, radius=1.5)
    assert matched.all() and sorted(nearest) == [0, 1, 2, 3, 4]
    flags = {int(i): SourceFlag(int(f)) for i, f in zip(nearest, table["flags"])}
    assert SourceFlag.MASKED in flags[0] and SourceFlag.APER_HAS_MASKED in flags[0]
    assert SourceFlag.MASKED in flags[1]
    assert SourceFlag.SATURATED in flags[2] and SourceFlag.SATURATED not in flags[4]
    assert SourceFlag.TRUNCATED in flags[3] and SourceFlag.APER_TRUNCATED in flags[3]
    assert flags[4] == 0


def test_two_pass_apertures_and_remeasurement(star_field):
    image, _, _, _, first = star_field
    table = extract_sources(image, background=SKY, noise=SKY_NOISE, gain=GAIN)
    assert table.meta["fwhm"] == pytest.approx(estimate_fwhm(table))
    expected = [m * table.meta["fwhm"] for m in FWHM_APERTURE_MULTIPLES]
    assert table.meta["aperture_radii"] == pytest.approx(expected)
    assert [c for c in table.colnames if c.startswith("apflux_")] == [f"apflux_{i}" for i in range(4)]
    again = aperture_photometry(image, first, background=SKY, noise=SKY_NOISE, gain=GAIN,
                                aperture_radii=expected)
    np.testing.assert_allclose(again["apflux_3"], table["apflux_3"], rtol=1e-12)
    np.testing.assert_array_equal(again["flags"], table["flags"])


def test_noise_map_big_endian_and_scalar_inputs_agree(star_field):
    image, _, _, _, table = star_field
    radii = table.meta["aperture_radii"]
    other = extract_sources(image.astype(">f4"), background=np.full(image.shape, SKY, ">f8"),
                            noise=np.full(image.shape, SKY_NOISE), gain=GAIN, aperture_radii=radii)
    for name in ("x", "y", "flux_iso", "apflux_2", "apfluxerr_2", "fwhm", "flags"):
        np.testing.assert_allclose(other[name], table[name], rtol=1e-5)


def test_no_sources_gives_empty_table():
    image = np.random.default_rng(0).normal(0.0, 1.0, (64, 64))
    table = extract_sources(image, background=0.0, noise=1.0, threshold=10.0, aperture_radii=[3.0])
    assert len(table) == 0 and {"x", "y", "apflux_0", "is_star"} <= set(table.colnames)
    with pytest.raises(ValueError, match="not enough sources to estimate the FWHM: 0 of 0"):
        estimate_fwhm(table)


@pytest.mark.parametrize(("data", "kwargs", "match"), [
    (np.full((50, 50), np.nan), {}, "no valid pixel"),
    (np.zeros((0, 0)), {}, "empty"),
    (np.zeros((5, 5, 5)), {}, "2-D"),
    (np.zeros((50, 50)), {"noise": np.ones((40, 50))}, r"noise must be a scalar or have the data shape"),
    (np.zeros((50, 50)), {"background": np.ones((50, 40))}, "background must be a scalar"),
    (np.zeros((50, 50)), {"mask": np.zeros((50, 51), bool)}, "mask shape"),
    (np.zeros((50, 50)), {"noise": 0.0}, "noise must be finite and > 0"),
    (np.zeros((50, 50)), {"threshold": -1.0}, "threshold must be > 0"),
    (np.zeros((50, 50)), {"aperture_radii": []}, "aperture_radii must be a non-empty"),
    (np.zeros((50, 50)), {"aperture_radii": [3.0, -1.0]}, "aperture_radii must be"),
    (np.zeros((50, 50)), {"gain": 0.0}, "gain must be None or > 0"),
    (np.zeros((50, 50)), {"filter_type": "gauss"}, "filter_type must be 'conv' or 'matched'"),
    (np.zeros((50, 50)), {"deblend_cont": 2.0}, "deblend_cont must be in"),
])
def test_bad_input(data, kwargs, match):
    options = {"background": 0.0, "noise": 1.0, "aperture_radii": [3.0]} | kwargs
    with pytest.raises(ValueError, match=match):
        extract_sources(data, **options)


def test_too_many_sources_is_an_error(star_field):
    image = star_field[0]
    with pytest.raises(ValueError, match=r"found 2\d\d sources, more than max_sources=100"):
        extract_sources(image, background=SKY, noise=SKY_NOISE, aperture_radii=[3.0], max_sources=100)


def test_two_pass_needs_stars():
    image = np.random.default_rng(1).normal(0.0, 1.0, (64, 64))
    with pytest.raises(ValueError, match="not enough sources to estimate the FWHM"):
        extract_sources(image, background=0.0, noise=1.0)


def test_excluded_pixels_bound_the_detection_but_are_not_bad(star_field):
    """``exclude`` (the left part of the image, its edge 2 px right of a column of stars): no
    detection lies deeper in it than a footprint reaches; the stars on the edge, whose
    footprints it cuts, are found without MASKED, with the positions and aperture fluxes of
    the run without ``exclude`` to 0.05 px and 0.1 % (the excluded pixels are good data); ``mask`` on the same pixels
    does set MASKED."""
    image, xs, ys, fluxes, table = star_field
    radii = [FWHM_PIXEL * m for m in (1, 2, 3)]
    column = 195.0        # a column of the star_field grid (x = 20 + 25 k, jittered by < 0.5 px)
    edge_x = int(column) + 2
    exclude = np.zeros(image.shape, bool)
    exclude[:, :edge_x] = True
    options = dict(background=SKY, noise=SKY_NOISE, gain=GAIN, aperture_radii=radii)
    bounded = extract_sources(image, exclude=exclude, **options)
    x = np.asarray(bounded["x"])
    assert len(bounded) > 0 and x.min() > edge_x - 4
    edge = np.abs(x - column) < 1.5
    assert edge.sum() >= 10
    assert np.all((np.asarray(bounded["flags"])[edge] & SourceFlag.MASKED) == 0)
    full = np.asarray(table["x"]), np.asarray(table["y"])
    for row in bounded[edge]:
        k = np.argmin(np.hypot(full[0] - row["x"], full[1] - row["y"]))
        assert np.hypot(full[0][k] - row["x"], full[1][k] - row["y"]) < 0.05
        # (the windowed centroids differ by < 0.05 px: the apertures by < 0.1 %)
        assert row["apflux_2"] == pytest.approx(table["apflux_2"][k], rel=1e-3)
    masked = extract_sources(image, mask=exclude, **options)
    assert np.any(np.asarray(masked["flags"]) & SourceFlag.MASKED)
    with pytest.raises(ValueError, match="exclude shape"):
        extract_sources(image, exclude=exclude[:10], **options)
