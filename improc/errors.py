"""The error that says "these data cannot give this product".

Algorithms raise `BadDataError` (or a subclass: too few sources, a PSF that cannot be fitted,
no astrometric match, ...) when the data, not the code or its parameters, are why a result
cannot be made, and put the numbers that decided it in ``figures``.  A pipeline step turns it
into a badness bit on the image (``pipeline.step``); every other exception is a programming or
configuration error and never marks an image bad.  Invalid arguments stay plain ValueErrors.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["BadDataError"]


class BadDataError(ValueError):
    """The data cannot give the product asked for.

    Parameters
    ----------
    message : str
        What was found, with the numbers (``"3 stars with S/N > 50, the PSF fit needs 5"``).
    badness : str, optional
        The `models.image.ImageBadness` name this means, when the raiser knows it (pipeline
        code); improc leaves it to the step, which maps error types to bits.
    figures : mapping, optional
        The numbers that decided it, by name (``{"n_stars": 3, "needed": 5}``).
    """

    def __init__(self, message: str, *, badness: str | None = None,
                 figures: Mapping[str, Any] | None = None):
        super().__init__(message)
        self.badness = badness
        self.figures = dict(figures or {})
