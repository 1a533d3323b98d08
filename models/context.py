"""The context a piece of work runs in: configuration, database and file store, in one object.

::

    context = Context.from_config(Config.load("survey.yaml"))
    ds = Pipeline(context).run(exposure, "N6")        # steps, database and files of that config
    with context.session() as session:               # a transaction on its database
        ...

Library code never loads a configuration by itself: `Pipeline`, `DataStore` and
`models.saving.save_products` take a context, and rows loaded through a context's session
remember it, so their files are read from that context's file store.

Notebooks and the command line are the entry points.  `current_context()` is, in order: the
context made active in this thread or task with ``with context.activate():``; the one set for
the whole process with `use_context`; else a default built once from ``Config.load()`` (the
``SEECHANGE_CONFIG`` file, or the defaults).  That default is the only place below the command
line where a configuration is read, so the notebook words of the user guide
(``Provenance.get_for_tag(...)``, ``Image.find_images(...)``, ``DataStore(image)``) work with
no set-up at all.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from models.file_store import FileStore
from util.config import Config

if TYPE_CHECKING:
    from models.instrument import Instrument

__all__ = ["Context", "current_context", "use_context"]


@dataclass(frozen=True, eq=False)
class Context:
    """Configuration, database engine and file store of one piece of work.

    Build one with `Context.from_config`; the constructor is for callers that already hold an
    engine and a store (tests, tools).

    Parameters
    ----------
    config : Config
        The configuration: step parameters, the step list, naming of files, instruments.
    engine : sqlalchemy.engine.Engine
        The database.
    store : FileStore
        Where product files live.
    """

    config: Config
    engine: Engine
    store: FileStore
    _sessions: sessionmaker = field(init=False, repr=False)
    _instruments: dict = field(init=False, repr=False, default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_sessions", sessionmaker(bind=self.engine, expire_on_commit=False,
                                                            info={"context": self}))

    @classmethod
    def from_config(cls, config: Config, *, engine: Engine | None = None,
                    store: FileStore | None = None) -> Context:
        """The context a configuration describes: its ``db`` and ``storage`` sections.

        Engines are shared between contexts with the same database URL (see
        `models.base.engine_for`), so building several contexts is cheap.
        """
        from models.base import engine_for

        if engine is None:
            engine = engine_for(config.get("db.url"), password_file=config.get("db.password_file"),
                                echo=config.get("db.echo"))
        if store is None:
            store = FileStore(config.get("storage.data_root"),
                              convention=config.get("storage.file_name_convention"))
        return cls(config=config, engine=engine, store=store)

    def __repr__(self) -> str:
        return (f"Context(db={self.engine.url.render_as_string(hide_password=True)}, "
                f"data_root={str(self.store.root)!r}, config={self.config.sources})")

    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        """A session on this context's database that commits at the end and rolls back on error."""
        new = self._sessions()
        try:
            yield new
            new.commit()
        except BaseException:
            new.rollback()
            raise
        finally:
            new.close()

    @contextlib.contextmanager
    def activate(self) -> Iterator[Context]:
        """Make this the current context inside the ``with`` block (this thread or task only)."""
        token = _active.set(self)
        try:
            yield self
        finally:
            _active.reset(token)

    def instrument(self, name: str) -> Instrument | None:
        """An instrument defined by one of this configuration's ``instruments.extra_files``, or None."""
        if not self._instruments:
            from models.instruments.generic import GenericInstrument

            loaded = {}
            for path in self.config.get("instruments.extra_files") or []:
                instrument = GenericInstrument.from_yaml(Path(path).expanduser())
                loaded[instrument.name.lower()] = instrument
            self._instruments.update(loaded or {"": None})
        return self._instruments.get(str(name).lower())

    def instrument_names(self) -> list[str]:
        """Names of the instruments of ``instruments.extra_files``."""
        self.instrument("")
        return sorted(i.name for i in self._instruments.values() if i is not None)


_active: contextvars.ContextVar[Context | None] = contextvars.ContextVar("seechange_context", default=None)
_process: list[Context] = []
_lock = threading.Lock()


def use_context(context: Context | Config) -> Context:
    """Make ``context`` the current context of the whole process (a Config is turned into one).

    The command line and notebooks call this once; library code takes contexts as arguments.
    """
    if isinstance(context, Config):
        context = Context.from_config(context)
    with _lock:
        _process[:] = [context]
    return context


def current_context() -> Context:
    """The active context, else the process's, else the default one (see the module docstring)."""
    active = _active.get()
    if active is not None:
        return active
    with _lock:
        if not _process:
            _process.append(Context.from_config(Config.load()))
        return _process[0]


def context_of(obj: Any) -> Context:
    """The context a row was loaded or saved through, else the current one."""
    found = getattr(obj, "_context", None)
    return found if found is not None else current_context()
