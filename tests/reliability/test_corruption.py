"""Corruption: flip a bit, truncate, or delete the file of each product kind of a complete run.

``seechange db check`` finds every case (exit 1, naming the file); ``seechange run --verify``
makes the damaged product again, with everything made from it, and the installation is back to
one consistent set.  An exposure's file (the copy of the original) cannot be made by a run:
``run --verify`` says so in one line, ``db clean`` removes it with all it led to, and ingesting
the original again brings everything back.  Without ``--verify`` a run skips, as it must.
"""

from __future__ import annotations

import os

import pytest
from sqlalchemy import select

from models.maintenance import file_backed_models
from tests.reliability.conftest import BACKENDS
from tests.reliability.figures import record
from tests.reliability.harness import assert_one_consistent_set, clone

KINDS = ("Exposure", "Image", "Background", "SourceList", "PSF", "CatalogExcerpt")
DAMAGES = ("flip", "truncate", "delete")

#: The fast subset run in CI: every kind once, every damage twice, on SQLite; three on PostgreSQL.
FAST = {"sqlite": {("Image", "flip"), ("Background", "truncate"), ("SourceList", "delete"),
                   ("PSF", "flip"), ("CatalogExcerpt", "truncate"), ("Exposure", "delete")},
        "postgresql": {("PSF", "truncate"), ("Image", "delete"), ("CatalogExcerpt", "flip")}}


def damage(path, how: str) -> None:
    if how == "delete":
        path.unlink()
        return
    size = path.stat().st_size
    with open(path, "r+b") as handle:
        if how == "truncate":
            handle.truncate(size // 2)
        else:
            handle.seek(size // 2)
            byte = handle.read(1)
            handle.seek(size // 2)
            handle.write(bytes([byte[0] ^ 0x01]))
        handle.flush()
        os.fsync(handle.fileno())


_complete: dict[str, object] = {}


@pytest.fixture
def complete(request, installations, field, tmp_path_factory):
    """A copy of an installation where the pipeline ran once (the original is made once per back end)."""
    backend = request.node.callspec.params["backend"]
    cluster = request.getfixturevalue("pg_cluster") if backend == "postgresql" else None
    if backend not in _complete:
        original = installations(backend)
        original.drop.clear()     # kept for the session (PostgreSQL: the template of the copies)
        for args in (("db", "upgrade"), ("ingest", str(field.raw)), ("run",)):
            assert original.cli(*args)[0] == 0
        _complete[backend] = original
    copy = clone(_complete[backend], tmp_path_factory.mktemp("copy"), pg_cluster=cluster)
    yield copy
    copy.close()


def _cases():
    for backend in BACKENDS:
        name = getattr(backend, "values", [backend])[0]
        marks = list(getattr(backend, "marks", []))
        for kind in KINDS:
            for how in DAMAGES:
                extra = [] if (kind, how) in FAST[name] else [pytest.mark.campaign]
                yield pytest.param(name, kind, how, marks=marks + extra, id=f"{name}-{kind}-{how}")


@pytest.mark.parametrize("backend, kind, how", list(_cases()))
def test_damage_is_found_and_made_again(complete, field, backend, kind, how):
    install = complete
    context = install.context()
    model = next(m for m in file_backed_models() if m.__name__ == kind)
    with context.session() as session:
        row = session.scalars(select(model)).one()
    damage(install.root / row.filepath, how)
    record("corruption cases tried", backend)

    code, out, err = install.cli("db", "check", "--min-age", "0")
    assert code == 1 and row.filepath in out, out + err
    assert ("missing file" if how == "delete" else "md5 mismatch") in out
    record("corruption cases found by db check", backend)
    assert install.cli("run")[0] == 0           # without --verify: skipped, as designed

    code, out, err = install.cli("run", "--verify")
    if kind == "Exposure":
        assert code == 1 and len(err.strip().splitlines()) == 1, out + err
        assert "db clean" in err and field.raw.name in err
        assert install.cli("db", "clean", "--min-age", "0")[0] == 0
        for args in (("ingest", str(field.raw)), ("run",)):
            code, out, err = install.cli(*args)
            assert code == 0, out + err
    else:
        assert code == 0, out + err
        assert f"damaged {kind}" in out, out
    assert_one_consistent_set(install)
    record("corruption cases repaired", backend)
