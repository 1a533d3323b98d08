"""Detection: peaks of a difference image's S_corr, positive and negative (`improc.zogy.detect_peaks`).

A positive detection is brighter in the new image than in the reference, a negative one fainter
(a fading variable).  Masked pixels of the difference are ignored.  The product is a
`SourceList` on the difference image with columns ``x, y`` (sub-pixel, 0-based), ``ix, iy``
(peak pixel), ``ra, dec`` (through the new image's fitted WCS, which the difference shares),
``snr`` (S_corr at the peak, signed) and ``sign`` (+1 / -1), by decreasing ``|snr|``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from improc.errors import BadDataError
from improc.zogy import detect_peaks
from models.source_list import SourceList
from pipeline.data_store import DataStore
from pipeline.parameters import ParameterError, StepParams, param
from pipeline.step import Input, Output, Step

__all__ = ["DetectionParams", "Detector"]


@dataclass(frozen=True, kw_only=True)
class DetectionParams(StepParams):
    """How detections are found on S_corr."""

    step_name = "detection"

    threshold: float = param(5.0, "Detection threshold on |S_corr|, sigma (positive and negative).")
    peak_radius: int = param(2, "Half-side of the square in which a peak is the extremum, pixels.")
    max_detections: int = param(10000, "More detections than this mark the subtraction bad.")

    def validate(self) -> None:
        if not self.threshold > 0:
            raise ParameterError(f"detection threshold must be > 0, got {self.threshold}")
        if self.peak_radius < 1 or self.max_detections < 1:
            raise ParameterError("detection peak_radius and max_detections must be >= 1")


class Detector(Step):
    """Make the SourceList of detections on the difference image."""

    process = "detection"
    version = "1.0.0"
    Params = DetectionParams
    inputs = (Input("sub_image"), Input("wcs"))
    outputs = (Output("detections", SourceList, parents={"image_id": "sub_image"}),)
    badness = "BAD_SUBTRACTION"

    def compute(self, score: np.ndarray, flags: np.ndarray):
        """Peaks of S_corr beyond +/- threshold, masked pixels ignored (a Table)."""
        return detect_peaks(score, threshold=self.params.threshold, mask=flags != 0,
                            radius=self.params.peak_radius)

    def run(self, ds: DataStore) -> None:
        sub, wcs = ds.get_sub_image(), ds.get_wcs()
        table = self.compute(sub.extra("SCORE"), sub.flags)
        if len(table) > self.params.max_detections:
            raise BadDataError(f"difference image {sub.describe()}: {len(table)} detections above "
                               f"{self.params.threshold} sigma, more than max_detections "
                               f"{self.params.max_detections}: the subtraction failed",
                               figures={"n_detections": len(table)})
        table.rename_column("score", "snr")
        table["sign"] = np.sign(table["snr"]).astype(np.int8)
        ra, dec = wcs.wcs.pixel_to_world_values(np.asarray(table["x"]), np.asarray(table["y"]))
        table["ra"], table["dec"] = np.asarray(ra, float) % 360.0, np.asarray(dec, float)
        ds.new_product(self, "detections", data=table, aper_radii=[], fwhm_pixels=None)

    def fingerprint_figures(self, ds: DataStore) -> dict[str, Any]:
        table = ds.get_detections().data
        return {"n": len(table), "n_negative": int(np.sum(np.asarray(table["sign"]) < 0)),
                "snr_sum": float(np.sum(np.abs(table["snr"])))}
