"""Searching images by position on the sky and by metadata: `find_images`.

Spatial searches are exact: an index narrows the candidates, then `improc.footprint` tests each
candidate's four-corner polygon on the sphere, so the answer does not depend on the back end.

- PostgreSQL with the q3c extension (migration 0002): a cone search
  ``q3c_radial_query(images.ra, images.dec, ra0, dec0, r)`` on the footprint centres, indexed by
  ``q3c_ang2ipix(ra, dec)``, with ``r`` = the query's radius + the largest footprint radius
  (read with an indexed ``max(radius)``).
- SQLite, and PostgreSQL without q3c: the bounding-box columns, with the RA-wrap and pole rules
  of `improc.footprint` and an indexed band ``mindec >= query mindec - 2 * max radius``.

Orderings (`ORDERINGS`):

- ``"earliest"``: ``mjd`` ascending; ``"latest"``: ``mjd`` descending;
- ``"quality"``: deepest first (limiting magnitude descending), then sharpest (seeing
  ascending), then earliest; images without those figures come last.

Seeing and depth are not columns of the image: they are measured by calibration products --
the seeing is `models.psf.PSF.fwhm_arcsec`, the depth `models.zero_point.ZeroPoint.lim_mag` --
and an image may have been calibrated several ways.  The ``tag`` argument says whose: the
products whose provenance is in the tag.  Seeing and depth criteria (and ``order_by="quality"``)
therefore need ``tag``.

Ties are broken by image id, so the order is the same on every back end.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import sqlalchemy as sa
from sqlalchemy import and_, func, or_, select
from sqlalchemy.orm import Session

from improc import footprint
from models.base import session_scope
from models.image import Image, ImageType

__all__ = ["find_images", "ORDERINGS", "MIN_OVERLAP"]

ORDERINGS = ("earliest", "latest", "quality")

#: Smallest overlap fraction that counts as overlapping when ``overlapfrac`` is not given.
MIN_OVERLAP = 1e-9

#: Slack (degrees) added to index searches so that rounding never loses a candidate.
_SLACK = 1e-6

_q3c_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

_CORNER_COLUMNS = [getattr(Image, f"{axis}_corner_{s}") for axis in ("ra", "dec") for s in Image.CORNERS]


def _has_q3c(session: Session) -> bool:
    """Whether the database is PostgreSQL with the q3c extension installed (cached per engine)."""
    bind = session.get_bind()
    engine = getattr(bind, "engine", bind)
    if engine.dialect.name != "postgresql":
        return False
    if engine not in _q3c_cache:
        extensions = sa.table("pg_extension", sa.column("extname"))
        found = session.execute(select(extensions.c.extname).where(extensions.c.extname == "q3c")).first()
        _q3c_cache[engine] = found is not None
    return _q3c_cache[engine]


def _as_list(value: Any, name: str) -> list | None:
    if value is None:
        return None
    if isinstance(value, (str, ImageType)):
        return [value]
    if isinstance(value, Iterable):
        values = list(value)
        if not values:
            raise ValueError(f"{name} must not be an empty list")
        return values
    raise TypeError(f"{name} must be a string or a list of strings, got {type(value).__name__}")


def _types(value: Any) -> list[ImageType] | None:
    values = _as_list(value, "type")
    if values is None:
        return None
    try:
        return [ImageType(v) for v in values]
    except ValueError:
        raise ValueError(f"type must be among {[t.value for t in ImageType]}, got {value!r}") from None


_RANGE_COLUMNS = {"mjd": Image.mjd, "exp_time": Image.exp_time, "airmass": Image.airmass}
_EXACT_COLUMNS = {"provenance_ids": Image.provenance_id, "filter": Image.filter,
                  "instrument": Image.instrument, "section_id": Image.section_id,
                  "target": Image.target}


def _quality_columns(tag_ids: list[str]) -> dict[str, Any]:
    """Seeing (arcsec) and depth (mag) of the image as correlated subqueries on its products."""
    from models.psf import PSF
    from models.source_list import SourceList
    from models.zero_point import ZeroPoint

    seeing = (select(func.min(PSF.fwhm_arcsec)).join(SourceList, SourceList.id == PSF.sources_id)
              .where(SourceList.image_id == Image.id, PSF.provenance_id.in_(tag_ids))
              .correlate(Image).scalar_subquery())
    depth = (select(func.max(ZeroPoint.lim_mag))
             .where(ZeroPoint.image_id == Image.id, ZeroPoint.provenance_id.in_(tag_ids))
             .correlate(Image).scalar_subquery())
    return {"seeing": seeing, "lim_mag": depth}


def _check_range(name: str, low: Any, high: Any) -> None:
    for bound, label in ((low, "min"), (high, "max")):
        if bound is not None and (isinstance(bound, bool) or not isinstance(bound, (int, float))
                                  or not math.isfinite(bound)):
            raise ValueError(f"{label}_{name} must be a finite number, got {bound!r}")


def _metadata_conditions(exact: dict[str, Any], ranges: dict[str, tuple[Any, Any]],
                         columns: dict[str, Any]) -> list:
    """Conditions for the exact-value arguments, ``type``, and every (min_, max_) pair."""
    conditions = []
    for name, value in exact.items():
        if name == "type":
            types = _types(value)
            if types is not None:
                conditions.append(Image.type.in_(types))
            continue
        values = _as_list(value, name)
        if values is not None:
            conditions.append(_EXACT_COLUMNS[name].in_([str(v) for v in values]))
    for name, (low, high) in ranges.items():
        _check_range(name, low, high)
        if low is not None:
            conditions.append(columns[name] >= low)
        if high is not None:
            conditions.append(columns[name] <= high)
    return conditions


def _ordering(order_by: str, quality: dict[str, Any] | None) -> list:
    if order_by == "earliest":
        return [Image.mjd.asc(), Image.id.asc()]
    if order_by == "latest":
        return [Image.mjd.desc(), Image.id.asc()]
    if order_by == "quality":
        assert quality is not None  # checked by find_images
        return [quality["lim_mag"].desc().nulls_last(), quality["seeing"].asc().nulls_last(),
                Image.mjd.asc(), Image.id.asc()]
    raise ValueError(f"order_by must be one of {ORDERINGS}, got {order_by!r}")


class _Region:
    """The query region: a point (``polygon`` None) or a box polygon, with its bounds."""

    def __init__(self, *, ra, dec, minra, maxra, mindec, maxdec):
        box = (minra, maxra, mindec, maxdec)
        if ra is not None or dec is not None:
            if ra is None or dec is None:
                raise ValueError(f"give both ra and dec, got ra={ra}, dec={dec}")
            if any(v is not None for v in box):
                raise ValueError("give either a point (ra, dec) or a box (minra, maxra, mindec, maxdec), not both")
            if not -90.0 <= dec <= 90.0:
                raise ValueError(f"dec must be within [-90, 90], got {dec}")
            self.polygon = None
            self.ra, self.dec, self.radius = float(ra) % 360.0, float(dec), 0.0
            self.bounds = (self.ra, self.ra, self.dec, self.dec)
            return
        if any(v is None for v in box):
            raise ValueError(f"a box needs all of minra, maxra, mindec, maxdec; got {box}")
        self.polygon = footprint.box_polygon(*box)
        (ra_c,), (dec_c,) = footprint.polygon_centers(*self.polygon)
        self.ra, self.dec = float(ra_c), float(dec_c)
        self.radius = float(footprint.polygon_radii(*self.polygon, ra_c, dec_c)[0])
        self.bounds = tuple(float(b[0]) for b in footprint.polygon_bounds(*self.polygon))

    def index_condition(self, session: Session, max_radius: float):
        """A condition that every image overlapping the region satisfies, served by an index."""
        if _has_q3c(session):
            return func.q3c_radial_query(Image.ra, Image.dec, self.ra, self.dec,
                                         self.radius + max_radius + _SLACK)
        qminra, qmaxra, qmindec, qmaxdec = self.bounds
        dec_band = and_(Image.mindec >= qmindec - 2.0 * max_radius - _SLACK,
                        Image.mindec <= qmaxdec + _SLACK, Image.maxdec >= qmindec - _SLACK)
        if qminra <= qmaxra:
            image_start_in_query = Image.minra.between(qminra - _SLACK, qmaxra + _SLACK)
        else:
            image_start_in_query = or_(Image.minra >= qminra - _SLACK, Image.minra <= qmaxra + _SLACK)
        query_start_in_image = or_(
            and_(Image.minra <= Image.maxra, Image.minra <= qminra + _SLACK, Image.maxra >= qminra - _SLACK),
            and_(Image.minra > Image.maxra, or_(Image.minra <= qminra + _SLACK, Image.maxra >= qminra - _SLACK)),
        )
        return and_(dec_band, or_(image_start_in_query, query_start_in_image))

    def keep(self, corners: np.ndarray, overlapfrac: float | None) -> np.ndarray:
        """Exact test of candidates, corners (N, 8): RA of the 4 corners then Dec of the 4."""
        poly_ra, poly_dec = corners[:, :4], corners[:, 4:]
        if self.polygon is None:
            return footprint.points_in_polygons(self.ra, self.dec, poly_ra, poly_dec)
        fraction = footprint.overlap_fractions(poly_ra, poly_dec, *self.polygon, of="target")
        return fraction >= (overlapfrac if overlapfrac else MIN_OVERLAP)


def _check_options(overlapfrac: float | None, max_number: int | None, spatial_box: bool) -> None:
    if overlapfrac is not None:
        if not spatial_box:
            raise ValueError("overlapfrac needs a box (minra, maxra, mindec, maxdec)")
        if not (isinstance(overlapfrac, (int, float)) and 0.0 <= overlapfrac <= 1.0):
            raise ValueError(f"overlapfrac must be within [0, 1], got {overlapfrac!r}")
    if max_number is not None and (not isinstance(max_number, int) or max_number < 1):
        raise ValueError(f"max_number must be a positive integer, got {max_number!r}")


def find_images(*, provenance_ids: str | Sequence[str] | None = None, tag: str | None = None,
                ra: float | None = None, dec: float | None = None,
                minra: float | None = None, maxra: float | None = None,
                mindec: float | None = None, maxdec: float | None = None,
                overlapfrac: float | None = None,
                filter: str | Sequence[str] | None = None,
                instrument: str | Sequence[str] | None = None,
                section_id: str | Sequence[str] | None = None,
                target: str | Sequence[str] | None = None,
                type: str | ImageType | Sequence[str] | None = None,
                min_mjd: float | None = None, max_mjd: float | None = None,
                min_exp_time: float | None = None, max_exp_time: float | None = None,
                min_seeing: float | None = None, max_seeing: float | None = None,
                min_lim_mag: float | None = None, max_lim_mag: float | None = None,
                min_airmass: float | None = None, max_airmass: float | None = None,
                order_by: str = "earliest", max_number: int | None = None,
                session: Session | None = None) -> list[Image]:
    """Images matching every given criterion (None means "any").

    Parameters
    ----------
    provenance_ids, filter, instrument, section_id, target, type : str or list of str, optional
        Exact values (any of a list).  ``type`` is ``"science"``, ``"coadd"`` or ``"difference"``.
    tag : str, optional
        A provenance tag: only images whose provenance is in it, and the tag's calibration
        products give seeing and depth (see the module docstring).
    ra, dec : float, optional
        Degrees: images whose footprint contains this point.
    minra, maxra, mindec, maxdec : float, optional
        Degrees: images overlapping this box (``minra > maxra`` wraps through RA = 0; the box
        spans less than 180 degrees of RA).  The box is the polygon of its four corners joined by
        great circles, like the image footprints.
    overlapfrac : float, optional
        With a box: the minimum fraction of the BOX's area covered by the image (as in the
        original SeeChange, "fraction of the target area covered by the image").  None: any
        overlap (fraction above `MIN_OVERLAP`).
    min_mjd, max_mjd, min_exp_time, max_exp_time, min_airmass, max_airmass : float, optional
        Inclusive bounds.
    min_seeing, max_seeing : float, optional
        Inclusive bounds on the seeing, arcsec: the FWHM of the image's PSF in ``tag``.
    min_lim_mag, max_lim_mag : float, optional
        Inclusive bounds on the depth: the limiting magnitude of its zero point in ``tag``.
    order_by : {"earliest", "latest", "quality"}
        See the module docstring; ``"quality"`` needs ``tag``.
    max_number : int, optional
        Return at most this many (the first ones in the chosen order).
    session : Session, optional
        Use the caller's session.

    Returns
    -------
    list of Image

    Raises
    ------
    ValueError
        Inconsistent or out-of-range arguments; the message names the argument.
    UnknownTagError
        No provenance carries ``tag``.
    """
    quality_args = {"min_seeing": min_seeing, "max_seeing": max_seeing, "min_lim_mag": min_lim_mag,
                    "max_lim_mag": max_lim_mag}
    wanted = [name for name, value in quality_args.items() if value is not None]
    if order_by == "quality":
        wanted.append("order_by='quality'")
    if wanted and tag is None:
        raise ValueError(f"{', '.join(wanted)} need tag=...: seeing and depth are measured by "
                         "calibration products (PSF, ZeroPoint), and the tag says which calibration")
    region = None
    if any(v is not None for v in (ra, dec, minra, maxra, mindec, maxdec)):
        region = _Region(ra=ra, dec=dec, minra=minra, maxra=maxra, mindec=mindec, maxdec=maxdec)
    _check_options(overlapfrac, max_number, region is not None and region.polygon is not None)
    with session_scope(session) as sess:
        columns: dict[str, Any] = dict(_RANGE_COLUMNS)
        quality = None
        tag_condition = []
        if tag is not None:
            from models.provenance import ProvenanceTag, UnknownTagError

            tag_ids = [p.id for p in ProvenanceTag.provenances(tag, session=sess)]
            if not tag_ids:
                raise UnknownTagError(f"no provenance carries the tag '{tag}'")
            quality = _quality_columns(tag_ids)
            columns.update(quality)
            tag_condition = [Image.provenance_id.in_(tag_ids)]
        conditions = tag_condition + _metadata_conditions(
            {"provenance_ids": provenance_ids, "filter": filter, "instrument": instrument,
             "section_id": section_id, "target": target, "type": type},
            {"mjd": (min_mjd, max_mjd), "exp_time": (min_exp_time, max_exp_time),
             "seeing": (min_seeing, max_seeing), "lim_mag": (min_lim_mag, max_lim_mag),
             "airmass": (min_airmass, max_airmass)}, columns)
        ordering = _ordering(order_by, quality)
        if region is None:
            statement = select(Image).where(*conditions).order_by(*ordering)
            if max_number is not None:
                statement = statement.limit(max_number)
            return list(sess.scalars(statement))
        return _spatial_search(sess, region, conditions, ordering, overlapfrac=overlapfrac,
                               max_number=max_number)


def _spatial_search(session: Session, region: _Region, conditions: list, ordering: list, *,
                    overlapfrac: float | None, max_number: int | None) -> list[Image]:
    """Indexed candidates (ids and corners only), the exact test, then the full rows in order."""
    max_radius = session.scalar(select(func.max(Image.radius)))
    if max_radius is None:
        return []
    statement = (select(Image.id, *_CORNER_COLUMNS)
                 .where(region.index_condition(session, float(max_radius)), *conditions)
                 .order_by(*ordering))
    rows = session.execute(statement).all()
    if not rows:
        return []
    corners = np.array([row[1:] for row in rows], dtype=float)
    ids = [row[0] for row, keep in zip(rows, region.keep(corners, overlapfrac)) if keep]
    if max_number is not None:
        ids = ids[:max_number]
    if not ids:
        return []
    found = {image.id: image for image in session.scalars(select(Image).where(Image.id.in_(ids)))}
    return [found[i] for i in ids]
