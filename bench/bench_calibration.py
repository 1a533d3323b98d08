"""Benchmark: the calibration of one simulated 2048 x 4096 image, step by step, on one core.

Simulates an image of nx = 2048 by ny = 4096 pixels (0.26"/pixel, FWHM 1", a sky gradient,
cosmic rays, saturated stars with bleed trails, a header WCS off by 10" and 0.3 degree) and its
Gaia catalog, writes them to a temporary folder, then measures two phases:

``compute``
    Each step's pure ``compute`` on arrays in memory, as the pipeline calls it: backgrounding,
    extraction (detection, PSF fit, sky refinement, PSF and aperture photometry), astrocal
    (pattern match and TAN-SIP fit against Gaia), photocal (the step's catalog match, then the
    zero point fit).  Reading the FITS file and the catalog is timed apart ("read inputs").
``pipeline``
    ``ingest_file`` of the reduced file, then ``Pipeline.run(image)`` on SQLite in a temporary
    data root: the same steps plus the database, the product files and the catalog cache;
    "saving" is the rest of ``Pipeline.run`` (provenances, look-ups, ``save_and_commit``).

Every phase runs in a fresh child process pinned to one CPU (``sched_setaffinity``; numpy's,
OpenBLAS's and scipy.fft's threads then share it) of a parent that imports nothing heavy: Linux
carries a parent's RSS at fork into the child's ``ru_maxrss``.  Per step the table gives seconds
(best of ``--repeat`` runs), the process's peak RSS when the step ends (``ru_maxrss``), and, from
one more run under ``tracemalloc`` (slower, so its times are not used), the peak of memory that
Python and numpy held during the step.  Each child keeps its freed memory for reuse as the
``seechange`` command does (`util.memory.keep_freed_memory`); with the environment variable
``SEECHANGE_BENCH_RELEASE_MEMORY=1`` it leaves malloc as it is.  Targets: <= 5 s in total on
one core, peak <= 1 GB.

Usage (from anywhere)::

    python bench/bench_calibration.py [--star-density 10000] [--repeat 3]
                                      [--profile {compute,pipeline}] [--no-tracemalloc]
                                      [--all-cores] [--keep DIR]

``--profile PHASE`` first prints cProfile's 20 most expensive functions of that phase by own
time, and the 20 of ``improc`` and ``pipeline`` by cumulative time.
"""

from __future__ import annotations

import os

# One thread per library: set before numpy (or anything importing it) is loaded.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import tracemalloc  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

NX, NY = 2048, 4096
COMPUTE_STEPS = ("read inputs", "backgrounding", "extraction", "astrocal", "photocal")
PIPELINE_STEPS = ("ingest", "backgrounding", "extraction", "astrocal", "photocal", "saving")
NOT_CALIBRATION = ("read inputs", "ingest")


def _rss_mb() -> float:
    """Peak resident set size of this process so far, MB (Linux reports kB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# --- the parent: run the children, print the tables ---------------------------------------------


def run_child(phase: str, info: dict, *, trace: bool = False, profile: bool = False,
              all_cores: bool = False) -> dict:
    """Run one phase in a fresh interpreter; return its JSON report (printing a profile first)."""
    args = [sys.executable, str(Path(__file__).resolve()), "--child", phase, "--info", json.dumps(info)]
    args += ["--trace"] * trace + ["--profile", phase] * profile + ["--all-cores"] * all_cores
    out = subprocess.run(args, capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        sys.exit(f"the {phase} phase failed:\n{out.stderr.strip()}")
    *text, last = out.stdout.strip().splitlines()
    if text:
        print("\n".join(text))
    return json.loads(last)


def print_table(title: str, steps: tuple[str, ...], reports: list[dict], traced: dict | None) -> None:
    """Best time per step over ``reports``; RSS from the first; tracemalloc peaks from ``traced``."""
    seconds = {s: min(r["seconds"][s] for r in reports) for s in steps}
    rss = reports[0]["rss_mb"]
    print(f"\n{title}")
    print(f"  {'step':<15}{'seconds':>8}{'RSS at end MB':>15}{'traced peak MB':>16}")
    for step in steps:
        peak = f"{traced['trace_mb'][step]:.0f}" if traced and step in traced["trace_mb"] else "-"
        print(f"  {step:<15}{seconds[step]:>8.2f}{rss[step]:>15.0f}{peak:>16}")
    total = sum(seconds[s] for s in steps if s not in NOT_CALIBRATION)
    print(f"  {'calibration':<15}{total:>8.2f}   (sum without {' / '.join(s for s in NOT_CALIBRATION if s in steps)})")
    print(f"  peak RSS {reports[0]['peak_rss_mb']:.0f} MB, {reports[0]['import_rss_mb']:.0f} MB of it after "
          f"the imports" + (f"; tracemalloc peak {traced['trace_peak_mb']:.0f} MB" if traced else ""))
    for key, value in reports[0]["notes"].items():
        print(f"  {key}: {value}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--star-density", type=float, default=10000.0,
                        help="stars per square degree, G 14-23 (default: the simulator's 10000)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--repeat", type=int, default=3, help="runs of each phase; the best is shown")
    parser.add_argument("--profile", choices=("compute", "pipeline"), help="cProfile one phase first")
    parser.add_argument("--no-tracemalloc", action="store_true", help="skip the tracemalloc runs")
    parser.add_argument("--all-cores", action="store_true", help="do not pin the children to one CPU")
    parser.add_argument("--keep", type=Path, help="write the simulated files here and keep them")
    parser.add_argument("--child", choices=("simulate", "compute", "pipeline"), help=argparse.SUPPRESS)
    parser.add_argument("--info", help=argparse.SUPPRESS)
    parser.add_argument("--trace", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(args.child, json.loads(args.info), trace=args.trace, profile=bool(args.profile),
                   all_cores=args.all_cores)
        return

    with tempfile.TemporaryDirectory(prefix="bench_calibration_") as tmp:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        info = run_child("simulate", {"folder": str(folder), "seed": args.seed,
                                      "star_density": args.star_density})["notes"]
        cores = "all CPUs" if args.all_cores else "one CPU"
        print(f"simulated {NX} x {NY} (nx x ny) image, {args.star_density:g} stars/deg2: "
              f"{info['n_stars']} stars on the chip, {info['n_bright']} with S/N > 20; children on "
              f"{cores}, OMP/OPENBLAS/MKL threads = 1")
        if args.profile:
            run_child(args.profile, info, profile=True, all_cores=args.all_cores)
        for phase, title, steps in (("compute", "compute() of each step, arrays in memory", COMPUTE_STEPS),
                                    ("pipeline", "Pipeline.run on SQLite (database, files, catalog cache)",
                                     PIPELINE_STEPS)):
            reports = [run_child(phase, info, all_cores=args.all_cores) for _ in range(args.repeat)]
            traced = None if args.no_tracemalloc else run_child(phase, info, trace=True,
                                                                all_cores=args.all_cores)
            print_table(title, steps, reports, traced)


# --- the children -------------------------------------------------------------------------------


class Clock:
    """Per named step: seconds, peak RSS when it ends, and (if tracing) the traced peak during it."""

    def __init__(self, trace: bool) -> None:
        self.trace = trace
        self.seconds: dict[str, float] = {}
        self.rss_mb: dict[str, float] = {}
        self.trace_mb: dict[str, float] = {}

    def time(self, name: str, func, *args, **kwargs):
        if self.trace:
            tracemalloc.reset_peak()
        start = time.perf_counter()
        result = func(*args, **kwargs)
        self.seconds[name] = time.perf_counter() - start
        self.rss_mb[name] = _rss_mb()
        if self.trace:
            self.trace_mb[name] = tracemalloc.get_traced_memory()[1] / 2**20
        return result


def child_main(phase: str, info: dict, *, trace: bool, profile: bool, all_cores: bool) -> None:
    """Run one phase and print its report as one JSON line (after a profile, if asked)."""
    if not all_cores and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    if os.environ.get("SEECHANGE_BENCH_RELEASE_MEMORY") != "1":
        from util.memory import keep_freed_memory

        keep_freed_memory()     # as the seechange command does (util/memory.py)
    import numpy  # noqa: F401  (imports first, so that they count in the baseline, not the phase)
    import astropy.table  # noqa: F401
    import pipeline.top  # noqa: F401
    import pipeline.photo_cal  # noqa: F401

    import_rss = _rss_mb()
    if trace:
        tracemalloc.start()
    if profile:
        import cProfile
        import pstats

        profiler = cProfile.Profile()
        profiler.enable()
    clock = Clock(trace)
    notes = {"simulate": simulate_phase, "compute": compute_phase, "pipeline": pipeline_phase}[phase](info, clock)
    if profile:
        profiler.disable()
        stats = pstats.Stats(profiler, stream=sys.stdout)
        stats.sort_stats("tottime").print_stats(20)
        stats.sort_stats("cumulative").print_stats(r"improc|pipeline", 20)
    trace_peak = max(clock.trace_mb.values(), default=0.0)  # tracemalloc sees Pipeline.run whole
    print(json.dumps({"seconds": clock.seconds, "rss_mb": clock.rss_mb, "trace_mb": clock.trace_mb,
                      "notes": notes, "import_rss_mb": import_rss, "peak_rss_mb": _rss_mb(),
                      "trace_peak_mb": trace_peak}))


def simulate_phase(info: dict, clock: Clock) -> dict:
    """Write the reduced image file and the Gaia folder; return what the other phases need."""
    from improc.simulator import SimulationParams, simulate_image
    from models.instruments.synthetic import write_simulated_file
    from util.gaia import write_gaia_folder

    folder = Path(info["folder"])
    params = SimulationParams(nx=NX, ny=NY, seed=info["seed"], star_density=info["star_density"],
                              pointing_error_arcsec=10.0, rotation_error_deg=0.3)
    sim = clock.time("simulate", simulate_image, params)
    path = write_simulated_file(sim, folder / "image.fits", raw=False)
    write_gaia_folder(sim.gaia, folder / "gaia")
    inside = sim.stars["in_image"]
    return {"image": str(path), "gaia": str(folder / "gaia"), "n_stars": int(inside.sum()),
            "n_bright": int((inside & (sim.stars["snr"] > 20)).sum()), "zero_point": params.zero_point}


def _read_inputs(info: dict):
    """The image, its bad-pixel mask, header and WCS, and the Gaia stars around the image."""
    import numpy as np
    from astropy.io import fits
    from astropy.wcs import WCS

    from util.gaia import read_gaia_folder

    with fits.open(info["image"], memmap=False) as hdul:
        header = hdul[0].header
        data = hdul[0].data.astype(np.float32)
        mask = (hdul["FLAGS"].data != 0) | (hdul["WEIGHT"].data <= 0) | ~np.isfinite(data)
    wcs = WCS(header)
    ra, dec = wcs.pixel_to_world_values([0, NX - 1, 0, NX - 1], [0, 0, NY - 1, NY - 1])
    pad = 120.0 / 3600.0
    catalog = read_gaia_folder(info["gaia"], ra_min=ra.min() - pad, ra_max=ra.max() + pad,
                               dec_min=dec.min() - pad, dec_max=dec.max() + pad)
    return data, mask, header, wcs, catalog


def compute_phase(info: dict, clock: Clock) -> dict:
    """Each step's compute on arrays; the photocal catalog match is the step's own."""
    import numpy as np

    from pipeline.astro_cal import AstroCalibrator
    from pipeline.backgrounding import Backgrounder
    from pipeline.catalogs import stars_at_epoch
    from pipeline.extraction import Extractor
    from pipeline.photo_cal import PhotoCalibrator
    from util.config import Config

    config = Config.load()
    data, mask, header, wcs, catalog = clock.time("read inputs", _read_inputs, info)
    bg = clock.time("backgrounding", Backgrounder(config=config).compute, data, mask=mask)
    ext = clock.time("extraction", lambda: Extractor(config=config).compute(
        data, background=bg.counts(), variance=bg.variance(), mask=mask, gain=float(header["GAIN"]),
        saturation=float(header["SATURATE"])))
    table = ext.sources
    astro = AstroCalibrator(config=config)
    good = (np.asarray(table["flags"]) == 0) & (np.asarray(table["snr"]) >= astro.params.min_snr)
    x, y, flux = (np.asarray(table[c], float) for c in ("x", "y", "psfflux"))
    mjd = float(header["MJD-OBS"])
    solution = clock.time("astrocal", astro.compute, x[good], y[good], flux[good], catalog, mjd=mjd,
                          wcs_guess=wcs, image_shape=data.shape)

    def photocal():
        from improc.photometric_calibration import calibrate_photometry
        from models.instrument import get_instrument

        params = PhotoCalibrator(config=config).params
        ra, dec = solution.wcs.pixel_to_world_values(x, y)
        n_ap = len(ext.aper_radii)
        return calibrate_photometry(
            flux, np.asarray(table["psffluxerr"], float),
            np.column_stack([np.asarray(table[f"apflux_{i}"], float) for i in range(n_ap)]),
            apflux_errs=np.column_stack([np.asarray(table[f"apfluxerr_{i}"], float) for i in range(n_ap)]),
            flags=np.asarray(table["flags"]), size=np.asarray(table["fwhm"], float), ra=ra, dec=dec,
            fwhm_pixels=ext.fwhm_pixels, catalog_ra=cat_ra, catalog_dec=cat_dec,
            catalog_g=np.asarray(catalog["phot_g_mean_mag"], float),
            catalog_bp=np.asarray(catalog["phot_bp_mean_mag"], float),
            catalog_rp=np.asarray(catalog["phot_rp_mean_mag"], float),
            transform=get_instrument("Synthetic").transforms.get(header["FILTER"]),
            sky_rms=bg.median_rms, psf_stamp=ext.psf.get_clip(NX / 2, NY / 2),
            **params.kwargs_for(calibrate_photometry))

    cat_ra, cat_dec = stars_at_epoch(catalog, mjd)
    zp = clock.time("photocal", photocal)
    return {"sources": len(table), "PSF stars": int(table["is_psf_star"].sum()),
            "FWHM px": round(ext.fwhm_pixels, 2), "WCS rms arcsec": round(float(solution.rms_arcsec), 4),
            "WCS matches": int(solution.n_matches),
            "zero point": f"{zp.fit.zp:.3f} (true {info['zero_point']}), {zp.fit.n_stars} stars"}


def pipeline_phase(info: dict, clock: Clock) -> dict:
    """ingest_file, then Pipeline.run(image) on SQLite in a temporary data root."""
    from models.base import forget_engine
    from models.context import Context
    from models.image import ingest_file
    from models.schema import upgrade
    from pipeline.top import Pipeline
    from util.config import Config

    with tempfile.TemporaryDirectory(prefix="bench_pipeline_") as tmp:
        root = Path(tmp)
        catalog = {"catalog": "gaia_folder", "catalog_folder": info["gaia"]}
        context = Context.from_config(Config.load(**{
            "db.url": f"sqlite:///{root / 'bench.sqlite'}", "storage.data_root": str(root / "data"),
            "astrocal": catalog, "photocal": dict(catalog)}))
        engine = context.engine
        upgrade(engine)
        pipe = Pipeline(context)
        _, images = clock.time("ingest", ingest_file, info["image"], context=context)
        ds = clock.time("run", pipe.run, images[0])
        steps = PIPELINE_STEPS[1:-1]
        for name in steps:  # the steps' own numbers, from Step.__call__
            clock.seconds[name] = ds.stats[name]["seconds"]
            clock.rss_mb[name] = ds.stats[name]["peak_rss_mb"]
        clock.seconds["saving"] = clock.seconds.pop("run") - sum(clock.seconds[s] for s in steps)
        clock.rss_mb["saving"] = clock.rss_mb.pop("run")
        files = sum(p.stat().st_size for p in (root / "data").rglob("*") if p.is_file())
        forget_engine(engine)
    return {"zero point": f"{ds.get_zp().zp:.3f} (true {info['zero_point']})",
            "data root": f"{files / 2**20:.0f} MB of files (exposure copy, image, products, catalogs)"}


if __name__ == "__main__":
    main()
