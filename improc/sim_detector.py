"""The detector of simulated images: sky, photon and read noise, saturation, bleed trails,
cosmic rays and bad columns, and the resulting flags and inverse-variance weight.

Order of events, as in a CCD: the noiseless scene (sky + objects, ADU) is turned into
electrons (Poisson, or exactly ``model * gain`` without noise); cosmic rays deposit charge;
charge above the full well (``saturation_adu * gain``) spills up and down its column; read
noise is added; the result is converted to ADU and clipped at ``saturation_adu``; finally bad
columns are written over.

Flag bits (uint16):

================  =====  ===========================================================
name              value  meaning
================  =====  ===========================================================
FLAG_BAD_COLUMN   1      pixel of a dead or hot column
FLAG_SATURATED    2      pixel at the saturation level (full well or digital clip)
FLAG_COSMIC_RAY   4      pixel hit by a cosmic ray (truth: a real pipeline must find these)
FLAG_BLEED        64     pixel that received charge spilled from a saturated pixel
================  =====  ===========================================================
"""

from __future__ import annotations

import numpy as np

from improc.flags import PixelFlag

__all__ = [
    "FLAG_BAD_COLUMN", "FLAG_SATURATED", "FLAG_COSMIC_RAY", "FLAG_BLEED",
    "sky_model", "expose", "inverse_variance",
]

# the project's pixel flag bits (improc.flags.PixelFlag), so a simulated flags plane reads as one
FLAG_BAD_COLUMN: int = int(PixelFlag.BAD)
FLAG_SATURATED: int = int(PixelFlag.SATURATED)
FLAG_COSMIC_RAY: int = int(PixelFlag.CR)
FLAG_BLEED: int = int(PixelFlag.BLEED)

#: Median charge of a cosmic-ray pixel, electrons, and the log-normal spread.
_CR_MEDIAN_E = 3000.0
_CR_SIGMA_LN = 0.8
#: Pixel-to-pixel steps (dy, dx) of cosmic-ray tracks.
_CR_STEPS = np.array([(0, 1), (1, 0), (1, 1), (1, -1)])


def sky_model(shape: tuple[int, int], *, level: float, gradient: float) -> np.ndarray:
    """A planar sky: ``level * (1 + gradient * (u / 2 + v / 4))``.

    Parameters
    ----------
    shape : tuple of int
        ``(ny, nx)``.
    level : float
        Sky at the image centre, ADU per pixel.
    gradient : float
        Fractional change of the sky from the left to the right edge (u from -1 to 1); half
        of that from the bottom to the top edge.

    Returns
    -------
    numpy.ndarray
        Shape (ny, nx), float64, ADU.
    """
    ny, nx = shape
    u = np.linspace(-1.0, 1.0, nx) if nx > 1 else np.zeros(1)
    v = np.linspace(-1.0, 1.0, ny) if ny > 1 else np.zeros(1)
    return level * (1.0 + gradient * (u[None, :] / 2.0 + v[:, None] / 4.0))


def expose(model: np.ndarray, *, gain: float, read_noise: float, saturation_adu: float,
           bleed_trails: bool, n_cosmic_rays: int, n_bad_columns: int, noise: bool,
           rng: np.random.Generator,
           defects_rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read out a noiseless scene through the detector.

    Parameters
    ----------
    model : numpy.ndarray
        Shape (ny, nx): noiseless sky + objects, ADU (>= 0).
    gain : float
        Electrons per ADU.
    read_noise : float
        Electrons.
    saturation_adu : float
        Saturation level, ADU; the full well is ``saturation_adu * gain`` electrons.
    bleed_trails : bool
        Spill charge above the full well along the column (else it is lost).
    n_cosmic_rays : int
        Number of cosmic-ray hits (each 1-3 pixels).
    n_bad_columns : int
        Number of bad (dead or hot, whole or partial) columns.
    noise : bool
        Add Poisson and read noise.
    rng : numpy.random.Generator
        Source of the exposure's random numbers: noise, cosmic rays, and the bad columns'
        read noise (and their layout when ``defects_rng`` is None).
    defects_rng : numpy.random.Generator or None
        Source of the detector's fixed defects (which columns are bad, dead or hot, from which
        row), the same for every exposure of one detector.  None: drawn from ``rng``.

    Returns
    -------
    data : numpy.ndarray
        Shape (ny, nx), float32, ADU.
    flags : numpy.ndarray
        Shape (ny, nx), uint16 bitmask (see the module docstring).
    """
    noise_rng, cr_rng, column_rng = rng.spawn(3)
    flags = np.zeros(model.shape, dtype=np.uint16)
    if noise:
        electrons = noise_rng.poisson(model * gain).astype(np.float64)
    else:
        electrons = model * gain
    cosmic = _add_cosmic_rays(electrons, n_cosmic_rays, cr_rng)
    full_well = saturation_adu * gain
    bleed = _bleed(electrons, full_well) if bleed_trails else np.zeros(model.shape, bool)
    full = electrons >= full_well
    if noise:
        electrons += noise_rng.standard_normal(model.shape, dtype=np.float32) * read_noise
    data = (electrons / gain).astype(np.float32)
    data[full] = saturation_adu
    np.minimum(data, np.float32(saturation_adu), out=data)
    flags[cosmic] |= FLAG_COSMIC_RAY
    flags[bleed & ~full] |= FLAG_BLEED
    flags[data >= np.float32(saturation_adu)] |= FLAG_SATURATED
    bad = _add_bad_columns(data, n_bad_columns, column_rng if defects_rng is None else defects_rng,
                           column_rng, saturation_adu=saturation_adu,
                           read_noise_adu=read_noise / gain if noise else 0.0)
    flags[bad] |= FLAG_BAD_COLUMN
    return data, flags


def inverse_variance(model: np.ndarray, flags: np.ndarray, *, gain: float,
                     read_noise: float) -> np.ndarray:
    """Inverse variance of each pixel, from the noiseless model: ``1 / (model / gain + (rn / gain)**2)``.

    Pixels flagged as bad column, saturated or bleed get weight 0; cosmic-ray pixels keep
    their weight (finding them is the pipeline's job).

    Parameters
    ----------
    model : numpy.ndarray
        Shape (ny, nx): noiseless sky + objects, ADU.
    flags : numpy.ndarray
        Shape (ny, nx) flag bits from `expose`.
    gain : float
        Electrons per ADU.
    read_noise : float
        Electrons.

    Returns
    -------
    numpy.ndarray
        Shape (ny, nx), float32, 1 / ADU**2.
    """
    weight = (1.0 / (np.maximum(model, 0.0) / gain + (read_noise / gain) ** 2)).astype(np.float32)
    weight[(flags & (FLAG_BAD_COLUMN | FLAG_SATURATED | FLAG_BLEED)) != 0] = 0.0
    return weight


def _add_cosmic_rays(electrons: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Deposit ``n`` sharp 1-3 pixel cosmic-ray tracks into ``electrons`` (in place); their mask."""
    ny, nx = electrons.shape
    mask = np.zeros(electrons.shape, dtype=bool)
    if n == 0:
        return mask
    starts_x = rng.integers(0, nx, n)
    starts_y = rng.integers(0, ny, n)
    lengths = rng.integers(1, 4, n)
    steps = _CR_STEPS[rng.integers(0, len(_CR_STEPS), n)]
    for x0, y0, length, (step_y, step_x) in zip(starts_x, starts_y, lengths, steps):
        k = np.arange(length)
        xs, ys = x0 + k * step_x, y0 + k * step_y
        keep = (xs >= 0) & (xs < nx) & (ys >= 0) & (ys < ny)
        charge = _CR_MEDIAN_E * np.exp(_CR_SIGMA_LN * rng.standard_normal(length))
        electrons[ys[keep], xs[keep]] += charge[keep]
        mask[ys[keep], xs[keep]] = True
    return mask


def _bleed(electrons: np.ndarray, full_well: float) -> np.ndarray:
    """Spill charge above ``full_well`` half up, half down each column (in place); mask of receivers."""
    received = np.zeros(electrons.shape, dtype=bool)
    for col in np.flatnonzero((electrons > full_well).any(axis=0)):
        column = electrons[:, col].copy()
        over = column > full_well
        edges = np.flatnonzero(np.diff(np.concatenate([[0], over.astype(np.int8), [0]])))
        for first, stop in zip(edges[::2], edges[1::2]):
            excess = float(np.sum(column[first:stop] - full_well))
            column[first:stop] = full_well
            up = _spill(column, np.arange(stop, column.size), excess / 2.0, full_well)
            down = _spill(column, np.arange(first - 1, -1, -1), excess / 2.0, full_well)
            received[up, col] = True
            received[down, col] = True
        electrons[:, col] = column
    return received


def _spill(column: np.ndarray, path: np.ndarray, charge: float, full_well: float) -> np.ndarray:
    """Fill pixels of ``column`` along ``path`` up to the full well with ``charge``; those filled."""
    if path.size == 0 or charge <= 0:
        return path[:0]
    room = np.maximum(full_well - column[path], 0.0)
    filled = np.cumsum(room)
    k = int(np.searchsorted(filled, charge))
    column[path[:k]] = np.maximum(column[path[:k]], full_well)
    if k < path.size:
        column[path[k]] += charge - (filled[k - 1] if k > 0 else 0.0)
        return path[:k + 1]
    return path[:k]


def _add_bad_columns(data: np.ndarray, n: int, layout_rng: np.random.Generator,
                     noise_rng: np.random.Generator, *, saturation_adu: float,
                     read_noise_adu: float) -> np.ndarray:
    """Overwrite ``n`` columns (each whole or from a random row up) as dead or hot; their mask.

    Which columns, from which row and which kind come from ``layout_rng``, their read noise
    from ``noise_rng`` (the two may be one generator).
    """
    ny, nx = data.shape
    mask = np.zeros(data.shape, dtype=bool)
    for col in layout_rng.choice(nx, size=min(n, nx), replace=False):
        first = 0 if layout_rng.random() < 0.5 else int(layout_rng.integers(0, ny))
        level = 0.0 if layout_rng.random() < 0.5 else 0.5 * saturation_adu   # dead or hot
        values = level + read_noise_adu * noise_rng.standard_normal(ny - first)
        data[first:, col] = np.minimum(values, saturation_adu).astype(np.float32)
        mask[first:, col] = True
    return mask
