"""Speed and accuracy of astrometric and photometric calibration on synthetic star lists.

A 2048 x 2048 image at 0.26"/pixel with a cubic SIP distortion of ~3 pixels, ~2000 detected
sources (centroid noise 0.02 pixel, 5% of stars undetected, 5% spurious sources) and ~2000
catalog stars; the guessed WCS has no distortion and is off by 30" and 1 degree.

Run from the repository root:  python bench/bench_astrometry.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
from astropy.wcs import WCS, Sip

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from improc.astrometry import fit_wcs, match_to_catalog, solve_astrometry  # noqa: E402
from improc.pattern_match import from_tangent_plane, tangent_plane  # noqa: E402
from improc.photometry import fit_zero_point  # noqa: E402
from util.gaia import read_gaia_folder  # noqa: E402

SHAPE = (2048, 2048)
SCALE = 0.26


def true_wcs(sip_px: float = 3.0) -> WCS:
    w = WCS(naxis=2)
    w.wcs.crpix = [1024.5, 1024.5]
    w.wcs.crval = [150.0, 2.0]
    w.wcs.cd = SCALE / 3600 * np.array([[-1.0, 0.0], [0.0, 1.0]])
    half = 1024.0
    a, b = np.zeros((4, 4)), np.zeros((4, 4))
    a[2, 0], a[1, 1], a[3, 0], a[1, 2] = np.array([1, -0.5, 0.7 / half, 0.5 / half]) * sip_px / half ** 2
    b[0, 2], b[1, 1], b[0, 3], b[2, 1] = np.array([1, 0.4, 0.6 / half, -0.5 / half]) * sip_px / half ** 2
    w.wcs.ctype = ["RA---TAN-SIP", "DEC--TAN-SIP"]
    w.sip = Sip(a, b, None, None, w.wcs.crpix)
    w.wcs.set()
    return w


def guess_wcs(w: WCS, shift=(30.0, 0.0), rot_deg=1.0) -> WCS:
    g = WCS(naxis=2)
    g.wcs.crpix = w.wcs.crpix
    g.wcs.crval = [float(v) for v in from_tangent_plane(shift[0] / 3600, shift[1] / 3600, *w.wcs.crval)]
    th = np.radians(rot_deg)
    g.wcs.cd = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]]) @ w.wcs.cd
    g.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    g.wcs.set()
    return g


def field(w: WCS, seed: int = 0):
    rng = np.random.default_rng(seed)
    n = 2300  # over the image plus a 100-pixel margin
    xs, ys = rng.uniform(-100, 2147, n), rng.uniform(-100, 2147, n)
    mag = 15 + 7 * rng.power(2.5, n)
    ra, dec = w.all_pix2world(xs, ys, 0)
    on = (xs >= 0) & (xs <= 2047) & (ys >= 0) & (ys <= 2047) & (rng.random(n) > 0.05)
    det = np.flatnonzero(on)
    n_spur = len(det) // 20
    x = np.concatenate([xs[det] + rng.normal(0, 0.02, len(det)), rng.uniform(0, 2047, n_spur)])
    y = np.concatenate([ys[det] + rng.normal(0, 0.02, len(det)), rng.uniform(0, 2047, n_spur)])
    flux = np.concatenate([10 ** (-0.4 * (mag[det] - 31)), 10 ** (-0.4 * (rng.uniform(17, 23, n_spur) - 31))])
    return x, y, flux, ra, dec, mag, xs[det], ys[det]


def timed(func, repeat: int = 5):
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = func()
        times.append(time.perf_counter() - start)
    return result, float(np.median(times))


def rms_mas(wcs: WCS, truth: WCS, px, py) -> float:
    r1, d1 = wcs.all_pix2world(px, py, 0)
    r2, d2 = truth.all_pix2world(px, py, 0)
    xi, eta = tangent_plane(r1, d1, r2, d2)
    return float(np.sqrt(np.mean(xi ** 2 + eta ** 2)) * 3.6e6)


def main() -> None:
    truth = true_wcs()
    guess = guess_wcs(truth)
    x, y, flux, ra, dec, mag, tx, ty = field(truth)
    print(f"sources {len(x)}, catalog stars {len(ra)}, guess off by 30\" and 1 deg")
    match, t_match = timed(lambda: match_to_catalog(x, y, flux, ra, dec, mag, wcs_guess=guess))
    tr = match.transform
    print(f"match_to_catalog : {t_match * 1e3:7.1f} ms  {len(match.source_index)} matches, shift "
          f"({tr.shift_arcsec[0]:+.2f}, {tr.shift_arcsec[1]:+.2f})\", rotation {tr.rotation_deg:+.3f} deg")
    i_s, i_c = match.source_index, match.catalog_index
    fit, t_fit = timed(lambda: fit_wcs(x[i_s], y[i_s], ra[i_c], dec[i_c], image_shape=SHAPE))
    print(f"fit_wcs          : {t_fit * 1e3:7.1f} ms  rms {fit.rms_arcsec * 1e3:.2f} mas, "
          f"{fit.n_stars} stars")
    sol, t_solve = timed(lambda: solve_astrometry(x, y, flux, ra, dec, mag, wcs_guess=guess,
                                                  image_shape=SHAPE))
    gx, gy = (g.ravel() for g in np.meshgrid(np.linspace(0, 2047, 30), np.linspace(0, 2047, 30)))
    print(f"solve_astrometry : {t_solve * 1e3:7.1f} ms  {sol.n_matches} stars, "
          f"fit rms {sol.rms_arcsec * 1e3:.2f} mas; "
          f"vs truth: {rms_mas(sol.wcs, truth, tx, ty):.2f} mas rms at the stars, "
          f"{rms_mas(sol.wcs, truth, gx, gy):.2f} mas on a grid over the image")

    rng = np.random.default_rng(1)
    cat_mag = rng.uniform(15, 21, 2000)
    true_flux = 10 ** (-0.4 * (cat_mag - 31.0))
    flux_err = np.sqrt(true_flux / 4 + 2500)
    measured = true_flux + rng.normal(0, flux_err)
    cat_mag[:100] += 0.5
    noisy_mag = cat_mag + rng.normal(0, 0.01, 2000)
    zp, t_zp = timed(lambda: fit_zero_point(measured, flux_err, noisy_mag, np.full(2000, 0.01)))
    print(f"fit_zero_point   : {t_zp * 1e3:7.1f} ms  zp - true = {zp.zp - 31.0:+.4f} +- {zp.dzp:.4f} mag "
          f"({zp.n_stars} of 2000 stars, 100 outliers)")

    folder = Path(__file__).resolve().parents[2] / "shared" / "data" / "legacypipe" / "testcase8" / "gaia"
    if folder.is_dir():
        table, t_read = timed(lambda: read_gaia_folder(folder, ra_min=120.9, ra_max=121.1,
                                                       dec_min=4.86, dec_max=5.0))
        print(f"read_gaia_folder : {t_read * 1e3:7.1f} ms  {len(table)} stars (testcase8)")


if __name__ == "__main__":
    main()
