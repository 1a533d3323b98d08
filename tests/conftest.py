"""Shared fixtures: a fresh database on each back end, a file store, the shared real data.

Every test that takes the ``database`` fixture runs twice, once on SQLite and once on a
throwaway PostgreSQL cluster; both schemas are built by the Alembic migrations.  PostgreSQL
databases are cloned from a migrated template, so a fresh one costs ~0.1 s.  The fixture makes
a `models.context.Context` of that database and a file store below the test's folder, active
for the test; ``database.config(**overrides)`` gives a configuration that names the same ones.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy as sa

import models.context
from models.base import engine_for, forget_engine, make_engine
from models.context import Context, use_context
from models.file_store import FileStore
from models.schema import upgrade
from tests.postgres_cluster import PostgresCluster
from util.config import Config

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# Keep tests away from a user's real ~/.seechange and from any user config: a default context,
# should a test make one by mistake, lands in a throwaway folder.
os.environ.pop("SEECHANGE_CONFIG", None)
os.environ["SEECHANGE_DATA"] = tempfile.mkdtemp(prefix="seechange-tests-default-")
atexit.register(shutil.rmtree, os.environ["SEECHANGE_DATA"], ignore_errors=True)


@dataclass
class TestDatabase:
    """A database made for one test."""

    __test__ = False  # not a test class, despite the name

    kind: str           # "sqlite" or "postgresql"
    url: str
    engine: sa.Engine
    store: FileStore
    context: Context

    def config(self, **overrides) -> Config:
        """A configuration naming this database and data root, with ``overrides`` (dotted keys)."""
        return Config.load(**{"db.url": self.url, "storage.data_root": str(self.store.root), **overrides})

    def context_with(self, config: Config) -> Context:
        """A context of this database and file store under another configuration."""
        return Context(config=config, engine=self.engine, store=self.store)

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


def _activate(kind: str, url: str, engine: sa.Engine, root: Path):
    store = FileStore(root)
    config = Config.load(**{"db.url": url, "storage.data_root": str(root)})
    context = Context(config=config, engine=engine, store=store)
    return TestDatabase(kind, url, engine, store, context)


@contextlib.contextmanager
def _current(context: Context):
    """``context`` current for the test and its threads (process-wide), then the previous one back."""
    previous = list(models.context._process)
    use_context(context)
    try:
        with context.activate():
            yield
    finally:
        models.context._process[:] = previous


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request, tmp_path):
    """A fresh, migrated database on each back end, active as the current context's, with a file store."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'test.sqlite'}"
        engine = engine_for(url)    # the engine a Context.from_config(database.config()) shares
        upgrade(engine)
        db = _activate("sqlite", url, engine, tmp_path / "data")
        with _current(db.context):
            yield db
        forget_engine(engine)
        return
    cluster = request.getfixturevalue("pg_cluster")
    name = f"test_{os.getpid()}_{next(_counter)}"
    admin = make_engine(cluster.url("postgres"))
    with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}" TEMPLATE seechange_template'))
    url = cluster.url(name)
    engine = engine_for(url)
    db = _activate("postgresql", url, engine, tmp_path / "data")
    with _current(db.context):
        yield db
    forget_engine(engine)
    with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()
