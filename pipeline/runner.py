"""Run the pipeline over what is in the database, and tag the provenances it used.

Also the one place that turns an error into the one line a user reads (`error_line`): no
traceback, no SQL statement, no parameters.
"""

from __future__ import annotations

import logging
import sys
import uuid
from collections.abc import Sequence

from sqlalchemy import select

from models.context import Context
from models.provenance import ProvenanceTag
from pipeline.data_store import DataStore
from pipeline.top import Pipeline

__all__ = ["run_all", "work_items", "error_line", "RunFailures"]

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


class RunFailures(RuntimeError):
    """Some work items of a batch failed (each was reported on its own line)."""


def run_all(context: Context, *, ids: Sequence[str] | None = None, tag: str | None = None,
            verify: bool = False) -> list[DataStore]:
    """Run the configured pipeline on every work item; tag the provenances if ``tag`` is given.

    A failure on one item is reported on one line (stderr) and the others go on.  With
    ``verify``, the files of products that would be skipped are md5-checked and damaged ones
    made again (`Pipeline.run`).

    Raises
    ------
    Exception
        The failure of the only work item, as it was raised.
    RunFailures
        Several work items and some failed: says how many.
    """
    pipeline = Pipeline(context)
    stores: list[DataStore] = []
    failures: list[Exception] = []
    items = work_items(context, ids)
    for target, section in items:
        try:
            ds = pipeline.run(target, section, verify=verify)
        except Exception as exc:  # keep going over the other images; reported below
            failures.append(exc)
            if len(items) > 1:
                print(f"FAILED: {error_line(exc)}", file=sys.stderr)
            continue
        stores.append(ds)
        print(f"{ds.describe()}: " + ", ".join(_timing(name, st) for name, st in ds.stats.items()))
        if ds.adopted:
            print(f"note: {ds.describe()}: {', '.join(ds.adopted)} had just been saved by another "
                  "process; using those")
        if ds.remade:
            print(f"note: {ds.describe()}: damaged {', '.join(ds.remade)} made again")
    if tag:
        provs = {p.id: p for ds in stores for p in ds.prov_tree.values()}
        with context.session() as session:
            ProvenanceTag.add(tag, provs.values(), session=session)
    if failures and len(items) == 1:
        raise failures[0]
    if failures:
        raise RunFailures(f"{len(failures)} of {len(items)} work items failed")
    return stores


def error_line(exc: BaseException) -> str:
    """One line describing an error for a user: no traceback, no SQL statement or parameters.

    A database error is described by the database's own first line (``duplicate key value
    violates unique constraint ...``, ``database is locked``, ``server closed the connection``).
    """
    from pipeline.step import StepError

    if isinstance(exc, StepError):
        return f"{exc.process} failed on {exc.target}: {_cause_text(exc.cause)}"
    database = _database_error(exc)
    if database is not None:
        return _cause_text(database)
    return _one_line(str(exc)) or type(exc).__name__


def _cause_text(exc: BaseException) -> str:
    database = _database_error(exc)
    if database is None:
        return f"{type(exc).__name__}: {_one_line(str(exc))}"
    orig = getattr(database, "orig", None)
    source = orig if orig is not None else database
    text = str(orig) if orig is not None else str(database.args[0] if database.args else "")
    return f"database error ({type(source).__name__}): {_one_line(text, first=True)}"


def _database_error(exc: BaseException) -> BaseException | None:
    """The SQLAlchemy error that ``exc`` is or was caused by, if any."""
    from sqlalchemy.exc import SQLAlchemyError

    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, SQLAlchemyError):
            return exc
        exc = getattr(exc, "cause", None) or exc.__cause__ or exc.__context__
        seen += 1
    return None


def _one_line(text: str, *, first: bool = False) -> str:
    text = text.split("[SQL:")[0]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return (lines[0] if lines else "") if first else "; ".join(lines)
