"""Run the pipeline over what is in the database, and tag the provenances it used."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence

from sqlalchemy import select

from models.context import Context
from models.provenance import ProvenanceTag
from pipeline.data_store import DataStore
from pipeline.top import Pipeline

__all__ = ["run_all", "work_items"]

log = logging.getLogger(__name__)


def work_items(context: Context, ids: Sequence[str] | None = None) -> list[tuple[object, str | None]]:
    """What to run: (image, None) for reduced images, (exposure, section) for raw exposures.

    With ``ids``, each is an image id or an exposure id.  Without, every image that arrived
    reduced and every section of every raw exposure.

    Raises
    ------
    LookupError
        An id is neither an image's nor an exposure's.
    """
    from models.exposure import Exposure
    from models.image import Image, ingest_provenance

    items: list[tuple[object, str | None]] = []
    with context.session() as session:
        if ids:
            for text in ids:
                try:
                    key = uuid.UUID(str(text))
                except ValueError:
                    raise LookupError(f"{text!r} is not an image or exposure id") from None
                image = session.get(Image, key)
                exposure = None if image is not None else session.get(Exposure, key)
                if image is not None:
                    items.append((image, None))
                elif exposure is not None:
                    items.extend((exposure, s) for s in exposure.section_ids)
                else:
                    raise LookupError(f"no image or exposure with id {text}")
            return items
        ingested = session.scalars(select(Image).where(Image.provenance_id == ingest_provenance().id)
                                   .order_by(Image.mjd, Image.id)).all()
        items.extend((im, None) for im in ingested)
        raw = session.scalars(select(Exposure).where(Exposure.is_raw.is_(True))
                              .order_by(Exposure.mjd, Exposure.id)).all()
        for exposure in raw:
            items.extend((exposure, s) for s in exposure.section_ids)
    return items


def _timing(name: str, stats: dict) -> str:
    if stats.get("skipped"):
        return f"{name} skipped"
    if "nothing_to_do" in stats:
        return f"{name}: nothing to do ({stats['nothing_to_do']})"
    return f"{name} {stats['seconds']:.2f}s"


def run_all(context: Context, *, ids: Sequence[str] | None = None, tag: str | None = None) -> list[DataStore]:
    """Run the configured pipeline on every work item; tag the provenances if ``tag`` is given.

    A failure on one item is logged and the others go on; the first failure is re-raised at
    the end so the command exits non-zero.
    """
    pipeline = Pipeline(context)
    stores: list[DataStore] = []
    failures: list[Exception] = []
    items = work_items(context, ids)
    for target, section in items:
        try:
            ds = pipeline.run(target, section)
        except Exception as exc:  # keep going over the other images; reported below
            log.error("%s", exc)
            print(f"FAILED: {exc}")
            failures.append(exc)
            continue
        stores.append(ds)
        print(f"{ds.describe()}: " + ", ".join(_timing(name, st) for name, st in ds.stats.items()))
    if tag:
        provs = {p.id: p for ds in stores for p in ds.prov_tree.values()}
        with context.session() as session:
            ProvenanceTag.add(tag, provs.values(), session=session)
    if failures:
        print(f"{len(failures)} of {len(items)} failed")
        raise failures[0]
    return stores
