"""The demo: simulated exposures through the whole pipeline on the embedded SQLite default.

``seechange demo`` makes a few raw exposures of one simulated field with the project's own
simulator (so it needs no data and no network), writes the field's Gaia-like catalog as a local
catalog folder, ingests the exposures, runs the pipeline (preprocessing, background, sources and
PSF, astrometry, zero point), tags the provenances ``demo`` and prints what
``Image.find_images`` finds, with the calibration compared to the simulator's truth.  Then it
makes a reference of those epochs (``make-ref``: their coadd, calibrated and registered),
simulates a later epoch with injected transients, runs it through subtraction, detection,
cutting and measuring, and prints the detections next to the injected truth.
Running it again finds everything in place and creates nothing new.
"""

from __future__ import annotations

import logging
from pathlib import Path

__all__ = ["run_demo"]

TAG = "demo"
#: Transients injected into the new epoch.
N_TRANSIENTS = 20


def _simulate(folder: Path, n_images: int, size: int):
    """Write the raw exposures and the catalog folder (once); return paths and simulations."""
    from improc.simulator import SimulationParams, simulate_image
    from models.instruments.synthetic import write_simulated_file
    from util.gaia import write_gaia_folder

    folder.mkdir(parents=True, exist_ok=True)
    sims, paths = [], []
    for k in range(n_images):
        params = SimulationParams(nx=size, ny=size, seed=1000 + k, scene_seed=7, detector_seed=7,
                                  mjd=60400.1 + 3.0 * k, star_density=40000.0, pointing_error_arcsec=20.0,
                                  rotation_error_deg=0.5, fwhm_arcsec=0.9 + 0.15 * k)
        sim = simulate_image(params, stars=sims[0].star_catalog if sims else None,
                             galaxies=sims[0].galaxies if sims else None)
        sims.append(sim)
        path = folder / f"demo_raw_{k}.fits"
        if not path.exists():
            write_simulated_file(sim, path, raw=True, seed=k)
        paths.append(path)
    write_gaia_folder(sims[0].gaia, folder / "gaia")
    return paths, sims


def _simulate_new_epoch(folder: Path, sims: list, size: int):
    """A later epoch of the field, worse seeing, with transients (some on galaxies)."""
    import numpy as np
    from astropy.table import Table

    from improc.simulator import SimulationParams, place_transients_in_hosts, simulate_image
    from models.instruments.synthetic import write_simulated_file

    first = sims[0]
    rng = np.random.default_rng(2024)
    half = size * first.params.pixel_scale / 3600.0 * 0.45
    n_field = N_TRANSIENTS - 5
    ra0, dec0 = first.params.ra, first.params.dec
    hosted = place_transients_in_hosts(first.galaxies, list(rng.uniform(19.0, 21.5, 5)), rng)
    transients = Table({
        "ra": np.concatenate([ra0 + rng.uniform(-half, half, n_field) / np.cos(np.deg2rad(dec0)), hosted["ra"]]),
        "dec": np.concatenate([dec0 + rng.uniform(-half, half, n_field), hosted["dec"]]),
        "mag": np.concatenate([rng.uniform(18.5, 22.0, n_field), hosted["mag"]])})
    params = SimulationParams(nx=size, ny=size, seed=2000, scene_seed=7, detector_seed=7, mjd=60430.1,
                              star_density=40000.0, pointing_error_arcsec=20.0, rotation_error_deg=0.5,
                              fwhm_arcsec=1.3)
    sim = simulate_image(params, stars=first.star_catalog, galaxies=first.galaxies, transients=transients)
    path = folder / "demo_new_epoch.fits"
    if not path.exists():
        write_simulated_file(sim, path, raw=True, seed=99)
    return path, sim


def _print_detections(ds, sim) -> None:
    """The measurements next to the injected transients: recovered, missed, spurious."""
    import numpy as np

    ms = ds.get_measurement_set()
    kept = [m for m in ms.measurements if not m.is_bad]
    xy = np.array([[m.x, m.y] for m in kept]).reshape(-1, 2)
    truth = sim.transients
    zp = ds.get_zp().zp
    print(f"\n{ms.num_detections} detections above {5:g} sigma on the difference image, {ms.num_kept} kept by the "
          f"cuts, {ms.num_bad} of them marked bad")
    print("  injected transients (true mag) -> measured mag on the difference:")
    used = set()
    recovered = 0
    for t in sorted(truth, key=lambda row: row["mag"]):
        d = np.hypot(xy[:, 0] - t["x"], xy[:, 1] - t["y"]) if len(xy) else np.array([np.inf])
        k = int(np.argmin(d))
        if d[k] < 2.0:
            used.add(k)
            recovered += 1
            m = kept[k]
            print(f"    x {t['x']:7.1f} y {t['y']:7.1f}  mag {t['mag']:5.2f} -> {m.mag_psf:5.2f} +- "
                  f"{m.mag_psf_err:.2f}  (S/N {m.snr:5.1f})  recovered")
        else:
            near = [m for m in ms.measurements if m.is_bad and np.hypot(m.x - t["x"], m.y - t["y"]) < 2.0]
            why = f"measured, marked bad ({near[0].bad_reasons})" if near else "missed"
            print(f"    x {t['x']:7.1f} y {t['y']:7.1f}  mag {t['mag']:5.2f} -> {why}")
    spurious = [m for k, m in enumerate(kept) if k not in used]
    print(f"  recovered {recovered} of {len(truth)}; {len(spurious)} kept detection(s) match no injected "
          f"transient (zero point {zp:.3f})")


def _write_demo_config(path: Path, config, catalog: dict) -> None:
    """A configuration a user can reuse after the demo: its database, data root and catalog folder."""
    import yaml

    values = {"db": {"url": config.get("db.url")},
              "storage": {"data_root": config.get("storage.data_root")},
              "astrocal": dict(catalog), "photocal": dict(catalog)}
    text = ("# Written by `seechange demo`: the demo's database and data root, with the demo's Gaia\n"
            "# catalog folder for astrometry and photometry (no network needed).  Reuse it with\n"
            "#   seechange --config THIS_FILE run | images | provenance list\n")
    path.write_text(text + yaml.safe_dump(values, sort_keys=False))


def run_demo(*, config_path: str | None = None, n_images: int = 3, size: int = 1024,
             verbose: bool = False) -> list:
    """Run the demo and print what it finds; return the images found.

    Parameters
    ----------
    config_path : str, optional
        User config file; its data root and database are used (default ``~/.seechange``).
    n_images : int
        Number of simulated exposures.
    size : int
        Side of each simulated image, pixels.
    verbose : bool
        Log each step.
    """
    from models.context import Context, use_context
    from models.image import Image, ingest_file
    from models.schema import upgrade
    from pipeline.data_store import DataStore
    from pipeline.runner import run_all
    from util.config import Config

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    base = Config.load(config_path)
    folder = Path(base.get("storage.data_root")) / "demo_inputs"
    catalog = {"catalog": "gaia_folder", "catalog_folder": str(folder / "gaia")}
    config = Config.load(config_path, astrocal=catalog, photocal=catalog)
    context = use_context(Context.from_config(config))
    print(f"SeeChange demo: data root {config.get('storage.data_root')}")
    print(f"database {context.engine.url.render_as_string(hide_password=True)}")
    upgrade(context.engine)

    paths, sims = _simulate(folder, n_images, size)
    demo_config = folder / "demo_config.yaml"
    _write_demo_config(demo_config, config, catalog)
    print(f"\nsimulated {len(paths)} raw exposures of one field ({size} x {size} pixels)")
    exposures = [ingest_file(path, context=context)[0] for path in paths]
    print(f"ingested {len(exposures)} exposures\n\nrunning the pipeline:")
    stores = run_all(context, ids=[str(e.id) for e in exposures], tag=TAG)

    ra, dec = stores[0].image.ra, stores[0].image.dec
    with context.session() as session:
        images = Image.find_images(tag=TAG, ra=ra, dec=dec, filter="r", type="science", order_by="quality",
                                   session=session)
    print(f"\nImage.find_images(tag='{TAG}', ra={ra:.4f}, dec={dec:.4f}, filter='r', type='science', order_by='quality'): "
          f"{len(images)} image(s), best first")
    print("       mjd  seeing(\")       zp  true zp  lim mag  wcs rms(\")  id")
    truth = {round(s.params.mjd, 4): s for s in sims}
    for image in images:
        ds = DataStore(image, context=context)
        ds.load_prov_tree(TAG)
        zp, psf, wcs = ds.get_zp(), ds.get_psf(), ds.get_wcs()
        sim = truth.get(round(image.mjd, 4))
        true_zp = f"{sim.params.zero_point:8.3f}" if sim is not None else f"{'?':>8}"
        print(f"{image.mjd:10.3f} {psf.fwhm_arcsec:9.2f} {zp.zp:8.3f} {true_zp} {zp.lim_mag:8.2f} "
              f"{wcs.rms_arcsec:11.3f}  {image.id}")
    n_sources = [ds.get_sources().num_sources for ds in stores]
    print(f"\nsources per image: {n_sources}")

    from pipeline.make_ref import make_reference

    print(f"\nmake-ref (seechange make-ref --ra {ra:.4f} --dec {dec:.4f} --filter r):")
    made = make_reference(context, ra=ra, dec=dec, filter="r", end_mjd=60420.0)
    print(f"  {made.describe()}")
    new_path, new_sim = _simulate_new_epoch(folder, sims, size)
    new_exposure = ingest_file(new_path, context=context)[0]
    print(f"\na new epoch with {len(new_sim.transients)} injected transients; running the pipeline on every "
          "epoch (the first ones had no reference until now):")
    new_ds = run_all(context, ids=[*(str(e.id) for e in exposures), str(new_exposure.id)], tag=TAG)[-1]
    _print_detections(new_ds, new_sim)
    print(f"\nprovenance tag '{TAG}' covers {len(new_ds.prov_tree)} processes.  Run again: every step is skipped.")
    print(f"To go on from here (same database, the demo's catalog folder, no network):\n"
          f"  seechange --config {demo_config} provenance list")
    return images
