"""Shared fixtures: a fresh database on each back end, a file store, the shared real data.

Every test that takes the ``database`` fixture runs twice, once on SQLite and once on a
throwaway PostgreSQL cluster; both schemas are built by the Alembic migrations.  PostgreSQL
databases are cloned from a migrated template, so a fresh one costs ~0.1 s.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy as sa

from models.base import make_engine, use_database
from models.file_store import FileStore, use_file_store
from models.schema import upgrade
from tests.postgres_cluster import PostgresCluster

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# Keep tests away from a user's real ~/.seechange and from any user config.
os.environ.pop("SEECHANGE_CONFIG", None)


@dataclass
class TestDatabase:
    """A database made for one test."""

    __test__ = False  # not a test class, despite the name

    kind: str           # "sqlite" or "postgresql"
    url: str
    engine: sa.Engine
    store: FileStore

    @property
    def has_q3c(self) -> bool:
        if self.kind != "postgresql":
            return False
        with self.engine.connect() as conn:
            found = conn.execute(sa.text("SELECT 1 FROM pg_extension WHERE extname = 'q3c'"))
            return found.first() is not None


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` beside the repository; a clear failure if it is missing."""
    if not SHARED_DATA.is_dir():
        pytest.fail(f"the shared real data folder {SHARED_DATA} is missing; tests that read real "
                    "data need ../shared/data beside the repository")
    return SHARED_DATA


@pytest.fixture(scope="session")
def pg_cluster():
    cluster = PostgresCluster()
    cluster.start()
    cluster.wait_ready()
    admin = make_engine(cluster.url("postgres"))
    with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text("CREATE DATABASE seechange_template"))
    template = make_engine(cluster.url("seechange_template"))
    upgrade(template)
    template.dispose()
    admin.dispose()
    yield cluster
    cluster.stop()


_counter = itertools.count()


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request, tmp_path):
    """A fresh, migrated database on each back end, in use by the library, with a file store."""
    store = use_file_store(FileStore(tmp_path / "data"))
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'test.sqlite'}"
        engine = make_engine(url)
        upgrade(engine)
        use_database(engine)
        yield TestDatabase("sqlite", url, engine, store)
        engine.dispose()
        return
    cluster = request.getfixturevalue("pg_cluster")
    name = f"test_{os.getpid()}_{next(_counter)}"
    admin = make_engine(cluster.url("postgres"))
    with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}" TEMPLATE seechange_template'))
    url = cluster.url(name)
    engine = make_engine(url)
    use_database(engine)
    yield TestDatabase("postgresql", url, engine, store)
    engine.dispose()
    with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()
