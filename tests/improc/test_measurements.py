"""Tests of improc.measurements on difference-like images: a PSF point source of known flux on
Gaussian noise of known variance, a dipole (a star minus itself shifted by 0.5 pixel), a
cosmic-ray-like spike and a galaxy-like blob."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.table import Table
from scipy import ndimage

from improc.flags import PixelFlag
from improc.measurements import COLUMNS, apply_cuts, measure_detections, static_mismatch_flux
from improc.psf import PixelPSF

SIGMA = 10.0          # noise per pixel, ADU
FWHM = 3.6            # pixels


def moffat_psf(shape: tuple[int, int], fwhm: float = FWHM, beta: float = 3.0, size: int = 41) -> PixelPSF:
    """A constant, pixel-integrated Moffat PSF (5 x 5 sub-pixel samples) as a degree-0 PixelPSF."""
    o = 5
    g = (np.arange(size * o) - (size * o - 1) / 2) / o
    r2 = g[None, :] ** 2 + g[:, None] ** 2
    alpha = fwhm / (2 * np.sqrt(2 ** (1 / beta) - 1))
    stamp = ((1 + r2 / alpha**2) ** -beta).reshape(size, o, size, o).sum(axis=(1, 3))
    ny, nx = shape
    return PixelPSF(basis=(stamp / stamp.sum())[None], degree=0, x0=nx / 2, y0=ny / 2,
                    xscale=nx / 2, yscale=ny / 2, image_shape=shape)


def add_source(image: np.ndarray, psf: PixelPSF, x: float, y: float, flux: float) -> None:
    clip = psf.get_clip(x, y, flux)
    h = clip.shape[0] // 2
    ix, iy = int(np.floor(x + 0.5)), int(np.floor(y + 0.5))
    image[iy - h:iy + h + 1, ix - h:ix + h + 1] += clip


def flux_at_snr(psf: PixelPSF, snr: float) -> float:
    """Flux whose optimal PSF-fit S/N on noise SIGMA is ``snr``."""
    p = psf.get_clip(psf.x0, psf.y0)
    return snr * SIGMA / np.sqrt((p**2).sum())


@pytest.fixture(scope="module")
def grid():
    """A 640 x 640 image model of 225 identical S/N = 50 point sources on a grid."""
    shape = (640, 640)
    psf = moffat_psf(shape)
    rng = np.random.default_rng(11)
    gx, gy = np.meshgrid(np.arange(40, 620, 40), np.arange(40, 620, 40))
    x = gx.ravel() + rng.uniform(-0.5, 0.5, gx.size)
    y = gy.ravel() + rng.uniform(-0.5, 0.5, gx.size)
    flux = flux_at_snr(psf, 50.0)
    model = np.zeros(shape)
    for a, b in zip(x, y):
        add_source(model, psf, a, b, flux)
    return psf, model, x, y, flux


@pytest.fixture(scope="module")
def zoo():
    """One image with a point source, a dipole, a spike, a blob and a negative point source."""
    shape = (200, 900)
    psf = moffat_psf(shape)
    f50 = flux_at_snr(psf, 50.0)
    image = np.zeros(shape)
    add_source(image, psf, 100.2, 100.1, f50)                                    # point
    add_source(image, psf, 250.3, 100.0, 10 * f50)                               # dipole:
    add_source(image, psf, 250.8, 100.0, -10 * f50)                              # star - shifted star
    image[100, 400] += 0.3 * f50                                                 # spike
    blob = np.zeros(shape)
    add_source(blob, psf, 550.0, 100.0, 2 * f50)
    image += ndimage.gaussian_filter(blob, 2.5)                                  # blob
    add_source(image, psf, 700.0, 100.0, -f50)                                   # negative point
    positions = {"point": (100.2, 100.1), "dipole": (250.5, 100.0), "spike": (400.0, 100.0),
                 "blob": (550.0, 100.0), "negative": (700.0, 100.0)}
    return psf, image, positions, f50


def _measure_zoo(zoo, seed: int) -> dict:
    psf, image, positions, _ = zoo
    noisy = image + np.random.default_rng(seed).normal(0, SIGMA, image.shape)
    x, y = np.array(list(positions.values())).T
    table = measure_detections(noisy, x, y, psf, weight=np.full(image.shape, SIGMA**-2))
    return {name: table[k] for k, name in enumerate(positions)}


def test_point_source_flux_unbiased_with_right_errors(grid):
    psf, model, x, y, flux = grid
    rng = np.random.default_rng(5)
    weight = np.full(model.shape, SIGMA**-2)
    rel, pulls = [], []
    for _ in range(8):                        # 8 x 225 noise realizations of S/N = 50
        table = measure_detections(model + rng.normal(0, SIGMA, model.shape), x, y, psf, weight=weight)
        rel.append(table["flux_psf"] / flux - 1)
        pulls.append((table["flux_psf"] - flux) / table["flux_psf_err"])
    rel, pulls = np.concatenate(rel), np.concatenate(pulls)
    assert abs(np.mean(rel)) < 0.005               # measured +0.1 %
    assert 0.9 < np.std(pulls) < 1.1               # measured 1.00
    assert np.all(np.abs(table["x_psf"] - x) < 0.3) and np.all(np.abs(table["y_psf"] - y) < 0.3)
    assert np.allclose(table["snr_psf"], 50.0, atol=5.0)


def test_bright_point_source_within_two_percent():
    shape = (101, 101)
    psf = moffat_psf(shape)
    image = np.zeros(shape)
    flux = flux_at_snr(psf, 200.0)
    add_source(image, psf, 50.3, 49.8, flux)
    noisy = image + np.random.default_rng(2).normal(0, SIGMA, shape)
    row = measure_detections(noisy, [50.0], [50.0], psf, weight=np.full(shape, SIGMA**-2))[0]
    assert abs(row["flux_psf"] / flux - 1) < 0.02
    assert abs(row["x_psf"] - 50.3) < 0.05 and abs(row["y_psf"] - 49.8) < 0.05
    assert 0.8 < row["chi2_psf"] < 1.2


def test_dipole_indicator_separates_dipole_from_point_source(zoo):
    for seed in range(3):
        m = _measure_zoo(zoo, seed)
        assert m["dipole"]["dipole_ratio"] > 0.6          # measured ~0.97
        assert m["point"]["dipole_ratio"] < 0.1           # measured ~0.02
        assert m["negative"]["dipole_ratio"] < 0.1        # mirrored
        assert m["dipole"]["chi2_psf"] > 10 * m["point"]["chi2_psf"]


def test_faint_point_sources_are_not_dipoles_or_lopsided(grid):
    """At S/N 7 noise alone used to make a point source's pixel-by-pixel 'negative lobe' half
    its light and move its peak pixel by 1-3 pixels; the significance-based measures do not."""
    psf, model, x, y, flux = grid
    rng = np.random.default_rng(9)
    weight = np.full(model.shape, SIGMA**-2)
    tables = [measure_detections(model * 7.0 / 50.0 + rng.normal(0, SIGMA, model.shape), x, y, psf, weight=weight)
              for _ in range(4)]                                   # 4 x 225 sources of S/N 7
    dipole = np.concatenate([t["dipole_ratio"] for t in tables])
    offset = np.concatenate([t["centroid_offset_sigma"] for t in tables])
    assert np.mean(dipole > 0.4) < 0.05                            # measured 2 % (the old measure: ~50 %)
    assert np.mean(offset > 5.0) < 0.01                            # measured 0 % (99th percentile 2.8)
    assert 0.35 < np.median(offset) < 0.7                          # measured 0.5 (see COLUMNS)


def test_lopsided_blend_has_a_significant_centroid_offset():
    """A S/N 50 source with an equal companion 4 pixels away (FWHM 3.6): the PSF fit stays near
    one of them (max_shift), the windowed centroid moves between them."""
    shape = (101, 101)
    psf = moffat_psf(shape)
    f50 = flux_at_snr(psf, 50.0)
    weight = np.full(shape, SIGMA**-2)
    for seed in range(3):
        single = np.zeros(shape)
        add_source(single, psf, 50.0, 50.0, f50)
        blend = single.copy()
        add_source(blend, psf, 54.0, 50.0, f50)
        noise = np.random.default_rng(seed).normal(0, SIGMA, shape)
        alone = measure_detections(single + noise, [50.0], [50.0], psf, weight=weight)
        lopsided = measure_detections(blend + noise, [50.0], [50.0], psf, weight=weight)
        assert alone["centroid_offset_sigma"][0] < 2.0                  # measured 0.2-0.9
        assert lopsided["centroid_offset_sigma"][0] > 10.0              # measured ~26


def test_bad_fraction_counts_the_core():
    shape = (101, 101)
    psf = moffat_psf(shape)
    image = np.zeros(shape)
    add_source(image, psf, 50.0, 50.0, 20000.0)
    flags = np.zeros(shape, np.uint16)
    flags[:, 50:] = PixelFlag.BAD                         # the right half of the image
    table = measure_detections(image + np.random.default_rng(3).normal(0, SIGMA, shape), [50.0, 20.0],
                               [50.0, 50.0], psf, weight=np.full(shape, SIGMA**-2), flags=flags)
    core = np.hypot(*np.meshgrid(np.arange(-4, 5), np.arange(-4, 5))) <= table.meta["psf_fwhm"]
    expected = np.mean(np.meshgrid(np.arange(-4, 5), np.arange(-4, 5))[0][core] >= 0)
    assert abs(table["bad_fraction"][0] - expected) < 0.05      # about half
    assert table["bad_fraction"][1] == 0.0


def test_width_ratio_separates_spike_and_blob_from_point_source(zoo):
    for seed in range(3):
        m = _measure_zoo(zoo, seed)
        assert 0.9 < m["point"]["width_ratio"] < 1.1       # over 40 seeds: 1.00 +- 0.011
        assert m["spike"]["width_ratio"] < 0.5             # 0.12 on average, at most 0.32
        assert m["blob"]["width_ratio"] > 1.2              # 1.29 on average, at least 1.27
        assert m["point"]["elongation"] < 1.3
        assert m["point"]["centroid_offset"] < 1.0
        assert m["blob"]["negative_fraction"] < m["point"]["negative_fraction"] < 0.4


def test_negative_detection_is_measured_as_a_mirror(zoo):
    m = _measure_zoo(zoo, 7)
    _, _, _, f50 = zoo
    assert m["negative"]["sign"] == -1 and m["point"]["sign"] == 1
    assert abs(m["negative"]["flux_psf"] / -f50 - 1) < 0.06
    assert 0.9 < m["negative"]["width_ratio"] < 1.1
    assert m["negative"]["negative_fraction"] < 0.4
    assert m["negative"]["apflux_1"] < 0


def test_callable_psf_gives_the_same_measurements(zoo):
    psf, image, positions, _ = zoo
    x, y = np.array(list(positions.values())).T
    weight = np.full(image.shape, SIGMA**-2)
    by_object = measure_detections(image, x, y, psf, weight=weight)
    by_callable = measure_detections(image, x, y, psf.image_at, weight=weight)
    for name in by_object.colnames:
        np.testing.assert_allclose(by_callable[name], by_object[name], rtol=1e-6, atol=1e-9)


def test_noiseless_point_source_exact_and_apertures():
    shape = (101, 101)
    psf = moffat_psf(shape)
    image = np.zeros(shape)
    add_source(image, psf, 50.4, 50.2, 1000.0)
    table = measure_detections(image, [50.0], [50.0], psf, weight=np.ones(shape), aperture_radii=(2.0, 18.0))
    assert table["flux_psf"][0] == pytest.approx(1000.0, rel=1e-6)
    assert table["x_psf"][0] == pytest.approx(50.4, abs=1e-3) and table["y_psf"][0] == pytest.approx(50.2, abs=1e-3)
    assert table["width_ratio"][0] == pytest.approx(1.0, abs=1e-6)
    assert table["apflux_0"][0] < 0.6 * table["apflux_1"][0]
    assert table["apflux_1"][0] == pytest.approx(1000.0, rel=0.01)   # ~99.6 % of a beta = 3 Moffat
    assert table["dipole_ratio"][0] == 0 and table["negative_fraction"][0] == 0
    assert table.meta["aperture_radii"] == [2.0, 18.0]
    assert table.meta["fit_radius"] == pytest.approx(2 * psf.fwhm_pixels)


def test_bad_pixels_counted_and_not_used():
    shape = (101, 101)
    psf = moffat_psf(shape)
    image = np.zeros(shape)
    add_source(image, psf, 50.0, 50.0, 1000.0)
    flags = np.zeros(shape, np.uint16)
    flags[51, 48:51] = PixelFlag.BAD
    image[51, 48:51] = 1e5                                   # hot, flagged
    weight = np.ones(shape)
    weight[47, 50] = 0.0                                     # no data
    table = measure_detections(image, [50.0, 1.0], [50.0, 1.0], psf, weight=weight, flags=flags)
    assert table["n_bad_pixels"][0] == 4
    assert table["flux_psf"][0] == pytest.approx(1000.0, rel=1e-6)
    radius = table.meta["fit_radius"]
    assert table["n_bad_pixels"][1] > 0.6 * np.pi * radius**2     # three quarters off the image
    ignored = measure_detections(image, [50.0], [50.0], psf, weight=weight, flags=flags, mask_flags=0)
    assert ignored["n_bad_pixels"][0] == 1 and ignored["flux_psf"][0] > 1100.0


def test_position_refined_only_within_max_shift():
    shape = (101, 101)
    psf = moffat_psf(shape)
    image = np.zeros(shape)
    add_source(image, psf, 50.3, 50.0, 1000.0)
    weight = np.ones(shape)
    near = measure_detections(image, [51.0], [50.6], psf, weight=weight)
    assert near["x_psf"][0] == pytest.approx(50.3, abs=1e-3) and near["y_psf"][0] == pytest.approx(50.0, abs=1e-3)
    far = measure_detections(image, [52.0], [50.0], psf, weight=weight, max_shift=1.0)
    assert far["x_psf"][0] == 52.0                         # a move of 1.7 pixels is refused
    fixed = measure_detections(image, [51.0], [50.0], psf, weight=weight, max_shift=0.0)
    assert fixed["x_psf"][0] == 51.0 and fixed["flux_psf"][0] < 1000.0


def test_columns_have_units_and_descriptions(zoo):
    psf, image, positions, _ = zoo
    table = measure_detections(image, [100.0], [100.0], psf, weight=np.ones(image.shape), aperture_radii=(4.0,))
    assert set(COLUMNS) | {"apflux_0", "apfluxerr_0"} == set(table.colnames)
    assert table["flux_psf"].unit == "adu" and table["x_psf"].unit == "pix" and table["apflux_0"].unit == "adu"
    assert all(table[name].description for name in table.colnames)
    assert table["sign"].dtype == np.int8 and table["n_bad_pixels"].dtype == np.int32
    empty = measure_detections(image, [], [], psf, weight=np.ones(image.shape))
    assert len(empty) == 0 and "dipole_ratio" in empty.colnames


def test_measure_detections_rejects_bad_arguments(zoo):
    psf, image, _, _ = zoo
    weight = np.ones(image.shape)
    with pytest.raises(ValueError, match="data must be a 2-d"):
        measure_detections(image[0], [1.0], [1.0], psf, weight=weight[0])
    with pytest.raises(ValueError, match="weight must have the shape of data"):
        measure_detections(image, [1.0], [1.0], psf, weight=weight[:5])
    with pytest.raises(ValueError, match="flags must have the shape of data"):
        measure_detections(image, [1.0], [1.0], psf, weight=weight, flags=np.zeros(3, np.uint16))
    with pytest.raises(ValueError, match="x and y must be finite 1-d arrays"):
        measure_detections(image, [1.0, np.nan], [1.0, 2.0], psf, weight=weight)
    with pytest.raises(ValueError, match="aperture_radii must all be > 0"):
        measure_detections(image, [1.0], [1.0], psf, weight=weight, aperture_radii=(3.0, 0.0))
    with pytest.raises(ValueError, match="fit_radius must be > 0"):
        measure_detections(image, [1.0], [1.0], psf, weight=weight, fit_radius=-1.0)
    with pytest.raises(ValueError, match="max_shift must be >= 0"):
        measure_detections(image, [1.0], [1.0], psf, weight=weight, max_shift=-0.5)


def test_apply_cuts_says_which_cuts_failed():
    table = Table({"snr_psf": [10.0, 3.0, 50.0, np.nan], "dipole_ratio": [0.1, 0.05, 0.9, 0.0],
                   "width_ratio": [1.0, 0.2, 1.1, 1.0]})
    result = apply_cuts(table, {"snr_psf": (5.0, None), "dipole_ratio": (None, 0.5),
                                "width_ratio": (0.5, 2.0)})
    assert result.names == ("snr_psf", "dipole_ratio", "width_ratio")
    np.testing.assert_array_equal(result.is_bad, [False, True, True, True])
    assert result.reasons(0) == []
    assert result.reasons(1) == ["snr_psf", "width_ratio"]
    assert result.reasons(2) == ["dipole_ratio"]
    assert result.reasons(3) == ["snr_psf"]                      # NaN fails its cut
    np.testing.assert_array_equal(result.failed_bits, [0, 5, 2, 1])
    structured = np.array([(1.0,), (3.0,)], dtype=[("snr_psf", float)])
    np.testing.assert_array_equal(apply_cuts(structured, {"snr_psf": (2.0, 2.5)}).is_bad, [True, True])
    assert not apply_cuts(table, {}).is_bad.any()


def test_apply_cuts_rejects_bad_cuts():
    table = Table({"snr_psf": [10.0]})
    with pytest.raises(ValueError, match="no column 'snr' to cut on; columns: snr_psf"):
        apply_cuts(table, {"snr": (1.0, None)})
    with pytest.raises(ValueError, match="cut 'snr_psf' must have min <= max"):
        apply_cuts(table, {"snr_psf": (5.0, 1.0)})
    with pytest.raises(ValueError, match=r"cut 'snr_psf' must be \(min, max\)"):
        apply_cuts(table, {"snr_psf": (5.0,)})
    with pytest.raises(ValueError, match="at most 64 cuts"):
        apply_cuts(table, {f"c{k}": (None, None) for k in range(65)})


def test_callable_psf_must_give_odd_square_stamps(zoo):
    _, image, _, _ = zoo
    weight = np.ones(image.shape)
    with pytest.raises(ValueError, match="psf must give square stamps of one odd side"):
        measure_detections(image, [100.0], [100.0], lambda a, b: np.ones((6, 6)), weight=weight)
    with pytest.raises(ValueError, match="psf gave a stamp that does not sum to a finite value > 0"):
        measure_detections(image, [100.0], [100.0], lambda a, b: np.zeros((5, 5)), weight=weight)


def test_static_mismatch_flux_counts_stars_fully_and_smooth_light_little():
    """A reference stamp of a star of P's shape gives its flux (exact to noise); a star seen
    through a PSF 1.4 times broader (2 / (1 + 1.4^2))^2 = 0.46 of it for Gaussians, the Moffats
    here a little more; a Gaussian blob three times the PSF's width a few percent; a flat sky
    and an empty stamp about 0; bad pixels are left out."""
    shape = (200, 200)
    psf, broad = moffat_psf(shape), moffat_psf(shape, fwhm=1.4 * FWHM)
    rng = np.random.default_rng(3)
    flux, side = 5.0e4, 31
    stamps = np.zeros((5, side, side))
    for k, model in enumerate((psf, broad)):
        image = np.zeros(shape)
        add_source(image, model, 100.3, 99.8, flux)
        stamps[k] = image[100 - side // 2:100 + side // 2 + 1, 100 - side // 2:100 + side // 2 + 1]
    yy, xx = np.mgrid[:side, :side] - side // 2
    sigma_blob = 3.0 * FWHM / 2.3548
    stamps[2] = flux * np.exp(-0.5 * ((xx - 0.3) ** 2 + (yy + 0.2) ** 2) / sigma_blob**2) / (2 * np.pi * sigma_blob**2)
    stamps[3] = 200.0                                                 # a flat sky offset
    stamps += rng.normal(0.0, SIGMA, stamps.shape)
    weight = np.full(stamps.shape, SIGMA**-2)
    flags = np.zeros(stamps.shape, np.uint16)
    flags[0, side // 2, side // 2 + 1] = int(PixelFlag.SATURATED)     # a bad pixel is not used
    stamps[0, side // 2, side // 2 + 1] = 1e9
    x = np.full(5, 100.3)
    y = np.full(5, 99.8)
    got = static_mismatch_flux(stamps, weight, flags, psf, x, y)
    clip = psf.get_clip(100.0, 100.0)
    laplacian = ndimage.laplace(clip, mode="constant")
    noise = SIGMA * np.sqrt((laplacian**2).sum()) / abs((laplacian * clip).sum())
    assert got[0] == pytest.approx(flux, abs=4 * noise + 0.01 * flux)
    assert 0.4 * flux < got[1] < 0.6 * flux
    assert 0.0 < got[2] < 0.1 * flux
    assert abs(got[3]) < 4 * noise and abs(got[4]) < 4 * noise
    flags[4] = 1                                                      # nothing usable: NaN
    assert np.isnan(static_mismatch_flux(stamps, weight, flags, psf, x, y)[4])
    with pytest.raises(ValueError, match="one position per stamp"):
        static_mismatch_flux(stamps, weight, flags, psf, x[:2], y[:2])