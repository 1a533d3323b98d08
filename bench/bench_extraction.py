"""Speed and accuracy of background estimation and source extraction on a DECam-CCD-sized image.

A 4096 x 2048 (ny, nx) image with a sky gradient, ~5000 Gaussian stars (FWHM 4 pixels, S/N
~5 to ~3000) and Poisson + read noise.  Prints timings of each stage and the recovery and
accuracy against the known truth.  Run from the repository root:

    python bench/bench_extraction.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
from scipy.special import erf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from improc.background import estimate_background  # noqa: E402
from improc.extraction import estimate_fwhm, extract_sources  # noqa: E402

SHAPE = (4096, 2048)
N_STARS = 5000
SIGMA = 4.0 / 2.3548
GAIN, READ_NOISE = 4.0, 7.0


def render_stars(shape, xs, ys, fluxes, sigma) -> np.ndarray:
    image = np.zeros(shape)
    half = int(np.ceil(6 * sigma))
    for x, y, flux in zip(xs, ys, fluxes):
        ix, iy = int(round(x)), int(round(y))
        x0, x1 = max(ix - half, 0), min(ix + half + 1, shape[1])
        y0, y1 = max(iy - half, 0), min(iy + half + 1, shape[0])
        ex = erf((np.arange(x0, x1 + 1) - 0.5 - x) / (np.sqrt(2) * sigma))
        ey = erf((np.arange(y0, y1 + 1) - 0.5 - y) / (np.sqrt(2) * sigma))
        image[y0:y1, x0:x1] += flux * np.outer(np.diff(ey), np.diff(ex)) / 4
    return image


def timed(label, func, *args, **kwargs):
    start = time.perf_counter()
    result = func(*args, **kwargs)
    print(f"{label:<44s} {time.perf_counter() - start:7.3f} s")
    return result


def main() -> None:
    rng = np.random.default_rng(42)
    xs = rng.uniform(5, SHAPE[1] - 5, N_STARS)
    ys = rng.uniform(5, SHAPE[0] - 5, N_STARS)
    fluxes = 10 ** rng.uniform(2.7, 6.0, N_STARS)
    yy, xx = np.mgrid[: SHAPE[0], : SHAPE[1]]
    sky = 800.0 + 0.02 * xx + 0.01 * yy
    signal = timed("render 5000 stars", render_stars, SHAPE, xs, ys, fluxes, SIGMA)
    electrons = rng.poisson((sky + signal) * GAIN) + rng.normal(0, READ_NOISE, SHAPE)
    image = (electrons / GAIN).astype(">f4")  # as read from FITS

    mesh = timed("estimate_background (box 64, filter 3)", estimate_background, image)
    background = timed("mesh.counts()", mesh.counts)
    noise = timed("mesh.rms_map()", mesh.rms_map)
    print(f"  sky error: median {np.median(background - sky):+.3f} ADU, "
          f"max |err| {np.max(np.abs(background - sky)):.2f} ADU; rms {mesh.median_rms:.2f} "
          f"(expected {np.sqrt(800 * GAIN + READ_NOISE**2) / GAIN:.2f})")

    table = timed("extract_sources (fixed radii 4, 8, 12, 20)", extract_sources, image,
                  background=background, noise=noise, gain=GAIN,
                  aperture_radii=[4.0, 8.0, 12.0, 20.0])
    two_pass = timed("extract_sources (radii = FWHM x 1,2,3,5)", extract_sources, image,
                     background=background, noise=noise, gain=GAIN)
    print(f"  detections {len(table)}; FWHM estimate {estimate_fwhm(two_pass):.3f} px "
          f"(pixel-integrated truth {2.3548 * np.sqrt(SIGMA**2 + 1 / 12):.3f})")

    dist = np.hypot(np.asarray(table["x"])[:, None] - xs[None], np.asarray(table["y"])[:, None] - ys[None])
    nearest, matched = dist.argmin(axis=1), dist.min(axis=1) < 1.0
    found = np.zeros(N_STARS, bool)
    found[nearest[matched]] = True
    truth_snr = fluxes / np.sqrt(4 * np.pi * SIGMA**2 * mesh.median_rms**2 + fluxes / GAIN)
    print(f"  stars found within 1 px: {found.sum()} / {N_STARS} ({found.mean():.3f}); "
          f"with true S/N > 20: {found[truth_snr > 20].mean():.3f}")
    # Accuracy on isolated stars (no other star within 25 px), where the truth is clean.
    pair = np.hypot(xs[:, None] - xs[None], ys[:, None] - ys[None])
    np.fill_diagonal(pair, np.inf)
    isolated = pair.min(axis=1) > 25.0
    print(f"  isolated stars with true S/N > 20 found: {found[isolated & (truth_snr > 20)].mean():.3f}")
    rows = matched & isolated[nearest]
    snr = np.asarray(table["snr"])
    for low in (20, 100, 500):
        sel = rows & (snr >= low)
        dx = np.asarray(table["x"])[sel] - xs[nearest[sel]]
        dy = np.asarray(table["y"])[sel] - ys[nearest[sel]]
        print(f"  isolated, S/N >= {low:3d}: {sel.sum():5d}, position rms x {np.sqrt(np.mean(dx**2)):.4f} "
              f"y {np.sqrt(np.mean(dy**2)):.4f} px, is_star {np.mean(table['is_star'][sel]):.3f}")
    truth_flux = fluxes[nearest[rows]] * (1 - np.exp(-0.5 * (12.0 / SIGMA) ** 2))
    flux, err = np.asarray(table["apflux_2"])[rows], np.asarray(table["apfluxerr_2"])[rows]
    pull = (flux - truth_flux) / err
    print(f"  isolated, r=12 px aperture: flux ratio median {np.median(flux / truth_flux):.4f}, "
          f"pull mean {np.mean(pull):+.3f} std {np.std(pull):.3f}")

if __name__ == "__main__":
    main()
