"""Resources: the disk fills up during a save, the database goes away mid-run, SIGTERM arrives.

Each is met at an exact saving point: the worker stops itself there (``...:stop``, SIGSTOP),
the test takes the resource away, and the worker goes on.  The command fails cleanly (exit 1,
one line, no traceback, no SQL), nothing is half-saved (the checker finds no leftover of the
failed save), and once the resource is back the next run completes with one set of products.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess

import pytest
import sqlalchemy as sa

from models.base import make_engine
from models.maintenance import check
from tests.reliability.conftest import BACKENDS
from tests.reliability.figures import record
from tests.reliability.harness import (Worker, assert_one_consistent_set, new_installation, recover)


def _error_lines(text: str) -> list[str]:
    """The lines a user reads as errors (warnings of the log left aside)."""
    return [line for line in text.splitlines() if line.strip() and " WARNING " not in line]


def _fails_cleanly(worker: Worker, *words: str) -> str:
    code = worker.wait()
    text = worker.output()
    lines = _error_lines(text)
    assert code == 1, f"exit {code}:\n{text}"
    assert "Traceback" not in text and "[SQL" not in text, text
    errors = [line for line in lines if "error" in line]
    assert len(errors) == 1 and any(w in errors[0] for w in words), text
    return errors[0]


@contextlib.contextmanager
def _small_disk(folder, megabytes: int):
    """A tmpfs of the given size mounted at ``folder`` (root only)."""
    folder.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(folder)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip()}): needs root")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def _fill(folder) -> os.PathLike:
    """Fill the file system of ``folder`` until a write fails with ENOSPC."""
    filler = folder / "filler.bin"
    with open(filler, "wb", buffering=0) as handle:
        for size in (1 << 20, 1 << 12, 1):
            try:
                while True:
                    handle.write(b"\0" * size)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
    return filler


@pytest.mark.parametrize("backend", BACKENDS)
def test_disk_full_during_a_save(tmp_path, field, backend, request):
    cluster = request.getfixturevalue("pg_cluster") if backend == "postgresql" else None
    with _small_disk(tmp_path / "small", 24) as disk:
        install = new_installation(backend, disk, field.gaia, pg_cluster=cluster)
        try:
            worker = Worker(install.commands(field.raw), tmp_path / "worker.log",
                            fault="after_commit:Image:1:stop")
            assert worker.wait_stopped(), worker.output()
            filler = _fill(disk)
            worker.resume()
            _fails_cleanly(worker, "No space left on device", "disk is full")
            record("disk full: clean failures", backend)
            filler.unlink()
            report = check(install.context(), min_age=0)
            assert report.ok, "\n".join(p.line() for p in report.problems)   # nothing half-saved
            recover(install, field.raw)
            assert_one_consistent_set(install)
            record("disk full: recovered", backend)
        finally:
            install.close()


@pytest.mark.postgres
def test_postgresql_gone_mid_run(installations, field, tmp_path, pg_cluster):
    install = installations("postgresql")
    name = sa.engine.make_url(install.url).database
    worker = Worker(install.commands(field.raw), tmp_path / "worker.log",
                    fault="file_in_place:Background:1:stop")
    assert worker.wait_stopped(), worker.output()
    admin = make_engine(pg_cluster.url("postgres"))
    try:
        with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(sa.text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false'))
            conn.execute(sa.select(sa.func.pg_terminate_backend(sa.column("pid")))
                         .select_from(sa.table("pg_stat_activity"))
                         .where(sa.column("datname") == name))
        worker.resume()
        line = _fails_cleanly(worker, "database error")
        assert name in line or "connection" in line or "terminat" in line, line
        record("database gone: clean failures", "postgresql")
    finally:
        with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(sa.text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true'))
        admin.dispose()
    report = check(install.context(), min_age=0)
    assert report.ok, "\n".join(p.line() for p in report.problems)     # its background file went too
    recover(install, field.raw)
    assert_one_consistent_set(install)
    record("database gone: recovered", "postgresql")


def test_sqlite_file_removed_mid_run(installations, field, tmp_path):
    """An embedded database cannot vanish under an open connection: the run finishes into the
    removed file.  The next command starts a new database; the checker sees the files of the lost
    one as orphans, ``db clean`` removes them, and a re-run (ingest, run) makes everything again."""
    install = installations("sqlite")
    worker = Worker(install.commands(field.raw), tmp_path / "worker.log",
                    fault="after_commit:Background:1:stop")
    assert worker.wait_stopped(), worker.output()
    for suffix in ("", "-wal", "-shm"):
        (install.root / f"seechange.sqlite{suffix}").unlink(missing_ok=True)
    worker.resume()
    assert worker.wait() in (0, 1), worker.output()
    assert "Traceback" not in worker.output()
    assert install.cli("db", "upgrade")[0] == 0
    report = check(install.context(), min_age=0)
    assert {p.kind for p in report.problems} <= {"orphan file"}
    recover(install, field.raw)
    assert_one_consistent_set(install)
    record("database gone: recovered", "sqlite")


@pytest.mark.parametrize("backend", BACKENDS)
def test_sigterm_during_a_save_cleans_up(installations, field, tmp_path, backend):
    """A pre-empted worker gets SIGTERM first: the save in progress is undone, files included."""
    install = installations(backend)
    worker = Worker(install.commands(field.raw), tmp_path / "worker.log",
                    fault="file_in_place:SourceList:1:stop")
    assert worker.wait_stopped(), worker.output()
    worker.kill(signal.SIGTERM)
    worker.resume()
    assert worker.wait() == 128 + signal.SIGTERM, worker.output()
    assert "interrupted by SIGTERM" in worker.output() and "Traceback" not in worker.output()
    report = check(install.context(), min_age=0)
    assert report.ok, "\n".join(p.line() for p in report.problems)    # not even an orphan
    recover(install, field.raw)
    assert_one_consistent_set(install)
    record("SIGTERM: clean stops", backend)
