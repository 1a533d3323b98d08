"""Bad input for calibration: each failure names the image and the cause, flags the image, saves no half.

Every case runs the whole `Pipeline` on the database (SQLite and PostgreSQL) and checks three
things: the `StepError` names the failing step, the image (``image.describe()``) and the cause;
the image row, reloaded from the database, carries exactly the expected `ImageBadness` bit; and
the products of the steps before the failure exist (one row each, resuming later is cheap) while
no row and no file of the failing step or later ones does -- every file on disk belongs to a row.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from sqlalchemy import func, select

from improc.astrometry import AstrometryError
from improc.errors import BadDataError
from improc.flags import PixelFlag
from improc.photometry import PhotometryError
from models.background import Background
from models.base import session_scope
from models.catalog_excerpt import CatalogExcerpt
from models.exposure import Exposure
from models.image import Image, ImageBadness, ingest_file
from models.psf import PSF
from models.quality import QualityFlag
from models.source_list import SourceList
from models.world_coordinates import WorldCoordinates
from models.zero_point import ZeroPoint
from models.instruments.synthetic import write_simulated_file
from improc.extraction import TooFewSourcesError
from pipeline.catalogs import CatalogSource, reference_catalog
from pipeline.parameters import ParameterError
from pipeline.step import StepError
from pipeline.top import Pipeline
from tests.pipeline.conftest import SimulatedField, make_field
from util.config import Config, ConfigError
from util.gaia import CatalogError, write_gaia_folder

#: The calibration products in pipeline order, with the step that makes each.
PRODUCTS = {"background": (Background, "backgrounding"), "sources": (SourceList, "extraction"),
            "psf": (PSF, "extraction"), "wcs": (WorldCoordinates, "astrocal"),
            "zp": (ZeroPoint, "photocal")}
STEPS = ["backgrounding", "extraction", "astrocal", "photocal"]
FILE_TABLES = (Exposure, Image, Background, SourceList, PSF, CatalogExcerpt)

#: Columns of every NaN region of the partly blank image (a third of a 1024-pixel chip).
NAN_COLUMNS = slice(0, 340)


# --- fixtures ---------------------------------------------------------------------------------


@dataclass
class GoodField(SimulatedField):
    """A simulated field whose image calibrates, also written as a reduced image file."""

    reduced: Path


@pytest.fixture(scope="module")
def good_field(tmp_path_factory) -> GoodField:
    """A 512 x 512 raw exposure and reduced image, and their Gaia folder (read-only: copy to change)."""
    folder = tmp_path_factory.mktemp("good")
    field = make_field(folder, size=512)
    reduced = write_simulated_file(field.sims[0], folder / "reduced.fits", raw=False)
    return GoodField(field.paths, field.sims, field.gaia_folder, reduced)


@dataclass
class NanFiles:
    """Reduced images of one simulation with NaN regions, and the simulation."""

    field: SimulatedField
    third_blank: Path    #: columns NAN_COLUMNS are NaN
    almost_blank: Path   #: NaN except a 64 x 64 patch


@pytest.fixture(scope="module")
def nan_files(tmp_path_factory) -> NanFiles:
    folder = tmp_path_factory.mktemp("nan")
    field = make_field(folder, size=1024, raw=False)
    third, almost = folder / "third_blank.fits", folder / "almost_blank.fits"
    for path in (third, almost):
        shutil.copy(field.paths[0], path)
    with fits.open(third, mode="update") as hdul:
        hdul[0].data[:, NAN_COLUMNS] = np.nan
    with fits.open(almost, mode="update") as hdul:
        keep = hdul[0].data[600:664, 600:664].copy()
        hdul[0].data[:] = np.nan
        hdul[0].data[600:664, 600:664] = keep
    return NanFiles(field, third, almost)


# --- helpers ----------------------------------------------------------------------------------


def _only_image() -> Image:
    """The one image row in the database, freshly loaded."""
    with session_scope() as session:
        return session.scalars(select(Image)).one()


def _product_counts() -> dict[str, int]:
    with session_scope() as session:
        return {name: session.scalar(select(func.count()).select_from(model))
                for name, (model, _) in PRODUCTS.items()}


def _files_on_disk(store) -> set[str]:
    return {str(p.relative_to(store.root)) for p in store.root.rglob("*") if p.is_file()}


def _files_of_rows() -> set[str]:
    with session_scope() as session:
        return {path for model in FILE_TABLES for path in session.scalars(select(model.filepath))}


def _fail(target, config: Config, *, step: str, cause: type[Exception], match: str) -> StepError:
    """Run the pipeline, expecting ``step`` to fail with ``cause``; return the StepError."""
    with pytest.raises(StepError) as info:
        Pipeline(config).run(target, "0")
    err = info.value
    assert err.process == step and isinstance(err.cause, cause), repr(err)
    assert str(err).startswith(f"{step} failed on image {_only_image().describe()}: {cause.__name__}: ")
    assert info.match(match)
    return err


def _assert_stopped_at(step: str, badness: ImageBadness, store) -> None:
    """The image carries exactly ``badness``; products of the steps before ``step`` and no others."""
    assert _only_image().bad_flags == badness
    done = STEPS[:STEPS.index(step)]
    assert _product_counts() == {name: int(made_by in done) for name, (_, made_by) in PRODUCTS.items()}
    assert _files_on_disk(store) == _files_of_rows()


def _catalog_copy(field: SimulatedField, folder: Path, *, stars: Table | None = None) -> Path:
    """A private Gaia folder for one test (the field's stars, or ``stars``)."""
    write_gaia_folder(field.sims[0].gaia if stars is None else stars, folder)
    return folder


def _config(field: SimulatedField, database, catalog_folder: Path) -> Config:
    """The field's configuration, reading another Gaia folder."""
    catalog = {"catalog": "gaia_folder", "catalog_folder": str(catalog_folder)}
    return field.config(database, astrocal=catalog, photocal=dict(catalog))


# --- pixels: no stars, saturation, NaN --------------------------------------------------------


STRICT = {"extraction.psf_fallback": "none", "astrocal.simplest_model": "tan", "photocal.uncalibrated": "fail"}


def _degraded_to_the_end(field, database, exposure) -> None:
    """With the default (degrading) parameters the image goes through every step: the products say
    what could not be measured, and the image is not marked bad."""
    ds = Pipeline(field.config(database)).run(exposure, "0")
    assert _only_image().bad_flags == 0 and _product_counts() == {name: 1 for name in PRODUCTS}
    assert ds.get_psf().kind == "moffat_default" and ds.get_psf().quality_flags == QualityFlag.PSF_DEFAULT
    assert ds.get_zp().zp is None and ds.get_zp().quality_flags == QualityFlag.ZP_UNCALIBRATED


@pytest.mark.filterwarnings("error::RuntimeWarning")   # e.g. a median of no stars
def test_image_without_stars_fails_extraction_and_is_flagged(database, tmp_path):
    field = make_field(tmp_path / "sim", size=512, n_stars=0, n_galaxies=0)  # cosmic rays remain
    exposure, _ = ingest_file(field.paths[0])
    # preprocessing flags the cosmic rays, so nothing passes for a source
    _fail(exposure, field.config(database, **STRICT), step="extraction", cause=TooFewSourcesError,
          match=r"not enough sources to estimate the FWHM: 0 of 0 have snr")
    _assert_stopped_at("extraction", ImageBadness.NO_STARS, database.store)


@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_image_without_stars_degrades_to_flagged_products(database, tmp_path):
    field = make_field(tmp_path / "sim", size=512, n_stars=0, n_galaxies=0)
    exposure, _ = ingest_file(field.paths[0])
    _degraded_to_the_end(field, database, exposure)


def test_sky_above_saturation_fails_backgrounding_naming_the_flag(database, tmp_path):
    # saturation is 50000 ADU; no bad columns, whose values would not saturate
    field = make_field(tmp_path / "sim", size=512, sky_adu=60000.0, n_bad_columns=0)
    exposure, _ = ingest_file(field.paths[0])
    _fail(exposure, field.config(database), step="backgrounding", cause=BadDataError,
          match=r"only 0 of 262144 pixels are usable \(flagged: SATURATED 262144 \(100\.0%\)\)")
    _assert_stopped_at("backgrounding", ImageBadness.BAD_BACKGROUND, database.store)


def test_field_of_saturated_stars_fails_extraction_and_is_flagged(database, tmp_path):
    # 9 magnitudes deeper: nearly every star of the 14-23 G range saturates.
    field = make_field(tmp_path / "sim", size=512, zero_point=40.0)
    sim = field.sims[0]
    inside = sim.stars[sim.stars["in_image"]]
    assert np.mean(inside["saturated"]) > 0.8
    exposure, _ = ingest_file(field.paths[0])
    # saturated stars do not measure the FWHM, and no other is bright enough (the two that were,
    # before preprocessing flagged cosmic rays, were cosmic rays)
    _fail(exposure, field.config(database, **STRICT), step="extraction", cause=TooFewSourcesError,
          match=r"not enough sources to estimate the FWHM: 0 of \d+ have snr >= 20")
    _assert_stopped_at("extraction", ImageBadness.NO_STARS, database.store)


def test_field_of_saturated_stars_degrades_to_flagged_products(database, tmp_path):
    field = make_field(tmp_path / "sim", size=512, zero_point=40.0)
    exposure, _ = ingest_file(field.paths[0])
    _degraded_to_the_end(field, database, exposure)


def test_large_nan_region_is_flagged_no_data_and_the_rest_calibrates(database, nan_files, tmp_path):
    field = nan_files.field
    sim = field.sims[0]
    _, images = ingest_file(nan_files.third_blank)
    image = images[0]
    nan = np.zeros(sim.data.shape, bool)
    nan[:, NAN_COLUMNS] = True
    # NO_DATA: the NaN pixels, and those the file already gave zero weight (saturated cores)
    assert np.array_equal(image.flags & PixelFlag.NO_DATA != 0, nan | (sim.weight <= 0))
    assert np.all(image.weight[nan] == 0) and np.all(image.data[nan] == 0)

    ds = Pipeline(field.config(database)).run(image)
    stored = _only_image()
    assert stored.bad_flags == 0 and ds.get_zp().image_id == stored.id
    assert _product_counts() == {name: 1 for name in PRODUCTS}
    assert ds.get_background().level_median == pytest.approx(sim.params.sky_adu, rel=0.03)
    fwhm = sim.params.fwhm_arcsec / sim.params.pixel_scale
    assert ds.get_psf().fwhm_pixels == pytest.approx(fwhm, rel=0.1)
    # only stars whose wings reach the data are found on the blank side, none deeper than a FWHM
    x = np.asarray(ds.get_sources().data["x"])
    assert x.min() > NAN_COLUMNS.stop - 0.5 - fwhm
    assert ds.get_wcs().rms_arcsec < 0.05 and ds.get_wcs().num_stars >= 20
    assert ds.get_zp().zp == pytest.approx(sim.params.zero_point, abs=0.03)


def test_almost_blank_image_fails_backgrounding_naming_no_data(database, nan_files, tmp_path):
    _, images = ingest_file(nan_files.almost_blank)
    assert np.count_nonzero(images[0].flags & PixelFlag.NO_DATA == 0) == 64 * 64
    _fail(images[0], nan_files.field.config(database), step="backgrounding", cause=BadDataError,
          match=r"only \d+ of 1048576 pixels are usable \(flagged: .*NO_DATA 1044480 \(99\.6%\).*"
                r"needs at least half a mesh box, 8192 pixels")
    _assert_stopped_at("backgrounding", ImageBadness.BAD_BACKGROUND, database.store)


# --- reference catalog: too few stars, wrong files --------------------------------------------


def _six_brightest(good_field, tmp_path) -> Path:
    sim = good_field.sims[0]
    in_image = sim.gaia[np.isin(sim.gaia["source_id"], sim.stars["source_id"][sim.stars["in_image"]])]
    in_image.sort("phot_g_mean_mag")  # the six brightest: a very shallow catalog
    return _catalog_copy(good_field, tmp_path / "gaia", stars=in_image[:6])


def test_too_few_catalog_stars_fail_astrometry_when_no_degradation_is_allowed(database, good_field, tmp_path):
    folder = _six_brightest(good_field, tmp_path)
    exposure, _ = ingest_file(good_field.paths[0])
    catalog = {"catalog": "gaia_folder", "catalog_folder": str(folder)}
    config = good_field.config(database, astrocal={**catalog, "simplest_model": "tan"}, photocal=catalog)
    _fail(exposure, config, step="astrocal", cause=AstrometryError, match=r"catalog (stars|matches)")
    _assert_stopped_at("astrocal", ImageBadness.BAD_ASTROMETRY, database.store)
    with session_scope() as session:  # the catalog excerpt is a cache, kept for the next run
        assert session.scalars(select(CatalogExcerpt.num_items)).all() == [6]


def test_too_few_catalog_stars_give_a_corrected_header_wcs_flagged_with_its_uncertainty(
        database, good_field, tmp_path):
    """With 6 stars (fewer than min_matches = 10) the header WCS, 10" and 0.3 deg off, is moved
    onto them: positions good to the stated uncertainty, flagged, not bad."""
    folder = _six_brightest(good_field, tmp_path)
    exposure, _ = ingest_file(good_field.paths[0])
    catalog = {"catalog": "gaia_folder", "catalog_folder": str(folder)}
    config = good_field.config(database, astrocal=catalog, photocal={**catalog, "min_stars": 2})
    ds = Pipeline(config).run(exposure, "0")
    wcs = ds.get_wcs()
    assert wcs.model == "shift_rotation" and wcs.quality_flags == QualityFlag.WCS_HEADER_CORRECTED
    assert wcs.num_stars >= 4 and 0.0 < wcs.uncertainty_arcsec < 0.3
    sim = good_field.sims[0]
    stars = sim.stars[sim.stars["in_image"] & (sim.stars["snr"] > 30)]
    ra, dec = wcs.wcs.pixel_to_world_values(stars["x"], stars["y"])
    error = np.hypot((ra - stars["ra"]) * np.cos(np.radians(stars["dec"])), dec - stars["dec"]) * 3600
    assert np.sqrt(np.mean(error**2)) < 3 * wcs.uncertainty_arcsec
    assert _only_image().bad_flags == 0 and "WCS_HEADER_CORRECTED" in repr(wcs)


def test_too_few_calibration_stars_fail_photometry(database, good_field, tmp_path):
    exposure, _ = ingest_file(good_field.paths[0])
    photocal = {"catalog": "gaia_folder", "catalog_folder": str(good_field.gaia_folder), "min_stars": 5000,
                "fewest_stars": 5000, "uncalibrated": "fail"}
    _fail(exposure, good_field.config(database, photocal=photocal), step="photocal",
          cause=PhotometryError, match=r"only \d+ .*need >= 5000")
    _assert_stopped_at("photocal", ImageBadness.BAD_PHOTOMETRY, database.store)


def _not_fits(path: Path) -> None:
    path.write_text("ra,dec,phot_g_mean_mag\n150.0,2.0,17.0\n")


def _no_gaia_columns(path: Path) -> None:
    table = Table.read(path)
    table.rename_columns(["ra", "dec"], ["RA_ICRS", "DE_ICRS"])
    table.write(path, overwrite=True)


def _text_columns(path: Path) -> None:
    table = Table.read(path)
    table["ra"] = np.array([f"{v:.6f}d" for v in table["ra"]])
    table.write(path, overwrite=True)


SPOILERS = {
    "not_fits": (_not_fits, r"cannot read Gaia catalog file .*chunk-\d+\.fits as FITS"),
    "no_gaia_columns": (_no_gaia_columns,
                        r"Gaia catalog file .*chunk-\d+\.fits lacks required column\(s\) \['ra', 'dec'\]"),
    "text_columns": (_text_columns, r"Gaia catalog folder .*gaia holds a file whose columns are not Gaia's"),
}


def _spoiled_catalog(field: SimulatedField, folder: Path, spoil) -> Path:
    _catalog_copy(field, folder)
    for path in folder.glob("chunk-*.fits"):
        spoil(path)
    return folder


@pytest.mark.parametrize("kind", SPOILERS)
def test_catalog_file_of_wrong_format_is_named(database, good_field, tmp_path, kind):
    spoil, match = SPOILERS[kind]
    folder = _spoiled_catalog(good_field, tmp_path / "gaia", spoil)
    image = Image.from_file(good_field.reduced)
    with pytest.raises(CatalogError, match=match):
        reference_catalog(image, CatalogSource(kind="gaia_folder", folder=str(folder)))
    with session_scope() as session:
        assert session.scalar(select(func.count()).select_from(CatalogExcerpt)) == 0


def test_catalog_file_of_wrong_format_fails_astrometry_then_a_fixed_one_resumes(database, good_field, tmp_path):
    spoil, match = SPOILERS["not_fits"]
    folder = _spoiled_catalog(good_field, tmp_path / "gaia", spoil)
    config = _config(good_field, database, folder)
    exposure, _ = ingest_file(good_field.paths[0])
    err = _fail(exposure, config, step="astrocal", cause=CatalogError, match=match)
    # a broken catalog is the set-up's fault, not the image's: nothing is marked bad
    assert not err.bad_data
    _assert_stopped_at("astrocal", ImageBadness(0), database.store)
    with session_scope() as session:
        assert session.scalar(select(func.count()).select_from(CatalogExcerpt)) == 0

    shutil.rmtree(folder)
    _catalog_copy(good_field, folder)
    ds = Pipeline(config).run(exposure, "0")
    assert [ds.stats[s].get("skipped", False) for s in ["preprocessing", *STEPS]] == [
        True, True, True, False, False]
    assert _only_image().bad_flags == 0 and _product_counts() == {name: 1 for name in PRODUCTS}
    assert ds.get_wcs().rms_arcsec < 0.05 and ds.get_wcs().num_stars >= 10


# --- configuration ----------------------------------------------------------------------------


def test_config_value_of_wrong_type_names_the_key_and_the_file(tmp_path):
    path = tmp_path / "user.yaml"
    path.write_text("extraction:\n  threshold: high\n")
    with pytest.raises(ConfigError, match=rf"config key 'extraction\.threshold' in {re.escape(str(path))} "
                                          r"must be of type float, got str 'high'"):
        Config.load(path)


def test_step_parameter_of_wrong_type_names_the_step_and_the_key(tmp_path):
    path = tmp_path / "user.yaml"
    path.write_text("astrocal:\n  catalog_folder: 5\n")  # the default (null) has no type to check
    config = Config.load(path)
    with pytest.raises(ParameterError, match=r"astrocal parameter 'catalog_folder' must be "
                                             r"str \| None, got 5"):
        Pipeline(config)
    with pytest.raises(ParameterError, match=r"extraction threshold must be > 0, got -1"):
        Pipeline(Config.load(**{"extraction.threshold": -1}))
    with pytest.raises(ParameterError, match=r"photocal min_stars must be >= 2, got 1"):
        Pipeline(Config.load(**{"photocal.min_stars": 1}))
