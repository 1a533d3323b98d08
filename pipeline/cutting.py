"""Cutting: new / ref / sub stamps of data, weight and flags around every detection (`improc.cutouts`).

``new`` is the new image minus its background, ``ref`` the reference warped onto the new
image's grid and scaled to its ADU (divided by the flux ratio F_r / F_n, its weight multiplied
by the square), ``sub`` the difference: the three look alike for a constant source and differ
where something changed.  One HDF5 file per difference image (`models.cutouts.Cutouts`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from improc.cutouts import ImagePlanes, make_cutouts
from models.cutouts import Cutouts
from pipeline.data_store import DataStore
from pipeline.parameters import ParameterError, StepParams, param
from pipeline.reference_alignment import aligned_reference
from pipeline.step import Input, Output, Step

__all__ = ["CuttingParams", "Cutter"]


@dataclass(frozen=True, kw_only=True)
class CuttingParams(StepParams):
    """The stamps' size."""

    step_name = "cutting"

    size: int = param(41, "Side of every stamp, pixels (odd).")

    def validate(self) -> None:
        if self.size < 3 or self.size % 2 == 0:
            raise ParameterError(f"cutting size must be an odd integer >= 3, got {self.size}")


class Cutter(Step):
    """Make the Cutouts of the detections."""

    process = "cutting"
    version = "1.0.0"
    Params = CuttingParams
    inputs = (Input("image"), Input("background"), Input("wcs"), Input("zp"), Input("reference"),
              Input("sub_image"), Input("detections"))
    outputs = (Output("cutouts", Cutouts, parents={"sources_id": "detections"}),)

    def run(self, ds: DataStore) -> None:
        image, bg, sub, detections = ds.get_image(), ds.get_background(), ds.get_sub_image(), ds.get_detections()
        aligned = aligned_reference(ds)
        ratio = aligned.flux_ratio
        warped = aligned.warped
        stamps = make_cutouts(
            detections.x, detections.y,
            new=ImagePlanes(image.data - bg.counts, image.weight, image.flags),
            ref=ImagePlanes(warped.data / ratio, warped.weight * np.float32(ratio**2), warped.flags),
            sub=ImagePlanes(sub.data, sub.weight, sub.flags), size=self.params.size)
        ds.new_product(self, "cutouts", stamps=stamps)
