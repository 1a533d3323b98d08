"""Provenance: how a product was made, as a hash anyone can recompute.

A `Provenance` is identified by the hash of

- the process name (``"preprocessing"``, ``"extraction"``, ...),
- the major.minor version of that process's code (`CodeVersion`),
- the parameters that change the result, as canonical JSON (sorted keys, stable floats),
- the sorted ids of the upstream provenances.

Computing the id needs no database, so two machines that run the same code with the same
parameters on the same inputs agree on it.  Parameters that do not change the result (timeouts,
paths, verbosity) are left out by the caller (see ``pipeline.parameters``).

A `ProvenanceTag` names a consistent set of provenances, e.g. ``"dr1"``:
``Provenance.get_for_tag(tag="dr1", process="preprocessing")``.  A tag may hold several
provenances of one process when their upstreams differ -- the extraction of a coadd (upstream:
coaddition) beside that of a single exposure (upstream: preprocessing) -- and a product's own
upstream tells which applies (`pipeline.data_store.DataStore.load_prov_tree`).  Two provenances
of one process with the same upstreams in one tag would be ambiguous, and are refused.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import sqlalchemy as sa
from sqlalchemy import ForeignKey, Table, Column, UniqueConstraint, select
from sqlalchemy.orm import Mapped, Session, mapped_column, relationship

from models.base import Base, TimestampMixin, session_scope, utcnow

__all__ = ["CodeVersion", "Provenance", "ProvenanceTag", "ProvenanceError", "ProvenanceConflictError",
           "UnknownTagError", "AmbiguousProvenanceError", "canonical_json", "provenance_hash",
           "upstreams_key"]

PROVENANCE_ID_LENGTH = 24

provenance_upstreams = Table(
    "provenance_upstreams",
    Base.metadata,
    Column("downstream_id", sa.String(PROVENANCE_ID_LENGTH),
           ForeignKey("provenances.id", ondelete="CASCADE"), primary_key=True),
    Column("upstream_id", sa.String(PROVENANCE_ID_LENGTH),
           ForeignKey("provenances.id", ondelete="RESTRICT"), primary_key=True, index=True),
)


class ProvenanceError(Exception):
    """A provenance or tag was asked for something it cannot give (a usage error, not bad data)."""


def _canonical(value: Any) -> Any:
    """Plain JSON types only: numpy scalars unwrapped, tuples as lists, floats made stable."""
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_canonical(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        number = float(value)
        if not math.isfinite(number):
            raise ProvenanceError(f"provenance parameters must be finite numbers, got {number}")
        # A float equal to an int hashes like the int, so 5 and 5.0 in a config agree.
        return int(number) if number.is_integer() else float(repr(number))
    if value is None or isinstance(value, str):
        return value
    raise TypeError(f"provenance parameter of type {type(value).__name__} cannot be hashed: {value!r}")


def canonical_json(parameters: Mapping[str, Any]) -> str:
    """Canonical JSON of a parameter mapping: sorted keys, no spaces, shortest round-trip floats."""
    return json.dumps(_canonical(parameters), sort_keys=True, separators=(",", ":"))


def _major_minor(version: str) -> str:
    parts = version.split(".")
    if len(parts) < 2 or not all(p.isdigit() for p in parts[:2]):
        raise ProvenanceError(f"code version must look like MAJOR.MINOR[.PATCH], got {version!r}")
    return f"{int(parts[0])}.{int(parts[1])}"


def provenance_hash(process: str, code_version: str, parameters: Mapping[str, Any],
                    upstream_ids: Iterable[str]) -> str:
    """The provenance id: a pure function of its inputs.

    Parameters
    ----------
    process : str
        Process name.
    code_version : str
        ``MAJOR.MINOR[.PATCH]``; only major.minor enters the hash, so bug-fix releases that do not
        change results keep provenances.
    parameters : mapping
        The result-changing parameters.
    upstream_ids : iterable of str
        Ids of the upstream provenances, in any order.

    Returns
    -------
    str
        The first 24 hex digits of a SHA-256.
    """
    payload = json.dumps({
        "process": process,
        "code_version": _major_minor(code_version),
        "parameters": json.loads(canonical_json(parameters)),
        "upstreams": sorted(set(upstream_ids)),
    }, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()[:PROVENANCE_ID_LENGTH]


class ProvenanceConflictError(ProvenanceError):
    """A tag already holds another provenance of the same process with the same upstreams."""


class UnknownTagError(ProvenanceError, LookupError):
    """No provenance carries this tag."""


class AmbiguousProvenanceError(ProvenanceError):
    """A tag holds several provenances of one process where one was asked for."""


def upstreams_key(upstream_ids: Iterable[str]) -> str:
    """A short key of a set of upstream ids (what makes two provenances of one process distinct in a tag)."""
    return hashlib.sha256(",".join(sorted(set(upstream_ids))).encode()).hexdigest()[:PROVENANCE_ID_LENGTH]


class CodeVersion(Base):
    """A version of the code of one process (``extraction`` 1.2.0)."""

    __tablename__ = "code_versions"

    process: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    version: Mapped[str] = mapped_column(sa.String(32), primary_key=True)


class Provenance(TimestampMixin, Base):
    """How a product was made: process, code version, parameters and upstream provenances.

    Build one with ``Provenance(process=..., code_version=..., parameters=..., upstreams=[...])``;
    its ``id`` is computed at once (no database needed).  `Provenance.save` stores it and its
    upstream links; saving the same provenance twice, even from two processes at once, is a no-op.
    """

    __tablename__ = "provenances"

    id: Mapped[str] = mapped_column(sa.String(PROVENANCE_ID_LENGTH), primary_key=True)
    process: Mapped[str] = mapped_column(sa.String(64), index=True)
    code_version: Mapped[str] = mapped_column(sa.String(32))
    parameters: Mapped[dict] = mapped_column(default=dict)
    upstreams: Mapped[list[Provenance]] = relationship(
        secondary=provenance_upstreams,
        primaryjoin=lambda: Provenance.id == provenance_upstreams.c.downstream_id,
        secondaryjoin=lambda: Provenance.id == provenance_upstreams.c.upstream_id,
        # the whole chain comes with a provenance (a self-referential eager load stops after
        # join_depth levels): trees are walked after their session has closed
        lazy="selectin", join_depth=16,
    )

    def __init__(self, *, process: str, code_version: str, parameters: Mapping[str, Any] | None = None,
                 upstreams: Iterable[Provenance] = ()):
        upstreams = list(upstreams)
        parameters = json.loads(canonical_json(parameters or {}))
        super().__init__(
            id=provenance_hash(process, code_version, parameters, (u.id for u in upstreams)),
            process=process, code_version=code_version, parameters=parameters,
            upstreams=sorted(upstreams, key=lambda u: u.id),
        )

    def __repr__(self) -> str:
        ups = ", ".join(f"{u.process} {u.id[:8]}" for u in self.upstreams)
        return f"<Provenance {self.process} {self.id} v{self.code_version} upstreams [{ups}]>"

    @property
    def upstream_ids(self) -> list[str]:
        """Sorted ids of the upstream provenances."""
        return sorted(u.id for u in self.upstreams)

    def recompute_id(self) -> str:
        """The id implied by this object's fields (equals ``id`` unless someone changed a field)."""
        return provenance_hash(self.process, self.code_version, self.parameters, self.upstream_ids)

    def save(self, session: Session | None = None) -> Provenance:
        """Store this provenance, its upstreams (recursively) and its code version; idempotent.

        Returns the stored row, attached to ``session`` when one is given.
        """
        with session_scope(session) as sess:
            if sa.inspect(self).has_identity:  # loaded from the database: stored already
                return sess.get(Provenance, self.id)
            for upstream in self.upstreams:
                upstream.save(sess)
            _insert_ignore(sess, CodeVersion.__table__,
                           {"process": self.process, "version": self.code_version})
            _insert_ignore(sess, Provenance.__table__, {
                "id": self.id, "process": self.process, "code_version": self.code_version,
                "parameters": self.parameters, "created_at": self.created_at or utcnow()})
            for upstream_id in self.upstream_ids:
                _insert_ignore(sess, provenance_upstreams,
                               {"downstream_id": self.id, "upstream_id": upstream_id})
            sess.flush()
            return sess.get(Provenance, self.id)

    @classmethod
    def get(cls, provenance_id: str, session: Session | None = None) -> Provenance | None:
        """The provenance with this id, or None."""
        with session_scope(session) as sess:
            return sess.get(cls, provenance_id)

    @classmethod
    def get_for_tag(cls, *, tag: str, process: str, session: Session | None = None) -> Provenance | None:
        """The provenance of ``process`` in ``tag``, or None if the tag has none for it.

        Raises
        ------
        UnknownTagError
            No provenance carries ``tag`` (the message lists the tags there are).
        AmbiguousProvenanceError
            The tag holds several provenances of ``process`` (e.g. extraction of coadds and of
            single images); use `all_for_tag`, or a DataStore, which picks by upstream.
        """
        found = cls.all_for_tag(tag=tag, process=process, session=session)
        if len(found) > 1:
            described = "; ".join(repr(p) for p in found)
            raise AmbiguousProvenanceError(
                f"tag '{tag}' holds {len(found)} provenances of process '{process}', with different "
                f"upstreams: {described}.  Use Provenance.all_for_tag, or DataStore.load_prov_tree, "
                "which picks the one made from the image's own products")
        return found[0] if found else None

    @classmethod
    def all_for_tag(cls, *, tag: str, process: str, session: Session | None = None) -> list[Provenance]:
        """Every provenance of ``process`` in ``tag`` (UnknownTagError if no provenance carries it)."""
        with session_scope(session) as sess:
            if sess.scalar(select(ProvenanceTag.id).where(ProvenanceTag.tag == tag).limit(1)) is None:
                known = ProvenanceTag.tags(session=sess)
                raise UnknownTagError(f"no provenance carries the tag '{tag}'; tags: "
                                      f"{', '.join(known) if known else 'none yet'}")
            return list(sess.scalars(
                select(Provenance).join(ProvenanceTag, ProvenanceTag.provenance_id == Provenance.id)
                .where(ProvenanceTag.tag == tag, ProvenanceTag.process == process)
                .order_by(Provenance.id)))


def _insert_ignore(session: Session, table: sa.Table, values: dict[str, Any]) -> None:
    """INSERT that does nothing when the primary/unique key already exists (race-safe)."""
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    session.execute(insert(table).values(**values).on_conflict_do_nothing())


class ProvenanceTag(TimestampMixin, Base):
    """One provenance in a named, consistent set (a tag).

    Unique per (tag, process, upstreams): a tag holds at most one provenance of a process for
    each set of upstream provenances, so a product's upstream always decides which one applies.
    """

    __tablename__ = "provenance_tags"
    __table_args__ = (UniqueConstraint("tag", "process", "upstreams_key",
                                       name="uq_provenance_tags_tag_process_upstreams"),)

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    tag: Mapped[str] = mapped_column(sa.String(128), index=True)
    process: Mapped[str] = mapped_column(sa.String(64))
    upstreams_key: Mapped[str] = mapped_column(sa.String(PROVENANCE_ID_LENGTH))
    provenance_id: Mapped[str] = mapped_column(
        ForeignKey("provenances.id", ondelete="CASCADE"), index=True)

    @classmethod
    def add(cls, tag: str, provenances: Iterable[Provenance], session: Session | None = None) -> None:
        """Put provenances into a tag (safe when several processes tag at once).

        Re-tagging the same provenance is a no-op.

        Raises
        ------
        ProvenanceConflictError
            The tag holds a different provenance of the same process with the same upstreams
            (e.g. the same step with other parameters); names tag, process and both ids.
        """
        provenances = list(provenances)
        with session_scope(session) as sess:
            for prov in provenances:
                prov.save(sess)
                _insert_ignore(sess, cls.__table__, {
                    "tag": tag, "process": prov.process, "upstreams_key": upstreams_key(prov.upstream_ids),
                    "provenance_id": prov.id, "created_at": utcnow()})
            sess.flush()
            for prov in provenances:
                held = sess.scalars(select(cls.provenance_id).where(
                    cls.tag == tag, cls.process == prov.process,
                    cls.upstreams_key == upstreams_key(prov.upstream_ids))).one()
                if held != prov.id:
                    raise ProvenanceConflictError(
                        f"tag '{tag}' already has provenance {held} for process '{prov.process}' "
                        f"with the same upstreams; cannot also tag {prov.id} (other parameters or "
                        "code version: use another tag)")

    @classmethod
    def provenances(cls, tag: str, session: Session | None = None) -> list[Provenance]:
        """Every provenance in a tag, sorted by process and id."""
        with session_scope(session) as sess:
            return list(sess.scalars(select(Provenance).join(cls, Provenance.id == cls.provenance_id)
                                     .where(cls.tag == tag).order_by(Provenance.process, Provenance.id)))

    @classmethod
    def tags(cls, session: Session | None = None) -> list[str]:
        """Names of all tags."""
        with session_scope(session) as sess:
            return list(sess.scalars(select(cls.tag).distinct().order_by(cls.tag)))
