"""Save products' files and rows together, or not at all.

`save_products` first writes every new file (each atomically), then inserts every new row in
one transaction.  If anything fails -- a file write, a constraint, a crash of the caller's
``before_commit`` hook -- the transaction is rolled back and every file written by this call is
deleted again, so no new row stays in the database and no new file stays on disk.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.orm import Session

from models.base import session_scope
from models.file_store import FileBackedMixin, FileStore, current_file_store

__all__ = ["save_products", "delete_products"]

log = logging.getLogger(__name__)


def save_products(products: Iterable[object], *, store: FileStore | None = None,
                  session: Session | None = None,
                  before_commit: Callable[[Session], None] | None = None) -> list[object]:
    """Write the files of ``products``, then insert their rows, atomically.

    Parameters
    ----------
    products : iterable
        ORM objects, in dependency order (parents first).  File-backed ones (`FileBackedMixin`)
        have their file written first.  Objects already stored (loaded earlier, then changed) are
        merged: their changes are written, and the object given is left untouched even if the
        save fails.
    store : FileStore, optional
        Where files go; the current file store by default.
    session : Session, optional
        Join the caller's transaction instead of opening one; the caller then commits, and on
        error the files are still removed here before the exception propagates.
    before_commit : callable, optional
        Called with the session after all rows are added and flushed, before commit.  Used by
        tests to inject a failure at the last moment.

    Returns
    -------
    list
        The saved objects, in order: the given object for new ones, the merged copy for
        objects that were already stored (use it from now on).
    """
    store = store or current_file_store()
    products = list(products)
    written: list[Path] = []
    try:
        for product in products:
            if isinstance(product, FileBackedMixin) and product.md5sum is None:
                written.append(product.save_file(store))
        saved: list[object] = []
        with session_scope(session) as sess:
            # One flush per object keeps parents before children: the tables have foreign keys
            # but no ORM relationships that would tell the unit of work the order.
            for product in products:
                if sa.inspect(product).has_identity:
                    saved.append(sess.merge(product))
                else:
                    sess.add(product)
                    saved.append(product)
                sess.flush()
            if before_commit is not None:
                before_commit(sess)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        for product in products:
            if isinstance(product, FileBackedMixin) and product.filepath is not None:
                if store.absolute(product.filepath) in written:
                    product.filepath = None
                    product.md5sum = None
        log.debug("save_products rolled back; removed %d new files", len(written))
        raise
    return saved


def delete_products(products: Iterable[object], *, store: FileStore | None = None,
                    session: Session | None = None) -> None:
    """Delete products' rows (one transaction), then their files."""
    store = store or current_file_store()
    products = list(products)
    with session_scope(session) as sess:
        for product in products:
            sess.delete(sess.merge(product))
    for product in products:
        if isinstance(product, FileBackedMixin):
            product.delete_file(store)
