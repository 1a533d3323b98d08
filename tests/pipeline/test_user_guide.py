"""The user guide's notebook words (../shared/seeds/using-seechange.txt), verbatim, on a pipeline run.

Users paste these lines; they must keep working as written: a tag's preprocessing provenance,
``Image.find_images`` with it, a DataStore loaded from the tag, and every ``get_*`` the guide
lists that exists yet.
"""

from __future__ import annotations

import numpy as np
import pytest

from models.image import ingest_file
from pipeline.runner import run_all


def test_the_notebook_words_of_the_user_guide(database, sim_field):
    context = database.context_with(sim_field.config(database))
    exposure, _ = ingest_file(sim_field.paths[0])
    made = run_all(context, ids=[str(exposure.id)], tag="dr1")[0]
    ra0, dec0 = made.image.ra, made.image.dec

    # --- the guide, verbatim ---
    from models.provenance import Provenance
    prov = Provenance.get_for_tag( tag="dr1", process="preprocessing" )
    from models.image import Image
    images = Image.find_images( provenance_ids=prov.id, ra=ra0, dec=dec0, filter="r" )
    from pipeline.data_store import DataStore
    image = images[0]
    ds = DataStore( image )
    ds.load_prov_tree( "dr1" )
    # --- end of the guide's code ---

    assert ds.get_image() is ds.image and ds.image.id == made.image.id
    sources, psf, bg, wcs, zp = ds.get_sources(), ds.get_psf(), ds.get_background(), ds.get_wcs(), ds.get_zp()
    assert sources.id == made.get_sources().id and psf.get_clip(200.0, 300.0).sum() == pytest.approx(1.0, abs=1e-6)
    assert bg.counts.shape == (image.ny, image.nx)
    ra, dec = wcs.wcs.pixel_to_world_values(sources.x, sources.y)   # "use DataStore.get_wcs()"
    assert np.allclose((ra, dec), sources.radec(wcs))
    # mag = -2.5 log10(adu) + zp, and the aperture corrections of the guide's definition
    flux, _ = sources.psffluxadu()
    assert np.isfinite(zp.zp) and np.all(np.isfinite(zp.mag(flux[flux > 0])))
    assert len(zp.aper_cors) == len(zp.aper_cor_radii) == len(sources.aper_radii)


@pytest.fixture(scope="module")
def epochs(tmp_path_factory):
    from tests.pipeline.test_difference_imaging import _field

    return _field(tmp_path_factory.mktemp("guide_epochs"))


def test_the_notebook_words_after_difference_imaging(database, epochs):
    from models.context import Context
    from pipeline.make_ref import make_reference

    paths, refs, new_sim = epochs
    catalog = {"catalog": "gaia_folder", "catalog_folder": str(paths[0].parent / "gaia")}
    context = database.context_with(database.config(astrocal=catalog, photocal=catalog))
    exposures = [ingest_file(p)[0] for p in paths]
    run_all(context, ids=[str(e.id) for e in exposures[:3]], tag="dr1")
    made = make_reference(Context.from_config(context.config), ra=refs[0].params.ra, dec=refs[0].params.dec,
                          filter="r", end_mjd=60005.0)
    new = run_all(context, ids=[str(exposures[3].id)], tag="dr1")[0]

    # --- the guide, verbatim ---
    from models.provenance import Provenance
    prov = Provenance.get_for_tag( tag="dr1", process="preprocessing" )
    from models.image import Image
    images = Image.find_images( provenance_ids=prov.id, ra=new.image.ra, dec=new.image.dec, filter="r",
                                min_mjd=60009.0 )
    from pipeline.data_store import DataStore
    image = images[0]
    ds = DataStore( image )
    ds.load_prov_tree( "dr1" )
    ref = ds.get_referenece()
    sub = ds.get_sub_image()
    detections = ds.get_detections()
    cutouts = ds.get_cutouts()
    ms = ds.get_measurement_set()
    m = ms.measurements[0]
    values = ( m.flux_psf, m.flux_psf_err, m.x, m.y )
    stamps = ( m.new_data, m.new_weight, m.new_flags, m.ref_data, m.ref_weight, m.ref_flags,
               m.sub_data, m.sub_weight, m.sub_flags )
    m.get_data_from_cutouts( cutouts, detections )
    # --- end of the guide's code ---

    assert image.id == new.image.id
    # "returns an Image ... the reference image used in subtraction, not aligned with the science image"
    assert ref.id == made.reference.id == ds.get_reference().id
    assert ref.data.shape == (made.coadd.ny, made.coadd.nx) and ref.image.id == made.coadd.id
    # "aligned with and scaled to the main image, so you can use the same WCS and zeropoint"
    assert sub.new_image_id == image.id and (sub.nx, sub.ny) == (image.nx, image.ny)
    assert sub.wcs_header == ds.get_wcs().wcs.to_header(relax=True).tostring(sep="\n")
    assert ds.get_zeropoint().id == ds.get_zp().id
    assert detections.image_id == sub.id and cutouts.num_cutouts == detections.num_sources
    assert ms.num_kept <= ms.num_detections == detections.num_sources
    assert all(np.isfinite(values)) and all(s.shape == (41, 41) for s in stamps)
    # the stamps are cut where the measurement is: the sub stamp's centre holds the flux
    assert m.sub_data[20, 20] * np.sign(m.flux_psf) > 0
