"""Exposures: reading original files, storing their copies once, bad input; on both back ends."""

import numpy as np
import pytest
from astropy.io import fits
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from models.base import session_scope
from models.exposure import Exposure, exposure_provenance
from models.file_store import FileIntegrityError, md5_of
from models.instrument import BadInputError, MissingHeaderError, UnknownInstrumentError
from models.saving import save_products
from tests.models.synthetic_files import write_synthetic

RAW = "ccdproc_raw/a8280271.fits"


@pytest.mark.real_data
def test_raw_frame_from_file(shared_data):
    path = shared_data / RAW
    exposure = Exposure.from_file(path)
    header = fits.getheader(path)
    assert exposure.instrument == "SAAO-STE3" and exposure.is_raw
    assert exposure.exp_time == header["EXPTIME"] and exposure.airmass == header["SECZ"]
    assert exposure.section_ids == ["0"] and exposure.origin == "a8280271.fits"
    assert exposure.origin_md5 == md5_of(path) and exposure.filepath is None
    assert exposure.provenance_id == exposure_provenance().id
    assert exposure.header["TRIMSEC"].strip() == "[  17: 528,   1: 520]"
    data, section_header = exposure.read_section("0")
    assert data.shape == (520, 536) and data.dtype == np.uint16
    assert exposure.section_info("0").overscan_section.replace(" ", "") == "[4:13,1:520]"
    with pytest.raises(ValueError, match="has no section 'N6'"):
        exposure.read_section("N6")


@pytest.mark.real_data
def test_stored_copy_is_verified(database, shared_data):
    path = shared_data / RAW
    exposure = Exposure.from_file(path)
    exposure_provenance().save()
    save_products([exposure])
    stored = database.store.absolute(exposure.filepath)
    assert stored.is_file() and md5_of(stored) == exposure.md5sum == exposure.origin_md5
    with session_scope() as session:
        loaded = session.get(Exposure, exposure.id)
    assert loaded.local_path() == stored
    assert loaded.read_section("0")[0].shape == (520, 536)
    stored.chmod(0o644)
    with open(stored, "r+b") as handle:
        handle.seek(-10, 2)
        handle.write(b"corrupted!")
    with session_scope() as session:
        reloaded = session.get(Exposure, exposure.id)
    with pytest.raises(FileIntegrityError, match="md5 mismatch"):
        reloaded.local_path()


def test_same_file_twice_violates_the_unique_constraint(database, tmp_path):
    path = write_synthetic(tmp_path / "sim.fits")
    exposure_provenance().save()
    save_products([Exposure.from_file(path)])
    with pytest.raises(IntegrityError):
        save_products([Exposure.from_file(path)])
    with session_scope() as session:
        assert session.scalar(select(func.count()).select_from(Exposure)) == 1
    assert len([p for p in database.store.root.rglob("*") if p.is_file()]) == 1


def test_bad_input_files(tmp_path):
    good = write_synthetic(tmp_path / "good.fits")
    raw = good.read_bytes()
    (tmp_path / "truncated.fits").write_bytes(raw[: len(raw) - 4000])
    with pytest.raises(BadInputError, match=r"truncated\.fits: corrupt or truncated"):
        Exposure.from_file(tmp_path / "truncated.fits")
    (tmp_path / "garbage.fits").write_bytes(b"this is not FITS " * 300)
    with pytest.raises(BadInputError, match=r"garbage\.fits: not a readable FITS file"):
        Exposure.from_file(tmp_path / "garbage.fits")
    with pytest.raises(BadInputError, match=r"nothere\.fits: no such file"):
        Exposure.from_file(tmp_path / "nothere.fits")
    table = fits.BinTableHDU.from_columns([fits.Column(name="x", format="E", array=np.zeros(3))])
    fits.HDUList([fits.PrimaryHDU(header=write_header()), table]).writeto(tmp_path / "table.fits")
    with pytest.raises(BadInputError, match=r"table\.fits: no 2-D image HDU"):
        Exposure.from_file(tmp_path / "table.fits")
    fits.PrimaryHDU(np.zeros((4, 4)), header=fits.Header({"INSTRUME": "Zeiss"})).writeto(tmp_path / "z.fits")
    with pytest.raises(UnknownInstrumentError, match=r"z\.fits: INSTRUME='Zeiss'"):
        Exposure.from_file(tmp_path / "z.fits")
    header = write_header()
    del header["EXPTIME"]
    fits.PrimaryHDU(np.zeros((4, 4)), header=header).writeto(tmp_path / "noexp.fits")
    with pytest.raises(MissingHeaderError, match=r"noexp\.fits: missing header keyword for exp_time"):
        Exposure.from_file(tmp_path / "noexp.fits")


def write_header():
    from tests.models.synthetic_files import synthetic_header
    return synthetic_header()
