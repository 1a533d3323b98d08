"""save_products: files then rows, all or nothing; delete_products; on both back ends."""

import pytest
from sqlalchemy import func, select

from models.base import session_scope
from models.exposure import Exposure
from models.image import Image, ingest_provenance
from models.image_io import image_from_file
from models.provenance import Provenance
from models.saving import delete_products, save_products
from tests.models.synthetic_files import write_synthetic


def _products(tmp_path):
    path = write_synthetic(tmp_path / "sim.fits", sections=("A", "B"))
    exposure = Exposure.from_file(path)
    images = [image_from_file(path, section_id=s, exposure=exposure) for s in ("A", "B")]
    return exposure, images


def _counts():
    with session_scope() as session:
        return {table.__name__: session.scalar(select(func.count()).select_from(table))
                for table in (Exposure, Image, Provenance)}


def _files(store):
    return sorted(p for p in store.root.rglob("*") if p.is_file())


def test_save_writes_files_and_rows(database, tmp_path):
    exposure, images = _products(tmp_path)
    with session_scope() as session:
        ingest_provenance().save(session)
        save_products([exposure, *images], session=session)
    assert _counts() == {"Exposure": 1, "Image": 2, "Provenance": 2}
    files = _files(database.store)
    assert len(files) == 3 and all(database.store.root in f.parents for f in files)
    with session_scope() as session:
        stored = session.get(Image, images[0].id)
        assert stored.md5sum == images[0].md5sum and stored.filepath == images[0].filepath
    delete_products([*images, exposure])
    assert _counts()["Image"] == 0 and _counts()["Exposure"] == 0 and _files(database.store) == []


def test_failure_before_commit_leaves_no_rows_and_no_files(database, tmp_path):
    exposure, images = _products(tmp_path)

    def boom(session):
        assert session.scalar(select(func.count()).select_from(Image)) == 2  # rows were flushed
        assert len(_files(database.store)) == 3                                 # files were written
        raise RuntimeError("injected failure before commit")

    with pytest.raises(RuntimeError, match="injected failure"):
        with session_scope() as session:
            ingest_provenance().save(session)
            save_products([exposure, *images], session=session, before_commit=boom)
    assert _counts() == {"Exposure": 0, "Image": 0, "Provenance": 0}
    assert _files(database.store) == []
    assert all(p.filepath is None and p.md5sum is None for p in (exposure, *images))


def test_failure_while_writing_files_removes_the_earlier_ones(database, tmp_path):
    exposure, images = _products(tmp_path)
    images[1]._weight = images[1]._weight[:10]  # its file cannot be written
    ingest_provenance().save()
    with pytest.raises(ValueError, match="weight has shape"):
        save_products([exposure, *images])
    assert _counts()["Exposure"] == 0 and _counts()["Image"] == 0
    assert _files(database.store) == []
