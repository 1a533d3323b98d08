"""The file store: atomic writes, md5 checks, paths that cannot leave the data root."""

import hashlib
import os

import pytest

from models.file_store import product_file_stem
from models.file_store import FileIntegrityError, FileStore, md5_of, safe_component
from util.config import ConfigError


def _files(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_atomic_write_returns_md5_and_leaves_no_temporary(tmp_path):
    store = FileStore(tmp_path / "root")
    payload = os.urandom(10000)
    md5 = store.write("a/b/c.bin", lambda p: p.write_bytes(payload))
    assert md5 == hashlib.md5(payload).hexdigest() == md5_of(store.absolute("a/b/c.bin"))
    assert _files(store.root) == ["a/b/c.bin"]

    def broken(path):
        path.write_bytes(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        store.write("a/b/d.bin", broken)
    assert _files(store.root) == ["a/b/c.bin"]  # no d.bin, no temporary file
    # an existing product file is never replaced by accident ...
    with pytest.raises(FileExistsError, match="c.bin already exists"):
        store.write("a/b/c.bin", lambda p: p.write_bytes(b"other"))
    # ... and a failed deliberate rewrite keeps the old complete file
    with pytest.raises(RuntimeError):
        store.write("a/b/c.bin", broken, overwrite=True)
    assert md5_of(store.absolute("a/b/c.bin")) == md5


def test_verified_path_detects_missing_and_changed_files(tmp_path):
    store = FileStore(tmp_path)
    md5 = store.write("x.bin", lambda p: p.write_bytes(b"0123456789"))
    assert store.verified_path("x.bin", md5) == store.absolute("x.bin")
    store.absolute("x.bin").write_bytes(b"0123456788")
    with pytest.raises(FileIntegrityError, match="md5 mismatch"):
        store.verified_path("x.bin", md5)
    store.delete("x.bin")
    with pytest.raises(FileIntegrityError, match="missing"):
        store.verified_path("x.bin", md5)
    store.delete("x.bin")  # deleting twice is fine


@pytest.mark.parametrize("relpath", ["../outside.bin", "a/../../outside.bin", "/etc/passwd"])
def test_absolute_refuses_paths_leaving_the_root(tmp_path, relpath):
    store = FileStore(tmp_path / "root")
    with pytest.raises(ValueError, match="leaves the data root"):
        store.absolute(relpath)


@pytest.mark.parametrize("value", ["../../etc", "..", ".", "/etc/passwd", "a b/c", "é", ""])
def test_safe_component(value):
    safe = safe_component(value)
    assert safe not in ("", ".", "..") and "/" not in safe
    assert all(c.isalnum() or c in "._+-" for c in safe)


def test_file_stem_fields_cannot_escape(tmp_path):
    store = FileStore(tmp_path / "root")
    stem = product_file_stem(instrument="../../..", mjd=60000.0, section="/etc", filter="../../etc",
                             type="..", process="x/../../y", prov="abc", name="..",
                             convention="{instrument}/{date}/{filter}_{section}_{type}_{process}_{prov}_{name}")
    path = store.absolute(stem + ".fits")
    assert store.root in path.parents
    assert stem.split("/")[1] == "20230225"
    with pytest.raises(ConfigError, match="unknown field 'colour'"):
        product_file_stem(instrument="i", mjd=None, section="s", filter="f", type="t", process="p",
                          prov="x", name="n", convention="{colour}/{name}")
