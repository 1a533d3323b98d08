"""Golden fingerprints: each step's key figures on a fixed simulated exposure, per code version.

A step's provenance contains its code version (major.minor), so a change of results without a
version bump would give two different products the same provenance.  This module guards
against that: it runs the pipeline on a fixed simulated raw exposure (`FIELD`, made by the
project's simulator from fixed seeds) and takes each step's figures (`Step.fingerprint_figures`:
the numbers of its products, rounded to `SIGNIFICANT_DIGITS`, and compared within a relative
`TOLERANCE` so that floating-point noise of libraries does not count: a fresh install's newer
numpy or scipy moves a figure's last digit, a changed algorithm moves more).  ``fingerprints.json`` beside this module keeps, per process, the
version the figures belong to and the figures.  ``tests/pipeline/test_fingerprints.py`` fails
when a step's figures changed and its version did not, or when its version changed and the
figures were not recorded.

After a deliberate change of results: bump the step's ``version`` (minor at least), then

    python -m pipeline.fingerprints --update

which records the figures of the steps whose version changed (and refuses to overwrite those of
a step whose version did not, unless ``--force``).
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["FIELD", "SIGNIFICANT_DIGITS", "TOLERANCE", "compute_fingerprints", "stored_fingerprints",
           "fingerprint_path", "major_minor", "same_figures"]

#: Significant digits kept of every float figure.
SIGNIFICANT_DIGITS = 5

#: Relative difference below which two float figures are the same result.  (Rounding alone is
#: not enough: a value beside a rounding boundary flips its last digit with the libraries'
#: noise, e.g. measuring's flux sum 21746 -> 21743 on a fresh install.)
TOLERANCE = 1e-4

#: The fixed simulated exposure (keyword arguments of `improc.simulator.SimulationParams`).
FIELD: dict[str, Any] = dict(nx=512, ny=512, seed=4242, scene_seed=4242, detector_seed=4242,
                             mjd=60123.25, star_density=60000.0, fwhm_arcsec=1.0,
                             pointing_error_arcsec=10.0, rotation_error_deg=0.3)


def fingerprint_path() -> Path:
    return Path(__file__).with_name("fingerprints.json")


def major_minor(version: str) -> str:
    return ".".join(version.split(".")[:2])


def rounded(value: Any) -> Any:
    """A figure made insensitive to floating-point noise: floats to `SIGNIFICANT_DIGITS`."""
    if isinstance(value, (list, tuple)):
        return [rounded(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        if not math.isfinite(value) or value == 0.0:
            return value if math.isfinite(value) else str(value)
        return float(f"{value:.{SIGNIFICANT_DIGITS}g}")
    return value


def same_figures(current: Any, stored: Any) -> bool:
    """Whether two figures (or lists or dicts of them) are the same result: integers, booleans
    and strings equal, floats within a relative `TOLERANCE`."""
    if isinstance(current, dict) and isinstance(stored, dict):
        return current.keys() == stored.keys() and all(same_figures(current[k], stored[k]) for k in current)
    if isinstance(current, (list, tuple)) and isinstance(stored, (list, tuple)):
        return len(current) == len(stored) and all(same_figures(a, b) for a, b in zip(current, stored))
    if isinstance(current, float) and isinstance(stored, float):
        return current == stored or math.isclose(current, stored, rel_tol=TOLERANCE)
    return current == stored


def compute_fingerprints(workdir: str | Path) -> dict[str, dict[str, Any]]:
    """Run the default pipeline on `FIELD` in a fresh SQLite database below ``workdir``.

    Returns
    -------
    dict
        Process -> {"version": major.minor, "figures": {...}} for every default step.
    """
    from improc.simulator import SimulationParams, simulate_image
    from models.context import Context
    from models.image import ingest_file
    from models.instruments.synthetic import write_simulated_file
    from models.schema import upgrade
    from pipeline.step import step_class
    from pipeline.top import Pipeline
    from util.config import Config
    from util.gaia import write_gaia_folder

    from astropy.table import Table

    from pipeline.make_ref import make_reference

    workdir = Path(workdir)
    sim = simulate_image(SimulationParams(**FIELD))
    # a later epoch of the same field, with a few transients, for the difference-imaging steps
    later = SimulationParams(**{**FIELD, "seed": FIELD["seed"] + 1, "mjd": FIELD["mjd"] + 30.0,
                                "fwhm_arcsec": 1.3})
    transients = Table({"ra": sim.params.ra + np.array([-8.0, 0.0, 9.0]) / 3600.0,
                        "dec": sim.params.dec + np.array([5.0, -12.0, 14.0]) / 3600.0,
                        "mag": [19.5, 20.5, 21.5]})
    new = simulate_image(later, stars=sim.star_catalog, galaxies=sim.galaxies, transients=transients)
    raw = write_simulated_file(sim, workdir / "field.fits", raw=True, seed=1)
    raw_new = write_simulated_file(new, workdir / "field_new.fits", raw=True, seed=2)
    write_gaia_folder(sim.gaia, workdir / "gaia")
    catalog = {"catalog": "gaia_folder", "catalog_folder": str(workdir / "gaia")}
    config = Config.load(**{"db.url": f"sqlite:///{workdir / 'fingerprints.sqlite'}",
                            "storage.data_root": str(workdir / "data"), "astrocal": catalog,
                            "photocal": dict(catalog)})
    context = Context.from_config(config)
    upgrade(context.engine)
    exposure, _ = ingest_file(raw, context=context)
    pipeline = Pipeline(context)
    ds = pipeline.run(exposure, exposure.section_ids[0])
    made = make_reference(context, image_ids=[str(ds.image.id)])
    exposure_new, _ = ingest_file(raw_new, context=context)
    ds_new = pipeline.run(exposure_new, exposure_new.section_ids[0])
    found = {}
    for step in pipeline.steps:
        on = ds_new if step.process in _DIFFERENCE_PROCESSES else ds
        found[step.process] = {"version": major_minor(step.version),
                               "figures": {k: rounded(v) for k, v in step.fingerprint_figures(on).items()}}
    coadd = made.coadd
    good = coadd.flags == 0
    found["coaddition"] = {"version": major_minor(step_class("coaddition").version), "figures": {
        "data_sum": rounded(float(np.sum(coadd.data[good], dtype=np.float64))),
        "weight_median": rounded(float(np.median(coadd.weight[good]))), "flagged": int(np.sum(~good))}}
    ref = made.reference
    found["referencing"] = {"version": major_minor(step_class("referencing").version), "figures": {
        "lim_mag": rounded(ref.lim_mag), "fwhm_arcsec": rounded(ref.fwhm_arcsec),
        "corners": rounded([*ref.corners[0], *ref.corners[1]])}}
    return found


#: Steps fingerprinted on the later epoch (they need a reference).
_DIFFERENCE_PROCESSES = ("subtraction", "detection", "cutting", "measuring")


def stored_fingerprints() -> dict[str, dict[str, Any]]:
    path = fingerprint_path()
    return json.loads(path.read_text()) if path.is_file() else {}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Compare or record the steps' golden fingerprints.")
    parser.add_argument("--update", action="store_true",
                        help="record the figures of steps whose version changed (or that have none)")
    parser.add_argument("--force", action="store_true", help="with --update: also steps whose version did not change")
    args = parser.parse_args(argv)
    stored = stored_fingerprints()
    with tempfile.TemporaryDirectory(prefix="seechange-fingerprints-") as tmp:
        current = compute_fingerprints(tmp)
    changed = False
    for process, entry in current.items():
        old = stored.get(process)
        same_version = old is not None and old["version"] == entry["version"]
        if same_version and same_figures(entry["figures"], old["figures"]):
            print(f"{process}: unchanged (version {entry['version']})")
            continue
        if same_version and not args.force:
            print(f"{process}: FIGURES CHANGED under version {entry['version']}: bump its version\n"
                  f"  stored  {old['figures']}\n  now     {entry['figures']}")
            continue
        print(f"{process}: {'recording' if args.update else 'to record'} version {entry['version']}: "
              f"{entry['figures']}")
        if args.update:
            stored[process] = entry
            changed = True
    if changed:
        fingerprint_path().write_text(json.dumps(stored, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
