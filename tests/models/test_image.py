"""Images: ingestion of every shared real file, planes, footprints, files; on both back ends."""

import threading
import warnings

import numpy as np
import pytest
from astropy.io import fits
from astropy.time import Time
from astropy.wcs import WCS, FITSFixedWarning
from astropy.wcs.utils import proj_plane_pixel_scales
from sqlalchemy import func, select

from improc import footprint
from improc.flags import PixelFlag
from models.base import session_scope
from models.exposure import Exposure
from models.file_store import FileIntegrityError
from models.image import Image, ImageBadness, ImageType, ingest_file, ingest_provenance
from models.image_io import model_weight
from models.instrument import BadInputError, dict_to_header, get_instrument
from models.saving import save_products
from tests.models.synthetic_files import tan_wcs, write_synthetic

CP = "legacypipe/{}/images/decam/CP/V4.8.2a"


def _real_files(shared_data):
    sfft = sorted((shared_data / "decam_sfft").glob("DEC-OBS*.mini.fits"))
    cp6 = sorted((shared_data / CP.format("testcase6")).glob("*/*_ooi_*.fits"))
    cp8 = sorted((shared_data / CP.format("testcase8")).glob("*/*_ooi_*.fits"))
    raw = [shared_data / "ccdproc_raw" / "a8280271.fits"]
    assert (len(sfft), len(cp6), len(cp8)) == (10, 6, 1), "shared data files are missing"
    return sfft + cp6 + cp8 + raw


def _header_wcs(path, index):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        return WCS(fits.getheader(path, index)).celestial


def _check_footprint(image, path, index):
    wcs = _header_wcs(path, index)
    x = np.array([-0.5, image.nx - 0.5, image.nx - 0.5, -0.5])
    y = np.array([-0.5, -0.5, image.ny - 0.5, image.ny - 0.5])
    ref_ra, ref_dec = wcs.pixel_to_world_values(x, y)
    ra, dec = image.corners
    np.testing.assert_allclose(ra, np.asarray(ref_ra) % 360, atol=1e-9)
    np.testing.assert_allclose(dec, ref_dec, atol=1e-9)
    assert footprint.points_in_polygons(image.ra, image.dec, ra, dec)[0]
    assert image.mindec <= dec.min() and image.maxdec >= dec.max() and image.minra < image.maxra
    diagonal = footprint.angular_distance(ra[0], dec[0], ra[2], dec[2])
    assert image.radius == pytest.approx(diagonal / 2, rel=0.02)
    scale = np.mean(proj_plane_pixel_scales(wcs)) * 3600
    header = dict_to_header(image.header)
    info = get_instrument(image.instrument).section_info(header, image.section_id)
    assert info.pixel_scale == pytest.approx(scale, rel=0.01)  # DECam: 0.2637" nominal vs the WCS
    assert scale == pytest.approx(0.262, abs=0.002)  # both data sets: about 0.262"/pixel


@pytest.mark.real_data
def test_ingest_every_shared_file(database, shared_data):
    files = _real_files(shared_data)
    results = {path.name: ingest_file(path) for path in files}
    for path in files:
        exposure, images = results[path.name]
        primary = fits.getheader(path, 0)
        if path.parent.name == "ccdproc_raw":
            assert exposure.instrument == "SAAO-STE3" and exposure.is_raw and images == []
            continue
        (image,) = images
        assert image.exposure_id == exposure.id and image.type == ImageType.SCIENCE
        assert image.provenance_id == ingest_provenance().id
        assert image.exp_time == exposure.exp_time == primary["EXPTIME"]
        assert image.end_mjd == pytest.approx(image.mjd + image.exp_time / 86400)
        if path.parent.name == "decam_sfft":
            assert image.instrument == "DECamResampled" and image.filter == "i" and image.section_id == "N6"
            year = Time(image.mjd, format="mjd").datetime.year
            assert year == (2016 if "OBS18" in path.name else 2018)
            _check_footprint(image, path, 0)
        else:
            ext = fits.getheader(path, 1)
            assert image.instrument == "DECam" and image.filter == primary["BAND"].strip()
            assert image.section_id == ext["EXTNAME"].strip() and image.mjd == primary["MJD-OBS"]
            _check_footprint(image, path, 1)
    with session_scope() as session:
        assert session.scalar(select(func.count()).select_from(Exposure)) == len(files)
        assert session.scalar(select(func.count()).select_from(Image)) == len(files) - 1


@pytest.mark.real_data
def test_decam_planes_come_from_oow_and_ood(database, shared_data):
    path = next((shared_data / CP.format("testcase6")).glob("CP20150109/*_ooi_*.fits"))
    _, (image,) = ingest_file(path)
    oow = fits.getdata(str(path).replace("_ooi_", "_oow_"), 1)
    ood = fits.getdata(str(path).replace("_ooi_", "_ood_"), 1)
    np.testing.assert_array_equal(image.data, fits.getdata(path, 1))
    np.testing.assert_array_equal(image.weight, np.where(ood == 0, oow, 0))
    assert np.all(image.flags[ood == 3] & PixelFlag.SATURATED)
    assert np.all(image.flags[ood == 4] & PixelFlag.BLEED)
    assert np.count_nonzero(image.flags[ood == 0] & ~np.uint16(PixelFlag.SATURATED)) == 0


@pytest.mark.real_data
def test_resampled_weight_follows_the_noise_model(database, shared_data):
    path = shared_data / "decam_sfft" / "DEC-OBS18a.mini.fits"
    _, (image,) = ingest_file(path)
    header = fits.getheader(path)
    data = fits.getdata(path).astype(np.float32)
    expected = 1 / ((header["RDNOISE"] / header["GAIN"]) ** 2
                    + np.maximum(data + header["SKYDIP"], 0) / header["GAIN"])
    good = image.flags == 0
    assert good.mean() > 0.99
    np.testing.assert_allclose(image.weight[good], expected[good], rtol=1e-5)
    # the model's noise is close to the measured sky noise of the sky-subtracted image
    sigma = 1.4826 * np.median(np.abs(data - np.median(data)))
    assert np.median(image.weight) ** -0.5 == pytest.approx(sigma, rel=0.15)


@pytest.mark.real_data
def test_companion_files_are_not_images(shared_data):
    ood = next((shared_data / CP.format("testcase8")).glob("*/*_ood_*.fits"))
    with pytest.raises(BadInputError, match=r"_ood_r_ls9\.N6\.fits is a DECam CP mask file; ingest its image"):
        ingest_file(ood)
    with pytest.raises(BadInputError, match=r"is a DECam CP weight file"):
        Image.from_file(str(ood).replace("_ood_", "_oow_"))


def test_concurrent_ingestion_stores_one_copy(database, tmp_path):
    path = write_synthetic(tmp_path / "sim.fits", sections=("A", "B"))
    results, errors = [], []

    def ingest():
        try:
            results.append(ingest_file(path))
        except Exception as exc:  # collected so that the assertion below shows it
            errors.append(exc)

    threads = [threading.Thread(target=ingest) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len({exposure.id for exposure, _ in results}) == 1
    assert len({tuple(i.id for i in images) for _, images in results}) == 1
    with session_scope() as session:
        assert session.scalar(select(func.count()).select_from(Image)) == 2
    assert len(list(database.store.root.rglob("*.fits"))) == 3


def test_reingest_writes_nothing_new(database, tmp_path):
    path = write_synthetic(tmp_path / "sim.fits", sections=("A", "B"), planes=True)
    exposure, images = ingest_file(path)
    files = sorted(database.store.root.rglob("*.fits"))
    again, again_images = ingest_file(path)
    assert again.id == exposure.id and [i.id for i in again_images] == [i.id for i in images]
    assert sorted(database.store.root.rglob("*.fits")) == files and len(files) == 3
    assert [i.section_id for i in images] == ["A", "B"]
    # the WEIGHT / FLAGS HDUs of the file were used (simulator bit 2 = saturated)
    assert images[0].flags[0, 0] == PixelFlag.SATURATED and images[0].weight[0, 0] == 0
    np.testing.assert_allclose(images[1].weight[5, 5], 2.0 / 100.0)


def test_simulator_output_is_ingested_as_synthetic(database, tmp_path):
    from improc.simulator import SimulationParams, simulate_image

    sim = simulate_image(SimulationParams(nx=128, ny=96, ra=359.999, dec=-30.0))
    path = tmp_path / "sim.fits"
    fits.HDUList([fits.PrimaryHDU(sim.data, header=sim.header),
                  fits.ImageHDU(sim.weight, name="WEIGHT"), fits.ImageHDU(sim.flags, name="FLAGS")]).writeto(path)
    exposure, (image,) = ingest_file(path)
    assert exposure.instrument == image.instrument == "Synthetic" and not exposure.is_raw
    assert (image.mjd, image.exp_time, image.filter) == (sim.params.mjd, sim.params.exp_time, sim.params.band)
    np.testing.assert_array_equal(image.data, sim.data)
    good = image.flags == 0
    np.testing.assert_array_equal(image.weight[good], sim.weight[good])
    assert np.all(image.weight[~good] == 0)
    for sim_bit, flag in ((1, PixelFlag.BAD), (2, PixelFlag.SATURATED), (4, PixelFlag.CR), (8, PixelFlag.BLEED)):
        np.testing.assert_array_equal((image.flags & flag) != 0, (sim.flags & sim_bit) != 0)
    ra, dec = image.corners
    ref_ra, ref_dec = sim.header_wcs.pixel_to_world_values([-0.5, 127.5, 127.5, -0.5], [-0.5, -0.5, 95.5, 95.5])
    np.testing.assert_allclose(ra, np.asarray(ref_ra) % 360, atol=1e-9)
    np.testing.assert_allclose(dec, ref_dec, atol=1e-9)
    assert image.minra > image.maxra  # straddles RA = 0


def test_lazy_loading_and_md5_check(database, tmp_path):
    path = write_synthetic(tmp_path / "sim.fits")
    _, (image,) = ingest_file(path)
    with session_scope() as session:
        loaded = session.get(Image, image.id)
    np.testing.assert_array_equal(loaded.data, fits.getdata(path).astype(np.float32))
    np.testing.assert_array_equal(loaded.weight, image.weight)
    assert loaded.flags.dtype == np.uint16 and loaded.wcs.has_celestial
    stored = database.store.absolute(image.filepath)
    with fits.open(stored, mode="update") as hdul:
        hdul["DATA"].data[3, 3] += 1
    with session_scope() as session:
        tampered = session.get(Image, image.id)
    with pytest.raises(FileIntegrityError, match="md5 mismatch"):
        _ = tampered.data


def test_from_file_sections_and_planes(tmp_path):
    path = write_synthetic(tmp_path / "multi.fits", sections=("A", "B"), sky=400.0)
    with pytest.raises(BadInputError, match=r"multi\.fits has 2 image sections \(A, B\); pass hdu= or section_id="):
        Image.from_file(path)
    with pytest.raises(BadInputError, match=r"multi\.fits: no section 'C'"):
        Image.from_file(path, section_id="C")
    by_name = Image.from_file(path, hdu="B")
    by_id = Image.from_file(path, section_id="B")
    assert by_name.section_id == by_id.section_id == "B" and by_name.dec == pytest.approx(by_id.dec)
    data = fits.getdata(path, "B").astype(np.float32)
    np.testing.assert_allclose(by_id.weight, model_weight(data, gain=2.0, read_noise=4.0), rtol=1e-6)
    np.testing.assert_allclose(by_id.weight[0, 0], 1 / (4.0 + data[0, 0] / 2.0), rtol=1e-6)
    mask = np.zeros(data.shape, np.uint16)
    mask[1, 2] = 4
    explicit = Image.from_file(path, section_id="A", weight=np.full(data.shape, 0.5), flags=mask)
    assert explicit.flags[1, 2] == PixelFlag.CR and explicit.weight[1, 2] == 0
    assert explicit.weight[0, 0] == 0.5
    with pytest.raises(BadInputError, match=r"multi\.fits: weight array has shape \(3, 3\)"):
        Image.from_file(path, section_id="A", weight=np.ones((3, 3)))


def test_saturated_and_non_finite_pixels(tmp_path):
    data = np.full((32, 40), 1000.0, np.float32)
    data[2, 3] = 60000.0
    data[4, 5] = np.nan
    image = Image.from_file(write_synthetic(tmp_path / "s.fits", shape=(32, 40), data=data))
    assert image.flags[2, 3] == PixelFlag.SATURATED and image.weight[2, 3] == 0
    assert image.flags[4, 5] == PixelFlag.NO_DATA and image.data[4, 5] == 0 and image.weight[4, 5] == 0
    assert np.count_nonzero(image.flags) == 2


def test_bad_images(tmp_path):
    nan = np.full((16, 16), np.nan, np.float32)
    with pytest.raises(BadInputError, match=r"HDU 0 of nan\.fits: no finite pixel"):
        Image.from_file(write_synthetic(tmp_path / "nan.fits", shape=(16, 16), data=nan))
    with pytest.raises(BadInputError, match=r"HDU 0 of nowcs\.fits: no celestial WCS"):
        Image.from_file(write_synthetic(tmp_path / "nowcs.fits", wcs=False))
    path = write_synthetic(tmp_path / "ok.fits")
    raw = path.read_bytes()
    (tmp_path / "cut.fits").write_bytes(raw[:-3000])
    with pytest.raises(BadInputError, match=r"cut\.fits: corrupt or truncated"):
        Image.from_file(tmp_path / "cut.fits")


def test_paths_stay_inside_the_data_root(database):
    shape = (20, 30)
    image = Image(provenance=ingest_provenance(), instrument="../../..", filter="../../etc",
                  section_id="/etc/passwd", mjd=60000.0, end_mjd=60000.001, exp_time=60.0,
                  data=np.zeros(shape), weight=np.ones(shape), flags=np.zeros(shape),
                  wcs=tan_wcs(10.0, 10.0, shape))
    ingest_provenance().save()
    save_products([image])
    written = database.store.absolute(image.filepath)
    assert written.is_file() and database.store.root in written.parents
    assert ".." not in image.filepath.split("/")


def test_badness_bits():
    image = Image(instrument="X", filter="r", mjd=1.0, end_mjd=1.0, exp_time=1.0)
    assert not image.is_bad and image.badness == []
    image.set_badness("bad_subtraction", "NO_STARS")
    assert image.bad_flags == ImageBadness.BAD_SUBTRACTION | ImageBadness.NO_STARS and image.is_bad
    assert image.badness == ["BAD_SUBTRACTION", "NO_STARS"]
    image.clear_badness("NO_STARS")
    assert image.badness == ["BAD_SUBTRACTION"]
    with pytest.raises(KeyError, match="unknown image badness 'CLOUDY'"):
        image.set_badness("CLOUDY")
