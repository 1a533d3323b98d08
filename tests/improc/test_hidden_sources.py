"""Tests of improc.hidden_sources: sources found on the image minus a model of the known ones.

16 bright known stars (flux 2e5) on a 400 x 400 image, each with a faint unknown neighbour 2.2 to
4.5 FWHM away; the model of the known sources is their exact PSF rendering (or a deliberately
wrong one), so what is found depends only on `find_hidden_sources`.  Neighbours of S/N 100 at
4.9 and 5.2 FWHM test the edge of the search area (``max_separation`` 5 FWHM).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import sep
from astropy.table import Table
from scipy.signal import fftconvolve
from scipy.spatial import cKDTree

from improc.extraction import SourceFlag, extract_sources
from improc.hidden_sources import _paint_discs, find_hidden_sources
from improc.psf import PixelPSF
from improc.psf_photometry import psf_fluxes, render_sources
from tests.improc.test_crowded_photometry import SIGMA, SKY, grid, moffat_psf, moffat_stamp, star_image

SHAPE = (400, 400)
BRIGHT = 2e5
THRESHOLD = 5.0


@pytest.fixture(scope="module")
def psf():
    return moffat_psf(SHAPE)


@pytest.fixture(scope="module")
def point_fwhm(psf):
    """The ``fwhm`` column of `extract_sources` (twice the half-light radius) for isolated stars."""
    rng = np.random.default_rng(1)
    x, y = grid(SHAPE, 80.0, rng)
    data, _ = star_image(SHAPE, x, y, np.full(x.size, BRIGHT), psf, rng)
    found = extract_sources(data, background=SKY, noise=SIGMA, aperture_radii=[4.0], filter_type="matched")
    assert len(found) == x.size
    return float(np.median(found["fwhm"]))       # ~4.5 for psf.fwhm_pixels ~3.6


@pytest.fixture(scope="module")
def bright(psf):
    """16 bright stars 80 px apart, and the positions of their faint neighbours (2.2 to 4.5 FWHM)."""
    rng = np.random.default_rng(3)
    x, y = grid(SHAPE, 80.0, rng)
    angle = rng.uniform(0.0, 2 * np.pi, x.size)
    distance = rng.permutation(np.linspace(2.2, 4.5, x.size)) * psf.fwhm_pixels
    return x, y, x + distance * np.cos(angle), y + distance * np.sin(angle)


def unit_flux_error(psf) -> float:
    """Error of the PSF flux of an isolated star on a background of noise ``SIGMA``."""
    return SIGMA / np.sqrt(np.sum(psf.get_clip(200.0, 200.0) ** 2))


def search(data, model, x, y, psf, point_fwhm, **options) -> Table:
    """`find_hidden_sources` with the pipeline's choices: 2 to 6 FWHM from the known point
    sources, matched filter, 5 sigma."""
    fwhm = psf.fwhm_pixels
    args = dict(point_like=np.ones(x.size, bool), extent=np.full(x.size, 10.0), background=SKY,
                variance=SIGMA**2, min_separation=2.0 * fwhm, max_separation=6.0 * fwhm,
                point_fwhm=point_fwhm, aperture_radii=[fwhm], threshold=THRESHOLD, filter_type="matched")
    args.update(options)
    return find_hidden_sources(data, model, x, y, **args)


def matched(found: Table, x: np.ndarray, y: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """For each found source, the distance to the nearest of (x, y) and its index."""
    if len(found) == 0:
        return np.empty(0), np.empty(0, int)
    return cKDTree(np.column_stack([x, y])).query(np.column_stack([found["x"], found["y"]]),
                                                  distance_upper_bound=radius)


@pytest.mark.parametrize("snr", [25.0, 20.0])
def test_faint_neighbours_found_at_their_positions(psf, point_fwhm, bright, snr):
    bx, by, fx, fy = bright
    rng = np.random.default_rng(int(snr))
    flux = np.r_[np.full(bx.size, BRIGHT), np.full(fx.size, snr * unit_flux_error(psf))]
    data, _ = star_image(SHAPE, np.r_[bx, fx], np.r_[by, fy], flux, psf, rng)
    model = render_sources(SHAPE, bx, by, np.full(bx.size, BRIGHT), psf)
    found = search(data, model, bx, by, psf, point_fwhm)
    distance, which = matched(found, fx, fy, 2.0)
    assert len(found) == fx.size                         # every neighbour, nothing else
    assert sorted(which) == list(range(fx.size))
    assert np.max(distance) < 0.5                        # measured 0.30 (S/N 25), 0.25 (S/N 20)
    assert np.all(found["flags"] & SourceFlag.RESIDUAL)
    assert np.min(cKDTree(np.column_stack([bx, by])).query(np.column_stack([found["x"], found["y"]]))[0]) \
        >= 2.0 * psf.fwhm_pixels


def test_neighbours_below_the_threshold_are_not_found(psf, point_fwhm, bright):
    """PSF S/N 4: below the 5-sigma threshold of the 3 x 3 matched filter, which finds half of
    the neighbours of S/N 8 and none of S/N 6."""
    bx, by, fx, fy = bright
    rng = np.random.default_rng(4)
    flux = np.r_[np.full(bx.size, BRIGHT), np.full(fx.size, 4.0 * unit_flux_error(psf))]
    data, _ = star_image(SHAPE, np.r_[bx, fx], np.r_[by, fy], flux, psf, rng)
    model = render_sources(SHAPE, bx, by, np.full(bx.size, BRIGHT), psf)
    assert len(search(data, model, bx, by, psf, point_fwhm)) == 0
    assert len(search(data, model, bx, by, psf, point_fwhm, max_separation=None)) == 0


def test_few_false_positives_on_noise(psf, point_fwhm, bright):
    """Known stars subtracted exactly, or no stars at all: 5 images, in the neighbourhoods of
    the stars and over the whole image, give at most 1 detection (measured 0)."""
    bx, by, _, _ = bright
    flux = np.full(bx.size, BRIGHT)
    count = 0
    for seed in range(5):
        rng = np.random.default_rng(100 + seed)
        data, stars = star_image(SHAPE, bx, by, flux, psf, rng)
        count += len(search(data, stars, bx, by, psf, point_fwhm))
        count += len(search(data, stars, bx, by, psf, point_fwhm, max_separation=None))
        noise = SKY + rng.normal(0.0, SIGMA, SHAPE)
        count += len(search(noise, np.zeros(SHAPE), bx, by, psf, point_fwhm, max_separation=None))
    assert count <= 1


def test_known_sources_are_not_detected_again(psf, point_fwhm, bright):
    """A model 10 % too faint leaves a star of 2e4 on each known one: dropped within
    ``min_separation``, found (on the known positions) when it is 0."""
    bx, by, _, _ = bright
    rng = np.random.default_rng(6)
    data, stars = star_image(SHAPE, bx, by, np.full(bx.size, BRIGHT), psf, rng)
    assert len(search(data, 0.9 * stars, bx, by, psf, point_fwhm)) == 0
    again = search(data, 0.9 * stars, bx, by, psf, point_fwhm, min_separation=0.0)
    distance, which = matched(again, bx, by, 2.0)
    assert sorted(which) == list(range(bx.size)) and np.max(distance) < 0.2


def test_model_error_and_size_cut_hide_residuals_of_an_imperfect_model(psf, point_fwhm, bright):
    bx, by, _, _ = bright
    rng = np.random.default_rng(8)
    data, stars = star_image(SHAPE, bx, by, np.full(bx.size, BRIGHT), psf, rng)
    # a model 3 % too faint: its residuals are within the default 2 % model error of the noise
    assert len(search(data, 0.97 * stars, bx, by, psf, point_fwhm, min_separation=0.0, model_error=0.0)) == bx.size
    assert len(search(data, 0.97 * stars, bx, by, psf, point_fwhm, min_separation=0.0)) == 0
    # a model too sharp leaves rings, too broad a sharp core: detected, but not of a star's size
    for fwhm in (3.0, 4.0):
        wrong = PixelPSF(basis=moffat_stamp(fwhm)[None], degree=0, x0=psf.x0, y0=psf.y0, xscale=psf.xscale,
                         yscale=psf.yscale, image_shape=SHAPE)
        model = render_sources(SHAPE, bx, by, np.full(bx.size, BRIGHT), wrong)
        loose = search(data, model, bx, by, psf, point_fwhm, min_separation=0.0, fwhm_tolerance=100.0)
        assert len(loose) >= 10                           # of 16; measured 12 and 16
        assert np.all(np.abs(loose["fwhm"] / point_fwhm - 1.0) > 0.3)
        assert len(search(data, model, bx, by, psf, point_fwhm, min_separation=0.0)) == 0


def test_search_only_within_max_separation(psf, point_fwhm, bright):
    bx, by, _, _ = bright
    rng = np.random.default_rng(9)
    far_x, far_y = bx[:3] + 40.0, by[:3] + 40.0         # 56 px ~ 16 FWHM from the nearest known star
    flux = np.r_[np.full(bx.size, BRIGHT), np.full(3, 30 * unit_flux_error(psf))]
    data, _ = star_image(SHAPE, np.r_[bx, far_x], np.r_[by, far_y], flux, psf, rng)
    model = render_sources(SHAPE, bx, by, np.full(bx.size, BRIGHT), psf)
    assert len(search(data, model, bx, by, psf, point_fwhm)) == 0
    everywhere = search(data, model, bx, by, psf, point_fwhm, max_separation=None)
    distance, which = matched(everywhere, far_x, far_y, 2.0)
    assert len(everywhere) == 3 and sorted(which) == [0, 1, 2] and np.max(distance) < 0.5
    # the detection mask is added to the search area's
    mask = np.zeros(SHAPE, dtype=bool)
    mask[int(far_y[0]) - 8:int(far_y[0]) + 9, int(far_x[0]) - 8:int(far_x[0]) + 9] = True
    assert len(search(data, model, bx, by, psf, point_fwhm, max_separation=None, mask=mask)) == 2


def galaxy(psf, x0: float, y0: float, flux: float, half_light_radius: float = 6.0) -> np.ndarray:
    """An exponential disc (axis ratio 0.6) seen through the PSF, summing to ``flux``."""
    yy, xx = np.mgrid[:SHAPE[0], :SHAPE[1]].astype(float)
    dx, dy = xx - x0, yy - y0
    u, v = dx * np.cos(0.5) + dy * np.sin(0.5), -dx * np.sin(0.5) + dy * np.cos(0.5)
    disc = np.exp(-1.678 * np.hypot(u, v / 0.6) / half_light_radius)
    image = fftconvolve(disc, psf.image_at(x0, y0), mode="same")
    return flux * image / image.sum()


@pytest.fixture(scope="module")
def galaxies(psf):
    """Two galaxies (flux 3e5, extent ~35 px), a star of S/N 30 12 px from the centre of the
    first (inside its extent) and one 45 px from the second (outside)."""
    rng = np.random.default_rng(5)
    gx, gy = np.array([120.3, 280.6]), np.array([130.2, 270.4])
    light = galaxy(psf, gx[0], gy[0], 3e5) + galaxy(psf, gx[1], gy[1], 3e5)
    sx, sy = np.array([gx[0] + 12.0, gx[1] - 45.0]), np.array([gy[0] + 3.3, gy[1] + 2.0])
    stars = render_sources(SHAPE, sx, sy, np.full(2, 30 * unit_flux_error(psf)), psf)
    data = SKY + light + stars + rng.normal(0.0, SIGMA, SHAPE)
    found = extract_sources(SKY + light + rng.normal(0.0, SIGMA, SHAPE), background=SKY, noise=SIGMA,
                            aperture_radii=[4.0], filter_type="matched")
    assert len(found) == 2
    extent = 2.0 * np.sqrt(np.asarray(found["npix"], float) / np.pi)
    return data, light, gx, gy, extent, sx, sy


def test_extended_hosts_hide_what_is_on_them(psf, point_fwhm, galaxies):
    data, light, gx, gy, extent, sx, sy = galaxies
    assert np.all(extent > 20.0)
    assert np.hypot(sx[0] - gx[0], sy[0] - gy[0]) < extent[0] < np.hypot(sx[1] - gx[1], sy[1] - gy[1])
    options = dict(extent=extent, max_separation=None)
    # the galaxies modelled exactly: as point sources, the star on the first one is found...
    as_points = search(data, light, gx, gy, psf, point_fwhm, point_like=np.ones(2, bool), **options)
    distance, which = matched(as_points, sx, sy, 2.0)
    assert len(as_points) == 2 and sorted(which) == [0, 1] and np.max(distance) < 0.5
    # ...as extended sources nothing within their extent is searched
    as_extended = search(data, light, gx, gy, psf, point_fwhm, point_like=np.zeros(2, bool), **options)
    distance, which = matched(as_extended, sx, sy, 2.0)
    assert len(as_extended) == 1 and list(which) == [1] and distance[0] < 0.5
    # with max_separation, the search is only around point sources: none here
    nowhere = search(data, light, gx, gy, psf, point_fwhm, point_like=np.zeros(2, bool), extent=extent)
    assert isinstance(nowhere, Table) and len(nowhere) == 0 and nowhere.colnames == []


def test_residuals_of_extended_hosts_are_ignored(psf, point_fwhm, galaxies):
    """A PSF model cannot fit a galaxy; with the size and distance cuts off, its residual is
    detected if the galaxy counts as a point source, and not if it is extended."""
    data, _, gx, gy, extent, _, _ = galaxies
    flux = psf_fluxes(data, gx, gy, psf, background=SKY, variance=SIGMA**2).flux
    model = render_sources(SHAPE, gx, gy, flux, psf)
    loose = dict(extent=extent, max_separation=None, min_separation=0.0, fwhm_tolerance=100.0, model_error=0.0)
    as_points = search(data, model, gx, gy, psf, point_fwhm, point_like=np.ones(2, bool), **loose)
    assert np.sum(matched(as_points, gx, gy, 5.0)[0] < 5.0) == 2
    as_extended = search(data, model, gx, gy, psf, point_fwhm, point_like=np.zeros(2, bool), **loose)
    assert not np.any(matched(as_extended, gx, gy, 30.0)[0] < 30.0)


def test_known_sources_without_positions_are_ignored(psf, point_fwhm, bright):
    """NaN known positions (as `deblended_psf_fluxes` accepts) change nothing."""
    bx, by, fx, fy = bright
    rng = np.random.default_rng(25)
    flux = np.r_[np.full(bx.size, BRIGHT), np.full(fx.size, 25.0 * unit_flux_error(psf))]
    data, _ = star_image(SHAPE, np.r_[bx, fx], np.r_[by, fy], flux, psf, rng)
    model = render_sources(SHAPE, bx, by, np.full(bx.size, BRIGHT), psf)
    found = search(data, model, bx, by, psf, point_fwhm)
    assert len(found) == fx.size
    nx, ny = np.r_[bx[:8], np.nan, bx[8:], 50.0, np.nan], np.r_[by[:8], 70.0, by[8:], np.nan, np.nan]
    with_nan = search(data, model, nx, ny, psf, point_fwhm, point_like=np.r_[np.ones(bx.size + 2, bool), False],
                      extent=np.full(nx.size, 10.0))
    assert len(with_nan) == len(found)
    assert np.array_equal(with_nan["x"], found["x"]) and np.array_equal(with_nan["flags"], found["flags"])


@pytest.fixture(scope="module")
def near_the_edge(psf, bright):
    """The 16 bright stars, each with a neighbour of PSF S/N 100 at 4.9 or 5.2 FWHM."""
    bx, by, _, _ = bright
    angle = np.random.default_rng(11).uniform(0.0, 2 * np.pi, bx.size)
    images = {}
    for separation in (4.9, 5.2):
        fx = bx + separation * psf.fwhm_pixels * np.cos(angle)
        fy = by + separation * psf.fwhm_pixels * np.sin(angle)
        flux = np.r_[np.full(bx.size, BRIGHT), np.full(fx.size, 100.0 * unit_flux_error(psf))]
        data, _ = star_image(SHAPE, np.r_[bx, fx], np.r_[by, fy], flux, psf, np.random.default_rng(12))
        images[separation] = data, fx, fy
    return bx, by, render_sources(SHAPE, bx, by, np.full(bx.size, BRIGHT), psf), images


def test_neighbours_near_max_separation_keep_their_footprint(psf, point_fwhm, near_the_edge):
    """The search area bounds the centres, not the footprints: a neighbour at 4.9 FWHM with
    ``max_separation`` 5 FWHM is found at its position (measured 0.07 px; 0.9 px when the search
    area masked its outer part) and not flagged MASKED, its apertures are whole, and one at
    5.2 FWHM is not found."""
    bx, by, model, images = near_the_edge
    fwhm = psf.fwhm_pixels
    radii = [fwhm, 3.0 * fwhm]
    data, fx, fy = images[4.9]
    found = search(data, model, bx, by, psf, point_fwhm, max_separation=5.0 * fwhm, aperture_radii=radii)
    distance, which = matched(found, fx, fy, 2.0)
    assert len(found) == fx.size and sorted(which) == list(range(fx.size))
    assert np.max(distance) < 0.3
    assert not np.any(found["flags"] & (SourceFlag.MASKED | SourceFlag.APER_HAS_MASKED))
    # the 3 FWHM aperture reaches 8 FWHM from the bright star: it holds the neighbour's enclosed flux
    unit = render_sources(SHAPE, np.array([200.3]), np.array([200.6]), np.ones(1), psf)
    enclosed = sep.sum_circle(unit, np.array([200.3]), np.array([200.6]), 3.0 * fwhm, subpix=5)[0][0]
    pull = (found["apflux_1"] - enclosed * 100.0 * unit_flux_error(psf)) / found["apfluxerr_1"]
    assert np.all(np.abs(pull) < 4.0) and abs(np.mean(pull)) < 1.0
    far, _, _ = images[5.2]
    assert len(search(far, model, bx, by, psf, point_fwhm, max_separation=5.0 * fwhm)) == 0


def test_masked_flag_comes_from_the_callers_mask(psf, point_fwhm, near_the_edge):
    """A bad pixel 3 px from every other neighbour flags those, and only those, MASKED."""
    bx, by, model, images = near_the_edge
    data, fx, fy = images[4.9]
    mask = np.zeros(SHAPE, dtype=bool)
    mask[np.rint(fy[::2]).astype(int), np.rint(fx[::2]).astype(int) + 3] = True
    found = search(data, model, bx, by, psf, point_fwhm, max_separation=5.0 * psf.fwhm_pixels, mask=mask)
    _, which = matched(found, fx, fy, 2.0)
    assert sorted(which) == list(range(fx.size))
    assert sorted(which[(found["flags"] & SourceFlag.MASKED) > 0]) == list(range(0, fx.size, 2))


def test_painted_discs_are_those_of_one_disc_at_a_time():
    """`_paint_discs` sets exactly the pixels that a disc-by-disc loop sets: discs of mixed radii
    (0, fractional, over a chunk), centres at pixel centres, edges and corners, off the image."""
    rng = np.random.default_rng(3)
    shape = (37, 53)
    n = 600        # more than one chunk of discs
    x = np.r_[rng.uniform(-5, shape[1] + 5, n - 6), 0.0, 52.0, 10.0, 3.5, -0.5, 20.0]
    y = np.r_[rng.uniform(-5, shape[0] + 5, n - 6), 0.0, 36.0, 10.0, 7.25, 40.0, 18.0]
    radius = np.r_[rng.choice([0.0, 0.7, 2.0, 3.3, 6.5], n - 6), 1.0, 4.0, 0.0, 2.5, 3.0, 9.9]
    expected = np.zeros(shape, bool)
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    for xi, yi, ri in zip(x, y, radius):
        expected |= (xx - xi) ** 2 + (yy - yi) ** 2 <= ri**2
    painted = np.zeros(shape, bool)
    _paint_discs(painted, x, y, radius)
    np.testing.assert_array_equal(painted, expected)
    empty = np.zeros(shape, bool)
    _paint_discs(empty, np.array([]), np.array([]), np.array([]))
    assert not empty.any()


def test_size_cut_applies_without_known_sources(point_fwhm):
    """A Gaussian blob of sigma 8 px (fwhm ~19 px, 4 x point_fwhm) is not a hidden star, whether
    or not there are known sources."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:200, :200]
    blob = 5000.0 * np.exp(-((xx - 100.0) ** 2 + (yy - 100.0) ** 2) / (2 * 8.0**2))     # fwhm ~19 px
    data = SKY + blob + rng.normal(0.0, SIGMA, (200, 200))
    options = dict(background=SKY, variance=SIGMA**2, min_separation=7.0, max_separation=None,
                   point_fwhm=point_fwhm, aperture_radii=[3.0], threshold=THRESHOLD)
    one_far = find_hidden_sources(data, np.zeros(data.shape), np.array([10.0]), np.array([10.0]),
                                  point_like=np.array([True]), extent=np.array([3.0]), **options)
    assert len(one_far) == 0
    none = find_hidden_sources(data, np.zeros(data.shape), np.array([]), np.array([]),
                               point_like=np.array([], bool), extent=np.array([]), **options)
    assert len(none) == 0
    # it is detected: the size cut is what drops it
    loose = find_hidden_sources(data, np.zeros(data.shape), np.array([]), np.array([]), point_like=np.array([], bool),
                                extent=np.array([]), **options | dict(fwhm_tolerance=100.0))
    assert len(loose) == 1 and np.hypot(loose["x"][0] - 100.0, loose["y"][0] - 100.0) < 1.0
    assert loose["fwhm"][0] > 3.0 * point_fwhm


@pytest.mark.parametrize("change, message", [
    (dict(model=np.zeros((20, 20))), r"model must have the data shape \(40, 50\), got shape \(20, 20\)"),
    (dict(point_like=np.ones(3, bool)), "point_like and extent must have the length of known_x"),
    (dict(extent=np.ones(1)), "point_like and extent must have the length of known_x"),
    (dict(known_y=np.array([12.0])),
     r"known_x and known_y must be 1-D of the same length, got shapes \(2,\) and \(1,\)"),
    (dict(threshold=0.0), "threshold must be > 0"),
    (dict(aperture_radii=[]), "aperture_radii must be a non-empty sequence"),
    *[(dict({name: np.ones((5, 5))}),
       rf"{name} must have a scalar or the data shape \(40, 50\), got shape \(5, 5\)")
      for name in ("variance", "background")],
    (dict(mask=np.zeros((5, 5), bool)), r"mask must have the data shape \(40, 50\), got shape \(5, 5\)"),
    (dict(variance=-1.0), "variance must be finite and >= 0 if a scalar, got -1.0"),
    *[(dict(gain=gain), rf"gain must be None or finite and > 0 \(e-/ADU\), got {gain}")
      for gain in (0.0, -2.0, np.nan, np.inf)],
    (dict(min_separation=-1.0), "min_separation must be finite and >= 0, got -1.0"),
    (dict(max_separation=0.0), "max_separation must be None or finite and > 0, got 0.0"),
    (dict(point_fwhm=0.0), "point_fwhm must be finite and > 0, got 0.0"),
    (dict(fwhm_tolerance=np.nan), "fwhm_tolerance must be finite and >= 0, got nan"),
])
def test_invalid_input(change, message):
    shape = (40, 50)
    args = dict(data=np.full(shape, SKY), model=np.ones(shape), known_x=np.array([10.0, 30.0]),
                known_y=np.array([12.0, 20.0]), point_like=np.ones(2, bool), extent=np.ones(2), background=SKY,
                variance=SIGMA**2, min_separation=5.0, max_separation=15.0, point_fwhm=4.5,
                aperture_radii=[3.0], threshold=THRESHOLD, gain=1.0)
    args.update(change)
    with warnings.catch_warnings():
        warnings.simplefilter("error")            # fails before any arithmetic (no divide by zero)
        with pytest.raises(ValueError, match=message):
            find_hidden_sources(args.pop("data"), args.pop("model"), args.pop("known_x"), args.pop("known_y"),
                                **args)
