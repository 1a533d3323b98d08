"""Run the pipeline over what is in the database, and tag the provenances it used."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence

from sqlalchemy import select

from models.base import session_scope
from models.provenance import Provenance, ProvenanceTag
from pipeline.data_store import DataStore
from pipeline.top import Pipeline
from util.config import Config

__all__ = ["run_all", "work_items"]

log = logging.getLogger(__name__)


def work_items(ids: Sequence[str] | None = None) -> list[tuple[object, str | None]]:
    """What to run: (image, None) for reduced images, (exposure, section) for raw exposures.

    With ``ids``, each is an image id or an exposure id.  Without, every ingested image and every
    section of every exposure that has no ingested image (a raw exposure).
    """
    from models.exposure import Exposure
    from models.image import Image

    items: list[tuple[object, str | None]] = []
    with session_scope() as session:
        if ids:
            for text in ids:
                key = uuid.UUID(str(text))
                image = session.get(Image, key)
                exposure = None if image is not None else session.get(Exposure, key)
                if image is not None:
                    items.append((image, None))
                elif exposure is not None:
                    items.extend((exposure, s) for s in exposure.section_ids)
                else:
                    raise ValueError(f"no image or exposure with id {text}")
            return items
        ingested = session.scalars(select(Image).join(Provenance, Provenance.id == Image.provenance_id)
                                   .where(Provenance.process == "ingest")).all()
        items.extend((im, None) for im in ingested)
        with_images = {im.exposure_id for im in ingested}
        for exposure in session.scalars(select(Exposure)).all():
            if exposure.id not in with_images:
                items.extend((exposure, s) for s in exposure.section_ids)
    return items


def _timing(name: str, stats: dict) -> str:
    return f"{name} skipped" if stats.get("skipped") else f"{name} {stats['seconds']:.2f}s"


def run_all(config: Config, *, ids: Sequence[str] | None = None, tag: str | None = None) -> list[DataStore]:
    """Run the configured pipeline on every work item; tag the provenances if ``tag`` is given.

    A failure on one item is logged and the others go on; the first failure is re-raised at
    the end so the command exits non-zero.
    """
    pipeline = Pipeline(config)
    stores: list[DataStore] = []
    failures: list[Exception] = []
    for target, section in work_items(ids):
        try:
            ds = pipeline.run(target, section)
        except Exception as exc:  # keep going over the other images; reported below
            log.error("%s", exc)
            failures.append(exc)
            continue
        stores.append(ds)
        print(f"{ds.describe()}: " + ", ".join(_timing(name, st) for name, st in ds.stats.items()))
    if tag:
        provs = {p.id: p for ds in stores for name, p in ds.prov_tree.items() if name != "image"}
        ProvenanceTag.add(tag, provs.values())
    if failures:
        raise failures[0]
    return stores
