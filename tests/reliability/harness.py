"""The campaign's tools: installations (database + data root + config), worker processes that run
the real command line and can be killed or stopped at a saving point, and the checks that an
installation holds exactly one consistent set of products.

Workers are forked from the test process, which has imported everything already, and run
``pipeline.cli.main`` -- the code the ``seechange`` command runs -- so a trial costs the work and
not the ~1.3 s of imports; ``exec_worker`` starts a genuine ``python`` process instead.  A worker
that SIGKILLs itself at a fault point (`models.faults`) dies exactly as a pre-empted worker does.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy import func, select
from sqlalchemy.engine import make_url

import models.base
import models.context
import models.faults
from models.base import engine_for, forget_engine, make_engine
from models.context import Context
from models.maintenance import check, clean, file_backed_models
from models.saving import unique_keys
from models.schema import load_all_tables, upgrade
from util.config import Config

ROOT = Path(__file__).resolve().parents[2]

#: One thread per worker: eight workers on two cores must not also fight over BLAS threads.
THREAD_LIMITS = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

#: The products one raw exposure gives, by table: exactly one each after a complete run (and none
#: of any other product table).
ONE_SET = {"exposures": 1, "images": 1, "backgrounds": 1, "source_lists": 1, "psfs": 1,
           "world_coordinates": 1, "zero_points": 1, "catalog_excerpts": 1}

_names = itertools.count()


# --- installations -----------------------------------------------------------------------------


@dataclass
class Installation:
    """A database, a data root and a configuration file naming both (and the Gaia folder)."""

    kind: str               # "sqlite" or "postgresql"
    root: Path              # the data root
    config_path: Path
    url: str                # the database URL (SQLite: the default file inside the data root)
    drop: list = field(default_factory=list)   # what to undo at the end

    def argv(self, *args: str) -> list[str]:
        return ["--config", str(self.config_path), *args]

    def context(self) -> Context:
        return Context.from_config(Config.load(self.config_path))

    def cli(self, *args: str) -> tuple[int, str, str]:
        """Run ``seechange --config CONFIG ARGS`` in this process; (exit code, stdout, stderr)."""
        from pipeline.cli import main

        out, err = io.StringIO(), io.StringIO()
        previous = list(models.context._process)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = main(self.argv(*args))
        finally:
            models.context._process[:] = previous
        return code, out.getvalue(), err.getvalue()

    def commands(self, raw: Path, *extra: list[str]) -> list[list[str]]:
        """The whole life of one exposure: migrate, ingest, run (argv lists for a worker)."""
        return [self.argv("db", "upgrade"), self.argv("ingest", str(raw)), self.argv("run"),
                *[self.argv(*e) for e in extra]]

    def close(self) -> None:
        forget_engine(engine_for(self.url))
        for undo in reversed(self.drop):
            undo()


def new_installation(kind: str, folder: Path, gaia: Path, *, pg_cluster=None) -> Installation:
    """A fresh installation: no schema, no files.  PostgreSQL gets a new empty database."""
    root = folder / f"root{next(_names)}"
    root.mkdir(parents=True)
    lines = [f"storage:\n  data_root: {root}\n",
             f"astrocal: {{catalog: gaia_folder, catalog_folder: {gaia}}}\n",
             f"photocal: {{catalog: gaia_folder, catalog_folder: {gaia}}}\n"]
    drop = []
    if kind == "sqlite":
        url = f"sqlite:///{root / 'seechange.sqlite'}"
    else:
        name = f"rel_{os.getpid()}_{next(_names)}"
        admin = make_engine(pg_cluster.url("postgres"))
        with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        url = pg_cluster.url(name)
        lines.insert(0, f"db:\n  url: {url}\n")

        def _drop(admin=admin, name=name):
            with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            admin.dispose()
        drop.append(_drop)
    config = folder / f"config{next(_names)}.yaml"
    config.write_text("".join(lines))
    return Installation(kind, root, config, url, drop)


def clone(install: Installation, folder: Path, *, pg_cluster=None) -> Installation:
    """A copy of an installation (database and data root), to damage without redoing its work."""
    import shutil

    copy = new_installation(install.kind, folder, _gaia_of(install), pg_cluster=pg_cluster)
    forget_engine(engine_for(install.url))      # no connection may stay open on the original
    shutil.rmtree(copy.root)
    shutil.copytree(install.root, copy.root, symlinks=True)
    if install.kind == "postgresql":
        name = make_url(copy.url).database
        admin = make_engine(pg_cluster.url("postgres"))
        with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(sa.text(f'DROP DATABASE "{name}"'))
            conn.execute(sa.text(f'CREATE DATABASE "{name}" TEMPLATE "{make_url(install.url).database}"'))
        admin.dispose()
    return copy


def _gaia_of(install: Installation) -> Path:
    return Path(Config.load(install.config_path).get("astrocal.catalog_folder"))


# --- workers -----------------------------------------------------------------------------------


class Worker:
    """A forked process running ``seechange`` commands one after the other (stops at the first
    that fails); its stdout and stderr go to ``log``."""

    def __init__(self, commands: list[list[str]], log: Path, *, fault: str | None = None,
                 env: dict[str, str] | None = None):
        self.log = log
        self.started = time.monotonic()
        self.pid = os.fork()
        if self.pid == 0:       # the child never returns from here
            _child(commands, log, {**THREAD_LIMITS, **(env or {}),
                                   models.faults.ENVIRONMENT_VARIABLE: fault or ""})
        self.status: int | None = None

    def poll(self, flags: int = 0) -> int | None:
        if self.status is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG | flags)
            if pid and (os.WIFEXITED(status) or os.WIFSIGNALED(status)):
                self.status = os.waitstatus_to_exitcode(status)
        return self.status

    def wait(self, timeout: float = 120.0) -> int:
        """The exit code (negative: the signal that ended it); kills it after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() > deadline:
                self.kill()
                os.waitpid(self.pid, 0)
                raise TimeoutError(f"worker {self.pid} did not finish in {timeout} s (deadlock?): "
                                   f"{self.output()[-2000:]}")
            time.sleep(0.02)
        return self.status

    def wait_stopped(self, timeout: float = 120.0) -> bool:
        """Wait until it stops itself (SIGSTOP at a fault point); False if it exited instead."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG | os.WUNTRACED)
            if pid and os.WIFSTOPPED(status):
                return True
            if pid and (os.WIFEXITED(status) or os.WIFSIGNALED(status)):
                self.status = os.waitstatus_to_exitcode(status)
                return False
            time.sleep(0.02)
        self.kill()
        raise TimeoutError(f"worker {self.pid} did not reach its stop point in {timeout} s")

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, sig)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


_inherited: list = []


def _child(commands: list[list[str]], log: Path, env: dict[str, str]) -> None:
    code = 99
    try:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), line_buffering=True)
        sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), line_buffering=True)
        os.environ.update(env)
        # Nothing of the parent's database connections or logging may be used here, nor closed
        # (closing a connection would end the parent's session): keep them referenced, unused.
        _inherited.append(dict(models.base._engines))
        models.base._engines.clear()
        models.context._process.clear()
        models.faults._reached.clear()
        logging.getLogger().handlers.clear()
        from pipeline.cli import main

        code = 0
        for argv in commands:
            code = main(argv)
            if code:
                break
    except BaseException:       # a bug of the harness: show it in the log
        import traceback

        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def exec_worker(commands: list[list[str]], log: Path, *, fault: str | None = None) -> subprocess.Popen:
    """The same as `Worker`, as a genuine new Python process (``tests/reliability/driver.py``)."""
    env = {**os.environ, **THREAD_LIMITS, models.faults.ENVIRONMENT_VARIABLE: fault or ""}
    handle = open(log, "w")
    return subprocess.Popen([sys.executable, "-m", "tests.reliability.driver", json.dumps(commands)],
                            cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT)


# --- what an installation holds ----------------------------------------------------------------


def product_models() -> list[type]:
    """Every product model: rows with their own UUID and a unique (parents, provenance) key, plus
    the file-backed ones (catalog excerpts)."""
    load_all_tables()
    found = {m.class_ for m in models.base.Base.registry.mappers
             if unique_keys(m.class_) and issubclass(m.class_, models.base.UUIDMixin)}
    return sorted(found | set(file_backed_models()), key=lambda cls: cls.__tablename__)


def counts(context: Context) -> dict[str, int]:
    with context.session() as session:
        return {m.__tablename__: session.scalar(select(func.count()).select_from(m)) for m in product_models()}


def duplicates(context: Context) -> int:
    """Rows beyond the first for any (parents, provenance) key -- must be 0."""
    extra = 0
    with context.session() as session:
        for model in product_models():
            for key in unique_keys(model):
                columns = [getattr(model, name) for name in key]
                groups = (select(func.count().label("n")).select_from(model).group_by(*columns)
                          .having(func.count() > 1).subquery())
                extra += session.scalar(select(func.coalesce(func.sum(groups.c.n - 1), 0))) or 0
    return int(extra)


def excerpt_copies(context: Context) -> int:
    """Catalog excerpts beyond the first for one (catalog, box, provenance): a cache, not a product
    (no unique key), so copies are harmless; counted for the report."""
    from models.catalog_excerpt import CatalogExcerpt as E

    with context.session() as session:
        groups = (select(func.count().label("n")).select_from(E)
                  .group_by(E.catalog, E.minra, E.maxra, E.mindec, E.maxdec, E.provenance_id)
                  .having(func.count() > 1).subquery())
        return int(session.scalar(select(func.coalesce(func.sum(groups.c.n - 1), 0))) or 0)


def assert_one_consistent_set(install: Installation, expected: dict[str, int] | None = None) -> None:
    """Exactly one set of products, no duplicates, every file in place with its md5, no orphans."""
    context = install.context()
    report = check(context, min_age=0)
    assert report.ok, "\n".join(p.line() for p in report.problems)
    found = counts(context)
    wanted = expected or ONE_SET
    assert found == {table: wanted.get(table, 0) for table in found}, found     # other products: none
    assert duplicates(context) == 0


def repairable_only(install: Installation) -> list[str]:
    """Check right after a kill: only leftovers that `clean` removes (orphan and temp files).
    Returns the kinds found."""
    context = install.context()
    upgrade(context.engine)      # as every command does first (a kill may have left no schema)
    report = check(context, min_age=0)
    kinds = [p.kind for p in report.problems]
    assert set(kinds) <= {"orphan file", "temp file"}, "\n".join(p.line() for p in report.problems)
    return kinds


def recover(install: Installation, raw: Path) -> None:
    """What an operator (or a cron job) does after a crash: run again, then clean."""
    for args in (("db", "upgrade"), ("ingest", str(raw)), ("run",)):
        code, out, err = install.cli(*args)
        assert code == 0, f"re-run of {' '.join(args)} failed: {out}\n{err}"
    clean(install.context(), min_age=0)
