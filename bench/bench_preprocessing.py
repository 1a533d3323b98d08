"""Time improc.preprocessing.preprocess on a DECam-CCD-sized raw frame.

A 4096 x 2048 uint16 data section with 56 prescan/overscan columns (4096 x 2104 raw), run with
and without bias, flat, linearity polynomial and bad-pixel mask, for each overscan method.
Prints the best of several runs in seconds.  Run from the repository root:

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


if __name__ == "__main__":
    main()
