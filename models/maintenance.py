"""The database against the files: find what is inconsistent (`check`) and repair it (`clean`).

Every table whose rows have a file (every `FileBackedMixin` model among the loaded tables) is
compared with the files below the data root:

========================  ====================================================================
problem                   found when                                    ``clean`` does
========================  ====================================================================
``missing file``          a row's file is not there                     removes the row and every row made from it
``md5 mismatch``          a row's file has another md5 than the row     the same
``no file``               a row of a file-backed table has no path      the same
``orphan file``           a product file no row points at               deletes the file
``temp file``             ``.<name>.<random>.tmp`` left by a kill       deletes the file
========================  ====================================================================

Removed rows are remade by the next ``seechange run``: steps whose products are gone run
again.  What a run cannot remake -- an exposure's copy of its original file, an image that
arrived reduced -- is removed together with its exposure, and ingesting the original file again
brings it back (the report says which file).

Which files are product files: those whose path the store's ``file_name_convention`` can give,
and any file in a top-level folder that holds a stored product's file; the database itself and
anything else in the data root (e.g. the demo's inputs) are left alone, and symlinks are never
followed.  A file younger than ``min_age`` seconds may belong to a save still in progress, so it
is neither reported nor removed; use ``min_age=0`` when nothing is running.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import sqlalchemy as sa
from sqlalchemy import select

from models.base import Base
from models.context import Context
from models.file_store import TEMP_NAME, FileBackedMixin, FileStore, md5_of
from models.schema import load_all_tables

__all__ = ["Problem", "Report", "Removed", "check", "clean", "file_backed_models", "damaged", "remove_rows",
           "remade_by_rerun", "with_file_parents", "DEFAULT_MIN_AGE"]

log = logging.getLogger(__name__)

#: Files younger than this (seconds) may belong to a save in progress.
DEFAULT_MIN_AGE = 600.0

#: Kinds of problem, in the order they are reported.
ROW_PROBLEMS = ("missing file", "md5 mismatch", "no file")
FILE_PROBLEMS = ("orphan file", "temp file")


@dataclass(frozen=True)
class Problem:
    """One inconsistency between a row and its file, or a file and the rows."""

    kind: str                 #: one of ROW_PROBLEMS + FILE_PROBLEMS
    path: str | None          #: relative to the data root
    table: str | None = None  #: the row's table (row problems)
    row_id: Any = None        #: the row's id (row problems)
    detail: str = ""

    def line(self) -> str:
        where = f"{self.table} {self.row_id}" if self.table else ""
        text = "  ".join(x for x in (f"{self.kind:13}", where, self.path or "(no path)") if x)
        return f"{text}: {self.detail}" if self.detail else text


@dataclass(frozen=True)
class Removed:
    """A row `remove_rows` removed, and its file."""

    table: str
    row_id: Any
    filepath: str | None

    def line(self) -> str:
        return f"removed {self.table} {self.row_id}" + (f" and {self.filepath}" if self.filepath else "")


@dataclass
class Report:
    """What `check` found (and what `clean` did about it)."""

    problems: list[Problem] = field(default_factory=list)
    rows: int = 0                  #: rows with files checked
    files: int = 0                 #: files seen below the data root
    recent: int = 0                #: files left out for being younger than min_age
    md5_checked: bool = True
    actions: list[str] = field(default_factory=list)   #: what clean did (or would do)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        checked = "md5s checked" if self.md5_checked else "md5s not checked (--quick)"
        text = (f"checked {self.rows} row(s) with files and {self.files} file(s), {checked}: "
                f"{len(self.problems) or 'no'} problem(s)")
        if self.recent:
            text += (f"; {self.recent} file(s) younger than the minimum age left out (they may "
                     "belong to a save in progress)")
        return text


def file_backed_models() -> list[type]:
    """Every model whose rows have a file, from the loaded tables (no list kept by hand)."""
    load_all_tables()
    found = {m.class_ for m in Base.registry.mappers
             if issubclass(m.class_, FileBackedMixin) and getattr(m.class_, "__table__", None) is not None}
    return sorted(found, key=lambda cls: cls.__tablename__)


def _database_files(context: Context) -> set[str]:
    """The SQLite database's own files, if they live below the data root (relative paths)."""
    url = context.engine.url
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        return set()
    path = Path(url.database).expanduser().resolve()
    try:
        relative = path.relative_to(context.store.root).as_posix()
    except ValueError:
        return set()
    return {relative + suffix for suffix in ("", "-wal", "-shm", "-journal")}


def _age(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return float("inf")


def _rows(context: Context) -> list[tuple[type, Any, str | None, str | None]]:
    """(model, id, filepath, md5) of every file-backed row."""
    found = []
    with context.session() as session:
        for model in file_backed_models():
            query = select(model.id, model.filepath, model.md5sum).order_by(model.id)
            found.extend((model, *row) for row in session.execute(query))
    return found


def check(context: Context, *, md5: bool = True, min_age: float = DEFAULT_MIN_AGE) -> Report:
    """Compare every file-backed row with its file, and every product file with the rows.

    Parameters
    ----------
    context : Context
        The database and the file store.
    md5 : bool
        Also compare each file's md5 with its row's (reads every file).
    min_age : float
        Files younger than this many seconds are left out (see the module docstring).

    Returns
    -------
    Report
    """
    store = context.store
    report = Report(md5_checked=md5)
    known: set[str] = set()
    tops: set[str] = set()
    for model, row_id, filepath, stored_md5 in _rows(context):
        report.rows += 1
        table = model.__tablename__
        if filepath is None:
            report.problems.append(Problem("no file", None, table, row_id, "the row names no file"))
            continue
        known.add(filepath)
        tops.add(PurePosixPath(filepath).parts[0])
        problem = _file_problem(store, filepath, stored_md5, md5=md5)
        if problem:
            report.problems.append(Problem(problem[0], filepath, table, row_id, problem[1]))
    ignored = _database_files(context)
    for relpath in store.walk():
        report.files += 1
        if relpath in known or relpath in ignored:
            continue
        name = PurePosixPath(relpath).name
        if TEMP_NAME.match(name):
            kind = "temp file"
        elif store.matches_convention(relpath) or PurePosixPath(relpath).parts[0] in tops:
            kind = "orphan file"
        else:
            continue
        age = _age(store.root / relpath)
        if age < min_age:
            report.recent += 1
            continue
        detail = "left by an interrupted write" if kind == "temp file" else "no row points at it"
        report.problems.append(Problem(kind, relpath, detail=f"{detail} ({age:.0f} s old)"))
    return report


def _file_problem(store: FileStore, filepath: str, stored_md5: str | None, *, md5: bool
                  ) -> tuple[str, str] | None:
    try:
        path = store.absolute(filepath)
    except ValueError as exc:
        return "missing file", str(exc)
    if path.is_symlink() or not path.is_file():
        return "missing file", "the file is not there"
    if md5 and stored_md5 is not None:
        found = md5_of(path)
        if found != stored_md5:
            return "md5 mismatch", f"database has {stored_md5}, file has {found}"
    return None


def damaged(rows: Iterable[object], store: FileStore) -> list[tuple[object, str]]:
    """The file-backed rows among ``rows`` whose file is missing or has another md5, with why."""
    found = []
    for row in rows:
        if not isinstance(row, FileBackedMixin):
            continue
        if row.filepath is None:
            found.append((row, "the row names no file"))
            continue
        problem = _file_problem(store, row.filepath, row.md5sum, md5=True)
        if problem:
            found.append((row, f"{problem[0]}: {problem[1]}"))
    return found


def with_file_parents(rows: Iterable[object], context: Context) -> list[object]:
    """The rows, and the file-backed rows they point at by foreign key (their image, exposure,
    background, catalog excerpt, ...), each once."""
    by_table = {m.__table__: m for m in file_backed_models()}
    found: dict[Any, object] = {}
    with context.session() as session:
        for row in rows:
            found.setdefault(row.id, row)
            for column in row.__table__.columns:
                value = getattr(row, column.key, None)
                for fk in column.foreign_keys:
                    model = by_table.get(fk.column.table)
                    if model is not None and value is not None and value not in found:
                        parent = session.get(model, value)
                        if parent is not None:
                            found[value] = parent
    return list(found.values())


def remade_by_rerun(row: object) -> bool:
    """Whether ``seechange run`` makes this row again once it is removed (not an exposure, not an
    image that arrived reduced)."""
    from models.exposure import Exposure
    from models.image import Image, ingest_provenance

    if isinstance(row, Exposure):
        return False
    return not (isinstance(row, Image) and row.provenance_id == ingest_provenance().id)


def _dependents(session: sa.orm.Session, table: sa.Table, ids: set[Any],
                tables: list[sa.Table]) -> dict[sa.Table, set[Any]]:
    """Every row made from the given rows, following foreign keys down, by table."""
    found: dict[sa.Table, set[Any]] = defaultdict(set)
    found[table] |= ids
    frontier = [(table, ids)]
    while frontier:
        parent, parent_ids = frontier.pop()
        for child in tables:
            if "id" not in child.c:
                continue
            for fk in child.foreign_keys:
                if fk.column.table is not parent:
                    continue
                new = set(session.scalars(select(child.c.id).where(fk.parent.in_(parent_ids)))) - found[child]
                if new:
                    found[child] |= new
                    frontier.append((child, new))
    return found


def remove_rows(rows: Iterable[object], context: Context) -> list[Removed]:
    """Remove rows, every row made from them, and their files; return what was removed.

    Rows are deleted children first in one transaction (no reliance on ON DELETE rules), then
    the files are deleted; a kill between the two leaves orphan files, which `clean` removes.
    """
    metadata = load_all_tables()
    tables = metadata.sorted_tables
    roots: dict[sa.Table, set[Any]] = defaultdict(set)
    for row in rows:
        roots[row.__table__].add(row.id)
    if not roots:
        return []
    removed: list[Removed] = []
    with context.session() as session:
        everything: dict[sa.Table, set[Any]] = defaultdict(set)
        for table, ids in roots.items():
            for child, child_ids in _dependents(session, table, ids, tables).items():
                everything[child] |= child_ids
        for table in reversed(tables):
            ids = everything.get(table)
            if not ids:
                continue
            paths = dict(session.execute(select(table.c.id, table.c.filepath).where(table.c.id.in_(ids)))
                         .all()) if "filepath" in table.c else {}
            session.execute(sa.delete(table).where(table.c.id.in_(ids)))
            removed.extend(Removed(table.name, i, paths.get(i)) for i in sorted(ids, key=str))
    for gone in removed:
        if gone.filepath:
            try:
                context.store.delete(gone.filepath)
            except (OSError, ValueError) as exc:
                log.warning("could not delete %s: %s", gone.filepath, exc)
    return removed


def _repair_roots(problems: list[Problem], context: Context) -> tuple[list[object], list[str]]:
    """The rows to remove for the row problems, and notes on what must be ingested again."""
    from models.exposure import Exposure
    from models.image import Image

    by_table = {m.__tablename__: m for m in file_backed_models()}
    roots: list[object] = []
    notes: list[str] = []
    with context.session() as session:
        for problem in problems:
            row = session.get(by_table[problem.table], problem.row_id)
            if row is None:
                continue
            if not remade_by_rerun(row):
                exposure = row if isinstance(row, Exposure) else (
                    session.get(Exposure, row.exposure_id) if isinstance(row, Image) and row.exposure_id
                    else None)
                if exposure is not None:
                    row = exposure
                    notes.append(f"exposure {exposure.id} ({exposure.origin}) is removed with all it "
                                 f"led to: ingest {exposure.origin} again to bring it back")
                else:
                    notes.append(f"{problem.table} {problem.row_id} cannot be remade by a run: ingest "
                                 "its file again")
            roots.append(row)
    return roots, notes


def clean(context: Context, *, dry_run: bool = False, md5: bool = True,
          min_age: float = DEFAULT_MIN_AGE) -> Report:
    """Repair what `check` finds: delete orphan and temporary files, remove rows whose files are
    gone or damaged (with every row made from them) so that a re-run makes them again.

    Parameters
    ----------
    context : Context
        The database and the file store.
    dry_run : bool
        Only say what would be done (``Report.actions``).
    md5 : bool
        Also treat files whose md5 differs from their row's as damaged (reads every file).
    min_age : float
        Files younger than this many seconds are left alone (see the module docstring).

    Returns
    -------
    Report
        The problems found, and ``actions``: one line per thing done (or, dry run, to do).
    """
    report = check(context, md5=md5, min_age=min_age)
    verb = "would delete" if dry_run else "deleted"
    for problem in report.problems:
        if problem.kind not in FILE_PROBLEMS:
            continue
        path = context.store.root / problem.path
        if problem.kind == "orphan file" and _has_row(context, problem.path):
            continue      # its row was committed after the check looked
        if not dry_run:
            path.unlink(missing_ok=True)
        report.actions.append(f"{verb} {problem.kind} {problem.path}")
    row_problems = [p for p in report.problems if p.kind in ROW_PROBLEMS]
    roots, notes = _repair_roots(row_problems, context)
    if dry_run:
        report.actions.extend(f"would remove {type(r).__tablename__} {r.id} and every row made from it"
                              for r in roots)
    else:
        report.actions.extend(gone.line() for gone in remove_rows(roots, context))
    report.actions.extend(notes)
    return report


def _has_row(context: Context, relpath: str) -> bool:
    with context.session() as session:
        return any(session.scalar(select(m.id).where(m.filepath == relpath).limit(1)) is not None
                   for m in file_backed_models())
