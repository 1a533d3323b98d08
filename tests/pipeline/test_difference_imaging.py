"""Difference imaging through the pipeline: make-ref, subtraction, detection, cutting, measuring.

A simulated field: three reference epochs, then a new epoch with worse seeing, a shifted and
rotated pointing, and injected transients (some on galaxies).  The references are calibrated and
coadded (`pipeline.make_ref`); the new epoch runs through the whole configured pipeline, and
the measurements are compared with the injected truth.
"""

from __future__ import annotations

import numpy as np
import pytest
from astropy.table import Table

from improc.simulator import SimulationParams, simulate_image
from models.image import Image, ingest_file
from models.instruments.synthetic import write_simulated_file
from pipeline.data_store import DataStore
from pipeline.make_ref import NoComponentsError, make_reference
from pipeline.runner import run_all
from pipeline.step import StepError
from pipeline.top import Pipeline
from util.gaia import write_gaia_folder

SIZE = 512
N_TRANSIENTS = 40


def _field(folder):
    """Three reference epochs and one new epoch with transients; the Gaia folder."""
    common = dict(nx=SIZE, ny=SIZE, scene_seed=21, detector_seed=21, star_density=60000.0,
                  pointing_error_arcsec=10.0, rotation_error_deg=0.3)
    refs = [simulate_image(SimulationParams(seed=300 + k, mjd=60000.1 + k, fwhm_arcsec=0.9 + 0.05 * k, **common))
            for k in range(3)]
    first = refs[0]
    rng = np.random.default_rng(5)
    ra0, dec0 = first.params.ra, first.params.dec
    half = SIZE * first.params.pixel_scale / 3600.0 * 0.42
    n_field = N_TRANSIENTS - 10
    field = Table({"ra": ra0 + rng.uniform(-half, half, n_field) / np.cos(np.deg2rad(dec0)),
                   "dec": dec0 + rng.uniform(-half, half, n_field), "mag": rng.uniform(18.5, 22.5, n_field)})
    from improc.simulator import place_transients_in_hosts

    hosted = place_transients_in_hosts(first.galaxies, list(rng.uniform(18.5, 21.5, 10)), rng)
    transients = Table({"ra": np.concatenate([field["ra"], hosted["ra"]]),
                        "dec": np.concatenate([field["dec"], hosted["dec"]]),
                        "mag": np.concatenate([field["mag"], hosted["mag"]])})
    new = simulate_image(SimulationParams(seed=400, mjd=60010.1, fwhm_arcsec=1.3, **common),
                         stars=first.star_catalog, galaxies=first.galaxies, transients=transients)
    paths = [write_simulated_file(sim, folder / f"epoch_{k}.fits", raw=True, seed=k)
             for k, sim in enumerate([*refs, new])]
    write_gaia_folder(first.gaia, folder / "gaia")
    return paths, refs, new


@pytest.fixture(scope="module")
def field(tmp_path_factory):
    return _field(tmp_path_factory.mktemp("diffield"))


def test_references_subtraction_and_measurements_recover_the_injected_transients(database, field):
    paths, refs, new_sim = field
    gaia = str(paths[0].parent / "gaia")
    catalog = {"catalog": "gaia_folder", "catalog_folder": gaia}
    config = database.config(astrocal=catalog, photocal=catalog)
    from models.context import Context

    context = Context.from_config(config)
    exposures = [ingest_file(p, context=context)[0] for p in paths]
    ref_ids, new_id = [str(e.id) for e in exposures[:3]], str(exposures[3].id)

    # before any reference exists, the pipeline stops after photocal and says why
    stores = run_all(context, ids=ref_ids, tag="dr1")
    assert all("nothing_to_do" in ds.stats["subtraction"] for ds in stores)
    assert "make-ref" in stores[0].stats["subtraction"]["nothing_to_do"]

    with pytest.raises(NoComponentsError, match="filter g"):
        make_reference(context, ra=refs[0].params.ra, dec=refs[0].params.dec, filter="g")
    made = make_reference(context, ra=refs[0].params.ra, dec=refs[0].params.dec, filter="r",
                          end_mjd=60005.0)
    assert len(made.components) == 3 and made.coadd.type.value == "coadd"
    assert sorted(made.coadd.components) == sorted(str(ds.image.id) for ds in stores)
    # the coadd is deeper than any component
    depths = [ds.get_zp().lim_mag for ds in stores]
    assert made.reference.lim_mag > max(depths) + 0.3
    again = make_reference(context, ra=refs[0].params.ra, dec=refs[0].params.dec, filter="r", end_mjd=60005.0)
    assert again.reference.id == made.reference.id and again.coadd.id == made.coadd.id

    (ds,) = run_all(context, ids=[new_id], tag="dr1")
    assert ds.get_reference().id == made.reference.id
    sub = ds.get_sub_image()
    assert sub.type.value == "difference" and sub.new_image_id == ds.image.id
    # S_corr away from every source (12 pixels from any |S_corr| > 4) and from masked pixels
    from scipy import ndimage

    score = sub.extra("SCORE")
    free = ~ndimage.binary_dilation(np.abs(score) > 4, iterations=12) & (sub.flags == 0)
    assert free.mean() > 0.4
    assert 0.9 < np.std(score[free]) < 1.15 and abs(np.mean(score[free])) < 0.25

    ms = ds.get_measurement_set()
    kept = [m for m in ms.measurements if not m.is_bad]
    truth = new_sim.transients
    xy = np.array([[m.x, m.y] for m in kept])
    snr_true = truth["flux_adu"] / np.sqrt(truth["flux_adu"] / float(ds.image.header.get("GAIN", 1.0))
                                          + 4 * np.pi * (1.3 / 2.355 / 0.263) ** 2
                                          * (1.0 / np.median(ds.image.weight)))
    found, ratios = [], []
    for t, s in zip(truth, snr_true):
        if not (10 < t["x"] < SIZE - 10 and 10 < t["y"] < SIZE - 10):
            continue
        ix, iy = int(round(t["x"])), int(round(t["y"]))
        if sub.flags[iy - 3:iy + 4, ix - 3:ix + 4].any():
            continue    # where the reference has no data (its components' bad pixels), nothing is found
        d = np.hypot(xy[:, 0] - t["x"], xy[:, 1] - t["y"]) if len(xy) else np.array([np.inf])
        hit = int(np.argmin(d))
        ok = d[hit] < 1.5
        found.append((s, ok))
        if ok and s > 20:   # calibrated fluxes: the new image's zero point against the simulator's
            ratios.append(10 ** (-0.4 * (kept[hit].mag_psf - t["mag"])))
    bright = [ok for s, ok in found if s >= 10]
    assert len(bright) >= 25 and np.mean(bright) >= 0.95
    assert abs(np.median(ratios) - 1.0) < 0.05
    matched = {int(np.argmin(np.hypot(xy[:, 0] - t["x"], xy[:, 1] - t["y"]))) for t in truth} if len(xy) else set()
    spurious = [m for i, m in enumerate(kept) if i not in matched]
    # 19 here while the fitted PSFs' wings were noise (a square patch of residuals around each
    # bright star); 2 since extraction 1.4 (Moffat-tail wings) and measuring 1.2 (35 of the 36
    # S/N >= 10 transients kept).  Issue 10 asks for <= 25 per 2048 x 2048.
    assert len(spurious) <= 2, [repr(m) for m in spurious]
    m = kept[0]
    assert m.sub_data.shape == (41, 41) and m.new_weight.shape == (41, 41)
    assert np.isfinite(m.ref_data).all()

    # the notebook path: load the tag, every product is there
    nb = DataStore(ds.image, context=context)
    nb.load_prov_tree("dr1")
    assert nb.get_reference().id == made.reference.id
    assert nb.get_sub_image().id == sub.id
    assert nb.get_measurement_set().id == ms.id
    assert nb.get_cutouts().num_cutouts == nb.get_detections().num_sources

    # running again makes nothing new
    (again_ds,) = run_all(context, ids=[new_id])
    assert all(st.get("skipped") for st in again_ds.stats.values())


def test_an_image_without_a_covering_reference_is_marked_and_named(database, field, tmp_path):
    paths, refs, new_sim = field
    gaia = str(paths[0].parent / "gaia")
    catalog = {"catalog": "gaia_folder", "catalog_folder": gaia}
    from models.context import Context

    context = Context.from_config(database.config(astrocal=catalog, photocal=catalog))
    exposures = [ingest_file(p, context=context)[0] for p in paths[:2]]
    images = [ds.image for ds in run_all(context, ids=[str(e.id) for e in exposures])]
    # a reference made of the first epoch only, valid until before the second
    made = make_reference(context, image_ids=[str(images[0].id)], valid_until_mjd=60000.5)
    assert made.reference.valid_until_mjd == 60000.5
    with pytest.raises(StepError, match="not valid at the image's date") as err:
        Pipeline(context).run(images[1])
    assert err.value.bad_data and images[1].describe() in str(err.value)
    assert made.coadd.describe() in str(err.value) or str(made.coadd.id)[:8] in str(err.value)
    with context.session() as session:
        stored = session.get(Image, images[1].id)
    assert "NO_REFERENCE" in stored.badness


def test_make_ref_through_the_command_line(field, tmp_path, capsys):
    import yaml

    from pipeline.cli import main

    paths, refs, _ = field
    gaia = str(paths[0].parent / "gaia")
    config = tmp_path / "user.yaml"
    config.write_text(yaml.safe_dump({
        "db": {"url": f"sqlite:///{tmp_path / 'db.sqlite'}"}, "storage": {"data_root": str(tmp_path / "root")},
        "astrocal": {"catalog": "gaia_folder", "catalog_folder": gaia},
        "photocal": {"catalog": "gaia_folder", "catalog_folder": gaia}}))
    assert main(["ingest", *map(str, paths[:2]), "--config", str(config)]) == 0
    assert main(["run", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert out.count("subtraction: nothing to do") == 2 and "seechange make-ref" in out
    ra, dec = f"{refs[0].params.ra:.5f}", f"{refs[0].params.dec:.5f}"
    assert main(["make-ref", "--ra", ra, "--dec", dec, "--filter", "g", "--config", str(config)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no science image contains" in err[0] and "filter g" in err[0]
    assert main(["make-ref", "--ra", ra, "--dec", dec, "--filter", "r", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "components: 2 image(s)" in out and "tagged 'references'" in out
    # the images that made the reference now have one (their own coadd): the chain runs through
    assert main(["run", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert out.count("measuring") == 2 and "nothing to do" not in out


def _epoch(folder, name, *, seed, **params):
    common = dict(nx=SIZE, ny=SIZE, scene_seed=21, detector_seed=21, star_density=60000.0,
                  pointing_error_arcsec=10.0, rotation_error_deg=0.3, mjd=60020.1, seed=seed)
    sim = simulate_image(SimulationParams(**{**common, **params}))
    return write_simulated_file(sim, folder / f"{name}.fits", raw=True, seed=seed), sim


def test_images_no_reference_can_serve_fail_one_by_one_and_the_batch_goes_on(database, field, tmp_path):
    """Another filter, too little overlap: each image fails with both images and the reason named,
    is marked NO_REFERENCE, keeps its calibration and nothing of the subtraction; the good one goes
    through."""
    from models.context import Context
    from pipeline.runner import RunFailures

    paths, refs, _ = field
    gaia = str(paths[0].parent / "gaia")
    catalog = {"catalog": "gaia_folder", "catalog_folder": gaia}
    context = Context.from_config(database.config(astrocal=catalog, photocal=catalog))
    ref_exposure = ingest_file(paths[0], context=context)[0]
    (ref_ds,) = run_all(context, ids=[str(ref_exposure.id)])
    made = make_reference(context, image_ids=[str(ref_ds.image.id)])
    p0 = refs[0].params
    width = SIZE * p0.pixel_scale / 3600.0
    g_path, _ = _epoch(tmp_path, "g_band", seed=501, band="g")
    off_path, _ = _epoch(tmp_path, "half_off", seed=502, ra=p0.ra + 0.5 * width / np.cos(np.deg2rad(p0.dec)))
    good_path, _ = _epoch(tmp_path, "good", seed=503)
    exposures = [ingest_file(p, context=context)[0] for p in (g_path, off_path, good_path)]
    with pytest.raises(RunFailures, match="2 of 3 work items failed"):
        run_all(context, ids=[str(e.id) for e in exposures])
    from sqlalchemy import select

    from models.measurements import MeasurementSet
    from models.zero_point import ZeroPoint

    with context.session() as session:
        images = {e.id: session.scalars(select(Image).where(Image.exposure_id == e.id)).one() for e in exposures}
        differences = session.scalars(select(Image).where(Image.type == "difference")).all()
        assert session.scalars(select(ZeroPoint)).all().__len__() == 1 + 1 + 3   # ref, its coadd, the three
        assert len(session.scalars(select(MeasurementSet)).all()) == 1
    g_image, off_image, good_image = (images[e.id] for e in exposures)
    assert [d.new_image_id for d in differences] == [good_image.id]
    for bad in (g_image, off_image):
        assert bad.badness == ["NO_REFERENCE"]
        ds = DataStore(bad, context=context)
        ds.make_prov_tree()
        with pytest.raises(StepError) as err:
            Pipeline(context).run(ds)
        text = str(err.value)
        assert bad.describe() in text and str(made.coadd.id)[:8] in text
        assert ("filter r, not g" in text) if bad is g_image else ("< min_overlap 85%" in text)
    assert good_image.badness == []
