"""Pipeline: run an ordered list of steps on a DataStore, skipping what already exists.

::

    pipe = Pipeline(config)                    # steps and parameters from the configuration
    ds = pipe.run(exposure, section_id="N6")   # or pipe.run(image)

Every step whose products already exist for the current provenance tree is skipped, so running
the pipeline twice creates nothing new.  Products are saved after each step that made any, so
a failure later keeps what was finished and the next run resumes from there.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

from pipeline.data_store import DataStore
from pipeline.step import Step
from util.config import Config

__all__ = ["Pipeline", "STEP_CLASSES", "step_class", "default_steps"]

log = logging.getLogger(__name__)

#: Every step the pipeline knows, by process name, in pipeline order.
STEP_CLASSES: dict[str, str] = {
    "preprocessing": "pipeline.preprocessing.Preprocessor",
    "backgrounding": "pipeline.backgrounding.Backgrounder",
    "extraction": "pipeline.extraction.Extractor",
    "astrocal": "pipeline.astro_cal.AstroCalibrator",
    "photocal": "pipeline.photo_cal.PhotoCalibrator",
}


def step_class(process: str) -> type[Step]:
    """The step class of a process name; ValueError names unknown processes."""
    if process not in STEP_CLASSES:
        raise ValueError(f"unknown pipeline step '{process}'; known: {', '.join(STEP_CLASSES)}")
    module, name = STEP_CLASSES[process].rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def default_steps(*, config: Config | None = None, include_preprocessing: bool = True) -> list[Step]:
    """The steps listed in ``pipeline.steps`` of the configuration, built from its sections."""
    config = config or Config.load()
    names = config.get("pipeline.steps")
    if not include_preprocessing:
        names = [n for n in names if n != "preprocessing"]
    return [step_class(name)(config=config) for name in names]


class Pipeline:
    """An ordered list of steps.

    Parameters
    ----------
    config : Config, optional
        Where step lists and parameters come from; `Config.load()` by default.
    steps : list of Step, optional
        Explicit steps (overrides ``pipeline.steps``).
    """

    def __init__(self, config: Config | None = None, *, steps: list[Step] | None = None):
        self.config = config or Config.load()
        self.steps = steps if steps is not None else default_steps(config=self.config)

    def run(self, target: Any, section_id: str | None = None) -> DataStore:
        """Run every step on one image, or one section of an exposure; return the DataStore."""
        ds = DataStore(target, section_id)
        steps = [s for s in self.steps if not (ds.image is not None and s.process == "preprocessing")]
        ds.make_prov_tree(steps)
        for step in steps:
            if all(ds.get_product(name) is not None for name in step.products):
                log.info("%s: products exist for %s, skipping", step.process, ds.describe())
                ds.stats[step.process] = {"seconds": 0.0, "skipped": True}
                continue
            step(ds)
            ds.save_and_commit()
        return ds

    def run_exposure(self, exposure: Any) -> list[DataStore]:
        """Run every section of an exposure; return one DataStore per section."""
        return [self.run(exposure, section) for section in exposure.section_ids]
