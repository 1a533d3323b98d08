"""CatalogExcerpt: a cached piece of a reference catalog covering an image, so a field is fetched once."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from astropy.table import Table
from sqlalchemy import ForeignKey, Index, UniqueConstraint, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from models.base import Base, TimestampMixin, UUIDMixin, session_scope
from models.file_store import FileBackedMixin, safe_component

__all__ = ["CatalogExcerpt"]


class CatalogExcerpt(UUIDMixin, TimestampMixin, FileBackedMixin, Base):
    """Reference-catalog stars in an RA/Dec box, in a FITS table with Gaia column names.

    ``minra > maxra`` means the box straddles RA = 0.
    """

    __tablename__ = "catalog_excerpts"
    __table_args__ = (
        Index("ix_catalog_excerpts_catalog_box", "catalog", "mindec", "maxdec"),
        # one excerpt per key and box: processes that fetch the same field at once agree on one
        UniqueConstraint("catalog", "minra", "maxra", "mindec", "maxdec", name="uq_catalog_excerpts_catalog_box"),
    )

    catalog: Mapped[str] = mapped_column(sa.String(64))
    origin: Mapped[str] = mapped_column(sa.String(512))
    provenance_id: Mapped[str] = mapped_column(ForeignKey("provenances.id", ondelete="RESTRICT"), index=True)
    minra: Mapped[float]
    maxra: Mapped[float]
    mindec: Mapped[float]
    maxdec: Mapped[float]
    num_items: Mapped[int]

    def __init__(self, *, data: Table | None = None, **kwargs):
        if data is not None:
            kwargs.setdefault("num_items", len(data))
        super().__init__(**kwargs)
        self._data = data

    @sa.orm.reconstructor
    def _init_on_load(self) -> None:
        self._data = None

    def __repr__(self) -> str:
        return (f"<CatalogExcerpt {self.catalog}: {self.num_items} stars in RA {self.minra:.4f}..{self.maxra:.4f}, "
                f"Dec {self.mindec:+.4f}..{self.maxdec:+.4f}>")

    @property
    def data(self) -> Table:
        if self._data is None:
            self.load_file()
        return self._data

    def covers(self, minra: float, maxra: float, mindec: float, maxdec: float) -> bool:
        """Whether this excerpt's box contains the given box (same wrap convention)."""
        def unwrap(lo: float, hi: float) -> tuple[float, float]:
            return (lo, hi) if lo <= hi else (lo, hi + 360.0)
        lo, hi = unwrap(self.minra, self.maxra)
        qlo, qhi = unwrap(minra, maxra)
        if qlo < lo:
            qlo, qhi = qlo + 360.0, qhi + 360.0
        return self.mindec <= mindec and maxdec <= self.maxdec and lo <= qlo and qhi <= hi

    @classmethod
    def find_covering(cls, catalog: str, minra: float, maxra: float, mindec: float, maxdec: float,
                      session: Session | None = None) -> CatalogExcerpt | None:
        """A stored excerpt of ``catalog`` whose box contains the given box, or None."""
        with session_scope(session) as sess:
            candidates = sess.scalars(select(cls).where(
                cls.catalog == catalog, cls.mindec <= mindec, cls.maxdec >= maxdec)).all()
        for candidate in candidates:
            if candidate.covers(minra, maxra, mindec, maxdec):
                return candidate
        return None

    def file_stem(self, store=None) -> str:
        return "/".join(["catalogs", safe_component(self.catalog),
                         safe_component(f"{self.catalog}_{self.minra:.4f}_{self.maxra:.4f}_"
                                        f"{self.mindec:+.4f}_{self.maxdec:+.4f}_{str(self.id)[:8]}")])

    def _write(self, path: Path) -> None:
        self.data.write(path, format="fits", overwrite=True)

    def _read(self, path: Path) -> None:
        self._data = Table.read(path, format="fits", hdu=1)
