"""Benchmark: alignment and ZOGY subtraction of a simulated 2048 x 4096 pair on one core, and peers.

Simulates one scene twice (`improc.simulator`): a reference (seeing 0.9", 3x deeper: 3x the sky
and the counts) and a new image (seeing 1.4", pointed 3.3" away and turned by 1 degree; the
simulator has no rotation parameter, so its true WCS is turned here), both with the same
detector's bad columns and their own cosmic rays, and 200 transients in the new image.  The
PSFs given to the subtractions are the true ones as `improc.psf.PixelPSF` models (degree-2
polynomials fitted to true stamps on a 5 x 9 grid), so that only the subtractions differ.

Phases, each in a fresh child process pinned to one CPU (``sched_setaffinity``) with
OMP/OPENBLAS/MKL/NUMBA threads = 1:

``ours``
    `improc.alignment.warp_image` of the reference (data, weight, flags) with the true WCSs,
    `improc.zogy.zogy_subtract` (the reference PSF on the new grid through
    `improc.alignment.psf_on_grid` at each tile centre) and `improc.zogy.detect_peaks`.
    Each child runs them twice: the first run pays the page faults of fresh arrays, as the
    pipeline does for every image.
``stdpipe``
    ``stdpipe.subtraction.run_zogy`` on our warped reference (it does not align) with the same
    PSFs (as PSFEx-like dictionaries of the reference PSF on the new grid), noise maps, flux
    ratio and astrometric noise, no flux or shift fitting, 8 x 16 sub-images overlapping by
    50 pixels (as our 256-pixel tiles); bad pixels of either image set to 0 with the median
    error (run_zogy itself transforms masked pixels' values).
``sfft``
    The ``sfft`` package's CPU (``Numpy`` backend) path, ``SingleSFFTConfigure.SSC`` (numba
    compilation, timed apart) and ``GeneralSFFTSubtract.GSS``, convolving the (sharper)
    warped reference: kernel half-width 11 pixels, kernel and background polynomials of
    degree 2, a constant flux ratio; bad pixels of either image set to 0.  On the whole pair
    it needs more than 22 GB (the kernel OOM-killed it at 24 GB RSS on this 23 GB machine), so
    it runs on the central 1024 x 1024 under a 10 GB address-space cap, and our ZOGY is timed
    on the same cut-out in the same process for the ratio.
``reproject``
    ``reproject.reproject_interp`` (bicubic) of the reference's data alone, for comparison with
    `warp_image` (which warps data, weight and flags).

Noise, measured in the same source-free pixels (15 pixels or more from every star, transient
and galaxy, unflagged in both images): the standard deviation of the difference image (ADU of
the new image) divided by ``sqrt(sigma_n^2 + (sigma_r / F_r)^2)``, the white noise of a proper
difference image; the standard deviation of least-squares PSF fluxes (each method's difference
PSF) at 3000 random source-free positions, ADU of the new image (what detection and photometry
see; the lower the better); and the standard deviation of S_corr for the ZOGYs.

Usage::

    python bench/bench_subtraction.py [--repeat 3] [--peers stdpipe sfft reproject]
                                      [--all-cores] [--keep DIR]

Targets: alignment + ZOGY <= ~3 s on one core (ZOGY alone <= 2 s), peak RSS <= 2 GB; ZOGY at
least 5x faster than a peer's ZOGY with equal or better noise.
"""

from __future__ import annotations

import os

# One thread per library: set before numpy (or anything importing it) is loaded.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

NX, NY = 2048, 4096
DEPTH = 3.0
ROTATION_DEG = 1.0
SHIFT_ARCSEC = (2.7, -1.9)
ASTROMETRIC_SIGMA = (0.02, 0.02)
PEERS = ("stdpipe", "sfft", "reproject")
TIMEOUT_S = 3600
#: sfft's Numpy backend runs on a central cut-out of this side, under this address-space cap.
SFFT_SIZE = 1024
SFFT_MEMORY_GB = 10.0


def _rss_mb() -> float:
    """Peak resident set size of this process so far, MB (Linux reports kB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# --- the parent ---------------------------------------------------------------------------------


def run_child(phase: str, folder: Path, *, all_cores: bool) -> dict | None:
    """Run one phase in a fresh interpreter; its JSON report, or None (with the reason printed)."""
    args = [sys.executable, str(Path(__file__).resolve()), "--child", phase, "--keep", str(folder)]
    args += ["--all-cores"] * all_cores
    try:
        out = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        print(f"{phase}: no result within {TIMEOUT_S} s")
        return None
    if out.returncode != 0:
        print(f"{phase} failed:\n{out.stderr.strip()[-3000:]}")
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="child runs of our phase (median shown)")
    parser.add_argument("--peers", nargs="*", default=list(PEERS), choices=PEERS)
    parser.add_argument("--all-cores", action="store_true", help="do not pin the children to one CPU")
    parser.add_argument("--keep", type=Path, help="write the simulated pair here and keep it")
    parser.add_argument("--child", choices=("simulate", "ours") + PEERS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(args.child, args.keep, all_cores=args.all_cores)
        return
    with tempfile.TemporaryDirectory(prefix="bench_subtraction_") as tmp:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        info = run_child("simulate", folder, all_cores=args.all_cores)
        if info is None:
            sys.exit("the simulation failed")
        print(f"simulated pair {NX} x {NY} (nx x ny): {info['notes']}")
        ours = [r for r in (run_child("ours", folder, all_cores=args.all_cores)
                            for _ in range(args.repeat)) if r]
        if not ours:
            sys.exit("our phase failed")
        peers = {name: run_child(name, folder, all_cores=args.all_cores) for name in args.peers}
        print_report(ours, peers, all_cores=args.all_cores)


def print_report(ours: list[dict], peers: dict, *, all_cores: bool) -> None:
    """Medians of our runs, each peer's run, and the ratios."""
    def median(key: str) -> float:
        return statistics.median(r["seconds"][key] for r in ours)

    cores = "all CPUs" if all_cores else "one CPU"
    print(f"\nours ({len(ours)} fresh processes on {cores}; first run / second run in each, "
          "medians):")
    for key in ("warp", "zogy", "detect"):
        print(f"  {key:<8}{median(key + ' 1'):>7.2f} s /{median(key + ' 2'):>6.2f} s")
    total1 = median("warp 1") + median("zogy 1")
    total2 = median("warp 2") + median("zogy 2")
    print(f"  {'warp+zogy':<8}{total1:>6.2f} s /{total2:>6.2f} s   (target <= ~3 s; ZOGY <= 2 s)")
    print(f"  CPU time of warp+zogy+detect {median('cpu 1'):.2f} s / {median('cpu 2'):.2f} s "
          "(wall minus time other processes took from the CPU)")
    print(f"  peak RSS {max(r['peak_rss_mb'] for r in ours):.0f} MB "
          f"({ours[0]['input_rss_mb']:.0f} MB after imports and reading the inputs)")
    for key, value in ours[0]["notes"].items():
        print(f"  {key}: {value}")
    zogy = median("zogy 1")
    noise = ours[0]["noise"]
    print(f"\n{'method':<22}{'seconds':>9}{'x ours':>8}{'peak RSS MB':>13}{'D std/white':>13}"
          f"{'PSF-flux std ADU':>18}{'S_corr std':>12}")
    print(f"{'ours (ZOGY)':<22}{zogy:>9.2f}{1.0:>8.1f}{max(r['peak_rss_mb'] for r in ours):>13.0f}"
          f"{noise['d_norm_std']:>13.3f}{noise['psf_flux_std']:>18.1f}{noise['scorr_std']:>12.3f}")
    for name, report in peers.items():
        if report is None:
            print(f"{name:<22}{'(no result, see above)':>30}")
            continue
        seconds = report["seconds"]["subtract"]
        n = report.get("noise", {})
        label = {"stdpipe": "stdpipe run_zogy", "sfft": "sfft (1024^2 cut-out)",
                 "reproject": "reproject (data only)"}[name]
        ref = {"reproject": median("warp 1"), "sfft": report["seconds"].get("ours same size")}.get(name, zogy)
        cells = [f"{n[k]:.3f}" if k in n else "-" for k in ("d_norm_std",)]
        cells += [f"{n[k]:.1f}" if k in n else "-" for k in ("psf_flux_std",)]
        cells += [f"{n[k]:.3f}" if k in n else "-" for k in ("scorr_std",)]
        print(f"{label:<22}{seconds:>9.2f}{seconds / ref:>8.1f}{report['peak_rss_mb']:>13.0f}"
              f"{cells[0]:>13}{cells[1]:>18}{cells[2]:>12}")
        for key, value in report.get("notes", {}).items():
            print(f"{'':<4}{key}: {value}")
    print("\n'x ours': seconds over our ZOGY's on the same images (reproject: over our warp of data, "
          "weight and flags).")


# --- the children -------------------------------------------------------------------------------


def child_main(phase: str, folder: Path, *, all_cores: bool) -> None:
    """Run one phase and print its report as one JSON line."""
    if not all_cores and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    import numpy  # noqa: F401

    report = {"simulate": simulate_phase, "ours": ours_phase, "stdpipe": stdpipe_phase,
              "sfft": sfft_phase, "reproject": reproject_phase}[phase](folder)
    report["peak_rss_mb"] = _rss_mb()
    print(json.dumps(report))


def _fit_pixel_psf(render, shape: tuple[int, int], degree: int = 2):
    """A PixelPSF of degree ``degree`` fitted to stamps ``render(x, y)`` on a 5 x 9 grid."""
    import numpy as np

    from improc.psf import PixelPSF, monomials

    ny, nx = shape
    xs, ys = np.meshgrid(np.linspace(0, nx - 1, 5), np.linspace(0, ny - 1, 9))
    stamps = np.array([render(x, y) for x, y in zip(xs.ravel(), ys.ravel())])
    x0, y0, sx, sy = (nx - 1) / 2.0, (ny - 1) / 2.0, nx / 2.0, ny / 2.0
    design = monomials((xs.ravel() - x0) / sx, (ys.ravel() - y0) / sy, degree)
    coeffs, *_ = np.linalg.lstsq(design, stamps.reshape(len(stamps), -1), rcond=None)
    return PixelPSF(basis=coeffs.reshape(-1, *stamps.shape[1:]), degree=degree, x0=x0, y0=y0,
                    xscale=sx, yscale=sy, image_shape=shape)


def simulate_phase(folder: Path) -> dict:
    """Simulate the pair; save the arrays, WCS headers, PSF models and the source-free mask."""
    import dataclasses

    import numpy as np
    from astropy.table import Table

    from improc.alignment import psf_on_grid, warp_image
    from improc.simulator import SimulationParams, simulate_image

    base = SimulationParams(nx=NX, ny=NY, seed=7, scene_seed=7, detector_seed=7, mjd=60000.5)
    ref_p = dataclasses.replace(base, seed=8, fwhm_arcsec=0.9, sky_adu=1000.0 * DEPTH,
                                zero_point=31.0 + 2.5 * np.log10(DEPTH))
    ref = simulate_image(ref_p)
    east, north = SHIFT_ARCSEC
    new_p = dataclasses.replace(base, seed=9, fwhm_arcsec=1.4, mjd=60001.5,
                                ra=base.ra + east / 3600.0 / np.cos(np.deg2rad(base.dec)),
                                dec=base.dec + north / 3600.0)
    rng = np.random.default_rng(7)
    from improc.sim_wcs import rotated_true_wcs

    with rotated_true_wcs(ROTATION_DEG) as make:
        wcs = make(NX, NY, ra=new_p.ra, dec=new_p.dec, pixel_scale=new_p.pixel_scale,
                   sip_amplitude_pix=new_p.sip_amplitude_pix)
        x, y = rng.uniform(50, NX - 50, 200), rng.uniform(50, NY - 50, 200)
        ra, dec = wcs.all_pix2world(x, y, 0)
        transients = Table({"ra": ra, "dec": dec, "mag": rng.uniform(20.5, 23.5, 200)})
        new = simulate_image(new_p, stars=ref.star_catalog, galaxies=ref.galaxies,
                             transients=transients)
    shape = new.data.shape
    psf_new = _fit_pixel_psf(new.psf, shape)
    psf_ref = _fit_pixel_psf(ref.psf, shape)
    grid_psf = _fit_pixel_psf(lambda x, y: psf_on_grid(psf_ref, x, y, source_wcs=ref.true_wcs,
                                                       target_wcs=new.true_wcs), shape)
    warped = warp_image(ref.data - ref.sky, ref.weight, ref.flags, source_wcs=ref.true_wcs,
                        target_wcs=new.true_wcs, target_shape=shape)
    free = _source_free(new, warped)
    np.savez(folder / "pair.npz", ref_data=(ref.data - ref.sky).astype(np.float32),
             ref_weight=ref.weight, ref_flags=ref.flags,
             new_data=(new.data - new.sky).astype(np.float32), new_weight=new.weight,
             new_flags=new.flags, free=free, warped_data=warped.data,
             warped_white_weight=warped.white_weight, warped_flags=warped.flags,
             **{f"psf_new_{k}": v for k, v in psf_new.to_arrays().items()},
             **{f"psf_ref_{k}": v for k, v in psf_ref.to_arrays().items()},
             **{f"grid_psf_{k}": v for k, v in grid_psf.to_arrays().items()})
    (folder / "ref_wcs.txt").write_text(ref.true_wcs.to_header_string(relax=True))
    (folder / "new_wcs.txt").write_text(new.true_wcs.to_header_string(relax=True))
    flux_ratio = 10 ** (0.4 * (ref_p.zero_point - new_p.zero_point))
    (folder / "info.json").write_text(json.dumps({"flux_ratio": flux_ratio}))
    inside = new.stars["in_image"]
    return {"notes": f"{int(inside.sum())} stars, {len(new.galaxies)} galaxies, 200 transients; "
                     f"source-free pixels {free.mean():.0%}; flux ratio F_r/F_n {flux_ratio:.2f}"}


def _source_free(new, warped):
    """Pixels where no star, transient or galaxy adds 0.5 sigma (and 15 pixels or more from
    their centres), unflagged in both images (dilated by 10 pixels), 30 pixels from the edges."""
    import numpy as np
    from scipy import ndimage

    ny, nx = new.data.shape
    sigma = 1.0 / np.sqrt(np.median(new.weight))
    stamp = new.psf(nx / 2, ny / 2)
    h = stamp.shape[0] // 2
    yy, xx = np.mgrid[-h:h + 1, -h:h + 1]
    distance = np.hypot(xx, yy).ravel()
    profile = stamp.ravel() / stamp.max()
    near = np.zeros((ny, nx), bool)
    sources = [(new.stars[new.stars["snr"] > 1], new.stars["peak_adu"][new.stars["snr"] > 1]),
               (new.transients, new.transients["peak_adu"])]
    for table, peaks in sources:
        for x, y, peak in zip(table["x"], table["y"], peaks):
            reach = distance[profile * peak > 0.5 * sigma]
            r = int(max(15, reach.max() if reach.size else 0))
            box = np.s_[max(0, int(y) - r):int(y) + r + 1, max(0, int(x) - r):int(x) + r + 1]
            near[box] = True
    gy, gx = np.mgrid[0:ny, 0:nx]
    for g in new.galaxies:
        r = 15 + 5 * g["r_eff_arcsec"] / 0.26
        box = np.s_[max(0, int(g["y"] - r)):int(g["y"] + r) + 1, max(0, int(g["x"] - r)):int(g["x"] + r) + 1]
        near[box] |= np.hypot(gx[box] - g["x"], gy[box] - g["y"]) < r
    flagged = ndimage.maximum_filter((new.flags != 0) | (warped.flags != 0), size=21)
    free = ~near & ~flagged
    free[:30] = free[-30:] = False
    free[:, :30] = free[:, -30:] = False
    return free


def _load(folder: Path) -> dict:
    import numpy as np
    from astropy.io import fits
    from astropy.wcs import WCS

    from improc.psf import PixelPSF

    with np.load(folder / "pair.npz") as z:
        arrays = {k: z[k] for k in z.files}
    for name in ("psf_new", "psf_ref", "grid_psf"):
        arrays[name] = PixelPSF.from_arrays({k[len(name) + 1:]: v for k, v in arrays.items()
                                             if k.startswith(name + "_")})
    for name in ("ref", "new"):
        arrays[f"{name}_wcs"] = WCS(fits.Header.fromstring((folder / f"{name}_wcs.txt").read_text()))
    arrays.update(json.loads((folder / "info.json").read_text()))
    return arrays


def _noise(diff, psf_stamp, free, new_weight, ref_weight, flux_ratio, score=None) -> dict:
    """Normalized std of the difference, std of PSF fluxes at random free positions, S_corr std."""
    import numpy as np

    sigma_n2 = 1.0 / np.median(new_weight[free])
    sigma_r2 = 1.0 / np.median(ref_weight[free])
    white = np.sqrt(sigma_n2 + sigma_r2 / flux_ratio**2)
    h = psf_stamp.shape[0] // 2
    iy, ix = np.nonzero(free)
    rng = np.random.default_rng(0)
    pick = rng.choice(iy.size, 20000, replace=False)
    iy, ix = iy[pick], ix[pick]
    inside = (iy >= h) & (iy < free.shape[0] - h) & (ix >= h) & (ix < free.shape[1] - h)
    iy, ix = iy[inside][:3000], ix[inside][:3000]
    offsets = np.arange(-h, h + 1)
    stamps = diff[iy[:, None, None] + offsets[None, :, None], ix[:, None, None] + offsets[None, None, :]]
    p = psf_stamp / psf_stamp.sum()
    fluxes = (stamps * p).sum(axis=(1, 2)) / (p * p).sum()
    out = {"d_norm_std": float(np.nanstd(diff[free]) / white), "psf_flux_std": float(np.nanstd(fluxes))}
    if score is not None:
        out["scorr_std"] = float(np.nanstd(score[free]))
        out["scorr_nan"] = int(np.count_nonzero(~np.isfinite(score[free])))
    return out


def ours_phase(folder: Path) -> dict:
    """warp_image + zogy_subtract + detect_peaks, twice in this process."""
    import numpy as np

    import functools

    from improc.alignment import local_jacobian, psf_on_grid, warp_image, warp_noise_power
    from improc.zogy import detect_peaks, zogy_subtract

    d = _load(folder)
    input_rss = _rss_mb()
    seconds = {}
    for run in (1, 2):
        cpu = time.process_time()
        start = time.perf_counter()
        warped = warp_image(d["ref_data"], d["ref_weight"], d["ref_flags"], source_wcs=d["ref_wcs"],
                            target_wcs=d["new_wcs"], target_shape=d["new_data"].shape)
        seconds[f"warp {run}"] = time.perf_counter() - start
        start = time.perf_counter()
        psf_ref, ref_wcs, new_wcs = d["psf_ref"], d["ref_wcs"], d["new_wcs"]
        jacobian = local_jacobian(NX / 2, NY / 2, source_wcs=ref_wcs, target_wcs=new_wcs)
        result = zogy_subtract(
            d["new_data"], warped.data, new_weight=d["new_weight"], ref_weight=warped.white_weight,
            new_flags=d["new_flags"], ref_flags=warped.flags, new_psf=d["psf_new"],
            ref_psf=lambda x, y: psf_on_grid(psf_ref, x, y, source_wcs=ref_wcs, target_wcs=new_wcs),
            flux_ratio=d["flux_ratio"],
            ref_noise_power=functools.partial(warp_noise_power, jacobian=jacobian),
            astrometric_sigma=ASTROMETRIC_SIGMA)
        seconds[f"zogy {run}"] = time.perf_counter() - start
        start = time.perf_counter()
        peaks = detect_peaks(result.score_corr, threshold=5.0, mask=result.flags != 0)
        seconds[f"detect {run}"] = time.perf_counter() - start
        seconds[f"cpu {run}"] = time.process_time() - cpu
        if run == 1:
            del warped
    noise = _noise(result.data, result.psf_at(NX / 2, NY / 2), d["free"], d["new_weight"],
                   d["warped_white_weight"], d["flux_ratio"], result.score_corr)
    return {"seconds": seconds, "noise": noise, "input_rss_mb": input_rss,
            "notes": {"tiles": f"{len(result.tiles)} of at most {int(np.max(np.diff(result.tiles[:, :2])))} px a side, windows with margins",
                      "peaks |S_corr| >= 5": len(peaks),
                      "flagged fraction of D": f"{(result.flags != 0).mean():.3f}"}}


def _stdpipe_psf(psf, fwhm: float) -> dict:
    """A PixelPSF as the PSFEx-like dictionary of stdpipe.psf (sampling 1, same polynomial)."""
    import numpy as np

    return {"data": np.array(psf.basis), "width": psf.size, "height": psf.size,
            "ncoeffs": psf.basis.shape[0], "fwhm": fwhm, "sampling": 1.0, "degree": psf.degree,
            "x0": psf.x0, "sx": psf.xscale, "y0": psf.y0, "sy": psf.yscale}


def stdpipe_phase(folder: Path) -> dict:
    """stdpipe.subtraction.run_zogy on our warped reference, 8 x 16 sub-images."""
    import io

    import numpy as np
    from stdpipe.subtraction import run_zogy

    d = _load(folder)
    # run_zogy uses masks only for its backgrounds and puts the data of masked pixels into its
    # transforms: give it the union of bad pixels set to 0 with a neutral (median) error
    bad = ((d["new_flags"] != 0) | ~(d["new_weight"] > 0) | (d["warped_flags"] != 0)
           | ~(d["warped_white_weight"] > 0))
    errors = []
    for weight in (d["new_weight"], d["warped_white_weight"]):
        err = 1 / np.sqrt(np.where(bad, 1.0, weight))
        err[bad] = np.median(err[~bad])
        errors.append(err)
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        diff, score, psf_d = run_zogy(
            np.where(bad, 0.0, d["new_data"]), np.where(bad, 0.0, d["warped_data"]), mask=bad,
            template_mask=bad, err=errors[0], template_err=errors[1],
            image_psf=_stdpipe_psf(d["psf_new"], 5.4), template_psf=_stdpipe_psf(d["grid_psf"], 3.5),
            scale=d["flux_ratio"], fit_scale=False, fit_shift=False, dx=ASTROMETRIC_SIGMA[0],
            dy=ASTROMETRIC_SIGMA[1], nx=8, ny=16, overlap=50, get_psf=True, nthreads=1)
    seconds = time.perf_counter() - start
    noise = _noise(diff, psf_d, d["free"], d["new_weight"], d["warped_white_weight"],
                   d["flux_ratio"], score)
    # run_zogy returns the P_D of its last sub-image only: fluxes with ours at the centre too
    _, ours_noise, ours_psf = _ours_on(d, psf_only=True)
    other = _noise(diff, ours_psf, d["free"], d["new_weight"], d["warped_white_weight"],
                   d["flux_ratio"])
    import stdpipe

    return {"seconds": {"subtract": seconds}, "noise": noise,
            "notes": {"version": getattr(stdpipe, "__version__", "?"),
                      "S_corr NaN in source-free pixels": noise.pop("scorr_nan"),
                      "PSF-flux std with our central P_D": f"{other['psf_flux_std']:.1f} ADU"}}


def sfft_phase(folder: Path) -> dict:
    """The sfft package's Numpy backend (SSC: numba compilation; GSS) on a central cut-out, our
    ZOGY on the same cut-out, under a memory cap."""
    import numpy as np

    cap = int(SFFT_MEMORY_GB * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    from sfft.sfftcore.SFFTConfigure import SingleSFFTConfigure
    from sfft.sfftcore.SFFTSubtract import GeneralSFFTSubtract

    d = _cutout(_load(folder), SFFT_SIZE)
    bad = ((d["new_flags"] != 0) | ~(d["new_weight"] > 0) | (d["warped_flags"] != 0)
           | ~(d["warped_white_weight"] > 0))
    # sfft works on (x, y) arrays; I (convolved) is the sharper reference, J the new image
    image_i = np.ascontiguousarray(np.where(bad, 0.0, d["warped_data"]).T, np.float64)
    image_j = np.ascontiguousarray(np.where(bad, 0.0, d["new_data"]).T, np.float64)
    start = time.perf_counter()
    config = SingleSFFTConfigure.SSC(NX=image_i.shape[0], NY=image_i.shape[1], KerHW=11,
                                     KerPolyOrder=2, BGPolyOrder=2, ConstPhotRatio=True,
                                     BACKEND_4SUBTRACT="Numpy", NUM_CPU_THREADS_4SUBTRACT=1,
                                     NUMBA_CACHE=False, VERBOSE_LEVEL=0)
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    out = GeneralSFFTSubtract.GSS(PixA_I=image_i, PixA_J=image_j, PixA_mI=image_i,
                                  PixA_mJ=image_j, SFFTConfig=config, ContamMask_I=None,
                                  BACKEND_4SUBTRACT="Numpy", NUM_CPU_THREADS_4SUBTRACT=1,
                                  VERBOSE_LEVEL=0)
    seconds = time.perf_counter() - start
    diff = np.ascontiguousarray(out[1].T)
    del out, config, image_i, image_j
    ny, nx = diff.shape
    noise = _noise(diff, d["psf_new"].image_at(nx / 2, ny / 2), d["free"], d["new_weight"],
                   d["warped_white_weight"], d["flux_ratio"])
    ours_s, ours_noise, _ = _ours_on(d)
    import sfft

    return {"seconds": {"subtract": seconds, "ours same size": ours_s}, "noise": noise,
            "notes": {"version": getattr(sfft, "__version__", "?"),
                      "size": f"central {nx} x {ny} cut-out (the whole pair needs more than "
                              f"the {SFFT_MEMORY_GB:g} GB cap: it was OOM-killed at 24 GB here)",
                      "numba compilation (not in 'seconds')": f"{compile_s:.1f} s",
                      "ours on the same cut-out": f"{ours_s:.2f} s (sfft {seconds / ours_s:.0f}x "
                                                  f"slower), D std/white "
                                                  f"{ours_noise['d_norm_std']:.3f}, PSF-flux std "
                                                  f"{ours_noise['psf_flux_std']:.1f} ADU",
                      "difference": "new - K (x) reference: the new image's PSF, correlated noise "
                                    "(its pixel std is not that of a white image)"}}


def _cutout(d: dict, size: int) -> dict:
    """The central size x size part of every image of ``d`` (PSFs keep their full-chip models,
    so the cut-out's PSFs are evaluated at its own pixels through shifted models)."""
    import numpy as np

    from improc.psf import PixelPSF

    y0, x0 = (NY - size) // 2, (NX - size) // 2
    out = dict(d)
    for key, value in d.items():
        if isinstance(value, np.ndarray) and value.shape == (NY, NX):
            out[key] = np.ascontiguousarray(value[y0:y0 + size, x0:x0 + size])
    for key in ("psf_new", "psf_ref", "grid_psf"):
        psf = d[key]
        out[key] = PixelPSF(basis=psf.basis, degree=psf.degree, x0=psf.x0 - x0, y0=psf.y0 - y0,
                            xscale=psf.xscale, yscale=psf.yscale, image_shape=(size, size))
    out["cut_origin"] = (y0, x0)
    return out


def _ours_on(d: dict, psf_only: bool = False) -> tuple[float, dict, np.ndarray]:
    """Our ZOGY (already warped reference, PSF models) on the images of ``d``: seconds, noise
    (not measured if ``psf_only``) and P_D at the centre."""
    import functools

    from improc.alignment import local_jacobian, warp_noise_power
    from improc.zogy import zogy_subtract

    jacobian = local_jacobian(NX / 2, NY / 2, source_wcs=d["ref_wcs"], target_wcs=d["new_wcs"])
    start = time.perf_counter()
    result = zogy_subtract(d["new_data"], d["warped_data"], new_weight=d["new_weight"],
                           ref_weight=d["warped_white_weight"], new_flags=d["new_flags"],
                           ref_flags=d["warped_flags"], new_psf=d["psf_new"], ref_psf=d["grid_psf"],
                           flux_ratio=d["flux_ratio"],
                           ref_noise_power=functools.partial(warp_noise_power, jacobian=jacobian),
                           astrometric_sigma=ASTROMETRIC_SIGMA)
    seconds = time.perf_counter() - start
    ny, nx = result.data.shape
    psf_d = result.psf_at(nx / 2, ny / 2)
    if psf_only:
        return seconds, {}, psf_d
    return seconds, _noise(result.data, psf_d, d["free"], d["new_weight"],
                           d["warped_white_weight"], d["flux_ratio"], result.score_corr), psf_d


def reproject_phase(folder: Path) -> dict:
    """reproject.reproject_interp (bicubic) of the reference's data onto the new grid."""
    import reproject
    from reproject import reproject_interp

    d = _load(folder)
    start = time.perf_counter()
    reproject_interp((d["ref_data"], d["ref_wcs"]), d["new_wcs"], shape_out=d["new_data"].shape,
                     order="bicubic")
    seconds = time.perf_counter() - start
    return {"seconds": {"subtract": seconds},
            "notes": {"version": reproject.__version__, "what": "data plane only, no weight or flags"}}


if __name__ == "__main__":
    main()
