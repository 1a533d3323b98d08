"""Benchmark: our Gaia zero points of the sparse real DECam frames against the Legacy Surveys'.

Runs the seven DECam community-pipeline frames of ``../shared/data/legacypipe`` (testcase6: six
~100 x 100 cutouts in g, r, z; testcase8: one 375 x 280 r-band cutout) through preprocessing ..
photocal with the configuration of the sparse-frame test (tests/pipeline/test_real_data.py: the
local Gaia DR2 folder of the case and a 32-pixel background mesh, photocal's defaults otherwise),
in a temporary SQLite database and data root, and prints:

* per frame: calibrators used, our zp and dzp (ADU, PSF fluxes), quality flags, the Legacy
  Surveys' ``ccdzpt + 2.5 log10(exptime)`` (PSF photometry of ~600 Pan-STARRS stars over the
  whole CCD), delta = ours - LS and the pull delta / dzp, and LS's own per-star scatter
  ``ccdphrms`` (2.5-sigma-clipped std of PS1-transformed minus instrumental magnitudes) over
  ``ccdnphotom`` stars; the reason when a frame gets no zero point;
* per calibrator (the ZeroPoint's ``calibrators`` JSON): its residual about the frame's zp, its
  photometric error and the error of its Gaia-predicted magnitude (G, BP, RP flux errors through
  the band transformation);
* the pooled scatter of the residuals (per band and all: 1.4826 MAD, and the rms with one degree
  of freedom per frame taken by its zp, with a 95% chi^2 interval), the mean delta over frames,
  the std of the pulls and their chi^2; and the pulls if the assumed per-star scatter
  (photocal ``star_scatter_mag``) were replaced by other values, with a common systematic floor.

Nothing is written inside the repository.  Run from the repository root::

    .venv/bin/python bench/bench_real_zeropoints.py
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.dont_write_bytecode = True      # no __pycache__ in the repository
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "legacypipe"
STEPS = ("preprocessing", "backgrounding", "extraction", "astrocal", "photocal")
MAG = 2.5 / 2.302585092994046


def run_frames(tmp: Path) -> list[dict]:
    """Every frame through STEPS; one dict per frame (its ZeroPoint, LS row, calibrators)."""
    import numpy as np
    from astropy.table import Table, vstack

    from improc.color_transforms import BandTransform, gaia_to_band
    from models.context import Context
    from models.image import ingest_file
    from models.quality import quality_names
    from models.schema import upgrade
    from pipeline.step import step_class
    from pipeline.top import Pipeline
    from util.config import Config

    frames = []
    for case in ("testcase6", "testcase8"):
        folder = DATA / case
        gaia = {"catalog": "gaia_folder", "catalog_folder": str(folder / "gaia")}
        config = Config.load(**{"db.url": f"sqlite:///{tmp / 'bench.sqlite'}", "storage.data_root": str(tmp / "data"),
                                "backgrounding": {"box_size": 32}, "astrocal": gaia, "photocal": dict(gaia)})
        context = Context.from_config(config)
        upgrade(context.engine)
        scatter_prior = step_class("photocal")(config=config).params.star_scatter_mag
        ccds = Table.read(folder / "survey-ccds-1.fits.gz")
        catalog = vstack([Table.read(p) for p in sorted((folder / "gaia").glob("chunk-*.fits"))])
        for path in sorted(folder.glob("images/decam/CP/*/*/*_ooi_*.fits")):
            ls = next(r for r in ccds if r["image_filename"].strip().endswith(path.name))
            frame = {"file": path.name, "band": str(ls["filter"]).strip(), "prior": scatter_prior,
                     "zp_ls": float(ls["ccdzpt"]) + 2.5 * np.log10(float(ls["exptime"])),
                     "phrms": float(ls["ccdphrms"]), "nphotom": int(ls["ccdnphotom"]), "stars": []}
            frames.append(frame)
            try:
                with context.activate():
                    _, (image,) = ingest_file(path, context=context)
                    ds = Pipeline(context, steps=[step_class(s)(config=config) for s in STEPS]).run(image)
                    zp, sources = ds.get_zp(), ds.get_sources()
            except Exception as exc:  # report, do not work around
                frame["error"] = f"{type(exc).__name__}: {exc}"
                continue
            frame.update(band=image.filter, zp=zp.zp, dzp=zp.dzp, n=zp.num_stars, note=zp.note,
                         flags=",".join(quality_names(zp.quality_flags)) or "-")
            if not zp.calibrators:
                continue
            flux, err = (sources.psffluxadu() if zp.flux_from == "psf"
                         else sources.apfluxadu(len(sources.aper_radii) - 1))
            transform = BandTransform.from_mapping(zp.band_transform)
            for k, row in enumerate(zp.calibrators["source_row"]):
                if not zp.calibrators["used"][k]:
                    continue
                star = catalog[np.flatnonzero(catalog["source_id"] == zp.calibrators["gaia_source_id"][k])[0]]
                g, bp, rp = (np.array([float(star[f"phot_{b}_mean_mag"])]) for b in ("g", "bp", "rp"))
                errs = [MAG / float(star[f"phot_{b}_mean_flux_over_error"]) for b in ("g", "bp", "rp")]
                slopes = [1.0] + [float((gaia_to_band(g, bp + d * 1e-3, rp + e * 1e-3, transform)
                                        - gaia_to_band(g, bp - d * 1e-3, rp - e * 1e-3, transform))[0] / 2e-3)
                                  for d, e in ((1, 0), (0, 1))]
                frame["stars"].append({"G": g[0], "bp_rp": zp.calibrators["bp_rp"][k],
                                       "residual": zp.calibrators["residual"][k],
                                       "err_phot": MAG * float(err[row] / flux[row]),
                                       "err_cat": float(np.sqrt(np.sum((np.array(slopes) * errs) ** 2)))})
        context.engine.dispose()
    return frames


def report(frames: list[dict]) -> None:
    import numpy as np
    from scipy import stats

    print(f"{'file':37s} {'band':4s} {'n':>2s} {'zp':>8s} {'dzp':>6s} {'flags':24s} {'zp_LS':>8s} "
          f"{'delta':>7s} {'d/dzp':>6s} {'phrms':>6s} {'nphot':>5s}")
    for f in frames:
        ours = (f"{f['zp']:8.4f} {f['dzp']:6.4f}" if f.get("zp") is not None else f"{'-':>8s} {'-':>6s}")
        delta = (f"{f['zp'] - f['zp_ls']:+7.4f} {(f['zp'] - f['zp_ls']) / f['dzp']:+6.2f}"
                 if f.get("zp") is not None else f"{'-':>7s} {'-':>6s}")
        print(f"{f['file']:37s} {f['band']:4s} {f.get('n', 0):2d} {ours} {f.get('flags', 'FAILED'):24s} "
              f"{f['zp_ls']:8.4f} {delta} {f['phrms']:6.4f} {f['nphotom']:5d}")
    for f in frames:
        if f.get("error") or f.get("zp") is None:
            print(f"  {f['file']}: {f.get('error') or f['note']}")

    print("\ncalibrators (residual = catalog mag - calibrated mag, about the frame's zp):")
    for f in frames:
        for s in f["stars"]:
            print(f"  {f['file']:37s} {f['band']} G {s['G']:6.3f} BP-RP {s['bp_rp']:5.2f} residual "
                  f"{s['residual']:+.4f}  err_phot {s['err_phot']:.4f}  err_gaia {s['err_cat']:.4f}")

    print("\npooled per-star scatter about each frame's zp (ours) and LS ccdphrms (median over CCDs):")
    for band in sorted({f["band"] for f in frames}) + ["all"]:
        sel = [f for f in frames if band in ("all", f["band"])]
        res = np.array([s["residual"] for f in sel for s in f["stars"]])
        dof = len(res) - sum(1 for f in sel if f["stars"])
        noise = np.sqrt(np.mean([s["err_phot"] ** 2 + s["err_cat"] ** 2 for f in sel for s in f["stars"]]
                                or [np.nan]))
        if dof > 0:
            rms = np.sqrt(np.sum(res**2) / dof)
            lo, hi = rms * np.sqrt(dof / stats.chi2.ppf([0.975, 0.025], dof))
            ours = (f"{len(res)} stars, dof {dof}: 1.4826 MAD {1.4826 * np.median(np.abs(res)):.4f}, rms {rms:.4f} "
                    f"(95% {lo:.4f}-{hi:.4f}), expected from noise {noise:.4f}")
        else:
            ours = f"{len(res)} stars: no degree of freedom"
        ls = [f["phrms"] for f in sel]
        print(f"  {band:3s}: ours {ours};  LS ccdphrms {np.median(ls):.4f} (range {min(ls):.4f}-{max(ls):.4f}, "
              f"{int(np.median([f['nphotom'] for f in sel]))} stars/CCD)")

    cal = [f for f in frames if f.get("zp") is not None]
    delta = np.array([f["zp"] - f["zp_ls"] for f in cal])
    dzp = np.array([f["dzp"] for f in cal])
    pulls = delta / dzp
    print(f"\n{len(cal)} of {len(frames)} frames calibrated; pulls {np.round(pulls, 2).tolist()}")
    if len(cal):
        w = 1 / dzp**2
        chi2 = float(np.sum(pulls**2))
        std = f"{np.std(pulls, ddof=1):.2f}" if len(cal) > 1 else "undefined (1 frame)"
        print(f"mean delta (weighted) {np.sum(w * delta) / np.sum(w):+.4f} +- {1 / np.sqrt(np.sum(w)):.4f} mag; "
              f"std of pulls {std}; chi^2 {chi2:.2f} for {len(cal)} dof (p = {stats.chi2.sf(chi2, len(cal)):.2f})")
        print("pulls with dzp^2 = stat^2 + s^2/n + floor^2 (stat: the fit's photometric part, i.e. our dzp "
              "less star_scatter_mag^2/n where ZP_FEW_STARS):")
        stat2 = dzp**2 - np.array([f["prior"] ** 2 / f["n"] * ("ZP_FEW_STARS" in f["flags"]) for f in cal])
        n = np.array([f["n"] for f in cal])
        for s in (0.0, 0.015, 0.02, 0.03):
            cells = []
            for floor in (0.0, 0.01, 0.02, 0.03):
                model = np.sqrt(stat2 + s**2 / n + floor**2)
                cells.append(f"floor {floor:.2f}: dzp {'/'.join(f'{v:.4f}' for v in model)} "
                             f"pull {'/'.join(f'{v:+.2f}' for v in delta / model)}")
            print(f"  s {s:.3f}:  " + ";  ".join(cells))


def main() -> None:
    os.environ.pop("SEECHANGE_CONFIG", None)     # no user configuration
    if not DATA.is_dir():
        sys.exit(f"the shared real data folder {DATA} is missing")
    warnings.simplefilter("ignore")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_real_zp_") as tmp:
        os.environ["SEECHANGE_DATA"] = tmp
        frames = run_frames(Path(tmp))
    report(frames)
    print(f"\nruntime {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
