"""Tests for improc.preprocessing: synthetic raw frames with known truth and a real SAAO frame."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.stats import sigma_clipped_stats

from improc.flags import flag_value, has_flag
from improc.preprocessing import (
    combine_bias,
    combine_flat,
    overscan_level,
    parse_fits_section,
    preprocess,
    subtract_overscan,
)

DATA_DIR = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
RAW_FILE = DATA_DIR / "ccdproc_raw" / "a8280271.fits"

GAIN = 2.0
READ_NOISE = 6.0  # e-, so 3 ADU
NY, NX = 60, 80
DATA = (slice(0, NY), slice(0, NX))
OVERSCAN = (slice(0, NY), slice(NX + 4, NX + 24))  # 20 overscan columns after a 4-column gap


def make_raw(signal: np.ndarray, *, level: float | np.ndarray = 1000.0, noise: float = 0.0,
             seed: int = 1, dtype: type = np.float64) -> np.ndarray:
    """A raw frame: ``signal`` in the data section, overscan columns, all plus ``level``.

    ``level`` may be a float or an (NY,) array (one bias level per row).
    """
    rng = np.random.default_rng(seed)
    raw = np.zeros((NY, NX + 24))
    raw[DATA] = signal
    raw += np.reshape(level, (-1, 1)) if np.ndim(level) else level
    raw += rng.normal(0.0, noise, raw.shape) if noise else 0.0
    return raw.astype(dtype)


def run(raw: np.ndarray, **kwargs) -> object:
    options = dict(overscan=OVERSCAN, data=DATA, gain=GAIN, read_noise=READ_NOISE,
                   saturation=60000.0)
    options.update(kwargs)
    return preprocess(raw, **options)


@pytest.fixture
def signal() -> np.ndarray:
    yy, xx = np.mgrid[0:NY, 0:NX]
    return 100.0 + 2.0 * xx + yy  # 100 .. 317 ADU, integers so a uint16 frame holds it exactly


# -- parse_fits_section --------------------------------------------------------------------------

def test_parse_fits_section_converts_to_zero_based_y_first():
    assert parse_fits_section("[17:528,1:520]") == (slice(0, 520), slice(16, 528))
    assert parse_fits_section("[  17: 528,   1: 520]") == (slice(0, 520), slice(16, 528))
    assert parse_fits_section("[5:5,3:4]") == (slice(2, 4), slice(4, 5))


def test_parse_fits_section_reversed_range_gives_same_region():
    assert parse_fits_section("[528:17,520:1]") == parse_fits_section("[17:528,1:520]")


@pytest.mark.parametrize("text", ["17:528,1:520", "[17:528]", "[a:5,1:2]", "[1:5,1:2,3:4]",
                                  "[-1:5,1:2]", "", "[1.5:3,1:2]"])
def test_parse_fits_section_rejects_malformed_text(text):
    with pytest.raises(ValueError, match="FITS section must look like"):
        parse_fits_section(text)


def test_parse_fits_section_rejects_zero_and_non_strings():
    with pytest.raises(ValueError, match=r"'\[0:5,1:2\]' contains 0"):
        parse_fits_section("[0:5,1:2]")
    with pytest.raises(ValueError, match="got None"):
        parse_fits_section(None)


# -- overscan ------------------------------------------------------------------------------------

def test_constant_overscan_and_signal_recovered_exactly(signal):
    result = run(make_raw(signal, level=1234.0, dtype=np.uint16))
    assert result.overscan_level == 1234.0
    assert result.image.dtype == np.float32 and result.image.shape == (NY, NX)
    np.testing.assert_array_equal(result.image, signal.astype(np.float32))
    assert not result.flags.any()


def test_noisy_overscan_level_within_noise(signal):
    noise = 3.0
    raw = make_raw(signal, level=1000.0, noise=noise, seed=7)
    raw[5, NX + 10] = 1e5  # a hot overscan pixel that clipping must ignore
    result = run(raw, overscan_method="mean")
    n_overscan = NY * 20
    assert abs(result.overscan_level - 1000.0) < 4 * noise / np.sqrt(n_overscan)
    residual = result.image - signal
    assert abs(residual.mean()) < 4 * noise / np.sqrt(NY * NX) + 4 * noise / np.sqrt(n_overscan)
    assert residual.std() == pytest.approx(noise, rel=0.1)


def test_clipped_level_matches_astropy_sigma_clipped_stats():
    rng = np.random.default_rng(3)
    raw = rng.normal(500.0, 4.0, (NY, NX + 24))
    raw[rng.random(raw.shape) < 0.03] += 200.0  # 3% hot pixels
    _, median, _ = sigma_clipped_stats(raw[OVERSCAN], sigma=3.0, maxiters=5)
    mean, _, _ = sigma_clipped_stats(raw[OVERSCAN], sigma=3.0, maxiters=5)
    assert overscan_level(raw, overscan=OVERSCAN) == pytest.approx(median, abs=1e-9)
    assert overscan_level(raw, overscan=OVERSCAN, method="mean") == pytest.approx(mean, abs=1e-9)


def test_row_median_follows_a_row_gradient(signal):
    rows = 1000.0 + 3.0 * np.arange(NY)
    result = run(make_raw(signal, level=rows), overscan_method="row_median")
    np.testing.assert_allclose(result.overscan_level, rows)
    np.testing.assert_allclose(result.image, signal, atol=1e-3)
    # A single median would leave the gradient in the image.
    flat_level = run(make_raw(signal, level=rows)).image - signal
    assert np.ptp(flat_level.mean(axis=1)) == pytest.approx(3.0 * (NY - 1))


def test_column_median_for_overscan_rows_below_the_data():
    rng = np.random.default_rng(5)
    columns = 800.0 + 0.5 * np.arange(NX)
    raw = np.zeros((NY + 10, NX)) + columns
    raw[10:] += 50.0
    raw += rng.normal(0, 0.01, raw.shape)
    result = preprocess(raw, overscan=(slice(0, 8), slice(None)), data=(slice(10, None),
                        slice(None)), gain=GAIN, read_noise=READ_NOISE, saturation=6e4,
                        overscan_method="column_median")
    assert result.overscan_level.shape == (NX,)
    np.testing.assert_allclose(result.overscan_level, columns, atol=0.02)
    np.testing.assert_allclose(result.image, 50.0, atol=0.05)


def test_subtract_overscan_keeps_full_frame_and_nans_rows_without_overscan(signal):
    raw = make_raw(signal, level=300.0)
    image, level = subtract_overscan(raw, overscan=OVERSCAN)
    assert image.shape == raw.shape and image.dtype == np.float32 and level == 300.0
    np.testing.assert_array_equal(image[OVERSCAN], 0.0)
    image, level = subtract_overscan(raw, overscan=(slice(10, NY), OVERSCAN[1]),
                                     method="row_median")
    assert np.isnan(level[:10]).all() and np.isnan(image[:10]).all()
    np.testing.assert_allclose(image[10:, :NX], signal[10:])


def test_row_median_needs_overscan_covering_data_rows(signal):
    with pytest.raises(ValueError, match="cover the data section's rows 0:60, got rows 10:60"):
        run(make_raw(signal), overscan=(slice(10, NY), OVERSCAN[1]), overscan_method="row_median")


# -- bias, flat, linearity -----------------------------------------------------------------------

def test_bias_and_flat_round_trip(signal):
    rng = np.random.default_rng(11)
    bias = rng.normal(20.0, 2.0, (NY, NX))
    flat = 3.0 * rng.uniform(0.8, 1.2, (NY, NX))  # arbitrary scale: preprocess normalizes it
    flat_norm = flat / np.median(flat)
    raw = make_raw(signal * flat_norm + bias, level=1000.0)
    result = run(raw, bias=bias, flat=flat)
    np.testing.assert_allclose(result.image, signal, rtol=1e-5, atol=1e-3)


def test_linearity_polynomial_in_increasing_order(signal):
    coefficients = np.array([5.0, 1.0, 2e-4])  # corrected = 5 + x + 2e-4 x^2
    result = run(make_raw(signal), linearity=coefficients)
    expected = 5.0 + signal + 2e-4 * signal**2
    np.testing.assert_allclose(result.image, expected, rtol=1e-6)


def test_linearity_before_bias_and_flat(signal):
    bias = np.full((NY, NX), 10.0)
    flat = np.full((NY, NX), 2.0)  # normalizes to 1
    # measured = f^-1(signal + bias) where f(x) = 1.02 x
    raw = make_raw((signal + bias) / 1.02)
    result = run(raw, linearity=lambda x: 1.02 * x, bias=bias, flat=flat)
    np.testing.assert_allclose(result.image, signal, rtol=1e-5)


def test_linearity_errors(signal):
    with pytest.raises(ValueError, match="linearity callable must return the image shape"):
        run(make_raw(signal), linearity=lambda x: x[:5])
    with pytest.raises(ValueError, match="linearity must be a callable or a non-empty 1-D"):
        run(make_raw(signal), linearity=np.zeros((2, 2)))
    with pytest.raises(ValueError, match="linearity must be a callable or a non-empty 1-D"):
        run(make_raw(signal), linearity=[1.0, np.nan])


# -- flags and weight ----------------------------------------------------------------------------

def test_saturation_flagged_from_raw_values(signal):
    raw = make_raw(signal, level=1000.0)
    raw[3, 4] = 60000.0   # saturated in raw, 59000 after overscan
    raw[5, 6] = 59990.0   # just below
    result = run(raw, bias=np.full((NY, NX), 500.0))
    saturated = has_flag(result.flags, "SATURATED")
    assert saturated[3, 4] and saturated.sum() == 1
    assert result.weight[3, 4] == 0 and result.weight[5, 6] > 0
    assert result.flags[3, 4] == flag_value("SATURATED")


def test_nonfinite_and_bad_pixels_flagged_and_zero_weight(signal):
    raw = make_raw(signal)
    raw[1, 1], raw[2, 2] = np.nan, np.inf
    bias = np.zeros((NY, NX))
    bias[3, 3] = np.nan
    mask = np.zeros((NY, NX), dtype=bool)
    mask[4, 4] = True
    flat = np.ones((NY, NX))
    flat[5, 5], flat[6, 6], flat[7, 7] = 0.0, np.nan, -1.0
    result = run(raw, bias=bias, bad_pixel_mask=mask, flat=flat, fill_value=-99.0)
    no_data = {(1, 1), (2, 2), (3, 3)}
    bad = {(4, 4), (5, 5), (6, 6), (7, 7)}
    assert set(zip(*np.nonzero(has_flag(result.flags, "NO_DATA")))) == no_data
    assert set(zip(*np.nonzero(has_flag(result.flags, "BAD")))) == bad
    assert set(zip(*np.nonzero(result.weight == 0))) == no_data | bad
    assert np.isfinite(result.image).all()
    for y, x in no_data | {(5, 5), (6, 6), (7, 7)}:
        assert result.image[y, x] == -99.0
    assert result.image[4, 4] == pytest.approx(signal[4, 4])  # masked but still has its value


def test_weight_formula_without_and_with_flat(signal):
    image = signal.copy()
    image[0, :10] = -50.0  # negative values contribute no Poisson variance
    result = run(make_raw(image))
    expected = 1.0 / (np.maximum(image, 0) / GAIN + (READ_NOISE / GAIN) ** 2)
    np.testing.assert_allclose(result.weight, expected, rtol=1e-6)
    assert result.weight[0, 0] == pytest.approx((GAIN / READ_NOISE) ** 2)

    flat = np.full((NY, NX), 1.0)
    flat[:, : NX // 2] = 0.5
    flat /= np.median(flat)  # 2/3 and 4/3: median 1, so preprocess keeps it as it is
    result = run(make_raw(signal * flat), flat=flat)
    expected = flat**2 / (np.maximum(signal * flat, 0) / GAIN + (READ_NOISE / GAIN) ** 2)
    np.testing.assert_allclose(result.weight, expected, rtol=1e-5)


def test_weight_matches_simulated_ccd_noise():
    """Poisson electrons plus Gaussian read noise: image * sqrt(weight) has unit scatter."""
    rng = np.random.default_rng(2024)
    ny, nx = 200, 200
    truth = rng.uniform(50.0, 3000.0, (ny, nx))  # ADU
    flat = rng.uniform(0.7, 1.3, (ny, nx))
    flat /= np.median(flat)
    electrons = rng.poisson(truth * flat * GAIN) + rng.normal(0.0, READ_NOISE, (ny, nx))
    raw = np.zeros((ny, nx + 30)) + 700.0
    raw[:, :nx] += electrons / GAIN
    raw[:, nx + 5:] += rng.normal(0.0, READ_NOISE / GAIN, (ny, 25))
    result = preprocess(raw, overscan=(slice(None), slice(nx + 5, None)),
                        data=(slice(None), slice(0, nx)), gain=GAIN, read_noise=READ_NOISE,
                        saturation=6e4, flat=flat)
    true_variance = (truth * flat / GAIN + (READ_NOISE / GAIN) ** 2) / flat**2
    # The image is unbiased: mean normalized residual within 4 standard errors of 0.
    assert abs(np.mean((result.image - truth) / np.sqrt(true_variance))) < 4 / np.sqrt(ny * nx)
    # The weights are the true inverse variance to within the noise of the image they use.
    assert np.median(result.weight * true_variance) == pytest.approx(1.0, abs=0.01)
    chi = (result.image - truth) * np.sqrt(result.weight)
    assert chi.std() == pytest.approx(1.0, abs=0.02)


# -- input validation ----------------------------------------------------------------------------

@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(data=(slice(0, NY), slice(0, 500))), r"data columns 0:500 must be a non-empty range"),
    (dict(overscan=(slice(0, 100), slice(0, 5))), r"overscan rows 0:100 must be a non-empty"),
    (dict(data=(slice(5, 5), slice(0, NX))), r"data rows 5:5 must be a non-empty range"),
    (dict(data=(slice(0, NY, 2), slice(0, NX))), r"data rows must have step 1"),
    (dict(data=(slice(0, NY),)), r"data must be a \(slice_y, slice_x\) tuple"),
    (dict(overscan=(slice(0, NY), slice(NX - 5, NX + 5))), r"overlaps the data section"),
    (dict(gain=0.0), r"gain must be > 0 e-/ADU, got 0.0"),
    (dict(gain=-1.9), r"gain must be > 0 e-/ADU, got -1.9"),
    (dict(read_noise=np.nan), r"read_noise must be > 0 e-, got nan"),
    (dict(saturation=0), r"saturation must be > 0 ADU, got 0"),
    (dict(bias=np.zeros((NY, NX + 1))), r"bias must have the trimmed data-section shape \(60,"),
    (dict(flat=np.ones((NX, NY))), r"flat must have the trimmed data-section shape \(60, 80\)"),
    (dict(flat=np.zeros((NY, NX))), r"flat has no finite positive pixels"),
    (dict(bad_pixel_mask=np.zeros(5)), r"bad_pixel_mask must have the trimmed data-section"),
    (dict(overscan_method="mode"), r"overscan_method must be one of"),
])
def test_preprocess_rejects_bad_arguments(signal, kwargs, message):
    with pytest.raises(ValueError, match=message):
        run(make_raw(signal), **kwargs)


def test_preprocess_rejects_empty_and_all_nan_frames():
    with pytest.raises(ValueError, match=r"raw must be a non-empty 2-D \(ny, nx\) array"):
        preprocess(np.zeros((0, 10)), overscan=None, data=(slice(None), slice(None)), gain=1.0,
                   read_noise=1.0, saturation=1.0)
    with pytest.raises(ValueError, match="raw image has no finite pixels"):
        run(np.full((NY, NX + 24), np.nan))
    raw = np.full((NY, NX + 24), 100.0)
    raw[OVERSCAN] = np.nan
    with pytest.raises(ValueError, match=r"overscan region \(rows 0:60, columns 84:104\) has no"):
        run(raw)


def test_overscan_level_rejects_bad_options(signal):
    raw = make_raw(signal)
    with pytest.raises(ValueError, match="overscan method must be one of"):
        overscan_level(raw, overscan=OVERSCAN, method="row")
    with pytest.raises(ValueError, match="sigma must be > 0"):
        overscan_level(raw, overscan=OVERSCAN, sigma=0)
    with pytest.raises(ValueError, match="maxiters must be >= 1, got 0"):
        overscan_level(raw, overscan=OVERSCAN, maxiters=0)


def test_no_overscan_gives_zero_level(signal):
    result = run(make_raw(signal, level=0.0), overscan=None)
    assert result.overscan_level == 0.0
    np.testing.assert_array_equal(result.image, signal.astype(np.float32))


# -- combining calibration frames ----------------------------------------------------------------

def test_combine_bias_recovers_pattern_within_noise():
    rng = np.random.default_rng(8)
    pattern = rng.normal(0.0, 5.0, (NY, NX))
    frames = [pattern + rng.normal(0.0, 3.0, (NY, NX)) for _ in range(9)]
    frames[0][10, 10] = 1e4  # a cosmic ray in one frame
    master = combine_bias(frames)
    assert master.dtype == np.float32
    # the median of 9 Gaussian values has ~1.2x the error of their mean: 3/3 * 1.2 per pixel
    assert np.std(master - pattern) == pytest.approx(1.2, rel=0.15)
    assert abs(master[10, 10] - pattern[10, 10]) < 6.0
    assert np.std(combine_bias(frames[1:], method="mean") - pattern) == pytest.approx(
        3.0 / np.sqrt(8), rel=0.15)


def test_combine_flat_normalizes_frames_of_different_levels():
    rng = np.random.default_rng(9)
    response = rng.uniform(0.9, 1.1, (NY, NX))
    response /= np.median(response)
    frames = [level * response * (1 + rng.normal(0, 1e-3, (NY, NX)))
              for level in (1000.0, 5000.0, 20000.0)]
    master = combine_flat(frames)
    assert np.median(master) == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(master, response, rtol=5e-3)


def test_combine_rejects_bad_frames():
    with pytest.raises(ValueError, match="at least one 2-D array"):
        combine_bias([])
    with pytest.raises(ValueError, match=r"frames\[1\] has shape \(3, 4\), expected \(4, 4\)"):
        combine_bias([np.zeros((4, 4)), np.zeros((3, 4))])
    with pytest.raises(ValueError, match=r"flat frames\[0\] has no finite positive pixels"):
        combine_flat([np.zeros((4, 4))])
    with pytest.raises(ValueError, match="method must be one of"):
        combine_bias([np.zeros((4, 4))], method="mode")


# -- a real raw frame ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def saao_frame() -> tuple[np.ndarray, fits.Header]:
    if not RAW_FILE.is_file():
        pytest.fail(f"real test data missing: {RAW_FILE} (see ../shared/data/README.md)")
    with fits.open(RAW_FILE) as hdul:
        return np.array(hdul[0].data), hdul[0].header.copy()


@pytest.mark.real_data
def test_real_saao_frame_overscan_and_trim(saao_frame):
    raw, header = saao_frame
    assert raw.shape == (520, 536) and raw.dtype == np.uint16
    overscan = parse_fits_section(header["BIASSEC"])
    data = parse_fits_section(header["TRIMSEC"])
    result = preprocess(raw, overscan=overscan, data=data, gain=header["GAIN"],
                        read_noise=header["RDNOISE"], saturation=65535)
    assert result.image.shape == (520, 512)

    # Independent reference: astropy's sigma-clipped median of the overscan, plain numpy trim.
    _, reference_level, _ = sigma_clipped_stats(raw[:, 3:13].astype(float), sigma=3, maxiters=5)
    assert result.overscan_level == pytest.approx(reference_level, abs=1e-9)
    expected_sky = np.median(raw[:, 16:528].astype(float)) - reference_level
    assert np.median(result.image) == pytest.approx(expected_sky, abs=1e-3)
    np.testing.assert_array_equal(result.image, raw[:, 16:528] - np.float32(reference_level))

    full, level = subtract_overscan(raw, overscan=overscan)
    _, median_after, _ = sigma_clipped_stats(full[overscan], sigma=3, maxiters=5)
    assert abs(median_after) < 0.01
    assert not result.flags.any()


@pytest.mark.real_data
def test_real_saao_frame_row_median_and_noise(saao_frame):
    raw, header = saao_frame
    overscan = parse_fits_section(header["BIASSEC"])
    data = parse_fits_section(header["TRIMSEC"])
    result = preprocess(raw, overscan=overscan, data=data, gain=header["GAIN"],
                        read_noise=header["RDNOISE"], saturation=65535,
                        overscan_method="row_median")
    _, reference_rows, _ = sigma_clipped_stats(raw[overscan].astype(float), sigma=3, maxiters=5,
                                               axis=1)
    np.testing.assert_allclose(result.overscan_level, reference_rows, atol=1e-9)
    # The sky's robust scatter agrees with the noise the weights predict (header gain and read
    # noise; no flat is applied, so a few per cent of extra scatter is expected).
    sky = np.median(result.image)
    sky_scatter = 1.4826 * np.median(np.abs(result.image - sky))
    predicted = np.median(1.0 / np.sqrt(result.weight))
    assert sky_scatter == pytest.approx(predicted, rel=0.08)
