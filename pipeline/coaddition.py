"""Coaddition: one image from N calibrated images of a field (`improc.coadd`).

The components come as DataStores holding each image's calibration (background, PSF, fitted
WCS, zero point).  Each is resampled onto one target grid, that of the component with the best
seeing (its fitted WCS and shape) with `improc.alignment.warp_image`, sky-subtracted with its
own background, and combined at the median zero point of the components: by default a clipped
inverse-variance weighted mean, or the proper coadd of Zackay & Ofek (2017).  The result is an
`Image` of type coadd (already sky-subtracted: its ``SKYSUB`` header card says so), with its
pixel weight, flags, an extra plane ``WHITE_WEIGHT`` (the weight of the white noise a PSF-sized
sum sees, lower than the pixel weight where resampling correlated the noise) and component ids; it then goes through the ordinary calibration steps like any
image (`pipeline.make_ref`).

The coaddition provenance has the components' calibration provenances upstream; which images
were combined is data, recorded in the image (``components``, and ``components_key`` makes one
coadd per set of components and provenance).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from sqlalchemy import select

from improc.alignment import psf_on_grid, warp_image
from improc.coadd import CoaddInput, Rejection, proper_coadd, weighted_mean_coadd
from improc.errors import BadDataError
from models.image import Image, ImageType, components_key, header_gain
from models.provenance import Provenance
from pipeline.parameters import ParameterError, StepParams, param
from pipeline.step import Step

__all__ = ["CoadditionParams", "Coadder", "CALIBRATION_PROCESSES"]

#: The products of a component that the coadd is made from, by process.
CALIBRATION_PROCESSES = ("backgrounding", "extraction", "astrocal", "photocal")


@dataclass(frozen=True, kw_only=True)
class CoadditionParams(StepParams):
    """How images are combined into a coadd."""

    step_name = "coaddition"

    method: Literal["weighted_mean", "proper"] = param(
        "weighted_mean", "'weighted_mean': clipped inverse-variance weighted mean; 'proper': the proper "
        "coadd of Zackay & Ofek (2017), tile by tile.")
    reject_sigma: float = param(5.0, "Outlier rejection threshold against the median, sigma.")
    reject_grow: int = param(2, "Pixels by which rejections grow into their neighbours.")
    reject_source_tolerance: float = param(
        1.0, "Fraction of the local peak of the median tolerated as a seeing difference in sources.")
    reject_source_window: int = param(9, "Side of the window of that local peak, pixels.")
    reject_min_inputs: int = param(3, "Fewest valid inputs at a pixel for it to be clipped.")
    proper_tile_size: int = param(512, "Side of the tiles of the proper coadd, pixels.")
    min_images: int = param(1, "Fewest component images.")
    registration: Literal["auto", "wcs", "sources"] = param(
        "auto", "'wcs': the components' fitted WCSs as they are; 'sources': also register each on the sources it "
        "shares with the grid image; 'auto': 'sources' when a WCS was not fitted to a catalog.")

    def validate(self) -> None:
        if self.min_images < 1:
            raise ParameterError(f"coaddition min_images must be >= 1, got {self.min_images}")
        if self.proper_tile_size < 16:
            raise ParameterError(f"coaddition proper_tile_size must be >= 16, got {self.proper_tile_size}")
        Rejection(sigma=self.reject_sigma, grow=self.reject_grow,
                  source_tolerance=self.reject_source_tolerance, source_window=self.reject_source_window,
                  min_inputs=self.reject_min_inputs)


class Coadder(Step):
    """Combine calibrated images into a coadd `Image` (`make`)."""

    process = "coaddition"
    version = "1.0.0"
    Params = CoadditionParams
    makes_images = True

    def provenance_for(self, components: Sequence) -> Provenance:
        """The coaddition provenance of these components (DataStores with their calibration)."""
        upstreams = []
        for ds in components:
            upstreams.append(ds.provenance(ds._image_process))
            upstreams.extend(ds.provenance(p) for p in CALIBRATION_PROCESSES)
        upstreams = sorted({p.id: p for p in upstreams}.values(), key=lambda p: p.id)
        return self.make_provenance(upstreams)

    def rejection(self) -> Rejection:
        p = self.params
        return Rejection(sigma=p.reject_sigma, grow=p.reject_grow, source_tolerance=p.reject_source_tolerance,
                         source_window=p.reject_source_window, min_inputs=p.reject_min_inputs)

    def make(self, components: Sequence, *, context) -> Image:
        """The coadd of the components: the stored one if it exists, else a new (unsaved) Image.

        Parameters
        ----------
        components : sequence of DataStore
            One per image, each with its calibration products made (`CALIBRATION_PROCESSES`).
        context : Context
            Where to look for an existing coadd.

        Raises
        ------
        BadDataError
            Too few images, images in several filters, or a component without a zero point.
        """
        components = sorted(components, key=lambda ds: (ds.get_image().mjd, str(ds.get_image().id)))
        images = [ds.get_image() for ds in components]
        names = ", ".join(im.describe() for im in images)
        if len(images) < self.params.min_images:
            raise BadDataError(f"coaddition needs at least {self.params.min_images} images, got {len(images)}")
        filters = sorted({im.filter for im in images})
        if len(filters) > 1:
            raise BadDataError(f"cannot coadd images in several filters ({', '.join(filters)}): {names}")
        prov = self.provenance_for(components)
        key = components_key(im.id for im in images)
        with context.session() as session:
            stored = session.scalars(select(Image).where(Image.components_key == key,
                                                         Image.provenance_id == prov.id)).one_or_none()
        if stored is not None:
            stored._provenance = prov
            return stored
        products = []
        for ds, image in zip(components, images):
            zp, psf, wcs, bg = ds.get_zp(), ds.get_psf(), ds.get_wcs(), ds.get_background()
            if any(p is None for p in (zp, psf, wcs, bg)):
                raise BadDataError(f"image {image.describe()} is not calibrated (run the pipeline on it first)")
            products.append((image, bg, psf, wcs, zp, ds.get_sources()))
        # the target grid: the sharpest component's (ties: the earliest)
        grid = min(range(len(products)), key=lambda i: products[i][2].fwhm_pixels)
        grid_image, _, _, grid_wcs, grid_zp, grid_sources = products[grid]
        target_wcs, shape = grid_wcs.wcs, (grid_image.ny, grid_image.nx)
        solutions, zero_points, relative = self._register(products, grid)
        inputs = []
        for (image, bg, psf, wcs, zp, _), source_wcs, zero_point in zip(products, solutions, zero_points):
            warped = warp_image(image.data - bg.counts, image.weight, image.flags, source_wcs=source_wcs,
                                target_wcs=target_wcs, target_shape=shape)
            model = psf.model

            def grid_psf(x, y, model=model, source_wcs=source_wcs):
                return psf_on_grid(model, x, y, source_wcs=source_wcs, target_wcs=target_wcs)

            inputs.append(CoaddInput(data=warped.data, weight=warped.weight, flags=warped.flags,
                                     zero_point=zero_point, psf=grid_psf, white_weight=warped.white_weight))
        result = self.compute(inputs)
        zero_point = result.zero_point
        gains = [header_gain(image.header) for image, *_ in products]
        mean = result if self.params.method == "weighted_mean" else result.mean
        header = {"SKYSUB": True, "NCOMBINE": len(images)}
        if relative:    # scaled to the grid image by the stars they share, not by zero points
            header["RELCAL"] = True
        else:
            header["MAGZERO"] = zero_point
        if all(g is not None for g in gains):
            c, s = mean.image_weights, mean.scales
            header["GAIN"] = float(c.sum() ** 2 / np.sum(c**2 * s / np.asarray(gains)))
        coadd = Image(provenance=prov, data=result.data, weight=result.weight, flags=result.flags,
                     wcs=target_wcs, instrument=grid_image.instrument, type=ImageType.COADD,
                     section_id=grid_image.section_id, filter=filters[0], mjd=min(im.mjd for im in images),
                     end_mjd=max(im.end_mjd for im in images), exp_time=float(sum(im.exp_time for im in images)),
                     target=grid_image.target, project=grid_image.project, header=header,
                     components=[str(im.id) for im in images], components_key=key)
        # Resampling correlates the noise: the pixel weight describes single pixels, the white
        # weight what a PSF-sized sum sees (`improc.alignment`); subtraction needs the latter.
        coadd.set_extra("WHITE_WEIGHT", getattr(result, "white_weight", result.weight))
        return coadd

    def _register(self, products: list, grid: int) -> tuple[list, list[float], bool]:
        """Each component's WCS as used and its zero point.

        With every WCS fitted to a catalog and every zero point calibrated (or ``registration``
        "wcs"), those.  Else each component is registered on the sources it shares with the grid
        image (its WCS moved by the offset the WCSs miss, where one was not fitted) and, without
        zero points, scaled by the flux ratio of the stars they share: its zero point relative to
        the grid image's (0 when that has none), and the coadd is calibrated relative to it.

        Raises
        ------
        BadDataError
            A component shares too few sources with the grid image.
        """
        from pipeline.reference_alignment import MIN_RATIO_STARS, fitted_to_catalog, moved, source_shift, star_flux_ratio

        mode = self.params.registration
        calibrated = all(p[4].zp is not None for p in products)
        fitted = all(fitted_to_catalog(p[3]) for p in products)
        solutions = [p[3].wcs for p in products]
        zero_points = [p[4].zp for p in products]
        if calibrated and (mode == "wcs" or (mode == "auto" and fitted)):
            return solutions, zero_points, False
        grid_image, _, _, grid_wcs, grid_zp, grid_sources = products[grid]
        base = grid_zp.zp if grid_zp.zp is not None else 0.0
        for k, (image, _, _, wcs, zp, sources) in enumerate(products):
            if k == grid:
                zero_points[k] = base if not calibrated else zp.zp
                continue
            pair = f"images {grid_image.describe()} and {image.describe()}"
            if mode == "sources" or not (fitted_to_catalog(wcs) and fitted_to_catalog(grid_wcs)):
                shift = source_shift(grid_sources, grid_wcs.wcs, sources, wcs.wcs)
                if shift.n < MIN_RATIO_STARS:
                    raise BadDataError(f"{pair}: only {shift.n} sources both measured register them (a WCS was "
                                       f"not fitted to a catalog; at least {MIN_RATIO_STARS} needed)")
                solutions[k] = moved(wcs.wcs, shift)
            if not calibrated:
                ratio = star_flux_ratio(grid_sources, grid_wcs.wcs, sources, solutions[k])
                if ratio.n_stars < MIN_RATIO_STARS:
                    raise BadDataError(f"{pair}: without zero points, only {ratio.n_stars} stars both measured "
                                       f"scale them (at least {MIN_RATIO_STARS} needed)")
                zero_points[k] = base + 2.5 * float(np.log10(ratio.ratio))
        return solutions, zero_points, not calibrated

    def compute(self, inputs: Sequence[CoaddInput]):
        """The coadd of images already on one grid (`improc.coadd`)."""
        if self.params.method == "proper":
            return proper_coadd(inputs, tile_size=self.params.proper_tile_size, rejection=self.rejection())
        return weighted_mean_coadd(inputs, rejection=self.rejection())

