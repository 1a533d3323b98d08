"""Extraction: sources (sep), their PSF model, and PSF fluxes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from astropy.table import Table
from astropy.wcs.utils import proj_plane_pixel_scales

from improc.extraction import aperture_photometry, extract_sources
from improc.psf import PixelPSF, fit_psf, min_psf_stars
from improc.psf_photometry import psf_fluxes, render_sources, select_psf_stars
from models.psf import PSF
from models.source_list import SourceList
from pipeline.data_store import DataStore
from pipeline.parameters import ParameterError, StepParams, param
from pipeline.step import Step

__all__ = ["ExtractionParams", "Extractor", "ExtractionResult", "PSFError"]


class PSFError(ValueError):
    """Too few good stars to fit a PSF."""


@dataclass(frozen=True, kw_only=True)
class ExtractionParams(StepParams):
    """How sources are found and measured and how the PSF is fitted."""

    step_name = "extraction"

    threshold: float = param(5.0, "Detection threshold, in sigma of the background noise.")
    minarea: int = param(5, "Fewest connected pixels above threshold.")
    deblend_nthresh: int = param(32, "Deblending levels (SExtractor DEBLEND_NTHRESH).")
    deblend_cont: float = param(0.005, "Deblending contrast (DEBLEND_MINCONT); 1 = no deblending.")
    aperture_multiples: tuple[float, ...] = param(
        (1.0, 2.0, 3.0, 5.0), "Aperture radii in units of the image FWHM.")
    psf_degree: int = param(2, "Polynomial degree of the PSF's variation across the chip.")
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
    """Make the image's `SourceList` and `PSF`; write the FWHM into the image."""

    process = "extraction"
    version = "1.0.0"
    Params = ExtractionParams
    products = ("sources", "psf")
    upstream_processes = ("backgrounding",)

    def compute(self, data: np.ndarray, *, background: np.ndarray, variance: np.ndarray,
                mask: np.ndarray, gain: float | None, saturation: float | None = None) -> ExtractionResult:
        """Detect, measure apertures, fit the PSF, and measure PSF fluxes (arrays in)."""
        p = self.params
        noise = np.sqrt(variance)
        table = extract_sources(data, background=background, noise=noise, mask=mask,
                                threshold=p.threshold, minarea=p.minarea,
                                deblend_nthresh=p.deblend_nthresh, deblend_cont=p.deblend_cont,
                                gain=gain, saturation=saturation, max_sources=p.max_sources)
        # sep's size estimate (twice the half-light radius) only seeds the PSF fit: for a Moffat
        # profile it is ~25% larger than the FWHM, which comes from the PSF model instead.
        size = float(table.meta["fwhm"])
        x, y = np.asarray(table["x"], float), np.asarray(table["y"], float)
        flux = np.asarray(table["apflux_1"], float)
        chosen = select_psf_stars(x, y, flux, np.asarray(table["snr"], float),
                                  np.asarray(table["flags"]), np.asarray(table["fwhm"], float),
                                  image_shape=data.shape, min_snr=p.psf_min_snr,
                                  peak=np.asarray(table["peak"], float), saturation=saturation)
        order = np.argsort(-flux[chosen])[:p.psf_max_stars]
        idx = np.flatnonzero(chosen)[order]
        # A small chip or a sparse field cannot constrain the PSF's variation: lower the degree.
        degree = next((d for d in range(p.psf_degree, -1, -1) if len(idx) >= min_psf_stars(d)), None)
        if degree is None:
            raise PSFError(f"only {len(idx)} stars qualify for the PSF (S/N >= {p.psf_min_snr}, "
                           f"isolated, unsaturated); need at least {min_psf_stars(0)}")
        psf = fit_psf(data, x[idx], y[idx], background=background, fwhm_guess=size, noise=noise,
                      mask=mask, flux=flux[idx], gain=gain, degree=degree,
                      max_stars=p.psf_max_stars)
        fwhm = psf.fwhm_pixels
        radii = tuple(float(m * fwhm) for m in p.aperture_multiples)
        table = aperture_photometry(data, table, background=background, noise=noise,
                                    aperture_radii=radii, mask=mask, gain=gain)
        # Weights from the sky plus a smooth model of the sources, never from the noisy pixels.
        first = psf_fluxes(data, x, y, psf, background=background, variance=variance, mask=mask)
        if gain is not None:
            variance = variance + render_sources(data.shape, x, y, first.flux, psf) / gain
        final = psf_fluxes(data, x, y, psf, background=background, variance=variance, mask=mask)
        table["psfflux"], table["psffluxerr"], table["psfchi2"] = final.flux, final.flux_err, final.chi2
        table["is_psf_star"] = np.zeros(len(table), bool)
        table["is_psf_star"][idx] = True
        return ExtractionResult(sources=table, psf=psf, fwhm_pixels=fwhm, aper_radii=radii)

    def run(self, ds: DataStore) -> None:
        image, bg = ds.get_image(), ds.get_background()
        if ds.get_sources() is not None and ds.get_psf() is not None:
            return
        header = image.header or {}
        saturation = header.get("SATURATE")
        try:
            result = self.compute(image.data, background=bg.counts, variance=bg.variance,
                                  mask=image.flags != 0, gain=_gain(header),
                                  saturation=float(saturation) if saturation is not None else None)
        except PSFError:
            image.set_badness("BAD_PSF")
            ds.save_and_commit()
            raise
        table = result.sources
        wcs = image.wcs
        if wcs is not None:
            table["ra"], table["dec"] = wcs.pixel_to_world_values(table["x"], table["y"])
            scale = float(np.mean(proj_plane_pixel_scales(wcs.celestial))) * 3600.0
            image.fwhm_estimate = result.fwhm_pixels * scale
        else:
            table["ra"] = table["dec"] = np.full(len(table), np.nan)
        prov = ds.provenance(self.process)
        sources = SourceList(data=table, image=image, provenance_id=prov.id,
                             aper_radii=list(result.aper_radii), fwhm_pixels=result.fwhm_pixels)
        psf = PSF(model=result.psf, sources=sources, image=image, provenance_id=prov.id,
                  num_stars=int(table["is_psf_star"].sum()))
        ds.set_product("sources", sources)
        ds.set_product("psf", psf)
