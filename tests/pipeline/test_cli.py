"""The seechange command line: every command, its --help, and --config."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pipeline.cli import build_parser, main


@pytest.mark.parametrize("argv", [[], ["db"], ["ingest"], ["images"], ["run"], ["provenance"],
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
    assert "ingest" in listing and "first" in listing and "extraction" in listing
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
