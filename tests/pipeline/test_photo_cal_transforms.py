"""Photometric transformations belong to the instrument: photocal end to end on cameras that are
not DECam (issue 9).

One simulated field (1024 x 1024 pixels of 0.26", 100 000 stars per square degree, zero point
31.0 in r) is rendered with a made-up transformation, ``m_r = G + 0.25 - 0.62 c + 0.09 c^2``
(c = BP - RP), which differs from DECam's r by 0.05-1.3 mag (median 0.22) over the calibrators.  The
same raw frame is ingested as two YAML instruments (``instruments.extra_files``) and calibrated
by the whole pipeline in one SQLite database:

* ``MadeUpCam`` declares that transformation: its zero point must be the truth within 5 mmag;
* ``PlainCam`` declares none: it must get BAND_UNCALIBRATED and a colour term fitted onto G,
  never DECam's polynomial.

Measured (seed 11; the module runs in ~30 s): MadeUpCam zp - truth = -0.0013 mag (dzp 0.0013)
from 73 stars; PlainCam colour term +0.350 (the slope of the truth over its calibrators' colours:
+0.354), its line 0.024 mag rms from the truth (the parabola's curvature).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from improc.color_transforms import DECAM_ZHOU2020, BandTransform, table_digest
from models.context import Context
from models.image import ingest_file
from models.instrument import get_instrument
from models.instruments.synthetic import SYNTHETIC_DEFINITION, write_simulated_file
from models.quality import QualityFlag
from models.schema import upgrade
from pipeline.data_store import DataStore
from pipeline.photo_cal import PhotoCalibrator
from pipeline.top import Pipeline
from tests.pipeline.conftest import make_field
from util.config import Config, ConfigError

MADE_UP = BandTransform(coefficients=(0.25, -0.62, 0.09), color_range=(-0.3, 3.2), average_color=1.1)


def _yaml(name: str, instrume: str, transforms: str) -> str:
    """A YAML instrument reading the simulator's files (as the Synthetic one does)."""
    keywords = SYNTHETIC_DEFINITION["keywords"]
    lines = [f"name: {name}", f"match: {{INSTRUME: '^{instrume}$'}}", "product: auto", "keywords:"]
    lines += [f"  {key}: [{', '.join(names)}]" for key, names in keywords.items()]
    lines += ["defaults: {gain: 1.0, read_noise: 5.0, saturation: 65535.0, pixel_scale: 0.26, section_id: '0'}",
              "ra_unit: deg", "weight_hdus: [WEIGHT]", "flags_hdus: [FLAGS, BPM]",
              "flag_bits: {1: BAD, 2: SATURATED, 4: CR, 8: BLEED}", transforms]
    return "\n".join(lines) + "\n"


@dataclass
class Calibrated:
    sim: object
    context: Context
    zp: dict        # instrument name -> its ZeroPoint
    ds: dict        # instrument name -> its DataStore


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory) -> Calibrated:
    folder = tmp_path_factory.mktemp("transforms")
    field = make_field(folder / "field", n=1, size=1024, transform=MADE_UP)
    sim = field.sims[0]
    paths = []
    for name, instrume, transforms in (
            ("MadeUpCam", "MADEUP", f"transforms: {{r: {MADE_UP.as_dict()}}}"),
            ("PlainCam", "PLAINCAM", "# no transforms: the band is uncalibrated")):
        (folder / f"{name}.yaml").write_text(_yaml(name, instrume, transforms))
        sim.header["INSTRUME"] = instrume
        paths.append(write_simulated_file(sim, folder / f"{name}.fits", raw=True, seed=1))
    catalog = {"catalog": "gaia_folder", "catalog_folder": str(field.gaia_folder)}
    config = Config.load(**{"db.url": f"sqlite:///{folder / 'db.sqlite'}", "storage.data_root": str(folder / "data"),
                            "instruments.extra_files": [str(folder / "MadeUpCam.yaml"), str(folder / "PlainCam.yaml")],
                            "astrocal": catalog, "photocal": dict(catalog)})
    context = Context.from_config(config)
    upgrade(context.engine)
    zps, stores = {}, {}
    for name, path in zip(("MadeUpCam", "PlainCam"), paths):
        exposure, _ = ingest_file(path, context=context)
        assert exposure.instrument == name
        stores[name] = Pipeline(context).run(exposure, exposure.section_ids[0])
        zps[name] = stores[name].get_zp()
    return Calibrated(sim=sim, context=context, zp=zps, ds=stores)


def test_declared_transformation_gives_the_zero_point_within_5_mmag(calibrated):
    zp, truth = calibrated.zp["MadeUpCam"], calibrated.sim.params.zero_point
    assert zp.quality_flags == 0 and zp.num_stars >= 50
    assert abs(zp.zp - truth) <= 0.005, f"zp {zp.zp:.4f} vs truth {truth}"
    assert zp.band_transform == MADE_UP.as_dict()
    # the test can tell: DECam's r polynomial for the same stars would be off by tenths of a mag
    stars = zp.calibrator_table()
    used = np.asarray(stars["used"], dtype=bool)
    gaia = calibrated.sim.gaia
    row = {int(s): i for i, s in enumerate(gaia["source_id"])}
    rows = [row[int(s)] for s in stars["gaia_source_id"][used]]
    g, bp, rp = (np.asarray(gaia[c], float)[rows] for c in ("phot_g_mean_mag", "phot_bp_mean_mag", "phot_rp_mean_mag"))
    offset = np.median(DECAM_ZHOU2020["r"].magnitudes(g, bp, rp) - MADE_UP.magnitudes(g, bp, rp))
    assert abs(offset) > 0.1


def test_zero_point_records_the_stars_that_calibrated_it(calibrated):
    zp = calibrated.zp["MadeUpCam"]
    stars = zp.calibrator_table()
    assert set(stars.colnames) == {"source_row", "gaia_source_id", "bp_rp", "catalog_mag", "instrumental_mag",
                                   "residual", "used"}
    used = np.asarray(stars["used"], dtype=bool)
    assert used.sum() == zp.num_stars and len(stars) >= zp.num_stars
    residual = np.asarray(stars["residual"], float)[used]
    assert np.sqrt(np.mean(residual**2)) == pytest.approx(zp.scatter, abs=1e-4)
    # each calibrator is a source of the list and a star of the catalog, with its true magnitude
    sources = calibrated.ds["MadeUpCam"].get_sources()
    assert np.max(stars["source_row"]) < len(sources.data)
    truth = calibrated.sim.stars
    true_mag = dict(zip(np.asarray(truth["source_id"], int), np.asarray(truth["mag"], float)))
    catalog_mag = np.asarray(stars["catalog_mag"], float)
    np.testing.assert_allclose(catalog_mag, [true_mag[int(s)] for s in stars["gaia_source_id"]], atol=1e-4)


def test_a_camera_without_transformation_is_flagged_with_a_fitted_colour_term(calibrated):
    """G - m = -(0.25 - 0.62 c + 0.09 c^2): a line through it over the calibrators' colours has a
    slope of +0.35 and passes within the parabola's curvature (0.024 mag rms) of it."""
    zp = calibrated.zp["PlainCam"]
    assert zp.quality_flags == QualityFlag.BAND_UNCALIBRATED
    assert zp.band_transform is None and zp.color_term is not None
    stars = zp.calibrator_table()
    used = np.asarray(stars["used"], dtype=bool)
    color = np.asarray(stars["bp_rp"], float)[used]
    truth = calibrated.sim.params.zero_point - np.polynomial.polynomial.polyval(color, MADE_UP.coefficients)
    slope, intercept = np.polyfit(color, truth, 1)
    assert zp.color_term == pytest.approx(slope, abs=0.05)
    fitted = zp.zp + zp.color_term * color
    assert np.sqrt(np.mean((fitted - truth) ** 2)) < 0.04
    np.testing.assert_allclose(np.asarray(stars["catalog_mag"], float)[used],      # G, not DECam's r
                               np.asarray(stars["instrumental_mag"], float)[used]
                               + zp.zp + zp.color_term * color + np.asarray(stars["residual"], float)[used],
                               atol=1e-4)


def test_transformations_enter_the_photocal_provenance_by_content(calibrated, tmp_path):
    made_up = get_instrument("MadeUpCam", context=calibrated.context)
    prov = calibrated.ds["MadeUpCam"].provenance("photocal")
    recorded = prov.parameters["band_transforms"]
    assert recorded["MadeUpCam"] == table_digest({"r": MADE_UP}) == made_up.transforms_digest()
    assert recorded["DECam"] == recorded["Synthetic"] == table_digest(DECAM_ZHOU2020)
    assert "PlainCam" not in recorded                      # no table, nothing to record
    # one provenance for both cameras (one tag covers every instrument)
    assert calibrated.ds["PlainCam"].provenance("photocal").id == prov.id
    # a configuration without MadeUpCam makes another photocal provenance ...
    image = calibrated.ds["MadeUpCam"].get_image()
    other = Context.from_config(Config.load(**{"storage.data_root": str(tmp_path / "data")}))
    from models.schema import upgrade

    upgrade(other.engine)       # (the tree looks up the reference set's tag in it)
    tree = DataStore(image, context=other, persist=False).make_prov_tree()
    assert tree["photocal"].id != prov.id and tree["extraction"].id == calibrated.ds["MadeUpCam"].provenance(
        "extraction").id
    # ... which refuses to label MadeUpCam's results with a table it did not record
    with pytest.raises(ConfigError, match=r"recorded band transformations none for instrument MadeUpCam, which now "
                                          r"has sha256:"):
        PhotoCalibrator.band_transform(made_up, "r", tree["photocal"])
    assert PhotoCalibrator.band_transform(made_up, "r", prov) == MADE_UP
    assert PhotoCalibrator.band_transform(made_up, "i", prov) is None
