"""The base class of every pipeline step: the shared plumbing, written once.

A step is a module with a parameters class and a step class.  The step class names its
process and code version, the DataStore products it makes, and the processes upstream of it;
it implements ``run(ds)``, which looks its products up, computes what is missing with a pure
``compute(...)`` and attaches the result to the DataStore.

Calling a step (``step(ds)``) wraps ``run`` with timing, peak-memory tracking and logging, marks
the image bad (the step's ``badness`` bit, saved at once) when the data make the step fail, and
turns any failure into a `StepError` that names the step and the image.
"""

from __future__ import annotations

import logging
import resource
import time
from typing import TYPE_CHECKING, Any, ClassVar

from models.provenance import Provenance
from pipeline.parameters import StepParams
from util.config import Config

if TYPE_CHECKING:
    from pipeline.data_store import DataStore

__all__ = ["Step", "StepError", "StepStats"]

log = logging.getLogger(__name__)


class StepError(RuntimeError):
    """A step failed on one image; the message names the step, the image and the cause."""

    def __init__(self, process: str, target: str, cause: BaseException):
        super().__init__(f"{process} failed on {target}: {type(cause).__name__}: {cause}")
        self.process = process
        self.target = target
        self.cause = cause


class StepStats(dict):
    """Per-step run statistics kept on the DataStore: seconds, peak RSS in MB, skipped or not."""


class Step:
    """Base class of pipeline steps.

    Subclasses set the class attributes and implement `run`.

    Parameters
    ----------
    params : StepParams, optional
        The parameters; by default built from ``config`` (its section named after the process)
        and ``overrides``.
    config : Config, optional
        Configuration to read defaults from; `Config.load()` if omitted.
    **overrides
        Parameter values that win over the configuration.
    """

    #: Process name: the config section, the provenance's process.
    process: ClassVar[str] = ""
    #: Version of this step's code; major.minor enters the provenance.
    version: ClassVar[str] = "0.1.0"
    #: The parameters class.
    Params: ClassVar[type[StepParams]] = StepParams
    #: DataStore products this step makes (e.g. ``("sources", "psf")``).
    products: ClassVar[tuple[str, ...]] = ()
    #: Processes whose provenances are upstream of this one.  ``"image"`` stands for whatever
    #: process made the DataStore's image (preprocessing, ingest, coaddition, ...).
    upstream_processes: ClassVar[tuple[str, ...]] = ("image",)
    #: The `models.image.ImageBadness` bit set on the image when this step fails because of the
    #: data (a ValueError: parameters are checked when built, so bad data are what is left);
    #: cleared when the step succeeds.  None: the step marks nothing.
    badness: ClassVar[str | None] = None

    def __init__(self, params: StepParams | None = None, *, config: Config | None = None,
                 **overrides: Any):
        if params is not None and overrides:
            raise TypeError(f"{type(self).__name__}: give params or overrides, not both")
        if params is None:
            section = (config or Config.load()).section(self.process)
            params = self.Params.from_dict(section, **overrides)
        if not isinstance(params, self.Params):
            raise TypeError(f"{type(self).__name__} needs {self.Params.__name__}, "
                            f"got {type(params).__name__}")
        self.params = params

    def make_provenance(self, upstreams: list[Provenance]) -> Provenance:
        """This step's provenance given its upstream provenances (pure, no database)."""
        return Provenance(process=self.process, code_version=self.version,
                          parameters=self.params.hashed(), upstreams=upstreams)

    def run(self, ds: DataStore) -> None:
        """Make this step's products on ``ds`` (looking them up first); subclasses implement it."""
        raise NotImplementedError(f"{type(self).__name__}.run")

    def __call__(self, ds: DataStore) -> None:
        start = time.perf_counter()
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        log.info("%s: starting on %s", self.process, ds.describe())
        try:
            self.run(ds)
            if self.badness and ds.image is not None:
                ds.image.clear_badness(self.badness)
        except Exception as exc:
            log.error("%s failed on %s: %s", self.process, ds.describe(), exc)
            if self.badness and ds.image is not None and isinstance(exc, ValueError):
                ds.image.set_badness(self.badness)
                ds.save_and_commit()  # keeps the flag; nothing of this step was attached
            raise StepError(self.process, ds.describe(), exc) from exc
        finally:
            elapsed = time.perf_counter() - start
            peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
            ds.stats[self.process] = StepStats(
                seconds=elapsed, peak_rss_mb=peak_mb,
                rss_growth_mb=(peak_mb - rss_before / 1024.0))
        log.info("%s: done on %s in %.2f s", self.process, ds.describe(), elapsed)
