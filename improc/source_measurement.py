"""Sources and PSF of an image: detection, PSF fit, sky refinement, hidden neighbours, photometry.

`measure_sources` is the whole measurement of one image, arrays in:

1. Detect on the matched-filtered image (`improc.extraction.extract_sources`, sep
   ``filter_type="matched"``: ``threshold`` is in units of the noise of the filtered image, a
   detection significance).  The sources' size estimate (the stellar locus of twice their
   half-light radii, ``meta["fwhm"]``, the *size guess* below) only seeds the PSF fit: for a
   Moffat profile it is ~25% larger than the FWHM, which comes from the PSF model instead.
2. Fit the PSF (`improc.psf_fit.fit_psf`) to bright, isolated, unsaturated stars
   (`improc.psf_photometry.select_psf_stars`): no neighbour above ``psf_neighbor_flux_ratio``
   of their flux within ``psf_isolation_radius_fwhm`` size guesses (closer, fainter ones are
   masked by the fit).  Should the fit of these stars fail or collapse (its FWHM outside
   ``psf_min_fwhm_ratio`` .. ``psf_max_fwhm_ratio`` times the size guess), the stars with no
   neighbour above ``psf_fallback_neighbor_flux_ratio`` within
   ``psf_fallback_isolation_radius_fwhm`` times the median size of the candidates are used.
   A field with too few stars for ``psf_degree`` gets a lower degree: degree d >= 1 needs
   ``psf_stars_per_term`` stars per polynomial term (with 30 stars, 4 of them in a quarter of
   the chip, a quadratic or cubic variation swung the FWHM there from 5.5 to 10 pixels).  With ``psf_fallback``
   "moffat", a field with at most ``moffat_max_stars`` PSF stars (too few to map pixels), or
   whose pixel fits fail, gets an elliptical Moffat fitted to the stars there are
   (`improc.psf_moffat`), and one with none a Moffat of the sources' size, or of
   ``default_fwhm`` when no source measures one (``psf_kind`` says which).
3. Refine the sky: the mode of the background map is raised by the sources' wings; the clipped
   mean of image - sky - PSF models (`improc.background.residual_background`), where the models
   are below ``sky_model_nsigma`` times the noise, is added to it and the PSF refitted on the
   refined sky, ``sky_refinement_iterations`` times (a PSF fitted on a sky that is too high has
   wings too low, which raises the next estimate of the sky).  One refinement is the default:
   on simulated fields of 10k to 300k stars/deg2 it moves the PSF fluxes by 0.4-1 %, a second
   one by 1/20 of that (0.04 % at 300k), below the model's own bias, for a third of the time.
4. Detect again on image - PSF models (`improc.hidden_sources.find_hidden_sources`; the models
   of the last sky refinement, on the sky they were fitted on, whose PSF differs from the
   refitted one by far less than the search's allowance for model errors): faint
   neighbours ``hidden_min_separation_fwhm`` to ``hidden_max_separation_fwhm`` FWHM from a
   point source (a size at most ``extended_size_ratio`` times the size guess) and away from
   extended ones, that deblending merged into them (flag RESIDUAL); closer ones are blends.
5. Replace the windowed centroids by PSF-fit positions on the image with the neighbours'
   models subtracted (`improc.psf_photometry.psf_positions`; kept if within
   ``max_centroid_shift_fwhm`` FWHM of the centroid), which bright neighbours' wings do not pull.
   The models are those of step 4 and, for the hidden sources, PSF fits of each on the image
   minus them: with a joint fit of every source with the refitted PSF on the refined sky
   instead, the positions' rms error from the truth on simulated fields was the same to 0.3 %
   (0.1286 against 0.1289 px at 100k stars/deg2, 0.1750 against 0.1751 at 300k).
6. Measure apertures at ``aperture_multiples`` of the PSF model's FWHM with the model light of
   the neighbours taken out, and PSF fluxes fitted with the neighbours subtracted
   (`improc.crowded_photometry.deblended_psf_fluxes`) and a model-based variance.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import sep
from astropy.table import Table, vstack

from improc.background import residual_background
from improc.crowded_photometry import deblended_psf_fluxes
from improc.errors import BadDataError
from improc.extraction import FWHM_APERTURE_MULTIPLES, TooFewSourcesError, aperture_photometry, extract_sources
from improc.hidden_sources import find_hidden_sources
from improc.psf import PixelPSF, n_terms, nearest_pixel
from improc.psf_fit import TooFewPSFStarsError, fit_psf, min_psf_stars
from improc.psf_moffat import (DEFAULT_BETA, MoffatFit, MoffatFitError, default_moffat, fit_moffat_psf,
                               moffat_pixel_psf, size_from_sources)
from improc.psf_photometry import (PSFFluxes, add_clips, model_aperture_sums, psf_fluxes, psf_positions,
                                   select_psf_stars)

__all__ = ["PSFError", "SourceMeasurement", "measure_sources", "check_options"]

#: Sub-pixel sampling of the apertures on the neighbours' models; that of `aperture_photometry`.
_APERTURE_SUBPIX = 5

#: The extraction's size (twice the half-light radius) of a Moffat star over its FWHM (~1.2 for
#: beta ~3.5; see `improc.psf_moffat.default_moffat`): converts a FWHM into a size guess.
_SIZE_PER_FWHM = 1.2


class PSFError(BadDataError):
    """The PSF could not be fitted, or the fit collapsed (its FWHM far from the sources' sizes)."""


@dataclass(frozen=True)
class SourceMeasurement:
    """What `measure_sources` finds.

    Attributes
    ----------
    sources : astropy.table.Table
        One row per source: the columns of `improc.extraction.extract_sources` (``x, y`` now
        PSF-fit positions, ``apflux_<i>`` at ``aper_radii`` with the neighbours' light removed)
        plus ``psfflux, psffluxerr, psfchi2`` and ``is_psf_star``; ``meta["fwhm"]`` is
        ``fwhm_pixels``.
    psf : PixelPSF
        The PSF model fitted on the refined sky.
    fwhm_pixels : float
        FWHM of the PSF model, pixels.
    aper_radii : tuple of float
        Aperture radii, pixels (``aperture_multiples`` x ``fwhm_pixels``).
    psf_kind : {"pixel", "moffat", "moffat_default"}
        The PSF model: a pixel model fitted to the stars, a Moffat fitted to too few stars for one,
        or a Moffat of the sources' (or the default) size when no star could be fitted.
    moffat : MoffatFit or None
        The Moffat fit behind a "moffat" or "moffat_default" PSF (beta, chi2, stars).
    """

    sources: Table
    psf: PixelPSF
    fwhm_pixels: float
    aper_radii: tuple[float, ...]
    psf_kind: Literal["pixel", "moffat", "moffat_default"] = "pixel"
    moffat: MoffatFit | None = None


@dataclass(frozen=True, kw_only=True)
class _Options:
    """The keyword options of `measure_sources` (see there)."""

    threshold: float
    minarea: int
    deblend_nthresh: int
    deblend_cont: float
    filter_type: Literal["conv", "matched"]
    max_sources: int
    min_fwhm_sources: int
    aperture_multiples: tuple[float, ...]
    psf_degree: int
    psf_stars_per_term: float
    psf_min_snr: float
    psf_max_stars: int
    psf_isolation_radius_fwhm: float
    psf_neighbor_flux_ratio: float
    psf_fallback_isolation_radius_fwhm: float
    psf_fallback_neighbor_flux_ratio: float
    psf_min_fwhm_ratio: float
    psf_max_fwhm_ratio: float
    sky_refinement_iterations: int
    sky_model_nsigma: float
    sky_refinement_box_size: int
    extended_size_ratio: float
    extended_extent_factor: float
    hidden_min_separation_fwhm: float
    hidden_max_separation_fwhm: float
    max_centroid_shift_fwhm: float
    psf_fallback: Literal["none", "moffat"] = "none"
    moffat_max_stars: int = 5
    moffat_beta: float | None = None
    default_beta: float = DEFAULT_BETA

    def validate(self) -> None:
        _check(self.threshold > 0, "threshold", "> 0", self.threshold)
        _check_int(self.minarea, "minarea", 1)
        _check_int(self.deblend_nthresh, "deblend_nthresh", 1)
        _check(0 <= self.deblend_cont <= 1, "deblend_cont", "in [0, 1]", self.deblend_cont)
        _check(self.filter_type in ("conv", "matched"), "filter_type", "'conv' or 'matched'",
               repr(self.filter_type))
        _check_int(self.max_sources, "max_sources", 1)
        _check_int(self.min_fwhm_sources, "min_fwhm_sources", 1)
        _check(len(self.aperture_multiples) > 0 and all(np.isfinite(m) and m > 0 for m in self.aperture_multiples),
               "aperture_multiples", "a non-empty sequence of values > 0", self.aperture_multiples)
        _check_int(self.psf_degree, "psf_degree", 0, 4)
        _check(self.psf_stars_per_term > 0, "psf_stars_per_term", "> 0", self.psf_stars_per_term)
        _check(self.psf_min_snr >= 0, "psf_min_snr", ">= 0", self.psf_min_snr)
        _check_int(self.psf_max_stars, "psf_max_stars", 1)
        for name in ("psf_isolation_radius_fwhm", "psf_fallback_isolation_radius_fwhm", "sky_model_nsigma",
                     "extended_size_ratio", "extended_extent_factor", "max_centroid_shift_fwhm"):
            _check(getattr(self, name) > 0, name, "> 0", getattr(self, name))
        for name in ("psf_neighbor_flux_ratio", "psf_fallback_neighbor_flux_ratio"):
            _check(getattr(self, name) >= 0, name, ">= 0", getattr(self, name))
        _check(0 < self.psf_min_fwhm_ratio < self.psf_max_fwhm_ratio, "psf_min_fwhm_ratio",
               f"> 0 and < psf_max_fwhm_ratio ({self.psf_max_fwhm_ratio})", self.psf_min_fwhm_ratio)
        _check_int(self.sky_refinement_iterations, "sky_refinement_iterations", 0)
        _check_int(self.sky_refinement_box_size, "sky_refinement_box_size", 8)
        _check(self.hidden_min_separation_fwhm >= 0, "hidden_min_separation_fwhm", ">= 0",
               self.hidden_min_separation_fwhm)
        _check(self.hidden_max_separation_fwhm > self.hidden_min_separation_fwhm, "hidden_max_separation_fwhm",
               f"> hidden_min_separation_fwhm ({self.hidden_min_separation_fwhm})", self.hidden_max_separation_fwhm)
        _check(self.psf_fallback in ("none", "moffat"), "psf_fallback", "'none' or 'moffat'", repr(self.psf_fallback))
        _check_int(self.moffat_max_stars, "moffat_max_stars", 0)
        _check(self.moffat_beta is None or self.moffat_beta > 1.5, "moffat_beta", "None or > 1.5", self.moffat_beta)
        _check(self.default_beta > 1.5, "default_beta", "> 1.5", self.default_beta)


def check_options(**options) -> None:
    """Check keyword options of `measure_sources` (any subset) without measuring anything.

    Raises
    ------
    ValueError
        An option is out of its range (the message names it), or unknown.
    """
    import dataclasses
    import inspect

    defaults = {name: p.default for name, p in inspect.signature(measure_sources).parameters.items()
                if name in {f.name for f in dataclasses.fields(_Options)}}
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise ValueError(f"unknown measure_sources option(s) {', '.join(unknown)}")
    merged = {**defaults, **options}
    merged["aperture_multiples"] = tuple(merged["aperture_multiples"])
    _Options(**merged).validate()


def _check(ok: bool, name: str, expected: str, value) -> None:
    """ValueError naming the argument unless ``ok`` (NaN comparisons are False, so NaN fails)."""
    if not ok:
        raise ValueError(f"{name} must be {expected}, got {value}")


def _check_int(value, name: str, low: int, high: int | None = None) -> None:
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= low
    ok = ok and (high is None or value <= high)
    _check(ok, name, f"an integer >= {low}" + ("" if high is None else f" and <= {high}"), value)


def measure_sources(data: np.ndarray, *, background: np.ndarray, variance: np.ndarray, mask: np.ndarray | None,
                    gain: float | None, saturation: float | None = None, threshold: float = 5.0,
                    minarea: int = 5, deblend_nthresh: int = 32, deblend_cont: float = 0.005,
                    filter_type: Literal["conv", "matched"] = "matched", max_sources: int = 100_000,
                    min_fwhm_sources: int = 5,
                    aperture_multiples: Sequence[float] = (1.0, 2.0, 3.0, 5.0), psf_degree: int = 3,
                    psf_stars_per_term: float = 10.0, psf_min_snr: float = 50.0, psf_max_stars: int = 500, psf_isolation_radius_fwhm: float = 3.0,
                    psf_neighbor_flux_ratio: float = 0.05, psf_fallback_isolation_radius_fwhm: float = 5.0,
                    psf_fallback_neighbor_flux_ratio: float = 0.01, psf_min_fwhm_ratio: float = 0.5,
                    psf_max_fwhm_ratio: float = 1.5, sky_refinement_iterations: int = 1,
                    sky_model_nsigma: float = 1.0, sky_refinement_box_size: int = 128,
                    extended_size_ratio: float = 1.3,
                    extended_extent_factor: float = 2.0, hidden_min_separation_fwhm: float = 2.0,
                    hidden_max_separation_fwhm: float = 5.0,
                    max_centroid_shift_fwhm: float = 0.5, psf_fallback: Literal["none", "moffat"] = "none",
                    moffat_max_stars: int = 5, moffat_beta: float | None = None,
                    default_beta: float = DEFAULT_BETA, default_fwhm: float | None = None) -> SourceMeasurement:
    """Detect, fit the PSF, refine the sky, find hidden neighbours, measure (the steps are in the
    module docstring).

    Parameters
    ----------
    data : numpy.ndarray
        (ny, nx) image, ADU, sky not subtracted.
    background : numpy.ndarray
        (ny, nx) sky level, ADU (e.g. ``BackgroundMesh.counts()``).
    variance : numpy.ndarray
        (ny, nx) sky variance, ADU**2 (e.g. ``BackgroundMesh.variance()``).
    mask : numpy.ndarray or None
        (ny, nx) bool, True on bad pixels; None masks nothing.
    gain : float or None
        e-/ADU, for the sources' Poisson noise; None: sky noise only.
    saturation : float or None
        ADU level (sky included) at or above which a pixel is saturated; None: no check.
    threshold : float
        Detection threshold: significance (sigma) of the matched-filtered image (``filter_type``
        "matched"; about 2.7x SExtractor's per-pixel DETECT_THRESH for default.conv).  > 0.
    minarea : int
        Fewest connected pixels above threshold.  >= 1.
    deblend_nthresh : int
        Deblending levels (SExtractor DEBLEND_NTHRESH).  >= 1.
    deblend_cont : float
        Deblending contrast (DEBLEND_MINCONT); 1 = no deblending.  In [0, 1].
    filter_type : {"matched", "conv"}
        Detection filter of sep: "matched" divides the filtered image by its own noise; "conv"
        compares it with ``threshold`` x noise as SExtractor does.
    max_sources : int
        More detections than this is an error (`improc.extraction.TooManySourcesError`);
        does not change a result that succeeds.
    min_fwhm_sources : int
        Fewest clean sources with S/N >= 20 from which the size guess (the stellar locus) is
        measured; fewer raise `improc.extraction.TooFewSourcesError`.  >= 1.
    aperture_multiples : sequence of float
        Aperture radii in units of the PSF model's FWHM.  Each > 0.
    psf_degree : int
        Polynomial degree of the PSF's variation across the chip, 0..4 (lowered when there are
        too few PSF stars for it: see ``psf_stars_per_term``).
    psf_stars_per_term : float
        Fewest PSF stars per term of the spatial polynomial for a degree >= 1 (degree 1 has 3
        terms, 2 has 6, 3 has 10); degree 0 needs `improc.psf_fit.min_psf_stars` (0).  > 0.
    psf_min_snr : float
        Only stars above this isophotal S/N build the PSF.  >= 0.
    psf_max_stars : int
        At most this many PSF stars (the brightest).  >= 1.
    psf_isolation_radius_fwhm : float
        A PSF star has no neighbour brighter than ``psf_neighbor_flux_ratio`` of its flux within
        this many size guesses (also its least distance from the edges).  > 0.
    psf_neighbor_flux_ratio : float
        Flux ratio (neighbour / star) from which a neighbour spoils a PSF star.  >= 0.
    psf_fallback_isolation_radius_fwhm : float
        Isolation radius of the PSF stars when the first set's fit fails or collapses, in units
        of the median size of the PSF-star candidates (as for ``isolation_radius=None`` of
        `select_psf_stars`).  > 0.
    psf_fallback_neighbor_flux_ratio : float
        Flux ratio from which a neighbour spoils a PSF star of the fallback set.  >= 0.
    psf_min_fwhm_ratio, psf_max_fwhm_ratio : float
        A PSF whose FWHM is not strictly between these multiples of the size guess has
        collapsed (the fallback stars are tried, then `PSFError`).  0 < min < max.
    sky_refinement_iterations : int
        Times the sky is refined from the residuals of the PSF models and the PSF refitted.  >= 0.
    sky_model_nsigma : float
        Pixels where the sources' PSF models exceed this many times the sky noise are left out
        of the residual sky.  > 0.
    sky_refinement_box_size : int
        Mesh box of the residual sky, pixels (at most the image's sides).  >= 8.
    extended_size_ratio : float
        Sources larger than this many times the size guess are extended (no hidden neighbours
        searched around them, and none within their extent).  > 0.
    extended_extent_factor : float
        The extent of a source, where no hidden neighbour is searched if it is extended, is a
        disc of this many times the radius of a disc of its footprint's area,
        ``sqrt(npix / pi)``.  > 0.
    hidden_min_separation_fwhm, hidden_max_separation_fwhm : float
        Hidden neighbours are kept from this many to this many PSF FWHM from a point source
        (closer ones are blends).  0 <= min < max.
    max_centroid_shift_fwhm : float
        A PSF-fit position further than this many PSF FWHM from the windowed centroid is not
        used (the centroid is kept).  > 0.
    psf_fallback : {"none", "moffat"}
        "moffat": with at most ``moffat_max_stars`` PSF stars, or when the pixel fits fail or
        collapse, fit a Moffat to the stars there are (`improc.psf_moffat.fit_moffat_psf`); with
        none (or when that fails too), a Moffat of the sources' size
        (`improc.psf_moffat.default_moffat`), and when too few sources measure a size, of
        ``default_fwhm``.  "none": those cases raise as described below.
    moffat_max_stars : int
        With this many PSF stars or fewer, a Moffat rather than a pixel model.  >= 0.
    moffat_beta : float or None
        Fix the Moffat's beta (None: fitted when the stars constrain it).  > 1.5.
    default_beta : float
        Beta of the no-star Moffat (`improc.psf_moffat.DEFAULT_BETA`).  > 1.5.
    default_fwhm : float or None
        FWHM, pixels, of the no-star Moffat when too few sources measure the sources' size (e.g.
        a nominal seeing); None: `improc.extraction.TooFewSourcesError` then.  Only used with
        ``psf_fallback`` "moffat".

    Returns
    -------
    SourceMeasurement

    Raises
    ------
    ValueError
        If an option is out of its range (the message names it), or arrays have wrong shapes.
    improc.extraction.TooFewSourcesError
        Fewer than ``min_fwhm_sources`` clean bright sources to guess the size from.
    improc.psf_fit.TooFewPSFStarsError
        Too few stars qualify for the PSF, even for degree 0.
    PSFError
        The PSF fits of both sets of stars failed or collapsed.
    """
    o = _Options(threshold=threshold, minarea=minarea, deblend_nthresh=deblend_nthresh, deblend_cont=deblend_cont,
                 filter_type=filter_type, max_sources=max_sources, min_fwhm_sources=min_fwhm_sources,
                 aperture_multiples=tuple(aperture_multiples), psf_degree=psf_degree, psf_min_snr=psf_min_snr,
                 psf_stars_per_term=psf_stars_per_term,
                 psf_max_stars=psf_max_stars, psf_isolation_radius_fwhm=psf_isolation_radius_fwhm,
                 psf_neighbor_flux_ratio=psf_neighbor_flux_ratio,
                 psf_fallback_isolation_radius_fwhm=psf_fallback_isolation_radius_fwhm,
                 psf_fallback_neighbor_flux_ratio=psf_fallback_neighbor_flux_ratio,
                 psf_min_fwhm_ratio=psf_min_fwhm_ratio, psf_max_fwhm_ratio=psf_max_fwhm_ratio,
                 sky_refinement_iterations=sky_refinement_iterations, sky_model_nsigma=sky_model_nsigma,
                 sky_refinement_box_size=sky_refinement_box_size,
                 extended_size_ratio=extended_size_ratio, extended_extent_factor=extended_extent_factor,
                 hidden_min_separation_fwhm=hidden_min_separation_fwhm,
                 hidden_max_separation_fwhm=hidden_max_separation_fwhm, max_centroid_shift_fwhm=max_centroid_shift_fwhm,
                 psf_fallback=psf_fallback, moffat_max_stars=moffat_max_stars, moffat_beta=moffat_beta,
                 default_beta=default_beta)
    o.validate()
    _check(default_fwhm is None or (np.isfinite(default_fwhm) and default_fwhm > 0), "default_fwhm",
           "None or finite and > 0", default_fwhm)
    return _measure(data, background=background, variance=variance, mask=mask, gain=gain,
                    saturation=saturation, o=o, default_fwhm=default_fwhm)


def _detect_sparse(data, *, background, noise, gain, detect, o: _Options,
                   default_fwhm: float | None) -> tuple[Table, float | None]:
    """Detections of a field with too few clean sources to measure their size: the size of those
    there are (`size_from_sources`), else None (the caller uses ``default_fwhm``)."""
    provisional = default_fwhm if default_fwhm is not None else 3.0     # apertures are measured again
    table = extract_sources(data, background=background, noise=noise, gain=gain,
                            aperture_radii=[m * provisional for m in FWHM_APERTURE_MULTIPLES], **detect)
    try:
        size = size_from_sources(table["fwhm"], table["snr"], flags=table["flags"])
    except MoffatFitError:
        size = None
    return table, size


def _measure(data: np.ndarray, *, background: np.ndarray, variance: np.ndarray, mask: np.ndarray | None,
             gain: float | None, saturation: float | None, o: _Options,
             default_fwhm: float | None = None) -> SourceMeasurement:
    detect = dict(threshold=o.threshold, minarea=o.minarea, deblend_nthresh=o.deblend_nthresh,
                  deblend_cont=o.deblend_cont, filter_type=o.filter_type, mask=mask,
                  saturation=saturation, max_sources=o.max_sources)
    noise = np.sqrt(variance)
    try:
        table = extract_sources(data, background=background, noise=noise, gain=gain,
                                min_fwhm_sources=o.min_fwhm_sources, **detect)
        size: float | None = float(table.meta["fwhm"])
    except TooFewSourcesError:
        if o.psf_fallback != "moffat":
            raise
        table, size = _detect_sparse(data, background=background, noise=noise, gain=gain, detect=detect, o=o,
                                     default_fwhm=default_fwhm)
        if size is None and default_fwhm is None:
            raise
    # the size guess seeds the PSF fit; a default FWHM is a FWHM, ~20 % below a size
    guess = size if size is not None else default_fwhm * _SIZE_PER_FWHM
    table.meta["fwhm"] = guess
    x, y = np.asarray(table["x"], float), np.asarray(table["y"], float)
    fluxes = dict(variance=variance, mask=mask, gain=gain)     # options of deblended_psf_fluxes
    idx, psf, psf_on, kind, moffat = _first_psf(data, table, o, background=background, noise=noise, mask=mask,
                                                gain=gain, saturation=saturation, variance=variance,
                                                default_fwhm=default_fwhm, no_size=size is None)
    # a PSF fitted on a biased sky has biased wings (a default PSF, fitted to nothing, has no say)
    refinements = o.sky_refinement_iterations if kind != "moffat_default" else 0
    limit = o.sky_model_nsigma * noise if refinements else None      # the same for every refinement
    model, model_sky = None, background     # the last models of the sources, and their sky
    for _ in range(refinements):
        model = None        # not held through the next refinement's (its peak of memory)
        model_sky = background
        background, model, model_fit = _refined_sky(data, x, y, psf, background, model_limit=limit,
                                                    box_size=min(o.sky_refinement_box_size, *data.shape),
                                                    **fluxes)
        psf = psf_on(background)
    del limit
    fwhm = float(psf.fwhm_pixels)
    radii = tuple(float(m * fwhm) for m in o.aperture_multiples)
    point = ~(np.asarray(table["fwhm"], float) > o.extended_size_ratio * guess)     # not extended
    # The hidden neighbours are searched for under the last refinement's models of the sources:
    # the PSF refitted since moved by far less than the 2 % model error the search allows for,
    # and a fit of every source with it costs as much as a refinement.  The search subtracts the
    # sky those models were fitted on: on the refined sky their fluxes, fitted on a sky ~1 %
    # of a star's flux too high, leave rings that hid 0.1 % of the stars at 300k stars/deg2.
    if model is None:
        model_sky = background
        model_fit, model = deblended_psf_fluxes(data, x, y, psf, background=background, **fluxes)
    model = np.asarray(model, dtype=np.float32)        # what the search uses: half the memory held
    hidden = find_hidden_sources(data, model, x, y, point_like=point,
                                 extent=o.extended_extent_factor * np.sqrt(table["npix"] / np.pi),
                                 background=model_sky, variance=variance,
                                 min_separation=o.hidden_min_separation_fwhm * fwhm,
                                 max_separation=o.hidden_max_separation_fwhm * fwhm, point_fwhm=guess,
                                 aperture_radii=radii, gain=gain, **detect)
    del model_sky
    table = vstack([table, hidden], metadata_conflicts="silent") if len(hidden) else table
    x, y = np.asarray(table["x"], float), np.asarray(table["y"], float)
    # PSF-fit positions on the image with the neighbours subtracted: free of their pull.  The
    # neighbours' models are the search's, and the hidden sources' own single fits: a joint fit
    # of them all with the refitted PSF costs as much as the refinement's and moves no position.
    model = np.subtract(data, model, out=model)      # the image minus the neighbours
    hidden_flux = _subtract_new_sources(model, x[len(model_fit.flux):], y[len(model_fit.flux):], psf,
                                        background=background, variance=variance, mask=mask)
    own = np.r_[model_fit.flux, hidden_flux]
    x, y = psf_positions(model, x, y, psf, background=background, variance=variance,
                         mask=mask, flux=own, max_shift=o.max_centroid_shift_fwhm * fwhm)
    del model, own
    table["x"][:], table["y"][:] = x, y       # in place: the columns keep their units
    fit, model = deblended_psf_fluxes(data, x, y, psf, background=background, **fluxes)
    table = aperture_photometry(data, table, background=background, noise=noise,
                                aperture_radii=radii, mask=mask, gain=gain)
    _remove_neighbour_light(table, model, psf, x, y, fit.flux, radii)
    table["psfflux"], table["psffluxerr"], table["psfchi2"] = fit.flux, fit.flux_err, fit.chi2
    table["is_psf_star"] = np.zeros(len(table), bool)
    table["is_psf_star"][idx] = True
    table.meta["fwhm"] = fwhm
    if kind != "pixel":
        moffat = psf_on.last_fit    # the fit on the final sky
    return SourceMeasurement(sources=table, psf=psf, fwhm_pixels=fwhm, aper_radii=radii, psf_kind=kind,
                             moffat=moffat)


class _MoffatOn:
    """Fits the Moffat PSF of the same stars on a sky map (or gives the default); remembers the fit."""

    def __init__(self, data, x, y, idx, *, guess, variance, mask, gain, image_shape, o: _Options,
                 default_fwhm: float | None, size: float | None):
        self.data, self.x, self.y, self.idx = data, x, y, idx
        self.guess, self.variance, self.mask, self.gain = guess, variance, mask, gain
        self.image_shape, self.o, self.default_fwhm, self.size = image_shape, o, default_fwhm, size
        self.last_fit: MoffatFit | None = None

    def default(self) -> MoffatFit:
        if self.size is not None:
            return default_moffat(size_fwhm=self.size, beta=self.o.default_beta)
        if self.default_fwhm is not None:
            return default_moffat(fwhm=self.default_fwhm, beta=self.o.default_beta)
        raise PSFError("no star to fit a PSF to, no source whose size measures one, and no default FWHM",
                       figures={"n_stars": 0})

    def __call__(self, sky: np.ndarray) -> PixelPSF:
        fit = None
        if len(self.idx):
            try:
                fit = fit_moffat_psf(self.data, self.x[self.idx], self.y[self.idx], background=sky,
                                     variance=self.variance, fwhm_guess=self.guess / _SIZE_PER_FWHM,
                                     mask=self.mask, gain=self.gain, beta=self.o.moffat_beta)
            except MoffatFitError:
                fit = None
        self.last_fit = fit if fit is not None else self.default()
        return moffat_pixel_psf(self.last_fit, image_shape=self.image_shape)


def _first_psf(data: np.ndarray, table: Table, o: _Options, *, background: np.ndarray, noise: np.ndarray,
               mask: np.ndarray | None, gain: float | None, saturation: float | None, variance: np.ndarray,
               default_fwhm: float | None = None, no_size: bool = False):
    """Choose the PSF stars and fit the PSF on the first sky (the rule is in the module docstring).

    Returns
    -------
    idx : numpy.ndarray
        Rows of ``table`` of the PSF stars.
    psf : PixelPSF
        The PSF fitted on ``background``.
    psf_on : callable
        Fits the PSF of the same stars on another sky map.
    kind : {"pixel", "moffat", "moffat_default"}
        The kind of PSF model.
    moffat : MoffatFit or None
        The Moffat fit on ``background``, for the Moffat kinds.

    Raises
    ------
    TooFewPSFStarsError, PSFError, ValueError
        If too few stars qualify, or the fit of either set of stars fails or collapses (without
        the Moffat fallback).
    """
    guess = float(table.meta["fwhm"])
    x, y = np.asarray(table["x"], float), np.asarray(table["y"], float)
    flux = np.asarray(table["apflux_1"], float)
    moffat = o.psf_fallback == "moffat"
    few: np.ndarray | None = None
    # the fallback radius is None: psf_fallback_isolation_radius_fwhm times the candidates' median size
    for radius, ratio in ((o.psf_isolation_radius_fwhm * guess, o.psf_neighbor_flux_ratio),
                          (None, o.psf_fallback_neighbor_flux_ratio)):
        chosen = select_psf_stars(x, y, flux, np.asarray(table["snr"], float), np.asarray(table["flags"]),
                                  np.asarray(table["fwhm"], float), image_shape=data.shape,
                                  min_snr=o.psf_min_snr, isolation_radius=radius, neighbor_flux_ratio=ratio,
                                  isolation_radius_fwhm=o.psf_fallback_isolation_radius_fwhm,
                                  peak=np.asarray(table["peak"], float), saturation=saturation)
        idx = np.flatnonzero(chosen)[np.argsort(-flux[chosen])[:o.psf_max_stars]]
        if few is None:
            few = idx
        if moffat and (len(idx) <= o.moffat_max_stars or no_size):
            break       # too few stars to map pixels: a Moffat below
        # A small chip or a sparse field cannot constrain the PSF's variation: lower the degree.
        degree = next((d for d in range(o.psf_degree, -1, -1)
                       if len(idx) >= max(min_psf_stars(d), o.psf_stars_per_term * n_terms(d) * (d > 0))), None)

        def psf_on(sky: np.ndarray, idx: np.ndarray = idx, degree: int | None = degree) -> PixelPSF:
            # Outlier rejection (cosmic rays, unmasked defects) can leave too few stars for the
            # degree: then a simpler model is better than none.
            for trial in range(degree, -1, -1):
                try:
                    return fit_psf(data, x[idx], y[idx], background=sky, fwhm_guess=guess, noise=noise,
                                   mask=mask, flux=flux[idx], gain=gain, degree=trial,
                                   max_stars=o.psf_max_stars)
                except ValueError:
                    if trial == 0:
                        raise

        failure = None if degree is not None else TooFewPSFStarsError(
            f"only {len(idx)} stars qualify for the PSF (S/N >= {o.psf_min_snr}, isolated, "
            f"unsaturated); need at least {min_psf_stars(0)}",
            figures={"n_stars": len(idx), "needed": min_psf_stars(0)})
        try:
            psf = None if failure else psf_on(background)
        except ValueError as exc:      # too few stars left after rejecting outliers, or a failed fit
            failure = exc if isinstance(exc, BadDataError) else PSFError(str(exc))
        if failure is None and not o.psf_min_fwhm_ratio * guess < psf.fwhm_pixels < o.psf_max_fwhm_ratio * guess:
            failure = PSFError(f"the PSF fitted to {len(idx)} stars has a FWHM of "
                               f"{psf.fwhm_pixels:.2f} px, the sources a size of {guess:.2f} px",
                               figures={"fwhm_pixels": float(psf.fwhm_pixels), "size_guess": guess})
        if failure is None:
            return idx, psf, psf_on, "pixel", None
    else:       # both sets of stars failed (no break)
        if not moffat:
            raise failure
    # a Moffat: fitted to the few stars the first selection found, else the default, sized by the
    # clean sources (cosmic rays, which can pass for a stellar locus, are smaller than 1.5 pixels)
    idx = few if few is not None and not no_size else np.array([], int)
    try:
        size = None if no_size else size_from_sources(table["fwhm"], table["snr"], flags=table["flags"])
    except MoffatFitError:
        size = None
    psf_on = _MoffatOn(data, x, y, idx, guess=guess, variance=variance, mask=mask, gain=gain,
                       image_shape=data.shape, o=o, default_fwhm=default_fwhm, size=size)
    psf = psf_on(background)
    kind = "moffat" if psf_on.last_fit.kind == "fitted" else "moffat_default"
    return (idx if kind == "moffat" else np.array([], int)), psf, psf_on, kind, psf_on.last_fit


def _refined_sky(data: np.ndarray, x: np.ndarray, y: np.ndarray, psf: PixelPSF, background: np.ndarray, *,
                 model_limit: np.ndarray, box_size: int, variance: np.ndarray,
                 mask: np.ndarray | None, gain: float | None) -> tuple[np.ndarray, np.ndarray, PSFFluxes]:
    """``background`` plus the clipped mean of image - sky - PSF models (`residual_background`),
    where the models are below ``model_limit`` (``sky_model_nsigma`` times the noise); the
    (ny, nx) float32 image of those models and their fit (`deblended_psf_fluxes`)."""
    fit, model = deblended_psf_fluxes(data, x, y, psf, background=background, variance=variance, mask=mask,
                                      gain=gain)
    unreliable = model > model_limit
    if mask is not None:
        unreliable |= np.asarray(mask, dtype=bool)
    residual = np.subtract(data, background, dtype=np.float32)
    residual -= model      # float32 is ample for a sky level
    model = model.astype(np.float32)    # kept for the hidden-source search, which works in float32
    try:
        return background + residual_background(residual, mask=unreliable, box_size=box_size).counts(), model, fit
    except ValueError:      # the sources' models cover nearly every box: nothing to refine on
        return background, model, fit


def _subtract_new_sources(residual: np.ndarray, x: np.ndarray, y: np.ndarray, psf: PixelPSF, *,
                          background: np.ndarray | float, variance: np.ndarray | float,
                          mask: np.ndarray | None) -> np.ndarray:
    """Fit the PSF flux of each of the sources at (x, y), which a model of the others left in
    ``residual`` (the image minus that model; (ny, nx) float32), and subtract their clips from it
    in place (float32, as the model images).

    Returns
    -------
    numpy.ndarray
        The fluxes subtracted, shape (n,): the `psf_fluxes` ones, 0 where not finite and > 0.
    """
    if len(x) == 0:
        return np.zeros(0)
    flux = psf_fluxes(residual, x, y, psf, background=background, variance=variance, mask=mask).flux
    flux = np.where(np.isfinite(flux) & (flux > 0), flux, 0.0)
    ix, iy, _, _ = nearest_pixel(x, y)
    add_clips(residual, psf.get_clips(x, y, -flux, dtype=np.float32), ix, iy)
    return flux


def _remove_neighbour_light(table: Table, model: np.ndarray, psf: PixelPSF, x: np.ndarray, y: np.ndarray,
                            flux: np.ndarray, radii: tuple[float, ...]) -> None:
    """Take the light of the neighbours' models out of the apertures ``apflux_<i>``: apertures on
    the model of all the sources minus those on each source's own model."""
    own = model_aperture_sums(psf, x, y, flux, radii)
    for i, radius in enumerate(radii):
        on_model = sep.sum_circle(model, x, y, radius, subpix=_APERTURE_SUBPIX)[0]
        table[f"apflux_{i}"] -= on_model - own[:, i]
