"""Backgrounding: the sky level and noise of an image on a mesh (sep, SExtractor's method)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from improc.background import BackgroundMesh, estimate_background
from improc.errors import BadDataError
from improc.flags import PixelFlag
from models.background import Background
from pipeline.data_store import DataStore
from pipeline.parameters import ParameterError, StepParams, param
from pipeline.step import Input, Output, Step

__all__ = ["BackgroundingParams", "Backgrounder", "MIN_IMAGE_SIDE"]

#: Smallest image side, pixels, that a background (and a PSF stamp) can be made of.
MIN_IMAGE_SIDE = 16


@dataclass(frozen=True, kw_only=True)
class BackgroundingParams(StepParams):
    """How the sky background is estimated."""

    step_name = "backgrounding"

    box_size: int = param(128, "Side of a mesh box, pixels (SExtractor BACK_SIZE).")
    filter_size: int = param(3, "Median filter over the mesh, in boxes (BACK_FILTERSIZE); 1 = none.")
    filter_threshold: float = param(0.0, "Only filter boxes that differ by more than this, ADU.")

    def validate(self) -> None:
        if self.box_size < 8:
            raise ParameterError(f"backgrounding box_size must be >= 8 pixels, got {self.box_size}")
        if self.filter_size < 1:
            raise ParameterError(f"backgrounding filter_size must be >= 1, got {self.filter_size}")


class Backgrounder(Step):
    """Make the image's `Background` (its median level and rms are columns of the product)."""

    process = "backgrounding"
    version = "1.0.0"
    Params = BackgroundingParams
    inputs = (Input("image"),)
    outputs = (Output("background", Background, parents={"image_id": "image"}),)
    badness = "BAD_BACKGROUND"

    def compute(self, data: np.ndarray, *, mask: np.ndarray | None) -> BackgroundMesh:
        """The background mesh of one image (arrays in, mesh out)."""
        p = self.params
        return estimate_background(data, mask=mask, box_size=min(p.box_size, *data.shape),
                                   filter_size=p.filter_size, filter_threshold=p.filter_threshold)

    def run(self, ds: DataStore) -> None:
        image = ds.get_image()
        if min(image.ny, image.nx) < MIN_IMAGE_SIDE:
            raise BadDataError(f"the image is {image.nx} x {image.ny} pixels; a background, and the "
                               f"products after it, need at least {MIN_IMAGE_SIDE} x {MIN_IMAGE_SIDE}",
                               figures={"nx": image.nx, "ny": image.ny})
        mask = image.flags != 0
        usable, need = int(np.count_nonzero(~mask)), min(self.params.box_size, *mask.shape) ** 2 // 2
        if usable < need:
            raise BadDataError(f"only {usable} of {mask.size} pixels are usable (flagged: "
                               f"{_flag_shares(image.flags)}); the background needs at least "
                               f"half a mesh box, {need} pixels", figures={"usable": usable, "needed": need})
        ds.new_product(self, "background", mesh=self.compute(image.data, mask=mask))


    def fingerprint_figures(self, ds: DataStore) -> dict[str, Any]:
        mesh = ds.get_background().mesh
        return {**super().fingerprint_figures(ds), "level_sum": float(np.sum(mesh.level, dtype=np.float64)),
                "rms_sum": float(np.sum(mesh.rms, dtype=np.float64))}


def _flag_shares(flags: np.ndarray) -> str:
    """The share of the pixels each flag bit covers, e.g. ``"SATURATED 4096 (100.0%)"``."""
    counts = {bit.name: int(np.count_nonzero(flags & bit)) for bit in PixelFlag}
    shares = [f"{name} {n} ({n / flags.size:.1%})" for name, n in counts.items() if n]
    return ", ".join(shares) or "none"
