"""The pipeline end to end on the database: preprocessing to zero point, skipping, tags, atomicity."""

from __future__ import annotations

import numpy as np
import pytest
from sqlalchemy import func, select

from models.background import Background
from models.base import session_scope
from models.exposure import Exposure
from models.image import Image, ingest_file
from models.provenance import Provenance, ProvenanceTag
from models.psf import PSF
from models.source_list import SourceList
from models.world_coordinates import WorldCoordinates
from models.zero_point import ZeroPoint
from pipeline.data_store import DataStore
from pipeline.preprocessing import Preprocessor
from pipeline.top import Pipeline

PRODUCT_TABLES = (Exposure, Image, Background, SourceList, PSF, WorldCoordinates, ZeroPoint)


def _counts() -> dict[str, int]:
    with session_scope() as session:
        return {t.__tablename__: session.scalar(select(func.count()).select_from(t)) for t in PRODUCT_TABLES}


def _files(store) -> list[str]:
    return sorted(str(p.relative_to(store.root)) for p in store.root.rglob("*") if p.is_file())


def test_pipeline_calibrates_a_raw_exposure_and_reruns_create_nothing(database, sim_field, tmp_path):
    config = sim_field.config(database)
    exposure, images = ingest_file(sim_field.paths[0])
    assert images == [] and exposure.is_raw and exposure.section_ids == ["0"]

    ds = Pipeline(config).run(exposure, "0")
    sim = sim_field.sims[0]
    image = ds.get_image()
    assert image.data.shape == sim.data.shape
    # preprocessing removed the 1000 ADU bias: the sky is back at the simulated level
    assert np.median(image.data) == pytest.approx(np.median(sim.data), abs=2.0)
    assert ds.get_background().level_median == pytest.approx(sim.params.sky_adu, rel=0.01)
    sources = ds.get_sources()
    bright = sim.stars[(sim.stars["in_image"]) & (sim.stars["snr"] > 20)]
    assert len(sources.data) >= 0.9 * len(bright)
    assert ds.get_psf().fwhm_pixels == pytest.approx(sim.params.fwhm_arcsec / sim.params.pixel_scale, rel=0.1)
    wcs = ds.get_wcs()
    assert wcs.rms_arcsec < 0.05 and wcs.num_stars >= 10
    # the fitted WCS puts true star positions where they are
    good = bright[(bright["x"] > 5) & (bright["x"] < 1018) & (bright["y"] > 5) & (bright["y"] < 1018)]
    ra, dec = wcs.wcs.pixel_to_world_values(good["x"], good["y"])
    offset = np.hypot((ra - good["ra"]) * np.cos(np.radians(good["dec"])), dec - good["dec"]) * 3600
    assert np.sqrt(np.mean(offset**2)) < 0.05
    zp = ds.get_zp()
    assert zp.zp == pytest.approx(sim.params.zero_point, abs=0.03)
    assert zp.lim_mag > 21 and zp.image_id == image.id
    assert ds.get_psf().fwhm_arcsec == pytest.approx(sim.params.fwhm_arcsec, rel=0.1)
    # the image row is as preprocessing made it: no step wrote into it
    with session_scope() as session:
        stored = session.get(Image, image.id)
        assert stored.wcs_header == image.wcs_header and stored.bad_flags == 0
    header_wcs = image.wcs.pixel_to_world_values(good["x"], good["y"])
    assert np.max(np.abs(np.asarray(header_wcs[1]) - good["dec"])) * 3600 > 1.0   # the raw header is off

    before, files = _counts(), _files(database.store)
    assert before == {t.__tablename__: 1 for t in PRODUCT_TABLES}
    again = Pipeline(config).run(exposure, "0")
    assert all(stats.get("skipped") or "nothing_to_do" in stats for stats in again.stats.values())
    assert "make-ref" in again.stats["subtraction"]["nothing_to_do"]      # no reference set yet
    assert _counts() == before and _files(database.store) == files


def test_tagged_products_come_back_from_the_database(database, sim_field, tmp_path):
    config = sim_field.config(database)
    exposure, _ = ingest_file(sim_field.paths[0])
    made = Pipeline(config).run(exposure, "0")
    ProvenanceTag.add("test", made.prov_tree.values())

    prov = Provenance.get_for_tag(tag="test", process="preprocessing")
    found = Image.find_images(provenance_ids=[prov.id], ra=made.image.ra, dec=made.image.dec)
    assert [im.id for im in found] == [made.image.id]
    ds = DataStore(str(found[0].id))
    ds.load_prov_tree("test")
    assert ds.get_sources().id == made.get_sources().id
    assert np.array_equal(ds.get_sources().data["x"], made.get_sources().data["x"])
    assert ds.get_psf().get_clip(100.3, 200.7).sum() == pytest.approx(1.0, abs=1e-6)
    assert ds.get_background().counts.shape == made.image.data.shape
    assert ds.get_zp().zp == made.get_zp().zp
    assert ds.get_wcs().header_text == made.get_wcs().header_text
    # a different parameter makes a different tree, whose products do not exist yet
    other = DataStore(found[0])
    other.make_prov_tree(sim_field.config(database, **{"extraction.threshold": 4.0}))
    assert other.get_background() is not None and other.get_sources() is None and other.get_zp() is None


def test_failed_save_leaves_no_rows_and_no_files(database, sim_field, tmp_path):
    exposure, _ = ingest_file(sim_field.paths[0])
    before_counts, before_files = _counts(), _files(database.store)
    config = sim_field.config(database)
    pipe = Pipeline(config)
    ds = DataStore(exposure, "0")
    ds.make_prov_tree(pipe.steps)
    for step in pipe.steps[:3]:  # preprocessing, background, extraction: four new products
        step(ds)
    assert len(ds.new_products()) == 4

    def crash(session):
        raise RuntimeError("simulated crash before commit")

    with pytest.raises(RuntimeError, match="simulated crash"):
        ds.save_and_commit(before_commit=crash)
    assert _counts() == before_counts
    assert _files(database.store) == before_files
    # the same DataStore can still be saved afterwards
    ds.save_and_commit()
    assert _counts()["source_lists"] == 1 and _counts()["psfs"] == 1


def test_preprocessing_of_a_real_raw_frame(database, shared_data, tmp_path):
    exposure, images = ingest_file(shared_data / "ccdproc_raw" / "a8280271.fits")
    assert images == [] and exposure.is_raw
    ds = Pipeline(steps=[Preprocessor(overscan_method="median")]).run(exposure, exposure.section_ids[0])
    image = ds.get_image()
    assert image.data.shape == (520, 512)
    from astropy.io import fits
    raw = fits.getdata(shared_data / "ccdproc_raw" / "a8280271.fits").astype(float)
    overscan = np.median(raw[:, 3:13])
    assert np.median(image.data) == pytest.approx(np.median(raw[:, 16:528]) - overscan, abs=1.0)
    assert image.weight.min() >= 0 and np.all(image.weight[image.flags == 0] > 0)
    with session_scope() as session:
        stored = session.get(Image, image.id)
        assert stored.provenance_id == ds.prov_tree["preprocessing"].id
        assert stored.exposure_id == exposure.id
