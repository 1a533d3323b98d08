"""Time improc.preprocessing.preprocess on a DECam-CCD-sized raw frame, and the cosmic-ray search.

A 4096 x 2048 uint16 data section with 56 prescan/overscan columns (4096 x 2104 raw), run with
and without bias, flat, linearity polynomial and bad-pixel mask, for each overscan method.
Then `improc.cosmic_rays.find_cosmic_rays` (which the preprocessing step runs on every
section) on simulated 4096 x 2048 frames at 10,000 and 100,000 stars per square degree, with
the hits found against the simulator's truth.  Prints the best of several runs in seconds.  Run from the repository root:

    /tmp/venv/bin/python bench/bench_preprocessing.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from improc.preprocessing import preprocess  # noqa: E402

NY, NX, N_OVERSCAN = 4096, 2048, 50


def make_inputs(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    raw = np.empty((NY, NX + N_OVERSCAN + 6), dtype=np.uint16)
    raw[:, :NX] = rng.poisson(1500.0, (NY, NX)) + 1000
    raw[:, NX:] = rng.normal(1000.0, 3.0, (NY, N_OVERSCAN + 6)).astype(np.uint16)
    raw[rng.integers(0, NY, 500), rng.integers(0, NX, 500)] = 65535
    mask = np.zeros((NY, NX), dtype=bool)
    mask[:, 700] = True
    return dict(
        raw=raw,
        overscan=(slice(0, NY), slice(NX + 6, NX + 6 + N_OVERSCAN)),
        data=(slice(0, NY), slice(0, NX)),
        bias=rng.normal(0.0, 2.0, (NY, NX)).astype(np.float32),
        flat=rng.uniform(0.9, 1.1, (NY, NX)).astype(np.float32),
        mask=mask,
    )


def best_time(func, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        func()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    inputs = make_inputs()
    raw = inputs["raw"]
    common = dict(overscan=inputs["overscan"], data=inputs["data"], gain=4.0, read_noise=7.0,
                  saturation=60000.0)
    print(f"raw frame {raw.shape} {raw.dtype}, data section {NY} x {NX}, "
          f"{N_OVERSCAN} overscan columns")
    for method in ("median", "row_median"):
        minimal = best_time(lambda: preprocess(raw, overscan_method=method, **common))
        full = best_time(lambda: preprocess(
            raw, overscan_method=method, bias=inputs["bias"], flat=inputs["flat"],
            linearity=np.array([0.0, 1.0, 1e-7]), bad_pixel_mask=inputs["mask"], **common))
        print(f"overscan {method:>10}: overscan+trim+flags+weight {minimal:.3f} s; "
              f"with bias, flat, linearity, mask {full:.3f} s")
    cosmic_rays()


def cosmic_rays() -> None:
    from improc.cosmic_rays import find_cosmic_rays
    from improc.sim_detector import FLAG_COSMIC_RAY
    from improc.simulator import SimulationParams, simulate_image

    for density in (10_000.0, 100_000.0):
        sim = simulate_image(SimulationParams(nx=NX, ny=NY, star_density=density, n_cosmic_rays=200, seed=3))
        variance = np.maximum(sim.data, 0) / 4.0 + (5.0 / 4.0) ** 2     # the simulator's gain and read noise
        truth = (sim.flags & FLAG_COSMIC_RAY) != 0
        bad = (sim.flags & ~np.uint16(FLAG_COSMIC_RAY)) != 0
        hits = find_cosmic_rays(sim.data, variance, bad)
        seconds = best_time(lambda: find_cosmic_rays(sim.data, variance, bad), repeats=3)
        print(f"cosmic rays, {density:,.0f} stars/deg2: {seconds:.3f} s; {int(np.sum(hits & truth))} of "
              f"{int(truth.sum())} hit pixels flagged, {int(np.sum(hits & ~truth))} other pixels")


if __name__ == "__main__":
    main()
