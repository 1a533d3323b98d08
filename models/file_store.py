"""Files of products: where they live under the data root, atomic writes, md5 checks.

Big arrays live in files below ``storage.data_root``; the row keeps the path relative to the data
root and the md5 of the file.  A file is written to a temporary name in its final folder
(``.<name>.<random>.tmp``, see `TEMP_NAME`), flushed to disk with fsync and hard-linked under
its final name, which is never replaced, so a reader sees no file or the complete one, never a
half-written one.  A process killed meanwhile leaves at most a temporary file, or a complete
file without a row; both are harmless (every product's name contains its own id, so nothing
ever collides with them) and ``seechange db clean`` removes them (`models.maintenance`).
Loading checks the md5 and raises `FileIntegrityError` when it differs.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import string
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Mapped, mapped_column

from models.faults import fault_point
from util.config import ConfigError


__all__ = ["FileStore", "FileIntegrityError", "FileBackedMixin", "md5_of", "content_md5", "safe_component",
           "product_file_stem", "convention_pattern",
           "FILE_STEM_FIELDS", "DEFAULT_CONVENTION", "TEMP_NAME"]

#: The default ``storage.file_name_convention`` (default_config.yaml documents it).
DEFAULT_CONVENTION = ("{instrument}/{date}/{instrument}_{date}_{name}_{section}_{filter}_{type}_"
                      "{process}_{prov}")

_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")

#: Names of temporary files: ``.<final name>.<8 random characters>.tmp`` (`FileStore.write`).
TEMP_NAME = re.compile(r"^\.(?P<final>.+)\.[A-Za-z0-9_]{8}\.tmp$")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


#: Permissions of new product files: those of any file this process creates (mkstemp's are 0600).
_FILE_MODE = 0o666 & ~_umask()


class FileIntegrityError(OSError):
    """A product file is missing or its md5 differs from the one stored in the database."""


def md5_of(path: str | os.PathLike, *, chunk: int = 1 << 22) -> str:
    """The hex md5 of a file, read in chunks."""
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


_content_md5s: dict[tuple[str, int, int], str] = {}


def content_md5(path: str | os.PathLike) -> str:
    """The md5 of a file's content, remembered per (path, size, modification time) in this process.

    For inputs named by configuration (calibration frames, catalog files) whose content, not
    path, enters provenances and cache keys.
    """
    resolved = Path(path).expanduser().resolve()
    stat = resolved.stat()
    key = (str(resolved), stat.st_size, stat.st_mtime_ns)
    if key not in _content_md5s:
        _content_md5s[key] = md5_of(resolved)
    return _content_md5s[key]


def safe_component(value: Any) -> str:
    """One path component made only of ``[A-Za-z0-9._+-]``, never ``.`` or ``..``.

    Everything else (slashes, spaces, unicode) becomes ``_`` so that no user-supplied string
    (a filter name, a target) can make a path leave the data root.
    """
    text = _UNSAFE.sub("_", str(value)).strip("._") or "none"
    return text[:80]


class FileStore:
    """Product files below one data root, named by one convention.

    Parameters
    ----------
    root : str or path-like
        The data root; created if missing.
    convention : str
        ``storage.file_name_convention``: how product files are named (see `product_file_stem`).
    """

    def __init__(self, root: str | os.PathLike, *, convention: str = DEFAULT_CONVENTION):
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.convention = convention

    def __repr__(self) -> str:
        return f"FileStore({str(self.root)!r})"

    def stem(self, **fields: Any) -> str:
        """`product_file_stem` with this store's naming convention."""
        return product_file_stem(**fields, convention=self.convention)

    def absolute(self, relpath: str) -> Path:
        """The absolute path of ``relpath``; ValueError if it would leave the data root."""
        path = (self.root / relpath).resolve()
        if path != self.root and self.root not in path.parents:
            raise ValueError(f"path {relpath!r} leaves the data root {self.root}")
        return path

    def write(self, relpath: str, writer: Callable[[Path], None], *, overwrite: bool = False,
              kind: str = "file", placed: list[Path] | None = None) -> str:
        """Write a file atomically and return its md5.

        An existing file is never replaced unless ``overwrite`` is set: product files are
        unique by name, and replacing another product's file would corrupt it.

        Parameters
        ----------
        relpath : str
            Destination relative to the data root.
        writer : callable
            ``writer(tmp_path)`` writes the whole file at ``tmp_path``.
        overwrite : bool
            Replace an existing file.
        kind : str
            What the file holds (a product's class name), for `models.faults.fault_point`.
        placed : list of Path, optional
            The new file's path is appended the moment it is in place (not when overwriting), so
            that a caller undoing a save knows of it even if a signal interrupts this call after
            its own clean-up can no longer run.

        Returns
        -------
        str
            The md5 of the written file.

        Raises
        ------
        FileExistsError
            ``relpath`` exists and ``overwrite`` is False.
        """
        final = self.absolute(relpath)
        if final.exists() and not overwrite:
            raise FileExistsError(f"product file {final} already exists; refusing to replace it")
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        linked = False
        try:
            writer(tmp)
            os.chmod(tmp, _FILE_MODE)
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
            md5 = md5_of(tmp)
            fault_point("temp_written", kind)
            if overwrite:
                os.replace(tmp, final)
            else:
                # link() fails if the name was taken meanwhile, so two writers never clobber.
                os.link(tmp, final)
                linked = True
                if placed is not None:
                    placed.append(final)
                tmp.unlink()
            _fsync_folder(final.parent)
            fault_point("file_in_place", kind)
        except BaseException:       # also KeyboardInterrupt, SIGTERM (pipeline.cli): leave nothing
            tmp.unlink(missing_ok=True)
            if linked:
                final.unlink(missing_ok=True)
            raise
        return md5

    def verified_path(self, relpath: str, md5: str | None) -> Path:
        """The absolute path of a stored file after checking that it exists and its md5 matches."""
        path = self.absolute(relpath)
        if not path.is_file():
            raise FileIntegrityError(f"product file {path} is missing")
        if md5 is not None:
            found = md5_of(path)
            if found != md5:
                raise FileIntegrityError(f"md5 mismatch for {path}: database has {md5}, file has {found}")
        return path

    def delete(self, relpath: str) -> None:
        """Delete a stored file (no error if it is already gone)."""
        self.absolute(relpath).unlink(missing_ok=True)

    def walk(self) -> Iterator[str]:
        """Every regular file below the root, as a path relative to it (symlinks are not followed
        and not listed: nothing outside the data root is ever looked at)."""
        for folder, dirs, files in os.walk(self.root, followlinks=False):
            here = Path(folder)
            dirs[:] = sorted(d for d in dirs if not (here / d).is_symlink())
            for name in sorted(files):
                path = here / name
                if not path.is_symlink() and path.is_file():
                    yield path.relative_to(self.root).as_posix()

    def matches_convention(self, relpath: str) -> bool:
        """Whether ``relpath`` (any extension) is a name this store's convention can give."""
        return convention_pattern(self.convention).match(relpath) is not None


def _fsync_folder(folder: Path) -> None:
    """Make a new name in ``folder`` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class FileBackedMixin:
    """Columns and file handling of a product whose arrays live in one file.

    A subclass implements ``_write(path)`` (write the whole file at ``path``) and ``_read(path)``
    (fill in-memory attributes from ``path``); ``file_extension`` names the format.  The file's
    name (relative path without the extension) comes from ``file_stem(store)``: rows that name
    themselves (exposures, images, catalog excerpts) override it; products made by pipeline steps
    are named by the DataStore, which knows their image and process (`set_file_stem`).  Every
    name contains the start of the row's own id, so a file left behind by an interrupted save
    never blocks a later one.
    """

    file_extension: str = ".fits"

    filepath: Mapped[str | None] = mapped_column(sa.String(512), default=None)
    md5sum: Mapped[str | None] = mapped_column(sa.String(32), default=None)

    def _write(self, path: Path) -> None:
        raise NotImplementedError(f"{type(self).__name__} does not define _write")

    def _read(self, path: Path) -> None:
        raise NotImplementedError(f"{type(self).__name__} does not define _read")

    def set_file_stem(self, stem: str) -> None:
        """Name the file this product will be saved to (relative path, no extension)."""
        self._file_stem = stem

    def file_stem(self, store: FileStore) -> str:
        stem = getattr(self, "_file_stem", None)
        if stem is None:
            raise NotImplementedError(f"{type(self).__name__} {getattr(self, 'id', '')} has no file "
                                      "name: save it through a DataStore, which names it")
        return stem

    def save_file(self, store: FileStore, placed: list[Path] | None = None) -> Path:
        """Write the product's file atomically; set ``filepath`` and ``md5sum``; return the path.
        ``placed`` gets the path as soon as the file is in place (`FileStore.write`)."""
        relpath = self.file_stem(store) + self.file_extension
        self.md5sum = store.write(relpath, self._write, kind=type(self).__name__, placed=placed)
        self.filepath = relpath
        return store.absolute(relpath)

    def file_store(self) -> FileStore:
        """The store this row's file lives in: that of the context it came from."""
        from models.context import context_of

        return context_of(self).store

    def load_file(self, store: FileStore | None = None) -> None:
        """Read the product's file after verifying its md5."""
        if self.filepath is None:
            raise FileIntegrityError(f"{type(self).__name__} {getattr(self, 'id', '')} has no file")
        store = store or self.file_store()
        self._read(store.verified_path(self.filepath, self.md5sum))

    def delete_file(self, store: FileStore | None = None) -> None:
        """Delete the product's file, if it has one."""
        if self.filepath is not None:
            (store or self.file_store()).delete(self.filepath)


#: Fields a ``storage.file_name_convention`` may use.
FILE_STEM_FIELDS = ("instrument", "date", "section", "filter", "type", "process", "prov", "name")


def product_file_stem(*, instrument: str, mjd: float | None, section: str | None, filter: str | None,
                      type: str, process: str, prov: str | None, name: str,
                      convention: str = DEFAULT_CONVENTION) -> str:
    """The relative path (without extension) of a product file under the data root.

    Parameters
    ----------
    instrument, section, filter, type, process, name : str
        Fields of the convention; each is made safe with `safe_component`, so no value
        (``"../../etc"``) can make the path leave the data root.
    mjd : float or None
        Observation time; the ``date`` field is its UTC ``YYYYMMDD`` (``"nodate"`` if None).
    prov : str
        Provenance id; its first 10 characters fill the ``prov`` field.
    convention : str
        A ``str.format`` pattern using `FILE_STEM_FIELDS`; slashes make folders (the
        ``storage.file_name_convention`` of a configuration; `FileStore.stem` passes its own).

    Raises
    ------
    ConfigError
        If the convention uses an unknown field or gives an empty name.
    ValueError
        If ``mjd`` is not a calendar date.
    """
    from astropy.time import Time

    try:
        date = "nodate" if mjd is None else Time(mjd, format="mjd").strftime("%Y%m%d")
    except (ValueError, ArithmeticError) as exc:     # ERFA refuses dates beyond its calendar
        raise ValueError(f"observation time MJD {mjd} is not a calendar date ({exc})") from None
    fields = {"instrument": instrument, "date": date, "section": section or "all",
              "filter": filter or "nofilter", "type": type, "process": process,
              "prov": (prov or "noprov")[:10], "name": name}
    safe = {key: safe_component(value) for key, value in fields.items()}
    try:
        stem = convention.format(**safe)
    except (KeyError, IndexError) as exc:
        raise ConfigError(f"storage.file_name_convention {convention!r} uses unknown field {exc}; "
                         f"known fields: {', '.join(FILE_STEM_FIELDS)}") from None
    parts = [part for part in stem.split("/") if part not in ("", ".", "..")]
    if not parts:
        raise ConfigError(f"storage.file_name_convention {convention!r} gives an empty file name")
    return "/".join(parts)


@functools.lru_cache(maxsize=32)
def convention_pattern(convention: str) -> re.Pattern:
    """A regular expression matching the relative paths (with any extension) a convention gives.

    Every field becomes a run of the characters `safe_component` keeps, literal text stays
    literal; `models.maintenance` uses it to tell product files from other files in the data root.
    """
    parts = []
    for literal, field, _spec, _conversion in string.Formatter().parse(convention):
        parts.append(re.escape(literal))
        if field is not None:
            parts.append(r"[A-Za-z0-9._+-]+")
    components = "".join(parts).split("/")
    kept = "/".join(c for c in components if c not in ("", re.escape("."), re.escape("..")))
    return re.compile(rf"^{kept}\.[A-Za-z0-9.]+$")
