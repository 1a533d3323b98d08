"""Benchmark: SeeChange's calibration against SExtractor + PSFEx + PSF-fitting SExtractor, side by side.

For each star density, one simulated 2048 x 4096 CCD (`bench_calibration.simulate_phase`: 0.26"
pixels, FWHM 1", cosmic rays, saturated stars, a Gaia catalog) is measured by both, in turn,
``--repeat`` times, each run a fresh process pinned to one CPU:

``SeeChange``
    the calibration steps' ``compute`` on arrays in memory (`bench_calibration.compute_phase`):
    background, extraction (detection, PSF fit, PSF and aperture photometry), astrometry against
    Gaia, zero point.  Reading the inputs is not counted.
``SExtractor``
    the toolchain the original SeeChange runs: ``source-extractor`` pass 1 (detection, aperture
    photometry, 35 x 35 vignettes into an LDAC catalog), ``psfex`` (a pixel PSF varying to second
    degree), ``source-extractor`` pass 2 with that PSF (PSF-fitting photometry).  Its astrometry
    (SCAMP) and zero point are left out, which favours it.  The configurations are in
    ``bench/sextractor/``, chosen to match SeeChange's defaults (detection threshold, minimum area,
    deblending, background mesh).

Printed: medians of the wall-clock seconds, the ratio, the peak RSS, the number of sources each
found, and SeeChange's seconds per 1000 sources.  The two programs are never runtime or test
dependencies; the script installs nothing and says so if they are not on the PATH (on Debian:
``apt-get install source-extractor psfex``; see docs/benchmarks.md).

Usage::

    python bench/bench_vs_sextractor.py [--star-density 10000 100000 300000] [--repeat 3]
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

HERE = Path(__file__).resolve().parent
CONFIGS = HERE / "sextractor"
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import bench_calibration as calibration  # noqa: E402

SEX = ("source-extractor", "sex")


def _tool(names: tuple[str, ...]) -> str | None:
    return next((shutil.which(n) for n in names if shutil.which(n)), None)


def _pinned() -> None:
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})


def _run_timed(args: list[str], cwd: Path) -> tuple[float, float]:
    """Run a program pinned to one CPU; (wall seconds, its peak RSS in MB)."""
    start = time.perf_counter()
    proc = subprocess.Popen(args, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            preexec_fn=_pinned)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{' '.join(args)} failed:\n{proc.stderr.read().decode(errors='replace')[-2000:]}")
    return seconds, usage.ru_maxrss / 1024.0


def write_sextractor_inputs(info: dict, folder: Path) -> dict:
    """The image and its weight as single-HDU files (SExtractor reads every HDU of a file)."""
    import numpy as np
    from astropy.io import fits

    with fits.open(info["image"], memmap=False) as hdul:
        header = hdul[0].header.copy()
        data = hdul[0].data.astype(np.float32)
        weight = hdul["WEIGHT"].data.astype(np.float32)
        weight[hdul["FLAGS"].data != 0] = 0.0
    fits.writeto(folder / "sex_image.fits", data, header, overwrite=True)
    fits.writeto(folder / "sex_weight.fits", weight, overwrite=True)
    return {"image": str(folder / "sex_image.fits"), "weight": str(folder / "sex_weight.fits"),
            "seeing": 1.0, "pixel_scale": 0.26}


def run_sextractor(sex: str, psfex: str, inputs: dict, work: Path) -> dict:
    """Pass 1, PSFEx, pass 2; seconds of each, peak RSS, sources of pass 2."""
    from astropy.table import Table

    for name in ("pass1.param", "pass2.param", "gauss_3x3.conv"):
        shutil.copy(CONFIGS / name, work / name)
    common = ["-WEIGHT_IMAGE", inputs["weight"], "-SEEING_FWHM", str(inputs["seeing"]),
              "-PIXEL_SCALE", str(inputs["pixel_scale"])]
    t1, m1 = _run_timed([sex, inputs["image"], "-c", str(CONFIGS / "pass1.sex"), "-CATALOG_NAME", "pass1.cat",
                         *common], work)
    t2, m2 = _run_timed([psfex, "pass1.cat", "-c", str(CONFIGS / "psfex.psfex"), "-PSF_DIR", str(work)], work)
    t3, m3 = _run_timed([sex, inputs["image"], "-c", str(CONFIGS / "pass2.sex"), "-CATALOG_NAME", "pass2.cat",
                         "-PSF_NAME", str(work / "pass1.psf"), *common], work)
    n = len(Table.read(work / "pass2.cat", hdu=2 if _is_ldac(work / "pass2.cat") else 1))
    return {"seconds": t1 + t2 + t3, "steps": [t1, t2, t3], "rss_mb": max(m1, m2, m3), "sources": n}


def _is_ldac(path: Path) -> bool:
    from astropy.io import fits

    with fits.open(path) as hdul:
        return len(hdul) > 2


def run_seechange(info: dict) -> dict:
    report = calibration.run_child("compute", info)
    steps = [s for s in calibration.COMPUTE_STEPS if s not in calibration.NOT_CALIBRATION]
    return {"seconds": sum(report["seconds"][s] for s in steps), "rss_mb": report["peak_rss_mb"],
            "sources": int(report["notes"]["sources"]), "steps": {s: report["seconds"][s] for s in steps}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--star-density", type=float, nargs="+", default=[10000.0, 100000.0, 300000.0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    sex, psfex = _tool(SEX), _tool(("psfex",))
    if sex is None or psfex is None:
        sys.exit("source-extractor and psfex are not on the PATH; this benchmark installs nothing "
                 "(Debian: apt-get install source-extractor psfex; see docs/benchmarks.md)")
    rows = []
    for density in args.star_density:
        with tempfile.TemporaryDirectory(prefix="bench_vs_sextractor_") as tmp:
            folder = Path(tmp)
            info = calibration.run_child("simulate", {"folder": str(folder), "seed": args.seed,
                                                      "star_density": density})["notes"]
            inputs = write_sextractor_inputs(info, folder)
            ours, theirs = [], []
            for k in range(args.repeat):
                ours.append(run_seechange(info))
                work = folder / f"sex_{k}"
                work.mkdir()
                theirs.append(run_sextractor(sex, psfex, inputs, work))
            t_ours = statistics.median(r["seconds"] for r in ours)
            t_theirs = statistics.median(r["seconds"] for r in theirs)
            rows.append((density, info["n_stars"], t_ours, t_theirs, max(r["rss_mb"] for r in ours),
                         max(r["rss_mb"] for r in theirs), ours[0]["sources"], theirs[0]["sources"],
                         {s: statistics.median(r["steps"][s] for r in ours) for s in ours[0]["steps"]},
                         [statistics.median(r["steps"][i] for r in theirs) for i in range(3)]))
            print(f"{density:g} stars/deg2 done", file=sys.stderr)
    print(f"\n2048 x 4096 simulated CCD, one pinned CPU each, medians of {args.repeat} runs (wall seconds)")
    print(f"{'stars/deg2':>10} {'on chip':>8} {'SeeChange':>10} {'SExtr+PSFEx':>12} {'ratio':>6} "
          f"{'RSS MB ours/theirs':>19} {'sources ours/theirs':>20} {'s per 1000 src':>15}")
    for density, n_stars, t_ours, t_theirs, m_ours, m_theirs, n_ours, n_theirs, steps, sx_steps in rows:
        print(f"{density:>10g} {n_stars:>8} {t_ours:>10.2f} {t_theirs:>12.2f} {t_ours / t_theirs:>6.2f} "
              f"{m_ours:>9.0f}/{m_theirs:<9.0f} {n_ours:>10}/{n_theirs:<9} {1000 * t_ours / max(n_ours, 1):>15.3f}")
        print(f"{'':>10}   ours: " + ", ".join(f"{s} {t:.2f}" for s, t in steps.items())
              + f"; theirs: pass 1 {sx_steps[0]:.2f}, psfex {sx_steps[1]:.2f}, pass 2 {sx_steps[2]:.2f}")
    print(json.dumps({"rows": [r[:8] for r in rows]}))


if __name__ == "__main__":
    main()
