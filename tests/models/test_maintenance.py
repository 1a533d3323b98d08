"""db check and db clean: rows against files, on both back ends."""

from __future__ import annotations

import numpy as np
from sqlalchemy import func, select

from improc.background import BackgroundMesh
from models.background import Background
from models.base import session_scope
from models.catalog_excerpt import CatalogExcerpt
from models.exposure import Exposure
from models.file_store import FileBackedMixin
from models.image import Image, ingest_file
from models.maintenance import check, clean, file_backed_models
from models.provenance import Provenance
from models.psf import PSF
from models.saving import save_products
from models.source_list import SourceList
from tests.models.synthetic_files import write_synthetic


def test_the_file_backed_tables_come_from_the_models():
    found = file_backed_models()
    assert {Exposure, Image, Background, SourceList, PSF, CatalogExcerpt} <= set(found)
    assert all(issubclass(model, FileBackedMixin) for model in found)


def _installation(database, tmp_path):
    """An exposure, its image and a background of the image."""
    exposure, (image,) = ingest_file(write_synthetic(tmp_path / "sim.fits"))
    prov = Provenance(process="backgrounding", code_version="1.0.0", parameters={"t": 1},
                      upstreams=[Provenance.get(image.provenance_id)])
    prov.save()
    mesh = BackgroundMesh(level=np.full((1, 2), 100.0), rms=np.full((1, 2), 5.0), box_size=64,
                          filter_size=1, shape=(64, 80))
    background = Background(mesh=mesh, image=image, provenance_id=prov.id)
    background.set_file_stem(image.file_stem(database.store).replace("preprocessing", "backgrounding") + "_bg")
    save_products([background])
    return exposure, image, background


def _rows(model) -> int:
    with session_scope() as session:
        return session.scalar(select(func.count()).select_from(model))


def test_check_finds_every_kind_of_problem_and_clean_repairs_it(database, tmp_path):
    exposure, image, background = _installation(database, tmp_path)
    store = database.store
    assert check(database.context, min_age=0).ok
    folder = store.absolute(image.filepath).parent
    orphan = folder / ("x" + store.absolute(image.filepath).name)          # a name the convention gives
    orphan.write_bytes(b"left by a kill")
    temp = folder / f".{orphan.name}.k3j4h5g6.tmp"
    temp.write_bytes(b"half")
    foreign = store.root / "demo_inputs" / "raw.fits"                     # not a product: left alone
    foreign.parent.mkdir()
    foreign.write_bytes(b"someone's input")
    with open(store.absolute(background.filepath), "r+b") as handle:       # damaged
        handle.seek(100)
        handle.write(b"\x00\x01")

    report = check(database.context, min_age=0)
    assert sorted(p.kind for p in report.problems) == ["md5 mismatch", "orphan file", "temp file"]
    assert {p.path for p in report.problems} == {background.filepath, str(orphan.relative_to(store.root)),
                                                 str(temp.relative_to(store.root))}
    assert not report.ok and "3 problem(s)" in report.summary()
    young = check(database.context, min_age=3600)
    assert [p.kind for p in young.problems] == ["md5 mismatch"] and young.recent == 2
    assert sorted(p.kind for p in check(database.context, md5=False, min_age=0).problems) == ["orphan file", "temp file"]

    dry = clean(database.context, dry_run=True, min_age=0)
    assert len(dry.actions) == 3 and all(a.startswith("would") for a in dry.actions)
    assert orphan.exists() and temp.exists() and _rows(Background) == 1

    done = clean(database.context, min_age=0)
    assert not orphan.exists() and not temp.exists() and foreign.exists()
    assert _rows(Background) == 0 and _rows(Image) == 1 and _rows(Exposure) == 1
    assert not store.absolute(background.filepath).exists()
    assert any(a.startswith("removed backgrounds") for a in done.actions)
    assert check(database.context, min_age=0).ok


def test_what_a_run_cannot_remake_goes_with_its_exposure(database, tmp_path):
    exposure, image, background = _installation(database, tmp_path)
    store = database.store
    store.absolute(image.filepath).unlink()                  # an image that arrived reduced
    report = check(database.context, min_age=0)
    assert [(p.kind, p.table) for p in report.problems] == [("missing file", "images")]
    done = clean(database.context, min_age=0)
    assert _rows(Exposure) == _rows(Image) == _rows(Background) == 0
    assert any("ingest sim.fits again" in a for a in done.actions)
    assert list(store.walk()) == [] or all(p.startswith("seechange.sqlite") for p in store.walk())
    assert check(database.context, min_age=0).ok
