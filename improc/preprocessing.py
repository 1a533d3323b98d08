"""CCD preprocessing of one raw frame: overscan, trim, linearity, bias, flat, flags and weight.

`preprocess` turns a raw (ny_raw, nx_raw) frame of one CCD or amplifier into an image, an
inverse-variance weight and a flags plane, in this order:

1. overscan: a level is measured in the overscan region of the raw frame (a sigma-clipped
   median or mean, either one number or one per row / per column, see `overscan_level`);
2. trim to the data section and subtract that level;
3. linearity correction (a callable, or polynomial coefficients applied to the ADU values);
4. bias subtraction (a master bias that was itself overscan-subtracted and trimmed);
5. flat division (the flat is normalized to median 1 first).

Flags come from the raw values, never the corrected ones: SATURATED where the raw data-section
value is ``>= saturation``; BAD from the bad-pixel mask and where the flat is zero, negative or
not finite; NO_DATA where the result is not finite.  Pixels with no valid value (NO_DATA, or a
flat that cannot be divided by) get ``fill_value`` so that the image holds no NaN.

The weight is the inverse of the CCD variance in ADU^2, with the Poisson term taken from the
corrected image before flat division and the read noise from the detector::

    weight = flat**2 / (max(image * flat, 0) / gain + (read_noise / gain)**2)

which is ``1 / (max(image, 0) / gain + (read_noise / gain)**2)`` when there is no flat (or where
the flat is 1).  The noise of the bias and flat themselves and the slope of the linearity
correction are neglected.  Every flagged pixel has weight 0.

Sections are ``(slice_y, slice_x)`` tuples of 0-based numpy slices; `parse_fits_section`
converts a FITS/IRAF header string such as ``TRIMSEC = '[17:528,1:520]'`` into one.
"""

from __future__ import annotations

import operator
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from improc.flags import FLAGS_DTYPE, PixelFlag

__all__ = [
    "Preprocessed",
    "parse_fits_section",
    "overscan_level",
    "subtract_overscan",
    "preprocess",
    "combine_bias",
    "combine_flat",
]

Section = tuple[slice, slice]
OverscanMethod = Literal["median", "mean", "row_median", "column_median"]
_OVERSCAN_METHODS = ("median", "mean", "row_median", "column_median")
_COMBINE_METHODS = ("median", "mean")

_SECTION_RE = re.compile(r"\[\s*(\d+)\s*:\s*(\d+)\s*,\s*(\d+)\s*:\s*(\d+)\s*\]")


@dataclass(frozen=True, eq=False)
class Preprocessed:
    """The result of `preprocess`.

    Attributes
    ----------
    image : numpy.ndarray
        float32 (ny, nx) trimmed image in ADU: overscan-subtracted, linearity-corrected,
        bias-subtracted and flat-fielded.  Pixels with no valid value hold the ``fill_value``
        given to `preprocess`.
    weight : numpy.ndarray
        float32 (ny, nx) inverse variance in 1/ADU^2 (see the module docstring); 0 wherever a
        flag is set.
    flags : numpy.ndarray
        uint16 (ny, nx) `improc.flags.PixelFlag` bits: SATURATED, BAD and NO_DATA.
    overscan_level : float or numpy.ndarray
        What was subtracted, in ADU: a float for the "median" and "mean" methods (0.0 when no
        overscan was given), a float64 array of shape (ny,) for "row_median" and (nx,) for
        "column_median", one value per row / column of the trimmed image.
    """

    image: np.ndarray
    weight: np.ndarray
    flags: np.ndarray
    overscan_level: float | np.ndarray


def parse_fits_section(text: str) -> Section:
    """Convert a FITS/IRAF section string into 0-based numpy slices.

    Parameters
    ----------
    text
        A section such as ``"[17:528,1:520]"``: 1-based, inclusive, x (column) range first.
        Blanks around the numbers are allowed (``'[  17: 528,   1: 520]'``).  A reversed range
        such as ``"[528:17,1:520]"`` (used in headers to say an amplifier reads out the other
        way) gives the same region as the forward range: the slices never flip the data.

    Returns
    -------
    tuple of slice
        ``(slice_y, slice_x)`` for an (ny, nx) array, e.g. ``(slice(0, 520), slice(16, 528))``.

    Raises
    ------
    ValueError
        If the text is not of the form ``[x1:x2,y1:y2]`` with positive integers.
    """
    match = _SECTION_RE.fullmatch(text.strip()) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"FITS section must look like '[x1:x2,y1:y2]' with 1-based integers, "
                         f"got {text!r}")
    x1, x2, y1, y2 = (int(value) for value in match.groups())
    if min(x1, x2, y1, y2) < 1:
        raise ValueError(f"FITS section {text!r} contains 0; FITS sections are 1-based")
    return slice(min(y1, y2) - 1, max(y1, y2)), slice(min(x1, x2) - 1, max(x1, x2))


def _describe(section: Section) -> str:
    return (f"rows {section[0].start}:{section[0].stop}, "
            f"columns {section[1].start}:{section[1].stop}")


def _check_raw(raw: np.ndarray, name: str = "raw") -> np.ndarray:
    raw = np.asarray(raw)
    if raw.ndim != 2 or raw.size == 0:
        raise ValueError(f"{name} must be a non-empty 2-D (ny, nx) array, got shape {raw.shape}")
    if not (np.issubdtype(raw.dtype, np.integer) or np.issubdtype(raw.dtype, np.floating)):
        raise ValueError(f"{name} must hold integers or floats, got dtype {raw.dtype}")
    return raw


def _check_section(section: Section, shape: tuple[int, int], name: str) -> Section:
    """Normalize ``section`` to slices with integer start/stop inside ``shape``."""
    if not (isinstance(section, tuple) and len(section) == 2
            and all(isinstance(s, slice) for s in section)):
        raise ValueError(f"{name} must be a (slice_y, slice_x) tuple, got {section!r}")
    checked = []
    for axis, piece, size in zip(("rows", "columns"), section, shape):
        if piece.step not in (None, 1):
            raise ValueError(f"{name} {axis} must have step 1, got {piece!r}")
        try:
            start = 0 if piece.start is None else operator.index(piece.start)
            stop = size if piece.stop is None else operator.index(piece.stop)
        except TypeError:
            raise ValueError(f"{name} {axis} must have integer bounds, got {piece!r}") from None
        if not 0 <= start < stop <= size:
            raise ValueError(f"{name} {axis} {start}:{stop} must be a non-empty range inside "
                             f"the array's {size} {axis} (0:{size})")
        checked.append(slice(start, stop))
    return checked[0], checked[1]


def _check_positive(value: float, name: str, unit: str) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in {unit}, got {value!r}") from None
    if not value > 0:  # also rejects NaN
        raise ValueError(f"{name} must be > 0 {unit}, got {value}")
    return value


def _clipped_center(values: np.ndarray, *, axis: int | None, statistic: str,
                    sigma: float, maxiters: int) -> np.ndarray:
    """Sigma-clipped median or mean, clipping like astropy's ``sigma_clip`` defaults.

    Each pass removes values farther than ``sigma`` standard deviations (ddof=0) from the median
    of the values kept so far; it stops when a pass removes nothing or after ``maxiters``
    passes.  Non-finite values are ignored; a line with no finite value gives NaN.
    """
    kept = np.array(values, dtype=np.float64)
    kept[~np.isfinite(kept)] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN lines give NaN, said above
        for _ in range(maxiters):
            center = np.nanmedian(kept, axis=axis, keepdims=True)
            spread = np.nanstd(kept, axis=axis, keepdims=True)
            outliers = np.abs(kept - center) > sigma * spread
            if not outliers.any():
                break
            kept[outliers] = np.nan
        reduce = np.nanmedian if statistic == "median" else np.nanmean
        return reduce(kept, axis=axis)


def overscan_level(raw: np.ndarray, *, overscan: Section, method: OverscanMethod = "median",
                   sigma: float = 3.0, maxiters: int = 5) -> float | np.ndarray:
    """Measure the bias level in the overscan region of a raw frame.

    Parameters
    ----------
    raw
        (ny, nx) raw frame in ADU.
    overscan
        ``(slice_y, slice_x)`` of the overscan region (see `parse_fits_section`).
    method
        "median": one sigma-clipped median of the whole region; "mean": one sigma-clipped mean;
        "row_median": a sigma-clipped median of each row of the region, for overscan columns
        beside the data (serial overscan), following a level that drifts during readout;
        "column_median": a sigma-clipped median of each column of the region, for overscan rows
        above or below the data (parallel overscan).
    sigma
        Clipping threshold in standard deviations.
    maxiters
        Maximum number of clipping passes.

    Returns
    -------
    float or numpy.ndarray
        A float for "median" / "mean".  For "row_median" a float64 array of shape (ny,) and for
        "column_median" one of shape (nx,); rows (columns) outside the overscan region, and lines
        with no finite overscan pixel, are NaN.

    Raises
    ------
    ValueError
        If ``raw`` is not a non-empty 2-D array, the region is outside it, the method is
        unknown, ``sigma`` <= 0, ``maxiters`` < 1, or the region has no finite pixel.
    """
    raw = _check_raw(raw)
    overscan = _check_section(overscan, raw.shape, "overscan")
    if method not in _OVERSCAN_METHODS:
        raise ValueError(f"overscan method must be one of {_OVERSCAN_METHODS}, got {method!r}")
    sigma = _check_positive(sigma, "sigma", "standard deviations")
    if operator.index(maxiters) < 1:
        raise ValueError(f"maxiters must be >= 1, got {maxiters}")
    region = raw[overscan]
    if method in ("median", "mean"):
        level = float(_clipped_center(region, axis=None, statistic=method, sigma=sigma,
                                      maxiters=maxiters))
        if not np.isfinite(level):
            raise ValueError(f"overscan region ({_describe(overscan)}) has no finite pixels")
        return level
    axis = 1 if method == "row_median" else 0
    lines = _clipped_center(region, axis=axis, statistic="median", sigma=sigma, maxiters=maxiters)
    if not np.isfinite(lines).any():
        raise ValueError(f"overscan region ({_describe(overscan)}) has no finite pixels")
    level = np.full(raw.shape[1 - axis], np.nan)
    level[overscan[1 - axis]] = lines
    return level


def _level_plane(level: float | np.ndarray, method: OverscanMethod) -> float | np.ndarray:
    """The level as something that broadcasts against an (ny, nx) float32 array."""
    if method == "row_median":
        return np.asarray(level, dtype=np.float32)[:, None]
    if method == "column_median":
        return np.asarray(level, dtype=np.float32)[None, :]
    return float(level)


def subtract_overscan(raw: np.ndarray, *, overscan: Section, method: OverscanMethod = "median",
                      sigma: float = 3.0, maxiters: int = 5
                      ) -> tuple[np.ndarray, float | np.ndarray]:
    """Subtract the overscan level from a whole raw frame (no trimming).

    Parameters
    ----------
    raw
        (ny, nx) raw frame in ADU.
    overscan, method, sigma, maxiters
        As for `overscan_level`.

    Returns
    -------
    image : numpy.ndarray
        float32 (ny, nx) frame minus the level; with "row_median" ("column_median"), rows
        (columns) outside the overscan region are NaN, since no level was measured for them.
    level : float or numpy.ndarray
        The level returned by `overscan_level`.

    Raises
    ------
    ValueError
        As for `overscan_level`.
    """
    level = overscan_level(raw, overscan=overscan, method=method, sigma=sigma, maxiters=maxiters)
    image = np.asarray(raw, dtype=np.float32) - _level_plane(level, method)
    return image.astype(np.float32, copy=False), level


def _check_plane(plane: np.ndarray | None, shape: tuple[int, int], name: str,
                 dtype: type) -> np.ndarray | None:
    if plane is None:
        return None
    plane = np.asarray(plane)
    if plane.shape != shape:
        raise ValueError(f"{name} must have the trimmed data-section shape {shape}, "
                         f"got {plane.shape}")
    return plane.astype(dtype, copy=False)


def _normalized_flat(flat: np.ndarray | None, shape: tuple[int, int]) -> np.ndarray | None:
    """The flat divided by the median of its finite positive pixels (non-finite kept)."""
    flat = _check_plane(flat, shape, "flat", np.float32)
    if flat is None:
        return None
    usable = flat[np.isfinite(flat) & (flat > 0)]
    if usable.size == 0:
        raise ValueError("flat has no finite positive pixels")
    return flat / np.float32(np.median(usable))


def _check_linearity(linearity: Callable[[np.ndarray], np.ndarray] | np.ndarray | None
                     ) -> Callable[[np.ndarray], np.ndarray] | list[float] | None:
    if linearity is None or callable(linearity):
        return linearity
    coefficients = np.asarray(linearity, dtype=np.float64)
    if coefficients.ndim != 1 or coefficients.size == 0 or not np.isfinite(coefficients).all():
        raise ValueError("linearity must be a callable or a non-empty 1-D array of finite "
                         f"polynomial coefficients, got {linearity!r}")
    return [float(c) for c in coefficients]


def _apply_linearity(image: np.ndarray, linearity: Callable | list[float] | None) -> np.ndarray:
    if linearity is None:
        return image
    if callable(linearity):
        corrected = np.asarray(linearity(image))
        if corrected.shape != image.shape:
            raise ValueError(f"linearity callable must return the image shape {image.shape}, "
                             f"got {corrected.shape}")
        return corrected.astype(np.float32, copy=False)
    # Horner's rule in float32; coefficients are in increasing order of power.
    corrected = np.full_like(image, linearity[-1])
    for coefficient in reversed(linearity[:-1]):
        corrected *= image
        corrected += coefficient
    return corrected


def _trimmed_level(raw: np.ndarray, overscan: Section | None, data: Section,
                   method: OverscanMethod) -> float | np.ndarray:
    """The overscan level for the data section: a float, or one value per data row / column."""
    if overscan is None:
        return 0.0
    overscan = _check_section(overscan, raw.shape, "overscan")
    if all(o.start < d.stop and d.start < o.stop for o, d in zip(overscan, data)):
        raise ValueError(f"overscan ({_describe(overscan)}) overlaps the data section "
                         f"({_describe(data)})")
    level = overscan_level(raw, overscan=overscan, method=method)
    if method in ("median", "mean"):
        return level
    axis, label = (0, "rows") if method == "row_median" else (1, "columns")
    if overscan[axis].start > data[axis].start or overscan[axis].stop < data[axis].stop:
        raise ValueError(f"overscan method {method!r} needs the overscan to cover the data "
                         f"section's {label} {data[axis].start}:{data[axis].stop}, got "
                         f"{label} {overscan[axis].start}:{overscan[axis].stop}")
    return level[data[axis]]


def _set_flag(flags: np.ndarray, where: np.ndarray, flag: PixelFlag) -> None:
    np.bitwise_or(flags, FLAGS_DTYPE(flag), out=flags, where=where)


def preprocess(raw: np.ndarray, *, overscan: Section | None, data: Section, gain: float,
               read_noise: float, saturation: float, bias: np.ndarray | None = None,
               flat: np.ndarray | None = None,
               linearity: Callable[[np.ndarray], np.ndarray] | np.ndarray | None = None,
               bad_pixel_mask: np.ndarray | None = None,
               overscan_method: OverscanMethod = "median",
               fill_value: float = 0.0) -> Preprocessed:
    """Overscan-subtract, trim, linearize, bias-subtract and flat-field one raw CCD frame.

    Parameters
    ----------
    raw
        (ny_raw, nx_raw) raw frame in ADU, integer or float.
    overscan
        ``(slice_y, slice_x)`` of the overscan region of ``raw``; None to skip overscan
        subtraction (level 0).  Must not overlap ``data``.
    data
        ``(slice_y, slice_x)`` of the data section of ``raw`` (the trim region); the result has
        its shape (ny, nx).
    gain
        Detector gain in e-/ADU, > 0.
    read_noise
        Read noise in e- (rms), > 0.
    saturation
        Saturation level in raw ADU (before any correction); ``np.inf`` flags nothing.
    bias
        (ny, nx) master bias in ADU, already overscan-subtracted and trimmed; None for none.
    flat
        (ny, nx) flat field; it is normalized to median 1 over its finite positive pixels.
        Pixels where it is <= 0 or not finite are flagged BAD and set to ``fill_value``.
        None for none.
    linearity
        None for none; a callable taking and returning the (ny, nx) float32 overscan-subtracted
        image in ADU; or polynomial coefficients ``c`` in increasing order of power, giving
        ``corrected = c[0] + c[1] * x + c[2] * x**2 + ...`` (numpy.polynomial convention).
    bad_pixel_mask
        (ny, nx) array, non-zero (True) on known bad pixels, which are flagged BAD; None for none.
    overscan_method
        How the overscan level is measured; see `overscan_level`.
    fill_value
        Image value written into pixels with no valid value (NO_DATA, or a flat that cannot be
        divided by).

    Returns
    -------
    Preprocessed
        Image, weight, flags and the overscan level that was subtracted.

    Raises
    ------
    ValueError
        If ``raw`` is empty or not 2-D, a section lies outside ``raw`` or the overscan overlaps
        the data section, ``gain``, ``read_noise`` or ``saturation`` is not > 0, ``bias``,
        ``flat`` or ``bad_pixel_mask`` does not have the trimmed shape, the flat has no positive
        pixel, ``linearity`` is malformed, or the data section has no finite pixels.
    """
    raw = _check_raw(raw)
    data = _check_section(data, raw.shape, "data")
    shape = (data[0].stop - data[0].start, data[1].stop - data[1].start)
    gain = _check_positive(gain, "gain", "e-/ADU")
    read_noise = _check_positive(read_noise, "read_noise", "e-")
    saturation = _check_positive(saturation, "saturation", "ADU")
    bias = _check_plane(bias, shape, "bias", np.float32)
    flat = _normalized_flat(flat, shape)
    bad_pixel_mask = _check_plane(bad_pixel_mask, shape, "bad_pixel_mask", bool)
    linearity = _check_linearity(linearity)
    if overscan_method not in _OVERSCAN_METHODS:
        raise ValueError(f"overscan_method must be one of {_OVERSCAN_METHODS}, "
                         f"got {overscan_method!r}")
    raw_data = raw[data]
    if np.issubdtype(raw.dtype, np.floating) and not np.isfinite(raw_data).any():
        raise ValueError(f"raw image has no finite pixels in the data section ({_describe(data)})")
    level = _trimmed_level(raw, overscan, data, overscan_method)
    image = raw_data.astype(np.float32)
    image -= _level_plane(level, overscan_method)
    image = _apply_linearity(image, linearity)
    if bias is not None:
        image -= bias

    image, weight, flags = _flag_and_weigh(image, raw_data, saturation=saturation, flat=flat,
                                           bad_pixel_mask=bad_pixel_mask, gain=gain,
                                           read_noise=read_noise, fill_value=fill_value)
    return Preprocessed(image=image, weight=weight, flags=flags, overscan_level=level)


def _flag_and_weigh(image: np.ndarray, raw_data: np.ndarray, *, saturation: float,
                    flat: np.ndarray | None, bad_pixel_mask: np.ndarray | None, gain: float,
                    read_noise: float, fill_value: float
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flags, inverse variance and flat division of the bias-subtracted float32 ``image``."""
    flags = np.zeros(image.shape, dtype=FLAGS_DTYPE)
    _set_flag(flags, raw_data >= saturation, PixelFlag.SATURATED)
    if bad_pixel_mask is not None:
        _set_flag(flags, bad_pixel_mask, PixelFlag.BAD)
    with np.errstate(divide="ignore", invalid="ignore"):
        # Poisson term from the image before flat division, then scaled by flat**2.
        weight = 1.0 / (np.maximum(image, 0) * np.float32(1.0 / gain)
                        + np.float32((read_noise / gain) ** 2))
        if flat is not None:
            bad_flat = ~(np.isfinite(flat) & (flat > 0))
            _set_flag(flags, bad_flat, PixelFlag.BAD)
            image /= flat
            weight *= flat * flat
            np.copyto(image, np.float32(fill_value), where=bad_flat)
    no_data = ~np.isfinite(image)
    _set_flag(flags, no_data, PixelFlag.NO_DATA)
    np.copyto(image, np.float32(fill_value), where=no_data)
    np.copyto(weight, np.float32(0.0), where=flags != 0)
    return image, weight.astype(np.float32, copy=False), flags


def _stack(frames: Sequence[np.ndarray]) -> np.ndarray:
    frames = [np.asarray(frame) for frame in frames]
    if not frames:
        raise ValueError("frames must hold at least one 2-D array, got none")
    shape = frames[0].shape
    for index, frame in enumerate(frames):
        _check_raw(frame, f"frames[{index}]")
        if frame.shape != shape:
            raise ValueError(f"frames[{index}] has shape {frame.shape}, expected {shape} "
                             "like frames[0]")
    return np.stack(frames).astype(np.float32, copy=False)


def _combine(stack: np.ndarray, method: str) -> np.ndarray:
    if method not in _COMBINE_METHODS:
        raise ValueError(f"method must be one of {_COMBINE_METHODS}, got {method!r}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # pixels NaN in every frame stay NaN
        reduce = np.nanmedian if method == "median" else np.nanmean
        return reduce(stack, axis=0).astype(np.float32)


def combine_bias(frames: Sequence[np.ndarray], *,
                 method: Literal["median", "mean"] = "median") -> np.ndarray:
    """Combine bias frames pixel by pixel into a master bias.

    Parameters
    ----------
    frames
        Bias frames of one shape (ny, nx) in ADU, already overscan-subtracted and trimmed.
    method
        "median" or "mean" across frames, ignoring NaN.

    Returns
    -------
    numpy.ndarray
        float32 (ny, nx) master bias.

    Raises
    ------
    ValueError
        If there are no frames, a frame is not a non-empty 2-D array, shapes differ, or the
        method is unknown.
    """
    return _combine(_stack(frames), method)


def combine_flat(frames: Sequence[np.ndarray], *,
                 method: Literal["median", "mean"] = "median") -> np.ndarray:
    """Combine flat frames into a master flat normalized to median 1.

    Each frame is first divided by its own median (over finite positive pixels), so frames of
    different exposure levels combine fairly; the combination is normalized to median 1 again.

    Parameters
    ----------
    frames
        Flat frames of one shape (ny, nx), already overscan- and bias-subtracted and trimmed.
    method
        "median" or "mean" across frames, ignoring NaN.

    Returns
    -------
    numpy.ndarray
        float32 (ny, nx) master flat.

    Raises
    ------
    ValueError
        As for `combine_bias`, or if a frame has no finite positive pixel.
    """
    stack = _stack(frames)
    for index, frame in enumerate(stack):
        usable = frame[np.isfinite(frame) & (frame > 0)]
        if usable.size == 0:
            raise ValueError(f"flat frames[{index}] has no finite positive pixels")
        frame /= np.float32(np.median(usable))
    return _normalized_flat(_combine(stack, method), stack.shape[1:])
