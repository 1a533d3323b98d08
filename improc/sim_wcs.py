"""World coordinate systems of simulated images: the true TAN-SIP WCS and a wrong header WCS.

The true WCS of a simulated image is a gnomonic (TAN) projection, north up and east to the
left (``CD1_1 < 0``), with a third-order SIP distortion whose radial (pincushion) part moves
the chip corners by a requested number of pixels, plus a smaller quadratic part that makes it
asymmetric.  The header WCS is what a telescope would write: plain TAN, no distortion, its
reference point off by a pointing error and its axes turned by a rotation error.

Conventions: pixel coordinates are 0-based; tangent-plane offsets ``(xi, eta)`` are in
arcsec, ``xi`` positive towards the east (increasing RA) and ``eta`` towards the north.
"""

from __future__ import annotations

import contextlib

import numpy as np
from astropy.coordinates import SkyCoord
import astropy.units as u
from astropy.wcs import WCS, Sip

__all__ = ["rotated_true_wcs", 
    "make_true_wcs",
    "make_header_wcs",
    "tangent_offsets_to_radec",
    "local_jacobian",
    "world_to_pixel",
    "mjd_to_julian_year",
]

#: Smallest radius (pixels) at which the SIP terms reach their amplitude.
_SIP_MIN_RADIUS = 1000.0
#: SIP quadratic coefficients, in units of ``amplitude / r_norm**2``: (p, q) -> (a_pq, b_pq).
_SIP_QUADRATIC: dict[tuple[int, int], tuple[float, float]] = {
    (2, 0): (0.25, -0.10),
    (1, 1): (-0.15, 0.20),
    (0, 2): (0.10, 0.15),
}


def make_true_wcs(nx: int, ny: int, *, ra: float, dec: float, pixel_scale: float,
                  sip_amplitude_pix: float) -> WCS:
    """The true TAN-SIP WCS of an ``(ny, nx)`` image centred on ``(ra, dec)``.

    Parameters
    ----------
    nx, ny : int
        Image size in pixels.
    ra, dec : float
        Sky position of the image centre (the reference point), degrees.
    pixel_scale : float
        Pixel scale at the reference point, arcsec per pixel.
    sip_amplitude_pix : float
        Displacement by the radial (cubic) SIP term at the radius ``r_norm = max(r_corner,
        1000)`` pixels from the centre, i.e. at the chip corners for chips of 1414 x 1414
        pixels or more (smaller chips see the same optics, so less distortion).  The quadratic
        terms add up to about 40% of that again, in other directions.  0 gives a pure TAN
        projection (still labelled ``-SIP``, with zero coefficients).

    Returns
    -------
    astropy.wcs.WCS
        CTYPE ``RA---TAN-SIP`` / ``DEC--TAN-SIP``, CRPIX at the image centre, no AP/BP (astropy
        inverts the distortion iteratively; see `world_to_pixel`).
    """
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN-SIP", "DEC--TAN-SIP"]
    wcs.wcs.crpix = [(nx + 1) / 2.0, (ny + 1) / 2.0]
    wcs.wcs.crval = [ra, dec]
    scale = pixel_scale / 3600.0
    wcs.wcs.cd = np.array([[-scale, 0.0], [0.0, scale]])
    wcs.wcs.radesys = "ICRS"
    wcs.wcs.equinox = 2000.0
    r_norm = max(np.hypot((nx - 1) / 2.0, (ny - 1) / 2.0), _SIP_MIN_RADIUS)
    a = np.zeros((4, 4))
    b = np.zeros((4, 4))
    k = sip_amplitude_pix / r_norm**3
    a[3, 0] = a[1, 2] = k          # du = k u (u^2 + v^2)
    b[2, 1] = b[0, 3] = k          # dv = k v (u^2 + v^2)
    for (p, q), (ca, cb) in _SIP_QUADRATIC.items():
        a[p, q] = ca * sip_amplitude_pix / r_norm**2
        b[p, q] = cb * sip_amplitude_pix / r_norm**2
    wcs.sip = Sip(a, b, None, None, wcs.wcs.crpix)
    wcs.pixel_shape = (nx, ny)
    wcs.wcs.set()
    return wcs


def make_header_wcs(true_wcs: WCS, *, pointing_error_arcsec: float, rotation_error_deg: float,
                    rng: np.random.Generator) -> WCS:
    """A plain TAN WCS as a telescope header would give it: no distortion, wrong pointing.

    Parameters
    ----------
    true_wcs : astropy.wcs.WCS
        The true WCS (from `make_true_wcs`).
    pointing_error_arcsec : float
        Angular distance between the header's and the true reference point, arcsec.  Its
        direction is drawn uniformly from ``rng``.
    rotation_error_deg : float
        The header's position angle of the pixel y axis minus the true one, degrees (positive:
        turned from north towards east).
    rng : numpy.random.Generator
        Draws the direction of the pointing error.

    Returns
    -------
    astropy.wcs.WCS
        CTYPE ``RA---TAN`` / ``DEC--TAN`` with the same CRPIX and pixel scale as ``true_wcs``.
    """
    direction = rng.uniform(0.0, 360.0)
    centre = SkyCoord(*true_wcs.wcs.crval, unit="deg")
    shifted = centre.directional_offset_by(direction * u.deg, pointing_error_arcsec * u.arcsec)
    theta = np.deg2rad(rotation_error_deg)
    rotation = np.array([[np.cos(theta), np.sin(theta)], [-np.sin(theta), np.cos(theta)]])
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crpix = true_wcs.wcs.crpix
    wcs.wcs.crval = [shifted.ra.deg, shifted.dec.deg]
    wcs.wcs.cd = rotation @ true_wcs.wcs.cd
    wcs.wcs.radesys = "ICRS"
    wcs.wcs.equinox = 2000.0
    wcs.pixel_shape = true_wcs.pixel_shape
    wcs.wcs.set()
    return wcs


def tangent_offsets_to_radec(ra0: float | np.ndarray, dec0: float | np.ndarray, xi: np.ndarray,
                             eta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sky positions of gnomonic tangent-plane offsets from ``(ra0, dec0)``.

    Parameters
    ----------
    ra0, dec0 : float or numpy.ndarray
        Tangent point(s), degrees (arrays broadcast against ``xi`` and ``eta``).
    xi, eta : numpy.ndarray
        Offsets in arcsec, ``xi`` towards the east and ``eta`` towards the north.

    Returns
    -------
    ra, dec : numpy.ndarray
        Degrees, RA in [0, 360).
    """
    xi_r = np.deg2rad(np.asarray(xi, dtype=float) / 3600.0)
    eta_r = np.deg2rad(np.asarray(eta, dtype=float) / 3600.0)
    d0 = np.deg2rad(dec0)
    denom = np.cos(d0) - eta_r * np.sin(d0)
    ra = np.rad2deg(np.deg2rad(ra0) + np.arctan2(xi_r, denom)) % 360.0
    dec = np.rad2deg(np.arctan2(eta_r * np.cos(d0) + np.sin(d0), np.hypot(xi_r, denom)))
    return ra, dec


def world_to_pixel(wcs: WCS, ra: np.ndarray, dec: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """0-based pixel positions of sky positions, distortion included, to 1e-8 pixel.

    Parameters
    ----------
    wcs : astropy.wcs.WCS
        Any celestial WCS, with or without SIP.
    ra, dec : numpy.ndarray
        Degrees.

    Returns
    -------
    x, y : numpy.ndarray
        0-based pixel coordinates, shape of ``ra``.
    """
    ra = np.atleast_1d(np.asarray(ra, dtype=float))
    dec = np.atleast_1d(np.asarray(dec, dtype=float))
    if ra.size == 0:
        return np.zeros(0), np.zeros(0)
    x, y = wcs.all_world2pix(ra, dec, 0, tolerance=1e-8, maxiter=50)
    return np.asarray(x, dtype=float), np.asarray(y, dtype=float)


def local_jacobian(wcs: WCS, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Local linear map from pixel offsets to tangent-plane offsets at given pixels.

    Parameters
    ----------
    wcs : astropy.wcs.WCS
        Celestial WCS (distortion included).
    x, y : numpy.ndarray
        0-based pixel positions, shape (n,).

    Returns
    -------
    numpy.ndarray
        Shape (n, 2, 2): ``J[i] @ (dx, dy) = (dxi, deta)`` in arcsec, ``xi`` east, ``eta`` north.
    """
    x = np.atleast_1d(np.asarray(x, dtype=float))
    y = np.atleast_1d(np.asarray(y, dtype=float))
    h = 0.5
    points_x = np.concatenate([x - h, x + h, x, x])
    points_y = np.concatenate([y, y, y - h, y + h])
    ra, dec = wcs.all_pix2world(points_x, points_y, 0)
    ra = ra.reshape(4, -1)
    dec = dec.reshape(4, -1)
    cos_dec = np.cos(np.deg2rad(dec.mean(axis=0)))
    dra = ((ra[[1, 3]] - ra[[0, 2]] + 180.0) % 360.0 - 180.0) * cos_dec * 3600.0 / (2 * h)
    ddec = (dec[[1, 3]] - dec[[0, 2]]) * 3600.0 / (2 * h)
    jac = np.empty((x.size, 2, 2))
    jac[:, 0, 0], jac[:, 0, 1] = dra[0], dra[1]
    jac[:, 1, 0], jac[:, 1, 1] = ddec[0], ddec[1]
    return jac


def mjd_to_julian_year(mjd: float) -> float:
    """Julian epoch (e.g. 2016.0) of a Modified Julian Date; J2000.0 is MJD 51544.5.

    Parameters
    ----------
    mjd : float
        Modified Julian Date.

    Returns
    -------
    float
        Julian year, the time scale of Gaia's ``ref_epoch``.
    """
    return 2000.0 + (mjd - 51544.5) / 365.25


@contextlib.contextmanager
def rotated_true_wcs(rotation_deg: float):
    """Within the block, `improc.simulator` makes true WCSs whose sky axes are turned by
    ``rotation_deg`` (the simulator has no rotation parameter; tests and benchmarks of alignment
    need a rotated pair).  Yields the WCS maker, e.g. to place transients in the rotated frame."""
    import improc.sim_wcs as module

    original = module.make_true_wcs

    def make(nx, ny, **kwargs):
        wcs = original(nx, ny, **kwargs)
        theta = np.deg2rad(rotation_deg)
        turn = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
        wcs.wcs.cd = turn @ wcs.wcs.cd
        wcs.wcs.set()
        return wcs

    module.make_true_wcs = make
    try:
        yield make
    finally:
        module.make_true_wcs = original
