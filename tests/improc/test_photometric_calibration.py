"""Tests of improc.photometric_calibration on synthetic source lists with a known zero point."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from improc.color_transforms import DECAM_ZHOU2020, BandTransform, gaia_to_band

R_BAND = DECAM_ZHOU2020["r"]
from improc.photometric_calibration import PhotometricCalibration, calibrate_photometry
from improc.photometry import PhotometryError, noise_equivalent_area

ZP = 28.5                   # the true zero point
FWHM = 4.0                  # pixels
SKY_RMS = 10.0              # ADU per pixel
GAIN = 2.0
#: The fraction of a star's light in each aperture (the truth of the aperture corrections).
FRACTIONS = np.array([0.75, 0.95, 0.985, 0.995])


def _gaussian_stamp(fwhm: float, size: int = 25) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size] - size // 2
    stamp = np.exp(-0.5 * (xx**2 + yy**2) / (fwhm / 2.3548) ** 2)
    return stamp / stamp.sum()


@dataclasses.dataclass
class Field:
    """Sources and catalog arrays, and which sources are what."""

    sources: dict
    catalog: dict
    galaxies: np.ndarray
    flagged: np.ndarray
    too_bright: np.ndarray

    def kwargs(self, **extra) -> dict:
        return {**self.sources, **self.catalog, "transform": R_BAND, "sky_rms": SKY_RMS, "fwhm_pixels": FWHM,
                "psf_stamp": _gaussian_stamp(FWHM), **extra}


def _field(seed: int = 1, n: int = 200, color_term: float = 0.0, transform: BandTransform = R_BAND) -> Field:
    """n catalog stars around (RA, Dec) = (359.95, 2) (across RA = 0), each detected as a source
    at ~50 mas from it, plus 100 catalog stars without a source and 20 sources without a star;
    their true band magnitudes follow ``transform``."""
    rng = np.random.default_rng(seed)
    g = rng.uniform(14.0, 20.0, n)
    color = rng.uniform(0.3, 2.5, n)
    bp, rp = g + 0.4 * color, g - 0.6 * color
    bp[:5] = np.nan                                            # no colour: the average one
    # catalog_mag = -2.5 log10(flux) + ZP + color_term * (BP - RP)
    inst = gaia_to_band(g, bp, rp, transform) - ZP - color_term * np.where(np.isfinite(bp - rp), bp - rp, 0.0)
    flux = 10 ** (-0.4 * inst)
    err = np.sqrt(flux / GAIN + noise_equivalent_area(fwhm_pixels=FWHM) * SKY_RMS**2)
    size = rng.normal(1.2, 0.03, n) * FWHM
    flags = np.zeros(n, np.int64)
    galaxies = rng.choice(np.flatnonzero(g > 15.5), 15, replace=False)
    size[galaxies] = 3.0 * FWHM
    flux[galaxies] *= 1.5                                     # a nucleus and its host
    flagged = np.setdiff1d(rng.choice(n, 25, replace=False), galaxies)
    flags[flagged] = 4
    flux[flagged] *= 0.7                                      # e.g. a blend or a bad column
    too_bright = np.flatnonzero(g < 15.0)
    flux[too_bright] = np.minimum(flux[too_bright], 10 ** (-0.4 * (15.0 - ZP)))   # saturated
    psf_flux = flux + rng.normal(0.0, err)
    apfluxes = flux[:, None] * FRACTIONS[None, :] + rng.normal(0.0, 1.0, (n, 4)) * err[:, None] * [1, 1.5, 2, 3]
    ra0, dec0 = 359.95, 2.0
    ra = (ra0 + rng.uniform(-0.1, 0.1, n)) % 360.0
    dec = dec0 + rng.uniform(-0.1, 0.1, n)
    cat_ra = ra + rng.normal(0, 0.05 / 3600, n) / np.cos(np.radians(dec))
    cat_dec = dec + rng.normal(0, 0.05 / 3600, n)
    # catalog stars without a source, and sources without a catalog star
    extra = 100
    sources = dict(psf_flux=np.concatenate([psf_flux, np.full(20, 3e4)]),
                   psf_flux_err=np.concatenate([err, np.full(20, 200.0)]),
                   apfluxes=np.concatenate([apfluxes, np.full((20, 4), 3e4)]),
                   flags=np.concatenate([flags, np.zeros(20, np.int64)]),
                   size=np.concatenate([size, np.full(20, 1.2 * FWHM)]),
                   ra=np.concatenate([ra, (ra0 + rng.uniform(-0.1, 0.1, 20)) % 360.0]),
                   dec=np.concatenate([dec, dec0 + rng.uniform(-0.1, 0.1, 20)]))
    catalog = dict(catalog_ra=np.concatenate([cat_ra, (ra0 + rng.uniform(-0.1, 0.1, extra)) % 360.0]),
                   catalog_dec=np.concatenate([cat_dec, dec0 + rng.uniform(-0.1, 0.1, extra)]),
                   catalog_g=np.concatenate([g, rng.uniform(14, 20, extra)]),
                   catalog_bp=np.concatenate([bp, rng.uniform(14, 20, extra)]),
                   catalog_rp=np.concatenate([rp, rng.uniform(14, 20, extra)]))
    return Field(sources=sources, catalog=catalog, galaxies=galaxies, flagged=flagged, too_bright=too_bright)


@pytest.fixture(scope="module")
def field() -> Field:
    return _field()


@pytest.fixture(scope="module")
def result(field) -> PhotometricCalibration:
    return calibrate_photometry(**field.kwargs())


def test_the_true_zero_point_is_recovered(result):
    assert result.fit.zp == pytest.approx(ZP, abs=0.01)
    assert result.fit.dzp < 0.005
    assert abs(result.fit.zp - ZP) < 4 * result.fit.dzp
    assert result.fit.n_stars > 100
    assert result.fit.color_term == 0.0


def test_only_clean_point_like_stars_fainter_than_the_bright_limit_calibrate(field, result):
    rows = result.source_index
    assert len(np.intersect1d(rows, field.galaxies)) == 0
    assert len(np.intersect1d(rows, field.flagged)) == 0
    assert len(np.intersect1d(rows, field.too_bright)) == 0
    assert np.all(rows < 200)                                   # the sources without a star do not match
    np.testing.assert_array_equal(result.catalog_index, rows)   # each source to its own star
    assert np.all(np.diff(rows) > 0)
    np.testing.assert_array_equal(result.calibrators, rows[result.used])
    assert result.n_candidates == 200 + 20 - len(np.union1d(field.galaxies, field.flagged))


def test_per_star_records(field, result):
    rows = result.source_index
    c = field.catalog
    bp, rp = c["catalog_bp"][rows], c["catalog_rp"][rows]
    np.testing.assert_array_equal(result.color, bp - rp)
    np.testing.assert_array_equal(result.catalog_mag, gaia_to_band(c["catalog_g"][rows], bp, rp, R_BAND))
    flux = field.sources["psf_flux"][rows]
    np.testing.assert_allclose(result.residuals, result.catalog_mag + 2.5 * np.log10(flux) - result.fit.zp)
    pull = result.residuals[result.used] / (1.0857 * field.sources["psf_flux_err"][rows][result.used] / flux[result.used])
    assert 0.7 < np.std(pull) < 1.3
    assert np.sqrt(np.mean(result.residuals[result.used] ** 2)) == pytest.approx(result.fit.scatter)


def test_star_records_are_json_columns_of_the_matched_stars(field, result):
    records = result.star_records()
    json.dumps(records, allow_nan=False)            # plain JSON: NaN becomes None
    assert all(len(column) == len(result.source_index) for column in records.values())
    assert records["source_row"] == result.source_index.tolist()
    assert records["catalog_row"] == result.catalog_index.tolist()
    assert records["used"] == result.used.tolist()
    no_color = ~np.isfinite(result.color)
    assert no_color.any() and all(records["bp_rp"][i] is None for i in np.flatnonzero(no_color))
    np.testing.assert_allclose(np.array(records["residual"], float), result.residuals, atol=1e-5)
    np.testing.assert_allclose(np.array(records["instrumental_mag"], float),
                               -2.5 * np.log10(field.sources["psf_flux"][result.source_index]), atol=1e-5)
    # what a plot of the fit shows: catalog - instrumental = zp + residual
    np.testing.assert_allclose(np.array(records["catalog_mag"], float) - np.array(records["instrumental_mag"], float),
                               result.fit.zp + result.residuals, atol=2e-5)


def test_a_band_without_transformation_is_calibrated_on_g_with_a_fitted_colour_term():
    """True band magnitudes m = G + 0.2 - 0.45 (BP - RP); with no transformation the zero point is
    of G: G + 2.5 log10(flux) = ZP - 0.2 + 0.45 (BP - RP), so zp = ZP - 0.2 and colour term +0.45,
    and the result says the band is uncalibrated."""
    linear = BandTransform(coefficients=(0.2, -0.45), color_range=(-1.0, 5.0), average_color=1.4)
    field = _field(transform=linear)
    result = calibrate_photometry(**field.kwargs(transform=None))       # color_term "none" asked
    assert not result.band_calibrated
    assert result.fit.zp == pytest.approx(ZP - 0.2, abs=0.005)
    assert result.fit.color_term == pytest.approx(0.45, abs=0.005)
    np.testing.assert_array_equal(result.catalog_mag, field.catalog["catalog_g"][result.catalog_index])
    no_color = ~np.isfinite(result.color)          # they cannot constrain a colour term
    assert no_color.any() and not result.used[no_color].any()
    assert np.sqrt(np.mean(result.residuals[result.used] ** 2)) < 0.02
    # DECam's r polynomial in its place would be off by tenths of a magnitude
    wrong = calibrate_photometry(**field.kwargs(transform=R_BAND))
    assert wrong.band_calibrated and abs(wrong.fit.zp - ZP) > 0.1
    # with few stars: the unclipped mean of G (no colour term), both degradations said
    few = calibrate_photometry(**field.kwargs(transform=None, min_stars=500, fewest_stars=1))
    assert few.few_stars and not few.band_calibrated and few.fit.color_term == 0.0


def test_aperture_corrections_and_limiting_magnitude(result):
    assert result.aper_cors_from == "stars"
    np.testing.assert_allclose(result.aper_cors, 2.5 * np.log10(FRACTIONS), atol=0.01)
    neff = noise_equivalent_area(psf=_gaussian_stamp(FWHM))
    assert result.lim_mag == pytest.approx(-2.5 * np.log10(5.0 * SKY_RMS * np.sqrt(neff)) + result.fit.zp)
    deeper = calibrate_photometry(**_field().kwargs(limit_snr=3.0))
    assert deeper.lim_mag - result.lim_mag == pytest.approx(2.5 * np.log10(5.0 / 3.0))


def test_color_term_is_fitted():
    fitted = calibrate_photometry(**_field(seed=2, color_term=0.05).kwargs(color_term="fit"))
    assert fitted.fit.color_term == pytest.approx(0.05, abs=0.01)
    assert fitted.fit.zp == pytest.approx(ZP, abs=0.02)


def test_max_size_fwhm_lets_galaxies_in(field, result):
    loose = calibrate_photometry(**field.kwargs(max_size_fwhm=5.0))
    assert loose.n_candidates == result.n_candidates + len(np.setdiff1d(field.galaxies, field.flagged))
    assert len(np.intersect1d(loose.source_index, field.galaxies)) > 0
    assert not np.array_equal(loose.source_index, result.source_index)


def test_too_few_stars_raise_with_the_counts(field):
    kwargs = field.kwargs()
    kwargs.update(catalog_ra=kwargs["catalog_ra"][:4], catalog_dec=kwargs["catalog_dec"][:4],
                  catalog_g=np.full(4, 17.0), catalog_bp=np.full(4, 17.5), catalog_rp=np.full(4, 16.5))
    expected = np.count_nonzero(np.isin(np.arange(4), np.union1d(field.galaxies, field.flagged), invert=True))
    with pytest.raises(PhotometryError, match=rf"only {expected} stars to calibrate the zero point, need >= 5: "
                                              rf"\d+ of 220 sources .* {expected} of them match one of the 4 catalog "
                                              rf"stars within 1.0\"; {expected} of those are fainter than G = 15.0"):
        calibrate_photometry(**kwargs)
    kwargs.update(catalog_ra=np.zeros(0), catalog_dec=np.zeros(0), catalog_g=np.zeros(0), catalog_bp=np.zeros(0),
                  catalog_rp=np.zeros(0))
    with pytest.raises(PhotometryError, match="only 0 stars to calibrate") as info:
        calibrate_photometry(**kwargs)
    assert info.value.figures["n_catalog"] == 0 and info.value.figures["needed"] == 5


def _few(field, n: int) -> dict:
    """The field with only n clean catalog stars (S/N >= 20)."""
    kwargs = field.kwargs(min_stars=2)
    clean = np.setdiff1d(np.flatnonzero(field.catalog["catalog_g"][:200] > 15.5),
                         np.union1d(field.galaxies, field.flagged))[:n]
    for name in field.catalog:
        kwargs[name] = kwargs[name][clean]
    return kwargs


def test_aperture_corrections_from_the_psf_model_with_few_stars(field):
    asked = []

    def fractions(rows):
        asked.append(rows)
        return np.tile(FRACTIONS, (len(rows), 1))

    few = calibrate_photometry(**_few(field, 2), model_fractions=fractions)
    assert few.aper_cors_from == "psf_model" and few.fit.n_stars == 2
    np.testing.assert_array_equal(asked[0], few.calibrators)
    np.testing.assert_allclose(few.aper_cors, 2.5 * np.log10(FRACTIONS))
    with pytest.raises(PhotometryError, match="aperture corrections need 3 stars or the PSF model's aperture "
                                              "fractions; 2 stars calibrate"):
        calibrate_photometry(**_few(field, 2))


def test_min_apcor_stars_changes_where_the_corrections_come_from(field, result):
    model = calibrate_photometry(**field.kwargs(min_apcor_stars=1000),
                                 model_fractions=lambda rows: np.tile([0.8, 0.9, 0.95, 1.0], (len(rows), 1)))
    assert model.aper_cors_from == "psf_model"
    assert model.fit.zp == result.fit.zp
    np.testing.assert_allclose(model.aper_cors, 2.5 * np.log10([0.8, 0.9, 0.95, 1.0]))
    measured = calibrate_photometry(**_few(field, 3), min_apcor_stars=3)
    assert measured.aper_cors_from == "stars"


@pytest.mark.parametrize("kwargs, match", [
    (dict(match_radius_arcsec=0.0), "match_radius_arcsec must be finite and > 0, got 0.0"),
    (dict(min_snr=-1.0), "min_snr must be >= 0, got -1.0"),
    (dict(max_size_fwhm=0.0), "max_size_fwhm must be > 0, got 0.0"),
    (dict(bright_limit_g=np.nan), r"bright_limit_g must be a magnitude \(not NaN\), got nan"),
    (dict(color_term="quadratic"), "color_term must be 'none' or 'fit', got 'quadratic'"),
    (dict(clip_sigma=0.0), "clip_sigma must be > 0, got 0.0"),
    (dict(min_stars=1), "min_stars must be an integer >= 2, got 1"),
    (dict(min_apcor_stars=0), "min_apcor_stars must be an integer >= 1, got 0"),
    (dict(limit_snr=0.0), "limit_snr must be > 0, got 0.0"),
    (dict(fwhm_pixels=np.nan), "fwhm_pixels must be finite and > 0, got nan"),
    (dict(size=np.ones(3)), r"size must have shape \(220,\) like psf_flux, got \(3,\)"),
    (dict(catalog_g=np.ones(3)), r"catalog_g must have shape \(300,\) like catalog_ra, got \(3,\)"),
    (dict(apfluxes=np.ones(220)), r"apfluxes must be of shape \(220, n_ap\) like psf_flux, got \(220,\)"),
])
def test_bad_options_raise_value_errors_naming_them(field, kwargs, match):
    with pytest.raises(ValueError, match=match):
        calibrate_photometry(**field.kwargs(**kwargs))
