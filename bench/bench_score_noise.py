"""Benchmark: how much a tile's S_corr standard deviation scatters on pure noise.

Issue 10 asks for S_corr's standard deviation to be 1.00 +/- 0.05 in every 256-pixel tile.  A
tile's standard deviation is itself a measurement: S_corr is the image filtered by a PSF-sized
kernel, so a tile holds only about (tile area) / (4 pi sigma_PSF^2) independent values.  This
script measures that floor: white noise of known variance for both images (Gaussian PSFs of the
bench's seeings at 0.263"/px, a reference 3.3 times less noisy), `improc.zogy.zogy_subtract` with
the true PSFs and a small registration noise, then per tile the standard deviation over the
pixels left after masking ``--masked`` of the area in 8-pixel blocks (as sources are masked in
`bench/bench_difference.py`).  A pipeline cannot beat this scatter; what
`bench/bench_difference.py` measures above it is the pipeline's own.

Usage::

    python bench/bench_score_noise.py [--size 2048] [--fields 2] [--masked 0.2]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from improc.zogy import zogy_subtract  # noqa: E402

PIXEL_SCALE = 0.263
DIRECTIONS = {'new 1.4" / ref 0.9"': (1.4, 0.9), 'new 0.9" / ref 1.4"': (0.9, 1.4)}


def gaussian_stamp(fwhm_px: float, size: int = 41) -> np.ndarray:
    """A unit-sum circular Gaussian of ``fwhm_px`` on an odd ``size`` x ``size`` stamp."""
    sigma = fwhm_px / (2.0 * np.sqrt(2.0 * np.log(2.0)))
    y, x = np.mgrid[-(size // 2):size // 2 + 1, -(size // 2):size // 2 + 1]
    stamp = np.exp(-(x * x + y * y) / (2.0 * sigma * sigma))
    return stamp / stamp.sum()


def tile_stds(new_fwhm: float, ref_fwhm: float, *, size: int, seed: int, masked: float,
              tile: int = 256) -> np.ndarray:
    """Per-tile standard deviation of S_corr for one pure-noise pair."""
    rng = np.random.default_rng(seed)
    p_new, p_ref = gaussian_stamp(new_fwhm / PIXEL_SCALE), gaussian_stamp(ref_fwhm / PIXEL_SCALE)
    sigma_new, sigma_ref = 10.0, 3.0
    new = rng.normal(0.0, sigma_new, (size, size)).astype(np.float32)
    ref = rng.normal(0.0, sigma_ref, (size, size)).astype(np.float32)
    none = np.zeros((size, size), np.uint16)
    result = zogy_subtract(new, ref, new_weight=np.full((size, size), sigma_new**-2, np.float32),
                           ref_weight=np.full((size, size), sigma_ref**-2, np.float32),
                           new_flags=none, ref_flags=none, new_psf=lambda x, y: p_new,
                           ref_psf=lambda x, y: p_ref, flux_ratio=1.0, astrometric_sigma=(0.01, 0.01),
                           tile_size=tile)
    keep = rng.random((size // 8, size // 8)) >= masked
    keep = np.repeat(np.repeat(keep, 8, axis=0), 8, axis=1)
    score = result.score_corr
    return np.array([score[y:y + tile, x:x + tile][keep[y:y + tile, x:x + tile]].std()
                     for y in range(0, size, tile) for x in range(0, size, tile)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=2048, help="side of each field, pixels")
    parser.add_argument("--fields", type=int, default=2, help="independent fields per direction")
    parser.add_argument("--masked", type=float, default=0.2, help="fraction of each tile masked")
    args = parser.parse_args()
    for label, (new_fwhm, ref_fwhm) in DIRECTIONS.items():
        stds = np.concatenate([tile_stds(new_fwhm, ref_fwhm, size=args.size, seed=seed, masked=args.masked)
                               for seed in range(1, args.fields + 1)])
        print(f"{label}: {stds.size} tiles, S_corr std per tile {stds.min():.3f}..{stds.max():.3f}, "
              f"scatter {stds.std():.4f}, outside 0.95-1.05: {np.sum(np.abs(stds - 1) > 0.05)}")


if __name__ == "__main__":
    main()
