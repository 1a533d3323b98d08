"""Malformed input: generated bad files, headers, pixels and configurations (`bad_inputs`).

Each gives exactly one line on stderr naming the input and the problem, a non-zero exit, no
traceback and no SQL, and nothing saved: a refused file leaves no row and no file; pixels that
cannot give a product leave nothing of the failing step (the steps before it keep theirs, so a
later run resumes) and every file has its row.  A batch goes on past a bad file and says how many
failed.  Inputs that today's readers accept although they should not are strict xfails naming
the module at fault, so they show up in every report until fixed.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from models.maintenance import check
from tests.models.synthetic_files import write_synthetic
from tests.reliability.bad_inputs import BAD_INPUTS
from tests.reliability.conftest import BACKENDS
from tests.reliability.figures import record
from tests.reliability.harness import counts

IMAGE_ID = re.compile(r"image ([0-9a-f-]{36})")
CI_BACKEND = "sqlite"


def _cases():
    for backend in BACKENDS:
        name = getattr(backend, "values", [backend])[0]
        marks = list(getattr(backend, "marks", []))
        for bad in BAD_INPUTS:
            extra = [] if (name == CI_BACKEND and not bad.campaign_only) else [pytest.mark.campaign]
            if bad.known_gap:
                extra.append(pytest.mark.xfail(reason=bad.known_gap, strict=True))
            yield pytest.param(name, bad, marks=marks + extra, id=f"{name}-{bad.name}")


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line, got {len(lines)}:\n{err}"
    assert "Traceback" not in err and "[SQL" not in err
    return lines[0]


@pytest.mark.parametrize("backend, bad", list(_cases()))
def test_bad_input_is_refused_in_one_line(installations, tmp_path, backend, bad):
    record("bad inputs tried", backend)
    install = installations(backend)
    assert install.cli("db", "upgrade")[0] == 0
    folder = tmp_path / "input"
    folder.mkdir()
    argv = bad.make(folder)
    good = write_synthetic(folder / "a_good_image.fits")
    before = None
    if argv[0] == "--extra-config":
        assert install.cli("ingest", str(good))[0] == 0
        before = counts(install.context())
        original = install.config_path.read_text()
        install.config_path.write_text(original + argv[1].replace("{good}", str(good)) + "\n")
        argv = [a.replace("{good}", str(good)) for a in argv[2:]]
    code, out, err = install.cli(*argv)
    if bad.stage == "run":
        assert code == 0, f"{bad.name} should be ingested (its pixels are the problem): {err}"
        before = counts(install.context())
        image_id = IMAGE_ID.search(out).group(1)
        code, out, err = install.cli("run", image_id)
    if bad.may_succeed and code == 0:
        assert check(install.context(), min_age=0).ok and "Traceback" not in err
        record("extreme inputs handled (10^8 pixels)", backend)
        return
    assert code != 0, f"{bad.name} was accepted:\n{out}\n{err}"
    line = _one_line(err)
    expected = bad.names(good) if bad.names else Path(argv[-1] if argv[0] == "ingest" else argv[1]).name
    if bad.stage == "run":
        assert re.search(r"failed on image \S+ \S+ \S+ mjd", line), line
    else:
        assert expected in line, f"the line does not name {expected!r}: {line}"
    if bad.stage == "config":
        install.config_path.write_text(original)     # to look at what was saved
    if bad.name != "data root is a file":      # (then there is no file store to look into)
        _nothing_saved(install, bad, before, line)
    record("bad inputs refused in one line, nothing saved", backend)


def _nothing_saved(install, bad, before, line: str) -> None:
    context = install.context()
    report = check(context, min_age=0)
    assert report.ok, "\n".join(p.line() for p in report.problems)
    now = counts(context)
    if bad.stage == "ingest":
        assert not any(now.values()), now
    elif " failed on image " not in line:
        assert now == before, (before, now)
    else:           # the failing step made nothing (the steps before it keep theirs)
        from pipeline.step import step_classes

        step = step_classes()[line.split(" failed on ")[0].split(": error: ")[-1]]
        for output in step.outputs:
            assert now[output.model.__tablename__] == 0, now


def test_a_batch_goes_on_past_bad_files(installations, tmp_path):
    install = installations("sqlite")
    good = [write_synthetic(tmp_path / f"good{k}.fits", seed=k, mjd=60000.5 + k) for k in range(2)]
    (tmp_path / "bad.fits").write_bytes(b"not FITS at all")
    (tmp_path / "cut.fits").write_bytes(good[0].read_bytes()[:3000])
    code, out, err = install.cli("ingest", str(good[0]), str(tmp_path / "bad.fits"), str(tmp_path / "cut.fits"),
                                 str(good[1]))
    assert code == 1 and out.count("exposure ") == 2
    lines = err.strip().splitlines()
    assert lines[0].startswith(f"{tmp_path / 'bad.fits'}: error:") and "cut.fits" in lines[1]
    assert lines[-1] == "2 of 4 file(s) could not be ingested" and len(lines) == 3
    # pixels that cannot be calibrated among good ones: the run goes on and counts
    for k, value in enumerate((1000.0, 60000.0)):
        write_synthetic(tmp_path / f"flat{k}.fits", data=_flat(value), mjd=60010.0 + k)
        assert install.cli("ingest", str(tmp_path / f"flat{k}.fits"))[0] == 0
    code, out, err = install.cli("run")
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 3, err
    assert all(line.startswith("FAILED: ") and "failed on image" in line for line in lines[:2])
    assert lines[2] == "seechange run: error: 2 of 4 work items failed"
    assert out.count("photocal") == 2           # the good images went all the way


def _flat(value):
    import numpy as np

    return np.full((64, 80), value, np.float32)
