"""The base class of every pipeline step, its declared inputs and outputs, and the step registry.

A step is a module with a parameters class and a step class.  The step class declares, in the
spirit of LSST pipe_base connections, what it reads and what it makes::

    class Extractor(Step):
        process = "extraction"
        version = "1.1.0"
        Params = ExtractionParams
        inputs = (Input("image"), Input("background"))
        outputs = (Output("sources", SourceList, parents={"image_id": "image",
                                                          "background_id": "background"}),
                   Output("psf", PSF, parents={"sources_id": "sources"}))

        def run(self, ds):        # inputs from ds, a pure compute(...), outputs onto ds
            ...

Everything else is derived from these declarations, in one place (this module): the registry
of products that `DataStore.get_product` looks up (a product is found by the ids of its parents
and its provenance), the upstream provenances of a step's provenance (those of the steps that
make its inputs), and the checks of a step list's order.  Adding a step means its module, its
model (with a migration) and its config section; defining the class registers it.

Calling a step (``step(ds)``) skips it when its products exist for the DataStore's provenance
tree, wraps ``run`` with timing, peak memory and logging, and sorts failures:

- `NothingToDo` is an outcome, not an error: it passes through unchanged;
- `improc.errors.BadDataError` means the data cannot give the product: the image is marked with
  a badness bit (the error's own, else `Step.badness_for` by type, else `Step.badness`) and the
  error is raised as a `StepError`;
- anything else (configuration, programming errors) is raised as a `StepError` and marks nothing.

A `StepError` names the step, the image and the cause.  Nothing a failing step made is attached
to the DataStore, so nothing of it can be saved.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
import resource
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from improc.errors import BadDataError
from models.provenance import Provenance
from pipeline.parameters import StepParams
from util.config import Config

if TYPE_CHECKING:
    from models.context import Context
    from pipeline.data_store import DataStore

__all__ = ["Step", "StepError", "StepStats", "NothingToDo", "Input", "Output", "ProductSpec",
           "step_class", "step_classes", "products", "product_spec", "ROOT_PRODUCTS"]

log = logging.getLogger(__name__)

#: Products a DataStore starts from rather than a step making them (an image may also be made by
#: a step, e.g. preprocessing from an exposure section).  ``section_id`` stands for the
#: DataStore's section, a parent value that is not a product.
ROOT_PRODUCTS = ("exposure", "image", "section_id")


class StepError(RuntimeError):
    """A step failed on one image; the message names the step, the image and the cause."""

    def __init__(self, process: str, target: str, cause: BaseException):
        super().__init__(f"{process} failed on {target}: {type(cause).__name__}: {cause}")
        self.process = process
        self.target = target
        self.cause = cause

    @property
    def bad_data(self) -> bool:
        """Whether the data, not the code or the configuration, made the step fail."""
        return isinstance(self.cause, BadDataError)


class NothingToDo(Exception):
    """A step has nothing to make for this DataStore (an outcome, not an error).

    The pipeline logs the reason, skips the steps after it for this DataStore, and goes on with
    the next one; no badness is set.
    """


class StepStats(dict):
    """Per-step run statistics kept on the DataStore: seconds, peak RSS in MB, skipped or not."""


@dataclass(frozen=True)
class Input:
    """A product a step reads, by its DataStore name (``"image"``, ``"background"``, ...)."""

    name: str
    doc: str = ""
    #: For a product that another image's DataStore makes and this one finds by a query (the
    #: reference of a new image): the parameter of the reading step that names the tag holding
    #: the product's provenance (e.g. ``"reference_tag"``).
    tag_param: str | None = None


@dataclass(frozen=True)
class Output:
    """A product a step makes.

    Attributes
    ----------
    name : str
        Its DataStore name; ``ds.get_<name>()`` returns it.
    model : type
        The ORM class of its rows.
    parents : mapping
        Foreign-key column -> the product (DataStore name) it points at, or ``"section_id"``.
        A product is looked up by these columns and its provenance, and `DataStore.new_product`
        fills them in.
    found_by : callable, optional
        ``found_by(ds, provenance)``: how the DataStore of *another* image finds this product
        (a query, e.g. the reference that covers a new image), returning it or None.  In the
        DataStore that makes it, it is looked up by its parents as usual.
    """

    name: str
    model: type
    parents: Mapping[str, str] = field(default_factory=dict)
    doc: str = ""
    found_by: Callable[..., Any] | None = None


@dataclass(frozen=True)
class ProductSpec:
    """Where a product comes from: the step class that makes it and its `Output` declaration."""

    step: type[Step]
    output: Output

    @property
    def process(self) -> str:
        return self.step.process

    @property
    def model(self) -> type:
        return self.output.model


class Step:
    """Base class of pipeline steps.

    Subclasses set the class attributes and implement `run`.

    Parameters
    ----------
    params : StepParams, optional
        The parameters; by default built from ``config`` (its section named after the process,
        if any) and ``overrides``, else the parameters' defaults.
    config : Config, optional
        Configuration to read parameters from.  Without one the defaults of ``Params`` are used
        (which are those of ``default_config.yaml``); nothing reads a configuration file here.
    **overrides
        Parameter values that win over the configuration.
    """

    #: Process name: the config section, the provenance's process.
    process: ClassVar[str] = ""
    #: Version of this step's code; major.minor enters the provenance.
    version: ClassVar[str] = "0.1.0"
    #: The parameters class.
    Params: ClassVar[type[StepParams]] = StepParams
    #: Products this step reads.
    inputs: ClassVar[tuple[Input, ...]] = ()
    #: Products this step makes.
    outputs: ClassVar[tuple[Output, ...]] = ()
    #: True for a step that makes images outside the product registry (coaddition: an image from
    #: many); its provenance is an image's root, never an upstream found in a tag.
    makes_images: ClassVar[bool] = False
    #: The `models.image.ImageBadness` bit set on the image when the data make this step fail
    #: (a `BadDataError` without a bit of its own); cleared when the step succeeds.
    badness: ClassVar[str | None] = None
    #: More specific bits by error type, e.g. ``{TooFewSourcesError: "NO_STARS"}``.
    badness_for: ClassVar[Mapping[type, str]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.process:
            _register(cls)

    def __init__(self, params: StepParams | None = None, *, config: Config | None = None,
                 **overrides: Any):
        if params is not None and overrides:
            raise TypeError(f"{type(self).__name__}: give params or overrides, not both")
        if params is None:
            section = {}
            if config is not None:
                try:
                    section = config.section(self.process)
                except KeyError:
                    section = {}
            params = self.Params.from_dict(section, **overrides)
        if not isinstance(params, self.Params):
            raise TypeError(f"{type(self).__name__} needs {self.Params.__name__}, "
                            f"got {type(params).__name__}")
        self.params = params

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.process} v{self.version}>"

    @classmethod
    def output_names(cls) -> tuple[str, ...]:
        return tuple(o.name for o in cls.outputs)

    @classmethod
    def badness_bits(cls) -> tuple[str, ...]:
        """Every badness bit this step may set (and clears when it succeeds)."""
        names = ([cls.badness] if cls.badness else []) + list(cls.badness_for.values())
        return tuple(dict.fromkeys(names))

    def make_provenance(self, upstreams: list[Provenance], *, context: Context | None = None) -> Provenance:
        """This step's provenance given its upstream provenances (pure, no database); ``context``
        is the one whose data the step will run in (see `provenance_parameters`)."""
        unique = list({u.id: u for u in upstreams}.values())
        return Provenance(process=self.process, code_version=self.version,
                          parameters=self.provenance_parameters(context), upstreams=unique)

    def provenance_parameters(self, context: Context | None = None) -> dict[str, Any]:
        """What the provenance hashes besides code version and upstreams: the parameters that
        change the result.  A step whose result also depends on definitions the context knows
        (e.g. photocal on the instruments' band transformations) adds them here, by content."""
        return self.params.hashed()

    def run(self, ds: DataStore) -> None:
        """Read the inputs from ``ds``, compute, attach the outputs (`DataStore.new_product`)."""
        raise NotImplementedError(f"{type(self).__name__}.run")

    def fingerprint_figures(self, ds: DataStore) -> dict[str, Any]:
        """Key figures of this step's products on ``ds``, for the golden fingerprints
        (`pipeline.fingerprints`): every number column of every output row.  Steps whose files
        hold what matters add figures of their content."""
        import sqlalchemy as sa

        skip = {"id", "created_at", "provenance_id", "filepath", "md5sum"}
        figures: dict[str, Any] = {}
        for output in self.outputs:
            product = ds.get_product(output.name)
            for column in sa.inspect(type(product)).columns:
                value = getattr(product, column.key)
                if column.key in skip or column.foreign_keys or isinstance(value, bool):
                    continue
                if isinstance(value, (int, float)) or (isinstance(value, list) and all(
                        isinstance(v, (int, float)) for v in value)):
                    figures[f"{output.name}.{column.key}"] = value
        return figures

    def _badness_of(self, exc: BadDataError) -> str | None:
        if exc.badness:
            return exc.badness
        for kind, name in self.badness_for.items():
            if isinstance(exc, kind):
                return name
        return self.badness

    def __call__(self, ds: DataStore) -> None:
        if self.process in ds.unavailable:
            log.info("%s: nothing to do for %s: %s", self.process, ds.describe(), ds.unavailable[self.process])
            raise NothingToDo(ds.unavailable[self.process])
        if all(ds.get_product(name) is not None for name in self.output_names()):
            log.info("%s: products exist for %s, skipping", self.process, ds.describe())
            ds.stats[self.process] = StepStats(seconds=0.0, skipped=True)
            return
        start = time.perf_counter()
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        log.info("%s: starting on %s", self.process, ds.describe())
        try:
            self.run(ds)
            missing = [name for name in self.output_names()
                       if (ds.image if name == "image" else ds.products.get(name)) is None]
            if missing:
                raise RuntimeError(f"{type(self).__name__}.run did not attach {', '.join(missing)}")
            ds.clear_badness(*self.badness_bits())
        except NothingToDo as exc:
            log.info("%s: nothing to do for %s: %s", self.process, ds.describe(), exc)
            raise
        except BadDataError as exc:
            bit = self._badness_of(exc)
            log.error("%s failed on %s (bad data%s): %s", self.process, ds.describe(),
                      f", marked {bit}" if bit else "", exc)
            if bit:
                ds.mark_badness(bit)
            raise StepError(self.process, ds.describe(), exc) from exc
        except Exception as exc:
            log.error("%s failed on %s: %s", self.process, ds.describe(), exc)
            raise StepError(self.process, ds.describe(), exc) from exc
        finally:
            elapsed = time.perf_counter() - start
            peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
            ds.stats[self.process] = StepStats(seconds=elapsed, peak_rss_mb=peak_mb,
                                               rss_growth_mb=(peak_mb - rss_before / 1024.0))
        log.info("%s: done on %s in %.2f s", self.process, ds.describe(), elapsed)


# ---------------------------------------------------------------------------------------------
# Registry: derived from the step classes, nowhere else

_steps: dict[str, type[Step]] = {}
_discovered = {"done": False}
_lock = threading.RLock()


def _register(cls: type[Step]) -> None:
    with _lock:
        known = _steps.get(cls.process)
        if known is not None and known.__qualname__ != cls.__qualname__:
            raise TypeError(f"two steps declare process '{cls.process}': "
                            f"{known.__module__}.{known.__qualname__} and {cls.__module__}.{cls.__qualname__}")
        taken = {o.name: s for s in _steps.values() if s.process != cls.process for o in s.outputs}
        for output in cls.outputs:
            if output.name in taken:
                raise TypeError(f"product '{output.name}' of {cls.__qualname__} is already made by "
                                f"{taken[output.name].__qualname__}")
        _steps[cls.process] = cls


def _discover() -> None:
    """Import every module of the ``pipeline`` package once, so its steps register themselves."""
    if _discovered["done"]:
        return
    with _lock:
        if _discovered["done"]:
            return
        import pipeline

        for info in pkgutil.iter_modules(pipeline.__path__, prefix="pipeline."):
            if not info.ispkg:
                importlib.import_module(info.name)
        _discovered["done"] = True


def step_classes() -> dict[str, type[Step]]:
    """Every known step class by process name (the package's, and any defined elsewhere)."""
    _discover()
    return dict(_steps)


def step_class(process: str) -> type[Step]:
    """The step class of a process name.

    Raises
    ------
    ConfigError
        No step has this process name (the message lists the known ones).
    """
    from util.config import ConfigError

    known = step_classes()
    if process not in known:
        raise ConfigError(f"unknown pipeline step '{process}'; known: {', '.join(sorted(known))}")
    return known[process]


def products() -> dict[str, ProductSpec]:
    """Every product a step makes, by DataStore name."""
    return {o.name: ProductSpec(step=cls, output=o) for cls in step_classes().values() for o in cls.outputs}


def product_spec(name: str) -> ProductSpec:
    """Where the product ``name`` comes from; KeyError lists the known products."""
    found = products()
    if name not in found:
        raise KeyError(f"unknown product '{name}'; known: {', '.join(sorted(found))}")
    return found[name]
