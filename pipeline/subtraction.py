"""Subtraction: the ZOGY difference of a new image and its reference (`improc.zogy`).

The reference (`pipeline.referencing`: found by a query among the references whose provenance
carries the tag ``reference_tag``) is warped onto the new image's grid with both fitted WCSs
(`pipeline.reference_alignment`), its PSF expressed on that grid, and the pair subtracted in
tiles, each with its own PSFs.  The product is an `Image` of type difference on the new image's
grid and in its ADU -- a PSF fit of P_D on it gives a transient's flux in the new image, so the
new image's WCS and zero point apply to it -- with extra planes ``SCORE`` (S_corr, in standard
deviations; detection reads it, so it can be redone without subtracting again), ``PSF_D`` and
``PSF_TILES`` (P_D per tile, `improc.zogy.TiledPSF`) and ``FLUX_D`` (F_D per tile).

The flux ratio F_r / F_n comes from the PSF fluxes of the stars both images measured (zero points
from a catalog are far less precise), else from the zero points (`pipeline.reference_alignment`).
The registration noise entering S_corr is measured from the bright sources both images measured,
carried through the WCSs used (moved by the fitted offset when registered on the sources): their
scatter about zero beyond their centroid errors (`improc.registration.registration_sigma`); with
fewer than 3 such sources, the two fitted WCSs' stated uncertainties in quadrature (``REGSIGF``
says which).  Header cards
of the difference say how: ``FLUXRATF`` (stars or zero_points), ``REGFROM`` (wcs or sources).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from scipy import ndimage

from improc.alignment import local_jacobian, psf_on_grid, warp_noise_power
from improc.errors import BadDataError
from improc.registration import registration_sigma
from improc.zogy import TiledPSF, ZogyResult, residual_background, zogy_subtract
from models.image import Image, ImageType
from pipeline.data_store import DataStore
from pipeline.parameters import ParameterError, StepParams, param
from pipeline.reference_alignment import aligned_reference
from pipeline.referencing import NoReferenceError, why_no_reference
from pipeline.step import Input, Output, Step

__all__ = ["SubtractionParams", "Subtractor", "difference_psf"]


@dataclass(frozen=True, kw_only=True)
class SubtractionParams(StepParams):
    """How the difference image is made."""

    step_name = "subtraction"

    reference_tag: str = param(
        "references", "Tag of the referencing provenance whose references new images are compared with "
        "(`seechange make-ref` tags it); the provenance itself enters the subtraction's.", affects_result=False)
    registration: Literal["auto", "wcs", "sources"] = param(
        "auto", "'wcs': the two fitted WCSs as they are; 'sources': also register the images on the sources "
        "both measured (the offset the WCSs miss); 'auto': 'sources' when a WCS was not fitted to a catalog.")
    tile_size: int = param(384, "Largest side of a ZOGY tile's core, pixels (a 2048-pixel side is cut into 6 tiles "
                           "of 341-342); each tile has its own PSFs (at the tile's centre).  S_corr is correlated "
                           "over the PSF's area, so the standard deviation over a tile scatters from chance alone: "
                           "by 0.02 for 256-pixel tiles (white noise through the same subtraction put 13 of 512 "
                           "such tiles outside 1.00 +- 0.05), 0.011 for these; 512-pixel tiles follow the PSF's "
                           "variation too coarsely for D's PSF fluxes (pulls 1.06 -> 1.08-1.11 with a sharper new "
                           "image), these keep them (1.05 / 1.06 over eight fields).")
    mask_dilation_fwhm: float = param(1.0, "Half-side, in FWHM of the broader PSF, over which bad pixels "
                                      "spread their flags in the difference.")
    hidden_light_nsigma: float = param(3.0, "Bad pixels hiding light spread their flags to where that light, "
                                       "spread by the broader PSF, falls below this many sigma.")
    background_box: int = param(64, "Mesh, pixels, of the smooth background removed from D and S_corr after "
                                "subtraction (the two skies' residual offsets; 0: none).")
    background_filter: int = param(3, "Median filter, in boxes, over D's background mesh (odd; 1: none).")
    score_background_filter: int = param(1, "Median filter, in boxes, over S_corr's background mesh (odd; 1: none, "
                                         "so that boxes at the chip's edges and flagged borders keep their own "
                                         "level).")
    min_registration_sigma_px: float = param(0.0, "Least registration noise per axis in S_corr, pixels "
                                             "(added to what the WCS uncertainties give).")

    def validate(self) -> None:
        if self.tile_size < 16:
            raise ParameterError(f"subtraction tile_size must be >= 16, got {self.tile_size}")
        if self.background_box != 0 and self.background_box < 8:
            raise ParameterError(f"subtraction background_box must be 0 or >= 8, got {self.background_box}")
        for name in ("background_filter", "score_background_filter"):
            if getattr(self, name) < 1 or getattr(self, name) % 2 == 0:
                raise ParameterError(f"subtraction {name} must be odd and >= 1, got {getattr(self, name)}")
        if self.mask_dilation_fwhm < 0 or self.hidden_light_nsigma <= 0 or self.min_registration_sigma_px < 0:
            raise ParameterError("subtraction mask_dilation_fwhm and min_registration_sigma_px must be >= 0 "
                                 "and hidden_light_nsigma > 0")


def _pixel_scale_arcsec(wcs) -> float:
    return float(np.sqrt(abs(np.linalg.det(wcs.pixel_scale_matrix))) * 3600.0)


def _registration_sigma(ds: DataStore, aligned, wcs) -> tuple[float, str]:
    """Registration noise (pixels of the new image, both axes) and where it came from.

    "psf stars": the scatter of the PSF stars (bright, isolated, point-like) both images
    measured, carried through the WCSs used (`improc.registration.registration_sigma`, the
    larger axis): fainter sources, blends and galaxies scatter by more than their stated
    centroid errors (on a simulated pair whose true registration error is 0.013 px, sources of
    S/N >= 10 gave 0.14 px and the PSF stars 0); "sources" the bright sources when fewer than
    `MIN_RATIO_STARS` PSF stars pair up; "wcs" both fitted WCSs' stated uncertainties in
    quadrature when too few of those do either.
    """
    from pipeline.reference_alignment import MIN_RATIO_STARS, bright_sources

    new_sources, ref_sources = ds.get_sources(), aligned.sources
    new_data, ref_data = new_sources.data, ref_sources.data
    selections = []
    if "is_psf_star" in new_data.colnames and "is_psf_star" in ref_data.colnames:
        selections.append(("psf stars", np.asarray(new_data["is_psf_star"], bool),
                           np.asarray(ref_data["is_psf_star"], bool)))
    selections.append(("sources", bright_sources(new_sources), bright_sources(ref_sources)))
    for origin, a, b in selections:
        ra, dec = aligned.solution.pixel_to_world_values(ref_sources.x[b], ref_sources.y[b])
        x_pred, y_pred = wcs.wcs.world_to_pixel_values(ra, dec)
        sx, sy, n = registration_sigma(
            x_pred, y_pred, new_sources.x[a], new_sources.y[a],
            err_pred=(np.asarray(ref_data["x_err"])[b], np.asarray(ref_data["y_err"])[b]),
            err_meas=(np.asarray(new_data["x_err"])[a], np.asarray(new_data["y_err"])[a]))
        if n >= MIN_RATIO_STARS and np.isfinite(sx) and np.isfinite(sy):
            return float(max(sx, sy)), origin
    scale = _pixel_scale_arcsec(wcs.wcs)
    sigma = float(np.hypot(wcs.uncertainty_arcsec or 0.0, aligned.wcs.uncertainty_arcsec or 0.0)) / scale
    origin = "wcs"
    return float(sigma), origin


def difference_psf(image: Image) -> TiledPSF:
    """P_D of a difference image made by `Subtractor`, from its extra planes."""
    stamps, tiles = image.extra("PSF_D"), image.extra("PSF_TILES")
    if stamps is None or tiles is None:
        raise ValueError(f"image {image.describe()} has no PSF_D planes: it is not a ZOGY difference")
    return TiledPSF(stamps=np.asarray(stamps, dtype=float), tiles=np.asarray(tiles, dtype=int))


class Subtractor(Step):
    """Make the difference image of the DataStore's image and its reference."""

    process = "subtraction"
    # 1.1: registration on the sources where a WCS was not fitted; flux ratio from stars with PSF
    # fluxes sound (aperture flags ignored), point-like, S/N >= 10 in both images
    # 1.2: the registration noise of S_corr measured from the stars both images measured (their
    # scatter about zero beyond their centroid errors), no longer the WCSs' stated uncertainties
    # (0.29 px stated where 0.11 px was true, which halved S_corr on galaxies)
    # 1.3: ... from the PSF stars both images measured (sources of S/N >= 10, blends and galaxies
    # among them, gave 0.14 px where 0.013 px was true); the residual smooth background of D and
    # S_corr removed (64-px mesh: the two skies' offsets moved S_corr's tile means by -0.6..+0.3)
    # 1.4: PSF clips rendered with extraction 1.6's shift matrices (D differs from 1.3 by rounding);
    #      S_corr's residual background mesh is not median-filtered (score_background_filter 1): a
    #      3 x 3 filter left offsets of +1 sigma along the chip's edges.  D's keeps its filter: its
    #      PSF fluxes feel the unfiltered mesh's noise (faint transients' pulls 1.06 -> 1.09).
    #      The meshes' busy pixels: the (already spread) flags as they are, only the sources grown
    #      by 2 FWHM; growing the flags again left the boxes between a saturated star and the
    #      chip's edge mostly busy, with S_corr at -0.9 there
    # 1.6: ZOGY tiles of at most 384 pixels (341-342 on a 2048-pixel side), were 256: each tile's
    #      S_corr std within 1.00 +- 0.05 beyond chance (144 / 144 tiles on eight fields); pulls and
    #      bias as before.  (1.5 was 512-pixel tiles, reverted.)
    version = "1.6.0"
    Params = SubtractionParams
    inputs = (Input("image"), Input("background"), Input("psf"), Input("wcs"), Input("zp"),
              Input("reference", tag_param="reference_tag"))
    outputs = (Output("sub_image", Image, parents={"new_image_id": "image", "reference_id": "reference"}),)
    badness = "BAD_SUBTRACTION"
    badness_for = {NoReferenceError: "NO_REFERENCE"}

    def compute(self, new: tuple[np.ndarray, np.ndarray, np.ndarray], new_psf, aligned, new_wcs,
                astrometric_sigma: tuple[float, float]) -> ZogyResult:
        """ZOGY of the new image's (sky-subtracted data, weight, flags) and the aligned reference."""
        p = self.params
        ref_wcs, target_wcs = aligned.solution, new_wcs
        ny, nx = new[0].shape
        jacobian = local_jacobian(nx / 2.0, ny / 2.0, source_wcs=ref_wcs, target_wcs=target_wcs)
        ref_model = aligned.psf.model
        return zogy_subtract(
            new[0], aligned.warped.data, new_weight=new[1], ref_weight=aligned.warped.white_weight,
            new_flags=new[2], ref_flags=aligned.warped.flags, new_psf=new_psf,
            ref_psf=lambda x, y: psf_on_grid(ref_model, x, y, source_wcs=ref_wcs, target_wcs=target_wcs),
            flux_ratio=aligned.flux_ratio, ref_noise_power=functools.partial(warp_noise_power, jacobian=jacobian),
            astrometric_sigma=astrometric_sigma, tile_size=p.tile_size, mask_dilation_fwhm=p.mask_dilation_fwhm,
            hidden_light_nsigma=p.hidden_light_nsigma)

    def without_residual_background(self, result: ZogyResult, fwhm: float) -> tuple[np.ndarray, np.ndarray]:
        """D and S_corr of ``result`` less their smooth residual backgrounds (`background_box`;
        ``fwhm``: the new image's PSF FWHM, pixels)."""
        data, score_corr = result.data, result.score_corr
        if not self.params.background_box:
            return data, score_corr
        # bad pixels out, and sources to 2 FWHM of the new image's PSF (the flags were spread
        # already: growing them again would leave the boxes beside a saturated star mostly
        # busy, and their offsets uncorrected)
        grow = int(np.ceil(2.0 * fwhm))
        sources = ndimage.maximum_filter((np.abs(score_corr) > 4.0).view(np.uint8), size=2 * grow + 1)
        busy = (result.flags != 0) | sources.astype(bool)
        box = self.params.background_box
        data = data - residual_background(data, busy, box=box, filter_size=self.params.background_filter)
        score_corr = score_corr - residual_background(score_corr, busy, box=box,
                                                      filter_size=self.params.score_background_filter)
        return data, score_corr

    def run(self, ds: DataStore) -> None:
        image, bg, psf, wcs = ds.get_image(), ds.get_background(), ds.get_psf(), ds.get_wcs()
        if ds.get_reference() is None:
            raise NoReferenceError(f"no reference for image {image.describe()} in filter {image.filter}: "
                                   f"{why_no_reference(ds, ds.provenance('referencing'))}")
        aligned = aligned_reference(ds)
        new_flags = image.flags
        if not np.any((new_flags == 0) & (image.weight > 0) & (aligned.warped.weight > 0)):
            raise BadDataError(f"new image {image.describe()} and reference image {aligned.image.describe()}: "
                               "no pixel is good in both")
        sigma, sigma_from = _registration_sigma(ds, aligned, wcs)
        sigma = float(np.hypot(sigma, self.params.min_registration_sigma_px))
        try:
            result = self.compute((image.data - bg.counts, image.weight, new_flags), psf.model, aligned, wcs.wcs,
                                  (sigma, sigma))
        except ValueError as exc:
            raise BadDataError(f"new image {image.describe()} and reference image {aligned.image.describe()}: "
                               f"{exc}") from exc
        data, score_corr = self.without_residual_background(result, psf.model.fwhm_pixels)
        sub = ds.new_product(self, "sub_image", data=data, weight=result.weight, flags=result.flags,
                             wcs=wcs.wcs, instrument=image.instrument, type=ImageType.DIFFERENCE,
                             section_id=image.section_id, filter=image.filter, mjd=image.mjd,
                             end_mjd=image.end_mjd, exp_time=image.exp_time, airmass=image.airmass,
                             target=image.target, project=image.project,
                             header={"SKYSUB": True, "FLUXRAT": aligned.flux_ratio,
                                     "FLUXRATF": aligned.flux_ratio_from, "REGSIGMA": sigma,
                                     "REGSIGF": sigma_from,
                                     "REGFROM": "sources" if aligned.shift is not None else "wcs",
                                     **({"REGDX": aligned.shift.dx, "REGDY": aligned.shift.dy,
                                         "REGNSTAR": aligned.shift.n} if aligned.shift is not None else {}),
                                     "REFIMAGE": str(aligned.image.id)})
        sub.set_extra("SCORE", score_corr)
        sub.set_extra("PSF_D", result.psf_d.astype(np.float32))
        sub.set_extra("PSF_TILES", result.tiles.astype(np.int32))
        sub.set_extra("FLUX_D", result.flux_d.astype(np.float64))

    def fingerprint_figures(self, ds: DataStore) -> dict[str, Any]:
        sub = ds.get_sub_image()
        good = sub.flags == 0
        return {"flagged": int(np.sum(~good)), "data_std": float(np.std(sub.data[good] * np.sqrt(sub.weight[good]))),
                "score_std": float(np.std(sub.extra("SCORE")[good]))}
