"""Benchmark: coadds of five simulated 2048 x 4096 images on one grid, on one core.

Simulates five epochs of one field (nx = 2048, ny = 4096, 0.26"/pixel, seeing 0.8"-1.3", sky
600-2000 ADU, zero points 30.8-31.1, cosmic rays, bad columns, saturated stars), all on the same
pixel grid, and times, on arrays in memory:

``weighted mean``
    `improc.coadd.weighted_mean_coadd` with the default rejection (the target: <= 15 s);
``weighted mean, no rejection``
    the same without outlier rejection (the cost of the combination alone);
``weighted mean, with white weights``
    the default, each input also given a ``white_weight`` as resampled images are;
``coadd PSF x 100``
    100 calls of `improc.coadd.coadd_psf` (each input's PSF is a fitted-like `PixelPSF`);
``proper coadd``
    `improc.coadd.proper_coadd` with 512-pixel tiles (its rejections included).

The process pins itself to one CPU (``sched_setaffinity``) and sets OMP/OPENBLAS/MKL threads
to 1 before numpy loads; scipy.fft is called with one worker.  Times are the best of
``--repeat`` runs; "peak RSS" is the process's ``ru_maxrss`` after the phase (it includes the
five simulated images, ~0.9 GB with their truth).

Usage (from anywhere)::

    python bench/bench_coadd.py [--repeat 3] [--skip-proper] [--all-cores]
"""

from __future__ import annotations

import os

# One thread per library: set before numpy (or anything importing it) is loaded.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
from dataclasses import replace  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import scipy.fft  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from improc.coadd import CoaddInput, coadd_psf, proper_coadd, weighted_mean_coadd  # noqa: E402
from improc.psf import PixelPSF  # noqa: E402
from improc.simulator import SimulationParams, simulate_image  # noqa: E402

NX, NY = 2048, 4096
TARGET_S = 15.0
EPOCHS = [dict(fwhm_arcsec=0.8, sky_adu=800.0, zero_point=31.0),
          dict(fwhm_arcsec=1.0, sky_adu=1500.0, zero_point=30.8),
          dict(fwhm_arcsec=1.3, sky_adu=600.0, zero_point=31.1),
          dict(fwhm_arcsec=1.1, sky_adu=2000.0, zero_point=30.9),
          dict(fwhm_arcsec=0.9, sky_adu=1000.0, zero_point=31.0)]


def _rss_mb() -> float:
    """Peak resident set size of this process so far, MB (Linux reports kB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _centre_psf(sim) -> PixelPSF:
    """A degree-0 PixelPSF of a simulated image's true PSF at its centre (a stand-in for a fit)."""
    stamp = sim.psf(NX / 2.0, NY / 2.0)
    return PixelPSF(basis=stamp[None], degree=0, x0=NX / 2.0, y0=NY / 2.0, xscale=NX / 2.0,
                    yscale=NY / 2.0, image_shape=(NY, NX))


def simulate_inputs() -> list[CoaddInput]:
    """Five epochs of one field on one grid, with the sky given and the PSF at the centre."""
    inputs = []
    for k, epoch in enumerate(EPOCHS):
        sim = simulate_image(SimulationParams(nx=NX, ny=NY, seed=100 + k, scene_seed=7, detector_seed=7,
                                              mjd=60000.0 + k, **epoch))
        flags = sim.flags & ~np.uint16(4)          # cosmic rays are found by the rejection
        inputs.append(CoaddInput(data=sim.data, weight=sim.weight, flags=flags,
                                 zero_point=sim.params.zero_point, sky=sim.sky, psf=_centre_psf(sim)))
    return inputs


def best_of(repeat: int, func, *args, **kwargs) -> tuple[float, object]:
    """Best wall time of ``repeat`` calls, and the last result."""
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = func(*args, **kwargs)
        times.append(time.perf_counter() - start)
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per phase (best is kept)")
    parser.add_argument("--skip-proper", action="store_true", help="do not time the proper coadd")
    parser.add_argument("--all-cores", action="store_true", help="do not pin to one CPU")
    args = parser.parse_args()
    if not args.all_cores and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    start = time.perf_counter()
    inputs = simulate_inputs()
    print(f"simulated 5 x {NX} x {NY} in {time.perf_counter() - start:.1f} s "
          f"(not part of the coadd), peak RSS {_rss_mb():.0f} MB")
    rows = []
    with scipy.fft.set_workers(1):
        seconds, coadd = best_of(args.repeat, weighted_mean_coadd, inputs)
        rows.append(("weighted mean", seconds, _rss_mb()))
        seconds, _ = best_of(args.repeat, weighted_mean_coadd, inputs, rejection=None)
        rows.append(("weighted mean, no rejection", seconds, _rss_mb()))
        resampled = [replace(inp, white_weight=0.8 * inp.weight) for inp in inputs]
        seconds, _ = best_of(args.repeat, weighted_mean_coadd, resampled)
        rows.append(("weighted mean, with white weights", seconds, _rss_mb()))
        del resampled
        positions = np.random.default_rng(0).uniform(100, 2000, (100, 2))
        seconds, _ = best_of(args.repeat, lambda: [coadd_psf(inputs, coadd, x, y) for x, y in positions])
        rows.append(("coadd PSF x 100", seconds, _rss_mb()))
        if not args.skip_proper:
            seconds, _ = best_of(1 if args.repeat < 2 else 2, proper_coadd, inputs)
            rows.append(("proper coadd (512-pixel tiles)", seconds, _rss_mb()))
    print(f"\n{'phase':<34}{'seconds':>9}{'peak RSS MB':>13}")
    for name, seconds, rss in rows:
        print(f"{name:<34}{seconds:>9.2f}{rss:>13.0f}")
    verdict = "OK" if rows[0][1] <= TARGET_S else "TOO SLOW"
    print(f"\nweighted mean of 5 x {NX} x {NY}: {rows[0][1]:.2f} s, target <= {TARGET_S:.0f} s: {verdict}; "
          f"rejected per input {coadd.n_rejected.tolist()}")


if __name__ == "__main__":
    main()
