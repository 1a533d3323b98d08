"""Extraction: sources, their PSF model, PSF and aperture fluxes (`improc.source_measurement`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from astropy.wcs.utils import proj_plane_pixel_scales

from improc.extraction import TooFewSourcesError
from improc.psf_fit import TooFewPSFStarsError
from improc.source_measurement import PSFError, SourceMeasurement, check_options, measure_sources
from models.image import header_gain
from models.psf import PSF
from models.quality import QualityFlag
from models.source_list import SourceList
from pipeline.data_store import DataStore
from pipeline.parameters import ParameterError, StepParams, param
from pipeline.step import Input, Output, Step

__all__ = ["ExtractionParams", "Extractor", "PSFError"]


@dataclass(frozen=True, kw_only=True)
class ExtractionParams(StepParams):
    """How sources are found and measured and how the PSF is fitted (`improc.source_measurement`
    describes the algorithm each parameter belongs to)."""

    step_name = "extraction"

    threshold: float = param(5.0, "Detection threshold: significance (in sigma) of the matched-filtered image, sep's "
        "filter_type='matched'; about 2.7x SExtractor's per-pixel DETECT_THRESH for default.conv.")
    minarea: int = param(5, "Fewest connected pixels above threshold.")
    deblend_nthresh: int = param(32, "Deblending levels (SExtractor DEBLEND_NTHRESH).")
    deblend_cont: float = param(0.005, "Deblending contrast (DEBLEND_MINCONT); 1 = no deblending.")
    filter_type: Literal["matched", "conv"] = param(
        "matched", "Detection filter: 'matched' divides the filtered image by its own noise (sep); 'conv' "
        "compares it with threshold x noise as SExtractor does.")
    min_fwhm_sources: int = param(5, "Fewest clean sources with S/N >= 20 that measure the sources' size.")
    aperture_multiples: tuple[float, ...] = param(
        (1.0, 2.0, 3.0, 5.0), "Aperture radii in units of the PSF's FWHM.")
    psf_degree: int = param(3, "Polynomial degree of the PSF's variation across the chip.")
    psf_stars_per_term: float = param(10.0, "Fewest PSF stars per term of the PSF's spatial polynomial for a degree "
                                      ">= 1 (fewer lower the degree; 3, 6, 10 terms for degrees 1, 2, 3).")
    psf_min_snr: float = param(50.0, "Only stars above this S/N build the PSF.")
    psf_max_stars: int = param(500, "At most this many PSF stars (the brightest).")
    psf_isolation_radius_fwhm: float = param(
        3.0, "A PSF star has no neighbour above psf_neighbor_flux_ratio of its flux within this many "
        "FWHM (also its least distance from the edges).")
    psf_neighbor_flux_ratio: float = param(0.05, "Flux ratio (neighbour / star) from which a neighbour spoils a PSF star.")
    psf_fallback_isolation_radius_fwhm: float = param(
        5.0, "Isolation radius of the PSF stars when the first set's fit fails or collapses, in units of the "
        "candidates' median size.")
    psf_fallback_neighbor_flux_ratio: float = param(0.01, "Flux ratio from which a neighbour spoils a fallback PSF star.")
    psf_min_fwhm_ratio: float = param(0.5, "A PSF with a FWHM below this many times the sources' size has collapsed.")
    psf_max_fwhm_ratio: float = param(1.5, "A PSF with a FWHM above this many times the sources' size has collapsed.")
    sky_refinement_iterations: int = param(1, "Times the sky is refined from the PSF models' residuals, "
                                           "and the PSF refitted.")
    sky_model_nsigma: float = param(1.0, "Pixels where the PSF models exceed this many times the sky noise "
                                    "are left out of the residual sky.")
    sky_refinement_box_size: int = param(128, "Mesh box of the residual sky, pixels (at most the image's sides).")
    extended_size_ratio: float = param(1.3, "Sources larger than this many times the sources' size are extended.")
    extended_extent_factor: float = param(2.0, "No hidden neighbour is searched within this many times "
                                          "sqrt(area / pi) of an extended source.")
    hidden_min_separation_fwhm: float = param(2.0, "Hidden neighbours are searched from this many FWHM of a "
                                              "point source (closer ones are blends) ...")
    hidden_max_separation_fwhm: float = param(5.0, "... to this many FWHM.")
    max_centroid_shift_fwhm: float = param(0.5, "A PSF-fit position further than this many FWHM from the "
                                           "windowed centroid is not used.")
    psf_fallback: Literal["moffat", "none"] = param(
        "moffat", "With at most moffat_max_stars PSF stars, or when the pixel fits fail, 'moffat' fits an "
        "elliptical Moffat to the stars there are (a Moffat of the sources' size, or of nominal_fwhm_arcsec, "
        "when there are none), flagged PSF_PARAMETRIC or PSF_DEFAULT; 'none' fails (NO_STARS, BAD_PSF).")
    moffat_max_stars: int = param(5, "With this many PSF stars or fewer, a Moffat rather than a pixel model.")
    moffat_beta: float | None = param(None, "Fix the Moffat's beta (null: fitted when the stars constrain it).")
    default_beta: float = param(3.5, "Beta of the Moffat when no star can be fitted.")
    nominal_fwhm_arcsec: float | None = param(
        1.2, "Seeing assumed when too few sources measure the sources' size (with psf_fallback 'moffat'); "
        "null: such images fail (NO_STARS).")
    max_sources: int = param(100_000, "Fail beyond this many detections.", affects_result=False)

    def validate(self) -> None:
        try:
            check_options(**self.kwargs_for(measure_sources))
        except ValueError as exc:
            raise ParameterError(f"extraction {exc}") from None


class Extractor(Step):
    """Make the image's `SourceList` and `PSF` (its FWHM, and the seeing, are the PSF's columns)."""

    process = "extraction"
    # 1.1: neighbours' wings beyond the model radius subtracted in the joint PSF fit
    # 1.2: no sky positions in the source list (they depend on the astrometric solution)
    # 1.3: a Moffat PSF for fields with too few stars for a pixel model
    # 1.4: the pixel PSF's wings beyond 3 FWHM are its azimuthal mean profile (they were noise
    #      summing to -15 % .. +30 % of the flux, which ZOGY turned into residuals around bright stars)
    # 1.5: the PSF's spatial degree needs 10 stars per polynomial term (30 stars took a cubic
    #      whose FWHM swung from 5.5 to 10 px where few stars were); the wings' Moffat tail is
    #      fitted from 2 FWHM out to the stamp's edge (not 4 FWHM), as far as the stars measure it
    # 1.6: PSF clips moved by shift matrices, not FFTs; crowded photometry by conjugate gradients
    #      (same figures; values differ from 1.5 in the 10th-13th digit)
    # 1.7: hidden neighbours searched for under the last sky refinement's source models (one
    #      joint PSF fit of every source less)
    # 1.8: one sky refinement, not two (the second moved PSF fluxes by <= 0.04 %; one joint PSF
    #      fit and one PSF fit less); the hidden-source search on the sky its models were fitted on;
    #      the PSF positions fitted under the search's models (and the hidden sources' own fits),
    #      not under a joint fit of every source (one joint PSF fit less)
    version = "1.8.0"
    Params = ExtractionParams
    inputs = (Input("image"), Input("background"))
    outputs = (Output("sources", SourceList, parents={"image_id": "image", "background_id": "background"}),
               Output("psf", PSF, parents={"sources_id": "sources"}))
    badness = "BAD_PSF"
    badness_for = {TooFewSourcesError: "NO_STARS", TooFewPSFStarsError: "NO_STARS"}

    def compute(self, data: np.ndarray, *, background: np.ndarray, variance: np.ndarray,
                mask: np.ndarray, gain: float | None, saturation: float | None = None,
                pixel_scale: float | None = None) -> SourceMeasurement:
        """Sources and PSF of one image, arrays in (`improc.source_measurement.measure_sources`).

        ``pixel_scale`` (arcsec/pixel) turns ``nominal_fwhm_arcsec`` into pixels.
        """
        nominal = self.params.nominal_fwhm_arcsec
        default_fwhm = nominal / pixel_scale if nominal is not None and pixel_scale else None
        return measure_sources(data, background=background, variance=variance, mask=mask, gain=gain,
                               saturation=saturation, default_fwhm=default_fwhm,
                               **self.params.kwargs_for(measure_sources))

    def run(self, ds: DataStore) -> None:
        image, bg = ds.get_image(), ds.get_background()
        header = image.header or {}
        saturation = header.get("SATURATE")
        wcs = image.wcs
        scale = float(np.mean(proj_plane_pixel_scales(wcs.celestial))) * 3600.0 if wcs is not None else None
        result = self.compute(image.data, background=bg.counts, variance=bg.variance,
                              mask=image.flags != 0, gain=header_gain(header),
                              saturation=float(saturation) if saturation is not None else None,
                              pixel_scale=scale)
        table = result.sources
        ds.new_product(self, "sources", data=table, aper_radii=list(result.aper_radii),
                       fwhm_pixels=result.fwhm_pixels)
        flags = {"pixel": 0, "moffat": QualityFlag.PSF_PARAMETRIC, "moffat_default": QualityFlag.PSF_DEFAULT}
        moffat = result.moffat
        ds.new_product(self, "psf", model=result.psf, num_stars=int(table["is_psf_star"].sum()),
                       fwhm_arcsec=result.fwhm_pixels * scale if scale else None, kind=result.psf_kind,
                       beta=float(moffat.beta) if moffat is not None else None,
                       quality_flags=int(flags[result.psf_kind]))

    def fingerprint_figures(self, ds: DataStore) -> dict[str, Any]:
        sources, psf = ds.get_sources(), ds.get_psf()
        flux, err = sources.psffluxadu()
        ap, _ = sources.apfluxadu(1)
        clip = psf.get_clip(100.3, 200.7)
        return {**super().fingerprint_figures(ds), "psfflux_sum": float(np.nansum(flux)),
                "psffluxerr_median": float(np.nanmedian(err)), "apflux_1_sum": float(np.nansum(ap)),
                "x_mean": float(np.mean(sources.x)), "y_mean": float(np.mean(sources.y)),
                "psf_stars": int(np.sum(sources.data["is_psf_star"])), "psf_clip_peak": float(clip.max())}
