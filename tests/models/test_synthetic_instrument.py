"""Files written by `write_simulated_file`: the raw frame, its bad-pixel mask, the reduced product."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits

from improc.sim_detector import FLAG_BAD_COLUMN
from improc.simulator import SimulatedImage, SimulationParams, simulate_image
from models.exposure import Exposure
from models.instruments.synthetic import BPM_EXTNAME, Synthetic, write_simulated_file


@pytest.fixture(scope="module")
def sim() -> SimulatedImage:
    """A 96 x 128 (ny, nx) frame with 3 bad columns and 40 cosmic rays, few stars."""
    return simulate_image(SimulationParams(nx=128, ny=96, seed=4, n_bad_columns=3, n_cosmic_rays=40,
                                           star_density=5000.0, n_galaxies=5))


def test_raw_file_carries_the_bad_columns_in_a_raw_geometry_mask(sim, tmp_path):
    path = write_simulated_file(sim, tmp_path / "raw.fits", raw=True, bias_level=500.0,
                                overscan_width=16)
    with fits.open(path) as hdul:
        assert [hdu.name for hdu in hdul] == ["PRIMARY", BPM_EXTNAME]
        raw, bpm = hdul[0].data, hdul[BPM_EXTNAME].data
        assert raw.shape == bpm.shape == (96, 128 + 16) and bpm.dtype == np.uint8
        bad = (sim.flags & FLAG_BAD_COLUMN) != 0
        other = (sim.flags != 0) & ~bad  # cosmic rays, saturation: not static defects
        assert bad.any() and other.any()
        np.testing.assert_array_equal(bpm[:, :128], bad.astype(np.uint8))
        assert not bpm[:, :128][other].any()
        assert not bpm[:, 128:].any()  # overscan
        # the mask plane is the instrument's flags plane of the file, and its bit 1 means BAD
        inst = Synthetic()
        assert inst.plane_hdu(hdul, "flags") == 1
        assert np.array_equal(inst.flags_from_mask(bpm) != 0, bpm != 0)
    exposure = Exposure.from_file(path)
    assert exposure.is_raw and exposure.section_ids == ["0"]
    data, _ = exposure.read_section("0")
    assert data.shape == (96, 144)


def test_reduced_file_has_weight_and_flags_but_no_bad_pixel_mask(sim, tmp_path):
    path = write_simulated_file(sim, tmp_path / "reduced.fits", raw=False)
    with fits.open(path) as hdul:
        assert [hdu.name for hdu in hdul] == ["PRIMARY", "WEIGHT", "FLAGS"]
        np.testing.assert_array_equal(hdul["FLAGS"].data, sim.flags)
        assert Synthetic().plane_hdu(hdul, "flags") == 2
