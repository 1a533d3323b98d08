"""Image.find_images on both back ends, against a brute-force answer from improc.footprint."""

import uuid

import numpy as np
import pytest
import sqlalchemy as sa
from sqlalchemy import event

import models.image_queries as image_queries
from improc import footprint
from models.base import session_scope
from models.background import Background
from models.image import Image, ImageType
from models.provenance import Provenance, ProvenanceTag, UnknownTagError
from models.psf import PSF
from models.source_list import SourceList
from models.world_coordinates import WorldCoordinates
from models.zero_point import ZeroPoint
from tests.models.synthetic_files import footprint_rows, tan_wcs

#: Answers of the scenario per back end, to check that SQLite and PostgreSQL agree.
_ANSWERS: dict[str, dict] = {}

#: Seeing (arcsec) and depth (mag) of the scenario's images, by id: measured by the tag's
#: calibration products; images without an entry have none.
QUALITY: dict[uuid.UUID, tuple[float, float]] = {}

REGIONS = [  # (ra range, dec range) of the random images: around RA=0, both poles, mid-sky
    ((358.0, 362.0), (-3.0, 3.0)), ((0.0, 360.0), (87.5, 90.0)), ((0.0, 360.0), (-90.0, -87.5)),
    ((120.0, 125.0), (30.0, 35.0)),
]


def _provenances():
    return [Provenance(process=process, code_version="1.0.0", parameters={"n": k})
            for k, process in enumerate(("preprocessing", "coaddition"))]


def _calibration(name: str):
    return Provenance(process="calibration", code_version="1.0.0", parameters={"name": name})


def _build(rng, k, ra, dec, provs, wcs, shape, image_type, no_estimates):
    mjd = float(rng.uniform(58000, 60000))
    image = Image(
        id=uuid.UUID(int=(int(rng.integers(0, 2**62)) << 64) | k), provenance=provs[k % 2],
        instrument="DECam" if k % 3 else "Synthetic", section_id=["N1", "S4", "N6"][k % 3],
        filter=["g", "r", "i"][(k // 2) % 3], type=image_type, target=f"field{k % 5}",
        mjd=mjd, end_mjd=mjd + 0.001, exp_time=float(rng.choice([30.0, 60.0, 90.0])),
        airmass=float(rng.uniform(1.0, 2.0)),
    )
    seeing, depth = float(rng.uniform(0.7, 2.5)), float(rng.uniform(21.0, 24.0))
    if not no_estimates:
        QUALITY[image.id] = (seeing, depth)
    image.set_wcs(wcs, shape)
    return image


def _calibrate(session, image: Image, seeing: float, depth: float, prov: Provenance) -> None:
    """Rows (no files) of a calibration of ``image`` that measured this seeing and depth."""
    bg = Background(image=image, provenance_id=prov.id, box_size=64, filter_size=3, level_median=0.0,
                    rms_median=1.0)
    sources = SourceList(image=image, background=bg, provenance_id=prov.id, num_sources=0)
    psf = PSF(sources=sources, provenance_id=prov.id, fwhm_pixels=seeing / 0.26, fwhm_arcsec=seeing,
              num_stars=5)
    wcs = WorldCoordinates(sources=sources, provenance_id=prov.id, header_text="", rms_arcsec=0.03,
                           num_stars=20, catalog="test")
    zp = ZeroPoint(image=image, wcs=wcs, psf=psf, background=bg, provenance_id=prov.id, zp=30.0, dzp=0.01,
                   num_stars=20, lim_mag=depth)
    for row in (bg, sources, psf, wcs, zp):
        session.add(row)
        session.flush()


def _scenario():
    rng = np.random.default_rng(2024)
    provs = _provenances()
    images = []
    special = [(0.0, 0.0, 1.0, 20.0), (0.0, 90.0, 1.0, 10.0), (45.0, 89.75, 1.0, 0.0),
               (200.0, -89.2, 0.5, 0.0), (100.0, -90.0, 0.6, 30.0), (359.8, 0.2, 0.6, 0.0)]
    for k, (ra, dec, size, rotation) in enumerate(special):
        images.append(_build_special(rng, k, ra, dec, provs, size, rotation))
    k = len(images)
    for (ra_lo, ra_hi), (dec_lo, dec_hi) in REGIONS:
        for _ in range(45):
            ra = rng.uniform(ra_lo, ra_hi)
            dec = np.degrees(np.arcsin(rng.uniform(np.sin(np.radians(dec_lo)), np.sin(np.radians(dec_hi)))))
            images.append(_build_special(rng, k, ra, dec, provs, rng.uniform(0.2, 1.2), rng.uniform(0, 180)))
            k += 1
    return provs, images


def _build_special(rng, k, ra, dec, provs, size, rotation):
    shape = (200, 300)
    wcs = tan_wcs(ra % 360.0, dec, shape, scale_arcsec=size * 3600 / 300, rotation_deg=rotation)
    image_type = [ImageType.SCIENCE, ImageType.SCIENCE, ImageType.COADD, ImageType.DIFFERENCE][k % 4]
    return _build(rng, k, ra, dec, provs, wcs, shape, image_type, k % 7 == 0)


def _sort_key(order_by):
    def key(image):
        if order_by == "earliest":
            return (image.mjd, image.id.hex)
        if order_by == "latest":
            return (-image.mjd, image.id.hex)
        seeing, depth = QUALITY.get(image.id, (None, None))
        return (depth is None, -(depth or 0.0), seeing is None, seeing or 0.0, image.mjd, image.id.hex)
    return key


def _brute(images, *, point=None, box=None, overlapfrac=None, keep=lambda im: True,
           order_by="earliest", max_number=None):
    ra = np.array([im.corners[0] for im in images])
    dec = np.array([im.corners[1] for im in images])
    if point is not None:
        mask = footprint.points_in_polygons(point[0], point[1], ra, dec)
    elif box is not None:
        fraction = footprint.overlap_fractions(ra, dec, *footprint.box_polygon(*box))
        mask = fraction >= (overlapfrac or image_queries.MIN_OVERLAP)
    else:
        mask = np.ones(len(images), bool)
    chosen = sorted([im for im, m in zip(images, mask) if m and keep(im)], key=_sort_key(order_by))
    return [im.id for im in chosen[:max_number]]


def _ids(**criteria):
    return [im.id for im in Image.find_images(**criteria)]


POINTS = [(0.0, 0.0), (359.95, 0.25), (0.3, -0.2), (0.0, 90.0), (77.0, 89.8), (200.0, -89.5),
          (10.0, -90.0), (122.0, 32.0), (123.7, 30.9), (180.0, 0.0)]
BOXES = [(359.5, 0.5, -0.5, 0.5), (121.0, 122.5, 31.0, 32.0), (10.0, 60.0, 88.0, 89.5),
         (190.0, 230.0, -89.0, -88.0), (0.5, 1.5, 1.0, 2.0)]


def _run_scenario(images):
    answers = {}
    for point in POINTS:
        got = _ids(ra=point[0], dec=point[1])
        assert got == _brute(images, point=point), f"point {point}"
        answers[("point", point)] = got
    for box in BOXES:
        for overlapfrac in (None, 0.05, 0.3):
            got = _ids(minra=box[0], maxra=box[1], mindec=box[2], maxdec=box[3], overlapfrac=overlapfrac)
            assert got == _brute(images, box=box, overlapfrac=overlapfrac), f"box {box} {overlapfrac}"
            answers[("box", box, overlapfrac)] = got
    return answers


def _store(database, images, provs):
    """The images, a tag 'q' of their provenances and a calibration measuring QUALITY, and another
    calibration (not tagged) with other figures, which the tag must leave out."""
    tagged, other = _calibration("tagged"), _calibration("other")
    with session_scope() as session:
        for prov in [*provs, tagged, other]:
            prov.save(session)
        session.add_all(images)
        session.flush()
        for image in images:
            if image.id in QUALITY:
                _calibrate(session, image, *QUALITY[image.id], tagged)
            _calibrate(session, image, 0.5, 30.0, other)
        ProvenanceTag.add("q", [*provs, tagged], session=session)


def test_spatial_queries_match_brute_force(database, monkeypatch):
    provs, images = _scenario()
    _store(database, images, provs)
    answers = _run_scenario(images)
    # the special cases really are special
    assert len(answers[("point", (0.0, 90.0))]) >= 2       # the pole-centred and the 89.75 images
    assert images[0].minra > images[0].maxra                # straddles RA = 0
    assert images[4].mindec == -90.0 and images[1].maxdec == 90.0
    assert images[4].id in answers[("point", (10.0, -90.0))]  # contains the south pole
    assert -90.0 < images[3].mindec and images[3].minra < images[3].maxra  # near it, not around it
    assert answers[("point", (0.0, 0.0))][:1] and answers[("point", (180.0, 0.0))] == []
    assert len(answers[("box", BOXES[0], None)]) > len(answers[("box", BOXES[0], 0.3)]) > 0
    if database.kind == "postgresql":  # the bounding-box path gives the same answers on PostgreSQL
        monkeypatch.setattr(image_queries, "_has_q3c", lambda session: False)
        assert _run_scenario(images) == answers
    _ANSWERS[database.kind] = answers
    if len(_ANSWERS) == 2:
        assert _ANSWERS["sqlite"] == _ANSWERS["postgresql"]


def test_metadata_filters_ordering_and_limits(database):
    provs, images = _scenario()
    _store(database, images, provs)
    point, box = (122.0, 32.0), (120.5, 124.5, 30.5, 34.5)
    cases = [
        (dict(provenance_ids=provs[1].id), lambda im: im.provenance_id == provs[1].id),
        (dict(provenance_ids=[provs[0].id, provs[1].id]), lambda im: True),
        (dict(filter="r"), lambda im: im.filter == "r"),
        (dict(filter=["g", "i"]), lambda im: im.filter in ("g", "i")),
        (dict(instrument="Synthetic"), lambda im: im.instrument == "Synthetic"),
        (dict(section_id="N6"), lambda im: im.section_id == "N6"),
        (dict(target="field2"), lambda im: im.target == "field2"),
        (dict(type="coadd"), lambda im: im.type == ImageType.COADD),
        (dict(type=[ImageType.SCIENCE, "difference"]), lambda im: im.type != ImageType.COADD),
        (dict(min_mjd=58500.0, max_mjd=59500.0), lambda im: 58500 <= im.mjd <= 59500),
        (dict(min_exp_time=60.0), lambda im: im.exp_time >= 60),
        (dict(max_exp_time=30.0), lambda im: im.exp_time <= 30),
        (dict(tag="q"), lambda im: True),
        (dict(tag="q", min_seeing=1.0, max_seeing=2.0),
         lambda im: im.id in QUALITY and 1.0 <= QUALITY[im.id][0] <= 2.0),
        (dict(tag="q", min_lim_mag=22.5), lambda im: im.id in QUALITY and QUALITY[im.id][1] >= 22.5),
        (dict(tag="q", max_lim_mag=22.5), lambda im: im.id in QUALITY and QUALITY[im.id][1] <= 22.5),
        (dict(min_airmass=1.2, max_airmass=1.8), lambda im: 1.2 <= im.airmass <= 1.8),
    ]
    for criteria, keep in cases:
        expected_all = _brute(images, keep=keep)
        assert _ids(**criteria) == expected_all and len(expected_all) > 0, criteria
        assert _ids(ra=point[0], dec=point[1], **criteria) == _brute(images, point=point, keep=keep), criteria
        got_box = _ids(minra=box[0], maxra=box[1], mindec=box[2], maxdec=box[3], **criteria)
        assert got_box == _brute(images, box=box, keep=keep), criteria
    for order_by in ("earliest", "latest", "quality"):
        for max_number in (None, 1, 3):
            assert _ids(tag="q", order_by=order_by, max_number=max_number) == _brute(
                images, order_by=order_by, max_number=max_number)
            assert _ids(tag="q", minra=box[0], maxra=box[1], mindec=box[2], maxdec=box[3], order_by=order_by,
                        max_number=max_number) == _brute(images, box=box, order_by=order_by,
                                                         max_number=max_number)
    quality = Image.find_images(tag="q", order_by="quality")
    mags = [QUALITY[im.id][1] for im in quality if im.id in QUALITY]
    assert mags == sorted(mags, reverse=True) and quality[-1].id not in QUALITY
    # seeing and depth need a tag that says whose; an unknown tag is named
    with pytest.raises(ValueError, match="min_seeing.*need tag"):
        Image.find_images(min_seeing=1.0)
    with pytest.raises(ValueError, match="order_by='quality' need tag"):
        Image.find_images(order_by="quality")
    with pytest.raises(UnknownTagError, match="'nope'"):
        Image.find_images(tag="nope")


def test_empty_database_and_bad_arguments(database):
    assert Image.find_images(ra=10.0, dec=10.0) == [] and Image.find_images() == []
    bad = [
        (dict(ra=1.0), "give both ra and dec"),
        (dict(ra=1.0, dec=2.0, minra=0.0, maxra=1.0, mindec=0.0, maxdec=1.0), "either a point"),
        (dict(minra=0.0, maxra=1.0, mindec=0.0), "a box needs all of"),
        (dict(ra=1.0, dec=2.0, overlapfrac=0.5), "overlapfrac needs a box"),
        (dict(minra=0.0, maxra=1.0, mindec=0.0, maxdec=1.0, overlapfrac=1.5), "overlapfrac must be within"),
        (dict(order_by="best"), "order_by must be one of"),
        (dict(max_number=0), "max_number must be a positive integer"),
        (dict(ra=0.0, dec=95.0), "dec must be within"),
        (dict(type="flat"), "type must be among"),
        (dict(min_mjd="soon"), "min_mjd must be a finite number"),
        (dict(minra=0.0, maxra=200.0, mindec=0.0, maxdec=1.0), "RA span"),
    ]
    for criteria, message in bad:
        with pytest.raises(ValueError, match=message):
            Image.find_images(**criteria)


def test_q3c_index_is_used_on_postgresql(database):
    if database.kind != "postgresql":
        pytest.skip("q3c is a PostgreSQL extension")
    if not database.has_q3c:
        pytest.skip("the q3c extension is not installed on this PostgreSQL server")
    prov = Provenance(process="ingest", code_version="1.0.0", parameters={})
    prov.save()
    rows = footprint_rows(20000, np.random.default_rng(3), provenance_id=prov.id)
    with database.engine.begin() as conn:
        conn.execute(sa.insert(Image.__table__), rows)
        conn.execute(sa.text("ANALYZE images"))
    captured = []

    def capture(conn, cursor, statement, parameters, context, executemany):
        if "q3c_radial_query" in statement:
            captured.append((statement, parameters))

    event.listen(database.engine, "before_cursor_execute", capture)
    try:
        found = Image.find_images(ra=rows[0]["ra"], dec=rows[0]["dec"])
    finally:
        event.remove(database.engine, "before_cursor_execute", capture)
    assert rows[0]["id"] in [im.id for im in found]
    assert len(captured) == 1
    statement, parameters = captured[0]
    with database.engine.connect() as conn:
        plan = "\n".join(r[0] for r in conn.exec_driver_sql("EXPLAIN " + statement, parameters))
    assert "ix_images_q3c_ang2ipix" in plan, plan
