"""The reference of a DataStore's image, with its calibration, put on the image's pixel grid.

Subtraction and cutting both need the reference warped onto the new image's grid
(`improc.alignment.warp_image`, with both fitted WCSs, never the raw headers) and the flux ratio
of the two zero points.  It is a pure function of stored products, computed once per DataStore
and kept in its scratch space (never saved), so a step that runs alone recomputes the same
arrays.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from improc.alignment import Warped, warp_image
from improc.errors import BadDataError

__all__ = ["AlignedReference", "aligned_reference", "reference_products"]


@dataclass(frozen=True, eq=False)
class AlignedReference:
    """A reference with its calibration products, and its pixels on the new image's grid.

    ``flux_ratio`` is F_r / F_n = 10**(0.4 (zp_ref - zp_new)): the reference's ADU per ADU of the
    new image for one source.
    """

    reference: object
    image: object
    background: object
    psf: object
    wcs: object
    zp: object
    warped: Warped
    flux_ratio: float
    #: "stars" (fitted from the stars both images measured) or "zero_points".
    flux_ratio_from: str = "zero_points"


def reference_products(ds, reference) -> tuple:
    """The reference's image, background, PSF, WCS and zero point (the ones it pins)."""
    from models.background import Background
    from models.psf import PSF
    from models.world_coordinates import WorldCoordinates
    from models.zero_point import ZeroPoint

    with ds.context.session() as session:
        return (reference.image, session.get(Background, reference.background_id),
                session.get(PSF, reference.psf_id), session.get(WorldCoordinates, reference.wcs_id),
                session.get(ZeroPoint, reference.zp_id))


#: Fewest stars shared by both images for a fitted flux ratio (else the zero points give it).
MIN_RATIO_STARS = 5
#: Sources of the two images closer than this match, arcsec.
MATCH_RADIUS_ARCSEC = 0.5


def _flux_ratio(ds, reference, wcs, ref_wcs, zp, ref_zp) -> tuple[float, str]:
    """F_r / F_n from the PSF fluxes of the stars both images measured; from the zero points when
    fewer than `MIN_RATIO_STARS` are shared."""
    from improc.flux_ratio import fit_flux_ratio
    from improc.matching import match_sky
    from models.source_list import SourceList

    new_sources = ds.get_sources()
    with ds.context.session() as session:
        ref_sources = session.get(SourceList, reference.sources_id)
    ra, dec = new_sources.radec(wcs)
    ref_ra, ref_dec = ref_sources.radec(ref_wcs)
    i, j, _ = match_sky(ra, dec, ref_ra, ref_dec, radius_arcsec=MATCH_RADIUS_ARCSEC)
    flux, err = new_sources.psffluxadu()
    ref_flux, ref_err = ref_sources.psffluxadu()
    clean = (np.asarray(new_sources.data["flags"])[i] == 0) & (np.asarray(ref_sources.data["flags"])[j] == 0)
    fit = fit_flux_ratio(flux[i][clean], err[i][clean], ref_flux[j][clean], ref_err[j][clean])
    if fit.n_stars >= MIN_RATIO_STARS:
        return fit.ratio, "stars"
    return float(10 ** (0.4 * (ref_zp.zp - zp.zp))), "zero_points"


def aligned_reference(ds) -> AlignedReference:
    """The DataStore's reference warped onto its image's grid (computed once per DataStore).

    Raises
    ------
    BadDataError
        No zero point on either image (the flux ratio is unknown), or the fitted WCSs put the
        reference off the new image.
    """
    reference, image, wcs, zp = ds.get_reference(), ds.get_image(), ds.get_wcs(), ds.get_zp()
    key = ("aligned_reference", reference.id, wcs.id, zp.id)
    held = ds.scratch.get("aligned_reference")
    if held is not None and held[0] == key:
        return held[1]
    ref_image, ref_bg, ref_psf, ref_wcs, ref_zp = reference_products(ds, reference)
    pair = f"new image {image.describe()} and reference image {ref_image.describe()}"
    for which, z in (("new image", zp), ("reference", ref_zp)):
        if z.zp is None:
            raise BadDataError(f"{pair}: the {which} has no zero point ({z.note}), so their flux ratio "
                               "is unknown", badness="BAD_SUBTRACTION")
    # a coadd's pixels are correlated: what a PSF-sized filter sees is its white weight
    white = ref_image.extra("WHITE_WEIGHT")
    ref_weight = ref_image.weight if white is None else np.asarray(white, dtype=np.float32)
    warped = warp_image(ref_image.data - ref_bg.counts, ref_weight, ref_image.flags,
                        source_wcs=ref_wcs.wcs, target_wcs=wcs.wcs, target_shape=(image.ny, image.nx))
    covered = float(np.mean(warped.weight > 0))
    if covered < 0.01:
        raise BadDataError(f"{pair}: their fitted WCSs put the reference off the new image (it covers "
                           f"{covered:.1%} of it)", badness="BAD_SUBTRACTION", figures={"covered": covered})
    ratio, origin = _flux_ratio(ds, reference, wcs, ref_wcs, zp, ref_zp)
    aligned = AlignedReference(reference=reference, image=ref_image, background=ref_bg, psf=ref_psf, wcs=ref_wcs,
                               zp=ref_zp, warped=warped, flux_ratio=ratio, flux_ratio_from=origin)
    ds.scratch["aligned_reference"] = (key, aligned)
    return aligned
