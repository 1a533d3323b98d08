"""Astrometric calibration: match sources to Gaia and fit a TAN-SIP WCS."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from improc.astrometry import AstrometryError, AstrometrySolution, solve_astrometry
from improc.extraction import SourceFlag
from models.world_coordinates import WorldCoordinates
from pipeline.catalogs import CatalogSource, isolated_stars, reference_catalog, stars_at_epoch
from pipeline.data_store import DataStore
from pipeline.parameters import ParameterError, StepParams, param
from pipeline.step import Input, Output, Step

__all__ = ["AstroCalParams", "AstroCalibrator"]


@dataclass(frozen=True, kw_only=True)
class AstroCalParams(StepParams):
    """How the astrometric solution is found."""

    step_name = "astrocal"

    catalog: Literal["gaia_folder", "gaia_dr3"] = param(
        "gaia_dr3", "Reference catalog: 'gaia_dr3' queries the Gaia archive (astroquery); "
        "'gaia_folder' reads healpix chunk files from catalog_folder.")
    catalog_folder: str | None = param(
        None, "Folder of Gaia chunk-NNNNN.fits files, for catalog 'gaia_folder'.", affects_result=False)
    mag_limit: float = param(21.0, "Faintest Gaia G used.")
    sip_order: int = param(3, "Highest SIP distortion order (1 = plain TAN).")
    min_matches: int = param(10, "Fewest matched stars accepted.")
    max_arcsec_residual: float = param(0.3, "Largest accepted rms of the fit, arcsec.")
    max_offset_arcsec: float = param(60.0, "Largest pointing error searched, arcsec.")
    max_rotation_deg: float = param(2.0, "Largest rotation error searched, degrees.")
    min_snr: float = param(5.0, "Sources fainter than this S/N are not matched.")

    def validate(self) -> None:
        if not 1 <= self.sip_order <= 5:
            raise ParameterError(f"astrocal sip_order must be 1..5, got {self.sip_order}")
        if self.min_matches < 4:
            raise ParameterError(f"astrocal min_matches must be >= 4, got {self.min_matches}")
        if self.max_arcsec_residual <= 0:
            raise ParameterError(f"astrocal max_arcsec_residual must be > 0, got {self.max_arcsec_residual}")


class AstroCalibrator(Step):
    """Make the `WorldCoordinates` of the image's sources (the image keeps the WCS it came with)."""

    process = "astrocal"
    version = "1.0.0"
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
        p = self.params
        cat_ra, cat_dec = stars_at_epoch(catalog, mjd)
        return solve_astrometry(
            x, y, flux, cat_ra, cat_dec, np.asarray(catalog["phot_g_mean_mag"], dtype=float),
            wcs_guess=wcs_guess, image_shape=image_shape, sip_order=p.sip_order,
            min_matches=p.min_matches, max_arcsec_residual=p.max_arcsec_residual,
            max_offset_arcsec=p.max_offset_arcsec, max_rotation_deg=p.max_rotation_deg)

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
        solution = self.compute(sources.x[good], sources.y[good], flux[good], isolated_stars(excerpt.data),
                                mjd=image.mjd, wcs_guess=image.wcs, image_shape=(image.ny, image.nx))
        ds.new_product(self, "wcs", wcs=solution.wcs, rms_arcsec=float(solution.rms_arcsec),
                       num_stars=int(solution.n_matches), catalog=excerpt.catalog,
                       catalog_excerpt_id=excerpt.id)

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
