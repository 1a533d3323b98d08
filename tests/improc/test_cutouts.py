"""Tests of improc.cutouts: stamps equal the image slices, edges are padded and flagged."""

from __future__ import annotations

import time

import numpy as np
import pytest

from improc.cutouts import ImagePlanes, cut_planes, make_cutouts
from improc.flags import PixelFlag

SHAPE = (300, 200)   # (ny, nx)


def _planes(seed: int) -> ImagePlanes:
    rng = np.random.default_rng(seed)
    return ImagePlanes(data=rng.normal(0, 10, SHAPE).astype(np.float32),
                       weight=rng.uniform(0.5, 1.5, SHAPE).astype(np.float32),
                       flags=rng.choice(np.array([0, 1, 4, 2], np.uint16), SHAPE))


@pytest.fixture(scope="module")
def triplet():
    return {"new": _planes(1), "ref": _planes(2), "sub": _planes(3)}


def test_interior_stamps_equal_the_image_slices(triplet):
    x = np.array([50.0, 100.4, 120.5, 20.0, 178.49])
    y = np.array([60.0, 150.6, 40.5, 20.0, 278.5])
    cut = make_cutouts(x, y, **triplet, size=21)
    assert len(cut) == 5 and cut.size == 21
    np.testing.assert_array_equal(cut.x0, [40, 90, 111, 10, 168])     # floor(x + 0.5) - 10
    np.testing.assert_array_equal(cut.y0, [50, 141, 31, 10, 269])
    for name in ("new", "ref", "sub"):
        planes, stamps = triplet[name], getattr(cut, name)
        for part in ("data", "weight", "flags"):
            values = getattr(stamps, part)
            assert values.shape == (5, 21, 21)
            assert values.dtype == getattr(planes, part).dtype
            for k in range(5):
                expected = getattr(planes, part)[cut.y0[k]:cut.y0[k] + 21, cut.x0[k]:cut.x0[k] + 21]
                np.testing.assert_array_equal(values[k], expected)


def test_stamps_over_the_edges_are_padded_and_flagged(triplet):
    x = np.array([0.0, 199.0, -5.0, 100.0, 250.0])
    y = np.array([0.0, 299.0, 150.0, 298.6, 150.0])
    cut = make_cutouts(x, y, **triplet)           # default size 41
    assert cut.new.data.shape == (5, 41, 41)
    ny, nx = SHAPE
    for name in ("new", "ref", "sub"):
        planes, stamps = triplet[name], getattr(cut, name)
        for k in range(x.size):
            yy = cut.y0[k] + np.arange(41)[:, None]
            xx = cut.x0[k] + np.arange(41)[None, :]
            inside = (yy >= 0) & (yy < ny) & (xx >= 0) & (xx < nx)
            outside = ~inside
            iy, ix = np.nonzero(inside)
            np.testing.assert_array_equal(stamps.data[k][inside], planes.data[yy[iy, 0], xx[0, ix]])
            np.testing.assert_array_equal(stamps.flags[k][inside], planes.flags[yy[iy, 0], xx[0, ix]])
            assert np.all(stamps.data[k][outside] == 0)
            assert np.all(stamps.weight[k][outside] == 0)
            assert np.all(stamps.flags[k][outside] == PixelFlag.NO_DATA)
    assert np.all(cut.new.flags[4] == PixelFlag.NO_DATA)          # entirely off the image
    assert not np.any(cut.new.flags[3][:, :][cut.new.weight[3] > 0] & PixelFlag.NO_DATA)


def test_no_positions_give_empty_stamps(triplet):
    cut = make_cutouts([], [], **triplet, size=11)
    assert cut.sub.weight.shape == (0, 11, 11) and cut.x0.shape == (0,)


def test_cut_planes_takes_corners_and_tuples(triplet):
    planes = tuple(triplet["new"])
    stamps = cut_planes(planes, np.array([-2]), np.array([5]), 5)
    np.testing.assert_array_equal(stamps.data[0][:, 2:], triplet["new"].data[5:10, 0:3])
    assert np.all(stamps.flags[0][:, :2] == PixelFlag.NO_DATA)


def test_thousands_of_positions_are_fast():
    rng = np.random.default_rng(0)
    big = ImagePlanes(rng.normal(0, 1, (2048, 2048)).astype(np.float32),
                      np.ones((2048, 2048), np.float32), np.zeros((2048, 2048), np.uint16))
    x, y = rng.uniform(-20, 2068, 5000), rng.uniform(-20, 2068, 5000)
    make_cutouts(x[:10], y[:10], new=big, ref=big, sub=big)
    start = time.perf_counter()
    cut = make_cutouts(x, y, new=big, ref=big, sub=big)
    assert time.perf_counter() - start < 3.0          # ~0.1 s warm on one core
    k = int(np.argmin(np.abs(x - 1000) + np.abs(y - 1000)))
    np.testing.assert_array_equal(cut.ref.data[k], big.data[cut.y0[k]:cut.y0[k] + 41, cut.x0[k]:cut.x0[k] + 41])


@pytest.mark.parametrize("kwargs, match", [
    ({"size": 40}, "size must be a positive odd integer"),
    ({"size": 0}, "size must be a positive odd integer"),
    ({"size": 5.0}, "size must be a positive odd integer"),
])
def test_bad_size(triplet, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_cutouts([1.0], [1.0], **triplet, **kwargs)


def test_bad_inputs(triplet):
    with pytest.raises(ValueError, match="x and y must be 1-d arrays of one length"):
        make_cutouts([1.0, 2.0], [1.0], **triplet)
    with pytest.raises(ValueError, match="x and y must be finite"):
        make_cutouts([np.nan], [1.0], **triplet)
    small = ImagePlanes(*(np.asarray(p)[:100] for p in triplet["ref"]))
    with pytest.raises(ValueError, match="new, ref and sub must be aligned images of one shape"):
        make_cutouts([1.0], [1.0], new=triplet["new"], ref=small, sub=triplet["sub"])
    with pytest.raises(ValueError, match="sub.weight must have the shape of sub.data"):
        make_cutouts([1.0], [1.0], new=triplet["new"], ref=triplet["ref"],
                     sub=(triplet["sub"].data, triplet["sub"].weight[:10], triplet["sub"].flags))
    with pytest.raises(ValueError, match=r"new must be \(data, weight, flags\)"):
        make_cutouts([1.0], [1.0], new=(triplet["new"].data,), ref=triplet["ref"], sub=triplet["sub"])
    with pytest.raises(ValueError, match="ref.data must be a 2-d"):
        make_cutouts([1.0], [1.0], new=triplet["new"], ref=(np.zeros(3), np.zeros(3), np.zeros(3)),
                     sub=triplet["sub"])
