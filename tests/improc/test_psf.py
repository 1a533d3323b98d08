"""Tests of improc.psf: the PixelPSF model and fit_psf, on synthetic star fields.

The truth is an elliptical Moffat (beta = 3) whose FWHM (3.8 px at the centre) varies by ~10 %
across the chip and whose ellipticity varies too, integrated over pixels; images have Poisson
and read noise.  `render_stars` and `star_field` are reused by test_psf_photometry.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from improc.psf import PixelPSF, monomials, n_terms, shift_matrices, shifted_stamps
from improc.psf_fit import fit_psf

BETA = 3.0
SKY = 800.0
READ_NOISE = 5.0


def truth_params(x, y, shape):
    """FWHM and ellipticity components of the true PSF at image positions (x, y)."""
    ny, nx = shape
    u = (np.asarray(x, dtype=float) - (nx - 1) / 2) / (nx / 2)
    v = (np.asarray(y, dtype=float) - (ny - 1) / 2) / (ny / 2)
    fwhm = 3.8 * (1 + 0.035 * u - 0.02 * v + 0.01 * u * v)
    return fwhm, 0.04 + 0.02 * v, 0.03 * u


def render_stars(x, y, shape, size=45, nsub=9):
    """Pixel-integrated true PSF stamps (n, size, size), each centred on pixel floor(x + 0.5)."""
    x = np.atleast_1d(np.asarray(x, dtype=float))
    y = np.atleast_1d(np.asarray(y, dtype=float))
    fwhm, e1, e2 = truth_params(x, y, shape)
    alpha = fwhm / (2 * np.sqrt(2 ** (1 / BETA) - 1))
    sub = (np.arange(nsub) + 0.5) / nsub - 0.5
    grid = np.arange(size) - size // 2
    fine = (grid[:, None] + sub[None, :]).ravel()
    out = np.empty((x.size, size, size))
    for k in range(x.size):
        xx = fine[None, :] - (x[k] - np.floor(x[k] + 0.5))
        yy = fine[:, None] - (y[k] - np.floor(y[k] + 0.5))
        r2 = ((1 - e1[k]) * xx**2 + (1 + e1[k]) * yy**2 - 2 * e2[k] * xx * yy)
        r2 /= np.sqrt(1 - e1[k] ** 2 - e2[k] ** 2)
        prof = (BETA - 1) / (np.pi * alpha[k] ** 2) * (1 + r2 / alpha[k] ** 2) ** (-BETA)
        out[k] = prof.reshape(size, nsub, size, nsub).mean(axis=(1, 3))
    return out


def star_field(shape, x, y, flux, *, seed, size=45):
    """Background-subtracted noisy image, its true variance and the noiseless star image."""
    rng = np.random.default_rng(seed)
    model = np.zeros(shape)
    h = size // 2
    stamps = render_stars(x, y, shape, size)
    for k in range(len(x)):
        ix, iy = int(np.floor(x[k] + 0.5)), int(np.floor(y[k] + 0.5))
        y0, y1, x0, x1 = max(iy - h, 0), min(iy + h + 1, shape[0]), max(ix - h, 0), min(ix + h + 1, shape[1])
        model[y0:y1, x0:x1] += flux[k] * stamps[k, y0 - iy + h:y1 - iy + h, x0 - ix + h:x1 - ix + h]
    data = rng.poisson(model + SKY) + rng.normal(0.0, READ_NOISE, shape) - SKY
    return data, model + SKY + READ_NOISE**2, model


def grid_positions(shape, spacing, rng, margin=20):
    """Star positions on a jittered grid (so that stars are isolated), in random order."""
    gy, gx = np.mgrid[margin:shape[0] - margin:spacing, margin:shape[1] - margin:spacing]
    x = gx.ravel() + rng.uniform(-0.2, 0.2, gx.size) * spacing
    y = gy.ravel() + rng.uniform(-0.2, 0.2, gy.size) * spacing
    order = rng.permutation(x.size)
    return x[order], y[order]


def max_error(psf, x, y, shape):
    """Largest |model - truth| over the stamp, relative to the true peak, at (x, y)."""
    truth = render_stars(x, y, shape, psf.size, nsub=11)[0]
    truth /= truth.sum()        # the model is normalized within its stamp
    return np.abs(psf.get_clip(x, y) - truth).max() / truth.max()


@pytest.fixture(scope="module")
def field():
    """A 2048 x 2048 image with ~250 bright isolated stars, cosmic rays and a NaN patch."""
    shape = (2048, 2048)
    rng = np.random.default_rng(42)
    x, y = grid_positions(shape, 128, rng)
    flux = 10 ** rng.uniform(np.log10(3e4), np.log10(1e6), x.size)
    data, _, _ = star_field(shape, x, y, flux, seed=1)
    hits = rng.integers(0, 2048, (400, 2))
    data[hits[:, 0], hits[:, 1]] += rng.uniform(500, 20000, 400)
    data[1000:1004, 600:700] = np.nan
    return shape, data, x, y, flux


@pytest.fixture(scope="module")
def fitted(field):
    shape, data, x, y, _ = field
    rng = np.random.default_rng(3)
    xin, yin = x + rng.normal(0, 0.05, x.size), y + rng.normal(0, 0.05, x.size)
    return fit_psf(data, xin, yin, background=0.0, noise=np.sqrt(SKY + READ_NOISE**2), fwhm_guess=3.8)


def test_fit_matches_truth_everywhere(field, fitted):
    shape = field[0]
    rng = np.random.default_rng(7)
    corners = [(0, 0), (2047, 0), (0, 2047), (2047, 2047), (1023.5, 1023.5), (400, 1500), (1700, 900)]
    errors = [max_error(fitted, px + rng.uniform(-0.5, 0.5), py + rng.uniform(-0.5, 0.5), shape)
              for px, py in corners for _ in range(2)]
    assert max(errors) < 0.01, np.round(errors, 4)
    assert fitted.size == 2 * 19 + 1
    assert fitted.degree == 3 and fitted.basis.shape == (10, 39, 39)


def test_fit_does_not_depend_on_input_positions(field, fitted):
    shape, data, x, y, _ = field
    rng = np.random.default_rng(11)
    other = fit_psf(data, x + rng.normal(0, 0.2, x.size), y + rng.normal(0, 0.2, x.size), background=0.0,
                    noise=np.sqrt(SKY + READ_NOISE**2), fwhm_guess=4.2, flux=np.ones(x.size), stamp_size=39)
    for px, py in [(100.3, 200.7), (1900.5, 1800.1)]:
        a, b = fitted.get_clip(px, py), other.get_clip(px, py)
        assert np.abs(a - b).max() < 0.004 * a.max()


def test_fwhm_of_fitted_model(field, fitted):
    shape = field[0]
    truth = render_stars(fitted.x0, fitted.y0, shape, 39, nsub=11)[0]
    exact = PixelPSF(truth[None] / truth.sum(), 0, fitted.x0, fitted.y0, 1024, 1024, shape)
    assert fitted.fwhm_pixels == pytest.approx(exact.fwhm_pixels, rel=0.01)
    # pixel integration broadens the 3.8 px Moffat slightly
    assert 3.8 < exact.fwhm_pixels < 3.8 * 1.05


def gaussian_psf(sigma=1.6, size=31, degree=0, shape=(100, 200)):
    off = np.arange(size) - size // 2
    fine = np.exp(-0.5 * (off[None, :] ** 2 + off[:, None] ** 2) / sigma**2)
    basis = np.zeros((n_terms(degree), size, size))
    basis[0] = fine / fine.sum()
    return PixelPSF(basis, degree, (shape[1] - 1) / 2, (shape[0] - 1) / 2, shape[1] / 2, shape[0] / 2, shape)


def test_get_clip_convention():
    psf = gaussian_psf()
    c = psf.size // 2
    off = np.arange(psf.size) - c
    for x, y in [(10.3, 20.45), (57.0, 3.5), (99.6, 0.2)]:
        clip = psf.get_clip(x, y, flux=250.0)
        assert clip.sum() == pytest.approx(250.0, rel=1e-12)
        cx = (clip.sum(axis=0) * off).sum() / clip.sum()
        cy = (clip.sum(axis=1) * off).sum() / clip.sum()
        assert cx == pytest.approx(x - np.floor(x + 0.5), abs=1e-3)
        assert cy == pytest.approx(y - np.floor(y + 0.5), abs=1e-3)
    small = psf.get_clip(10.3, 20.45, 5.0, size=11)
    assert small.shape == (11, 11) and small.sum() == pytest.approx(5.0)
    big = psf.get_clip(10.3, 20.45, 5.0, size=41)
    assert big.shape == (41, 41) and np.allclose(big[5:-5, 5:-5], psf.get_clip(10.3, 20.45, 5.0))
    with pytest.raises(ValueError, match="size must be a positive odd integer, got 10"):
        psf.get_clip(1.0, 1.0, size=10)


def _fft_shift(stamps, dx, dy):
    """The Fourier phase shift the shift matrices stand for (full complex FFTs)."""
    size = stamps.shape[-1]
    f = np.fft.fftfreq(size)
    ramp = np.exp(-2j * np.pi * (dy[:, None, None] * f[None, :, None] + dx[:, None, None] * f[None, None, :]))
    return np.fft.ifft2(np.fft.fft2(stamps) * ramp).real


def test_shift_matrices_are_the_fourier_shift():
    rng = np.random.default_rng(3)
    stamps = rng.normal(size=(4, 15, 15))
    dx, dy = np.array([0.0, 0.3, -0.5, 1.7]), np.array([0.25, -0.49, 0.0, -2.2])
    moved = shifted_stamps(stamps, dx, dy)
    np.testing.assert_allclose(moved, _fft_shift(stamps, dx, dy), atol=1e-12)
    np.testing.assert_allclose(moved[0], np.roll(shifted_stamps(stamps[:1], dx[:1] - 1, dy[:1])[0], 1, axis=1),
                               atol=1e-12)        # a whole pixel is a (periodic) roll
    assert np.allclose(shift_matrices(dx, 15).sum(axis=1), 1.0)       # a move keeps the sum
    window = shifted_stamps(stamps, dx, dy, window=3)
    np.testing.assert_array_equal(window.shape, (4, 7, 7))
    np.testing.assert_allclose(window, moved[:, 4:11, 4:11], atol=1e-13)
    np.testing.assert_allclose(shift_matrices(dx, 15, window=3, transposed=True),
                               np.swapaxes(shift_matrices(dx, 15, window=3), 1, 2))


def test_shifted_stamp_derivatives_are_those_of_the_position():
    rng = np.random.default_rng(4)
    stamps = rng.normal(size=(3, 11, 11))
    dx, dy, eps = np.array([0.1, -0.4, 0.45]), np.array([-0.2, 0.0, 0.3]), 1e-6
    value, ddx, ddy = shifted_stamps(stamps, dx, dy, window=4, derivatives=True)
    np.testing.assert_allclose(value, shifted_stamps(stamps, dx, dy, window=4), atol=1e-14)
    np.testing.assert_allclose(ddx, (shifted_stamps(stamps, dx + eps, dy, window=4)
                                     - shifted_stamps(stamps, dx - eps, dy, window=4)) / (2 * eps), atol=1e-7)
    np.testing.assert_allclose(ddy, (shifted_stamps(stamps, dx, dy + eps, window=4)
                                     - shifted_stamps(stamps, dx, dy - eps, window=4)) / (2 * eps), atol=1e-7)


def test_get_clips_window_is_the_centre_of_the_whole_clips():
    psf = gaussian_psf()
    x, y = np.array([10.3, 57.0, 99.6]), np.array([20.45, 3.5, 0.2])
    whole = psf.get_clips(x, y, flux=[1.0, 2.0, 3.0])
    c = psf.size // 2
    np.testing.assert_allclose(psf.get_clips(x, y, flux=[1.0, 2.0, 3.0], window=5),
                               whole[:, c - 5:c + 6, c - 5:c + 6], atol=1e-15)
    np.testing.assert_allclose(whole.sum(axis=(1, 2)), [1.0, 2.0, 3.0], rtol=1e-12)


def test_image_at_and_fwhm():
    psf = gaussian_psf(sigma=1.6)
    assert psf.image_at(3.0, 4.0).sum() == pytest.approx(1.0)
    # a sampled Gaussian: FWHM 2.3548 sigma (the half-maximum area of the band-limited interpolant)
    assert psf.fwhm_pixels == pytest.approx(2.3548 * 1.6, rel=0.01)


def test_polynomial_terms_follow_psfex_order():
    basis = np.zeros((6, 5, 5))
    basis[:, 2, 2] = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    psf = PixelPSF(basis, 2, 50.0, 20.0, 10.0, 5.0, (40, 100))
    u, v = (62.0 - 50.0) / 10.0, (27.0 - 20.0) / 5.0
    expected = 1 + 2 * u + 3 * u**2 + 4 * v + 5 * u * v + 6 * v**2
    assert psf.image_at(62.0, 27.0)[2, 2] == pytest.approx(expected)
    assert np.allclose(monomials(u, v, 2)[0], [1, u, u**2, v, u * v, v**2])


def test_arrays_round_trip():
    psf = gaussian_psf(degree=1)
    copy = PixelPSF.from_arrays({k: np.asarray(v) for k, v in psf.to_arrays().items()})
    assert np.array_equal(copy.basis, psf.basis)
    assert (copy.degree, copy.x0, copy.y0, copy.xscale, copy.yscale, copy.image_shape) == \
        (1, psf.x0, psf.y0, psf.xscale, psf.yscale, (100, 200))
    assert np.allclose(copy.get_clip(3.3, 7.7), psf.get_clip(3.3, 7.7))
    with pytest.raises(ValueError, match=r"PSF arrays lack \['degree'\]"):
        PixelPSF.from_arrays({k: v for k, v in psf.to_arrays().items() if k != "degree"})


@pytest.mark.parametrize(("basis_shape", "degree", "message"), [
    ((6, 5, 4), 2, r"basis must have shape \(n_terms, size, size\) with size odd, got \(6, 5, 4\)"),
    ((6, 4, 4), 2, "with size odd"),
    ((3, 5, 5), 2, "basis of a degree-2 PSF must have 6 terms, got 3"),
    ((1, 5, 5), -1, "degree must be an integer >= 0, got -1"),
])
def test_invalid_basis(basis_shape, degree, message):
    with pytest.raises(ValueError, match=message):
        PixelPSF(np.zeros(basis_shape), degree, 0.0, 0.0, 1.0, 1.0, (10, 10))


def test_invalid_scale_and_shape():
    with pytest.raises(ValueError, match="xscale must be finite and > 0, got 0.0"):
        PixelPSF(np.zeros((1, 3, 3)), 0, 0.0, 0.0, 0.0, 1.0, (10, 10))
    with pytest.raises(ValueError, match="image_shape must be"):
        PixelPSF(np.zeros((1, 3, 3)), 0, 0.0, 0.0, 1.0, 1.0, (10,))


def test_too_few_stars(field):
    shape, data, x, y, _ = field
    with pytest.raises(ValueError, match="need at least 20 PSF stars for degree 3, got 5"):
        fit_psf(data, x[:5], y[:5], background=0.0, noise=30.0, fwhm_guess=3.8)
    with pytest.raises(ValueError, match="need at least 6 PSF stars for degree 1, got 3"):
        fit_psf(data, np.r_[x[:3], -50.0, np.nan], np.r_[y[:3], 10.0, 5.0], background=0.0, noise=30.0,
                fwhm_guess=3.8, degree=1)


def test_bad_arguments(field):
    shape, data, x, y, _ = field
    with pytest.raises(ValueError, match="give exactly one of weight"):
        fit_psf(data, x, y, background=0.0, fwhm_guess=3.8)
    with pytest.raises(ValueError, match="give exactly one of weight"):
        fit_psf(data, x, y, background=0.0, weight=1.0, noise=1.0, fwhm_guess=3.8)
    with pytest.raises(ValueError, match="fwhm_guess must be a finite number > 0, got -1"):
        fit_psf(data, x, y, background=0.0, noise=1.0, fwhm_guess=-1.0)
    with pytest.raises(ValueError, match="stamp_size must be an odd integer >= 3, got 20"):
        fit_psf(data, x, y, background=0.0, noise=1.0, fwhm_guess=3.8, stamp_size=20)
    with pytest.raises(ValueError, match=r"x and y must be 1-d arrays of the same length"):
        fit_psf(data, x, y[:-1], background=0.0, noise=1.0, fwhm_guess=3.8)
    with pytest.raises(ValueError, match=r"data must be a 2-d \(ny, nx\) image"):
        fit_psf(data[0], x, y, background=0.0, noise=1.0, fwhm_guess=3.8)


def test_weight_and_mask_are_used():
    """A degree-1 PSF from a small field, with a mask hiding a fake bright blob next to a star."""
    shape = (512, 512)
    rng = np.random.default_rng(5)
    x, y = grid_positions(shape, 64, rng)
    flux = rng.uniform(1e5, 3e5, x.size)
    data, _, _ = star_field(shape, x, y, flux, seed=9)
    data[int(y[0]) + 3:int(y[0]) + 6, int(x[0]) + 3:int(x[0]) + 6] += 1e6
    mask = np.zeros(shape, dtype=bool)
    mask[int(y[0]) + 3:int(y[0]) + 6, int(x[0]) + 3:int(x[0]) + 6] = True
    weight = np.full(shape, 1.0 / (SKY + READ_NOISE**2))
    psf = fit_psf(data, x, y, background=0.0, weight=weight, mask=mask, gain=1.0, fwhm_guess=3.8, degree=1)
    assert max_error(psf, 255.5, 255.5, shape) < 0.01


def test_half_maximum_fwhm_of_a_moffat_ignores_its_wings():
    from improc.psf import half_maximum_fwhm

    off = np.arange(-30, 31)
    r2 = off[None, :] ** 2 + off[:, None] ** 2
    for beta in (2.0, 3.0, 6.0):
        alpha = 5.0 / (2 * np.sqrt(2 ** (1 / beta) - 1))
        stamp = (1 + r2 / alpha**2) ** -beta
        assert half_maximum_fwhm(stamp) == pytest.approx(5.0, rel=0.03)
        noisy = stamp + np.where(r2 > 15**2, np.random.default_rng(1).normal(0, 0.01, stamp.shape), 0.0)
        assert half_maximum_fwhm(noisy) == pytest.approx(half_maximum_fwhm(stamp), rel=0.005)


@pytest.mark.parametrize(("stamp", "options", "match"), [(np.ones((4, 4)), {}, "odd size"),
                                                         (np.ones((5, 5)), {"oversample": 0}, "oversample")])
def test_half_maximum_fwhm_rejects_bad_input(stamp, options, match):
    from improc.psf import half_maximum_fwhm

    with pytest.raises(ValueError, match=match):
        half_maximum_fwhm(stamp, **options)


@pytest.mark.parametrize("dtype", [np.float32, ">f4", np.float64, bool])
def test_cut_stamps_equal_a_padded_cut(dtype):
    # windows of the image for stamps wholly on it, clipped indices for the others: both must be
    # the stamp of the zero-padded image, pixel for pixel, and ``inside`` its footprint
    from improc.psf import cut_stamps

    rng = np.random.default_rng(3)
    shape = (23, 17)
    image = (rng.normal(size=shape) * 100).astype(dtype)
    for half in (0, 2, 9):
        ix, iy = rng.integers(-12, shape[1] + 12, 60), rng.integers(-12, shape[0] + 12, 60)
        stamps, inside = cut_stamps(image, ix, iy, half, shape)
        pad = half + 12
        padded = np.pad(image.astype(float), pad)
        footprint = np.pad(np.ones(shape, bool), pad)
        for k in range(ix.size):
            rows = slice(iy[k] - half + pad, iy[k] + half + 1 + pad)
            cols = slice(ix[k] - half + pad, ix[k] + half + 1 + pad)
            assert np.array_equal(stamps[k], padded[rows, cols])
            assert np.array_equal(inside[k], footprint[rows, cols])
        assert stamps.dtype == np.float64
        constant, inside_c = cut_stamps(2.5, ix, iy, half, shape)
        assert np.array_equal(inside_c, inside) and np.array_equal(constant, np.where(inside, 2.5, 0.0))


def test_float32_clips_match_float64_clips():
    # float32 products move the stamps to ~1e-7 of the peak; window and flux as for float64
    rng = np.random.default_rng(5)
    size = 25
    yy, xx = np.mgrid[:size, :size] - size // 2
    basis = np.zeros((3, size, size))
    basis[0] = np.exp(-(xx**2 + yy**2) / (2 * 2.0**2))
    basis[0] /= basis[0].sum()
    basis[1] = 0.01 * basis[0] * xx
    psf = PixelPSF(basis, 1, x0=100.0, y0=100.0, xscale=100.0, yscale=100.0, image_shape=(200, 200))
    x, y = rng.uniform(0, 200, 300), rng.uniform(0, 200, 300)
    flux = rng.uniform(1.0, 1e5, 300)
    for window in (None, 5):
        double = psf.get_clips(x, y, flux, window=window)
        single = psf.get_clips(x, y, flux, window=window, dtype=np.float32)
        assert single.dtype == np.float32 and single.shape == double.shape
        assert (np.abs(single - double).max(axis=(1, 2)) / double.max(axis=(1, 2))).max() < 1e-6
        assert np.abs(single.sum(axis=(1, 2), dtype=np.float64) / double.sum(axis=(1, 2)) - 1).max() < 1e-6
    with pytest.raises(ValueError, match="dtype"):
        psf.get_clips(x, y, dtype=np.int32)
