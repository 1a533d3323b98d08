"""Tests of improc.background: sep mesh background stored compactly, checked against SExtractor."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import sep
from astropy.io import fits

from improc.background import BackgroundMesh, estimate_background, spline_basis


def _read_fits(path) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the sep test image has non-standard ESO-LOG cards
        return fits.getdata(path)


def _sextractor_config(path) -> dict[str, str]:
    config = {}
    for line in path.read_text().splitlines():
        words = line.split("#")[0].split()
        if len(words) >= 2:
            config[words[0]] = words[1]
    return config


def _sky_image(shape, *, seed=1, noise=5.0, n_stars=40) -> np.ndarray:
    """A smooth, non-separable sky plus Gaussian noise and some bright point sources."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    sky = 100 + 0.05 * xx + 0.03 * yy + 20 * np.sin(xx / 40.0) * np.cos(yy / 37.0)
    image = sky + rng.normal(0, noise, shape)
    for x, y in zip(rng.uniform(0, shape[1], n_stars), rng.uniform(0, shape[0], n_stars)):
        image += 2000 * np.exp(-0.5 * ((xx - x) ** 2 + (yy - y) ** 2) / 1.5**2)
    return image.astype(np.float32)


@pytest.mark.real_data
def test_matches_sextractor_maps(shared_data):
    """Full maps within 1% of SExtractor's BACKGROUND / BACKGROUND_RMS check images."""
    folder = shared_data / "sep"
    config = _sextractor_config(folder / "default.sex")
    image = _read_fits(folder / "image.fits")
    mesh = estimate_background(image, box_size=int(config["BACK_SIZE"]),
                               filter_size=int(config["BACK_FILTERSIZE"]))
    back = _read_fits(folder / "back.fits").astype(np.float64)
    rms = _read_fits(folder / "rms.fits").astype(np.float64)
    assert mesh.level.shape == (4, 4)
    assert np.max(np.abs(mesh.counts() / back - 1)) < 0.01
    assert np.max(np.abs(mesh.rms_map() / rms - 1)) < 0.01
    assert np.max(np.abs(mesh.variance() / rms**2 - 1)) < 0.02
    # In fact sep reproduces SExtractor, and the rebuilt maps to float32 precision.
    assert np.max(np.abs(mesh.counts() - back)) < 1e-3 * np.median(rms)
    assert mesh.median_level == pytest.approx(np.median(back), rel=1e-3)
    assert mesh.median_rms == pytest.approx(np.median(rms), rel=0.05)


@pytest.mark.parametrize(("shape", "box", "filt"), [((300, 517), 64, 3), ((97, 333), 33, 5),
                                                    ((200, 130), 50, 1), ((100, 300), 64, 3),
                                                    ((64, 64), 64, 3)])
def test_rebuilt_maps_equal_sep(shape, box, filt):
    """Mesh -> full map reproduces sep's back()/rms(), also for partial boxes and tiny meshes."""
    image = _sky_image(shape)
    mesh = estimate_background(image, box_size=box, filter_size=filt)
    ref = sep.Background(image, bw=box, bh=box, fw=filt, fh=filt)
    assert mesh.level.shape == (-(-shape[0] // box), -(-shape[1] // box))
    assert mesh.counts().dtype == np.float32 and mesh.counts().shape == shape
    np.testing.assert_allclose(mesh.counts(), ref.back(), rtol=2e-6, atol=0)
    np.testing.assert_allclose(mesh.rms_map(), ref.rms(), rtol=2e-6, atol=1e-5)
    assert mesh.median_level == pytest.approx(ref.globalback, rel=1e-6)
    assert mesh.median_rms == pytest.approx(ref.globalrms, rel=1e-5)


def test_mesh_roundtrip_from_stored_arrays():
    """A mesh rebuilt from its stored arrays gives the same maps (what a file reader does)."""
    mesh = estimate_background(_sky_image((256, 320)), box_size=64)
    copy = BackgroundMesh(level=mesh.level.tolist(), rms=mesh.rms.tolist(), box_size=64,
                          filter_size=3, shape=(256, 320))
    np.testing.assert_array_equal(copy.counts(), mesh.counts())
    np.testing.assert_array_equal(copy.variance(), mesh.variance())


def test_flat_sky_level_and_noise():
    rng = np.random.default_rng(7)
    image = rng.normal(1000.0, 12.0, (512, 512))
    mesh = estimate_background(image, box_size=64)
    assert mesh.median_level == pytest.approx(1000.0, abs=0.5)
    assert mesh.median_rms == pytest.approx(12.0, rel=0.03)
    assert np.all(np.abs(mesh.counts() - 1000.0) < 2.0)


def test_spline_basis_is_interpolating_and_reproduces_linear_sky():
    """Along y the map passes through the nodes at y = (j + 0.5) * box; a plane stays a plane."""
    basis = spline_basis(256, 4, 64, pixel_offset=0.0)
    np.testing.assert_allclose(basis[[32, 96, 160, 224]], np.eye(4), atol=1e-12)
    nodes = 3.0 + 2.0 * np.arange(6)
    line = spline_basis(384, 6, 64, pixel_offset=0.5) @ nodes
    x = np.arange(384)
    np.testing.assert_allclose(line, 3.0 + 2.0 * ((x + 0.5) / 64 - 0.5), atol=1e-9)


def test_nan_pixels_are_treated_as_masked():
    image = _sky_image((256, 256), seed=3)
    bad = np.zeros(image.shape, bool)
    bad[40:90, 100:180] = True
    with_nan = image.copy()
    with_nan[bad] = np.nan
    from_nan = estimate_background(with_nan, box_size=32)
    from_mask = estimate_background(image, mask=bad, box_size=32)
    assert np.all(np.isfinite(from_nan.counts()))
    np.testing.assert_allclose(from_nan.counts(), from_mask.counts(), rtol=1e-6)


def test_mask_removes_a_bright_region():
    rng = np.random.default_rng(11)
    image = rng.normal(50.0, 3.0, (256, 256))
    image[:128, :128] += 500.0  # a big bright object covering whole mesh boxes
    mask = np.zeros(image.shape, bool)
    mask[:128, :128] = True
    unmasked = estimate_background(image, box_size=32)
    masked = estimate_background(image, mask=mask, box_size=32)
    assert unmasked.counts()[10, 10] > 400
    assert masked.counts()[10, 10] == pytest.approx(50.0, abs=0.5)


def test_big_endian_and_integer_input():
    image = _sky_image((128, 192))
    native = estimate_background(image, box_size=32)
    swapped = estimate_background(image.astype(">f4"), box_size=32)
    np.testing.assert_array_equal(native.level, swapped.level)
    rounded = np.round(image)
    as_int = estimate_background(rounded.astype(">i4"), box_size=32)
    as_float = estimate_background(rounded.astype(np.float32), box_size=32)
    np.testing.assert_array_equal(as_int.level, as_float.level)


@pytest.mark.parametrize(("data", "kwargs", "match"), [
    (np.full((64, 64), np.nan), {}, "no valid pixel"),
    (np.zeros((0, 10)), {}, "empty"),
    (np.zeros(100), {}, "2-D"),
    (np.ones((100, 100)), {"box_size": 128}, "box_size 128 is larger than the image"),
    (np.ones((100, 100)), {"box_size": 0}, "box_size must be >= 1"),
    (np.ones((100, 100)), {"filter_size": 0}, "filter_size must be >= 1"),
    (np.ones((100, 100)), {"mask": np.zeros((10, 10), bool)}, "mask shape"),
    (np.ones((100, 100)), {"mask": np.ones((100, 100), bool)}, "no valid pixel"),
    (np.array([["a"] * 4] * 4), {}, "real numeric"),
])
def test_bad_input(data, kwargs, match):
    kwargs.setdefault("box_size", 32)
    with pytest.raises(ValueError, match=match):
        estimate_background(data, **kwargs)


def test_bad_mesh_arrays():
    with pytest.raises(ValueError, match=r"level must have mesh shape \(2, 3\)"):
        BackgroundMesh(level=np.zeros((2, 2)), rms=np.ones((2, 3)), box_size=64, filter_size=3,
                       shape=(100, 150))
    with pytest.raises(ValueError, match="rms must be finite"):
        BackgroundMesh(level=np.zeros((2, 3)), rms=np.full((2, 3), np.nan), box_size=64,
                       filter_size=3, shape=(100, 150))


def _sorted_boxes(rng, seed: int, *, max_rows: int, max_width: int, outliers: bool):
    """Rows of float32 box values sorted with NaN tails, and each row's count of values: ties
    (rounded values every third seed), large offsets, empty rows (the first, every fifth seed),
    and with ``outliers`` a tenth of the values 30 times off."""
    rows, width = int(rng.integers(1, max_rows)), int(rng.integers(1, max_width))
    boxes = rng.normal(0, rng.choice([1e-3, 1.0, 1e4]), (rows, width)) + rng.choice([0.0, 1e5])
    if outliers:
        boxes[rng.random((rows, width)) < 0.1] *= 30.0
    boxes = boxes.astype(np.float32)
    if seed % 3 == 0:
        boxes = np.round(boxes)
    n = rng.integers(0, width + 1, rows)
    n[0] = 0 if seed % 5 == 0 else n[0]
    for i in range(rows):
        boxes[i, n[i]:] = np.nan
    boxes.sort(axis=1)
    return boxes, n


@pytest.mark.parametrize("seed", range(40))
def test_sorted_median_deviation_equals_sorting_the_deviations(seed):
    # the binary search on two sorted runs must give the very value of the sort it replaces:
    # ties (rounded values), large offsets (float32 rounding), NaN tails and empty rows
    from improc.background import _sorted_median, _sorted_median_deviation

    rng = np.random.default_rng(seed)
    boxes, n = _sorted_boxes(rng, seed, max_rows=8, max_width=40, outliers=False)
    centre = _sorted_median(boxes, n).astype(np.float32)
    deviation = np.abs(boxes - centre[:, None])
    deviation.sort(axis=1)
    expected = _sorted_median(deviation, n)
    assert np.array_equal(_sorted_median_deviation(boxes, n, centre), expected, equal_nan=True)


@pytest.mark.parametrize("f", [1, 2, 3])
def test_block_means_equal_the_reshaped_mean(f):
    # the structure mask's binning must give numpy's float32 means exactly (same sums, same order)
    from improc.background import _block_means

    rng = np.random.default_rng(f)
    image = (rng.standard_cauchy((12 * f, 6 * f)) * 1e4 + 3e4).astype(np.float32)
    expected = image.reshape(12, f, 6, f).mean(axis=(1, 3))
    got = _block_means(image, f)
    assert got.dtype == np.float32 and np.array_equal(got, expected)


def _clip_one_row(run, centre, spread, clip_sigma, n_iter):
    """The clip of one sorted run as it was done box by box (the reference of the row-wise one)."""
    count = run.size
    if not (np.isfinite(centre) and np.isfinite(spread)):
        return np.nan, np.nan, 0
    origin = centre
    shifted = run.astype(np.float64) - origin
    sums = np.concatenate(([0.0], np.cumsum(shifted)))
    squares = np.concatenate(([0.0], np.cumsum(shifted * shifted)))
    for _ in range(n_iter):
        if not (np.isfinite(centre) and np.isfinite(spread)):
            return np.nan, np.nan, 0
        lo = int(np.searchsorted(run, centre - clip_sigma * spread, "left"))
        hi = int(np.searchsorted(run, centre + clip_sigma * spread, "right"))
        count = hi - lo
        if count == 0:
            return np.nan, np.nan, 0
        mean = (sums[hi] - sums[lo]) / count
        centre = origin + mean
        spread = float(np.sqrt(max((squares[hi] - squares[lo]) / count - mean * mean, 0.0)))
    return centre, spread, count


@pytest.mark.parametrize("seed", range(40))
def test_clip_sorted_rows_equal_the_clip_of_each_row(seed):
    # all the boxes at once must give the very values of clipping them one by one: ties at the
    # clip limits (rounded values), outliers, large offsets, NaN tails, empty rows, a spread of
    # 0 or NaN, no iteration at all
    from improc.background import _clip_sorted, _sorted_median

    rng = np.random.default_rng(seed)
    boxes, n = _sorted_boxes(rng, seed, max_rows=9, max_width=60, outliers=True)
    rows = boxes.shape[0]
    centre = _sorted_median(boxes, n)
    spread = np.array([np.std(boxes[i, :n[i]], dtype=np.float64) if n[i] > 1 else 1.0 for i in range(rows)])
    spread[rng.random(rows) < 0.2] = rng.choice([0.0, np.nan])
    clip_sigma, n_iter = float(rng.choice([1.0, 2.5, 3.0])), int(rng.integers(0, 6))
    expected = np.array([_clip_one_row(boxes[i, :n[i]], centre[i], spread[i], clip_sigma, n_iter) if n[i] > 0
                         else (np.nan, np.nan, 0) for i in range(rows)]).T
    got = _clip_sorted(boxes, n, centre, spread, clip_sigma, n_iter)
    assert np.array_equal(got, expected, equal_nan=True)


def test_map_blocks_are_the_full_map_row_by_row():
    # the structure mask subtracts the sky block by block: the very values of counts()
    rng = np.random.default_rng(2)
    mesh = BackgroundMesh(level=rng.normal(100, 5, (5, 3)), rms=np.ones((5, 3)), box_size=128, filter_size=3,
                          shape=(600, 301))
    full = mesh.counts()
    got = np.full(full.shape, np.nan, np.float32)
    for rows, block in mesh._map_blocks(mesh.level):
        assert block.dtype == np.float32
        got[rows] = block
    assert np.array_equal(got, full)


def test_disc_dilation_with_repeated_rows_equals_ndimage():
    # the structure mask dilates 2 x 2 binned rows, repeated, by a disc: one plane per half-width
    from scipy import ndimage

    from improc.background import disc_dilation

    rng = np.random.default_rng(4)
    found = rng.random((21, 33)) < 0.02
    for radius, repeat, ny in ((8, 2, 41), (3.5, 1, None), (0.5, 2, 42)):
        full = np.repeat(found, repeat, axis=0)[:ny]
        r = int(np.floor(radius))
        yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
        expected = ndimage.binary_dilation(full, structure=yy**2 + xx**2 <= radius**2)
        assert np.array_equal(disc_dilation(found, radius, repeat=repeat, ny=ny), expected)
