"""Registering two images on their shared sources, and their flux ratio from shared stars."""

from __future__ import annotations

import numpy as np

from improc.flux_ratio import fit_flux_ratio
from improc.registration import fit_shift, registration_sigma


def test_fit_shift_recovers_the_offset_and_its_scatter_despite_outliers():
    rng = np.random.default_rng(3)
    n = 60
    x, y = rng.uniform(0, 500, n), rng.uniform(0, 500, n)
    dx, dy, noise = 0.43, -0.27, 0.05
    x_meas = x + dx + rng.normal(0, noise, n)
    y_meas = y + dy + rng.normal(0, noise, n)
    x_meas[:4] += 2.0           # proper motions, blends
    extra_x, extra_y = rng.uniform(0, 500, 30), rng.uniform(0, 500, 30)    # only in the other image
    shift = fit_shift(x, y, np.concatenate([x_meas, extra_x]), np.concatenate([y_meas, extra_y]))
    assert shift.n >= n - 6
    assert abs(shift.dx - dx) < 3 * shift.dx_err + 0.005 and abs(shift.dy - dy) < 3 * shift.dy_err + 0.005
    assert 0.03 < shift.rms_x < 0.08 and 0.03 < shift.rms_y < 0.08


def test_fit_shift_with_nothing_in_common_says_so():
    shift = fit_shift(np.array([10.0]), np.array([10.0]), np.array([400.0]), np.array([400.0]))
    assert shift.n == 0 and np.isnan(shift.dx)


def test_fit_flux_ratio_is_unbiased_and_clips_variables():
    rng = np.random.default_rng(5)
    n = 200
    true_ratio = 0.937
    flux = 10 ** rng.uniform(3, 5, n)
    err = np.sqrt(flux + 400.0)
    ref = true_ratio * flux
    ref_err = np.sqrt(ref + 400.0)
    new_obs = flux + rng.normal(0, err)
    ref_obs = ref + rng.normal(0, ref_err)
    ref_obs[:5] *= 1.5          # variable stars
    fit = fit_flux_ratio(new_obs, err, ref_obs, ref_err)
    assert abs(fit.ratio - true_ratio) < 3 * fit.error and fit.error < 0.003
    assert fit.n_stars <= fit.n_matched - 5


def test_fit_flux_ratio_without_bright_stars_gives_nan():
    fit = fit_flux_ratio(np.array([10.0]), np.array([5.0]), np.array([10.0]), np.array([5.0]))
    assert fit.n_stars == 0 and np.isnan(fit.ratio)


def _pairs(jitter: float, centroid_err: float, offset: float = 0.0, n: int = 400, seed: int = 5):
    rng = np.random.default_rng(seed)
    x, y = rng.uniform(0, 1000, n), rng.uniform(0, 1000, n)
    err = np.full(n, centroid_err)
    x_meas = x + offset + rng.normal(0, jitter, n) + rng.normal(0, np.sqrt(2) * centroid_err, n)
    y_meas = y + rng.normal(0, jitter, n) + rng.normal(0, np.sqrt(2) * centroid_err, n)
    return x, y, x_meas, y_meas, err


def test_registration_sigma_removes_the_centroid_errors():
    x, y, xm, ym, err = _pairs(jitter=0.1, centroid_err=0.08)
    sx, sy, n = registration_sigma(x, y, xm, ym, err_pred=(err, err), err_meas=(err, err))
    assert n >= 390
    assert abs(sx - 0.1) < 0.02 and abs(sy - 0.1) < 0.02
    # the raw scatter, which the stated registration noise used to be near, is far larger
    assert np.std(xm - x) > 0.14


def test_registration_sigma_is_near_zero_for_registered_images_and_counts_a_missed_offset():
    x, y, xm, ym, err = _pairs(jitter=0.0, centroid_err=0.08)
    sx, sy, _ = registration_sigma(x, y, xm, ym, err_pred=(err, err), err_meas=(err, err))
    assert sx < 0.06 and sy < 0.06     # (raw scatter 0.11 per axis)
    x, y, xm, ym, err = _pairs(jitter=0.0, centroid_err=0.02, offset=0.2)
    sx, sy, _ = registration_sigma(x, y, xm, ym, err_pred=(err, err), err_meas=(err, err))
    assert abs(sx - 0.2) < 0.02 and sy < 0.02


def test_registration_sigma_without_pairs_gives_nan():
    sx, sy, n = registration_sigma(np.array([0.0]), np.array([0.0]), np.array([50.0]), np.array([50.0]),
                                   err_pred=(np.ones(1), np.ones(1)), err_meas=(np.ones(1), np.ones(1)))
    assert n == 0 and np.isnan(sx) and np.isnan(sy)
