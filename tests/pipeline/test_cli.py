"""The seechange command line: every command, its --help, and --config."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from pipeline.cli import build_parser, main
from tests.models.synthetic_files import tan_wcs

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("argv", [[], ["db"], ["ingest"], ["images"], ["run"], ["make-ref"], ["provenance"],
                                  ["provenance", "tag"], ["demo"]])
def test_every_command_has_help(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([*argv, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: seechange" in out and "--config" in out


def _user_config(tmp_path, **sections) -> str:
    path = tmp_path / "user.yaml"
    lines = [f"storage:\n  data_root: {tmp_path / 'root'}\n"]
    for name, values in sections.items():
        lines.append(f"{name}:\n" + "".join(f"  {k}: {v}\n" for k, v in values.items()))
    path.write_text("".join(lines))
    return str(path)


def test_ingest_images_and_provenance_commands(tmp_path, shared_data, capsys):
    config = _user_config(tmp_path)
    files = sorted((shared_data / "decam_sfft").glob("DEC-OBS04*.mini.fits"))
    assert main(["db", "upgrade", "--config", config]) == 0
    assert "at revision" in capsys.readouterr().out
    assert main(["ingest", *map(str, files), "--config", config]) == 0
    out = capsys.readouterr().out
    assert out.count("exposure ") == len(files) and out.count("1 image(s)") == len(files)
    assert main(["images", "--ra", "318.11", "--dec", "-66.02", "--config", config]) == 0
    out = capsys.readouterr().out
    assert f"{len(files)} image(s)" in out
    assert main(["images", "--ra", "10", "--dec", "10", "--config", config]) == 0
    assert "0 image(s)" in capsys.readouterr().out
    assert main(["provenance", "tag", "first", "--config", config]) == 0
    assert "as 'first'" in capsys.readouterr().out
    assert main(["provenance", "list", "--config", config]) == 0
    listing = capsys.readouterr().out
    assert "reduced_by" in listing and "first" in listing and "extraction" in listing
    assert main(["images", "--tag", "first", "--ra", "318.11", "--dec", "-66.02", "--config", config]) == 0
    assert f"{len(files)} image(s)" in capsys.readouterr().out
    # the same files again: nothing new
    assert main(["ingest", str(files[0]), "--config", config]) == 0
    assert main(["images", "--config", config]) == 0
    assert f"{len(files)} image(s)" in capsys.readouterr().out


def test_errors_are_one_clear_line(tmp_path, capsys):
    config = _user_config(tmp_path)
    assert main(["ingest", str(tmp_path / "missing.fits"), "--config", config]) == 1
    err = capsys.readouterr().err
    assert "missing.fits" in err and "Traceback" not in err
    bad = _user_config(tmp_path, extraction={"threshold": "high"})
    assert main(["run", "--config", bad]) == 1
    assert "threshold" in capsys.readouterr().err
    (tmp_path / "typo.yaml").write_text("storage:\n  dataroot: /x\n")
    assert main(["images", "--config", str(tmp_path / "typo.yaml")]) == 1
    err = capsys.readouterr().err
    assert "storage.dataroot" in err and "typo.yaml" in err


def test_console_script_module_runs():
    result = subprocess.run([sys.executable, "-m", "pipeline.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "seechange" in result.stdout


def _seechange(*args: str, home: Path) -> subprocess.CompletedProcess:
    """The real command, in a fresh process whose default data root is ``home`` (not the user's)."""
    env = {**os.environ, "SEECHANGE_DATA": str(home)}
    env.pop("SEECHANGE_CONFIG", None)
    result = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True,
                            cwd=ROOT, env=env, timeout=300)
    return result


def _image_file(path: Path, *, instrument: str = "TESTCAM") -> Path:
    data = np.random.default_rng(1).normal(100.0, 5.0, (64, 80)).astype(np.float32)
    header = tan_wcs(150.0, 2.0, data.shape).to_header()
    header.update({"INSTRUME": instrument, "MJD-OBS": 59000.0, "ITIME": 30.0, "FILT": 4})
    fits.PrimaryHDU(data, header=header).writeto(path)
    return path


def _images_in(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT count(*) FROM images").fetchone()[0]


@pytest.mark.parametrize("where", ["before", "after"])
def test_config_and_verbose_work_before_or_after_the_command(tmp_path, shared_data, where):
    """``seechange --config FILE -v ingest ...`` used to ignore FILE and write the default database."""
    home, root = tmp_path / "home", tmp_path / "mine"
    config = tmp_path / "mine.yaml"
    config.write_text(f"storage:\n  data_root: {root}\n")
    image = shared_data / "decam_sfft" / "DEC-OBS04a.mini.fits"
    options = ["--config", str(config), "-v"]
    args = [*options, "ingest", str(image)] if where == "before" else ["ingest", str(image), *options]
    result = _seechange(*args, home=home)
    assert result.returncode == 0, result.stderr
    assert _images_in(root / "seechange.sqlite") == 1
    assert not (home / "seechange.sqlite").exists()
    assert "INFO" in result.stderr or "DEBUG" in result.stderr      # -v took effect


def test_file_name_convention_and_extra_instruments_come_from_the_config_file(tmp_path):
    """Both used to be read from the default configuration whatever --config said."""
    definition = tmp_path / "testcam.yaml"
    definition.write_text("name: TestCam\nmatch: {INSTRUME: '^TESTCAM$'}\n"
                          "keywords:\n  exp_time: [ITIME]\n  filter: [FILT]\n"
                          "defaults: {gain: 2.5, read_noise: 3.0, saturation: 30000, pixel_scale: 0.5}\n"
                          "filter_map: {'4': R}\n")
    root = tmp_path / "root"
    config = tmp_path / "c.yaml"
    config.write_text(f"storage:\n  data_root: {root}\n"
                      "  file_name_convention: 'by_filter/{filter}/{instrument}_{name}_{process}'\n"
                      f"instruments:\n  extra_files: [{definition}]\n")
    result = _seechange("--config", str(config), "ingest", str(_image_file(tmp_path / "t.fits")),
                        home=tmp_path / "home")
    assert result.returncode == 0, result.stderr
    stored = sorted(p.relative_to(root).as_posix() for p in (root / "by_filter").rglob("*.fits"))
    assert len(stored) == 2 and all(p.startswith("by_filter/R/TestCam_") for p in stored), stored
    # without the config, the instrument is unknown: one line naming the file and the header value
    result = _seechange("ingest", str(tmp_path / "t.fits"), home=tmp_path / "home")
    assert result.returncode == 1
    assert "t.fits" in result.stderr and "TESTCAM" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.postgres
def test_a_plain_postgresql_url_works(tmp_path, pg_cluster, shared_data):
    """``postgresql://`` (no driver) used to fail with "No module named 'psycopg'"."""
    import sqlalchemy as sa

    from models.base import make_engine
    name = f"plain_{os.getpid()}"
    admin = make_engine(pg_cluster.url("postgres"))
    with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        url = pg_cluster.url(name).replace("postgresql+psycopg2://", "postgresql://")
        config = tmp_path / "pg.yaml"
        config.write_text(f"db:\n  url: {url}\nstorage:\n  data_root: {tmp_path / 'root'}\n")
        image = shared_data / "decam_sfft" / "DEC-OBS04a.mini.fits"
        result = _seechange("--config", str(config), "ingest", str(image), home=tmp_path / "home")
        assert result.returncode == 0, result.stderr
        result = _seechange("--config", str(config), "images", home=tmp_path / "home")
        assert "1 image(s)" in result.stdout, result.stderr
    finally:
        with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def test_ingest_takes_a_weight_and_a_mask_for_one_image(tmp_path, capsys):
    """Separate weight and mask files that no instrument rule finds, named on the command line."""
    from sqlalchemy import select

    from models.context import Context
    from models.image import Image
    from util.config import Config

    config = _user_config(tmp_path)
    image = tmp_path / "field.fits"
    data = np.random.default_rng(4).normal(200.0, 9.0, (48, 64)).astype(np.float32)
    header = tan_wcs(40.0, 5.0, data.shape).to_header()
    header.update({"MJD-OBS": 59700.0, "EXPTIME": 60.0, "FILTER": "g"})
    fits.PrimaryHDU(data, header=header).writeto(image)
    fits.PrimaryHDU(np.full(data.shape, 0.01, np.float32)).writeto(tmp_path / "wht.fits")
    mask = np.zeros(data.shape, np.uint8)
    mask[10:12, :] = 1
    fits.PrimaryHDU(mask).writeto(tmp_path / "bpm.fits")
    assert main(["--config", config, "ingest", str(image), "--instrument", "Generic",
                 "--weight", str(tmp_path / "wht.fits"), "--flags", str(tmp_path / "bpm.fits")]) == 0
    with Context.from_config(Config.load(config)).session() as session:
        stored = session.scalars(select(Image)).one()
        stored._context = None
    with Context.from_config(Config.load(config)).activate():
        assert np.all(stored.weight[mask == 0] == np.float32(0.01))
        assert np.array_equal(stored.flags != 0, mask != 0)
    # one image only; the weight must have the image's shape
    assert main(["--config", config, "ingest", str(image), str(image), "--weight", str(tmp_path / "wht.fits")]) == 1
    assert "single FILE" in capsys.readouterr().err
    fits.PrimaryHDU(np.ones((5, 5), np.float32)).writeto(tmp_path / "small.fits")
    other = tmp_path / "other.fits"
    fits.PrimaryHDU(data + 1, header=header).writeto(other)
    assert main(["--config", config, "ingest", str(other), "--instrument", "Generic",
                 "--weight", str(tmp_path / "small.fits")]) == 1
    err = capsys.readouterr().err
    assert "small.fits" in err and "(5, 5)" in err and len(err.strip().splitlines()) == 1


def test_after_the_demo_its_config_runs_the_pipeline_offline(tmp_path):
    """The demo writes a configuration naming its database, data root and Gaia folder, so a plain
    ``seechange --config ... run`` afterwards needs no network."""
    home = tmp_path / "home"
    result = _seechange("demo", "--n-images", "1", home=home)
    assert result.returncode == 0, result.stderr
    demo_config = home / "demo_inputs" / "demo_config.yaml"
    assert f"--config {demo_config}" in result.stdout
    result = _seechange("--config", str(demo_config), "run", "--tag", "again", home=tmp_path / "elsewhere")
    assert result.returncode == 0, result.stderr
    # every step existed already (the demo ran the reference epoch again once its reference existed)
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2 and all(line.count("skipped") == 9 for line in lines), result.stdout
    result = _seechange("--config", str(demo_config), "images", "--tag", "again", "--type", "science",
                        "--order-by", "quality", home=tmp_path / "elsewhere")
    assert "2 image(s)" in result.stdout          # the reference epoch and the new one
    result = _seechange("--config", str(demo_config), "images", "--tag", "again", "--type", "difference",
                        home=tmp_path / "elsewhere")
    assert "2 image(s)" in result.stdout and result.stdout.count("difference") == 2


def test_db_check_and_clean(tmp_path, capsys):
    """``db check`` exits 1 naming each problem; ``db clean --dry-run`` only says; ``db clean`` repairs."""
    config = _user_config(tmp_path)
    from tests.models.synthetic_files import write_synthetic

    image = write_synthetic(tmp_path / "t.fits")
    assert main(["--config", config, "ingest", str(image)]) == 0
    assert main(["--config", config, "db", "check", "--min-age", "0"]) == 0
    assert "no problem(s)" in capsys.readouterr().out
    stored = next((tmp_path / "root").rglob("*_preprocessing_*.fits"))
    orphan = stored.with_name("x" + stored.name)
    orphan.write_bytes(b"left by a kill")
    assert main(["--config", config, "db", "check"]) == 0            # young: may be a save in progress
    assert "younger than the minimum age" in capsys.readouterr().out
    assert main(["--config", config, "db", "check", "--min-age", "0"]) == 1
    out = capsys.readouterr().out
    assert "orphan file" in out and orphan.name in out and "1 problem(s)" in out
    assert main(["--config", config, "db", "clean", "--dry-run", "--min-age", "0"]) == 0
    assert "would delete orphan file" in capsys.readouterr().out and orphan.exists()
    assert main(["--config", config, "db", "clean", "--min-age", "0"]) == 0
    assert "deleted orphan file" in capsys.readouterr().out and not orphan.exists()
    assert main(["--config", config, "db", "check", "--min-age", "0", "--quick"]) == 0


def test_database_errors_are_one_line_without_sql():
    from sqlalchemy.exc import IntegrityError, OperationalError

    from pipeline.runner import error_line
    from pipeline.step import StepError

    class UniqueViolation(Exception):
        pass

    cause = UniqueViolation('duplicate key value violates unique constraint "uq_images"\n'
                            "DETAIL:  Key (exposure_id)=(1) already exists.")
    error = IntegrityError("INSERT INTO images (id, data) VALUES (%(id)s, %(data)s)", {"id": 1, "data": "x"}, cause)
    assert error_line(error) == ('database error (UniqueViolation): duplicate key value violates unique '
                                 'constraint "uq_images"')
    step = StepError("astrocal", "image X", OperationalError("SELECT 1", {}, Exception("database is locked")))
    assert error_line(step) == "astrocal failed on image X: database error (Exception): database is locked"
    assert error_line(ValueError("two\nlines")) == "two; lines"
