"""Save products' files and rows together, or not at all.

`save_products` first writes every new file (each atomically, under a name that contains the
row's own id), then inserts every new row in one transaction.  If anything fails -- a file
write, a constraint, a crash of the caller's ``before_commit`` hook -- the transaction is rolled
back and every file written by this call is deleted again, so no new row stays in the database
and no new file on disk.

Products are immutable: only new rows are saved.  A row that is already stored is left alone
(saving it again is a no-op), and changing one is not this module's business (the only column
that changes after a save, an image's badness bits, is updated by `Image.update_badness`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.orm import Session

from models.context import Context, current_context
from models.file_store import FileBackedMixin

__all__ = ["save_products", "delete_products"]

log = logging.getLogger(__name__)


def save_products(products: Iterable[object], *, context: Context | None = None,
                  session: Session | None = None,
                  before_commit: Callable[[Session], None] | None = None) -> list[object]:
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
        propagates.
    before_commit : callable, optional
        Called with the session after all rows are added and flushed, before commit.  Used by
        tests to inject a failure at the last moment.

    Returns
    -------
    list
        The objects saved (the new ones), in order.
    """
    context = context or current_context()
    new = [p for p in products if p is not None and not sa.inspect(p).has_identity]
    written: list[Path] = []
    try:
        for product in new:
            if isinstance(product, FileBackedMixin) and product.md5sum is None:
                written.append(product.save_file(context.store))
        scope = context.session() if session is None else _joined(session)
        with scope as sess:
            # One flush per object keeps parents before children: the tables have foreign keys
            # but no ORM relationships that would tell the unit of work the order.
            for product in new:
                sess.add(product)
                sess.flush()
            if before_commit is not None:
                before_commit(sess)
    except BaseException:
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
    return new


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
