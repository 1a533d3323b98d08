"""Make a reference: find component images, coadd them, calibrate the coadd, register it.

::

    made = make_reference(context, ra=150.1, dec=2.2, filter="r", max_seeing=1.2)
    made.reference, made.coadd, made.components

This is what ``seechange make-ref`` runs.  Steps, in the context's configuration:

1. the component images: the given ids, else `models.image.Image.find_images` -- science images
   containing (ra, dec) in the filter, within the dates, no worse than ``max_seeing`` (the
   seeing of their PSF in the configuration's tree);
2. their calibration (backgrounding through photocal), made now where it is missing;
3. the coadd (`pipeline.coaddition.Coadder`), or the stored one of these components;
4. the coadd's own calibration, and its registration as a `Reference` (`pipeline.referencing`);
5. the referencing provenance, with the coadd's chain, tagged ``subtraction.reference_tag``: the
   pipeline's subtraction finds its references through that tag.

Validity dates (``valid_from_mjd``, ``valid_until_mjd``) are set on the registered reference.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from models.context import Context
from models.image import Image, ImageType
from models.provenance import ProvenanceTag
from models.reference import Reference
from pipeline.coaddition import CALIBRATION_PROCESSES, Coadder
from pipeline.data_store import DataStore
from pipeline.step import step_class
from pipeline.top import Pipeline
from util.config import ConfigError

__all__ = ["make_reference", "make_coadd", "MadeReference", "NoComponentsError"]


class NoComponentsError(LookupError):
    """No image qualifies as a component of the reference (the message says what was asked)."""


@dataclass
class MadeReference:
    """What `make_reference` made or found."""

    reference: Reference
    coadd: Image
    components: list[Image] = field(default_factory=list)
    tag: str = ""

    def describe(self) -> str:
        ref = self.reference
        depth = f"limit {ref.lim_mag:.2f}" if ref.lim_mag is not None else "no limit"
        seeing = f'seeing {ref.fwhm_arcsec:.2f}"' if ref.fwhm_arcsec is not None else "no seeing"
        return (f"reference {ref.id} ({ref.filter}, {depth}, {seeing}) on coadd {self.coadd.id} of "
                f"{len(self.components)} image(s); referencing provenance {ref.provenance_id} tagged "
                f"'{self.tag}'")


def _calibration_steps(context: Context) -> list:
    config = context.config
    return [step_class(p)(config=config) for p in CALIBRATION_PROCESSES]


def find_components(context: Context, *, ra: float | None = None, dec: float | None = None,
                    filter: str | None = None, start_mjd: float | None = None, end_mjd: float | None = None,
                    max_seeing: float | None = None, image_ids=None, tag: str | None = None) -> list[Image]:
    """The component images: the given ids, else the science images at (ra, dec) in the filter."""
    with context.session() as session:
        if image_ids:
            images = []
            for text in image_ids:
                image = session.get(Image, _uuid(text))
                if image is None:
                    raise NoComponentsError(f"no image with id {text}")
                images.append(image)
            return images
        if ra is None or dec is None or filter is None:
            raise ConfigError("make-ref needs --ra, --dec and --filter, or --images")
        if max_seeing is not None and tag is None:
            raise ConfigError("--max-seeing reads the seeing of the images' PSFs in a tag: give --tag too")
        images = Image.find_images(ra=ra, dec=dec, filter=filter, type=ImageType.SCIENCE, min_mjd=start_mjd,
                                   max_mjd=end_mjd, max_seeing=max_seeing, tag=tag, session=session)
    if not images:
        raise NoComponentsError(f"no science image contains RA {ra}, Dec {dec} in filter {filter}"
                                + (f" between MJD {start_mjd} and {end_mjd}" if start_mjd or end_mjd else "")
                                + (f" with seeing <= {max_seeing}\"" if max_seeing else ""))
    return images


def _uuid(text):
    import uuid

    try:
        return uuid.UUID(str(text))
    except ValueError:
        raise NoComponentsError(f"{text!r} is not an image id") from None


def make_coadd(context: Context, images: list[Image], *, register: bool = False) -> DataStore:
    """Calibrate the images where needed, coadd them (or find their stored coadd) and calibrate the
    coadd; with ``register``, also register it as a reference.  Returns the coadd's DataStore.

    Raises
    ------
    pipeline.step.StepError
        A component's or the coadd's calibration, or the registration, failed (names which).
    """
    calibration = _calibration_steps(context)
    components = [Pipeline(context, steps=calibration).run(DataStore(image, context=context)) for image in images]
    coadd = Coadder(config=context.config).make(components, context=context)
    steps = _calibration_steps(context) + ([step_class("referencing")(config=context.config)] if register else [])
    coadd_ds = DataStore(coadd, context=context)
    if coadd.filepath is None:
        coadd_ds.make_prov_tree(steps)
        coadd_ds.save_and_commit()
    return Pipeline(context, steps=steps).run(coadd_ds)


def make_reference(context: Context, *, ra: float | None = None, dec: float | None = None,
                   filter: str | None = None, start_mjd: float | None = None, end_mjd: float | None = None,
                   max_seeing: float | None = None, image_ids=None, tag: str | None = None,
                   valid_from_mjd: float | None = None, valid_until_mjd: float | None = None) -> MadeReference:
    """Build (or find) the coadd of the component images and register it as a reference.

    Parameters are those of ``seechange make-ref`` (see the module docstring); ``tag`` is the
    tag whose PSFs give the components' seeing for ``max_seeing``.

    Raises
    ------
    NoComponentsError
        No image qualifies.
    pipeline.step.StepError
        A component's or the coadd's calibration, or the registration, failed (names which).
    """
    images = find_components(context, ra=ra, dec=dec, filter=filter, start_mjd=start_mjd, end_mjd=end_mjd,
                             max_seeing=max_seeing, image_ids=image_ids, tag=tag)
    coadd_ds = make_coadd(context, images, register=True)
    coadd = coadd_ds.image
    reference = coadd_ds.get_reference()
    reference_tag = context.config.get("subtraction.reference_tag")
    with context.session() as session:
        ProvenanceTag.add(reference_tag, coadd_ds.prov_tree.values(), session=session)
    if valid_from_mjd is not None or valid_until_mjd is not None:
        with context.session() as session:
            Reference.set_validity(reference.id, valid_from_mjd=valid_from_mjd, valid_until_mjd=valid_until_mjd,
                                   session=session)
            session.commit()
            reference = session.get(Reference, reference.id)
    return MadeReference(reference=reference, coadd=coadd, components=images, tag=reference_tag)
