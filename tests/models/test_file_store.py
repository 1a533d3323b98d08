"""The file store: atomic writes, md5 checks, paths that cannot leave the data root, walking it."""

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


def test_product_files_get_the_usual_permissions_and_temporary_names(tmp_path, monkeypatch):
    import stat

    import models.file_store
    from models.file_store import TEMP_NAME

    store = FileStore(tmp_path)
    seen = []
    monkeypatch.setattr(models.file_store, "fault_point",
                        lambda point, kind: seen.append((point, kind, sorted(p.name for p in tmp_path.iterdir()))))
    store.write("x.bin", lambda p: p.write_bytes(b"1"), kind="Background")
    mode = stat.S_IMODE(store.absolute("x.bin").stat().st_mode)
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask                    # not mkstemp's 0600: a group can read products
    (point, kind, names), (point2, _, names2) = seen
    assert (point, kind, point2) == ("temp_written", "Background", "file_in_place")
    assert len(names) == 1 and TEMP_NAME.match(names[0]) and TEMP_NAME.match(names[0])["final"] == "x.bin"
    assert names2 == ["x.bin"]


def test_an_interruption_after_the_link_removes_the_new_file(tmp_path, monkeypatch):
    import models.file_store

    def interrupt(point, kind):
        if point == "file_in_place":
            raise KeyboardInterrupt

    monkeypatch.setattr(models.file_store, "fault_point", interrupt)
    store = FileStore(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        store.write("a/y.bin", lambda p: p.write_bytes(b"2"))
    assert _files(tmp_path) == []


def test_walk_lists_files_below_the_root_and_never_follows_symlinks(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.fits").write_bytes(b"x")
    store = FileStore(tmp_path / "root")
    store.write("a/b.fits", lambda p: p.write_bytes(b"1"))
    (store.root / "a" / ".b.fits.abcd1234.tmp").write_bytes(b"")
    (store.root / "link").symlink_to(outside, target_is_directory=True)
    (store.root / "a" / "file_link.fits").symlink_to(outside / "secret.fits")
    assert list(store.walk()) == ["a/.b.fits.abcd1234.tmp", "a/b.fits"]


def test_the_convention_pattern_matches_the_names_it_gives():
    from models.file_store import DEFAULT_CONVENTION, convention_pattern

    stem = product_file_stem(instrument="DECam", mjd=60000.0, section="N6", filter="r DECam", type="science",
                             process="extraction", prov="abcdef0123456", name="psf-0123456789ab")
    pattern = convention_pattern(DEFAULT_CONVENTION)
    assert pattern.match(stem + ".h5") and pattern.match(stem + ".fits.fz")
    assert not pattern.match("demo_inputs/demo_raw_0.fits") and not pattern.match("seechange.sqlite")
    other = convention_pattern("by_filter/{filter}/{instrument}_{name}")
    assert other.match("by_filter/R/TestCam_abc.fits") and not other.match("elsewhere/R/TestCam_abc.fits")


def test_a_time_that_is_no_calendar_date_is_a_clear_error():
    with pytest.raises(ValueError, match="MJD 1000000000000.0 is not a calendar date"):
        product_file_stem(instrument="i", mjd=1e12, section="s", filter="f", type="t", process="p",
                          prov="x", name="n")
