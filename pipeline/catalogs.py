"""Reference catalogs for calibration: fetched once per field, cached as CatalogExcerpts.

`reference_catalog` returns the stars covering an image: from a stored `CatalogExcerpt` whose
box contains the image (no fetch at all), else from the source named by the parameters -- a local
folder of Gaia chunk files (the Legacy Surveys' layout, also what the simulator writes) or the
Gaia archive through astroquery -- saved as a new excerpt (file and row together).  Proper
motions are applied to the image epoch by `stars_at_epoch`.

Stars that seeing blends with a neighbour are no calibrators: Gaia resolves pairs 0.5" apart that
a ground-based image shows as one source, whose centroid and flux then include the neighbour.
Each excerpt therefore carries a boolean column ``isolated``, computed when it is fetched from
every catalog star (also those fainter than the magnitude limit): False when another star lies
within `NEIGHBOR_RADIUS_ARCSEC` and is less than `NEIGHBOR_DMAG` fainter.  `isolated_stars` keeps
the isolated rows.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from astropy.table import Table

from improc import catalog_stars, matching
from improc.footprint import polygon_bounds
from models.catalog_excerpt import CatalogExcerpt
from models.context import Context, current_context
from models.file_store import content_md5
from models.provenance import Provenance, canonical_json
from models.saving import save_products
from util import gaia
from util.config import ConfigError

__all__ = ["CatalogSource", "reference_catalog", "stars_at_epoch", "isolated_stars",
           "neighbor_free", "NEIGHBOR_RADIUS_ARCSEC", "NEIGHBOR_DMAG"]

log = logging.getLogger(__name__)

CatalogKind = Literal["gaia_folder", "gaia_dr3"]

#: A catalog star with another star closer than this, in arcsec (~3 FWHM of good seeing) ...
NEIGHBOR_RADIUS_ARCSEC = 3.0
#: ... that is less than this many magnitudes fainter (6% of its flux) is not isolated.
NEIGHBOR_DMAG = 3.0


#: Version of the code that makes an excerpt (fetching, the ``isolated`` column); in every key.
EXCERPT_VERSION = "1.2.0"


@dataclass(frozen=True)
class CatalogSource:
    """Where reference stars come from.

    kind : ``"gaia_folder"`` (local chunk files in ``folder``) or ``"gaia_dr3"`` (the Gaia
        archive through astroquery; needs the network).
    folder : the local folder, for ``gaia_folder``.
    mag_limit : faintest G kept.
    pad_arcsec : margin added around the image footprint (covers pointing errors).
    neighbor_radius_arcsec, neighbor_dmag : the rule of the ``isolated`` column (see the module
        docstring).
    """

    kind: CatalogKind
    folder: str | None = None
    mag_limit: float = 21.0
    pad_arcsec: float = 120.0
    neighbor_radius_arcsec: float = NEIGHBOR_RADIUS_ARCSEC
    neighbor_dmag: float = NEIGHBOR_DMAG

    def parameters(self) -> dict:
        """What, besides the data read, an excerpt's content depends on."""
        return {"kind": self.kind, "mag_limit": self.mag_limit, "pad_arcsec": self.pad_arcsec,
                "neighbor_radius_arcsec": self.neighbor_radius_arcsec, "neighbor_dmag": self.neighbor_dmag}

    def key(self, box: tuple[float, float, float, float]) -> str:
        """Cache key of excerpts of this source for a box: everything their content depends on.

        The parameters and the code version and, for a local folder, the content (md5) and name
        of every chunk file the box reads, so that a folder whose files change, or another folder
        with other files, never answers from a stale excerpt; the same files elsewhere do.
        """
        parts: dict = {**self.parameters(), "version": EXCERPT_VERSION}
        if self.kind == "gaia_folder":
            if not self.folder:
                raise ConfigError("catalog kind 'gaia_folder' needs a catalog folder (catalog_folder)")
            files = gaia.gaia_folder_files(self.folder, ra_min=box[0], ra_max=box[1], dec_min=box[2],
                                           dec_max=box[3])
            parts["files"] = [[path.name, content_md5(path)] for path in files]
        digest = hashlib.sha256(canonical_json(parts).encode()).hexdigest()[:16]
        return f"{self.kind}_G{self.mag_limit:g}_{digest}"

    def provenance(self) -> Provenance:
        return Provenance(process="catalog_excerpt", code_version=EXCERPT_VERSION, parameters=self.parameters())


def _padded_box(image, pad_arcsec: float) -> tuple[float, float, float, float]:
    ra, dec = image.corners
    minra, maxra, mindec, maxdec = (float(v[0]) for v in polygon_bounds(ra, dec))
    pad = pad_arcsec / 3600.0
    mindec, maxdec = max(mindec - pad, -90.0), min(maxdec + pad, 90.0)
    if mindec <= -90.0 or maxdec >= 90.0:
        return 0.0, 360.0, mindec, maxdec
    cos_dec = max(np.cos(np.radians(max(abs(mindec), abs(maxdec)))), 1e-3)
    rpad = pad / cos_dec
    width = (maxra - minra) % 360.0
    if width + 2 * rpad >= 360.0:
        return 0.0, 360.0, mindec, maxdec
    return float((minra - rpad) % 360.0), float((maxra + rpad) % 360.0), mindec, maxdec


def _fetch(source: CatalogSource, box: tuple[float, float, float, float]) -> tuple[Table, str]:
    minra, maxra, mindec, maxdec = box
    if source.kind == "gaia_folder":
        if not source.folder:
            raise ConfigError("catalog kind 'gaia_folder' needs a catalog folder (catalog_folder)")
        try:
            table = gaia.read_gaia_folder(source.folder, ra_min=minra, ra_max=maxra,
                                          dec_min=mindec, dec_max=maxdec)
        except gaia.CatalogError:
            raise
        except (ValueError, TypeError) as exc:  # columns that are not numbers; the box is valid
            raise gaia.CatalogError(f"Gaia catalog folder {source.folder} holds a file whose columns "
                                    f"are not Gaia's: {type(exc).__name__}: {exc}") from exc
        origin = str(Path(source.folder).resolve())
    else:
        ra_c = (minra + ((maxra - minra) % 360.0) / 2.0) % 360.0
        dec_c = (mindec + maxdec) / 2.0
        corner_sep = np.hypot(((maxra - minra) % 360.0) / 2.0 * np.cos(np.radians(dec_c)),
                              (maxdec - mindec) / 2.0)
        # deeper than the limit, so that the neighbours that spoil a star are seen
        table = gaia.query_gaia_astroquery(ra=ra_c, dec=dec_c, radius_deg=float(corner_sep),
                                           mag_limit=source.mag_limit + source.neighbor_dmag)
        origin = "Gaia DR3 (astroquery)"
    table["isolated"] = neighbor_free(table, radius_arcsec=source.neighbor_radius_arcsec,
                                      dmag=source.neighbor_dmag)
    g = np.asarray(table["phot_g_mean_mag"], dtype=float)
    return table[np.isfinite(g) & (g <= source.mag_limit)], origin


def reference_catalog(image, source: CatalogSource, *, context: Context | None = None,
                      cache: bool = True) -> CatalogExcerpt:
    """The catalog excerpt covering ``image`` (its corners padded by ``source.pad_arcsec``).

    A stored excerpt whose box covers the image is reused; else one is fetched and, with
    ``cache`` (a DataStore that never saves passes False), stored in ``context``.

    Raises
    ------
    util.gaia.CatalogError
        A file of a ``gaia_folder`` source is not a Gaia table (not FITS, missing columns,
        columns that are not numbers); the message names the file or the folder.
    FileNotFoundError
        The folder of a ``gaia_folder`` source does not exist.
    util.gaia.GaiaQueryError
        The Gaia archive could not be queried (``gaia_dr3``).
    """
    context = context or current_context()
    box = _padded_box(image, source.pad_arcsec)
    key = source.key(box)
    with context.session() as session:
        found = CatalogExcerpt.find_covering(key, *box, session=session)
    if found is not None:
        return found
    table, origin = _fetch(source, box)
    prov = source.provenance()
    if cache:
        with context.session() as session:
            prov.save(session)
    excerpt = CatalogExcerpt(data=table, catalog=key, origin=origin, provenance_id=prov.id,
                             minra=box[0], maxra=box[1], mindec=box[2], maxdec=box[3])
    if not cache:
        return excerpt
    excerpt = save_products([excerpt], context=context, on_conflict="adopt")[0]
    log.info("cached %d %s stars for %s", len(table), key, image)
    return excerpt


def neighbor_free(table: Table, *, radius_arcsec: float = NEIGHBOR_RADIUS_ARCSEC,
                  dmag: float = NEIGHBOR_DMAG) -> np.ndarray:
    """Which stars of a catalog table (``ra``, ``dec``, ``phot_g_mean_mag``) have no comparably
    bright neighbour (`improc.matching.neighbor_free`)."""
    return matching.neighbor_free(np.asarray(table["ra"], float), np.asarray(table["dec"], float),
                                  np.asarray(table["phot_g_mean_mag"], float), radius_arcsec=radius_arcsec,
                                  dmag=dmag)


def isolated_stars(table: Table) -> Table:
    """The rows of a reference-catalog table that can calibrate: stars without a blending neighbour.

    Uses the ``isolated`` column of the excerpt; for an excerpt stored without it, `neighbor_free`
    is computed from the table itself (which then lacks the stars beyond its magnitude limit).
    """
    if "isolated" in table.colnames:
        return table[np.asarray(table["isolated"], dtype=bool)]
    return table[neighbor_free(table)]


def stars_at_epoch(table: Table, mjd: float) -> tuple[np.ndarray, np.ndarray]:
    """RA and Dec of a catalog table's stars moved by their proper motions to the epoch ``mjd``
    (`improc.catalog_stars.stars_at_epoch`)."""
    return catalog_stars.stars_at_epoch(*(np.asarray(table[c], float) for c in
                                          ("ra", "dec", "pmra", "pmdec", "ref_epoch")), mjd=mjd)
