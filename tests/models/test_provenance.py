"""Provenance ids, storage and tags, on both back ends."""

import subprocess
import sys
import threading

import pytest
from sqlalchemy import func, select

from models.base import session_scope
from models.provenance import (AmbiguousProvenanceError, Provenance, ProvenanceConflictError,
                               ProvenanceError, ProvenanceTag, UnknownTagError, canonical_json,
                               provenance_hash)


def _prov(process="extraction", version="1.2.0", upstreams=(), **params):
    return Provenance(process=process, code_version=version, parameters=params or {"threshold": 5.0},
                      upstreams=upstreams)


def test_id_is_pure_and_stable_across_processes():
    prov = _prov(threshold=5.0, apertures=[1.0, 2.0])
    code = ("from models.provenance import Provenance;"
            "print(Provenance(process='extraction', code_version='1.2.0',"
            " parameters={'apertures': (1.0, 2), 'threshold': 5}).id)")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert other.stdout.strip() == prov.id
    assert len(prov.id) == 24 and int(prov.id, 16) >= 0


def test_id_independent_of_upstream_order():
    a, b = _prov("preprocessing", threshold=1), _prov("backgrounding", threshold=2)
    assert _prov(upstreams=[a, b]).id == _prov(upstreams=[b, a]).id
    assert _prov(upstreams=[a]).id != _prov(upstreams=[a, b]).id


def test_id_changes_with_parameters_and_major_minor_only():
    base = _prov(threshold=5.0)
    assert _prov(threshold=5.1).id != base.id
    assert _prov(version="1.3.0", threshold=5.0).id != base.id
    assert _prov(version="2.2.0", threshold=5.0).id != base.id
    assert _prov(version="1.2.7", threshold=5.0).id == base.id
    assert _prov(process="detection", threshold=5.0).id != base.id


def test_canonical_json_sorts_keys_and_stabilizes_floats():
    assert canonical_json({"b": 0.1 + 0.2, "a": (1, 2.0)}) == '{"a":[1,2],"b":0.30000000000000004}'
    assert provenance_hash("p", "1.0", {"x": 1, "y": 2}, []) == provenance_hash("p", "1.0", {"y": 2, "x": 1}, [])
    with pytest.raises(ProvenanceError, match="finite"):
        canonical_json({"x": float("nan")})
    with pytest.raises(ProvenanceError, match="MAJOR.MINOR"):
        provenance_hash("p", "one", {}, [])


def test_save_twice_is_noop_and_keeps_upstreams(database):
    up = _prov("preprocessing", threshold=1)
    down = _prov(upstreams=[up])
    down.save()
    down.save()
    _prov(upstreams=[up]).save()
    with session_scope() as session:
        assert session.scalar(select(func.count()).select_from(Provenance)) == 2
        loaded = session.get(Provenance, down.id)
        assert loaded.upstream_ids == [up.id]
        assert loaded.recompute_id() == down.id


def test_concurrent_saves_do_not_fail(database):
    provs = [_prov(threshold=7.0) for _ in range(6)]
    errors = []

    def save(p):
        try:
            p.save()
        except Exception as exc:  # collected to fail the test below with the real error
            errors.append(exc)

    threads = [threading.Thread(target=save, args=(p,)) for p in provs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with session_scope() as session:
        assert session.scalar(select(func.count()).select_from(Provenance)) == 1


def test_tags(database):
    pre = _prov("preprocessing", threshold=1)
    ext = _prov(upstreams=[pre])
    ProvenanceTag.add("dr1", [pre, ext])
    ProvenanceTag.add("dr1", [ext])  # re-tagging the same one is fine
    assert Provenance.get_for_tag(tag="dr1", process="extraction").id == ext.id
    assert Provenance.get_for_tag(tag="dr1", process="subtraction") is None
    with pytest.raises(UnknownTagError, match="'nope'.*tags: dr1"):
        Provenance.get_for_tag(tag="nope", process="extraction")
    other = _prov(threshold=9.0, upstreams=[pre])
    with pytest.raises(ProvenanceConflictError) as err:
        ProvenanceTag.add("dr1", [other])
    message = str(err.value)
    assert "dr1" in message and "extraction" in message and ext.id in message and other.id in message
    assert Provenance.get_for_tag(tag="dr1", process="extraction").id == ext.id
    assert {p.process for p in ProvenanceTag.provenances("dr1")} == {"preprocessing", "extraction"}
    assert ProvenanceTag.tags() == ["dr1"]


def test_a_tag_holds_one_process_twice_when_the_upstreams_differ(database):
    """A coadd's extraction and a single image's extraction share a tag; asking for "the"
    extraction is then ambiguous, and says so; a DataStore picks by upstream (tested in pipeline)."""
    pre = _prov("preprocessing", threshold=1)
    coadd = _prov("coaddition", n=5)
    ext_single, ext_coadd = _prov(upstreams=[pre]), _prov(upstreams=[coadd])
    assert ext_single.id != ext_coadd.id
    ProvenanceTag.add("dr1", [pre, coadd, ext_single, ext_coadd])
    assert [p.id for p in Provenance.all_for_tag(tag="dr1", process="extraction")] == sorted(
        [ext_single.id, ext_coadd.id])
    with pytest.raises(AmbiguousProvenanceError, match="2 provenances of process 'extraction'"):
        Provenance.get_for_tag(tag="dr1", process="extraction")
    assert Provenance.get_for_tag(tag="dr1", process="preprocessing").id == pre.id
