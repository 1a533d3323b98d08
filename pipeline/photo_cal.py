"""Photometric calibration: zero point against Gaia, aperture corrections, limiting magnitude."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
from astropy.coordinates import SkyCoord
import astropy.units as u

from improc.color_transforms import gaia_to_band
from improc.photometry import (PhotometryError, ZeroPointFit, aperture_corrections, fit_zero_point,
                               limiting_magnitude)
from improc.psf_photometry import model_aperture_sums
from models.zero_point import ZeroPoint
from pipeline.catalogs import CatalogSource, isolated_stars, reference_catalog, stars_at_epoch
from pipeline.data_store import DataStore
from pipeline.parameters import ParameterError, StepParams, param
from pipeline.step import Input, Output, Step

__all__ = ["PhotoCalParams", "PhotoCalibrator"]

#: Fewest calibrators from which aperture corrections are measured (with fewer, the PSF model's).
MIN_APCOR_STARS = 3


@dataclass(frozen=True, kw_only=True)
class PhotoCalParams(StepParams):
    """How the zero point is measured."""

    step_name = "photocal"

    catalog: Literal["gaia_folder", "gaia_dr3"] = param(
        "gaia_dr3", "Reference catalog, as for astrocal.")
    catalog_folder: str | None = param(None, "Folder of Gaia chunk files, for 'gaia_folder'.",
                                       affects_result=False)
    mag_limit: float = param(21.0, "Faintest Gaia G read from the catalog.")
    match_radius_arcsec: float = param(1.0, "Sources and catalog stars closer than this match.")
    min_snr: float = param(20.0, "Only sources above this PSF-flux S/N calibrate.")
    bright_limit_g: float = param(15.0, "Catalog stars brighter than this G are left out (saturation).")
    color_term: Literal["none", "fit"] = param(
        "none", "'fit' also fits a linear term in Gaia BP-RP on top of the band transformation.")
    clip_sigma: float = param(3.0, "Outlier rejection threshold of the fit.")
    min_stars: int = param(5, "Fewest calibration stars accepted (>= 2).  Below 3, the aperture "
                                 "corrections come from the PSF model instead of the stars.")
    limit_snr: float = param(5.0, "S/N of the limiting magnitude written to the image.")

    def validate(self) -> None:
        if self.match_radius_arcsec <= 0:
            raise ParameterError(f"photocal match_radius_arcsec must be > 0, got {self.match_radius_arcsec}")
        if self.min_stars < 2:
            raise ParameterError(f"photocal min_stars must be >= 2, got {self.min_stars}")


@dataclass(frozen=True)
class PhotoCalResult:
    """What `PhotoCalibrator.compute` finds."""

    fit: ZeroPointFit
    aper_cors: np.ndarray
    lim_mag: float


class PhotoCalibrator(Step):
    """Make the image's `ZeroPoint` (zero point, aperture corrections, limiting magnitude)."""

    process = "photocal"
    version = "1.1.0"  # 1.1: aperture corrections from the PSF model with fewer than 3 calibrators
    Params = PhotoCalParams
    inputs = (Input("image"), Input("background"), Input("sources"), Input("psf"), Input("wcs"))
    outputs = (Output("zp", ZeroPoint, parents={"image_id": "image", "wcs_id": "wcs", "psf_id": "psf",
                                                "background_id": "background"}),)
    badness = "BAD_PHOTOMETRY"

    def match(self, ra: np.ndarray, dec: np.ndarray, cat_ra: np.ndarray, cat_dec: np.ndarray):
        """Indices (sources, catalog) of pairs closer than ``match_radius_arcsec``."""
        if len(ra) == 0 or len(cat_ra) == 0:
            return np.array([], int), np.array([], int)
        src = SkyCoord(ra * u.deg, dec * u.deg)
        idx, sep, _ = src.match_to_catalog_sky(SkyCoord(cat_ra * u.deg, cat_dec * u.deg))
        ok = sep.arcsec < self.params.match_radius_arcsec
        return np.flatnonzero(ok), idx[ok]

    def compute(self, psf_flux, psf_err, apfluxes, catalog_mag, color, *, sky_rms: float,
                psf_stamp: np.ndarray,
                model_fractions: Callable[[np.ndarray], np.ndarray] | None = None) -> PhotoCalResult:
        """Zero point, aperture corrections and limiting magnitude from matched stars.

        Parameters
        ----------
        psf_flux, psf_err : numpy.ndarray
            Shape (n,) PSF fluxes of the matched stars and their errors, ADU.
        apfluxes : numpy.ndarray
            Shape (n, n_ap) their aperture fluxes, ADU.
        catalog_mag, color : numpy.ndarray
            Shape (n,) their catalog magnitudes in the image's band, and Gaia BP - RP.
        sky_rms : float
            Sky noise per pixel, ADU, for the limiting magnitude.
        psf_stamp : numpy.ndarray
            The PSF at the chip centre (sums to 1), for the limiting magnitude.
        model_fractions : callable or None
            Given the indices of some of the n stars, the fraction of each one's PSF model inside
            each aperture, shape (k, n_ap) (see `improc.psf_photometry.model_aperture_sums`).
            Called only when fewer than three stars calibrate the zero point, too few to measure
            the corrections or to reject a bad one: the corrections are then 2.5 log10 of the
            mean fraction over those stars, what the PSF fluxes and the apertures give if the
            model is right.

        Raises
        ------
        PhotometryError
            Too few stars for the zero point, or for the aperture corrections and no
            ``model_fractions``.
        """
        p = self.params
        fit = fit_zero_point(psf_flux, psf_err, catalog_mag, color=color, color_term=p.color_term,
                             clip_sigma=p.clip_sigma, min_stars=p.min_stars)
        used = fit.used
        if used.sum() >= MIN_APCOR_STARS:
            # random-effects mean: weights from the stars' errors scaled to each aperture plus the
            # corrections' true variation over the chip (see aperture_corrections)
            mag_err = 2.5 / np.log(10.0) * psf_err[used] / psf_flux[used]
            apcor = aperture_corrections(apfluxes[used], psf_flux[used], mag_errors=mag_err,
                                         min_stars=MIN_APCOR_STARS)
        elif model_fractions is not None:
            apcor = 2.5 * np.log10(np.mean(model_fractions(np.flatnonzero(used)), axis=0))
        else:
            raise PhotometryError(f"aperture corrections need {MIN_APCOR_STARS} stars or the PSF model's "
                                  f"aperture fractions; {used.sum()} stars calibrate")
        lim = limiting_magnitude(sky_noise_adu=sky_rms, zero_point=fit.zp, psf=psf_stamp, snr=p.limit_snr)
        return PhotoCalResult(fit=fit, aper_cors=np.asarray(apcor), lim_mag=float(lim))

    def run(self, ds: DataStore) -> None:
        image, sources, psf, wcs, bg = (ds.get_image(), ds.get_sources(), ds.get_psf(), ds.get_wcs(),
                                        ds.get_background())
        p = self.params
        table = sources.data
        flux, err = sources.psffluxadu()
        # point sources only: Gaia lists compact galaxy nuclei, whose PSF flux is no star's
        # (sep's size, twice the half-light radius, is ~1.2x the FWHM for a star)
        point_like = np.asarray(table["fwhm"], dtype=float) <= 2.0 * sources.fwhm_pixels
        good = ((np.asarray(table["flags"]) == 0) & np.isfinite(flux) & (flux > 0)
                & (flux / err >= p.min_snr) & point_like)
        ra, dec = sources.radec(wcs)
        source = CatalogSource(kind=p.catalog, folder=p.catalog_folder, mag_limit=p.mag_limit)
        catalog = isolated_stars(reference_catalog(image, source, context=ds.context, cache=ds.persist).data)
        cat_ra, cat_dec = stars_at_epoch(catalog, image.mjd)
        g = np.asarray(catalog["phot_g_mean_mag"], dtype=float)
        isrc, icat = self.match(ra[good], dec[good], cat_ra, cat_dec)
        isrc = np.flatnonzero(good)[isrc]
        keep = g[icat] >= p.bright_limit_g
        isrc, icat = isrc[keep], icat[keep]
        bp = np.asarray(catalog["phot_bp_mean_mag"], dtype=float)[icat]
        rp = np.asarray(catalog["phot_rp_mean_mag"], dtype=float)[icat]
        cat_mag = gaia_to_band(g[icat], bp, rp, image.filter)
        apfluxes = np.column_stack([sources.apfluxadu(i)[0][isrc] for i in range(len(sources.aper_radii))])
        x, y = np.asarray(sources.x)[isrc], np.asarray(sources.y)[isrc]

        def fractions(idx: np.ndarray) -> np.ndarray:
            return model_aperture_sums(psf.model, x[idx], y[idx], 1.0, sources.aper_radii)

        result = self.compute(flux[isrc], err[isrc], apfluxes, cat_mag, bp - rp,
                              sky_rms=bg.rms_median, model_fractions=fractions,
                              psf_stamp=psf.get_clip(image.nx / 2.0, image.ny / 2.0))
        ds.new_product(self, "zp", zp=result.fit.zp, dzp=result.fit.dzp, color_term=result.fit.color_term,
                       num_stars=result.fit.n_stars, scatter=result.fit.scatter,
                       aper_radii=list(sources.aper_radii), aper_cors=[float(c) for c in result.aper_cors],
                       lim_mag=result.lim_mag)
