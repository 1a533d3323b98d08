"""Security, kept as tests: no SQL assembled from strings in library code; no header value,
naming convention or symlink puts a path outside the data root (and ``db clean`` never deletes
outside it); passwords never appear in logs, errors or reports.
"""

from __future__ import annotations

import ast
import logging
from pathlib import Path

import pytest
import sqlalchemy as sa
from astropy.io import fits

from models.maintenance import check
from tests.models.synthetic_files import write_synthetic
from tests.reliability.harness import ROOT, new_installation

LIBRARY = ("improc", "models", "pipeline", "util", "alembic")
SQL_CALLS = {"text", "execute", "exec_driver_sql", "executemany", "executescript", "literal_column"}


def _built_string(node: ast.AST) -> bool:
    """An expression that assembles a string at run time: f-string, +, %, .format(), .join()."""
    if isinstance(node, ast.JoinedStr):
        return True
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mod)):
        return any(_text(side) or _built_string(side) for side in (node.left, node.right))
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and node.func.attr in ("format", "join") and _text(node.func.value))


def _text(node: ast.AST) -> bool:
    return isinstance(node, ast.JoinedStr) or (isinstance(node, ast.Constant) and isinstance(node.value, str))


def _offences(source: str) -> list[tuple[int, str]]:
    """(line, call) of every SQL call in ``source`` whose statement is assembled from strings."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call) or not node.args:
            continue
        name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        if name not in SQL_CALLS:
            continue
        first = node.args[0]
        literal = isinstance(first, ast.Constant) and isinstance(first.value, str)
        if _built_string(first) or (name in ("text", "literal_column") and not literal):
            found.append((node.lineno, ast.unparse(node)[:100]))
    return sorted(found)


def test_no_sql_is_assembled_from_strings_in_library_code():
    found = [f"{path.relative_to(ROOT)}:{line}: {call}"
             for package in LIBRARY for path in sorted((ROOT / package).rglob("*.py"))
             for line, call in _offences(path.read_text())]
    assert found == []


def test_the_scan_sees_assembled_statements():
    bad = ('session.execute(sa.text(f"SELECT * FROM {table}"))\n'
           'cursor.execute("DELETE FROM x WHERE id = " + name)\n'
           'conn.exec_driver_sql("DROP TABLE %s" % name)\n'
           'sa.text(query)\n'
           'conn.execute("SELECT {}".format(column))\n')
    assert [line for line, _ in _offences(bad)] == [1, 2, 3, 4, 5]
    good = ('session.execute(sa.select(Image).where(Image.id == image_id))\n'
            'cursor.execute("PRAGMA foreign_keys=ON")\n'
            'op.execute(sa.text("CREATE EXTENSION IF NOT EXISTS q3c"))\n')
    assert _offences(good) == []


# --- paths ---------------------------------------------------------------------------------------


def _outside_files(folder: Path, *inside: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file() and not any(i in p.parents for i in inside)}


HOSTILE = {"FILTER": "../../../../../../tmp/evil", "OBJECT": "/etc/passwd", "CCDNAME": "../../sect",
           "PROJECT": "..", "INSTRUME": "Synthetic"}


@pytest.mark.parametrize("convention", [None, "../../{name}", "/{name}", "{filter}/../../{name}_{process}",
                                        "{instrument}/./../{name}"])
def test_no_header_value_or_convention_leaves_the_data_root(tmp_path, field, convention):
    install = new_installation("sqlite", tmp_path / "inst", field.gaia)
    try:
        if convention:
            storage = f"storage: {{data_root: {install.root}, file_name_convention: '{convention}'}}\n"
            install.config_path.write_text(install.config_path.read_text() + storage)
        (tmp_path / "in").mkdir()
        image = write_synthetic(tmp_path / "in" / "hostile file ü.fits")
        with fits.open(image, mode="update") as hdul:
            for key, value in HOSTILE.items():
                hdul[0].header[key] = value
        before = _outside_files(tmp_path, install.root, tmp_path / "in")
        code, out, err = install.cli("ingest", str(image))
        assert code == 0, err
        install.cli("run")
        stored = [p for p in install.root.rglob("*") if p.is_file()]
        assert len(stored) >= 3
        assert _outside_files(tmp_path, install.root, tmp_path / "in") == before
        assert check(install.context(), min_age=0).ok
    finally:
        install.close()


def test_a_symlink_out_of_the_data_root_is_never_written_through_nor_cleaned(tmp_path, field):
    install = new_installation("sqlite", tmp_path / "inst", field.gaia)
    try:
        outside = tmp_path / "outside"
        outside.mkdir()
        bait = outside / "Synthetic_20230225_x_0_r_science_backgrounding_0123456789.h5"
        bait.write_bytes(b"not ours")
        (install.root / "Synthetic").symlink_to(outside, target_is_directory=True)
        code, out, err = install.cli("ingest", str(field.raw))
        assert code == 1 and "leaves the data root" in err and len(err.strip().splitlines()) == 1, err
        assert sorted(outside.iterdir()) == [bait]
        assert install.cli("db", "clean", "--min-age", "0")[0] == 0
        assert bait.read_bytes() == b"not ours"
        # a row whose path was tampered with to point outside: reported, its row removed, the file kept
        (install.root / "Synthetic").unlink()
        assert install.cli("ingest", str(field.raw))[0] == 0
        context = install.context()
        with context.engine.begin() as conn:
            conn.execute(sa.text("UPDATE exposures SET filepath = :p"), {"p": "../outside/" + bait.name})
        code, out, err = install.cli("db", "check", "--min-age", "0")
        assert code == 1 and "leaves the data root" in out
        assert install.cli("db", "clean", "--min-age", "0")[0] == 0
        assert bait.read_bytes() == b"not ours"
    finally:
        install.close()


# --- passwords -----------------------------------------------------------------------------------

SECRET = "Pw-4f9b2c7e-never-print-me"


@pytest.mark.postgres
def test_passwords_never_appear_in_output_logs_or_errors(tmp_path, field, pg_cluster, caplog):
    caplog.set_level(logging.DEBUG)
    install = new_installation("postgresql", tmp_path / "inst", field.gaia, pg_cluster=pg_cluster)
    try:
        url = sa.engine.make_url(install.url)
        with_password = url.set(password=SECRET).render_as_string(hide_password=False)
        text = install.config_path.read_text().replace(install.url, with_password)
        install.config_path.write_text(text)
        outputs = []
        for args in (("-v", "db", "upgrade"), ("-v", "ingest", str(field.raw)), ("-v", "run"),
                     ("-v", "db", "check"), ("provenance", "list"), ("images",)):
            code, out, err = install.cli(*args)
            assert code == 0, err
            outputs += [out, err]
        # a password file, and a server that does not answer: an error line, still no password
        secret_file = tmp_path / "pw"
        secret_file.write_text(SECRET + "\n")
        closed = url.set(port=1, password=None).render_as_string(hide_password=False)
        install.config_path.write_text(text.replace(with_password, f"{closed}\n  password_file: {secret_file}"))
        code, out, err = install.cli("db", "check")
        assert code == 1 and "database error" in err and len(err.strip().splitlines()) == 1, err
        outputs += [out, err]
        with pytest.raises(sa.exc.OperationalError) as raised:
            install.cli("-v", "images")
        outputs.append(str(raised.value))
        everything = "\n".join(outputs) + caplog.text
        assert SECRET not in everything
        assert "***" in everything or "postgresql" in everything
    finally:
        install.close()
