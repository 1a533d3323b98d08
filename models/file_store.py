"""Files of products: where they live under the data root, atomic writes, md5 checks.

Big arrays live in files below ``storage.data_root``; the row keeps the path relative to the data
root and the md5 of the file.  A file is written to a temporary name in its final folder, flushed
to disk with fsync and renamed, so a reader sees the old file or the complete new one, never a
half-written one.  Loading checks the md5 and raises `FileIntegrityError` when it differs.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Mapped, mapped_column

from util.config import Config

__all__ = ["FileStore", "FileIntegrityError", "FileBackedMixin", "md5_of", "safe_component", "product_file_stem",
           "current_file_store", "use_file_store"]

_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")


class FileIntegrityError(OSError):
    """A product file is missing or its md5 differs from the one stored in the database."""


def md5_of(path: str | os.PathLike, *, chunk: int = 1 << 22) -> str:
    """The hex md5 of a file, read in chunks."""
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def safe_component(value: Any) -> str:
    """One path component made only of ``[A-Za-z0-9._+-]``, never ``.`` or ``..``.

    Everything else (slashes, spaces, unicode) becomes ``_`` so that no user-supplied string
    (a filter name, a target) can make a path leave the data root.
    """
    text = _UNSAFE.sub("_", str(value)).strip("._") or "none"
    return text[:80]


class FileStore:
    """Product files below one data root.

    Parameters
    ----------
    root : str or path-like
        The data root; created if missing.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"FileStore({str(self.root)!r})"

    def absolute(self, relpath: str) -> Path:
        """The absolute path of ``relpath``; ValueError if it would leave the data root."""
        path = (self.root / relpath).resolve()
        if path != self.root and self.root not in path.parents:
            raise ValueError(f"path {relpath!r} leaves the data root {self.root}")
        return path

    def write(self, relpath: str, writer: Callable[[Path], None]) -> str:
        """Write a file atomically and return its md5.

        Parameters
        ----------
        relpath : str
            Destination relative to the data root.
        writer : callable
            ``writer(tmp_path)`` writes the whole file at ``tmp_path``.

        Returns
        -------
        str
            The md5 of the written file.
        """
        final = self.absolute(relpath)
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            writer(tmp)
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
            md5 = md5_of(tmp)
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
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


_current: list[FileStore] = []


def use_file_store(target: Config | FileStore | str | os.PathLike) -> FileStore:
    """Make the library write product files below a data root from now on."""
    if isinstance(target, Config):
        store = FileStore(target.get("storage.data_root"))
    elif isinstance(target, FileStore):
        store = target
    else:
        store = FileStore(target)
    _current[:] = [store]
    return store


def current_file_store() -> FileStore:
    """The file store in use (from the default configuration if none was chosen)."""
    if not _current:
        use_file_store(Config.load())
    return _current[0]


class FileBackedMixin:
    """Columns and file handling of a product whose arrays live in one file.

    A subclass implements ``_write(path)`` (write the whole file at ``path``), ``_read(path)``
    (fill in-memory attributes from ``path``) and ``file_stem()`` (the relative path without the
    extension); ``file_extension`` names the format.
    """

    file_extension: str = ".fits"

    filepath: Mapped[str | None] = mapped_column(sa.String(512), default=None)
    md5sum: Mapped[str | None] = mapped_column(sa.String(32), default=None)

    def _write(self, path: Path) -> None:
        raise NotImplementedError(f"{type(self).__name__} does not define _write")

    def _read(self, path: Path) -> None:
        raise NotImplementedError(f"{type(self).__name__} does not define _read")

    def file_stem(self) -> str:
        raise NotImplementedError(f"{type(self).__name__} does not define file_stem")

    def save_file(self, store: FileStore | None = None) -> Path:
        """Write the product's file atomically; set ``filepath`` and ``md5sum``; return the path."""
        store = store or current_file_store()
        relpath = self.file_stem() + self.file_extension
        self.md5sum = store.write(relpath, self._write)
        self.filepath = relpath
        return store.absolute(relpath)

    def load_file(self, store: FileStore | None = None) -> None:
        """Read the product's file after verifying its md5."""
        if self.filepath is None:
            raise FileIntegrityError(f"{type(self).__name__} {getattr(self, 'id', '')} has no file")
        store = store or current_file_store()
        self._read(store.verified_path(self.filepath, self.md5sum))

    def delete_file(self, store: FileStore | None = None) -> None:
        """Delete the product's file, if it has one."""
        if self.filepath is not None:
            (store or current_file_store()).delete(self.filepath)


def product_file_stem(*, instrument: str, mjd: float | None, section: str | None, filter: str | None,
                      type: str, process: str, provenance_id: str, name: str,
                      convention: str | None = None) -> str:
    """Relative path (without extension) of a product file, from ``storage.file_name_convention``.

    Every field goes through `safe_component`, so the result always stays below the data root.
    """
    from astropy.time import Time

    if convention is None:
        convention = Config.load().get("storage.file_name_convention")
    date = Time(mjd, format="mjd").strftime("%Y%m%d") if mjd is not None else "nodate"
    fields = {"instrument": instrument, "date": date, "section": section or "all",
              "filter": filter or "nofilter", "type": type, "process": process,
              "prov": provenance_id[:10], "name": name}
    try:
        text = convention.format(**{k: safe_component(v) for k, v in fields.items()})
    except KeyError as exc:
        raise ValueError(f"storage.file_name_convention {convention!r} uses unknown field {exc}; "
                         f"known: {', '.join(fields)}") from None
    parts = [safe_component(p) for p in text.split("/") if p]
    return "/".join(parts)
