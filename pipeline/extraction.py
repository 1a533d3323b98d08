"""Extraction: sources (sep), their PSF model, and PSF fluxes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from dataclasses import dataclass

import numpy as np
import sep
from astropy.table import Table, vstack
from astropy.wcs.utils import proj_plane_pixel_scales

from improc.background import residual_background
from improc.crowded_photometry import deblended_psf_fluxes
from improc.errors import BadDataError
from improc.extraction import TooFewSourcesError, aperture_photometry, extract_sources
from improc.hidden_sources import find_hidden_sources
from improc.psf import PixelPSF
from improc.psf_fit import TooFewPSFStarsError, fit_psf, min_psf_stars
from improc.psf_photometry import model_aperture_sums, psf_positions, select_psf_stars
from models.psf import PSF
from models.source_list import SourceList
from pipeline.data_store import DataStore
from pipeline.parameters import ParameterError, StepParams, param
from pipeline.step import Input, Output, Step

__all__ = ["ExtractionParams", "Extractor", "ExtractionResult", "PSFError"]


class PSFError(BadDataError):
    """The PSF could not be fitted (the image is marked BAD_PSF)."""


@dataclass(frozen=True, kw_only=True)
class ExtractionParams(StepParams):
    """How sources are found and measured and how the PSF is fitted."""

    step_name = "extraction"

    threshold: float = param(5.0, "Detection threshold: significance (in sigma) of the matched-filtered image, sep's "
        "filter_type='matched'; about 2.7x SExtractor's per-pixel DETECT_THRESH for default.conv.")
    minarea: int = param(5, "Fewest connected pixels above threshold.")
    deblend_nthresh: int = param(32, "Deblending levels (SExtractor DEBLEND_NTHRESH).")
    deblend_cont: float = param(0.005, "Deblending contrast (DEBLEND_MINCONT); 1 = no deblending.")
    aperture_multiples: tuple[float, ...] = param(
        (1.0, 2.0, 3.0, 5.0), "Aperture radii in units of the image FWHM.")
    psf_degree: int = param(3, "Polynomial degree of the PSF's variation across the chip.")
    psf_min_snr: float = param(50.0, "Only stars above this S/N build the PSF.")
    psf_max_stars: int = param(500, "At most this many PSF stars (the brightest).")
    max_sources: int = param(100_000, "Fail beyond this many detections.", affects_result=False)

    def validate(self) -> None:
        if self.threshold <= 0:
            raise ParameterError(f"extraction threshold must be > 0, got {self.threshold}")
        if not self.aperture_multiples or min(self.aperture_multiples) <= 0:
            raise ParameterError("extraction aperture_multiples must be positive, got "
                                 f"{self.aperture_multiples}")
        if not 0 <= self.psf_degree <= 4:
            raise ParameterError(f"extraction psf_degree must be 0..4, got {self.psf_degree}")


@dataclass(frozen=True)
class ExtractionResult:
    """Sources (astropy Table), PSF, FWHM in pixels and aperture radii in pixels."""

    sources: Table
    psf: PixelPSF
    fwhm_pixels: float
    aper_radii: tuple[float, ...]


def _gain(header: dict) -> float | None:
    value = header.get("GAIN") if header else None
    try:
        gain = float(value)
    except (TypeError, ValueError):
        return None
    return gain if gain > 0 else None


class Extractor(Step):
    """Make the image's `SourceList` and `PSF` (its FWHM, and the seeing, are the PSF's columns)."""

    process = "extraction"
    # 1.1: neighbours' wings beyond the model radius subtracted in the joint PSF fit
    # 1.2: no sky positions in the source list (they depend on the astrometric solution)
    version = "1.2.0"
    Params = ExtractionParams
    inputs = (Input("image"), Input("background"))
    outputs = (Output("sources", SourceList, parents={"image_id": "image", "background_id": "background"}),
               Output("psf", PSF, parents={"sources_id": "sources"}))
    badness = "BAD_PSF"
    badness_for = {TooFewSourcesError: "NO_STARS", TooFewPSFStarsError: "NO_STARS"}

    def compute(self, data: np.ndarray, *, background: np.ndarray, variance: np.ndarray,
                mask: np.ndarray, gain: float | None, saturation: float | None = None) -> ExtractionResult:
        """Detect, fit the PSF, refine the sky, find hidden neighbours, measure (arrays in).

        1. Detect on the matched-filtered image (sep "matched": ``threshold`` is in units of the
           noise of the filtered image, i.e. a detection significance).
        2. Fit the PSF to bright, isolated, unsaturated stars (`select_psf_stars`; see below).
        3. Refine the sky: the mode of the backgrounding step is raised by the sources' wings;
           the clipped mean of image - sky - PSF models (`residual_background`) is added to it
           and the PSF is refitted on the refined sky; twice, as a PSF fitted on a sky that is
           too high has wings too low, which raises the next estimate of the sky.
        4. Detect again on image - PSF models (`find_hidden_sources`): faint neighbours, 2 to
           5 FWHM from a point source and away from extended ones, that deblending merged into
           them (flag RESIDUAL); closer ones are blends (the PSF fits would share their light).
        5. Replace the windowed centroids by PSF-fit positions on the image with the
           neighbours' models subtracted (`psf_positions`; kept if within 0.5 FWHM of the
           centroid), which bright neighbours' wings do not pull.
        6. Measure apertures at ``aperture_multiples`` of the PSF model's FWHM with the model
           light of the neighbours taken out, and PSF fluxes fitted with the neighbours
           subtracted (`deblended_psf_fluxes`) and a model-based variance.
        """
        p = self.params
        detect = dict(threshold=p.threshold, minarea=p.minarea, deblend_nthresh=p.deblend_nthresh,
                      deblend_cont=p.deblend_cont, filter_type="matched", mask=mask,
                      saturation=saturation, max_sources=p.max_sources)
        noise = np.sqrt(variance)
        table = extract_sources(data, background=background, noise=noise, gain=gain, **detect)
        # sep's size estimate (twice the half-light radius) only seeds the PSF fit: for a Moffat
        # profile it is ~25% larger than the FWHM, which comes from the PSF model instead.
        guess = float(table.meta["fwhm"])
        x, y = np.asarray(table["x"], float), np.asarray(table["y"], float)
        fluxes = dict(variance=variance, mask=mask, gain=gain)     # options of deblended_psf_fluxes
        idx, psf, psf_on = _first_psf(data, table, p, background=background, noise=noise, mask=mask, gain=gain,
                                      saturation=saturation)
        for _ in range(2):      # twice: a PSF fitted on a biased sky has biased wings
            background = _refined_sky(data, x, y, psf, background, noise=noise, **fluxes)
            psf = psf_on(background)
        fwhm = float(psf.fwhm_pixels)
        radii = tuple(float(m * fwhm) for m in p.aperture_multiples)
        point = ~(np.asarray(table["fwhm"], float) > 1.3 * guess)     # not extended
        _, model = deblended_psf_fluxes(data, x, y, psf, background=background, **fluxes)
        hidden = find_hidden_sources(data, model, x, y, point_like=point,
                                     extent=2.0 * np.sqrt(table["npix"] / np.pi),
                                     background=background, variance=variance,
                                     min_separation=2.0 * fwhm, max_separation=5.0 * fwhm, point_fwhm=guess,
                                     aperture_radii=radii, gain=gain, **detect)
        del model
        table = vstack([table, hidden], metadata_conflicts="silent") if len(hidden) else table
        x, y = np.asarray(table["x"], float), np.asarray(table["y"], float)
        # PSF-fit positions on the image with the neighbours subtracted: free of their pull
        fit, model = deblended_psf_fluxes(data, x, y, psf, background=background, **fluxes)
        model = np.subtract(data, model, dtype=np.float32)      # the image minus the neighbours
        x, y = psf_positions(model, x, y, psf, background=background, variance=variance,
                             mask=mask, flux=fit.flux, max_shift=0.5 * fwhm)
        del model
        table["x"][:], table["y"][:] = x, y       # in place: the columns keep their units
        fit, model = deblended_psf_fluxes(data, x, y, psf, background=background, **fluxes)
        table = aperture_photometry(data, table, background=background, noise=noise,
                                    aperture_radii=radii, mask=mask, gain=gain)
        _remove_neighbour_light(table, model, psf, x, y, fit.flux, radii)
        table["psfflux"], table["psffluxerr"], table["psfchi2"] = fit.flux, fit.flux_err, fit.chi2
        table["is_psf_star"] = np.zeros(len(table), bool)
        table["is_psf_star"][idx] = True
        table.meta["fwhm"] = fwhm
        return ExtractionResult(sources=table, psf=psf, fwhm_pixels=fwhm, aper_radii=radii)

    def run(self, ds: DataStore) -> None:
        image, bg = ds.get_image(), ds.get_background()
        header = image.header or {}
        saturation = header.get("SATURATE")
        result = self.compute(image.data, background=bg.counts, variance=bg.variance,
                              mask=image.flags != 0, gain=_gain(header),
                              saturation=float(saturation) if saturation is not None else None)
        table = result.sources
        sources = ds.new_product(self, "sources", data=table, aper_radii=list(result.aper_radii),
                                 fwhm_pixels=result.fwhm_pixels)
        wcs = image.wcs
        scale = float(np.mean(proj_plane_pixel_scales(wcs.celestial))) * 3600.0 if wcs is not None else None
        ds.new_product(self, "psf", model=result.psf, num_stars=int(table["is_psf_star"].sum()),
                       fwhm_arcsec=result.fwhm_pixels * scale if scale else None)


    def fingerprint_figures(self, ds: DataStore) -> dict[str, Any]:
        sources, psf = ds.get_sources(), ds.get_psf()
        flux, err = sources.psffluxadu()
        ap, _ = sources.apfluxadu(1)
        clip = psf.get_clip(100.3, 200.7)
        return {**super().fingerprint_figures(ds), "psfflux_sum": float(np.nansum(flux)),
                "psffluxerr_median": float(np.nanmedian(err)), "apflux_1_sum": float(np.nansum(ap)),
                "x_mean": float(np.mean(sources.x)), "y_mean": float(np.mean(sources.y)),
                "psf_stars": int(np.sum(sources.data["is_psf_star"])), "psf_clip_peak": float(clip.max())}


def _first_psf(data: np.ndarray, table: Table, p: ExtractionParams, *, background: np.ndarray, noise: np.ndarray,
               mask: np.ndarray | None, gain: float | None,
               saturation: float | None) -> tuple[np.ndarray, PixelPSF, Callable[[np.ndarray], PixelPSF]]:
    """Choose the PSF stars and fit the PSF on the first sky.

    PSF stars have no neighbour above 5 % of their flux within 3 FWHM (closer, fainter ones are
    masked by the fit); should the fit of a few such stars fail or collapse (its FWHM far from
    the sources' sizes), those with no neighbour above 1 % within 5 FWHM.

    Returns
    -------
    idx : ndarray
        Rows of ``table`` of the PSF stars.
    psf : PixelPSF
        The PSF fitted on ``background``.
    psf_on : callable
        Fits the PSF of the same stars on another sky map.

    Raises
    ------
    PSFError, ValueError
        If too few stars qualify, or the fit of either set of stars fails or collapses.
    """
    guess = float(table.meta["fwhm"])
    x, y = np.asarray(table["x"], float), np.asarray(table["y"], float)
    flux = np.asarray(table["apflux_1"], float)
    for radius, ratio in ((3.0 * guess, 0.05), (None, 0.01)):
        chosen = select_psf_stars(x, y, flux, np.asarray(table["snr"], float), np.asarray(table["flags"]),
                                  np.asarray(table["fwhm"], float), image_shape=data.shape,
                                  min_snr=p.psf_min_snr, isolation_radius=radius, neighbor_flux_ratio=ratio,
                                  peak=np.asarray(table["peak"], float), saturation=saturation)
        idx = np.flatnonzero(chosen)[np.argsort(-flux[chosen])[:p.psf_max_stars]]
        # A small chip or a sparse field cannot constrain the PSF's variation: lower the degree.
        degree = next((d for d in range(p.psf_degree, -1, -1) if len(idx) >= min_psf_stars(d)), None)

        def psf_on(sky: np.ndarray, idx: np.ndarray = idx, degree: int | None = degree) -> PixelPSF:
            # Outlier rejection (cosmic rays, unmasked defects) can leave too few stars for the
            # degree: then a simpler model is better than none.
            for trial in range(degree, -1, -1):
                try:
                    return fit_psf(data, x[idx], y[idx], background=sky, fwhm_guess=guess, noise=noise,
                                   mask=mask, flux=flux[idx], gain=gain, degree=trial,
                                   max_stars=p.psf_max_stars)
                except ValueError:
                    if trial == 0:
                        raise

        failure = None if degree is not None else TooFewPSFStarsError(
            f"only {len(idx)} stars qualify for the PSF (S/N >= {p.psf_min_snr}, isolated, "
            f"unsaturated); need at least {min_psf_stars(0)}")
        try:
            psf = None if failure else psf_on(background)
        except ValueError as exc:      # too few stars left after rejecting outliers, or a failed fit
            failure = exc if isinstance(exc, BadDataError) else PSFError(str(exc))
        if failure is None and not 0.5 * guess < psf.fwhm_pixels < 1.5 * guess:
            failure = PSFError(f"the PSF fitted to {len(idx)} stars has a FWHM of "
                               f"{psf.fwhm_pixels:.2f} px, the sources a size of {guess:.2f} px")
        if failure is None:
            return idx, psf, psf_on
    raise failure


def _refined_sky(data: np.ndarray, x: np.ndarray, y: np.ndarray, psf: PixelPSF, background: np.ndarray, *,
                 noise: np.ndarray, variance: np.ndarray, mask: np.ndarray | None, gain: float | None) -> np.ndarray:
    """``background`` plus the clipped mean of image - sky - PSF models (`residual_background`),
    where the models are below the noise."""
    _, model = deblended_psf_fluxes(data, x, y, psf, background=background, variance=variance, mask=mask,
                                    gain=gain)
    unreliable = model > noise
    if mask is not None:
        unreliable |= np.asarray(mask, dtype=bool)
    residual = np.subtract(data, background, dtype=np.float32)
    residual -= model      # float32 is ample for a sky level
    del model
    return background + residual_background(residual, mask=unreliable).counts()


def _remove_neighbour_light(table: Table, model: np.ndarray, psf: PixelPSF, x: np.ndarray, y: np.ndarray,
                            flux: np.ndarray, radii: tuple[float, ...]) -> None:
    """Take the light of the neighbours' models out of the apertures ``apflux_<i>``: apertures on
    the model of all the sources minus those on each source's own model."""
    own = model_aperture_sums(psf, x, y, flux, radii)
    for i, radius in enumerate(radii):
        on_model = sep.sum_circle(model, x, y, radius, subpix=5)[0]
        table[f"apflux_{i}"] -= on_model - own[:, i]
