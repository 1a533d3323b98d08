"""Benchmark: issue 10's acceptance lines measured through the configured pipeline.

A simulated field (`improc.simulator`, 0.263"/px, galaxies, a Gaia catalog folder): three
reference epochs, each ``--ref-depth`` (default 10) times the new epoch's exposure (sky and
zero point scaled), coadded and registered by `pipeline.make_ref.make_reference`, and a new epoch
pointed 3.3" away and turned by 0.5 degree (the simulator has no rotation parameter: its true
WCS is turned here) with 200 transients of S/N 3 to 50 in the new image (log-uniform; half in
galaxies by `place_transients_in_hosts`, 20 of those on the nucleus).  Each direction:

``new 1.4" / ref 0.9"``  reference epochs of seeing 0.85, 0.90, 0.95"; the new image 1.4".
``new 0.9" / ref 1.4"``  reference epochs of 1.35, 1.40, 1.45"; the new image 0.9".

Why a deep reference: the acceptance counts completeness in bins of the transient's S/N in the
*new* image, which a difference can reach only if the reference's noise is negligible.  ZOGY's
S/N for a point source is that of the new image times sqrt(mean over frequencies of
|P_r|^2 / (|P_r|^2 + (sigma_r / F_r)^2 / sigma_n^2 |P_n|^2)) (Zackay et al. 2016, eq. 28-29):
for Gaussian PSFs and a reference 12 times deeper than the new image, 0.975 when the reference
is the sharper (new 1.4" / ref 0.9") and 0.846 when it is the blurrier (new 0.9" / ref 1.4"),
where S/N 5.5 in the new image is 4.65 in S_corr and a 5-sigma threshold finds ~36 % of them;
30 times deeper (3 epochs of 10 times the exposure: a survey's reference), 0.99 and 0.91.  The
table prints the measured ratio (S_corr at the transient over its S/N in the new image).

Everything runs on SQLite in a temporary directory, one process pinned to one CPU (with
OMP/OPENBLAS/MKL threads = 1) whose freed memory is kept for reuse as the ``seechange`` command
keeps it (`util.memory.keep_freed_memory`; ``--release-memory`` leaves malloc as it is, and the
kernel's first touch of every full-frame block then adds 1-2 s on a machine with fragmented
memory).  Reported, against the injected truth (a transient is recovered
by a kept -- not ``is_bad`` -- measurement within 1.5 pixels; transients whose 7 x 7 pixels
touch a flagged pixel of the difference are left out and counted):

* completeness in bins of the transient's S/N in the new image (optimal photometry with the true
  PSF and the simulator's noise of everything under it: sky, host galaxy, the transient, read
  noise), at S/N 5-6 ("5.5") and S/N >= 10;
* spurious detections: kept measurements farther than 3 pixels from every transient;
* PSF-flux bias for S/N > 20: median of ``flux_psf / flux_adu`` - 1 (D's flux in the new
  image's ADU against the simulator's), and the new image's zero point against the truth;
* flux pulls ``(flux_psf - flux_adu) / flux_psf_err`` of every recovered transient: their
  standard deviation, a robust one (1.4826 MAD) and that of the transients not on galaxies;
* S_corr's standard deviation per ZOGY tile (the difference's ``PSF_TILES``) in transient-free
  areas: unflagged, 12 pixels or more from any |S_corr| > 4 and 15 from any transient;
  the smallest and largest over the tiles, and the four corner tiles; and the same for the
  same subtraction of white noise (`pure_noise_score`: the images' PSFs, flags, weights and
  tiles, S_corr right by construction), what chance alone gives: a tile's std scatters by
  ~0.011 for the default 341-pixel tiles, ~0.02 for 256-pixel ones (S_corr is correlated over
  the PSF's area); and over 512-pixel squares;
* the seconds of subtraction (warp of the reference included), detection, cutting and
  measuring from ``ds.stats``, and the process's peak RSS.

Then the same pipeline on a 2048 x 4096 pair (new 1.4" / ref 0.9", a one-epoch reference, to
keep the run short) for the issue's speed lines: alignment + ZOGY + detection + cutouts +
measurements <= 4 s on one core, ZOGY <= 2 s (`bench/bench_subtraction.py` times the ZOGY
alone and the peers), peak memory <= 2 GB.

Usage::

    python bench/bench_difference.py [--quick] [--size 2048] [--no-timing] [--keep DIR] [--ref-depth 10]
                                     [--seeds 1] [--diagnose] [--only 1.4|0.9] [--timing-only]
                                     [--release-memory]

``--quick``: 1024 x 1024 (100 transients), no 2048 x 4096 timing.  ``--timing-only``: the
2048 x 4096 pair alone (time it on an idle machine: a second job on the other core slows it).
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import contextlib  # noqa: E402
import logging  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PIXEL_SCALE = 0.263
SHIFT_ARCSEC = (2.7, -1.9)
ROTATION_DEG = 0.5
SNR_RANGE = (3.0, 50.0)
SNR_BINS = (3, 4, 5, 6, 8, 10, 20, 50)
MATCH_PX = 1.5
SPURIOUS_PX = 3.0
DIRECTIONS = {"new 1.4\" / ref 0.9\"": (1.4, (0.85, 0.90, 0.95)),
              "new 0.9\" / ref 1.4\"": (0.9, (1.35, 1.40, 1.45))}
STEPS = ("subtraction", "detection", "cutting", "measuring")


@dataclass
class Outcome:
    """The raw results of one or more runs (pooled by `pooled`) and the figures derived from
    them (see the module docstring)."""

    label: str
    shape: tuple[int, int]
    runs: int = 1
    bins: list = field(default_factory=list)          # (lo, hi, n, found)
    usable_snr: list = field(default_factory=list)    # S/N in the new image of every usable transient
    usable_found: list = field(default_factory=list)  # and whether it was found
    n_flagged: int = 0
    spurious: int = 0
    n_kept: int = 0
    n_bad: int = 0
    ratios: list = field(default_factory=list)        # flux_psf / true flux, S/N > 20
    pulls: list = field(default_factory=list)
    pull_snr: list = field(default_factory=list)
    in_field: list = field(default_factory=list)
    zp_errors: list = field(default_factory=list)
    efficiencies: list = field(default_factory=list)  # S_corr peak / S/N, field transients, S/N > 10
    tile_std: list = field(default_factory=list)      # per tile, nan without enough free pixels
    noise_tile_std: list = field(default_factory=list)  # the same, both images replaced by white noise
    area_std: list = field(default_factory=list)      # per AREA_PX square
    noise_area_std: list = field(default_factory=list)
    static: list = field(default_factory=list)        # PSF flux on D / flux, static sources of S/N > 50
    corners: list = field(default_factory=list)
    seconds: dict = field(default_factory=dict)
    peak_rss_mb: float = 0.0

    def completeness(self, lo: float, hi: float) -> tuple[int, int]:
        n = sum(b[2] for b in self.bins if b[0] >= lo and b[1] <= hi)
        return sum(b[3] for b in self.bins if b[0] >= lo and b[1] <= hi), n

    @property
    def bias(self) -> float:
        return float(np.median(self.ratios)) - 1.0 if self.ratios else float("nan")

    def pull_std(self, select=None) -> float:
        pulls = np.asarray(self.pulls, float)
        if select is not None:
            pulls = pulls[np.asarray(select, bool)]
        return float(np.std(pulls)) if pulls.size > 2 else float("nan")

    @property
    def pull_robust(self) -> float:
        pulls = np.asarray(self.pulls, float)
        return float(1.4826 * np.median(np.abs(pulls - np.median(pulls)))) if pulls.size > 2 else float("nan")


def half_completeness_snr(snr, found) -> tuple[float, float]:
    """S/N at which half the transients are found, and its standard error: a logistic curve in
    S/N fitted by maximum likelihood to every usable transient of S/N 2-12 (one number from all
    of them, where a 5-6 bin holds ~50)."""
    from scipy.optimize import minimize

    snr, found = np.asarray(snr, float), np.asarray(found, bool)
    use = (snr > 2) & (snr < 12)
    snr, found = snr[use], found[use]
    if snr.size < 20 or found.all() or not found.any():
        return float("nan"), float("nan")

    def negative_log_likelihood(p):
        z = np.clip((snr - p[0]) / np.exp(p[1]), -30, 30)
        return float(np.sum(np.logaddexp(0, -z)[found]) + np.sum(np.logaddexp(0, z)[~found]))

    fit = minimize(negative_log_likelihood, [5.5, 0.0], method="BFGS")
    return float(fit.x[0]), float(np.sqrt(fit.hess_inv[0, 0]))


def _robust(values) -> float:
    values = np.asarray(values, float)
    return float(1.4826 * np.median(np.abs(values - np.median(values)))) if values.size > 2 else float("nan")


def pooled(outcomes: list[Outcome]) -> Outcome:
    """One Outcome of several runs of the same kind (bins, counts and lists added up)."""
    first = outcomes[0]
    out = Outcome(label=first.label, shape=first.shape, runs=len(outcomes),
                  bins=[(lo, hi, sum(o.bins[k][2] for o in outcomes), sum(o.bins[k][3] for o in outcomes))
                        for k, (lo, hi, _, _) in enumerate(first.bins)])
    for name in ("n_flagged", "spurious", "n_kept", "n_bad"):
        setattr(out, name, sum(getattr(o, name) for o in outcomes))
    for name in ("ratios", "pulls", "pull_snr", "in_field", "zp_errors", "efficiencies", "tile_std", "corners",
                 "static", "noise_tile_std", "area_std", "noise_area_std", "usable_snr", "usable_found"):
        setattr(out, name, [v for o in outcomes for v in getattr(o, name)])
    out.seconds = {k: float(np.median([o.seconds[k] for o in outcomes if k in o.seconds])) for k in first.seconds}
    out.peak_rss_mb = max(o.peak_rss_mb for o in outcomes)
    return out


def _mags_for_snr(snr: np.ndarray, params, n_eff: float) -> np.ndarray:
    """Magnitudes whose S/N in an image of ``params`` (sky and source Poisson noise, read noise,
    a PSF of effective area ``n_eff`` pixels) is ``snr``."""
    var = params.sky_adu / params.gain + (params.read_noise / params.gain) ** 2
    g = params.gain
    flux = 0.5 * (snr**2 / g + np.sqrt(snr**4 / g**2 + 4.0 * snr**2 * n_eff * var))
    return params.zero_point - 2.5 * np.log10(flux)


def simulate(folder: Path, *, nx: int, ny: int, new_fwhm: float, ref_fwhms: tuple[float, ...],
             n_transients: int, seed: int, ref_depth: float = 1.0):
    """Write the raw reference epochs and the new epoch; their simulations and the Gaia folder."""
    from astropy.table import Table

    from improc.simulator import SimulationParams, place_transients_in_hosts, simulate_image
    from models.instruments.synthetic import write_simulated_file
    from util.gaia import write_gaia_folder

    n_gal = int(60 * nx * ny / 1024**2)
    common = dict(nx=nx, ny=ny, pixel_scale=PIXEL_SCALE, scene_seed=seed, detector_seed=seed,
                  star_density=20000.0, n_galaxies=n_gal, pointing_error_arcsec=10.0, rotation_error_deg=0.3)
    deep = dict(exp_time=60.0 * ref_depth, sky_adu=1000.0 * ref_depth,
                zero_point=31.0 + 2.5 * np.log10(ref_depth))
    refs = [simulate_image(SimulationParams(seed=seed + 10 + k, mjd=60000.1 + k, fwhm_arcsec=f, **deep, **common))
            for k, f in enumerate(ref_fwhms)]
    first = refs[0]
    rng = np.random.default_rng(seed)
    east, north = SHIFT_ARCSEC
    new_p = SimulationParams(seed=seed + 50, mjd=60010.1, fwhm_arcsec=new_fwhm,
                             ra=first.params.ra + east / 3600.0 / np.cos(np.deg2rad(first.params.dec)),
                             dec=first.params.dec + north / 3600.0, **common)
    from improc.sim_wcs import rotated_true_wcs

    with rotated_true_wcs(ROTATION_DEG) as make:
        wcs = make(nx, ny, ra=new_p.ra, dec=new_p.dec, pixel_scale=new_p.pixel_scale,
                   sip_amplitude_pix=new_p.sip_amplitude_pix)
        # S/N in the new image: the true PSF at the centre (the simulator's field, same seeing)
        probe = simulate_image(SimulationParams(**{**common, "nx": 64, "ny": 64, "n_galaxies": 0,
                                                   "star_density": 1.0, "fwhm_arcsec": new_fwhm,
                                                   "fwhm_variation": 0.0, "seed": 1}))
        stamp = probe.psf(32, 32)
        n_eff = 1.0 / float(np.sum((stamp / stamp.sum()) ** 2))
        snr = np.exp(rng.uniform(*np.log(SNR_RANGE), n_transients))
        mags = _mags_for_snr(snr, new_p, n_eff)
        n_host = n_transients // 2
        hosted = place_transients_in_hosts(first.galaxies, mags[:n_host], rng)
        ra_h, dec_h = np.asarray(hosted["ra"], float), np.asarray(hosted["dec"], float)
        nuclei = min(20, n_host)
        hosts = {int(g["galaxy_id"]): g for g in first.galaxies}
        for k in range(nuclei):
            g = hosts[int(hosted["host_id"][k])]
            ra_h[k], dec_h[k] = float(g["ra"]), float(g["dec"])
        # field transients at least 25 pixels from each other and from the hosted ones (two
        # transients side by side blend; a survey's rarely do)
        hx, hy = wcs.all_world2pix(ra_h, dec_h, 0)
        taken = list(zip(hx, hy))
        x, y = [], []
        while len(x) < n_transients - n_host:
            px, py = rng.uniform(40, nx - 40), rng.uniform(40, ny - 40)
            if all((px - a) ** 2 + (py - b) ** 2 >= 25.0**2 for a, b in taken):
                x.append(px)
                y.append(py)
                taken.append((px, py))
        ra_f, dec_f = wcs.all_pix2world(np.array(x), np.array(y), 0)
        transients = Table({"ra": np.concatenate([ra_h, ra_f]), "dec": np.concatenate([dec_h, dec_f]),
                            "mag": mags})
        new = simulate_image(new_p, stars=first.star_catalog, galaxies=first.galaxies, transients=transients)
    paths = [write_simulated_file(sim, folder / f"epoch_{k}.fits", raw=True, seed=k)
             for k, sim in enumerate([*refs, new])]
    write_gaia_folder(first.gaia, folder / "gaia")
    return paths, refs, new, stamp / stamp.sum()


def run_pipeline(folder: Path, paths: list[Path], n_ref: int):
    """Ingest, calibrate the reference epochs, make the reference of the first ``n_ref``, run the
    new image through measuring; its DataStore."""
    from models.context import Context
    from models.image import ingest_file
    from models.schema import upgrade
    from pipeline.make_ref import make_reference
    from pipeline.runner import run_all
    from util.config import Config

    catalog = {"catalog": "gaia_folder", "catalog_folder": str(folder / "gaia")}
    config = Config.load(**{"db.url": f"sqlite:///{folder / 'db.sqlite'}",
                            "storage.data_root": str(folder / "data")}, astrocal=catalog, photocal=catalog)
    context = Context.from_config(config)
    upgrade(context.engine)
    exposures = [ingest_file(p, context=context)[0] for p in paths]
    refs = run_all(context, ids=[str(e.id) for e in exposures[:n_ref]], tag="bench")
    make_reference(context, image_ids=[str(ds.image.id) for ds in refs])
    (ds,) = run_all(context, ids=[str(exposures[-1].id)], tag="bench")
    return ds


def diagnose(ds, new_sim, snr: np.ndarray, usable: np.ndarray, found: np.ndarray, n_host: int) -> None:
    """Print each usable transient of S/N >= 10 that was missed: where it sits, S_corr at its
    pixel and the nearest measurement (kept or bad, with its failed cuts) or detection."""
    sub = ds.get_sub_image()
    score = sub.extra("SCORE")
    everything = list(ds.get_measurement_set().measurements)
    det = ds.get_detections()
    truth = new_sim.transients
    for i in np.flatnonzero(usable & ~found & (snr >= 10)):
        tx, ty = float(truth["x"][i]), float(truth["y"][i])
        where = "nucleus" if i < min(20, n_host) else ("galaxy" if i < n_host else "field")
        iy, ix = int(round(ty)), int(round(tx))
        line = (f"  missed #{i:3d} S/N {snr[i]:5.1f} {where:7s} at ({tx:7.1f}, {ty:7.1f}) "
                f"S_corr max 3x3 {score[iy - 1:iy + 2, ix - 1:ix + 2].max():6.1f}")
        if everything:
            d = [np.hypot(m.x - tx, m.y - ty) for m in everything]
            m = everything[int(np.argmin(d))]
            line += (f" | nearest measurement {min(d):4.1f} px sign {m.sign:+d} snr {m.snr:5.1f} "
                     f"bad={m.is_bad} ({m.bad_reasons}) off {m.centroid_offset} el {m.elongation} "
                     f"wr {m.width_ratio} dip {m.dipole_ratio}")
        dd = np.hypot(np.asarray(det.x) - tx, np.asarray(det.y) - ty)
        line += f" | nearest detection {dd.min():4.1f} px" if dd.size else " | no detections"
        print(line)


def snr_in_new_image(new_sim, psf_stamp: np.ndarray) -> np.ndarray:
    """Each transient's S/N of optimal (PSF-weighted) photometry in the new image: flux times
    sqrt(sum(P**2 w)) with ``w`` the simulator's inverse variance of everything there (sky, the
    host galaxy, the transient itself, read noise), P the true PSF at the centre."""
    truth = new_sim.transients
    half = psf_stamp.shape[0] // 2
    w = np.pad(np.asarray(new_sim.weight, float), half)
    out = np.zeros(len(truth))
    for i, (x, y, f) in enumerate(zip(truth["x"], truth["y"], truth["flux_adu"])):
        ix, iy = int(round(float(x))), int(round(float(y)))
        if 0 <= ix < w.shape[1] - 2 * half and 0 <= iy < w.shape[0] - 2 * half:
            out[i] = float(f) * np.sqrt(np.sum(psf_stamp**2 * w[iy:iy + 2 * half + 1, ix:ix + 2 * half + 1]))
    return out


def _faint_misses(ds, new_sim, snr: np.ndarray, missed: np.ndarray) -> None:
    """Why transients of S/N 5-10 were missed, counted: no detection within MATCH_PX (S_corr
    below the threshold there), a detection whose measurement was dropped, one measured bad (by
    which cut), or a measurement farther than MATCH_PX."""
    truth = new_sim.transients
    score = ds.get_sub_image().extra("SCORE")
    det = ds.get_detections()
    everything = list(ds.get_measurement_set().measurements)
    reasons: dict[str, int] = {}
    peaks = []
    for i in np.flatnonzero(missed):
        tx, ty = float(truth["x"][i]), float(truth["y"][i])
        dd = np.hypot(np.asarray(det.x) - tx, np.asarray(det.y) - ty)
        near = [m for m in everything if np.hypot(m.x - tx, m.y - ty) < MATCH_PX]
        if not dd.size or dd.min() >= MATCH_PX:
            iy, ix = int(round(ty)), int(round(tx))
            peaks.append(float(score[iy - 1:iy + 2, ix - 1:ix + 2].max()) / snr[i])
            why = "not detected"
            print(f"    undetected #{i:3d} S/N {snr[i]:4.1f} {'field' if i >= len(truth) // 2 else 'galaxy'} "
                  f"S_corr max {peaks[-1] * snr[i]:4.1f}, nearest detection {dd.min() if dd.size else np.inf:.1f} px")
        elif not near:
            far = [m for m in everything if np.hypot(m.x - tx, m.y - ty) < 4]
            why = "measured > 1.5 px away" if far else "measurement dropped"
        else:
            why = "bad: " + (near[0].bad_reasons or "?")
        reasons[why] = reasons.get(why, 0) + 1
    print(f"  S/N 5-10 missed: {int(missed.sum())}: " + ", ".join(f"{k} {v}" for k, v in sorted(reasons.items())))
    if peaks:
        print(f"  undetected ones: S_corr max near the truth / S/N, median {np.median(peaks):.2f}")


def pure_noise_score(ds, seed: int) -> np.ndarray:
    """S_corr of the same subtraction with both images replaced by white noise of their weights.

    The same PSFs, flags, tiles, flux ratio, registration noise and residual background mesh as
    the difference of ``ds`` (the reference's noise is drawn on its own grid from its white
    weight and warped as its pixels were): S_corr that is normalized right by construction.
    Its per-tile standard deviations, in the same transient-free pixels, are what chance alone
    gives the tile line: a tile's std scatters by ~0.011 for 341-pixel tiles at 1.4" (S_corr is
    correlated over the PSF's area, so a 256-pixel tile holds only ~1,000 independent values and
    scatters by ~0.02).
    """
    import dataclasses

    from improc.alignment import warp_image
    from pipeline.reference_alignment import aligned_reference, white_weight
    from pipeline.top import Pipeline

    step = next(s for s in Pipeline(ds.context).steps if s.process == "subtraction")
    image, psf, wcs, sub = ds.get_image(), ds.get_psf(), ds.get_wcs(), ds.get_sub_image()
    aligned = aligned_reference(ds)
    rng = np.random.default_rng(seed)

    def noise(weight: np.ndarray) -> np.ndarray:
        good = weight > 0
        values = rng.standard_normal(weight.shape, dtype=np.float32) / np.sqrt(np.where(good, weight, 1.0))
        return np.where(good, values, 0.0).astype(np.float32)

    ref = aligned.image
    ref_weight = white_weight(ref)
    warped = warp_image(noise(ref_weight), ref_weight, ref.flags, source_wcs=aligned.solution,
                        target_wcs=wcs.wcs, target_shape=image.data.shape)
    result = step.compute((noise(image.weight), image.weight, image.flags), psf.model,
                          dataclasses.replace(aligned, warped=warped), wcs.wcs,
                          (float(sub.header["REGSIGMA"]),) * 2)
    return step.without_residual_background(result, psf.model.fwhm_pixels)[1]


def static_residuals(ds, tx: np.ndarray, ty: np.ndarray) -> np.ndarray:
    """PSF-fit flux on D over the new image's PSF flux, for its sources of S/N > 50 more than 20 px
    from any transient: what static sources leave on D (measuring's ``static_flux_error``)."""
    from improc.measurements import measure_detections
    from improc.psf import half_maximum_fwhm
    from pipeline.subtraction import difference_psf

    sub, sources = ds.get_sub_image(), ds.get_sources().data
    x, y = np.asarray(sources["x"], float), np.asarray(sources["y"], float)
    flux = np.asarray(sources["psfflux"], float)
    snr = flux / np.asarray(sources["psffluxerr"], float)
    near = np.min(np.hypot(x[:, None] - tx[None], y[:, None] - ty[None]), axis=1) < 20 if len(tx) else False
    use = (snr > 50) & ~near & (x > 40) & (x < sub.nx - 40) & (y > 40) & (y < sub.ny - 40)
    if not use.any():
        return np.zeros(0)
    psf = difference_psf(sub)
    table = measure_detections(sub.data, x[use], y[use], psf, weight=sub.weight, flags=sub.flags,
                               fit_radius=2.0 * half_maximum_fwhm(psf(sub.nx / 2.0, sub.ny / 2.0)), max_shift=0.0)
    ratio = np.asarray(table["flux_psf"], float) / flux[use]
    return ratio[np.isfinite(ratio)]


def evaluate(ds, new_sim, psf_stamp: np.ndarray, label: str, show_missed: bool = False) -> Outcome:
    """The acceptance figures of one run against the truth."""
    from scipy import ndimage

    sub = ds.get_sub_image()
    ms = ds.get_measurement_set()
    zp = ds.get_zp().zp
    p = new_sim.params
    kept = [m for m in ms.measurements if not m.is_bad]
    xy = np.array([[m.x, m.y] for m in kept]).reshape(-1, 2)
    truth = new_sim.transients
    tx, ty = np.asarray(truth["x"], float), np.asarray(truth["y"], float)
    flux_true = np.asarray(truth["flux_adu"], float)
    snr = snr_in_new_image(new_sim, psf_stamp)
    out = Outcome(label=label, shape=sub.data.shape, n_kept=len(kept), n_bad=ms.num_bad)
    ny, nx = sub.data.shape
    found = np.zeros(len(truth), bool)
    usable = np.zeros(len(truth), bool)
    ratios, pulls, in_field, pull_snr = [], [], [], []
    for i in range(len(truth)):
        ix, iy = int(round(tx[i])), int(round(ty[i]))
        if not (3 <= ix < nx - 3 and 3 <= iy < ny - 3) or sub.flags[iy - 3:iy + 4, ix - 3:ix + 4].any():
            out.n_flagged += 1
            continue
        usable[i] = True
        if not len(xy):
            continue
        d = np.hypot(xy[:, 0] - tx[i], xy[:, 1] - ty[i])
        k = int(np.argmin(d))
        if d[k] < MATCH_PX and kept[k].sign > 0:
            found[i] = True
            m = kept[k]
            pulls.append((m.flux_psf - flux_true[i]) / m.flux_psf_err)
            if show_missed and abs(pulls[-1]) > 3:
                print(f"  pull {pulls[-1]:+5.1f} #{i:3d} S/N {snr[i]:5.1f} {'field' if i >= len(truth) // 2 else 'galaxy'} "
                      f"at ({tx[i]:7.1f}, {ty[i]:7.1f}): flux {m.flux_psf:.0f} +- {m.flux_psf_err:.0f} "
                      f"true {flux_true[i]:.0f}, offset {np.hypot(m.x - tx[i], m.y - ty[i]):.2f} px")
            in_field.append(i >= len(truth) // 2)
            pull_snr.append(snr[i])
            if snr[i] > 20:
                ratios.append(m.flux_psf / flux_true[i])
    if show_missed:
        print(f"{label}: missed transients of S/N >= 10")
        diagnose(ds, new_sim, snr, usable, found, len(truth) // 2)
        _faint_misses(ds, new_sim, snr, usable & ~found & (snr >= 5) & (snr < 10))
    for lo, hi in zip(SNR_BINS[:-1], SNR_BINS[1:]):
        sel = usable & (snr >= lo) & (snr < hi)
        out.bins.append((lo, hi, int(sel.sum()), int((found & sel).sum())))
    out.usable_snr, out.usable_found = list(snr[usable]), list(found[usable])
    if len(xy):
        dmin = np.min(np.hypot(xy[:, 0, None] - tx[None], xy[:, 1, None] - ty[None]), axis=1)
        out.spurious = int(np.sum(dmin > SPURIOUS_PX))
        if show_missed:
            for k in np.flatnonzero(dmin > SPURIOUS_PX):
                m = kept[k]
                iy, ix = int(round(m.y)), int(round(m.x))
                cr = bool(np.any(new_sim.flags[max(iy - 2, 0):iy + 3, max(ix - 2, 0):ix + 3] & 4))
                print(f"  spurious{' (cosmic ray in the new image)' if cr else ''} at ({m.x:7.1f}, {m.y:7.1f}) sign {m.sign:+d} snr {m.snr:5.1f} "
                      f"offset {m.centroid_offset_sigma:.1f} sigma el {m.elongation} wr {m.width_ratio:.2f} "
                      f"dip {m.dipole_ratio:.2f} bad fraction {m.bad_fraction:.2f}")
    out.ratios, out.pulls, out.in_field, out.pull_snr = ratios, pulls, in_field, pull_snr
    out.zp_errors = [zp - p.zero_point]
    score = sub.extra("SCORE")
    field = usable & (np.arange(len(truth)) >= len(truth) // 2) & (snr > 10)
    if field.any():
        at = [score[int(round(ty[i])) - 1:int(round(ty[i])) + 2, int(round(tx[i])) - 1:int(round(tx[i])) + 2].max()
              for i in np.flatnonzero(field)]
        out.efficiencies = list(np.asarray(at) / snr[field])
    faint = usable & (np.arange(len(truth)) >= len(truth) // 2) & (snr > 4) & (snr < 10)
    if show_missed and faint.any():
        at = np.array([score[int(round(ty[i])) - 1:int(round(ty[i])) + 2, int(round(tx[i])) - 1:int(round(tx[i])) + 2].max()
                       for i in np.flatnonzero(faint)])
        z = at - np.median(out.efficiencies or [1.0]) * snr[faint]
        print(f"  field transients S/N 4-10: S_corr max at the truth - efficiency x S/N: mean {z.mean():+.2f}, "
              f"std {z.std():.2f} (n={faint.sum()}); S_corr max / S/N median {np.median(at / snr[faint]):.3f}")
    free = ~ndimage.binary_dilation(np.abs(score) > 4, iterations=12) & (sub.flags == 0)
    near = np.zeros_like(free)
    near[np.clip(np.round(ty).astype(int), 0, ny - 1), np.clip(np.round(tx).astype(int), 0, nx - 1)] = True
    free &= ~ndimage.binary_dilation(near, iterations=15)
    tiles = np.asarray(sub.extra("PSF_TILES"), int)
    for y0, y1, x0, x1 in tiles:
        values = score[y0:y1, x0:x1][free[y0:y1, x0:x1]]
        out.tile_std.append(float(np.std(values)) if values.size > 500 else float("nan"))
        if show_missed and values.size > 500 and abs(out.tile_std[-1] - 1) > 0.04:
            mad = 1.4826 * np.median(np.abs(values - np.median(values)))
            window = np.where(free[y0:y1, x0:x1], np.abs(score[y0:y1, x0:x1]), 0)
            iy, ix = np.unravel_index(int(np.argmax(window)), window.shape)
            print(f"  tile y {y0}-{y1} x {x0}-{x1}: std {out.tile_std[-1]:.3f}, robust {mad:.3f}, "
                  f"mean {values.mean():+.3f}, |S|>4 in {np.mean(np.abs(values) > 4):.1e} of {values.size}, "
                  f"max |S| {window.max():.1f} at ({x0 + ix}, {y0 + iy})")
    noise_score = pure_noise_score(ds, seed=int(tiles.sum()) % 10_000)
    out.noise_tile_std = [float(np.std(v)) if v.size > 500 else float("nan")
                          for v in (noise_score[y0:y1, x0:x1][free[y0:y1, x0:x1]] for y0, y1, x0, x1 in tiles)]
    out.area_std, out.noise_area_std = (_area_stds(plane, free) for plane in (score, noise_score))
    corner_ids = {int(np.argmin(tiles[:, 0] + tiles[:, 2])), int(np.argmin(tiles[:, 0] - tiles[:, 3])),
                  int(np.argmin(-tiles[:, 1] + tiles[:, 2])), int(np.argmax(tiles[:, 1] + tiles[:, 3]))}
    out.corners = [out.tile_std[i] for i in sorted(corner_ids)]
    out.static = list(static_residuals(ds, tx, ty))
    out.seconds = {s: float(ds.stats[s]["seconds"]) for s in STEPS if s in ds.stats}
    out.peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return out


#: Side of the squares over which S_corr's std is also reported, whatever the tiles: a 256-px
#: tile's std scatters by ~0.02 from chance alone (white noise through the same subtraction), a
#: 512-px square's by half.
AREA_PX = 512


def _area_stds(score: np.ndarray, free: np.ndarray) -> list[float]:
    """S_corr's std over the ``free`` pixels of each AREA_PX square (nan with too few)."""
    ny, nx = score.shape
    stds = []
    for y0 in range(0, ny, AREA_PX):
        for x0 in range(0, nx, AREA_PX):
            values = score[y0:y0 + AREA_PX, x0:x0 + AREA_PX][free[y0:y0 + AREA_PX, x0:x0 + AREA_PX]]
            stds.append(float(np.std(values)) if values.size > 2000 else float("nan"))
    return stds


def print_table(outcomes: list[Outcome]) -> None:
    """One column per run."""
    width = 24
    print("\n" + " " * 34 + "".join(f"{o.label:>{width}}" for o in outcomes))

    def row(name, cells, target=""):
        print(f"{name:<34}" + "".join(f" {c:>{width - 1}}" for c in cells) + (f"   {target}" if target else ""))

    row("image", [f"{o.shape[1]} x {o.shape[0]}" for o in outcomes])
    for lo, hi in zip(SNR_BINS[:-1], SNR_BINS[1:]):
        cells = []
        for o in outcomes:
            f, n = o.completeness(lo, hi)
            cells.append(f"{f}/{n} ({f / n:.0%})" if n else "-")
        row(f"completeness S/N {lo}-{hi}", cells, ">= 50%" if lo == 5 else "")
    cells = []
    for o in outcomes:
        f, n = o.completeness(10, 1e9)
        cells.append(f"{f}/{n} ({f / n:.0%})" if n else "-")
    row("completeness S/N >= 10", cells, ">= 95%")
    row("S/N of 50 % completeness (logistic fit)",
        ["{:.2f} +- {:.2f}".format(*half_completeness_snr(o.usable_snr, o.usable_found)) for o in outcomes],
        "<= 5.5")
    row("transients on flagged pixels", [str(o.n_flagged) for o in outcomes], "(left out)")
    row("kept measurements (not bad)", [str(o.n_kept) for o in outcomes])
    row("measurements marked bad", [str(o.n_bad) for o in outcomes])
    area = [o.runs * o.shape[0] * o.shape[1] / 2048**2 for o in outcomes]
    row("spurious kept (per 2048^2)", [f"{o.spurious} ({o.spurious / a:.1f})" for o, a in zip(outcomes, area)],
        "<= 25")
    row("runs pooled", [str(o.runs) for o in outcomes])
    row("PSF flux on D / true ADU - 1, S/N > 20", [f"{o.bias:+.2%} (n={len(o.ratios)})" for o in outcomes],
        "|bias| <= 2%")
    row("flux pulls std (robust)", [f"{o.pull_std():.2f} ({o.pull_robust:.2f})" for o in outcomes], "0.9-1.1")
    row("flux pulls std, not on galaxies", [f"{o.pull_std(o.in_field):.2f}" for o in outcomes])
    row("flux pulls std, S/N < 20 | >= 20",
        [f"{o.pull_std(np.asarray(o.pull_snr) < 20):.2f} | {o.pull_std(np.asarray(o.pull_snr) >= 20):.2f}"
         for o in outcomes])
    row("static sources S/N > 50: D / flux", [f"{_robust(o.static):.4f} (n={len(o.static)})" for o in outcomes],
        "(robust scatter)")
    row("new image's zp - truth, mag", [" ".join(f"{v:+.4f}" for v in o.zp_errors) for o in outcomes])
    row("S_corr peak / S/N, field, S/N > 10",
        [f"{np.median(o.efficiencies):.3f}" if o.efficiencies else "-" for o in outcomes], "(median)")
    row("S_corr std per tile min..max",
        [f"{np.nanmin(o.tile_std):.3f}..{np.nanmax(o.tile_std):.3f}" for o in outcomes], "1.00 +/- 0.05")
    row("S_corr std per tile, scatter", [f"{np.nanstd(o.tile_std):.4f}" for o in outcomes],
        "(pure noise: bench_score_noise.py)")
    row("S_corr std, corner tiles", [" ".join(f"{v:.2f}" for v in o.corners) for o in outcomes])
    row("tiles within 0.95-1.05",
        [f"{np.sum(np.abs(np.asarray(o.tile_std) - 1) <= 0.05)}/{np.sum(np.isfinite(o.tile_std))}"
         for o in outcomes])
    # chance alone: the same subtraction of white noise (pure_noise_score)
    row("pure noise: std per tile min..max",
        [f"{np.nanmin(o.noise_tile_std):.3f}..{np.nanmax(o.noise_tile_std):.3f}" for o in outcomes])
    row("pure noise: mean, scatter",
        [f"{np.nanmean(o.noise_tile_std):.4f}, {np.nanstd(o.noise_tile_std):.4f}" for o in outcomes])
    row("pure noise: tiles within 0.95-1.05",
        [f"{np.sum(np.abs(np.asarray(o.noise_tile_std) - 1) <= 0.05)}/{np.sum(np.isfinite(o.noise_tile_std))}"
         for o in outcomes])
    for name, attr in (("images", "area_std"), ("pure noise", "noise_area_std")):
        row(f"{name}: {AREA_PX}-px squares within 5 %",
            [f"{np.sum(np.abs(np.asarray(getattr(o, attr)) - 1) <= 0.05)}/{np.sum(np.isfinite(getattr(o, attr)))}"
             f" ({np.nanmin(getattr(o, attr)):.3f}..{np.nanmax(getattr(o, attr)):.3f})" for o in outcomes])
    for step in STEPS:
        row(f"{step} s", [f"{o.seconds.get(step, float('nan')):.2f}" for o in outcomes])
    row("sum of the four steps s", [f"{sum(o.seconds.values()):.2f}" for o in outcomes], "<= 4 s (2048x4096)")
    row("peak RSS of the process, MB", [f"{o.peak_rss_mb:.0f}" for o in outcomes], "<= 2048")


def one_run(label: str, *, nx: int, ny: int, new_fwhm: float, ref_fwhms: tuple[float, ...], n_transients: int,
            keep: Path | None, seed: int, ref_depth: float, show_missed: bool = False) -> Outcome:
    with tempfile.TemporaryDirectory(prefix="bench_difference_") as tmp:
        folder = (keep / f"{nx}x{ny}_{new_fwhm}_{seed}") if keep else Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        paths, _, new, psf_stamp = simulate(folder, nx=nx, ny=ny, new_fwhm=new_fwhm, ref_fwhms=ref_fwhms,
                                        n_transients=n_transients, seed=seed, ref_depth=ref_depth)
        t1 = time.perf_counter()
        ds = run_pipeline(folder, paths, len(ref_fwhms))
        t2 = time.perf_counter()
        out = evaluate(ds, new, psf_stamp, label, show_missed)
        print(f"{label} {nx} x {ny}: simulated in {t1 - t0:.0f} s, pipeline {t2 - t1:.0f} s", flush=True)
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1024 x 1024, 100 transients, no timing pair")
    parser.add_argument("--size", type=int, default=2048, help="side of the acceptance pair, pixels")
    parser.add_argument("--no-timing", action="store_true", help="skip the 2048 x 4096 timing run")
    parser.add_argument("--keep", type=Path, help="keep the simulated files and databases here")
    parser.add_argument("--ref-depth", type=float, default=10.0,
                        help="exposure of each reference epoch in units of the new epoch's")
    parser.add_argument("--diagnose", action="store_true", help="list the missed transients of S/N >= 10")
    parser.add_argument("--only", choices=("1.4", "0.9"), help="one direction only (by the new image's seeing)")
    parser.add_argument("--seeds", type=int, default=1, help="independent fields per direction, pooled")
    parser.add_argument("--timing-only", action="store_true", help="only the 2048 x 4096 timing pair")
    parser.add_argument("--release-memory", action="store_true",
                        help="leave glibc's malloc as it is (freed full-frame blocks go back to the kernel) "
                             "instead of keeping them as the seechange command does (util/memory.py)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if not args.release_memory:
        from util.memory import keep_freed_memory

        print(f"freed memory kept for reuse, as the seechange command does: {keep_freed_memory()}")
    with contextlib.suppress(AttributeError, OSError):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    size = 1024 if args.quick else args.size
    n_transients = 100 if args.quick else 200
    directions = {k: v for k, v in DIRECTIONS.items() if args.only is None or k.startswith(f"new {args.only}")}
    outcomes = [pooled([one_run(label, nx=size, ny=size, new_fwhm=new, ref_fwhms=refs, n_transients=n_transients,
                                keep=args.keep, seed=31 + 100 * k, ref_depth=args.ref_depth,
                                show_missed=args.diagnose)
                        for k in range(args.seeds)])
                for label, (new, refs) in directions.items() if not args.timing_only]
    if not (args.quick or args.no_timing):
        outcomes.append(one_run("2048x4096 timing", nx=2048, ny=4096, new_fwhm=1.4, ref_fwhms=(0.9,),
                                n_transients=200, keep=args.keep, seed=37, ref_depth=4.0))
    print_table(outcomes)


if __name__ == "__main__":
    main()
