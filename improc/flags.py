"""Named bits of the per-pixel flags plane, defined once for the whole library.

A pixel's flag value is the OR of the bits that apply to it; 0 means a good pixel.  Build masks
by name with `flag_value` and read them back with `has_flag` / `flag_names`::

    bad = has_flag(flags, "BAD", "SATURATED")      # boolean (ny, nx)
"""

from __future__ import annotations

import enum

import numpy as np

__all__ = ["PixelFlag", "bits_by_name", "flag_value", "has_flag", "flag_names", "FLAGS_DTYPE"]

#: dtype of a flags plane.
FLAGS_DTYPE = np.uint16


class PixelFlag(enum.IntFlag):
    """Why a pixel should not be trusted (bits of the flags plane)."""

    BAD = 1            #: bad pixel or column from the instrument's defect map
    SATURATED = 2      #: at or above the saturation level, or part of a bleed trail
    CR = 4             #: hit by a cosmic ray
    EDGE = 8           #: near the chip edge, or outside the data section
    INTERPOLATED = 16  #: value replaced by interpolation
    NO_DATA = 32       #: no valid value (NaN, infinite, zero weight)
    BLEED = 64         #: charge bleed trail next to a saturated star
    NONLINEAR = 128    #: above the linearity limit, corrected but less reliable


def bits_by_name(kind: type[enum.IntFlag], names: tuple[str, ...], what: str) -> int:
    """The OR of named members of any IntFlag (case-insensitive); KeyError names a bad name.

    ``what`` says what the flags are ("pixel flag", "image badness") in the error message.
    """
    value = 0
    for name in names:
        try:
            value |= kind[name.upper()]
        except KeyError:
            known = ", ".join(member.name for member in kind)
            raise KeyError(f"unknown {what} {name!r}; known: {known}") from None
    return int(value)


def flag_value(*names: str) -> int:
    """The OR of the named bits, e.g. ``flag_value("BAD", "CR") == 5``; KeyError names a bad name."""
    return bits_by_name(PixelFlag, names, "pixel flag")


def has_flag(flags: np.ndarray, *names: str) -> np.ndarray:
    """Boolean mask of pixels with any of the named bits; with no names, any bit at all."""
    mask = flag_value(*names) if names else int(sum(PixelFlag))
    return (np.asarray(flags) & mask) != 0


def flag_names(value: int) -> list[str]:
    """The names of the bits set in one flag value."""
    return [f.name for f in PixelFlag if value & f]
