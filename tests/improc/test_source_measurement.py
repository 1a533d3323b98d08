"""Tests of improc.source_measurement against the simulator's truth."""

from __future__ import annotations

import numpy as np
import pytest

from improc.background import estimate_background
from improc.errors import BadDataError
from improc.extraction import SourceFlag, TooFewSourcesError
from improc.matching import match_pixels
from improc.psf_fit import TooFewPSFStarsError
from improc.simulator import SimulationParams, simulate_image
from improc.source_measurement import PSFError, SourceMeasurement, measure_sources

#: Bad-column, saturated and bleed-trail bits of the simulator's flags (not its cosmic-ray truth).
_KNOWN_BAD = 1 | 2 | 8


@pytest.fixture(scope="module")
def field():
    """A 512 x 512 simulated image (250 stars, 50 galaxies, cosmic rays, bad columns) and the
    inputs of `measure_sources` as the pipeline makes them."""
    sim = simulate_image(SimulationParams(nx=512, ny=512, seed=11, n_stars=250))
    mask = (sim.flags & _KNOWN_BAD) != 0
    mesh = estimate_background(sim.data, mask=mask, box_size=128, filter_size=3)
    inputs = dict(background=mesh.counts(), variance=mesh.variance(), mask=mask,
                  gain=float(sim.header["GAIN"]), saturation=float(sim.header["SATURATE"]))
    return sim, inputs


@pytest.fixture(scope="module")
def measured(field) -> SourceMeasurement:
    sim, inputs = field
    return measure_sources(sim.data, **inputs)


def _matched(sim, sources, radius=1.0):
    """Indices (true star, source) of the in-image stars matched to sources, and the separations."""
    stars = sim.stars
    i_star, i_src, sep = match_pixels(np.asarray(stars["x"]), np.asarray(stars["y"]), np.asarray(sources["x"]),
                                      np.asarray(sources["y"]), radius=radius)
    inside = np.asarray(stars["in_image"])[i_star]
    return i_star[inside], i_src[inside], sep[inside]


def _bright(sim) -> np.ndarray:
    """In-image, unsaturated stars with an expected S/N above 50."""
    stars = sim.stars
    return np.asarray(stars["in_image"]) & ~np.asarray(stars["saturated"]) & (np.asarray(stars["snr"]) > 50)


def test_bright_stars_are_recovered_at_their_positions_and_fluxes(field, measured):
    sim, _ = field
    sources = measured.sources
    i_star, i_src, sep = _matched(sim, sources)
    bright = _bright(sim)
    assert bright.sum() > 50
    found = np.isin(np.flatnonzero(bright), i_star)
    assert found.mean() >= 0.9                     # the rest are blended with brighter neighbours
    on_bright = bright[i_star]
    assert np.median(sep[on_bright]) < 0.1         # pixels
    assert np.percentile(sep[on_bright], 90) < 0.5
    ratio = np.asarray(sources["psfflux"])[i_src] / np.asarray(sim.stars["flux_adu"])[i_star]
    assert np.median(ratio[on_bright]) == pytest.approx(1.0, abs=0.02)
    psf_stars = np.asarray(sources["is_psf_star"])[i_src]
    assert psf_stars.sum() >= 10
    assert np.std(ratio[psf_stars]) < 0.05


def test_flux_errors_describe_the_scatter(field, measured):
    sim, _ = field
    sources = measured.sources
    i_star, i_src, _ = _matched(sim, sources)
    snr = np.asarray(sim.stars["snr"])[i_star]
    faint = (snr > 10) & (snr < 50)
    assert faint.sum() > 50
    pull = ((np.asarray(sources["psfflux"])[i_src] - np.asarray(sim.stars["flux_adu"])[i_star])
            / np.asarray(sources["psffluxerr"])[i_src])[faint]
    assert abs(np.median(pull)) < 0.3
    assert 0.8 < 1.4826 * np.median(np.abs(pull - np.median(pull))) < 1.5


def test_fwhm_and_apertures(field, measured):
    sim, _ = field
    truth = sim.params.fwhm_arcsec / sim.params.pixel_scale      # at the centre; +-5% over the chip
    assert measured.fwhm_pixels == pytest.approx(truth, rel=0.05)
    assert measured.psf.fwhm_pixels == measured.fwhm_pixels == measured.sources.meta["fwhm"]
    np.testing.assert_allclose(measured.aper_radii, np.array([1.0, 2.0, 3.0, 5.0]) * measured.fwhm_pixels)
    for name in ("psfflux", "psffluxerr", "psfchi2", "is_psf_star", "apflux_3", "apfluxerr_3"):
        assert name in measured.sources.colnames


def test_sky_refinement_iterations_change_the_fluxes(field, measured):
    sim, inputs = field
    unrefined = measure_sources(sim.data, **inputs, sky_refinement_iterations=0)
    # the PSF stars are chosen before the sky is refined; their PSF fluxes are not the same
    n = int(np.sum((np.asarray(measured.sources["flags"]) & SourceFlag.RESIDUAL) == 0))
    np.testing.assert_array_equal(unrefined.sources["is_psf_star"][:n], measured.sources["is_psf_star"][:n])
    assert unrefined.fwhm_pixels != measured.fwhm_pixels
    # on the sky of the background mesh (raised by the sources' wings) the PSF fluxes are low
    # (0.985 of the truth, against 1.003 refined; below 0.97 while the PSF model's wings were
    # noise, which took part of the sky's error)
    ratios = []
    for result in (unrefined, measured):
        i_star, i_src, _ = _matched(sim, result.sources)
        bright = _bright(sim)[i_star]
        ratio = np.asarray(result.sources["psfflux"])[i_src] / np.asarray(sim.stars["flux_adu"])[i_star]
        ratios.append(np.median(ratio[bright]))
    assert ratios[0] < 0.99 and ratios[1] - ratios[0] > 0.01, ratios


def test_stricter_psf_isolation_keeps_fewer_psf_stars(field, measured):
    sim, inputs = field
    strict = measure_sources(sim.data, **inputs, psf_isolation_radius_fwhm=6.0, psf_neighbor_flux_ratio=0.001)
    chosen, default = (np.flatnonzero(s["is_psf_star"]) for s in (strict.sources, measured.sources))
    assert 0 < len(chosen) < len(default)
    assert set(chosen) <= set(default)      # the detections (first rows) are the same


def test_hidden_neighbour_range_changes_what_is_found(field, measured):
    sim, inputs = field
    narrow = measure_sources(sim.data, **inputs, hidden_max_separation_fwhm=2.5)

    def hidden(result):
        return int(np.sum((np.asarray(result.sources["flags"]) & SourceFlag.RESIDUAL) != 0))

    assert hidden(measured) > 0
    assert hidden(narrow) < hidden(measured)
    assert len(narrow.sources) < len(measured.sources)


@pytest.mark.parametrize("kwargs, match", [
    (dict(threshold=0.0), "threshold must be > 0, got 0.0"),
    (dict(minarea=0), "minarea must be an integer >= 1, got 0"),
    (dict(deblend_cont=1.5), r"deblend_cont must be in \[0, 1\], got 1.5"),
    (dict(filter_type="gauss"), "filter_type must be 'conv' or 'matched', got 'gauss'"),
    (dict(min_fwhm_sources=0), "min_fwhm_sources must be an integer >= 1, got 0"),
    (dict(aperture_multiples=()), "aperture_multiples must be a non-empty sequence of values > 0"),
    (dict(aperture_multiples=(1.0, -2.0)), "aperture_multiples must be a non-empty sequence"),
    (dict(psf_degree=5), "psf_degree must be an integer >= 0 and <= 4, got 5"),
    (dict(psf_max_stars=2.5), "psf_max_stars must be an integer >= 1, got 2.5"),
    (dict(psf_isolation_radius_fwhm=0.0), "psf_isolation_radius_fwhm must be > 0, got 0.0"),
    (dict(psf_fallback_neighbor_flux_ratio=-0.1), "psf_fallback_neighbor_flux_ratio must be >= 0, got -0.1"),
    (dict(psf_min_fwhm_ratio=2.0), r"psf_min_fwhm_ratio must be > 0 and < psf_max_fwhm_ratio \(1.5\), got 2.0"),
    (dict(sky_refinement_iterations=-1), "sky_refinement_iterations must be an integer >= 0, got -1"),
    (dict(sky_model_nsigma=np.nan), "sky_model_nsigma must be > 0, got nan"),
    (dict(extended_size_ratio=0.0), "extended_size_ratio must be > 0, got 0.0"),
    (dict(hidden_min_separation_fwhm=-1.0), "hidden_min_separation_fwhm must be >= 0, got -1.0"),
    (dict(hidden_max_separation_fwhm=1.0),
     r"hidden_max_separation_fwhm must be > hidden_min_separation_fwhm \(2.0\), got 1.0"),
    (dict(max_centroid_shift_fwhm=0.0), "max_centroid_shift_fwhm must be > 0, got 0.0"),
])
def test_bad_options_raise_value_errors_naming_them(kwargs, match):
    data = np.zeros((32, 32), np.float32)
    with pytest.raises(ValueError, match=match):
        measure_sources(data, background=data, variance=data + 1.0, mask=None, gain=None, **kwargs)


def test_too_few_sources_and_psf_stars(field):
    sim, inputs = field
    with pytest.raises(TooFewSourcesError, match=r"need 100000"):
        measure_sources(sim.data, **inputs, min_fwhm_sources=100_000)
    with pytest.raises(TooFewPSFStarsError, match=r"only 0 stars qualify for the PSF .*need at least 2") as info:
        measure_sources(sim.data, **inputs, psf_min_snr=1e5)
    assert info.value.figures == {"n_stars": 0, "needed": 2}


def test_psf_error_is_bad_data():
    assert issubclass(PSFError, BadDataError) and issubclass(PSFError, ValueError)


def test_new_sources_are_fitted_and_subtracted_from_the_residual_image():
    """`_subtract_new_sources` on an image of sky + 6 stars + noise, none of them modelled yet:
    fluxes within 3 sigma of the truth, the residual at the sky within its noise around them
    (its mean within the noise plus a 3-sigma flux error spread over the box), and a source on
    empty sky gets at most a flux within its noise."""
    from improc.source_measurement import _subtract_new_sources
    from tests.improc.test_crowded_photometry import SIGMA, SKY, moffat_psf, star_image

    rng = np.random.default_rng(5)
    shape = (120, 160)
    psf = moffat_psf(shape)
    x, y = np.array([30.2, 80.7, 130.4, 40.9, 95.5, 125.1]), np.array([30.6, 35.3, 40.8, 85.1, 90.4, 80.0])
    flux = np.array([2e4, 5e4, 1e4, 3e4, 8e3, 4e4])
    image, _ = star_image(shape, x, y, flux, psf, rng)
    residual = image.astype(np.float32)
    fitted = _subtract_new_sources(residual, np.r_[x, 60.0], np.r_[y, 100.0], psf, background=SKY,
                                   variance=SIGMA**2, mask=None)
    error = SIGMA * np.sqrt(4 * np.pi) * 3.5 / 2.3548      # ~ the PSF-fit error of a flux on a flat sky
    np.testing.assert_allclose(fitted[:-1], flux, atol=3 * error)
    assert fitted[-1] == 0.0 or fitted[-1] < 3 * error
    for xi, yi in zip(x, y):
        box = residual[int(yi) - 8:int(yi) + 9, int(xi) - 8:int(xi) + 9] - SKY
        assert abs(box.mean()) < 3 * SIGMA / np.sqrt(box.size) + 3 * error / box.size
        assert box.std() < 1.3 * SIGMA
