"""Declarative base, engine and sessions shared by every table.

Both back ends are first-class: SQLite (the embedded default, one file under the data root) and
PostgreSQL through psycopg2.  Code never builds SQL from strings; it uses ``select()`` and the ORM.

Use `session_scope` for every unit of work::

    with session_scope() as session:
        images = session.scalars(select(Image).where(Image.filter == "r")).all()

It commits when the block ends and rolls back if it raises, so no session is left idle in a
transaction.  Which database: the current context's (`models.context`).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy import MetaData, event
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from util.config import ConfigError


__all__ = ["Base", "UUIDMixin", "TimestampMixin", "session_scope", "make_engine", "engine_for",
           "forget_engine", "utcnow"]

log = logging.getLogger(__name__)

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime.datetime:
    """The current time, timezone-aware UTC."""
    return datetime.datetime.now(datetime.timezone.utc)


class Base(DeclarativeBase):
    """Declarative base of every SeeChange table."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {
        dict: sa.JSON,
        datetime.datetime: sa.DateTime(timezone=True),
    }


class UUIDMixin:
    """A UUID primary key generated client side, so an object has its id before it is saved."""

    id: Mapped[uuid.UUID] = mapped_column(sa.Uuid, primary_key=True, default=uuid.uuid4)

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        if self.id is None:
            self.id = uuid.uuid4()


class TimestampMixin:
    """When the row was created (UTC)."""

    created_at: Mapped[datetime.datetime] = mapped_column(default=utcnow)


def _url_with_password(url: str, password_file: str | None) -> sa.URL:
    parsed = make_url(url)
    if password_file:
        try:
            password = Path(password_file).expanduser().read_text().splitlines()[0].strip()
        except (OSError, IndexError) as exc:
            raise ConfigError(f"cannot read a password from db.password_file {password_file}") from exc
        parsed = parsed.set(password=password)
    return parsed


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    # The busy timeout makes concurrent writers wait instead of failing at once; it comes first
    # because switching a new database to WAL takes a lock that another process may hold.
    # Foreign keys are off by default in SQLite; WAL lets readers work while a writer commits.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.close()


def _register_numpy_adapters() -> None:
    """Let psycopg2 send numpy scalars (np.float64, np.int64, np.bool_) as plain numbers."""
    import numpy as np
    from psycopg2.extensions import AsIs, register_adapter

    for kind in (np.float32, np.float64, np.int16, np.int32, np.int64, np.uint16, np.uint32):
        register_adapter(kind, lambda value: AsIs(repr(value.item())))
    register_adapter(np.bool_, lambda value: AsIs("TRUE" if value else "FALSE"))


def make_engine(url: str, *, password_file: str | None = None, echo: bool = False) -> Engine:
    """Create an engine for a SQLite or PostgreSQL URL.

    Parameters
    ----------
    url : str
        SQLAlchemy URL.  For SQLite the parent folder is created.
    password_file : str, optional
        File whose first line is the password; it is never logged.
    echo : bool
        Log SQL statements.

    Returns
    -------
    sqlalchemy.engine.Engine
    """
    parsed = _url_with_password(url, password_file)
    if parsed.drivername == "postgresql":
        # A plain postgresql:// URL means psycopg2 (our driver); SQLAlchemy 2.1 would pick psycopg 3.
        parsed = parsed.set(drivername="postgresql+psycopg2")
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(parsed, echo=echo)
        event.listen(engine, "connect", _sqlite_pragmas)
    elif parsed.get_backend_name() == "postgresql":
        _register_numpy_adapters()
        engine = sa.create_engine(parsed, echo=echo, pool_pre_ping=True)
    else:
        raise ConfigError(f"db.url must be a sqlite or postgresql URL, got "
                          f"{parsed.render_as_string(hide_password=True)}")
    log.debug("database engine for %s", parsed.render_as_string(hide_password=True))
    return engine


_engines: dict[tuple[str, str | None, bool], Engine] = {}
_engines_lock = threading.Lock()


def engine_for(url: str, *, password_file: str | None = None, echo: bool = False) -> Engine:
    """The engine of a database URL, made once per process and shared (see `make_engine`)."""
    key = (str(url), password_file, bool(echo))
    with _engines_lock:
        if key not in _engines:
            _engines[key] = make_engine(url, password_file=password_file, echo=echo)
        return _engines[key]


def forget_engine(engine: Engine) -> None:
    """Dispose of a shared engine and drop it from the cache (tests, after dropping a database)."""
    with _engines_lock:
        for key in [k for k, e in _engines.items() if e is engine]:
            del _engines[key]
    engine.dispose()


@event.listens_for(Base, "load", propagate=True)
def _remember_context(target, query_context) -> None:
    # A row remembers the context whose session loaded it, so that its files are read from
    # that context's file store (see models.context.context_of).
    session = getattr(query_context, "session", None)
    if session is not None and "context" in session.info:
        target._context = session.info["context"]


@contextlib.contextmanager
def session_scope(session: Session | None = None) -> Iterator[Session]:
    """A session that commits at the end of the block and rolls back on error.

    Parameters
    ----------
    session : Session, optional
        An existing session: it is yielded as is and neither committed nor closed, so functions
        can take an optional session and join the caller's transaction.  Without one, a new
        session of the current context (`models.context.current_context`).
    """
    if session is not None:
        yield session
        return
    from models.context import current_context

    with current_context().session() as new:
        yield new
