"""The whole schema: every table module, and the Alembic migrations that create it.

`upgrade` brings a database to the newest schema by running the migrations in ``alembic/``
(the same code path for SQLite and PostgreSQL, used by ``seechange db upgrade``, by every other
command at start-up and by the test suite, so the migrations are always tested).

Migrations can neither be broken by a kill nor by a race:

- one migrator at a time: on PostgreSQL a transaction-level advisory lock, on SQLite the
  database's write lock (``BEGIN IMMEDIATE``); whoever comes second waits, then finds the
  schema up to date;
- all or nothing: every migration runs in that one transaction, and both back ends undo DDL on
  rollback (PostgreSQL always; SQLite too, once the driver's own transaction handling is out of
  the way and the transaction is begun explicitly).  A kill leaves the old schema or the new one;
- a database left half-created by an older SeeChange (tables but no recorded revision) is
  repaired when its tables are empty, and refused with a clear message when they are not.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import pkgutil
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from models.base import Base
from models.faults import fault_point

__all__ = ["load_all_tables", "metadata", "upgrade", "current_revision", "head_revision",
           "alembic_dir", "SchemaError"]

log = logging.getLogger(__name__)

#: Key of the PostgreSQL advisory lock held while migrating (any constant bigint will do).
MIGRATION_LOCK_KEY = zlib.crc32(b"seechange schema migrations")


class SchemaError(RuntimeError):
    """The database's schema cannot be brought up to date without a person deciding."""


def load_all_tables() -> sa.MetaData:
    """Import every module of the ``models`` package and return the complete metadata.

    A table is part of the schema by being defined in a module of ``models/``: there is no list
    to keep in step.
    """
    import models

    for info in pkgutil.iter_modules(models.__path__, prefix="models."):
        if not info.ispkg:
            importlib.import_module(info.name)
    return Base.metadata


def metadata() -> sa.MetaData:
    """The complete metadata of the schema."""
    return load_all_tables()


def alembic_dir() -> Path:
    """The folder holding ``env.py`` and ``versions/``: the repository's, else the installed copy."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "alembic", here / "alembic"):
        if (candidate / "env.py").is_file():
            return candidate
    raise FileNotFoundError(f"alembic migrations not found near {here}")


def _alembic_config(engine: Engine | None = None):
    """Alembic's configuration: the migrations' folder.  The connection is passed to it in
    ``attributes`` (never a URL, so no password is handed around)."""
    from alembic.config import Config as AlembicConfig

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(alembic_dir()))
    return cfg


def head_revision() -> str:
    """The newest migration revision."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(_alembic_config()).get_current_head()


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Run the migrations up to ``revision`` on the database behind ``engine``, safely.

    One process migrates at a time and all migrations run in one transaction (see the module
    docstring); a database already at ``revision`` is left alone without taking the lock.

    Raises
    ------
    SchemaError
        The database has SeeChange tables holding rows but no recorded revision.
    """
    for attempt in range(_SQLITE_LOCK_RETRIES + 1):
        try:
            _upgrade_once(engine, revision)
            return
        except sa.exc.OperationalError as exc:
            # SQLite answers "database is locked" at once, without waiting out its busy timeout,
            # when waiting could deadlock (e.g. a fresh file switching to WAL while another
            # migrator holds it); the migration was rolled back whole, so try again
            if engine.dialect.name != "sqlite" or "locked" not in str(exc) or attempt == _SQLITE_LOCK_RETRIES:
                raise
            log.info("database %s is locked by another migrator; trying again", engine.url)
            time.sleep(0.2 * (attempt + 1))


_SQLITE_LOCK_RETRIES = 5


def _upgrade_once(engine: Engine, revision: str) -> None:
    """One attempt of `upgrade`."""
    from alembic import command

    target = head_revision() if revision == "head" else revision
    if current_revision(engine) == target:
        return
    cfg = _alembic_config()
    with _exclusive_transaction(engine) as connection:
        _repair_half_created(connection)
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, revision)
        fault_point("before_commit", "schema")
    fault_point("after_commit", "schema")


@contextlib.contextmanager
def _exclusive_transaction(engine: Engine) -> Iterator[Connection]:
    """A connection in a transaction that no other migrator can enter until it ends."""
    if engine.dialect.name != "sqlite":
        with engine.begin() as connection:
            connection.execute(sa.select(sa.func.pg_advisory_xact_lock(MIGRATION_LOCK_KEY)))
            yield connection
        return
    # The sqlite3 driver commits DDL as it goes unless it is told to keep out of transactions
    # (AUTOCOMMIT) and one is begun explicitly: then CREATE TABLE ... is undone by a rollback.
    with engine.connect() as plain:
        connection = plain.execution_options(isolation_level="AUTOCOMMIT")
        connection.exec_driver_sql("BEGIN IMMEDIATE")
        try:
            yield connection
        except BaseException:
            connection.exec_driver_sql("ROLLBACK")
            raise
        connection.exec_driver_sql("COMMIT")


def _repair_half_created(connection: Connection) -> None:
    """Drop the tables of a first migration that an older version left half done (none holds a row)."""
    from alembic.runtime.migration import MigrationContext

    if MigrationContext.configure(connection).get_current_revision() is not None:
        return
    present = set(sa.inspect(connection).get_table_names())
    ours = [t for t in reversed(load_all_tables().sorted_tables) if t.name in present]
    if not ours:
        return
    filled = [t.name for t in ours if connection.execute(
        sa.select(sa.func.count()).select_from(sa.table(t.name))).scalar()]
    if filled:
        raise SchemaError(f"the database has SeeChange tables with rows ({', '.join(filled)}) but no "
                          "recorded schema revision; it was not made by these migrations: use another "
                          "database, or move these tables away")
    log.warning("the database holds an interrupted first migration (%d empty tables, no revision); "
                "dropping them and migrating again", len(ours))
    for table in ours:
        sa.Table(table.name, sa.MetaData()).drop(connection)
    if "alembic_version" in present:
        sa.Table("alembic_version", sa.MetaData()).drop(connection)


def current_revision(engine: Engine) -> str | None:
    """The migration revision the database is at, or None for an empty database."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()
