"""Migrations that a kill or a race cannot break: all or nothing, one migrator at a time."""

from __future__ import annotations

import threading

import pytest
import sqlalchemy as sa

import models.schema
from models.base import make_engine
from models.schema import SchemaError, current_revision, head_revision, load_all_tables, upgrade


def _tables(engine) -> set[str]:
    with engine.connect() as conn:
        return set(sa.inspect(conn).get_table_names())


@pytest.fixture
def fresh(request, tmp_path):
    """An engine on an empty database of each back end."""
    if request.param == "sqlite":
        engine = make_engine(f"sqlite:///{tmp_path / 'fresh.sqlite'}")
        yield engine
        engine.dispose()
        return
    cluster = request.getfixturevalue("pg_cluster")
    name = f"fresh_{tmp_path.name[-20:]}".replace("-", "_").lower()
    admin = make_engine(cluster.url("postgres"))
    with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    engine = make_engine(cluster.url(name))
    yield engine
    engine.dispose()
    with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


BOTH = pytest.mark.parametrize("fresh", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)],
                               indirect=True)


@BOTH
def test_a_failed_first_migration_leaves_no_table(fresh, monkeypatch):
    """The last moment before the commit: on SQLite too, every CREATE TABLE is undone."""
    def fail(point, *kinds):
        if point == "before_commit":
            raise RuntimeError("killed")

    monkeypatch.setattr(models.schema, "fault_point", fail)
    with pytest.raises(RuntimeError, match="killed"):
        upgrade(fresh)
    assert _tables(fresh) == set() and current_revision(fresh) is None
    monkeypatch.undo()
    upgrade(fresh)
    assert current_revision(fresh) == head_revision()


@BOTH
def test_concurrent_migrators_take_turns(fresh):
    engines = [make_engine(fresh.url.render_as_string(hide_password=False)) for _ in range(4)]
    errors = []

    def migrate(engine):
        try:
            upgrade(engine)
        except Exception as exc:  # collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=migrate, args=(e,)) for e in engines]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    for engine in engines:
        engine.dispose()
    assert errors == [] and current_revision(fresh) == head_revision()


def test_a_half_created_database_of_an_older_version_is_repaired(tmp_path):
    """Older versions could leave tables without a revision (a kill during the first migration)."""
    engine = make_engine(f"sqlite:///{tmp_path / 'half.sqlite'}")
    metadata = load_all_tables()
    with engine.begin() as conn:
        metadata.tables["code_versions"].create(conn)
        metadata.tables["provenances"].create(conn)
        sa.Table("alembic_version", sa.MetaData(), sa.Column("version_num", sa.String(32))).create(conn)
    upgrade(engine)
    assert current_revision(engine) == head_revision() and "images" in _tables(engine)
    # ... but tables with rows and no revision are not SeeChange's to drop
    other = make_engine(f"sqlite:///{tmp_path / 'other.sqlite'}")
    with other.begin() as conn:
        metadata.tables["code_versions"].create(conn)
        conn.execute(metadata.tables["code_versions"].insert().values(process="x", version="1.0"))
    with pytest.raises(SchemaError, match="code_versions"):
        upgrade(other)
    engine.dispose()
    other.dispose()
