"""Preprocessing of raw frames: the bad-pixel mask that travels with the raw file is flagged BAD.

The simulator's raw frames (`models.instruments.synthetic.write_simulated_file`) carry their bad
columns in a BPM HDU; the image made by `Preprocessor` must flag exactly those pixels BAD with
weight 0, and neither cosmic rays (for later steps to find) nor anything when the plane is absent.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage
import pytest
from astropy.io import fits

from improc.flags import has_flag
from improc.sim_detector import FLAG_BAD_COLUMN, FLAG_COSMIC_RAY
from improc.simulator import SimulatedImage, SimulationParams, simulate_image
from models.image import ingest_file
from models.instrument import AmplifierInfo, BadInputError, SectionInfo
from models.instruments.synthetic import BPM_EXTNAME, write_simulated_file
from pipeline.preprocessing import PreprocessingParams, Preprocessor
from pipeline.step import StepError
from pipeline.top import Pipeline
from util.config import ConfigError


@pytest.fixture(scope="module")
def sim() -> SimulatedImage:
    """A 256 x 256 frame with 4 bad columns and 60 cosmic rays (some off the bad columns)."""
    return simulate_image(SimulationParams(nx=256, ny=256, seed=21, n_bad_columns=4,
                                           n_cosmic_rays=60, star_density=20000.0))


def _preprocess(path: Path):
    """The Image that the pipeline's preprocessing step makes of the raw file at ``path``."""
    exposure, images = ingest_file(path)
    assert images == [] and exposure.is_raw and exposure.section_ids == ["0"]
    return Pipeline(steps=[Preprocessor(params=PreprocessingParams())]).run(exposure, "0").get_image()


def test_raw_frame_bad_columns_are_flagged_bad_with_zero_weight(database, sim, tmp_path):
    bad = (sim.flags & FLAG_BAD_COLUMN) != 0
    cosmic_only = ((sim.flags & FLAG_COSMIC_RAY) != 0) & ~bad
    assert bad.sum() > 256 and cosmic_only.sum() > 20  # the test needs both kinds of defect
    image = _preprocess(write_simulated_file(sim, tmp_path / "raw.fits", raw=True))

    flagged = has_flag(image.flags, "BAD")
    assert image.flags.shape == sim.data.shape
    np.testing.assert_array_equal(flagged, bad)
    assert np.all(image.weight[bad] == 0) and np.all(image.weight[~image.flags.astype(bool)] > 0)
    assert not has_flag(image.flags, "BAD")[cosmic_only].any()
    # the hits are found (not read from the simulator's truth): those away from the bad columns
    hit = has_flag(image.flags, "CR")
    clear = cosmic_only & ~ndimage.binary_dilation(bad, iterations=3)
    assert np.all(hit[clear]) and np.all(image.weight[hit] == 0)
    # and little else: a noise spike of 5.7 sigma on a faint star's core
    assert np.sum(hit & ~ndimage.binary_dilation(cosmic_only, structure=np.ones((3, 3)))) <= 2
    # the masked pixels keep their (bias-subtracted) values: masking is not interpolation
    np.testing.assert_allclose(image.data[bad], sim.data[bad], atol=0.51)


def test_raw_frame_without_a_mask_plane_has_no_bad_flags(database, sim, tmp_path):
    full = write_simulated_file(sim, tmp_path / "with_bpm.fits", raw=True)
    with fits.open(full) as hdul:
        assert [hdu.name for hdu in hdul] == ["PRIMARY", BPM_EXTNAME]
        fits.PrimaryHDU(hdul[0].data, header=hdul[0].header).writeto(tmp_path / "no_bpm.fits")
    image = _preprocess(tmp_path / "no_bpm.fits")
    assert not has_flag(image.flags, "BAD").any()
    columns = (sim.flags & FLAG_BAD_COLUMN) != 0
    # (a hot column's sharp pixels may be taken for cosmic rays, and flagged CR)
    assert np.all(image.weight[columns & ~has_flag(image.flags, "CR")] > 0)


def test_mask_plane_of_the_wrong_shape_names_the_file(database, sim, tmp_path):
    full = write_simulated_file(sim, tmp_path / "with_bpm.fits", raw=True)
    with fits.open(full) as hdul:
        trimmed = hdul[BPM_EXTNAME].data[:, :256]  # the trimmed geometry instead of the raw one
        fits.HDUList([fits.PrimaryHDU(hdul[0].data, header=hdul[0].header),
                      fits.ImageHDU(trimmed, name=BPM_EXTNAME)]).writeto(tmp_path / "short_bpm.fits")
    exposure, _ = ingest_file(tmp_path / "short_bpm.fits")
    with pytest.raises(StepError) as info:
        Pipeline(steps=[Preprocessor(params=PreprocessingParams())]).run(exposure, "0")
    assert info.value.process == "preprocessing" and isinstance(info.value.cause, BadInputError)
    assert info.match(r"short_bpm\.fits: bad-pixel mask HDU 1 \(BPM\) has shape \(256, 256\), "
                      r"expected the raw frame shape \(256, 288\) of section 0")


# -- compute, without files ----------------------------------------------------------------------

def _two_amplifiers() -> tuple[np.ndarray, SectionInfo]:
    """A 16 x 48 raw frame: overscan A (columns 0-3), data A (4-23), data B (24-43), overscan B."""
    rng = np.random.default_rng(3)
    raw = np.empty((16, 48))
    raw[:, :24] = 1000.0 + rng.normal(0, 2, (16, 24))
    raw[:, 24:] = 1200.0 + rng.normal(0, 2, (16, 24))
    raw[:, 4:44] += 300.0
    amps = (AmplifierInfo("A", "[5:24,1:16]", "[1:4,1:16]", 2.0, 5.0, 60000.0),
            AmplifierInfo("B", "[25:44,1:16]", "[45:48,1:16]", 2.0, 5.0, 60000.0))
    return raw, SectionInfo("0", 2.0, 5.0, 60000.0, 0.26, amplifiers=amps)


def test_compute_takes_the_mask_in_raw_geometry_and_trims_it_per_amplifier():
    raw, info = _two_amplifiers()
    mask = np.zeros(raw.shape, dtype=np.uint8)
    mask[3, 10] = 1    # amplifier A -> trimmed (3, 6)
    mask[7, 30] = 1    # amplifier B -> trimmed (7, 26)
    mask[5, 1] = 1     # overscan: not in the image, and the overscan level ignores masks
    result = Preprocessor(params=PreprocessingParams()).compute(raw, info, bad_pixel_mask=mask)
    assert result.image.shape == (16, 40)
    assert set(zip(*np.nonzero(has_flag(result.flags, "BAD")))) == {(3, 6), (7, 26)}
    assert set(zip(*np.nonzero(result.weight == 0))) == {(3, 6), (7, 26)}
    assert np.median(result.image) == pytest.approx(300.0, abs=2.0)


def test_compute_rejects_a_mask_of_the_wrong_shape():
    raw, info = _two_amplifiers()
    step = Preprocessor(params=PreprocessingParams())
    with pytest.raises(ValueError, match=r"bad_pixel_mask must have the raw frame shape \(16, 48\) "
                                         r"of section 0, got \(16, 40\)"):
        step.compute(raw, info, bad_pixel_mask=np.zeros((16, 40), bool))


def test_calibration_files_enter_the_provenance_by_content_and_are_applied(database, sim, tmp_path):
    """A bias and a flat named by templates: the provenance depends on their content, not on
    where they are, and the image is corrected by them."""
    path = write_simulated_file(sim, tmp_path / "raw.fits", raw=True)
    exposure, _ = ingest_file(path)
    folder = tmp_path / "cal"
    folder.mkdir()
    bias = np.full((256, 256), 7.0, np.float32)
    flat = np.ones((256, 256), np.float32)
    flat[:, 192:] = 1.2          # the median stays 1
    fits.PrimaryHDU(bias).writeto(folder / "bias_Synthetic_0.fits")
    fits.PrimaryHDU(flat).writeto(folder / "flat_0_r.fits")
    templates = {"bias_file": str(folder / "bias_{instrument}_{section}.fits"),
                 "flat_file": str(folder / "flat_{section}_{filter}.fits")}
    step = Preprocessor(**templates)
    plain = Pipeline(steps=[Preprocessor()]).run(exposure, "0").get_image()
    corrected = Pipeline(steps=[step]).run(exposure, "0").get_image()
    left, right = np.s_[100:150, 20:100], np.s_[100:150, 200:250]
    assert np.median(corrected.data[left]) == pytest.approx(np.median(plain.data[left] - 7.0), rel=0.005)
    assert np.median(corrected.data[right]) == pytest.approx(np.median(plain.data[right] - 7.0) / 1.2, rel=0.005)

    original = step.make_provenance([]).id
    moved = tmp_path / "moved"
    folder.rename(moved)
    same = Preprocessor(bias_file=str(moved / "bias_{instrument}_{section}.fits"),
                        flat_file=str(moved / "flat_{section}_{filter}.fits"))
    assert same.make_provenance([]).id == original
    fits.PrimaryHDU(bias + 1.0).writeto(moved / "bias_Synthetic_0.fits", overwrite=True)
    assert same.make_provenance([]).id != original
    with pytest.raises(ConfigError, match=r"names no file"):
        Preprocessor(bias_file=str(tmp_path / "none_{section}.fits")).make_provenance([])
    with pytest.raises(ConfigError, match=r"unknown field 'ccd'"):
        Preprocessor(bias_file=str(tmp_path / "bias_{ccd}.fits")).make_provenance([])
