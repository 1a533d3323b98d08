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
