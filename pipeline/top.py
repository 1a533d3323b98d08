"""Pipeline: run an ordered list of steps on a DataStore, skipping what already exists.

::

    pipe = Pipeline(context)                   # steps and parameters from its configuration
    ds = pipe.run(exposure, section_id="N6")   # or pipe.run(image)

Every step whose products already exist for the current provenance tree is skipped, so running
the pipeline twice creates nothing new.  Products are saved after each step that made any, so
a failure later keeps what was finished and the next run resumes from there.  A step that has
nothing to do (`pipeline.step.NothingToDo`) ends the run of that DataStore without an error.
With ``verify=True`` the files of the products a step would skip (and the stored files they were
made from) are md5-checked first; damaged ones are removed with every row made from them, so the
steps make them again.
"""

from __future__ import annotations

import logging
from typing import Any

import sqlalchemy as sa

from models.context import Context, current_context
from pipeline.data_store import DataStore
from pipeline.step import ROOT_PRODUCTS, NothingToDo, Step, product_spec, step_class
from util.config import Config, ConfigError

__all__ = ["Pipeline", "DamagedInputError", "default_steps", "check_step_order"]

log = logging.getLogger(__name__)


class DamagedInputError(RuntimeError):
    """A stored file the pipeline needs is damaged and no step can make it again (an exposure's
    copy of its original, an image that arrived reduced); the message says how to repair it."""


def default_steps(config: Config, *, include_preprocessing: bool = True) -> list[Step]:
    """The steps listed in ``pipeline.steps`` of the configuration, built from its sections."""
    names = config.get("pipeline.steps")
    if not include_preprocessing:
        names = [n for n in names if n != "preprocessing"]
    return [step_class(name)(config=config) for name in names]


def check_step_order(steps: list[Step]) -> None:
    """Every step's inputs are made by an earlier step or are where a DataStore starts.

    Raises
    ------
    ConfigError
        A step reads a product that no earlier step makes (names both).
    """
    made = set(ROOT_PRODUCTS)
    for step in steps:
        for inp in step.inputs:
            if inp.name not in made and not inp.tag_param:     # (found by a query: no maker here)
                try:
                    maker = product_spec(inp.name).process
                except KeyError:
                    maker = "no known step"
                raise ConfigError(f"pipeline step '{step.process}' reads '{inp.name}', made by {maker}, "
                                  "which does not come before it in pipeline.steps")
        made.update(step.output_names())
        made.update(inp.name for inp in step.inputs if inp.tag_param)


class Pipeline:
    """An ordered list of steps working in one context.

    Parameters
    ----------
    context : Context or Config, optional
        Database, file store and configuration (a Config is turned into its context); default:
        the current context.
    steps : list of Step, optional
        Explicit steps (instead of the configuration's ``pipeline.steps``).
    """

    def __init__(self, context: Context | Config | None = None, *, steps: list[Step] | None = None):
        if context is None:
            context = current_context()
        elif isinstance(context, Config):
            context = Context.from_config(context)
        self.context = context
        self.steps = steps if steps is not None else default_steps(context.config)
        check_step_order(self.steps)

    def __repr__(self) -> str:
        return f"<Pipeline {' -> '.join(s.process for s in self.steps)} in {self.context!r}>"

    def run(self, target: Any, section_id: str | None = None, *, verify: bool = False) -> DataStore:
        """Run every step on one image, or one section of an exposure; return the DataStore.

        ``target`` may also be a DataStore (e.g. one that never saves).  With ``verify``, the
        stored files a step would skip are md5-checked first and damaged ones made again.

        Raises
        ------
        DamagedInputError
            (``verify``) A damaged file that no step makes: an exposure's or an ingested image's.
        """
        ds = target if isinstance(target, DataStore) else DataStore(target, section_id, context=self.context)
        steps = [s for s in self.steps if not (ds.image is not None and "image" in s.output_names())]
        ds.make_prov_tree(steps)
        for step in steps:
            if step.process in ds.unavailable:     # e.g. no reference set yet: stop here, say why
                ds.stats[step.process] = {"seconds": 0.0, "nothing_to_do": ds.unavailable[step.process]}
                break
            if verify and ds.persist:     # (a DataStore that never saves removes nothing either)
                _remove_damaged(ds, step)
            try:
                step(ds)
            except NothingToDo as exc:
                ds.stats[step.process] = {"seconds": 0.0, "nothing_to_do": str(exc)}
                break
            if ds.persist:
                ds.save_and_commit()
        return ds

    def run_exposure(self, exposure: Any) -> list[DataStore]:
        """Run every section of an exposure; return one DataStore per section."""
        return [self.run(exposure, section) for section in exposure.section_ids]


def _remove_damaged(ds: DataStore, step: Step) -> None:
    """Remove the stored outputs of ``step`` whose files (or whose inputs' files) are damaged,
    with every row made from them, so that the step runs again."""
    from models.maintenance import damaged, remade_by_rerun, remove_rows, with_file_parents

    held = [ds.get_product(name) for name in step.output_names()]
    held = [p for p in held if p is not None and sa.inspect(p).has_identity]
    if not held:
        return
    bad = damaged(with_file_parents(held, ds.context), ds.context.store)
    for row, why in bad:
        if not remade_by_rerun(row):
            raise DamagedInputError(f"{type(row).__name__} {row.id} of {ds.describe()}: {row.filepath}: "
                                    f"{why}; no step can make it again: `seechange db clean` removes it, "
                                    f"then ingest {_origin(row, ds)} again")
    if bad:
        for row, why in bad:
            log.info("%s: %s %s is damaged (%s); making it again", ds.describe(),
                     type(row).__name__, row.id, why)
        removed = remove_rows([row for row, _ in bad], ds.context)
        ds.forget(gone.row_id for gone in removed)
        ds.remade.extend(type(row).__name__ for row, _ in bad)


def _origin(row: Any, ds: DataStore) -> str:
    """The original file an exposure, or an image that arrived reduced, was ingested from."""
    from models.exposure import Exposure

    if getattr(row, "origin", None):
        return row.origin
    exposure_id = getattr(row, "exposure_id", None)
    if exposure_id is not None:
        with ds.context.session() as session:
            exposure = session.get(Exposure, exposure_id)
        if exposure is not None:
            return exposure.origin
    return "its original file"
