"""Save products' files and rows together, or not at all; agree with a process that saved first.

`save_products` first writes every new file (each atomically, under a name that contains the
row's own id), then inserts every new row in one transaction.  If anything fails -- a file
write, a constraint, a crash of the caller's ``before_commit`` hook -- the transaction is rolled
back and every file written by this call is deleted again, so no new row stays in the database
and no new file on disk.

A kill at any instant (``SIGKILL``, where no cleanup runs) leaves one of: nothing; a temporary
file; a complete file without a row; the committed rows with their files.  None of them blocks a
re-run, which makes products with new ids and so new file names; ``seechange db clean``
(`models.maintenance`) removes the leftovers.  The saving points are named for kill tests
(`models.faults`).

Products are immutable: only new rows are saved.  A row that is already stored is left alone
(saving it again is a no-op), and changing one is not this module's business (the only column
that changes after a save, an image's badness bits, is updated by `Image.update_badness`).

Races: a product is unique by the ids of its parents and its provenance (the tables' unique
constraints).  When two processes make the same product at once, the second insert fails.  With
``on_conflict="adopt"`` the loser rolls back, deletes its own files, loads the winner's rows and
returns them in place of its own, then saves whatever of its products the winner did not make
(pointing them at the winner's rows): both processes go on with one product per (parents,
provenance).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy import event, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from models.context import Context, current_context
from models.faults import fault_point
from models.file_store import FileBackedMixin

__all__ = ["save_products", "delete_products", "unique_keys"]

log = logging.getLogger(__name__)


def save_products(products: Iterable[object], *, context: Context | None = None,
                  session: Session | None = None,
                  before_commit: Callable[[Session], None] | None = None,
                  on_conflict: Literal["raise", "adopt"] = "raise") -> list[object]:
    """Write the files of new ``products``, then insert their rows, atomically.

    Parameters
    ----------
    products : iterable
        ORM objects, in dependency order (parents first).  File-backed ones (`FileBackedMixin`)
        have their file written first.  Objects already stored are skipped.
    context : Context, optional
        The database and file store to save to; default: the current context.
    session : Session, optional
        Join the caller's transaction (a session of ``context``) instead of opening one; the
        caller then commits, and on error the files are still removed here before the exception
        propagates.  Conflicts then always raise (the caller's transaction is lost anyway).
    before_commit : callable, optional
        Called with the session after all rows are added and flushed, before commit.  Used by
        tests to inject a failure at the last moment.
    on_conflict : {"raise", "adopt"}
        What to do when another process stored a product with the same parents and provenance
        first (a unique-constraint violation).  ``"raise"``: raise the ``IntegrityError``, having
        removed this call's files.  ``"adopt"``: use the stored row instead (see the module
        docstring); an ``IntegrityError`` that no stored row explains is still raised.

    Returns
    -------
    list
        One object per new product, in order: the product itself once saved, or (``"adopt"``) the
        row another process had stored in its place.

    Raises
    ------
    sqlalchemy.exc.IntegrityError
        A constraint failed (see ``on_conflict``); nothing of this call stays.
    """
    context = context or current_context()
    new = [p for p in products if p is not None and not sa.inspect(p).has_identity]
    if session is not None or on_conflict == "raise":
        _save_once(new, context, session, before_commit)
        return new
    stored: dict[int, object] = {}
    pending = list(new)
    for _attempt in range(len(new) + 1):
        try:
            _save_once(pending, context, None, before_commit)
            break
        except IntegrityError:
            winners = _stored_equivalents(pending, context)
            if not winners:
                raise
            renamed = {p.id: winners[id(p)].id for p in pending if id(p) in winners}
            for theirs in winners.values():
                log.info("%s %s was saved by another process first; using its row %s",
                         type(theirs).__name__, _describe(theirs), theirs.id)
            stored.update(winners)
            pending = [p for p in pending if id(p) not in winners]
            _point_at(pending, renamed)
    return [stored.get(id(p), p) for p in new]


def _save_once(new: list[object], context: Context, session: Session | None,
               before_commit: Callable[[Session], None] | None) -> None:
    """Files first, then rows in one transaction; on failure remove this call's files, unless
    the failure came so late (a signal during or after the commit) that the rows may be stored."""
    written: list[Path] = []
    stage = "writing"
    try:
        for product in new:
            if isinstance(product, FileBackedMixin) and product.md5sum is None:
                # the path joins `written` inside the store's write, the moment the file is in
                # place: a SIGTERM handled just after the write's own clean-up could run would
                # otherwise leave an orphan file
                product.save_file(context.store, placed=written)
        scope = context.session() if session is None else _joined(session)
        with scope as sess:
            # One flush per object keeps parents before children: the tables have foreign keys
            # but no ORM relationships that would tell the unit of work the order.
            for product in new:
                sess.add(product)
                sess.flush()
            if before_commit is not None:
                before_commit(sess)
            fault_point("before_commit", *new)
            if session is not None and new:
                event.listen(session, "after_commit", lambda _s: fault_point("after_commit", *new),
                             once=True)
            stage = "committing"
        stage = "committed"
        if session is None:
            fault_point("after_commit", *new)
    except BaseException:
        if stage == "writing" or (session is None and not _any_stored(new, context)):
            for path in written:
                path.unlink(missing_ok=True)
            for product in new:
                if isinstance(product, FileBackedMixin) and product.filepath is not None:
                    if context.store.absolute(product.filepath) in written:
                        product.filepath = None
                        product.md5sum = None
            log.debug("save_products rolled back; removed %d new files", len(written))
        raise
    for product in new:
        product._context = context


def _any_stored(products: list[object], context: Context) -> bool:
    """Whether any of the products' rows is in the database (True when that cannot be known)."""
    try:
        with context.session() as session:
            return any(session.get(type(p), p.id) is not None for p in products)
    except Exception:  # the database is gone: keep the files (orphans are harmless)
        return True


def unique_keys(model: type) -> list[tuple[str, ...]]:
    """The column names of each unique constraint of a model's table (its (parents, provenance))."""
    return [tuple(c.name for c in constraint.columns) for constraint in model.__table__.constraints
            if isinstance(constraint, sa.UniqueConstraint)]


def _stored_equivalents(products: list[object], context: Context) -> dict[int, object]:
    """For each product, the stored row with the same unique key, if another process made one.

    Products are visited parents first, and a parent's id is replaced by its stored equivalent's
    before a child is looked up, so a whole chain made by the winner is found.
    """
    found: dict[int, object] = {}
    renamed: dict[Any, Any] = {}
    with context.session() as session:
        for product in products:
            model = type(product)
            for key in unique_keys(model):
                values = {name: renamed.get(getattr(product, name), getattr(product, name)) for name in key}
                if any(v is None for v in values.values()):
                    continue    # NULL never conflicts
                row = session.scalars(select(model).filter_by(**values)).one_or_none()
                if row is not None:
                    found[id(product)] = row
                    renamed[product.id] = row.id
                    break
    return found


def _point_at(products: list[object], renamed: dict[Any, Any]) -> None:
    """Point foreign keys of unsaved products from adopted products' ids to the stored rows'."""
    for product in products:
        for column in product.__table__.columns:
            if column.foreign_keys and getattr(product, column.key, None) in renamed:
                setattr(product, column.key, renamed[getattr(product, column.key)])


def _describe(row: object) -> str:
    parents = [f"{c.key}={str(getattr(row, c.key))[:8]}" for c in row.__table__.columns
               if c.foreign_keys and c.key != "provenance_id" and getattr(row, c.key, None) is not None]
    return f"({', '.join(parents)}; provenance {getattr(row, 'provenance_id', '?')})"


class _joined:
    """The caller's session as a context manager that neither commits nor closes it."""

    def __init__(self, session: Session):
        self.session = session

    def __enter__(self) -> Session:
        return self.session

    def __exit__(self, *exc) -> None:
        return None


def delete_products(products: Iterable[object], *, context: Context | None = None) -> None:
    """Delete products' rows (one transaction), then their files."""
    context = context or current_context()
    products = list(products)
    with context.session() as sess:
        for product in products:
            sess.delete(sess.merge(product))
    for product in products:
        if isinstance(product, FileBackedMixin):
            product.delete_file(context.store)
