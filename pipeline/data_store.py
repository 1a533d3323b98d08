"""DataStore: one image and every product made from it, under one provenance tree.

::

    ds = DataStore(image)            # or DataStore(exposure, "N6") or DataStore(image_id)
    ds.load_prov_tree("dr1")         # or ds.make_prov_tree(config)
    sources = ds.get_sources()       # in memory, else from the database, else None

``get_<product>()`` returns the in-memory product if its provenance is the tree's, else the one
stored for the ids of its parents and the tree's provenance, else None (not made yet).  Which
products exist, their parents and the process that makes them are read from the steps'
declarations (`pipeline.step`); a product of a new step is ``ds.get_<its name>()`` at once.

A DataStore works in a `models.context.Context` (database and file store): the one given, else
the one its image was loaded through, else the current one.  `save_and_commit` writes every new
file, then every new row in one transaction: if anything fails, nothing new stays.  A DataStore
made with ``persist=False`` never writes anything (for fake injection and trials): it still
reads what exists.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable
from typing import Any

import sqlalchemy as sa
from sqlalchemy import select

from models.context import Context, context_of, current_context
from models.file_store import FileBackedMixin
from models.provenance import Provenance, ProvenanceTag, UnknownTagError
from models.saving import save_products
from pipeline.step import ROOT_PRODUCTS, Step, product_spec, products
from util.config import Config

__all__ = ["DataStore", "DataStoreError"]


class DataStoreError(Exception):
    """A DataStore was asked for something it cannot give (a usage error: no provenance tree, an
    unknown product, saving a DataStore that never saves)."""


def _image_makers() -> set[str]:
    from pipeline.step import step_classes

    return {process for process, cls in step_classes().items()
            if "image" in cls.output_names() or cls.makes_images}


def _stored(obj: Any) -> bool:
    return obj is not None and sa.inspect(obj).has_identity


class DataStore:
    """Holds one image (or one exposure section to be preprocessed) and its products.

    Parameters
    ----------
    target : Image, Exposure, uuid.UUID or str
        An image, an image id, or an exposure (then ``section_id`` is required).
    section_id : str, optional
        The section of the exposure to work on.
    context : Context, optional
        Database and file store; default: the image's own, else the current one.
    persist : bool
        False makes a DataStore that never saves (it still reads stored products).
    """

    def __init__(self, target: Any, section_id: str | None = None, *, context: Context | None = None,
                 persist: bool = True):
        from models.exposure import Exposure
        from models.image import Image

        self.exposure: Exposure | None = None
        self.image: Image | None = None
        self.section_id = section_id
        self.context = context or (context_of(target) if isinstance(target, (Image, Exposure))
                                   else current_context())
        self.persist = persist
        self.prov_tree: dict[str, Provenance] = {}
        self.tag: str | None = None
        self.products: dict[str, Any] = {}
        self.stats: dict[str, dict] = {}
        #: Names of products another process saved first, whose rows this DataStore took instead.
        self.adopted: list[str] = []
        #: Kinds of stored products whose damaged files made them be made again (``verify``).
        self.remade: list[str] = []
        #: Processes whose products this DataStore finds by a query (`pipeline.step.Output.found_by`)
        #: rather than by its own products' ids: those made for other images (a reference).
        self.found_by_query: set[str] = set()
        #: Intermediate arrays steps share within this DataStore (never saved; e.g. the aligned reference).
        self.scratch: dict[str, Any] = {}
        #: Steps that cannot run for this DataStore, with the reason (e.g. no reference set yet).
        self.unavailable: dict[str, str] = {}
        self._image_process: str | None = None
        if isinstance(target, Image):
            self.image = target
            self.section_id = target.section_id
        elif isinstance(target, Exposure):
            if section_id is None:
                raise DataStoreError(f"DataStore(exposure) needs a section_id; exposure "
                                     f"{target.origin} has sections {target.section_ids}")
            self.exposure = target
        elif isinstance(target, (uuid.UUID, str)):
            try:
                image_id = uuid.UUID(str(target))
            except ValueError:
                raise DataStoreError(f"DataStore needs an Image, an Exposure or an image id, "
                                     f"got {target!r}") from None
            with self.context.session() as session:
                self.image = session.get(Image, image_id)
            if self.image is None:
                raise DataStoreError(f"no image with id {image_id}")
            self.section_id = self.image.section_id
        else:
            raise DataStoreError(f"DataStore needs an Image, an Exposure or an image id, got "
                                 f"{type(target).__name__}")

    # --- description ---------------------------------------------------------------------------

    def describe(self) -> str:
        """What this DataStore holds, for messages."""
        if self.image is not None:
            return f"image {self.image.describe()}"
        if self.exposure is not None:
            return f"exposure {self.exposure.origin} section {self.section_id}"
        return "an empty DataStore"

    def __repr__(self) -> str:
        tree = f"tag '{self.tag}'" if self.tag else (f"{len(self.prov_tree)} provenances"
                                                    if self.prov_tree else "no provenance tree")
        held = ", ".join(f"{name}{'' if _stored(p) else '*'}" for name, p in self.products.items()
                         if p is not None)
        flags = "" if self.persist else ", never saves"
        return f"<DataStore {self.describe()}; {tree}; products: {held or 'none loaded'}{flags}>"

    # --- provenance tree -----------------------------------------------------------------------

    def _root_provenance(self) -> Provenance | None:
        source = self.image if self.image is not None else self.exposure
        if source is None:
            return None
        prov = getattr(source, "_provenance", None)
        if prov is None and source.provenance_id is not None:
            with self.context.session() as session:
                prov = Provenance.get(source.provenance_id, session=session)
        return prov

    def make_prov_tree(self, steps: Iterable[Step] | Config | None = None) -> dict[str, Provenance]:
        """Compute the provenances the steps would give this DataStore's products.

        Parameters
        ----------
        steps : list of Step, Config or None
            The steps (in order), or a configuration whose ``pipeline.steps`` and step sections
            give them, or None for this DataStore's context's configuration.  A step that makes
            the image (preprocessing) is left out when the DataStore starts from an image.

        Returns
        -------
        dict
            Provenance by process, with the image's own provenance as the root.
        """
        if steps is None or isinstance(steps, Config):
            from pipeline.top import default_steps
            steps = default_steps(steps if isinstance(steps, Config) else self.context.config)
        steps = [s for s in steps if not (self.image is not None and "image" in s.output_names())]
        root = self._root_provenance()
        tree: dict[str, Provenance] = {}
        self._image_process = None
        self.found_by_query, self.unavailable = set(), {}
        if root is not None:
            tree[root.process] = root
            if self.image is not None:
                self._image_process = root.process
        made = {name for step in steps for name in step.output_names()}
        for step in steps:
            upstreams = []
            for inp in step.inputs:
                if inp.tag_param and inp.name not in made:
                    found = self._tagged_provenance(tree, inp, step)
                    if found is None:
                        break
                    upstreams.append(found)
                    continue
                if self._input_process(inp.name) in self.unavailable:
                    self.unavailable[step.process] = self.unavailable[self._input_process(inp.name)]
                    break
                upstreams.append(self._input_provenance(tree, inp.name, step))
            else:
                tree[step.process] = step.make_provenance(upstreams, context=self.context)
                if "image" in step.output_names():
                    self._image_process = step.process
        self.prov_tree, self.tag = tree, None
        return tree

    def _input_process(self, name: str) -> str | None:
        if name == "image":
            return self._image_process
        if name in ("exposure", "section_id"):
            return name
        return product_spec(name).process

    def _tagged_provenance(self, tree: dict[str, Provenance], inp, step: Step) -> Provenance | None:
        """The provenance of a product found by a query (``inp.tag_param``), from the tag the
        step's parameter names; None (the step marked unavailable) when the tag has none."""
        spec = product_spec(inp.name)
        tag = getattr(step.params, inp.tag_param)
        with self.context.session() as session:
            found = [p for p in ProvenanceTag.provenances(tag, session=session) if p.process == spec.process]
        if not found:
            self.unavailable[spec.process] = self.unavailable[step.process] = (
                f"no {spec.process} provenance carries the tag '{tag}' ({step.process}.{inp.tag_param}) yet: "
                f"make one with `seechange make-ref`")
            return None
        if len(found) > 1:
            raise DataStoreError(f"tag '{tag}' holds {len(found)} {spec.process} provenances "
                                 f"({', '.join(p.id for p in found)}); {step.process} needs one: give "
                                 f"{step.process}.{inp.tag_param} a tag that holds one")
        tree[spec.process] = found[0]
        self.found_by_query.add(spec.process)
        return found[0]

    def _input_provenance(self, tree: dict[str, Provenance], name: str, step: Step) -> Provenance:
        process = self._input_process(name)
        if process is None or process not in tree:
            raise DataStoreError(f"{step.process} reads '{name}', whose provenance is not in the tree "
                                 f"(tree: {', '.join(sorted(tree)) or 'empty'}); put the step that "
                                 "makes it before this one")
        return tree[process]

    def load_prov_tree(self, tag: str) -> dict[str, Provenance]:
        """Use the provenances of a tag that apply to this DataStore's image.

        The image's own provenance is the root.  A tagged provenance applies when all its
        upstreams are in the tree, so of two provenances of one process in the tag (the
        extraction of coadds and that of single exposures) the one made from this image's own
        products is taken.  Provenances that make images (preprocessing, coaddition) apply only
        to the root.  Upstreams of products found by a query (a reference, made from another
        image) join the tree with the provenance that reads them.

        Raises
        ------
        UnknownTagError
            No provenance carries ``tag``.
        DataStoreError
            Two provenances of one process in the tag both apply to this image.
        """
        with self.context.session() as session:
            tagged = ProvenanceTag.provenances(tag, session=session)
            if not tagged:
                known = ProvenanceTag.tags(session=session)
                raise UnknownTagError(f"no provenance carries the tag '{tag}'; tags: "
                                      f"{', '.join(known) if known else 'none yet'}")
            root = self._root_provenance()
            tree: dict[str, Provenance] = {root.process: root} if root is not None else {}
            self._image_process = root.process if (root is not None and self.image is not None) else None
            self.found_by_query, self.unavailable = set(), {}
            makers = _image_makers()
            foreign = {spec.process for spec in products().values() if spec.output.found_by is not None}
            ids = {p.id for p in tree.values()}
            root_ids = set(ids)
            added = True
            while added:
                added = False
                for prov in tagged:
                    if prov.id in ids or prov.process in makers and (
                            self.image is not None or not set(prov.upstream_ids) <= root_ids):
                        continue    # images of this tree come from its root only
                    if not prov.upstream_ids or (root is not None and prov.process == root.process):
                        continue
                    missing = [u for u in prov.upstreams if u.id not in ids]
                    if any(u.process not in foreign for u in missing):
                        continue
                    for u in [*missing, prov]:
                        held = tree.get(u.process)
                        if held is not None and held.id != u.id:
                            raise DataStoreError(
                                f"tag '{tag}' has two {u.process} provenances that apply to "
                                f"{self.describe()}: {held.id} and {u.id}")
                        tree[u.process] = u
                        ids.add(u.id)
                    self.found_by_query.update(u.process for u in missing)
                    added = True
        if self.image is None:      # an exposure section: the tag's step that makes images
            makers = [p for p in tree if p in _image_makers()]
            self._image_process = makers[0] if makers else None
        self.prov_tree, self.tag = tree, tag
        return tree

    def provenance(self, process: str) -> Provenance:
        """The tree's provenance for ``process``; DataStoreError if there is none."""
        if not self.prov_tree:
            raise DataStoreError(f"{self.describe()}: no provenance tree yet; call "
                                 "load_prov_tree(tag) or make_prov_tree(config) first")
        if process not in self.prov_tree:
            where = f"tag '{self.tag}'" if self.tag else "the provenance tree"
            raise DataStoreError(f"{where} has no '{process}' provenance for {self.describe()} "
                                 f"(it has: {', '.join(sorted(self.prov_tree))})")
        return self.prov_tree[process]

    # --- products ------------------------------------------------------------------------------

    def get_image(self):
        """The image: the one given, or the one preprocessing made from the exposure section."""
        if self.image is not None:
            return self.image
        if self.exposure is None or self._image_process is None:
            if self.exposure is not None and not self.prov_tree:
                self.provenance("preprocessing")    # raises: no tree yet
            return None
        found = self._lookup("image")
        if found is not None:
            self.image = found
        return self.image

    def get_product(self, name: str):
        """Any product by name (see `pipeline.step.products`); the ``get_<name>()`` methods call this.

        Returns None when the product has not been made for this provenance tree.

        Raises
        ------
        DataStoreError
            Unknown product, or no provenance tree (or none for the product's process).
        """
        if name == "image":
            return self.get_image()
        if name == "exposure":
            return self.exposure
        try:
            spec = product_spec(name)
        except KeyError as exc:
            raise DataStoreError(str(exc).strip("'\"")) from None
        prov = self.provenance(spec.process)
        current = self.products.get(name)
        if current is not None and current.provenance_id == prov.id:
            return current
        found = self._lookup(name)
        if found is not None:
            self.products[name] = found
        return found

    def _parent_value(self, parent: str):
        if parent == "section_id":
            return self.section_id
        found = self.get_product(parent)
        return None if found is None else found.id

    def _lookup(self, name: str):
        """The stored product ``name`` for the ids of its parents and the tree's provenance."""
        spec = product_spec(name)
        prov = self.provenance(spec.process)
        if spec.process in self.found_by_query:
            return spec.output.found_by(self, prov)
        conditions = [spec.model.provenance_id == prov.id]
        for column, parent in spec.output.parents.items():
            value = self._parent_value(parent)
            if value is None:
                return None
            conditions.append(getattr(spec.model, column) == value)
        with self.context.session() as session:
            return session.scalars(select(spec.model).where(*conditions)).one_or_none()

    def __getattr__(self, attribute: str):
        # get_<name>() for the product of any registered step (the seed's names are methods below)
        if attribute.startswith("get_") and attribute[4:] in products():
            name = attribute[4:]
            return lambda: self.get_product(name)
        raise AttributeError(f"{type(self).__name__} has no attribute {attribute!r}")

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
        """The astrometric solution (WorldCoordinates), or None.  Use it, not the image header."""
        return self.get_product("wcs")

    def get_zp(self):
        """The photometric zero point (ZeroPoint), or None."""
        return self.get_product("zp")

    # The user guide mentions this name too.
    def get_zeropoint(self):
        """The photometric zero point (ZeroPoint), or None: `get_zp`."""
        return self.get_zp()

    def get_reference(self):
        """The Reference this image is compared with (chosen as `models.reference.Reference.find_for`
        documents), or None.  It reads like the reference image, not aligned to this one."""
        return self.get_product("reference")

    # The user guide spells it so once; users paste it.
    get_referenece = get_reference

    def get_sub_image(self):
        """The difference image (an Image of type difference, on this image's grid and in its ADU)."""
        return self.get_product("sub_image")

    def get_detections(self):
        """The SourceList of detections on the difference image."""
        return self.get_product("detections")

    def get_cutouts(self):
        """The Cutouts (new / ref / sub stamps) of the detections."""
        return self.get_product("cutouts")

    def get_measurement_set(self):
        """The MeasurementSet of the detections kept by the measurement cuts."""
        return self.get_product("measurement_set")

    def new_product(self, step: Step, name: str, **columns: Any):
        """Build the product ``name`` of ``step`` with its provenance and parents, and attach it.

        The parents' foreign keys (the `Output` declaration's ``parents``) and ``provenance_id``
        are filled in; ``columns`` go to the model's constructor.
        """
        output = next((o for o in step.outputs if o.name == name), None)
        if output is None:
            raise DataStoreError(f"{step.process} does not declare an output '{name}'")
        values = dict(columns)
        for column, parent in output.parents.items():
            value = self._parent_value(parent)
            if value is None:
                raise DataStoreError(f"{step.process}: cannot make {name} of {self.describe()}, its "
                                     f"parent '{parent}' is missing")
            values.setdefault(column, value)
        prov = self.provenance(step.process)
        product = output.model(provenance_id=prov.id, **values)
        if hasattr(product, "_provenance"):     # images name their files after their process
            product._provenance = prov
        self.set_product(name, product)
        return product

    def set_product(self, name: str, product: Any) -> None:
        """Attach a product made in memory (its provenance must be the tree's)."""
        if name == "image":
            self.image = product
            return
        spec = product_spec(name)
        prov = self.provenance(spec.process)
        if product is not None and product.provenance_id != prov.id:
            raise DataStoreError(f"{name} has provenance {product.provenance_id}, the tree has {prov.id} "
                                 f"for {spec.process}")
        self.products[name] = product

    # --- badness -------------------------------------------------------------------------------

    def mark_badness(self, *names: str) -> None:
        """Set badness bits on the image (and in the database, unless this DataStore never saves)."""
        self._update_badness(set_names=names)

    def clear_badness(self, *names: str) -> None:
        """Clear badness bits on the image (and in the database, unless this DataStore never saves)."""
        self._update_badness(clear_names=names)

    def _update_badness(self, set_names: Iterable[str] = (), clear_names: Iterable[str] = ()) -> None:
        from models.image import Image, ImageBadness
        from improc.flags import bits_by_name

        image = self.image
        set_names, clear_names = tuple(set_names), tuple(clear_names)
        if image is None or not (set_names or clear_names):
            return
        set_bits = bits_by_name(ImageBadness, set_names, "image badness") if set_names else 0
        clear_bits = bits_by_name(ImageBadness, clear_names, "image badness") if clear_names else 0
        before = int(image.bad_flags or 0)
        image.bad_flags = (before & ~clear_bits) | set_bits
        if self.persist and _stored(image) and image.bad_flags != before:
            with self.context.session() as session:
                image.bad_flags = Image.update_badness(image.id, set_bits=set_bits, clear_bits=clear_bits,
                                                       session=session)

    # --- saving --------------------------------------------------------------------------------

    def new_products(self) -> list[Any]:
        """Products made in memory and not yet saved, parents first."""
        ordered = [self.exposure, self.image, *self.products.values()]
        return [p for p in ordered if p is not None and not _stored(p)]

    def _name_files(self, new: list[Any]) -> None:
        """Give new step products their file names: the image's fields, process, provenance, own id."""
        from models.exposure import Exposure
        from models.image import Image

        for name, product in self.products.items():
            if (product in new and isinstance(product, FileBackedMixin)
                    and not isinstance(product, (Image, Exposure))
                    and getattr(product, "_file_stem", None) is None):
                spec = product_spec(name)
                product.set_file_stem(self.context.store.stem(
                    **self.image.naming_fields(), process=spec.process, prov=product.provenance_id,
                    name=f"{name}-{product.id.hex[:12]}"))

    def save_and_commit(self, *, before_commit: Callable | None = None) -> list[Any]:
        """Save every new product: files first, then all rows in one transaction.

        The provenances of the new products are saved first, with their upstreams (saving one
        twice is a no-op).  If anything fails, no new row stays in the database and no new file
        on disk.  If another process saved one of these products first (same parents and
        provenance), its row is used instead of this DataStore's (whose file is deleted), and
        the product's name is added to ``adopted``: both processes go on with the one stored
        product.

        Returns
        -------
        list
            The stored products: those saved, or the other process's rows in their place.

        Raises
        ------
        DataStoreError
            The DataStore was made with ``persist=False``.
        """
        if not self.persist:
            raise DataStoreError(f"{self.describe()}: this DataStore never saves (persist=False)")
        new = self.new_products()
        if not new:
            return []
        self._name_files(new)
        needed = {p.provenance_id for p in new}
        with self.context.session() as session:
            for prov in self.prov_tree.values():
                if prov.id in needed:
                    prov.save(session)      # with its upstreams
        stored = save_products(new, context=self.context, before_commit=before_commit,
                               on_conflict="adopt")
        for mine, theirs in zip(new, stored):
            if theirs is not mine:
                self._adopt(mine, theirs)
        return stored

    def _adopt(self, mine: Any, theirs: Any) -> None:
        """Hold another process's stored product instead of the equal one made here."""
        if mine is self.exposure:
            self.exposure, name = theirs, "exposure"
        elif mine is self.image:
            self.image, name = theirs, "image"
        else:
            name = next(n for n, p in self.products.items() if p is mine)
            self.products[name] = theirs
        self.adopted.append(name)

    def forget(self, ids: Iterable[Any]) -> None:
        """Drop the held products whose ids are given (rows removed from the database), so that
        ``get_<name>()`` looks them up again and the steps that make them run again."""
        gone = set(ids)
        for name in [n for n, p in self.products.items() if p is not None and p.id in gone]:
            del self.products[name]
        if self.exposure is not None and self.image is not None and self.image.id in gone:
            self.image = None
