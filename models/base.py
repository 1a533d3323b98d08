"""Declarative base, engine and sessions shared by every table.

Both back ends are first-class: SQLite (the embedded default, one file under the data root) and
PostgreSQL through psycopg2.  Code never builds SQL from strings; it uses ``select()`` and the ORM.

Use `session_scope` for every unit of work::

    with session_scope() as session:
        images = session.scalars(select(Image).where(Image.filter == "r")).all()

It commits when the block ends and rolls back if it raises, so no session is left idle in a
transaction.  `use_database` points the library at a database (the default comes from the
configuration).
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
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from util.config import Config

__all__ = ["Base", "UUIDMixin", "TimestampMixin", "use_database", "current_engine",
           "session_scope", "make_engine", "utcnow"]

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
            raise ValueError(f"cannot read a password from db.password_file {password_file}") from exc
        parsed = parsed.set(password=password)
    return parsed


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    # Foreign keys are off by default in SQLite; WAL lets readers work while a writer commits,
    # and the busy timeout makes concurrent writers wait instead of failing at once.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
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
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(parsed, echo=echo)
        event.listen(engine, "connect", _sqlite_pragmas)
    elif parsed.get_backend_name() == "postgresql":
        _register_numpy_adapters()
        engine = sa.create_engine(parsed, echo=echo, pool_pre_ping=True)
    else:
        raise ValueError(f"db.url must be a sqlite or postgresql URL, got {parsed.render_as_string()}")
    log.debug("database engine for %s", parsed.render_as_string(hide_password=True))
    return engine


class _Database:
    """The engine and session factory the library currently uses."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.engine: Engine | None = None
        self.factory: sessionmaker[Session] | None = None

    def set(self, engine: Engine) -> None:
        with self._lock:
            if self.engine is not None and self.engine is not engine:
                self.engine.dispose()
            self.engine = engine
            self.factory = sessionmaker(bind=engine, expire_on_commit=False)

    def get(self) -> tuple[Engine, sessionmaker[Session]]:
        if self.engine is None:
            use_database(Config.load())
        assert self.engine is not None and self.factory is not None  # set by use_database
        return self.engine, self.factory


_database = _Database()


def use_database(target: Config | str | Engine) -> Engine:
    """Make the library use a database from now on.

    Parameters
    ----------
    target : Config, str or Engine
        A configuration (its ``db`` section is used), a URL, or an engine.

    Returns
    -------
    sqlalchemy.engine.Engine
        The engine now in use.
    """
    if isinstance(target, Engine):
        engine = target
    elif isinstance(target, Config):
        engine = make_engine(target.get("db.url"), password_file=target.get("db.password_file"),
                             echo=target.get("db.echo"))
    else:
        engine = make_engine(str(target))
    _database.set(engine)
    return engine


def current_engine() -> Engine:
    """The engine in use (from the default configuration if none was chosen)."""
    return _database.get()[0]


@contextlib.contextmanager
def session_scope(session: Session | None = None) -> Iterator[Session]:
    """A session that commits at the end of the block and rolls back on error.

    Parameters
    ----------
    session : Session, optional
        An existing session: it is yielded as is and neither committed nor closed, so functions
        can take an optional session and join the caller's transaction.
    """
    if session is not None:
        yield session
        return
    _, factory = _database.get()
    new = factory()
    try:
        yield new
        new.commit()
    except BaseException:
        new.rollback()
        raise
    finally:
        new.close()
