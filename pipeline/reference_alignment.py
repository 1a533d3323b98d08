"""The reference of a DataStore's image, with its calibration, put on the image's pixel grid.

Subtraction and cutting both need the reference warped onto the new image's grid
(`improc.alignment.warp_image`, with both fitted WCSs, never the raw headers) and the flux ratio
F_r / F_n.  Where a WCS could not be fitted to a catalog (``subtraction.registration`` "auto"),
or always ("sources"), the two images are registered to each other from the sources both
measured: the offset the WCSs miss (`improc.registration.fit_shift`) moves the reference's WCS,
and the scatter about it is the registration noise.  The flux ratio comes from the stars both
measured (`improc.flux_ratio`), else from the zero points: a field without a catalog is
calibrated relative to its reference.  It is a pure function of stored products, computed once per DataStore
and kept in its scratch space (never saved), so a step that runs alone recomputes the same
arrays.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from improc.alignment import Warped, warp_image
from improc.errors import BadDataError

__all__ = ["AlignedReference", "aligned_reference", "reference_products", "white_weight", "source_shift", "star_flux_ratio", "moved",
           "fitted_to_catalog", "bright_sources"]


@dataclass(frozen=True, eq=False)
class AlignedReference:
    """A reference with its calibration products, and its pixels on the new image's grid.

    ``flux_ratio`` is F_r / F_n = 10**(0.4 (zp_ref - zp_new)): the reference's ADU per ADU of the
    new image for one source.
    """

    reference: object
    image: object
    background: object
    sources: object
    psf: object
    wcs: object
    zp: object
    warped: Warped
    flux_ratio: float
    #: "stars" (fitted from the stars both images measured) or "zero_points".
    flux_ratio_from: str = "zero_points"
    #: The offset (reference pixels) added to the reference WCS by registering the images on their
    #: sources, or None when the fitted WCSs were used as they are.
    shift: object = None
    #: The reference's WCS as used (its fitted one, moved by ``shift`` if any).
    solution: object = None


def white_weight(image) -> np.ndarray:
    """The weight of an image's noise as a PSF-sized filter sees it: a coadd's pixels are
    correlated, so its ``WHITE_WEIGHT`` plane (`pipeline.coaddition`); else its weight."""
    white = image.extra("WHITE_WEIGHT")
    return image.weight if white is None else np.asarray(white, dtype=np.float32)


def reference_products(ds, reference) -> tuple:
    """The reference's image, background, sources, PSF, WCS and zero point (the ones it pins)."""
    from models.background import Background
    from models.psf import PSF
    from models.source_list import SourceList
    from models.world_coordinates import WorldCoordinates
    from models.zero_point import ZeroPoint

    with ds.context.session() as session:
        return (reference.image, session.get(Background, reference.background_id),
                session.get(SourceList, reference.sources_id), session.get(PSF, reference.psf_id),
                session.get(WorldCoordinates, reference.wcs_id), session.get(ZeroPoint, reference.zp_id))


#: Fewest stars shared by both images for a fitted flux ratio (else the zero points give it) and
#: for registering them on their sources.
MIN_RATIO_STARS = 3
#: Least S/N, in both images, of a star that enters the flux ratio.
RATIO_MIN_SNR = 10.0
#: Sources of the two images closer than this match, arcsec.
MATCH_RADIUS_ARCSEC = 0.5


def fitted_to_catalog(wcs) -> bool:
    """Whether a WorldCoordinates was fitted to a catalog (not the header's, moved or not)."""
    from models.quality import QualityFlag

    return not (wcs.quality_flags & (QualityFlag.WCS_HEADER_ONLY | QualityFlag.WCS_HEADER_CORRECTED))


def _registration_mode(ds) -> str:
    try:
        return ds.provenance("subtraction").parameters.get("registration", "auto")
    except Exception:   # (a DataStore whose tree has no subtraction: the WCSs as they are)
        return "wcs"


def _psf_usable(sources) -> np.ndarray:
    """Sources whose PSF flux and centroid are sound (aperture flags do not matter here)."""
    from improc.extraction import SourceFlag

    bad = SourceFlag.TRUNCATED | SourceFlag.DEBLEND_OVERFLOW | SourceFlag.MASKED | SourceFlag.SATURATED
    return (np.asarray(sources.data["flags"]) & int(bad)) == 0


def bright_sources(sources, min_snr: float = 10.0) -> np.ndarray:
    return _psf_usable(sources) & (np.asarray(sources.data["snr"], dtype=float) >= min_snr)


def source_shift(sources, solution, other_sources, other_solution):
    """The offset, in pixels of the other image, between where the WCSs put the sources of one
    image on the other and where the other measured them (`improc.registration.fit_shift`).

    ``solution`` and ``other_solution`` are astropy WCSs of the two images."""
    from improc.registration import fit_shift

    use, other_use = bright_sources(sources), bright_sources(other_sources)
    ra, dec = solution.pixel_to_world_values(sources.x[use], sources.y[use])
    x_pred, y_pred = other_solution.world_to_pixel_values(ra, dec)
    return fit_shift(x_pred, y_pred, other_sources.x[other_use], other_sources.y[other_use])


def moved(solution, shift):
    """A copy of an astropy WCS whose pixel positions are moved by a `fit_shift` offset."""
    solution = solution.deepcopy()
    solution.wcs.crpix = [solution.wcs.crpix[0] + shift.dx, solution.wcs.crpix[1] + shift.dy]
    return solution


def star_flux_ratio(sources, solution, other_sources, other_solution):
    """The flux ratio other / this of the stars both images measured (`improc.flux_ratio`),
    matched through their WCSs (astropy WCSs)."""
    from improc.flux_ratio import fit_flux_ratio
    from improc.matching import match_sky

    ra, dec = (np.asarray(v, dtype=float) for v in solution.pixel_to_world_values(sources.x, sources.y))
    o_ra, o_dec = (np.asarray(v, dtype=float)
                   for v in other_solution.pixel_to_world_values(other_sources.x, other_sources.y))
    i, j, _ = match_sky(ra, dec, o_ra, o_dec, radius_arcsec=MATCH_RADIUS_ARCSEC)
    flux, err = sources.psffluxadu()
    o_flux, o_err = other_sources.psffluxadu()
    clean = _psf_usable(sources)[i] & _psf_usable(other_sources)[j]
    if "is_star" in sources.data.colnames and "is_star" in other_sources.data.colnames:
        # galaxies' PSF fluxes change with the seeing: stars only
        clean &= np.asarray(sources.data["is_star"])[i] & np.asarray(other_sources.data["is_star"])[j]
    return fit_flux_ratio(flux[i][clean], err[i][clean], o_flux[j][clean], o_err[j][clean], min_snr=RATIO_MIN_SNR)


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
    ref_image, ref_bg, ref_sources, ref_psf, ref_wcs, ref_zp = reference_products(ds, reference)
    sources = ds.get_sources()
    pair = f"new image {image.describe()} and reference image {ref_image.describe()}"
    ref_solution, shift = ref_wcs.wcs, None
    mode = _registration_mode(ds)
    if mode == "sources" or (mode == "auto" and not (fitted_to_catalog(wcs) and fitted_to_catalog(ref_wcs))):
        shift = source_shift(sources, wcs.wcs, ref_sources, ref_wcs.wcs)
        if shift.n < MIN_RATIO_STARS:
            raise BadDataError(f"{pair}: a WCS was not fitted to a catalog and only {shift.n} sources both "
                               f"measured register them (at least {MIN_RATIO_STARS} needed)",
                               badness="BAD_SUBTRACTION", figures={"n_registration": shift.n})
        ref_solution = moved(ref_solution, shift)
    fit = star_flux_ratio(sources, wcs.wcs, ref_sources, ref_solution)
    ratio, origin = fit.ratio, "stars"
    if fit.n_stars < MIN_RATIO_STARS:
        for which, z in (("new image", zp), ("reference", ref_zp)):
            if z.zp is None:
                raise BadDataError(f"{pair}: the {which} has no zero point ({z.note}) and too few stars both "
                                   "measured give their flux ratio", badness="BAD_SUBTRACTION")
        ratio, origin = float(10 ** (0.4 * (ref_zp.zp - zp.zp))), "zero_points"
    warped = warp_image(ref_image.data - ref_bg.counts, white_weight(ref_image), ref_image.flags,
                        source_wcs=ref_solution, target_wcs=wcs.wcs, target_shape=(image.ny, image.nx))
    covered = float(np.mean(warped.weight > 0))
    if covered < 0.01:
        raise BadDataError(f"{pair}: their fitted WCSs put the reference off the new image (it covers "
                           f"{covered:.1%} of it)", badness="BAD_SUBTRACTION", figures={"covered": covered})
    aligned = AlignedReference(reference=reference, image=ref_image, background=ref_bg, sources=ref_sources,
                               psf=ref_psf,
                               wcs=ref_wcs, zp=ref_zp, warped=warped, flux_ratio=ratio, flux_ratio_from=origin,
                               shift=shift, solution=ref_solution)
    ds.scratch["aligned_reference"] = (key, aligned)
    return aligned
