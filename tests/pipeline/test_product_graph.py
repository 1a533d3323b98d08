"""The product graph: steps declare inputs and outputs; one provenance gives one product.

- a new step is its module, its model and its parameters: declaring the class is enough for the
  Pipeline, the DataStore's ``get_<name>()`` and the provenance tree;
- the same provenance yields byte-identical products whatever ran before, in whatever order;
- a tag holding two provenances of one process gives each image the one made from its own chain;
- a DataStore that never saves, a step with nothing to do, usage errors that say what is wrong.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from sqlalchemy import func, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from models.background import Background
from models.base import session_scope
from models.image import Image, ingest_file
from models.instruments.synthetic import write_simulated_file
from models.provenance import AmbiguousProvenanceError, Provenance, ProvenanceTag, UnknownTagError
from models.psf import PSF
from models.source_list import SourceList
from models.world_coordinates import WorldCoordinates
from models.zero_point import ZeroPoint
from pipeline.data_store import DataStore, DataStoreError
from pipeline.parameters import StepParams, param
from pipeline.step import Input, NothingToDo, Output, Step, StepError, product_spec, step_classes
from pipeline.top import Pipeline
from tests.pipeline.conftest import SimulatedField, make_field

CALIBRATION = ("backgrounding", "extraction", "astrocal", "photocal")
PRODUCT_MODELS = (Background, SourceList, PSF, WorldCoordinates, ZeroPoint)


# --- a step that exists only in this test -----------------------------------------------------


class OnlyForTestsBase(DeclarativeBase):
    """Its own metadata: the test's table is not part of the project's schema."""


class BrightCount(OnlyForTestsBase):
    """How many sources of an image are brighter than a flux (a toy product with two parents)."""

    __tablename__ = "test_bright_counts"

    id: Mapped[uuid.UUID] = mapped_column(sa.Uuid, primary_key=True, default=uuid.uuid4)
    image_id: Mapped[uuid.UUID] = mapped_column(sa.Uuid)
    sources_id: Mapped[uuid.UUID] = mapped_column(sa.Uuid)
    provenance_id: Mapped[str] = mapped_column(sa.String(24))
    count: Mapped[int]


@dataclass(frozen=True, kw_only=True)
class BrightCountParams(StepParams):
    step_name = "brightcount"
    min_flux: float = param(1000.0, "Count sources with a PSF flux above this, ADU.")
    nothing_below: int = param(0, "Nothing to do for images with fewer sources than this.")


class BrightCounter(Step):
    process = "brightcount"
    version = "1.0.0"
    Params = BrightCountParams
    inputs = (Input("image"), Input("sources"))
    outputs = (Output("bright_count", BrightCount, parents={"image_id": "image", "sources_id": "sources"}),)

    def run(self, ds: DataStore) -> None:
        sources = ds.get_sources()
        if sources.num_sources < self.params.nothing_below:
            raise NothingToDo(f"only {sources.num_sources} sources")
        flux, _ = sources.psffluxadu()
        ds.new_product(self, "bright_count", count=int(np.sum(flux > self.params.min_flux)))


@pytest.fixture(scope="module")
def field(tmp_path_factory) -> SimulatedField:
    """Two 512 x 512 reduced images of one field (read-only)."""
    folder = tmp_path_factory.mktemp("graph")
    field = make_field(folder, n=2, size=512, raw=True)
    for k, sim in enumerate(field.sims):
        field.paths[k] = write_simulated_file(sim, folder / f"reduced_{k}.fits", raw=False)
    return field


def _image(path: Path, context=None) -> Image:
    return ingest_file(path, context=context)[1][0]


def test_a_new_step_needs_only_its_module_model_and_parameters(database, field):
    OnlyForTestsBase.metadata.create_all(database.engine)      # stands in for the step's migration
    config = field.config(database)
    assert step_classes()["brightcount"] is BrightCounter
    assert product_spec("bright_count").process == "brightcount"
    steps = [step_classes()[p](config=config) for p in ("backgrounding", "extraction")]
    pipeline = Pipeline(config, steps=[*steps, BrightCounter(min_flux=5000.0)])
    image = _image(field.paths[0])
    ds = pipeline.run(image)
    count = ds.get_bright_count()
    flux, _ = ds.get_sources().psffluxadu()
    assert count.count == int(np.sum(flux > 5000.0)) > 10
    # its provenance hangs below the ones of its inputs
    prov = ds.provenance("brightcount")
    assert set(prov.upstream_ids) == {ds.provenance("extraction").id, image.provenance_id}
    # found again from the database by (image id, sources id, provenance); a re-run skips it
    again = DataStore(image)
    again.make_prov_tree(pipeline.steps)
    assert again.get_bright_count().id == count.id
    assert pipeline.run(image).stats["brightcount"]["skipped"]
    # other parameters: another provenance, not made yet
    other = DataStore(image)
    other.make_prov_tree([*steps, BrightCounter(min_flux=10.0)])
    assert other.get_bright_count() is None and other.get_sources().id == ds.get_sources().id


def test_a_step_with_nothing_to_do_ends_the_run_without_an_error(database, field):
    OnlyForTestsBase.metadata.create_all(database.engine)
    config = field.config(database)
    steps = [step_classes()[p](config=config) for p in ("backgrounding", "extraction")]
    image = _image(field.paths[0])
    ds = Pipeline(config, steps=[*steps, BrightCounter(nothing_below=10**6)]).run(image)
    assert "only" in ds.stats["brightcount"]["nothing_to_do"]
    assert ds.get_bright_count() is None and ds.get_sources() is not None
    with session_scope() as session:
        assert session.get(Image, image.id).bad_flags == 0


def _product_bytes(ds: DataStore) -> dict[str, object]:
    """What identifies each product's content: file md5s, and the values of file-less rows."""
    wcs, zp = ds.get_wcs(), ds.get_zp()
    return {"background": ds.get_background().md5sum, "sources": ds.get_sources().md5sum,
            "psf": ds.get_psf().md5sum, "wcs": (wcs.header_text, wcs.rms_arcsec, wcs.num_stars),
            "zp": (zp.zp, zp.dzp, tuple(zp.aper_cors), zp.lim_mag, zp.num_stars)}


def test_one_provenance_gives_the_same_bytes_whatever_ran_before(database, field):
    config = field.config(database)
    pipeline = Pipeline(config)
    first, second = _image(field.paths[0]), _image(field.paths[1])
    reference = {im.id: _product_bytes(pipeline.run(im)) for im in (first, second)}
    before = _counts()

    # History 2, in a fresh data root with the same images: other provenances of every step run
    # first, then the default steps one by one, the second image before the first, each step on
    # both images before the next step.
    other_config = field.config(database, **{"backgrounding.box_size": 64, "extraction.threshold": 7.0,
                                             "astrocal.sip_order": 2, "photocal.min_snr": 30.0})
    for image in (second, first):
        Pipeline(other_config).run(image)
    assert _counts() == {name: n + 2 for name, n in before.items()}
    with session_scope() as session:        # the default tree's products go, to be made again
        for model in reversed(PRODUCT_MODELS):
            session.execute(sa.delete(model).where(model.provenance_id.in_(
                [p.id for p in DataStore(first).make_prov_tree(config).values()])))
    stores = {im.id: DataStore(im) for im in (second, first)}
    steps = Pipeline(config).steps
    for step in steps[1:]:
        for ds in stores.values():
            ds.make_prov_tree(steps)
            if step.process in ds.unavailable:      # (no reference set in this database)
                continue
            step(ds)
            ds.save_and_commit()
    for image_id, ds in stores.items():
        assert _product_bytes(ds) == reference[image_id]
        # rows of the other provenances were not touched, and the images were never changed
        with session_scope() as session:
            stored = session.get(Image, image_id)
            assert stored.wcs_header == ds.image.wcs_header and stored.bad_flags == 0


def _counts() -> dict[str, int]:
    with session_scope() as session:
        return {m.__tablename__: session.scalar(select(func.count()).select_from(m)) for m in PRODUCT_MODELS}


def test_a_datastore_that_never_saves_computes_everything_and_writes_nothing(database, field):
    image = _image(field.paths[0])
    files = sorted(database.store.root.rglob("*"))
    ds = DataStore(image, persist=False)
    Pipeline(field.config(database)).run(ds)
    assert ds.get_zp().zp == pytest.approx(field.sims[0].params.zero_point, abs=0.05)
    assert _counts() == {m.__tablename__: 0 for m in PRODUCT_MODELS}
    assert sorted(database.store.root.rglob("*")) == files
    with pytest.raises(DataStoreError, match="never saves"):
        ds.save_and_commit()
    assert "never saves" in repr(ds)


def test_usage_errors_say_what_is_missing(database, field):
    image = _image(field.paths[0])
    ds = DataStore(image)
    with pytest.raises(DataStoreError, match="no provenance tree yet; call load_prov_tree"):
        ds.get_sources()
    with pytest.raises(UnknownTagError, match="'nope'"):
        ds.load_prov_tree("nope")
    with pytest.raises(DataStoreError, match="unknown product 'colour'"):
        ds.get_product("colour")
    steps = Pipeline(field.config(database)).steps
    ds.make_prov_tree(steps[:2])
    with pytest.raises(DataStoreError, match="has no 'photocal' provenance"):
        ds.get_zp()
    assert ds.get_background() is None       # in the tree, not made yet
    with pytest.raises(AttributeError, match="get_colour"):
        ds.get_colour()
    assert "no products" not in repr(ds) and image.describe() in repr(ds)


def test_a_tag_gives_each_image_the_provenances_of_its_own_chain(database, field):
    """Two kinds of images (here: ingested, and made by a 'coaddition' stand-in) share a tag;
    their extraction provenances differ by upstream, and each DataStore finds its own."""
    config = field.config(database)
    single = _image(field.paths[0])
    coadd_prov = Provenance(process="coaddition", code_version="1.0.0", parameters={"n": 1})
    with session_scope() as session:
        coadd_prov.save(session)
    coadd = Image.from_file(field.paths[1], provenance=coadd_prov)
    stores = [Pipeline(config).run(im) for im in (single, coadd)]
    for ds in stores:
        ProvenanceTag.add("both", ds.prov_tree.values())
    assert stores[0].provenance("extraction").id != stores[1].provenance("extraction").id
    with pytest.raises(AmbiguousProvenanceError, match="extraction"):
        Provenance.get_for_tag(tag="both", process="extraction")
    for made in stores:
        ds = DataStore(made.image.id)
        ds.load_prov_tree("both")
        assert ds.provenance("extraction").id == made.provenance("extraction").id
        assert ds.get_zp().id == made.get_zp().id
    # the seed's call finds the tag's single-exposure images, reduced elsewhere or not
    prov = Provenance.get_for_tag(tag="both", process="preprocessing")
    assert prov.id == single.provenance_id and prov.parameters == {"reduced_by": "external"}
    found = Image.find_images(provenance_ids=prov.id, ra=single.ra, dec=single.dec)
    assert [im.id for im in found] == [single.id]


def test_a_failing_step_saves_nothing_of_its_own_and_marks_only_bad_data(database, field):
    image = _image(field.paths[0])
    config = field.config(database, **{"astrocal.catalog_folder": str(field.gaia_folder / "missing")})
    with pytest.raises(StepError, match="astrocal failed on image") as err:
        Pipeline(config).run(image)
    assert not err.value.bad_data        # a missing catalog folder is the set-up's fault
    with session_scope() as session:
        assert session.get(Image, image.id).bad_flags == 0
    assert _counts() == {"backgrounds": 1, "source_lists": 1, "psfs": 1, "world_coordinates": 0,
                         "zero_points": 0}


def test_reprs_say_what_which_image_and_key_numbers(database, field):
    image = _image(field.paths[0])
    ds = Pipeline(field.config(database)).run(image)
    short = str(image.id)[:8]
    assert "science" in repr(image) and short in repr(image) and "512x512" in repr(image)
    assert short in repr(ds) and "sources" in repr(ds) and "zp" in repr(ds)
    assert f"of image {short}" in repr(ds.get_background()) and "rms" in repr(ds.get_background())
    assert "sources" in repr(ds.get_sources()) and "FWHM" in repr(ds.get_sources())
    assert "pixel, FWHM" in repr(ds.get_psf()) and '"' in repr(ds.get_psf())
    assert "sip" in repr(ds.get_wcs()) or "tan" in repr(ds.get_wcs())
    assert f"{ds.get_zp().zp:.4f}" in repr(ds.get_zp()) and "limit" in repr(ds.get_zp())
    assert "extraction" in repr(ds.provenance("extraction")) and "backgrounding" in repr(ds.provenance("extraction"))
