"""Referencing: register a calibrated image (usually a coadd) as the reference of its footprint.

Run in the DataStore of the image to register, after its calibration: the `Reference` pins that
image's background, sources, PSF, WCS and zero point, and takes its footprint from the fitted
WCS.  New images find it by a query (`models.reference.Reference.find_for`), with the
``min_overlap`` of this step's provenance: the reference set decides how much of a new image it
must cover.  ``seechange make-ref`` (`pipeline.make_ref`) builds the coadd and runs this step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from improc import footprint
from improc.errors import BadDataError
from models.quality import QualityFlag
from models.reference import Reference
from pipeline.data_store import DataStore
from pipeline.parameters import ParameterError, StepParams, param
from pipeline.step import Input, Output, Step

__all__ = ["ReferencingParams", "Referencer", "find_reference", "NoReferenceError"]


class NoReferenceError(BadDataError):
    """No usable reference covers a new image (the message says what exists and why it does not
    qualify)."""


@dataclass(frozen=True, kw_only=True)
class ReferencingParams(StepParams):
    """Which images may be references, and how new images choose among them."""

    step_name = "referencing"

    min_overlap: float = param(0.85, "Smallest fraction of a new image a reference must cover.")
    require_calibrated: bool = param(
        True, "Refuse an image whose zero point is uncalibrated or whose WCS is only its header's.")

    def validate(self) -> None:
        if not 0.0 < self.min_overlap <= 1.0:
            raise ParameterError(f"referencing min_overlap must be in (0, 1], got {self.min_overlap}")


def find_reference(ds: DataStore, provenance) -> Reference | None:
    """The reference of ``provenance`` for the DataStore's image (`Reference.find_for`)."""
    image = ds.get_image()
    with ds.context.session() as session:
        return Reference.find_for(image, provenance.id, min_overlap=provenance.parameters["min_overlap"],
                                  session=session)


def why_no_reference(ds: DataStore, provenance) -> str:
    """What references exist near the DataStore's image and why none qualifies (for messages)."""
    from sqlalchemy import select

    image = ds.get_image()
    min_overlap = provenance.parameters["min_overlap"]
    ra, dec = image.corners
    _, _, mindec, maxdec = (float(v[0]) for v in footprint.polygon_bounds(ra, dec))
    with ds.context.session() as session:
        near = session.scalars(select(Reference).where(
            Reference.provenance_id == provenance.id, Reference.mindec <= maxdec,
            Reference.maxdec >= mindec)).all()
    near = [r for r in near if r.image_id != image.id]
    if not near:
        return f"no reference of provenance {provenance.id} near the image"
    parts = []
    for r in near[:5]:
        overlap = r.overlap_with(image)
        reasons = []
        if r.filter != image.filter:
            reasons.append(f"filter {r.filter}, not {image.filter}")
        if overlap < min_overlap:
            reasons.append(f"covers {overlap:.0%} < min_overlap {min_overlap:.0%}")
        if r.is_bad:
            reasons.append(f"marked bad ({r.bad_reason})")
        if not r.valid_at(image.mjd):
            reasons.append("not valid at the image's date")
        parts.append(f"reference image {str(r.image_id)[:8]}: {', '.join(reasons) or 'usable'}")
    return "; ".join(parts)


class Referencer(Step):
    """Register the DataStore's calibrated image as a `Reference`."""

    process = "referencing"
    version = "1.0.0"
    Params = ReferencingParams
    inputs = (Input("image"), Input("background"), Input("sources"), Input("psf"), Input("wcs"),
              Input("zp"))
    outputs = (Output("reference", Reference,
                      parents={"image_id": "image", "background_id": "background", "sources_id": "sources",
                               "psf_id": "psf", "wcs_id": "wcs", "zp_id": "zp"},
                      found_by=find_reference),)

    def run(self, ds: DataStore) -> None:
        image, psf, wcs, zp = ds.get_image(), ds.get_psf(), ds.get_wcs(), ds.get_zp()
        if self.params.require_calibrated:
            if zp.zp is None:
                raise BadDataError(f"image {image.describe()} has no calibrated zero point ({zp.note}); "
                                   "a reference needs one", badness="BAD_PHOTOMETRY")
            if wcs.quality_flags & QualityFlag.WCS_HEADER_ONLY:
                raise BadDataError(f"image {image.describe()} has only its header's WCS; a reference "
                                   "needs a fitted one", badness="BAD_ASTROMETRY")
        ra, dec = footprint.corners_from_wcs((image.ny, image.nx), wcs.wcs)
        reference = ds.new_product(self, "reference", instrument=image.instrument, filter=image.filter,
                                   section_id=image.section_id, target=image.target,
                                   lim_mag=zp.lim_mag, fwhm_arcsec=psf.fwhm_arcsec)
        reference.set_corners(np.asarray(ra), np.asarray(dec))
