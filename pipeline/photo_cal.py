"""Photometric calibration: zero point against Gaia, aperture corrections, limiting magnitude
(`improc.photometric_calibration`).

Catalog magnitudes in the image's band come from the image's instrument's Gaia-to-band
transformation (`models.instrument.Instrument.transforms`); a band without one is calibrated on G
with a fitted colour term and flagged BAND_UNCALIBRATED.  The transformations enter the
provenance by content: one photocal provenance covers the images of every instrument, so its
parameters record every known instrument's table digest (``band_transforms``,
`models.instrument.transform_digests`), and a run refuses a provenance that recorded another
table for the image's instrument than it has now.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from improc.color_transforms import BandTransform
from improc.photometric_calibration import PhotometricCalibration, calibrate_photometry
from improc.photometry import PhotometryError
from improc.psf_photometry import model_aperture_sums
from models.instrument import Instrument, get_instrument, transform_digests
from models.provenance import Provenance
from models.quality import QualityFlag
from models.zero_point import ZeroPoint
from pipeline.catalogs import CatalogSource, isolated_stars, reference_catalog, stars_at_epoch
from pipeline.data_store import DataStore
from pipeline.parameters import ParameterError, StepParams, param
from pipeline.step import Input, Output, Step
from util.config import ConfigError

if TYPE_CHECKING:
    from models.context import Context

__all__ = ["PhotoCalParams", "PhotoCalibrator"]


@dataclass(frozen=True, kw_only=True)
class PhotoCalParams(StepParams):
    """How the zero point is measured, and how far it may degrade with few calibrators.

    With ``min_stars`` calibrators or more, a clipped fit; with fewer (down to ``fewest_stars``),
    an unclipped mean whose error includes ``star_scatter_mag`` (flagged ZP_FEW_STARS); with none,
    ``uncalibrated`` "allow" makes a zero point without a value (flagged ZP_UNCALIBRATED) so the
    image goes on; "fail" marks it BAD_PHOTOMETRY.
    """

    step_name = "photocal"

    catalog: Literal["gaia_folder", "gaia_dr3"] = param(
        "gaia_dr3", "Reference catalog, as for astrocal.")
    catalog_folder: str | None = param(None, "Folder of Gaia chunk files, for 'gaia_folder'.",
                                       affects_result=False)
    mag_limit: float = param(21.0, "Faintest Gaia G read from the catalog.")
    match_radius_arcsec: float = param(1.0, "Sources and catalog stars closer than this match.")
    min_snr: float = param(20.0, "Only sources above this PSF-flux S/N calibrate.")
    max_size_fwhm: float = param(2.0, "Only sources at most this many PSF FWHM in size (point-like) calibrate.")
    bright_limit_g: float = param(15.0, "Catalog stars brighter than this G are left out (saturation).")
    color_term: Literal["none", "fit"] = param(
        "none", "'fit' also fits a linear term in Gaia BP-RP on top of the band transformation "
        "(always fitted for a band its instrument has no transformation for).")
    clip_sigma: float = param(3.0, "Outlier rejection threshold of the fit.")
    error_floor: float = param(0.01, "Magnitude error added in quadrature to every calibrator.")
    min_stars: int = param(5, "Fewest calibrators for an ordinary (clipped) zero point (>= 2).")
    fewest_stars: int = param(1, "Fewest calibrators for any zero point (flagged ZP_FEW_STARS below min_stars).")
    star_scatter_mag: float = param(0.03, "Scatter of calibrators about the zero point assumed with fewer than "
                                    "min_stars, mag (enters the error).")
    min_apcor_stars: int = param(3, "Fewest calibrators that measure the aperture corrections; with fewer, "
                                 "they come from the PSF model.")
    flux_type: Literal["auto", "psf"] = param(
        "auto", "'auto' measures the zero point on the largest aperture when PSF fluxes disagree with it "
        "(a poor PSF model; flagged PHOTOMETRY_APERTURE); 'psf' always on PSF fluxes.")
    uncalibrated: Literal["allow", "fail"] = param(
        "allow", "With fewer than fewest_stars calibrators: 'allow' makes a zero point without a value "
        "(flagged ZP_UNCALIBRATED), 'fail' marks the image BAD_PHOTOMETRY.")
    limit_snr: float = param(5.0, "S/N of the limiting magnitude.")

    def validate(self) -> None:
        if self.match_radius_arcsec <= 0:
            raise ParameterError(f"photocal match_radius_arcsec must be > 0, got {self.match_radius_arcsec}")
        if self.min_stars < 2:
            raise ParameterError(f"photocal min_stars must be >= 2, got {self.min_stars}")
        if not 1 <= self.fewest_stars <= self.min_stars:
            raise ParameterError(f"photocal fewest_stars must be in [1, min_stars = {self.min_stars}], "
                                 f"got {self.fewest_stars}")


class PhotoCalibrator(Step):
    """Make the image's `ZeroPoint` (zero point, aperture corrections, limiting magnitude)."""

    process = "photocal"
    # 1.1: aperture corrections from the PSF model with fewer than 3 calibrators
    # 1.2: few calibrators give a flagged zero point, none an uncalibrated one; aperture fallback
    # 1.3: the band transformation is the instrument's (not DECam's for every camera's band name);
    #      a band without one gets a fitted colour term and BAND_UNCALIBRATED; the calibrators and
    #      the transformation are recorded on the ZeroPoint
    # 1.4: clipping never tighter than the calibrators' own errors (with 8 stars, four agreeing to
    #      2 mmag clipped the rest at 1-3 sigma and the fit failed)
    # 1.5: model aperture sums from clips laid out in mosaics (rounding-level changes)
    version = "1.5.0"
    Params = PhotoCalParams
    inputs = (Input("image"), Input("background"), Input("sources"), Input("psf"), Input("wcs"))
    outputs = (Output("zp", ZeroPoint, parents={"image_id": "image", "wcs_id": "wcs", "psf_id": "psf",
                                                "background_id": "background"}),)
    badness = "BAD_PHOTOMETRY"

    def provenance_parameters(self, context: Context | None = None) -> dict[str, Any]:
        """The parameters, and every known instrument's transformation table by content (see the
        module docstring): changing any instrument's table makes a new provenance."""
        return {**self.params.hashed(), "band_transforms": transform_digests(context)}

    def compute(self, sources, psf, wcs, catalog, *, transform: BandTransform | None, mjd: float,
                sky_rms: float, psf_stamp: np.ndarray) -> PhotometricCalibration:
        """Calibrate a source list (with its PSF and WCS) against catalog stars (a Gaia table),
        with the camera's transformation to the image's band (None: it has none)."""
        table = sources.data
        flux, err = sources.psffluxadu()
        n_ap = len(sources.aper_radii)
        apfluxes = np.column_stack([sources.apfluxadu(i)[0] for i in range(n_ap)])
        aperrs = np.column_stack([sources.apfluxadu(i)[1] for i in range(n_ap)])
        ra, dec = sources.radec(wcs)
        cat_ra, cat_dec = stars_at_epoch(catalog, mjd)
        x, y = sources.x, sources.y

        def fractions(rows: np.ndarray) -> np.ndarray:
            return model_aperture_sums(psf.model, x[rows], y[rows], 1.0, sources.aper_radii)

        return calibrate_photometry(
            flux, err, apfluxes, apflux_errs=aperrs, flags=np.asarray(table["flags"]),
            size=np.asarray(table["fwhm"], float), ra=ra, dec=dec, fwhm_pixels=sources.fwhm_pixels,
            catalog_ra=cat_ra, catalog_dec=cat_dec,
            catalog_g=np.asarray(catalog["phot_g_mean_mag"], float),
            catalog_bp=np.asarray(catalog["phot_bp_mean_mag"], float),
            catalog_rp=np.asarray(catalog["phot_rp_mean_mag"], float), transform=transform, sky_rms=sky_rms,
            psf_stamp=psf_stamp, model_fractions=fractions, **self.params.kwargs_for(calibrate_photometry))

    def run(self, ds: DataStore) -> None:
        image, sources, psf, wcs, bg = (ds.get_image(), ds.get_sources(), ds.get_psf(), ds.get_wcs(),
                                        ds.get_background())
        p = self.params
        source = CatalogSource(kind=p.catalog, folder=p.catalog_folder, mag_limit=p.mag_limit)
        transform = self.band_transform(get_instrument(image.instrument, context=ds.context), image.filter,
                                        ds.provenance(self.process))
        band_flag = QualityFlag(0) if transform is not None else QualityFlag.BAND_UNCALIBRATED
        recorded = transform.as_dict() if transform is not None else None
        catalog = isolated_stars(reference_catalog(image, source, context=ds.context, cache=ds.persist).data)
        try:
            result = self.compute(sources, psf, wcs, catalog, transform=transform, mjd=image.mjd,
                                  sky_rms=bg.rms_median, psf_stamp=psf.get_clip(image.nx / 2.0, image.ny / 2.0))
        except PhotometryError as exc:
            if p.uncalibrated != "allow" or exc.figures.get("n_stars", 1) >= p.fewest_stars:
                raise
            # no calibrator: say so with a product, so that the image goes on (no zero point)
            ds.new_product(self, "zp", zp=None, dzp=None, color_term=None, num_stars=0, scatter=None,
                           aper_radii=list(sources.aper_radii), aper_cors=[], lim_mag=None,
                           quality_flags=int(QualityFlag.ZP_UNCALIBRATED | band_flag), note=str(exc)[:500],
                           band_transform=recorded)
            return
        flags = band_flag
        if result.few_stars:
            flags |= QualityFlag.ZP_FEW_STARS
        if result.flux_from == "aperture":
            flags |= QualityFlag.PHOTOMETRY_APERTURE
        fit = result.fit
        ds.new_product(self, "zp", zp=fit.zp, dzp=fit.dzp, color_term=fit.color_term, num_stars=fit.n_stars,
                       scatter=fit.scatter, aper_radii=list(sources.aper_radii),
                       aper_cors=[float(c) for c in result.aper_cors], lim_mag=result.lim_mag,
                       quality_flags=int(flags), flux_from=result.flux_from, band_transform=recorded,
                       calibrators=_calibrators(result, catalog))

    def fingerprint_figures(self, ds: DataStore) -> dict[str, Any]:
        """The ZeroPoint's numbers, and figures of its calibrator records (a JSON column)."""
        figures = super().fingerprint_figures(ds)
        stars = ds.get_zp().calibrators or {}
        used = np.asarray(stars.get("used", []), dtype=bool)
        residual = np.array([np.nan if r is None else r for r in stars.get("residual", [])], dtype=float)
        figures["zp.calibrators.n_matched"] = int(used.size)
        figures["zp.calibrators.n_used"] = int(used.sum())
        if used.any():
            figures["zp.calibrators.residual_rms"] = float(np.sqrt(np.nanmean(residual[used] ** 2)))
        return figures

    @staticmethod
    def band_transform(instrument: Instrument, band: str, provenance: Provenance) -> BandTransform | None:
        """The instrument's transformation for ``band`` (None: it has none), once the provenance
        is seen to have recorded this instrument's table as it is now.

        Raises
        ------
        ConfigError
            The provenance (e.g. a tag's, made before the table changed) recorded another table
            for the instrument: its results would be labelled with the wrong transformation.
        """
        recorded = (provenance.parameters or {}).get("band_transforms", {}).get(instrument.name)
        current = instrument.transforms_digest()
        if recorded != current:
            raise ConfigError(f"photocal provenance {provenance.id} recorded band transformations "
                              f"{recorded or 'none'} for instrument {instrument.name}, which now has "
                              f"{current or 'none'}: make a new provenance tree (and tag) for it")
        return instrument.band_transform(band)


def _calibrators(result: PhotometricCalibration, catalog) -> dict[str, list]:
    """The calibrators' JSON columns with their Gaia source ids (see `models.zero_point.ZeroPoint`)."""
    records = result.star_records()
    rows = records.pop("catalog_row")
    if "source_id" in catalog.colnames:
        records["gaia_source_id"] = [int(catalog["source_id"][i]) for i in rows]
    else:
        records["catalog_row"] = rows
    return records
