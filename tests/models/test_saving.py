"""save_products: files then rows, all or nothing; races; delete_products; on both back ends."""

import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

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


# --- races: the loser adopts the winner's rows --------------------------------------------------


def _background_of(image, provenance):
    import numpy as np

    from improc.background import BackgroundMesh
    from models.background import Background

    mesh = BackgroundMesh(level=np.full((1, 2), 100.0), rms=np.full((1, 2), 5.0), box_size=64,
                          filter_size=1, shape=(64, 80))
    background = Background(mesh=mesh, image=image, provenance_id=provenance.id)
    background.set_file_stem(f"race/background-{background.id.hex[:12]}")
    return background


def test_a_race_loser_adopts_the_winners_rows_and_saves_the_rest(database, tmp_path):
    from models.background import Background

    prov = Provenance(process="backgrounding", code_version="1.0.0", parameters={"race": 1},
                      upstreams=[ingest_provenance()])
    exposure, images = _products(tmp_path)
    with session_scope() as session:
        ingest_provenance().save(session)
        prov.save(session)
        save_products([exposure, *images], session=session)
    # another process made the same image (same exposure, section, provenance) and a background
    theirs = images[0]
    mine = image_from_file(tmp_path / "sim.fits", section_id="A", exposure=exposure)
    background = _background_of(mine, prov)
    files_before = _files(database.store)
    stored = save_products([mine, background], on_conflict="adopt")
    assert stored[0].id == theirs.id and stored[0] is not mine
    assert stored[1] is background and background.image_id == theirs.id   # pointed at their image
    assert mine.filepath is None and len(_files(database.store)) == len(files_before) + 1
    assert _counts()["Image"] == 2
    with session_scope() as session:
        assert session.scalars(select(Background)).one().image_id == theirs.id
    # the same race with "raise": the IntegrityError, and no file of this call left
    again = image_from_file(tmp_path / "sim.fits", section_id="A", exposure=exposure)
    with pytest.raises(IntegrityError):
        save_products([again])
    assert again.filepath is None and len(_files(database.store)) == len(files_before) + 1


def test_an_integrity_error_that_no_stored_row_explains_is_raised(database, tmp_path):
    exposure, images = _products(tmp_path)
    images[0].provenance_id = "no-such-provenance"            # a foreign key, not a race
    ingest_provenance().save()
    with pytest.raises(IntegrityError):
        save_products([exposure, images[0]], on_conflict="adopt")
    assert _counts()["Exposure"] == 0 and _files(database.store) == []


@pytest.mark.parametrize("point, files_kept", [("before_commit", False), ("after_commit", True)])
def test_an_interruption_keeps_the_files_of_committed_rows_only(database, tmp_path, monkeypatch,
                                                                point, files_kept):
    """A signal (SIGTERM, Ctrl-C) raised just before or just after the commit: files go with rows."""
    import models.saving

    def interrupt(name, *products):
        if name == point:
            raise KeyboardInterrupt(name)

    monkeypatch.setattr(models.saving, "fault_point", interrupt)
    exposure, images = _products(tmp_path)
    ingest_provenance().save()
    with pytest.raises(KeyboardInterrupt):
        save_products([exposure, *images])
    assert _counts()["Image"] == (2 if files_kept else 0)
    assert len(_files(database.store)) == (3 if files_kept else 0)
