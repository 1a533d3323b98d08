"""DataStore: one image and every product made from it, under one provenance tree.

::

    ds = DataStore(image)            # or DataStore(exposure, "N6") or DataStore(image_id)
    ds.load_prov_tree("dr1")         # or ds.make_prov_tree(config)
    sources = ds.get_sources()       # in memory, else from the database, else None

Each product has a ``get_<product>()`` that returns the in-memory product if its provenance is
the one in the tree, else loads it from the database by (upstream product id, provenance id),
else returns None.  `save_and_commit` writes every new file, then every new row in one
transaction: if anything fails, nothing new stays.
"""

from __future__ import annotations

import importlib
import uuid
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy import select

from models.base import session_scope
from models.provenance import Provenance, ProvenanceTag
from models.saving import save_products
from util.config import Config

__all__ = ["DataStore", "ProductSpec", "PRODUCTS", "DataStoreError"]


class DataStoreError(ValueError):
    """A DataStore was asked for something it cannot give (no provenance tree, unknown product)."""


@dataclass(frozen=True)
class ProductSpec:
    """How one kind of product hangs in the tree.

    model : dotted path of the ORM class (imported lazily).
    process : the process whose provenance the product carries.
    parent : the product it is made from; ``parent_key`` is its foreign-key column.
    """

    model: str
    process: str
    parent: str
    parent_key: str

    def model_class(self) -> type:
        module, name = self.model.rsplit(".", 1)
        return getattr(importlib.import_module(module), name)


#: Products in the order they are made.  The image's own process is whatever made it.
PRODUCTS: dict[str, ProductSpec] = {
    "background": ProductSpec("models.background.Background", "backgrounding", "image", "image_id"),
    "sources": ProductSpec("models.source_list.SourceList", "extraction", "image", "image_id"),
    "psf": ProductSpec("models.psf.PSF", "extraction", "sources", "sources_id"),
    "wcs": ProductSpec("models.world_coordinates.WorldCoordinates", "astrocal", "sources", "sources_id"),
    "zp": ProductSpec("models.zero_point.ZeroPoint", "photocal", "wcs", "wcs_id"),
}


#: Non-column attributes in which products keep their arrays (see `DataStore._replace`).
_IN_MEMORY = ("_data", "_weight", "_flags", "_mesh", "_model", "_image", "_provenance")


def _is_new(obj: Any) -> bool:
    return obj is not None and not sa.inspect(obj).has_identity


def _is_new_or_changed(obj: Any) -> bool:
    return obj is not None and (_is_new(obj) or sa.inspect(obj).modified)


class DataStore:
    """Holds one image (or one exposure section to be preprocessed) and its products.

    Parameters
    ----------
    target : Image, Exposure, uuid.UUID or str
        An image, an image id, or an exposure (then ``section_id`` is required).
    section_id : str, optional
        The section of the exposure to work on.
    """

    def __init__(self, target: Any, section_id: str | None = None):
        from models.exposure import Exposure
        from models.image import Image

        self.exposure: Exposure | None = None
        self.image: Image | None = None
        self.section_id = section_id
        self.prov_tree: dict[str, Provenance] = {}
        self.products: dict[str, Any] = {}
        self.stats: dict[str, dict] = {}
        if isinstance(target, Image):
            self.image = target
            self.section_id = target.section_id
        elif isinstance(target, Exposure):
            if section_id is None:
                raise DataStoreError(f"DataStore(exposure) needs a section_id; exposure "
                                     f"{target.origin} has sections {target.section_ids}")
            self.exposure = target
        elif isinstance(target, (uuid.UUID, str)):
            image_id = uuid.UUID(str(target))
            with session_scope() as session:
                self.image = session.get(Image, image_id)
            if self.image is None:
                raise DataStoreError(f"no image with id {image_id}")
            self.section_id = self.image.section_id
        else:
            raise DataStoreError(f"DataStore needs an Image, an image id or an Exposure, "
                                 f"got {type(target).__name__}")

    def describe(self) -> str:
        """A short name for logs and errors: the image or exposure file and section."""
        if self.image is not None:
            return f"image {self.image.describe()}"
        if self.exposure is not None:
            return f"exposure {self.exposure.origin} section {self.section_id}"
        return "empty DataStore"

    # --- provenance tree -------------------------------------------------------------------

    def make_prov_tree(self, steps: Config | list[Any] | None = None) -> dict[str, Provenance]:
        """Build the provenances of the pipeline's steps from their parameters.

        Parameters
        ----------
        steps : Config or list of Step, optional
            A configuration (its ``pipeline.steps`` and step sections), explicit steps, or None
            for the default configuration.  Preprocessing is left out when the DataStore starts
            from an image.

        The image's own provenance is the root.  For an exposure, the first step must be
        preprocessing, whose upstream is the exposure's provenance.
        """
        if steps is None or isinstance(steps, Config):
            from pipeline.top import default_steps
            steps = default_steps(config=steps, include_preprocessing=self.image is None)
        tree: dict[str, Provenance] = {}
        root = self._root_provenance()
        if root is not None:
            tree["image"] = root
            tree[root.process] = root
        for step in steps:
            upstreams = [self._upstream(tree, name, step) for name in step.upstream_processes]
            tree[step.process] = step.make_provenance(upstreams)
            if step.process == "preprocessing":
                tree["image"] = tree["preprocessing"]
        self.prov_tree = tree
        return tree

    def _root_provenance(self) -> Provenance | None:
        source = self.image if self.image is not None else self.exposure
        if source is None or source.provenance_id is None:
            return None
        prov = Provenance.get(source.provenance_id)
        if prov is None and getattr(source, "provenance", None) is not None:
            prov = source.provenance
        return prov

    def _upstream(self, tree: dict[str, Provenance], name: str, step: Any) -> Provenance:
        if name == "exposure" and self.exposure is not None and "exposure" not in tree:
            tree["exposure"] = self._root_provenance()
        if name not in tree or tree[name] is None:
            raise DataStoreError(f"{step.process} needs the '{name}' provenance, which the tree "
                                 f"does not have (tree: {', '.join(sorted(tree))})")
        return tree[name]

    def load_prov_tree(self, tag: str) -> dict[str, Provenance]:
        """Use the provenances of a tag; the image's own provenance stays the root."""
        tree = ProvenanceTag.provenances(tag)
        if not tree:
            raise DataStoreError(f"no provenance tag '{tag}'")
        root = self._root_provenance()
        if self.image is not None and root is not None:
            tree["image"] = root
        elif "preprocessing" in tree:
            tree["image"] = tree["preprocessing"]
        self.prov_tree = tree
        return tree

    def provenance(self, process: str) -> Provenance:
        """The tree's provenance for ``process``; DataStoreError if there is none."""
        if process not in self.prov_tree:
            raise DataStoreError(f"the provenance tree has no '{process}' provenance; call "
                                 f"make_prov_tree or load_prov_tree first")
        return self.prov_tree[process]

    # --- products ----------------------------------------------------------------------------

    def get_image(self):
        """The image: the one given, or the one preprocessing made from the exposure section."""
        from models.image import Image

        if self.image is not None:
            if self.exposure is None or "image" not in self.prov_tree:
                return self.image
            if self.image.provenance_id == self.prov_tree["image"].id:
                return self.image
        if self.exposure is None or "image" not in self.prov_tree:
            return self.image
        with session_scope() as session:
            self.image = session.scalars(select(Image).where(
                Image.exposure_id == self.exposure.id, Image.section_id == self.section_id,
                Image.provenance_id == self.prov_tree["image"].id)).one_or_none()
        return self.image

    def get_product(self, name: str):
        """Any product by name (see `PRODUCTS`); the ``get_<name>()`` methods call this."""
        if name == "image":
            return self.get_image()
        if name not in PRODUCTS:
            raise DataStoreError(f"unknown product '{name}'; known: image, {', '.join(PRODUCTS)}")
        spec = PRODUCTS[name]
        current = self.products.get(name)
        prov = self.prov_tree.get(spec.process)
        if current is not None and (prov is None or current.provenance_id == prov.id):
            return current
        parent = self.get_product(spec.parent)
        if prov is None or parent is None:
            return None
        model = spec.model_class()
        with session_scope() as session:
            found = session.scalars(select(model).where(
                getattr(model, spec.parent_key) == parent.id,
                model.provenance_id == prov.id)).one_or_none()
        self.products[name] = found
        return found

    def set_product(self, name: str, product: Any) -> None:
        """Attach a product made in memory (a step does this)."""
        if name == "image":
            self.image = product
            return
        if name not in PRODUCTS:
            raise DataStoreError(f"unknown product '{name}'")
        self.products[name] = product

    def get_or_make(self, name: str, make) -> Any:
        """The product ``name`` if it exists for the tree, else ``make(provenance)``, attached.

        This is what a step's ``run`` calls: it skips the work when the product exists.
        """
        found = self.get_product(name)
        if found is not None:
            return found
        product = make(self.provenance(PRODUCTS[name].process))
        self.set_product(name, product)
        return product

    def get_background(self):
        """The Background of the image for the tree's backgrounding provenance, or None."""
        return self.get_product("background")

    def get_sources(self):
        """The SourceList of the image for the tree's extraction provenance, or None."""
        return self.get_product("sources")

    def get_psf(self):
        """The PSF fitted on the sources, or None."""
        return self.get_product("psf")

    def get_wcs(self):
        """The astrometric solution (WorldCoordinates), or None."""
        return self.get_product("wcs")

    def get_zp(self):
        """The photometric zero point (ZeroPoint), or None."""
        return self.get_product("zp")

    # --- saving ------------------------------------------------------------------------------

    def new_products(self) -> list[Any]:
        """Products made in memory and not yet saved (or changed, like an image's estimates), parents first."""
        ordered = [self.exposure, self.image] + [self.products.get(n) for n in PRODUCTS]
        return [p for p in ordered if _is_new_or_changed(p)]

    def save_and_commit(self, *, before_commit=None) -> list[Any]:
        """Save every new product: files first, then all rows in one transaction.

        Provenances of the tree are saved first (saving one twice is a no-op).  If anything
        fails, no new row stays in the database and no new file on disk.

        Returns
        -------
        list
            The products that were saved.
        """
        new = self.new_products()
        if not new:
            return []
        with session_scope() as session:
            for prov in self.prov_tree.values():
                prov.save(session)
        saved = save_products(new, before_commit=before_commit)
        for old, current in zip(new, saved):
            self._replace(old, current)
        return saved

    def _replace(self, old: Any, current: Any) -> None:
        """Point the DataStore at the stored copy of a product that was merged when saved."""
        if old is current:
            return
        # The merged copy has the row's columns; keep the arrays already in memory so that the
        # next step does not read the file back.
        for name in _IN_MEMORY:
            if getattr(old, name, None) is not None and getattr(current, name, None) is None:
                setattr(current, name, getattr(old, name))
        if old is self.image:
            self.image = current
        elif old is self.exposure:
            self.exposure = current
        for name, product in self.products.items():
            if product is old:
                self.products[name] = current
