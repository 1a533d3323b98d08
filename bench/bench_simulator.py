"""Speed of improc.simulator.simulate_image; the target is <= 3 s for a 2048 x 4096 image.

Run from the repository root:  python bench/bench_simulator.py [--repeat N]
Prints, for each size, the first (cold memory), best and median wall time and what was rendered;
the target is checked against the slowest run.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from improc.simulator import SimulationParams, simulate_image  # noqa: E402

SIZES = [(256, 256), (2048, 2048), (2048, 4096)]
TARGET_S = {(2048, 4096): 3.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per size")
    args = parser.parse_args()
    simulate_image(SimulationParams(nx=64, ny=64))   # warm up imports and caches
    for nx, ny in SIZES:
        params = SimulationParams(nx=nx, ny=ny, pointing_error_arcsec=10.0,
                                  rotation_error_deg=0.3)
        times = []
        for seed in range(args.repeat):
            start = time.perf_counter()
            sim = simulate_image(dataclasses.replace(params, seed=seed))
            times.append(time.perf_counter() - start)
        n_stars = int(sim.stars["in_image"].sum())
        target = TARGET_S.get((nx, ny))
        verdict = "" if target is None else (" OK" if max(times) <= target else " TOO SLOW")
        print(f"simulate_image {nx:5d} x {ny:5d}: first {times[0]:6.3f} s, best {min(times):6.3f} s, "
              f"median {statistics.median(times):6.3f} s  ({n_stars} stars on the image, "
              f"{len(sim.galaxies)} galaxies, {int(sim.stars['saturated'].sum())} saturated)"
              + (f"  target <= {target} s{verdict}" if target else ""))


if __name__ == "__main__":
    main()
