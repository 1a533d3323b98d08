"""Instruments: registry, header reading, sections, YAML definitions (no database)."""

import datetime
import logging

import numpy as np
import pytest
from astropy.io import fits
from astropy.time import Time

from improc.color_transforms import DECAM_ZHOU2020, BandTransform, table_digest
from improc.flags import PixelFlag
from improc.preprocessing import parse_fits_section
from models.instrument import (MissingHeaderError, UnknownInstrumentError, get_instrument,
                               guess_instrument, instrument_names, load_instrument_file,
                               merged_header, open_fits, reset_instruments, transform_digests)
from models.instruments.decam import CP_MASK_CODES, DECAM_CCDNUM, DECAM_DEFAULTS
from models.context import Context
from models.instruments.generic import GenericInstrument, basename_datetime, mjd_from_datetime
from util.config import Config, ConfigError

pytestmark = pytest.mark.real_data

CP8 = "legacypipe/testcase8/images/decam/CP/V4.8.2a/CP20171112/c4d_171113_060340_{}_r_ls9.N6.fits"


@pytest.fixture
def fresh_registry():
    reset_instruments()
    yield
    reset_instruments()


def _headers(path):
    hdul = open_fits(path)
    inst = guess_instrument(hdul[0].header, filename=path)
    sections = inst.section_hdus(hdul, filename=path.name)
    index = next(iter(sections.values()))
    return inst, sections, merged_header(hdul[0].header, hdul[index].header if index else None)


def test_builtin_instruments_are_registered():
    names = instrument_names()
    for name in ("DECam", "Synthetic", "Generic", "DECamResampled", "SAAO-STE3"):
        assert name in names
    assert get_instrument("decam") is get_instrument("DECam")
    with pytest.raises(UnknownInstrumentError, match="unknown instrument 'HAL9000'.*DECam"):
        get_instrument("HAL9000")


def test_guess_rejects_unknown_instrument_naming_file_and_value():
    header = fits.Header({"INSTRUME": "Foo Cam", "EXPTIME": 1.0})
    with pytest.raises(UnknownInstrumentError, match=r"mystery\.fits: INSTRUME='Foo Cam'"):
        guess_instrument(header, filename="/data/mystery.fits")
    # a configuration matter, not bad data: never a ValueError
    assert not isinstance(UnknownInstrumentError("x"), ValueError)


def test_decam_cp_headers(shared_data):
    path = shared_data / CP8.format("ooi")
    inst, sections, header = _headers(path)
    assert inst.name == "DECam" and sections == {"N6": 1} and not inst.is_raw(header)
    primary = fits.getheader(path, 0)
    obs = inst.observation(header, filename=path.name)
    assert obs.mjd == primary["MJD-OBS"] and obs.exp_time == 45.0 and obs.filter == "r"
    assert obs.airmass == 1.87 and obs.target == "DECaLS_26467_r" and obs.project == "2014B-0404"
    assert obs.ra == pytest.approx(15 * (8 + 1 / 60 + 17.76 / 3600), abs=1e-9)  # RA = '08:01:17.760'
    assert obs.dec == pytest.approx(5 + 9 / 60 + 3.6 / 3600, abs=1e-9)
    info = inst.section_info(header, "N6")
    ext = fits.getheader(path, 1)
    assert info.gain == pytest.approx((ext["GAINA"] + ext["GAINB"]) / 2)
    assert info.read_noise == pytest.approx((ext["RDNOISEA"] + ext["RDNOISEB"]) / 2)
    assert info.saturation == ext["SATURATE"] and info.pixel_scale == 0.2637
    assert info.data_section is None and info.amplifiers == ()


def test_decam_defaults_ccdnum_and_raw_amplifiers():
    inst = get_instrument("DECam")
    bare = fits.Header({"INSTRUME": "DECam", "PROCTYPE": "InstCal"})
    info = inst.section_info(bare, "S4")
    assert (info.gain, info.read_noise, info.saturation) == (
        DECAM_DEFAULTS["gain"], DECAM_DEFAULTS["read_noise"], DECAM_DEFAULTS["saturation"])
    assert DECAM_CCDNUM[37] == "N6" and DECAM_CCDNUM[28] == "S4" and DECAM_CCDNUM[20] == "S9"
    hdul = fits.HDUList([fits.PrimaryHDU(header=fits.Header({"INSTRUME": "DECam", "PROCTYPE": "Raw"})),
                         fits.ImageHDU(np.zeros((8, 8), np.float32), header=fits.Header({"CCDNUM": 37})),
                         fits.ImageHDU(np.zeros((8, 8), np.float32), name="FS1")])
    assert inst.section_hdus(hdul, filename="raw.fits") == {"N6": 1}
    raw = fits.Header({"PROCTYPE": "Raw", "DATASEC": "[1:2048,1:4096]",
                       "DATASECA": "[1025:2048,1:4096]", "BIASSECA": "[2105:2154,51:4146]",
                       "DATASECB": "[1:1024,1:4096]", "BIASSECB": "[7:56,51:4146]",
                       "GAINA": 4.0, "GAINB": 4.2, "RDNOISEA": 6.0, "RDNOISEB": 7.0,
                       "SATURATA": 40000.0, "SATURATB": 42000.0})
    info = inst.section_info(raw, "N6")
    assert inst.is_raw(raw) and info.data_section == "[1:2048,1:4096]"
    assert [a.name for a in info.amplifiers] == ["A", "B"]
    assert info.amplifiers[1].overscan_section == "[7:56,51:4146]" and info.amplifiers[1].gain == 4.2
    assert info.gain == pytest.approx(4.1) and info.saturation == 40000.0


def test_decam_companions_and_mask_codes(shared_data):
    inst = get_instrument("DECam")
    path = shared_data / CP8.format("ooi")
    companions = inst.companions(path)
    assert companions.weight == shared_data / CP8.format("oow")
    assert companions.flags == shared_data / CP8.format("ood")
    codes = np.arange(10).reshape(2, 5)
    flags = inst.flags_from_mask(codes)
    assert flags[0, 0] == 0 and flags[0, 3] == PixelFlag.SATURATED and flags[0, 4] == PixelFlag.BLEED
    assert all(flags.ravel()[code] == value for code, value in CP_MASK_CODES.items())
    assert flags[1, 4] == PixelFlag.BAD  # code 9 is unknown: bad


def test_decam_resampled_epoch_from_basename(shared_data, caplog):
    sfft = shared_data / "decam_sfft"
    with caplog.at_level(logging.WARNING):
        inst, _, header = _headers(sfft / "DEC-OBS18a.mini.fits")
        obs = inst.observation(header, filename="DEC-OBS18a.mini.fits")
    assert inst.name == "DECamResampled"
    assert header["MJD-OBS"] == pytest.approx(58334.39133794)  # the copied 2018 header value
    expected = Time("2016-08-18T04:33:31", scale="utc").mjd  # c4d_160818_043331_ooi_i_v1
    assert obs.mjd == pytest.approx(expected, abs=1e-8)
    assert "DEC-OBS18a.mini.fits" in caplog.text and "EXP_BN" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        inst, sections, header = _headers(sfft / "DEC-OBS04a.mini.fits")
        obs = inst.observation(header, filename="DEC-OBS04a.mini.fits")
    assert obs.mjd == header["MJD-OBS"] and "EXP_BN" not in caplog.text
    assert obs.filter == "i" and obs.exp_time == 330.0 and sections == {"N6": 0}
    info = inst.section_info(header, "N6")
    assert info.pixel_scale == pytest.approx(0.262, abs=0.001)  # from the TPV WCS
    assert info.gain == header["GAIN"] and inst.sky_level(header) == header["SKYDIP"]
    # 04b carries 04a's DATE-OBS too, four hours off its own start (c4d_180804_052409)
    inst, _, header = _headers(sfft / "DEC-OBS04b.mini.fits")
    obs = inst.observation(header, filename="DEC-OBS04b.mini.fits")
    assert obs.mjd == pytest.approx(Time("2018-08-04T05:24:09", scale="utc").mjd, abs=1e-8)


def test_saao_raw_frame(shared_data):
    path = shared_data / "ccdproc_raw" / "a8280271.fits"
    inst, sections, header = _headers(path)
    assert inst.name == "SAAO-STE3" and sections == {"0": 0} and inst.is_raw(header)
    obs = inst.observation(header, filename=path.name)
    assert obs.mjd == pytest.approx(Time("2013-07-13T00:57:33", scale="utc").mjd, abs=1e-8)
    assert (obs.exp_time, obs.airmass, obs.filter, obs.target) == (150.04, 1.176, "48", "rf0420")
    assert obs.ra == pytest.approx(331.0334) and obs.dec == pytest.approx(-0.9253)
    info = inst.section_info(header, "0")
    assert (info.gain, info.read_noise) == (1.9, 5.0)
    assert info.slices("data") == parse_fits_section("[17:528,1:520]") == (slice(0, 520), slice(16, 528))
    assert info.slices("overscan") == (slice(0, 520), slice(3, 13))


def test_synthetic_header_and_planes():
    inst = get_instrument("Synthetic")
    header = fits.Header({"INSTRUME": "Synthetic", "MJD-OBS": 60000.5, "EXPTIME": 60.0, "FILTER": "r",
                          "GAIN": 2.0, "RDNOISE": 4.0, "SATURATE": 50000.0, "RA": 150.0,
                          "DEC": 2.0, "AIRMASS": 1.2, "CTYPE1": "RA---TAN", "CTYPE2": "DEC--TAN",
                          "CRVAL1": 150.0, "CRVAL2": 2.0, "CRPIX1": 50.0, "CRPIX2": 50.0,
                          "CD1_1": -0.3 / 3600, "CD1_2": 0.0, "CD2_1": 0.0, "CD2_2": 0.3 / 3600})
    assert guess_instrument(header) is inst and not inst.is_raw(header)
    obs = inst.observation(header, filename="sim.fits")
    assert (obs.mjd, obs.exp_time, obs.filter, obs.ra, obs.dec, obs.airmass) == (60000.5, 60.0, "r", 150.0, 2.0, 1.2)
    info = inst.section_info(header, "0")
    assert (info.gain, info.read_noise, info.saturation) == (2.0, 4.0, 50000.0)
    assert info.pixel_scale == pytest.approx(0.3, rel=1e-9)
    flags = inst.flags_from_mask(np.array([0, 1, 2, 4, 8, 16]))
    assert flags.tolist() == [0, PixelFlag.BAD, PixelFlag.SATURATED, PixelFlag.CR, PixelFlag.BLEED,
                              PixelFlag.BAD]


def test_missing_keywords_name_file_and_keyword():
    inst = get_instrument("Synthetic")
    header = fits.Header({"INSTRUME": "Synthetic", "MJD-OBS": 60000.5, "FILTER": "r"})
    with pytest.raises(MissingHeaderError, match=r"sim7\.fits: missing header keyword for exp_time.*EXPTIME"):
        inst.observation(header, filename="sim7.fits")
    header = fits.Header({"INSTRUME": "Synthetic", "EXPTIME": 1.0, "FILTER": "r"})
    with pytest.raises(MissingHeaderError, match=r"sim8\.fits: missing header keyword for the observation time"):
        inst.observation(header, filename="sim8.fits")
    header = fits.Header({"INSTRUME": "Synthetic", "EXPTIME": "long", "FILTER": "r", "MJD-OBS": 1.0})
    with pytest.raises(MissingHeaderError, match=r"EXPTIME must be a number"):
        inst.observation(header, filename="sim9.fits")


def test_basename_dates():
    moment = basename_datetime("c4d_160818_043331_ooi_i_v1")
    assert moment == datetime.datetime(2016, 8, 18, 4, 33, 31, tzinfo=datetime.timezone.utc)
    assert basename_datetime("DEC-OBS18a") is None and basename_datetime("c4d_169999_000000_x") is None
    assert mjd_from_datetime(datetime.datetime(1858, 11, 17)) == 0.0


YAML = """
name: TestCam
match: {INSTRUME: '^TESTCAM$'}
keywords:
  exp_time: [ITIME]
  filter: [FILT]
defaults: {gain: 2.5, read_noise: 3.0, saturation: 30000, pixel_scale: 0.5}
filter_map: {"4": "R"}
"""


def test_yaml_instrument_file_and_config(tmp_path, monkeypatch, fresh_registry):
    definition = tmp_path / "testcam.yaml"
    definition.write_text(YAML)
    config = tmp_path / "config.yaml"
    config.write_text(f"instruments:\n  extra_files: [{definition}]\n"
                      f"storage:\n  data_root: {tmp_path / 'data'}\n")
    reset_instruments()
    header = fits.Header({"INSTRUME": "TESTCAM", "MJD-OBS": 59000.0, "ITIME": 12.0, "FILT": 4})
    with pytest.raises(UnknownInstrumentError, match="TESTCAM"):
        guess_instrument(header)        # not in the current (default) configuration
    context = Context.from_config(Config.load(config))
    with context.activate():
        inst = guess_instrument(header)
        assert inst.name == "TestCam" and "TestCam" in instrument_names()
    assert get_instrument("testcam", context=context) is inst
    obs = inst.observation(header, filename="t.fits")
    assert (obs.exp_time, obs.filter, obs.mjd) == (12.0, "R", 59000.0)
    info = inst.section_info(header, "0")
    assert (info.gain, info.read_noise, info.saturation, info.pixel_scale) == (2.5, 3.0, 30000.0, 0.5)


def test_yaml_errors_name_file_and_key(tmp_path, fresh_registry):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: X\nkeywords: {exposure: [EXPTIME]}\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown keywords entry 'exposure'"):
        load_instrument_file(bad)
    bad.write_text("name: X\ncolour: blue\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown instrument definition key 'colour'"):
        load_instrument_file(bad)
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml is not valid YAML"):
        load_instrument_file(bad)
    with pytest.raises(ConfigError, match="product must be one of"):
        GenericInstrument({"name": "Y", "product": "cooked"})
    with pytest.raises(ValueError, match="already registered"):
        from models.instrument import register_instrument
        register_instrument(GenericInstrument({"name": "DECam"}))


MADE_UP_YAML = """
name: MadeUpCam
match: {INSTRUME: '^MADEUP$'}
transforms:
  r: {coefficients: [0.2, -0.45, 0.06], color_range: [-0.3, 3.2], average_color: 1.1}
"""


def test_transformations_belong_to_instruments(tmp_path, fresh_registry):
    """DECam (and the cameras rendered or resampled from it) keep R. Zhou's table; other cameras
    have none unless their definition gives one; a YAML table is read, digested and validated."""
    decam = get_instrument("DECam")
    assert decam.band_transform("r") is DECAM_ZHOU2020["r"] and decam.band_transform("VR") is None
    for name in ("Synthetic", "DECamResampled"):
        assert get_instrument(name).transforms_digest() == table_digest(DECAM_ZHOU2020)
    for name in ("SAAO-STE3", "Generic"):
        assert get_instrument(name).transforms == {} and get_instrument(name).transforms_digest() is None
    definition = tmp_path / "madeup.yaml"
    definition.write_text(MADE_UP_YAML)
    context = Context.from_config(Config.load(**{"instruments.extra_files": [str(definition)],
                                                 "storage.data_root": str(tmp_path / "data")}))
    cam = get_instrument("MadeUpCam", context=context)
    assert cam.band_transform("r") == BandTransform((0.2, -0.45, 0.06), (-0.3, 3.2), 1.1)
    assert cam.band_transform("g") is None
    digests = transform_digests(context)
    assert digests["MadeUpCam"] == table_digest({"r": cam.band_transform("r")})
    assert set(digests) == {"DECam", "DECamResampled", "MadeUpCam", "Synthetic"}   # no table, no entry
    assert "MadeUpCam" not in transform_digests(Context.from_config(Config.load(
        **{"storage.data_root": str(tmp_path / "data")})))
    definition.write_text(MADE_UP_YAML.replace("[-0.3, 3.2]", "[3.2, -0.3]"))
    with pytest.raises(ConfigError, match=r"madeup\.yaml: transforms\.r: color_range must be finite"):
        load_instrument_file(definition)
    definition.write_text("name: X\ntransforms: sdss\n")
    with pytest.raises(ConfigError, match=r"unknown published transformation table 'sdss'; known: decam_zhou2020"):
        load_instrument_file(definition)


def _swarp_like(folder, *, weight_value: float = 0.25):
    """An image with a SWarp-style weight and mask next to it."""
    from tests.models.synthetic_files import tan_wcs

    data = np.random.default_rng(2).normal(50.0, 2.0, (40, 50)).astype(np.float32)
    header = tan_wcs(30.0, -10.0, data.shape).to_header()
    header.update({"INSTRUME": "SWARPCAM", "MJD-OBS": 59500.0, "EXPTIME": 100.0, "FILTER": "i"})
    fits.PrimaryHDU(data, header=header).writeto(folder / "coadd.fits")
    fits.PrimaryHDU(np.full(data.shape, weight_value, np.float32)).writeto(folder / "coadd.weight.fits")
    mask = np.zeros(data.shape, np.int16)
    mask[5:8, 10:20] = 1
    fits.PrimaryHDU(mask).writeto(folder / "coadd.mask.fits")
    return folder / "coadd.fits", mask


SWARP_YAML = """
name: SwarpCam
match: {INSTRUME: '^SWARPCAM$'}
product: reduced
companions: {weight: '{stem}.weight.fits', flags: '{stem}.mask.fits'}
"""


def test_yaml_companions_give_an_image_its_weight_and_mask(database, tmp_path, fresh_registry):
    from models.image import ingest_file
    from models.instrument import BadInputError

    definition = tmp_path / "swarpcam.yaml"
    definition.write_text(SWARP_YAML)
    load_instrument_file(definition)
    path, mask = _swarp_like(tmp_path)
    _, (image,) = ingest_file(path)
    assert np.all(image.weight[mask == 0] == np.float32(0.25))
    assert np.array_equal(image.flags != 0, mask != 0) and np.all(image.weight[mask != 0] == 0)
    with pytest.raises(BadInputError, match=r"coadd\.weight\.fits is a SwarpCam weight file.*coadd"):
        ingest_file(tmp_path / "coadd.weight.fits")
    with pytest.raises(ConfigError, match=r"companions\.weight must be a file name containing \{stem\}"):
        GenericInstrument({"name": "Z", "companions": {"weight": "weight.fits"}})
    with pytest.raises(ConfigError, match=r"unknown companions entry 'variance'"):
        GenericInstrument({"name": "Z", "companions": {"variance": "{stem}.var.fits"}})
