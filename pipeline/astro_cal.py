"""Astrometric calibration: match sources to Gaia and fit a TAN-SIP WCS."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from improc.astrometry import AstrometryError, AstrometrySolution, solve_astrometry
from improc.extraction import SourceFlag
from models.quality import QualityFlag
from models.world_coordinates import WorldCoordinates
from pipeline.catalogs import CatalogSource, isolated_stars, reference_catalog, stars_at_epoch
from pipeline.data_store import DataStore
from pipeline.parameters import ParameterError, StepParams, param
from pipeline.step import Input, Output, Step

__all__ = ["AstroCalParams", "AstroCalibrator"]


@dataclass(frozen=True, kw_only=True)
class AstroCalParams(StepParams):
    """How the astrometric solution is found, and how far it may degrade with few stars.

    With ``min_matches`` matched stars or more, a TAN-SIP WCS is fitted (TAN when too few for
    distortion); with fewer, the image's own WCS is shifted and rotated to 2-3 stars, shifted to
    one (``simplest_model`` "shift"), or kept as it is when none matches ("header") -- each such
    solution flagged (`models.quality.QualityFlag`) with its uncertainty stated
    (`improc.astrometry` documents the ladder and the error model).
    """

    step_name = "astrocal"

    catalog: Literal["gaia_folder", "gaia_dr3"] = param(
        "gaia_dr3", "Reference catalog: 'gaia_dr3' queries the Gaia archive (astroquery); "
        "'gaia_folder' reads healpix chunk files from catalog_folder.")
    catalog_folder: str | None = param(
        None, "Folder of Gaia chunk-NNNNN.fits files, for catalog 'gaia_folder'.", affects_result=False)
    mag_limit: float = param(21.0, "Faintest Gaia G used.")
    sip_order: int = param(3, "Highest SIP distortion order (1 = plain TAN).")
    min_matches: int = param(10, "Fewest matched stars for a fitted WCS (TAN or TAN-SIP).")
    simplest_model: Literal["tan", "shift_rotation", "shift", "header"] = param(
        "header", "How far to degrade with fewer than min_matches stars: 'tan' not at all (an error), "
        "'shift_rotation' the header WCS moved to 2+ stars, 'shift' also to one star, 'header' also "
        "the header WCS as it is when no star matches.")
    max_arcsec_residual: float = param(0.3, "Largest accepted rms of a fitted WCS, arcsec.")
    max_offset_arcsec: float = param(60.0, "Largest pointing error searched, arcsec.")
    max_rotation_deg: float = param(2.0, "Largest rotation error searched, degrees.")
    max_scale_error: float = param(0.02, "Largest fractional pixel-scale error searched.")
    min_snr: float = param(5.0, "Sources fainter than this S/N are not matched.")
    n_bright: int = param(50, "Brightest sources (and catalog stars) that the triangle matcher uses.")
    n_bright_few: int = param(10, "Brightest sources that propose matches with 1-3 stars.")
    match_radius_arcsec: float = param(2.0, "Sources and catalog stars closer than this match.")
    clip_sigma: float = param(3.0, "Outlier rejection threshold of the fit, in robust sigma.")
    max_clip_iter: int = param(5, "Most iterations of outlier rejection.")
    stars_per_term: float = param(2.0, "Matched stars needed per fitted coefficient and axis for distortion.")
    rematch_rounds: int = param(2, "Rounds of matching again with the fitted WCS.")
    rematch_rms_factor: float = param(5.0, "Radius of those matches, in units of the fit's rms.")
    min_rematch_radius_arcsec: float = param(0.5, "Smallest radius of those matches, arcsec.")
    centroid_err_px: float = param(0.1, "Per-axis centroid error of a source, pixels (error model).")
    systematic_err_arcsec: float = param(0.02, "Per-axis error added to every star, arcsec (error model).")
    header_scale_err: float = param(2e-4, "Fractional error of the header's pixel scale, which "
                                    "shift and rotation keep (error model).")
    header_rotation_err_deg: float = param(0.02, "Error of the header's rotation, which a shift keeps, "
                                           "degrees (error model).")
    header_uncertainty_arcsec: float = param(5.0, "Stated uncertainty of the header WCS kept when no "
                                             "star matches (it cannot be measured).")
    header_fit_tol_arcsec: float = param(0.001, "Accuracy of a moved header WCS re-expressed as TAN-SIP, arcsec.")

    def validate(self) -> None:
        if not 1 <= self.sip_order <= 5:
            raise ParameterError(f"astrocal sip_order must be 1..5, got {self.sip_order}")
        if self.min_matches < 4:
            raise ParameterError(f"astrocal min_matches must be >= 4, got {self.min_matches}")
        if self.max_arcsec_residual <= 0:
            raise ParameterError(f"astrocal max_arcsec_residual must be > 0, got {self.max_arcsec_residual}")
        if self.header_uncertainty_arcsec <= 0:
            raise ParameterError("astrocal header_uncertainty_arcsec must be > 0, got "
                                 f"{self.header_uncertainty_arcsec}")


class AstroCalibrator(Step):
    """Make the `WorldCoordinates` of the image's sources (the image keeps the WCS it came with)."""

    process = "astrocal"
    # 1.1: fewer than min_matches stars degrade to a corrected or kept header WCS
    # 1.2: when the brightest catalog stars are saturated in the image (dense fields), the pattern
    #      match slides to fainter ones instead of falling back to the few-star solution
    version = "1.2.0"
    Params = AstroCalParams
    inputs = (Input("image"), Input("sources"))
    outputs = (Output("wcs", WorldCoordinates, parents={"sources_id": "sources"}),)
    badness = "BAD_ASTROMETRY"

    def catalog_source(self) -> CatalogSource:
        return CatalogSource(kind=self.params.catalog, folder=self.params.catalog_folder,
                             mag_limit=self.params.mag_limit)

    def compute(self, x: np.ndarray, y: np.ndarray, flux: np.ndarray, catalog, *, mjd: float,
                wcs_guess, image_shape: tuple[int, int]) -> AstrometrySolution:
        """Solve the astrometry of sources (x, y, flux) against catalog stars (a Gaia table)."""
        cat_ra, cat_dec = stars_at_epoch(catalog, mjd)
        simplest = "shift" if self.params.simplest_model == "header" else self.params.simplest_model
        return solve_astrometry(
            x, y, flux, cat_ra, cat_dec, np.asarray(catalog["phot_g_mean_mag"], dtype=float),
            wcs_guess=wcs_guess, image_shape=image_shape,
            **{**self.params.kwargs_for(solve_astrometry), "simplest_model": simplest})

    def run(self, ds: DataStore) -> None:
        image, sources = ds.get_image(), ds.get_sources()
        table = sources.data
        # flags that leave a centroid sound do not exclude a source (as SCAMP's default
        # FLAGS_MASK): deblended from a neighbour, or an aperture crossing an edge or a mask
        harmless = (SourceFlag.MERGED | SourceFlag.APER_TRUNCATED | SourceFlag.APER_HAS_MASKED
                    | SourceFlag.APER_ALL_MASKED | SourceFlag.APER_NONPOSITIVE)
        good = (((np.asarray(table["flags"]) & ~int(harmless)) == 0)
                & (np.asarray(table["snr"]) >= self.params.min_snr))
        flux = np.asarray(table["psfflux"] if "psfflux" in table.colnames else table["apflux_1"])
        if image.wcs is None:
            raise AstrometryError(f"image {image.describe()} has no header WCS to start from")
        excerpt = reference_catalog(image, self.catalog_source(), context=ds.context, cache=ds.persist)
        # stars with a comparably bright neighbour are blends at ground-based seeing
        try:
            solution = self.compute(sources.x[good], sources.y[good], flux[good], isolated_stars(excerpt.data),
                                    mjd=image.mjd, wcs_guess=image.wcs, image_shape=(image.ny, image.nx))
        except AstrometryError as exc:
            if self.params.simplest_model != "header":
                raise
            # nothing matched: the image's own WCS is the best there is; say so, and how good it may be
            ds.new_product(self, "wcs", wcs=image.wcs, rms_arcsec=None, num_stars=0,
                           catalog=excerpt.catalog, catalog_excerpt_id=excerpt.id, model="header",
                           uncertainty_arcsec=self.params.header_uncertainty_arcsec,
                           quality_flags=int(QualityFlag.WCS_HEADER_ONLY), note=str(exc)[:500])
            return
        corrected = solution.model in ("shift_rotation", "shift")
        ds.new_product(self, "wcs", wcs=solution.wcs, rms_arcsec=float(solution.rms_arcsec),
                       num_stars=int(solution.n_matches), catalog=excerpt.catalog,
                       catalog_excerpt_id=excerpt.id, model=solution.model,
                       uncertainty_arcsec=float(solution.uncertainty_arcsec), chi2=float(solution.chi2),
                       dof=int(solution.dof),
                       quality_flags=int(QualityFlag.WCS_HEADER_CORRECTED) if corrected else 0)

    def fingerprint_figures(self, ds: DataStore) -> dict[str, Any]:
        # where the fitted WCS puts three pixels, in mas from where the image's own WCS puts them
        image, wcs = ds.get_image(), ds.get_wcs().wcs
        x = np.array([0.0, image.nx / 2.0, image.nx - 1.0])
        y = np.array([0.0, image.ny / 2.0, image.ny - 1.0])
        ra, dec = wcs.pixel_to_world_values(x, y)
        ra0, dec0 = image.wcs.pixel_to_world_values(x, y)
        dra = (np.asarray(ra) - ra0 + 180.0) % 360.0 - 180.0
        return {**super().fingerprint_figures(ds),
                "offset_ra_mas": [float(v) for v in dra * np.cos(np.radians(dec0)) * 3.6e6],
                "offset_dec_mas": [float(v) for v in (np.asarray(dec) - dec0) * 3.6e6]}
