"""The whole schema: every table module, and the Alembic migrations that create it.

`upgrade` brings a database to the newest schema by running the migrations in ``alembic/``
(the same code path for SQLite and PostgreSQL, used by ``seechange db upgrade`` and by the
test suite, so the migrations are always tested).
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from models.base import Base

__all__ = ["load_all_tables", "metadata", "upgrade", "current_revision", "alembic_dir"]


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


def _alembic_config(engine: Engine):
    from alembic.config import Config as AlembicConfig

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(alembic_dir()))
    cfg.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False)
                        .replace("%", "%%"))
    return cfg


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Run the migrations up to ``revision`` on the database behind ``engine``."""
    from alembic import command

    cfg = _alembic_config(engine)
    with engine.begin() as connection:
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, revision)


def current_revision(engine: Engine) -> str | None:
    """The migration revision the database is at, or None for an empty database."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()
