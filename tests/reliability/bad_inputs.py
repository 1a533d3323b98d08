"""Generators of malformed inputs for the campaign: files, headers, pixels, configurations.

Each `BadInput` writes its input into a folder and says which ``seechange`` arguments meet it and
what its one error line must name.  ``stage`` is where it must be refused: ``ingest`` (the file
itself), ``run`` (the pixels: the data cannot give a product), ``config`` (set-up).
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.io import fits

from tests.models.synthetic_files import synthetic_header, tan_wcs, write_synthetic


@dataclass(frozen=True)
class BadInput:
    name: str
    stage: str                                  # "ingest", "run" or "config"
    make: Callable[[Path], list[str]]           # writes the input; returns the argv after --config
    names: Callable[[Path], str] | None = None  # what the error line must contain (default: file name)
    campaign_only: bool = False                 # too slow for CI
    known_gap: str | None = None                # accepted today, by code outside this campaign's reach
    may_succeed: bool = False                   # valid if extreme: must complete, or fail in one line


def _good(folder: Path, name: str = "good.fits", **kw) -> Path:
    return write_synthetic(folder / name, **kw)


def _bytes(name: str, payload: Callable[[bytes], bytes]):
    def make(folder: Path) -> list[str]:
        raw = _good(folder, "src.fits").read_bytes()
        (folder / name).write_bytes(payload(raw))
        return ["ingest", str(folder / name)]
    return make


def _header(name: str, **changes):
    """A good Synthetic image whose header keyword ``k`` is set to ``v`` (None: deleted)."""
    def make(folder: Path) -> list[str]:
        path = _good(folder, name)
        with fits.open(path, mode="update") as hdul:
            for key, value in changes.items():
                key = key.replace("_", "-")
                if value is None:
                    del hdul[0].header[key]
                else:
                    hdul[0].header[key] = value
        return ["ingest", str(path)]
    return make


def _pixels(name: str, data: Callable[[tuple[int, int]], np.ndarray], shape=(64, 80), stage_arg="ingest"):
    def make(folder: Path) -> list[str]:
        return [stage_arg, str(write_synthetic(folder / name, shape=shape, data=data(shape)))]
    return make


def _hdus(name: str, build: Callable[[], fits.HDUList]):
    def make(folder: Path) -> list[str]:
        build().writeto(folder / name)
        return ["ingest", str(folder / name)]
    return make


def _primary(data) -> fits.HDUList:
    return fits.HDUList([fits.PrimaryHDU(data, header=synthetic_header())])


def _header_only(bitpix: int, naxis: tuple[int, ...]) -> bytes:
    header = synthetic_header()
    header.insert(0, ("SIMPLE", True))
    header.insert(1, ("BITPIX", bitpix))
    header.insert(2, ("NAXIS", len(naxis)))
    for k, n in enumerate(naxis):
        header.insert(3 + k, (f"NAXIS{k + 1}", n))
    return header.tostring().encode()


def _raw_header(name: str, bitpix: int, naxis: tuple[int, ...], data_bytes: int):
    def make(folder: Path) -> list[str]:
        payload = _header_only(bitpix, naxis) + b"\0" * data_bytes
        (folder / name).write_bytes(payload + b"\0" * (-len(payload) % 2880))
        return ["ingest", str(folder / name)]
    return make


def _wcs(name: str, **wcs_cards):
    def make(folder: Path) -> list[str]:
        path = _good(folder, name)
        with fits.open(path, mode="update") as hdul:
            for key, value in wcs_cards.items():
                hdul[0].header[key] = value
        return ["ingest", str(path)]
    return make


def _config(name: str, text: str, argv: tuple[str, ...] = ("run",), names: str | None = None):
    """A configuration problem: ``text`` is added to the configuration of an installation holding
    one good image (``{good}``: that image's file)."""
    def make(folder: Path) -> list[str]:
        return ["--extra-config", text, *argv]
    return BadInput(name, "config", make, (lambda good: names.replace("{good}", str(good))) if names else None)


def _noise(shape):
    return np.random.default_rng(3).normal(100.0, 10.0, shape).astype(np.float32)


def _constant(value):
    return lambda shape: np.full(shape, value, np.float32)


def _spike(shape):
    out = np.full(shape, 1000.0, np.float32)
    out[shape[0] // 2, shape[1] // 2] = 5000.0
    return out


def _dir(folder: Path) -> list[str]:
    (folder / "a_directory.fits").mkdir()
    return ["ingest", str(folder / "a_directory.fits")]


def _dangling(folder: Path) -> list[str]:
    os.symlink(folder / "nowhere.fits", folder / "dangling.fits")
    return ["ingest", str(folder / "dangling.fits")]


def _gz_truncated(folder: Path) -> list[str]:
    packed = gzip.compress(_good(folder, "src.fits").read_bytes())
    (folder / "cut.fits.gz").write_bytes(packed[: len(packed) // 2])
    return ["ingest", str(folder / "cut.fits.gz")]


def _huge(folder: Path) -> list[str]:
    """10^8 pixels of noise: no stars to find."""
    path = folder / "huge_1e8.fits"
    shape = (10000, 10000)
    header = synthetic_header()
    header.update(tan_wcs(150.0, 2.0, shape).to_header())
    data = np.random.default_rng(5).normal(100.0, 10.0, shape).astype(np.float32)
    fits.PrimaryHDU(data, header=header).writeto(path)
    return ["ingest", str(path)]


def _wrong_instrument(folder: Path) -> list[str]:
    return ["ingest", str(_good(folder, "other_camera.fits")), "--instrument", "NoSuchCamera"]


def _unknown_instrument(folder: Path) -> list[str]:
    path = _good(folder, "unknown_camera.fits")
    with fits.open(path, mode="update") as hdul:
        hdul[0].header["INSTRUME"] = "MysteryCam"
    return ["ingest", str(path)]


def _weight_shape(folder: Path) -> list[str]:
    fits.PrimaryHDU(np.ones((5, 5), np.float32)).writeto(folder / "small_weight.fits")
    return ["ingest", str(_good(folder, "with_weight.fits")), "--weight", str(folder / "small_weight.fits")]


BAD_INPUTS: list[BadInput] = [
    # --- not FITS, truncated, corrupt ---------------------------------------------------------
    BadInput("empty file", "ingest", _bytes("empty.fits", lambda raw: b"")),
    BadInput("text file", "ingest", _bytes("text.fits", lambda raw: b"this is not FITS\n" * 200)),
    BadInput("random bytes", "ingest", _bytes("random.fits", lambda raw: np.random.default_rng(1).bytes(20000))),
    BadInput("truncated in the header", "ingest", _bytes("cut_header.fits", lambda raw: raw[:1000])),
    BadInput("header without data", "ingest", _bytes("no_data_blocks.fits", lambda raw: raw[:2880])),
    BadInput("truncated in the data", "ingest", _bytes("cut_data.fits", lambda raw: raw[: len(raw) // 2])),
    BadInput("last block cut", "ingest", _bytes("cut_end.fits", lambda raw: raw[:-2000])),
    BadInput("no END card", "ingest", _bytes("no_end.fits", lambda raw: raw.replace(b"END" + b" " * 77, b" " * 80, 1))),
    BadInput("zeroed file", "ingest", _bytes("zeros.fits", lambda raw: b"\0" * len(raw))),
    BadInput("garbage in the SIMPLE card", "ingest", _bytes("bad_simple.fits", lambda raw: b"SIMPLE  =     \xff\xfe" + raw[16:])),
    BadInput("truncated gzip", "ingest", _gz_truncated),
    # --- wrong structure ---------------------------------------------------------------------
    BadInput("BITPIX 7", "ingest", _raw_header("bitpix7.fits", 7, (80, 64), 80 * 64)),
    BadInput("BITPIX 64 without the data", "ingest", _raw_header("bitpix64.fits", 64, (80, 64), 80 * 64 * 2)),
    BadInput("BITPIX -32 data too short", "ingest", _raw_header("short_data.fits", -32, (80, 64), 100)),
    BadInput("no data (NAXIS 0)", "ingest", _hdus("naxis0.fits", lambda: _primary(None))),
    BadInput("1-D data", "ingest", _hdus("one_d.fits", lambda: _primary(np.ones(100, np.float32)))),
    BadInput("a table, no image", "ingest", _hdus("table.fits", lambda: fits.HDUList(
        [*_primary(None), fits.BinTableHDU.from_columns([fits.Column("a", "E", array=np.ones(3))])]))),
    BadInput("3-D cube", "ingest", _hdus("cube.fits", lambda: _primary(np.ones((3, 64, 80), np.float32)))),
    BadInput("1 x 1 image", "run", _pixels("one_pixel.fits", _noise, shape=(1, 1))),
    BadInput("1 x 64 image", "run", _pixels("one_row.fits", _noise, shape=(1, 64))),
    BadInput("2 x 2 image", "run", _pixels("two_by_two.fits", _noise, shape=(2, 2))),
    # --- header keys missing or absurd --------------------------------------------------------
    BadInput("no MJD-OBS", "ingest", _header("no_mjd.fits", MJD_OBS=None)),
    BadInput("no EXPTIME", "ingest", _header("no_exptime.fits", EXPTIME=None)),
    BadInput("no FILTER", "ingest", _header("no_filter.fits", FILTER=None)),
    BadInput("MJD-OBS text", "ingest", _header("mjd_text.fits", MJD_OBS="yesterday")),
    BadInput("MJD-OBS nan", "ingest", _header("mjd_nan.fits", MJD_OBS="nan")),
    BadInput("MJD-OBS absurd (1e12)", "ingest", _header("mjd_future.fits", MJD_OBS=1e12)),
    BadInput("MJD-OBS negative", "ingest", _header("mjd_negative.fits", MJD_OBS=-1e9)),
    BadInput("EXPTIME negative", "ingest", _header("exptime_negative.fits", EXPTIME=-60.0)),
    BadInput("EXPTIME zero", "ingest", _header("exptime_zero.fits", EXPTIME=0.0)),
    BadInput("EXPTIME text", "ingest", _header("exptime_text.fits", EXPTIME="long")),
    BadInput("GAIN zero", "ingest", _header("gain_zero.fits", GAIN=0.0)),
    BadInput("GAIN negative", "ingest", _header("gain_negative.fits", GAIN=-2.0)),
    BadInput("SATURATE negative", "ingest", _header("saturate_negative.fits", SATURATE=-1.0)),
    BadInput("RDNOISE negative", "ingest", _header("rdnoise_negative.fits", RDNOISE=-4.0)),
    BadInput("DEC 100", "ingest", _header("dec_100.fits", DEC=100.0)),
    BadInput("MJD-OBS in the year 4300", "ingest", _header("mjd_far.fits", MJD_OBS=9.0e5)),
    BadInput("empty FILTER", "ingest", _header("filter_empty.fits", FILTER="")),
    BadInput("unknown instrument", "ingest", _unknown_instrument),
    BadInput("no such instrument named", "ingest", _wrong_instrument, lambda f: "NoSuchCamera"),
    BadInput("weight of another shape", "ingest", _weight_shape, lambda f: "small_weight.fits"),
    # --- WCS ----------------------------------------------------------------------------------
    BadInput("singular PC matrix", "ingest", _wcs("singular_wcs.fits", PC1_1=0.0, PC1_2=0.0, PC2_1=0.0, PC2_2=0.0)),
    BadInput("CDELT zero", "ingest", _wcs("cdelt_zero.fits", CDELT1=0.0)),
    BadInput("CRVAL2 beyond the pole", "ingest", _wcs("crval_pole.fits", CRVAL2=95.0)),
    BadInput("unknown projection", "ingest", _wcs("bad_ctype.fits", CTYPE1="RA---XXX", CTYPE2="DEC--XXX")),
    BadInput("unknown CUNIT", "ingest", _wcs("bad_cunit.fits", CUNIT1="furlong")),
    BadInput("no WCS", "ingest", lambda folder: ["ingest", str(write_synthetic(folder / "no_wcs.fits", wcs=False))]),
    BadInput("SIP distortion that does not invert", "ingest",
             _wcs("sip_fold.fits", CTYPE1="RA---TAN-SIP", CTYPE2="DEC--TAN-SIP", A_ORDER=2, B_ORDER=2,
                  A_2_0=1e3, A_0_2=1e3, B_2_0=-1e3, B_0_2=1e3)),
    BadInput("CRPIX absurd", "ingest", _wcs("crpix_absurd.fits", CRPIX1=1e30)),
    # --- pixels: the data cannot give products ------------------------------------------------
    BadInput("all NaN", "ingest", _pixels("all_nan.fits", _constant(np.nan))),
    BadInput("all +Inf", "ingest", _pixels("all_inf.fits", _constant(np.inf))),
    BadInput("all zero", "run", _pixels("all_zero.fits", _constant(0.0))),
    BadInput("constant", "run", _pixels("constant.fits", _constant(1000.0))),
    BadInput("saturated", "run", _pixels("saturated.fits", _constant(60000.0))),
    BadInput("negative", "run", _pixels("negative.fits", _constant(-500.0))),
    BadInput("all -Inf", "ingest", _pixels("all_minus_inf.fits", _constant(-np.inf))),
    BadInput("constant but one pixel", "run", _pixels("flat_one_hot.fits", lambda shape: _spike(shape))),
    BadInput("10^8 pixels of noise", "run", _huge, campaign_only=True, may_succeed=True),
    # --- configuration ------------------------------------------------------------------------
    _config("threshold of the wrong type", "extraction: {threshold: high}", names="threshold"),
    _config("threshold out of range", "extraction: {threshold: -1.0}", names="threshold"),
    _config("box_size zero", "backgrounding: {box_size: 0}", names="box_size"),
    _config("box_size a list", "backgrounding: {box_size: [1, 2]}", names="box_size"),
    _config("unknown step", "pipeline: {steps: [preprocessing, sharpening]}", names="sharpening"),
    _config("steps out of order", "pipeline: {steps: [extraction, backgrounding]}", names="extraction"),
    _config("unknown key", "storage: {dataroot: /tmp}", names="storage.dataroot"),
    _config("unsupported database", "db: {url: 'mysql://localhost/x'}", names="mysql"),
    _config("missing catalog folder", "astrocal: {catalog: gaia_folder, catalog_folder: /no/such/folder}",
            names="/no/such/folder"),
    _config("unknown catalog", "photocal: {catalog: hipparcos}", names="hipparcos"),
    _config("missing instrument file", "instruments: {extra_files: [/no/such/cam.yaml]}",
            ("ingest", "{good}"), names="/no/such/cam.yaml"),
    _config("data root is a file", "storage: {data_root: '{good}'}", names="{good}"),
    _config("sep pixel stack negative", "pipeline: {sep_pixel_stack: -5}", names="sep_pixel_stack"),
    # --- not a file ---------------------------------------------------------------------------
    BadInput("a directory given as a file", "ingest", _dir),
    BadInput("a file that does not exist", "ingest", lambda folder: ["ingest", str(folder / "missing.fits")]),
    BadInput("a dangling symlink", "ingest", _dangling),
]
