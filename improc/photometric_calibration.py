"""Photometric calibration of an image against Gaia: calibrators, zero point, aperture corrections, depth.

`calibrate_photometry` takes a source list's columns (arrays) and reference-catalog stars at the
image's epoch (e.g. isolated Gaia stars, `improc.matching.neighbor_free`, moved by
`improc.catalog_stars.stars_at_epoch`) and:

1. keeps the sources that can calibrate: no flags, a finite positive PSF flux with S/N >=
   ``min_snr``, and point-like -- a size (sep's, twice the half-light radius, ~1.2x the FWHM
   for a star) at most ``max_size_fwhm`` times the PSF FWHM, since Gaia lists compact galaxy
   nuclei whose PSF flux is no star's;
2. matches them to the catalog (`improc.matching.match_sky`, nearest star within
   ``match_radius_arcsec``) and drops catalog stars brighter than ``bright_limit_g`` (saturated
   or non-linear);
3. predicts the stars' magnitudes in the image's band from G, BP, RP with the camera's
   transformation for the band (`improc.color_transforms.BandTransform`) and fits the zero point,
   optionally with a colour term in BP - RP (`improc.photometry.fit_zero_point`).  A band
   without a transformation (``transform=None``) is calibrated on G itself with a fitted colour
   term, ``G = -2.5 log10(flux) + zp + color_term * (BP - RP)``, and the result says so
   (``band_calibrated`` False): another camera's polynomial would be wrong by tenths of a
   magnitude with nothing but an excess scatter to show for it;
4. measures aperture corrections from the PSF fluxes of the stars that calibrate the zero point
   (`improc.photometry.aperture_corrections`), when there are at least ``min_apcor_stars``;
   with fewer, too few to measure them or to reject a bad one, they come from the PSF model:
   2.5 log10 of the mean fraction of the model inside each aperture over those stars, what the
   PSF fluxes and the apertures give if the model is right;
5. gives the limiting magnitude of a point source at ``limit_snr`` (optimal photometry,
   background-limited, `improc.photometry.limiting_magnitude`).

Sparse fields.  With fewer than ``min_stars`` calibrators (but at least ``fewest_stars``) the zero
point is the weighted mean of the stars' values without clipping (and without a colour term),
and its error adds ``star_scatter_mag`` / sqrt(n) -- the scatter calibrators show about a zero
point (band transformation, photometry) -- because two stars cannot measure their own scatter;
``few_stars`` says so.  With ``flux_type`` "auto", PSF fluxes are first compared with the
largest aperture's on every clean point source (`improc.photometry_quality.check_psf_photometry`);
when they disagree (an offset or an excess scatter: a poor PSF model), the zero point is
measured on the largest aperture instead, whose correction is then 0 (``flux_from``).

Conventions are those of `improc.photometry`: ``mag = -2.5 log10(flux_adu) + zp (+ color_term *
(BP - RP))`` and ``mag_total = -2.5 log10(apflux_i) + zp + apcor_i``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np

from improc.color_transforms import BandTransform, gaia_to_band
from improc.matching import match_sky
from improc.photometry import (ColorTermMode, PhotometryError, ZeroPointFit, aperture_corrections, fit_zero_point,
                               limiting_magnitude)
from improc.photometry_quality import check_psf_photometry

__all__ = ["PhotometricCalibration", "calibrate_photometry"]

_MAG_PER_FRAC = 2.5 / np.log(10.0)


@dataclass(frozen=True)
class PhotometricCalibration:
    """What `calibrate_photometry` finds.

    The per-star arrays have one entry per matched candidate (k of them); ``used`` says which of
    them calibrate the zero point (the others were clipped, or lack a usable magnitude).

    Attributes
    ----------
    fit : ZeroPointFit
        The zero point, its error, colour term, number of stars, scatter; ``fit.used`` is ``used``.
    aper_cors : numpy.ndarray
        Shape (n_ap,) aperture corrections, mag (negative for apertures that miss light).
    aper_cors_from : {"stars", "psf_model"}
        Whether the aperture corrections were measured on the calibrators or come from the PSF
        model (fewer than ``min_apcor_stars`` calibrators).
    lim_mag : float
        Limiting magnitude at ``limit_snr``.
    source_index : numpy.ndarray
        Shape (k,) int, rows of the source arrays of the matched candidates.
    catalog_index : numpy.ndarray
        Shape (k,) int, rows of the catalog arrays of their catalog stars.
    catalog_mag : numpy.ndarray
        Shape (k,) their predicted magnitudes in the image's band.
    color : numpy.ndarray
        Shape (k,) their Gaia BP - RP (NaN where missing).
    residuals : numpy.ndarray
        Shape (k,) catalog magnitude minus calibrated PSF magnitude,
        ``catalog_mag - (-2.5 log10(psf_flux) + zp + color_term * color)``, mag.
    used : numpy.ndarray
        Shape (k,) bool, the stars that calibrate the zero point.
    n_candidates : int
        Sources that passed the cuts of step 1 (before matching).
    few_stars : bool
        Fewer than ``min_stars`` calibrators: an unclipped mean with a prior scatter.
    flux_from : {"psf", "aperture"}
        The fluxes the zero point was measured on (see the module docstring).
    psf_check : PSFPhotometryCheck or None
        The comparison of PSF and aperture fluxes (``flux_type`` "auto").
    instrumental_mag : numpy.ndarray
        Shape (k,) their ``-2.5 log10(flux)`` on the fluxes the zero point was measured on.
    band_calibrated : bool
        Whether a band transformation gave ``catalog_mag``; False: ``catalog_mag`` is Gaia G and
        a colour term was fitted (with ``min_stars`` calibrators or more).
    """

    fit: ZeroPointFit
    aper_cors: np.ndarray
    aper_cors_from: Literal["stars", "psf_model"]
    lim_mag: float
    source_index: np.ndarray
    catalog_index: np.ndarray
    catalog_mag: np.ndarray
    color: np.ndarray
    residuals: np.ndarray
    used: np.ndarray
    instrumental_mag: np.ndarray
    n_candidates: int
    few_stars: bool = False
    flux_from: Literal["psf", "aperture"] = "psf"
    psf_check: object | None = None
    band_calibrated: bool = True

    @property
    def calibrators(self) -> np.ndarray:
        """Rows of the source arrays of the stars that calibrate the zero point."""
        return self.source_index[self.used]

    def star_records(self, *, decimals: int = 5) -> dict[str, list]:
        """The matched stars as plain JSON columns, so that a user can see (and plot) the fit.

        Parameters
        ----------
        decimals : int
            Magnitudes and colours are rounded to this many decimals (10 micromag by default:
            far below any error, and a third of the text).

        Returns
        -------
        dict
            ``source_row``, ``catalog_row`` (int), ``bp_rp``, ``catalog_mag``,
            ``instrumental_mag``, ``residual`` (floats, None where not finite), ``used``
            (bool: calibrates the zero point; False: clipped or unusable), one entry per
            matched star.
        """
        def floats(values: np.ndarray) -> list[float | None]:
            return [round(float(v), decimals) if np.isfinite(v) else None for v in values]

        return {"source_row": [int(i) for i in self.source_index],
                "catalog_row": [int(i) for i in self.catalog_index],
                "bp_rp": floats(self.color), "catalog_mag": floats(self.catalog_mag),
                "instrumental_mag": floats(self.instrumental_mag), "residual": floats(self.residuals),
                "used": [bool(u) for u in self.used]}


def _check(ok: bool, name: str, expected: str, value) -> None:
    if not ok:
        raise ValueError(f"{name} must be {expected}, got {value}")


def _check_options(*, match_radius_arcsec, min_snr, max_size_fwhm, bright_limit_g, color_term, clip_sigma,
                   min_stars, min_apcor_stars, limit_snr, fewest_stars=1, star_scatter_mag=0.03,
                   error_floor=0.01, flux_type="psf") -> None:
    _check(np.isfinite(match_radius_arcsec) and match_radius_arcsec > 0, "match_radius_arcsec", "finite and > 0",
           match_radius_arcsec)
    _check(min_snr >= 0, "min_snr", ">= 0", min_snr)
    _check(max_size_fwhm > 0, "max_size_fwhm", "> 0", max_size_fwhm)
    _check(not np.isnan(bright_limit_g), "bright_limit_g", "a magnitude (not NaN)", bright_limit_g)
    _check(color_term in ("none", "fit"), "color_term", "'none' or 'fit'", repr(color_term))
    _check(clip_sigma > 0, "clip_sigma", "> 0", clip_sigma)
    for name, value, low in (("min_stars", min_stars, 2), ("min_apcor_stars", min_apcor_stars, 1)):
        _check(isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= low, name,
               f"an integer >= {low}", value)
    _check(limit_snr > 0, "limit_snr", "> 0", limit_snr)
    _check(isinstance(fewest_stars, (int, np.integer)) and not isinstance(fewest_stars, bool)
           and 1 <= fewest_stars <= min_stars, "fewest_stars", f"an integer in [1, min_stars = {min_stars}]",
           fewest_stars)
    _check(star_scatter_mag >= 0, "star_scatter_mag", ">= 0", star_scatter_mag)
    _check(error_floor >= 0, "error_floor", ">= 0", error_floor)
    _check(flux_type in ("psf", "auto"), "flux_type", "'psf' or 'auto'", repr(flux_type))


def _arrays(n_name: str, **arrays) -> dict[str, np.ndarray]:
    """The arrays as 1-d floats, all of the length of the first one (named ``n_name`` in errors)."""
    out = {name: np.asarray(value, dtype=float) for name, value in arrays.items()}
    first = next(iter(out.values()))
    for name, value in out.items():
        if value.ndim != 1 or len(value) != len(first):
            raise ValueError(f"{name} must have shape ({len(first)},) like {n_name}, got {value.shape}")
    return out


def _candidates(flux: np.ndarray, err: np.ndarray, flags: np.ndarray, size: np.ndarray, *, fwhm_pixels: float,
                min_snr: float, max_size_fwhm: float) -> np.ndarray:
    """Sources that may calibrate: no flags, finite positive flux with S/N >= min_snr, point-like."""
    point_like = size <= max_size_fwhm * fwhm_pixels
    with np.errstate(divide="ignore", invalid="ignore"):
        return (flags == 0) & np.isfinite(flux) & (flux > 0) & (flux / err >= min_snr) & point_like


def calibrate_photometry(psf_flux: np.ndarray, psf_flux_err: np.ndarray, apfluxes: np.ndarray, *,
                         flags: np.ndarray, size: np.ndarray, ra: np.ndarray, dec: np.ndarray, fwhm_pixels: float,
                         catalog_ra: np.ndarray, catalog_dec: np.ndarray, catalog_g: np.ndarray,
                         catalog_bp: np.ndarray, catalog_rp: np.ndarray, transform: BandTransform | None,
                         sky_rms: float,
                         psf_stamp: np.ndarray,
                         model_fractions: Callable[[np.ndarray], np.ndarray] | None = None,
                         match_radius_arcsec: float = 1.0, min_snr: float = 20.0, max_size_fwhm: float = 2.0,
                         bright_limit_g: float = 15.0, color_term: ColorTermMode = "none",
                         clip_sigma: float = 3.0, min_stars: int = 5, min_apcor_stars: int = 3,
                         limit_snr: float = 5.0, fewest_stars: int | None = None, star_scatter_mag: float = 0.03,
                         error_floor: float = 0.01, flux_type: Literal["psf", "auto"] = "psf",
                         apflux_errs: np.ndarray | None = None) -> PhotometricCalibration:
    """Zero point, aperture corrections and limiting magnitude of an image (method in the module
    docstring).

    Parameters
    ----------
    psf_flux, psf_flux_err : numpy.ndarray
        Shape (n,) PSF fluxes of the image's sources and their errors, ADU.
    apfluxes : numpy.ndarray
        Shape (n, n_ap) their aperture fluxes, ADU (apertures of increasing radius).
    flags : numpy.ndarray
        Shape (n,) integer source flags; only sources with 0 calibrate.
    size : numpy.ndarray
        Shape (n,) source sizes, pixels (the ``fwhm`` column of `improc.extraction.extract_sources`:
        twice the half-light radius).
    ra, dec : numpy.ndarray
        Shape (n,) source positions through the image's astrometric solution, degrees.
    fwhm_pixels : float
        FWHM of the image's PSF, pixels.
    catalog_ra, catalog_dec : numpy.ndarray
        Shape (m,) positions of the catalog stars that may calibrate (e.g. the isolated ones) at
        the image's epoch, degrees.
    catalog_g, catalog_bp, catalog_rp : numpy.ndarray
        Shape (m,) their Gaia G, BP and RP magnitudes (NaN BP or RP: no colour).
    transform : BandTransform or None
        The camera's transformation from Gaia to the image's band; None: the band has none, so
        the zero point is of G with a fitted colour term (``color_term`` is then "fit" whatever
        its value; ``band_calibrated`` False).
    sky_rms : float
        Sky noise per pixel, ADU, for the limiting magnitude.
    psf_stamp : numpy.ndarray
        The PSF at the chip centre (sums to 1), for the limiting magnitude.
    model_fractions : callable or None
        Given rows of the source arrays (int array of length k), the fraction of each one's PSF
        model inside each aperture, shape (k, n_ap) (see
        `improc.psf_photometry.model_aperture_sums` with unit flux).  Called only when fewer than
        ``min_apcor_stars`` stars calibrate the zero point.
    match_radius_arcsec : float
        Sources and catalog stars closer than this match, arcsec.  Finite and > 0.
    min_snr : float
        Only sources with a PSF-flux S/N at least this calibrate.  >= 0.
    max_size_fwhm : float
        Only sources with a size at most this many PSF FWHM (point-like) calibrate.  > 0.
    bright_limit_g : float
        Catalog stars brighter than this Gaia G (saturated, non-linear) are left out, mag.
    color_term : {"none", "fit"}
        "fit" also fits a linear term in Gaia BP - RP on top of the band transformation (always
        fitted without a transformation).
    clip_sigma : float
        Outlier rejection threshold of the zero-point fit, in robust standard deviations.  > 0.
    min_stars : int
        Fewest calibration stars accepted (before and after clipping).  >= 2.
    min_apcor_stars : int
        Fewest calibration stars from which aperture corrections are measured; with fewer, they
        come from ``model_fractions``.  >= 1.
    limit_snr : float
        S/N of the limiting magnitude.  > 0.
    fewest_stars : int or None
        Fewest calibrators for any zero point (flagged ``few_stars`` below ``min_stars``); None
        means ``min_stars`` (no degradation).  In [1, min_stars].
    star_scatter_mag : float
        Scatter of calibrators about a zero point assumed with fewer than ``min_stars``, mag.
    error_floor : float
        Magnitude error added in quadrature to every calibrator (`fit_zero_point`).
    flux_type : {"psf", "auto"}
        "auto": measure the zero point on the largest aperture when PSF fluxes disagree with it.
    apflux_errs : numpy.ndarray, optional
        Shape (n, n_ap) errors of ``apfluxes`` (for the comparison and an aperture zero point;
        None: the PSF flux errors stand in).

    Returns
    -------
    PhotometricCalibration

    Raises
    ------
    improc.photometry.PhotometryError
        Fewer than ``min_stars`` stars to calibrate (the message gives the counts of each cut),
        too few survive clipping, or too few for the aperture corrections and no
        ``model_fractions``.
    ValueError
        If an option is out of its range (the message names it) or arrays disagree in shape.
    """
    fewest_stars = min_stars if fewest_stars is None else fewest_stars
    _check_options(match_radius_arcsec=match_radius_arcsec, min_snr=min_snr, max_size_fwhm=max_size_fwhm,
                   bright_limit_g=bright_limit_g, color_term=color_term, clip_sigma=clip_sigma,
                   min_stars=min_stars, min_apcor_stars=min_apcor_stars, limit_snr=limit_snr,
                   fewest_stars=fewest_stars, star_scatter_mag=star_scatter_mag, error_floor=error_floor,
                   flux_type=flux_type)
    _check(np.isfinite(fwhm_pixels) and fwhm_pixels > 0, "fwhm_pixels", "finite and > 0", fwhm_pixels)
    src = _arrays("psf_flux", psf_flux=psf_flux, psf_flux_err=psf_flux_err, size=size, ra=ra, dec=dec)
    flags = np.asarray(flags)
    _check(flags.shape == src["psf_flux"].shape, "flags", f"of shape {src['psf_flux'].shape} like psf_flux",
           flags.shape)
    apfluxes = np.asarray(apfluxes, dtype=float)
    _check(apfluxes.ndim == 2 and len(apfluxes) == len(flags), "apfluxes",
           f"of shape ({len(flags)}, n_ap) like psf_flux", apfluxes.shape)
    cat = _arrays("catalog_ra", catalog_ra=catalog_ra, catalog_dec=catalog_dec, catalog_g=catalog_g,
                  catalog_bp=catalog_bp, catalog_rp=catalog_rp)
    flux, err = src["psf_flux"], src["psf_flux_err"]

    good = _candidates(flux, err, flags, src["size"], fwhm_pixels=fwhm_pixels, min_snr=min_snr,
                       max_size_fwhm=max_size_fwhm)
    ap_err = (err if apflux_errs is None else np.asarray(apflux_errs, dtype=float)[:, -1])
    check, flux_from = None, "psf"
    if flux_type == "auto":
        check = check_psf_photometry(flux[good], apfluxes[good, -1], psf_flux_err=err[good],
                                     aper_flux_err=ap_err[good], min_snr=min_snr)
        if check.verdict in ("offset", "scatter"):
            # a poor PSF model: the largest aperture holds the total light instead
            flux_from = "aperture"
            flux, err = apfluxes[:, -1].copy(), ap_err.copy()
    isrc, icat, _ = match_sky(src["ra"][good], src["dec"][good], cat["catalog_ra"], cat["catalog_dec"],
                              radius_arcsec=match_radius_arcsec)
    isrc = np.flatnonzero(good)[isrc]
    g = cat["catalog_g"]
    keep = g[icat] >= bright_limit_g
    if keep.sum() < fewest_stars:
        raise PhotometryError(
            f"only {keep.sum()} stars to calibrate the zero point, need >= {fewest_stars}: {good.sum()} of "
            f"{len(flux)} sources are unflagged, point-like, with PSF S/N >= {min_snr}; {len(isrc)} of them "
            f"match one of the {len(g)} catalog stars within {match_radius_arcsec}\"; {keep.sum()} of those "
            f"are fainter than G = {bright_limit_g}",
            figures={"n_stars": int(keep.sum()), "needed": fewest_stars, "n_candidates": int(good.sum()),
                     "n_matched": len(isrc), "n_catalog": len(g)})
    isrc, icat = isrc[keep], icat[keep]
    bp, rp = cat["catalog_bp"][icat], cat["catalog_rp"][icat]
    if transform is None:       # G itself: the colour term absorbs what a transformation would
        cat_mag, color_term = g[icat].copy(), "fit"
    else:
        cat_mag = gaia_to_band(g[icat], bp, rp, transform)
    color = bp - rp
    few = len(isrc) < min_stars
    if few:
        fit = _few_star_fit(flux[isrc], err[isrc], cat_mag, error_floor=error_floor,
                            star_scatter_mag=star_scatter_mag)
        color_term = "none"
    else:
        fit = fit_zero_point(flux[isrc], err[isrc], cat_mag, color=color, color_term=color_term,
                             clip_sigma=clip_sigma, min_stars=min_stars, error_floor=error_floor)
    if flux_from == "aperture":     # the corrections to the largest aperture, which is the total
        apcor, apcor_from = _aperture_corrections(fit.used, isrc, flux[isrc], err[isrc], apfluxes[isrc],
                                                  model_fractions, min_apcor_stars, reference_is_last=True)
    else:
        apcor, apcor_from = _aperture_corrections(fit.used, isrc, flux[isrc], err[isrc], apfluxes[isrc],
                                                  model_fractions, min_apcor_stars)
    lim = limiting_magnitude(sky_noise_adu=sky_rms, zero_point=fit.zp, psf=psf_stamp, snr=limit_snr)
    colour_mag = fit.color_term * color if color_term == "fit" else 0.0     # NaN colours count when fitted
    with np.errstate(divide="ignore", invalid="ignore"):
        instrumental = -2.5 * np.log10(flux[isrc])
    residuals = cat_mag - (instrumental + fit.zp + colour_mag)
    return PhotometricCalibration(fit=fit, aper_cors=np.asarray(apcor), aper_cors_from=apcor_from,
                                  lim_mag=float(lim), source_index=isrc, catalog_index=icat, catalog_mag=cat_mag,
                                  color=color, residuals=residuals, used=fit.used, instrumental_mag=instrumental,
                                  n_candidates=int(good.sum()), few_stars=few, flux_from=flux_from, psf_check=check,
                                  band_calibrated=transform is not None)


def _few_star_fit(flux: np.ndarray, err: np.ndarray, catalog_mag: np.ndarray, *, error_floor: float,
                  star_scatter_mag: float) -> ZeroPointFit:
    """Zero point of fewer stars than a clipped fit needs: their weighted mean, no clipping, with
    an error that adds the calibrators' prior scatter (one or two stars cannot measure it)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        diff = catalog_mag + 2.5 * np.log10(flux)
        sigma = np.sqrt((_MAG_PER_FRAC * err / flux) ** 2 + error_floor ** 2)
    used = np.isfinite(diff) & np.isfinite(sigma) & (sigma > 0) & (flux > 0)
    if not used.any():
        raise PhotometryError("no calibrator with a positive flux and a finite magnitude",
                              figures={"n_stars": 0})
    weight = 1.0 / sigma[used] ** 2
    zp = float(np.sum(weight * diff[used]) / np.sum(weight))
    statistical = 1.0 / np.sqrt(np.sum(weight))
    n = int(used.sum())
    dzp = float(np.hypot(statistical, star_scatter_mag / np.sqrt(n)))
    scatter = float(np.sqrt(np.mean((diff[used] - zp) ** 2)))
    return ZeroPointFit(zp=zp, dzp=dzp, color_term=0.0, dcolor_term=0.0, n_stars=n, used=used, scatter=scatter)


def _aperture_corrections(used: np.ndarray, rows: np.ndarray, flux: np.ndarray, err: np.ndarray,
                          apfluxes: np.ndarray, model_fractions: Callable[[np.ndarray], np.ndarray] | None,
                          min_stars: int, reference_is_last: bool = False
                          ) -> tuple[np.ndarray, Literal["stars", "psf_model"]]:
    """Aperture corrections from the calibrators (``used`` of the matched stars, source ``rows``),
    else from the PSF model's aperture fractions; with ``reference_is_last``, relative to the
    largest aperture (from the stars, else from the model's fractions relative to it)."""
    if reference_is_last:
        if used.sum() >= min_stars:
            return aperture_corrections(apfluxes[used], None, min_stars=min_stars), "stars"
        if model_fractions is not None:     # the model's light in each aperture relative to the largest
            fractions = np.mean(model_fractions(rows[used]), axis=0)
            return 2.5 * np.log10(fractions / fractions[-1]), "psf_model"
        raise PhotometryError(f"aperture corrections to the largest aperture need {min_stars} stars or the "
                              f"PSF model's aperture fractions; {used.sum()} stars calibrate",
                              figures={"n_stars": int(used.sum()), "needed": min_stars})
    if used.sum() >= min_stars:
        # random-effects mean: weights from the stars' errors scaled to each aperture plus the
        # corrections' true variation over the chip (see aperture_corrections)
        mag_err = _MAG_PER_FRAC * err[used] / flux[used]
        return aperture_corrections(apfluxes[used], flux[used], mag_errors=mag_err, min_stars=min_stars), "stars"
    if model_fractions is not None:
        return 2.5 * np.log10(np.mean(model_fractions(rows[used]), axis=0)), "psf_model"
    raise PhotometryError(f"aperture corrections need {min_stars} stars or the PSF model's "
                          f"aperture fractions; {used.sum()} stars calibrate",
                          figures={"n_stars": int(used.sum()), "needed": min_stars})
