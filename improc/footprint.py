"""Footprints of images on the sky: corners, bounding boxes, point-in-polygon and overlaps.

A footprint is a spherical polygon given by the RA and Dec (degrees) of its vertices, in order
around the boundary (either direction), joined by great-circle arcs.  Functions take one polygon
as arrays of shape (M,) or many as arrays of shape (N, M); they are exact on the sphere, work
across RA = 0/360 and near the poles, and are vectorized over the polygons.

Exact tests are done in a gnomonic (tangent-plane) projection, which maps great circles to
straight lines: a point is tested in the projection about the point itself, and the overlap of
two polygons is clipped in the projection about the target's centre; the clipped polygon is
mapped back to the sphere and its area computed from spherical excesses.  Every vertex of a
polygon must lie within 90 degrees of the projection centre (footprints smaller than a
hemisphere); polygons that do not are reported as not containing the point / not overlapping.

Bounding boxes follow one rule everywhere: ``minra > maxra`` means the box wraps through
RA = 0 (it covers ``[minra, 360) + [0, maxra]``), and a polygon that contains a pole has
``minra = 0, maxra = 360`` and ``maxdec = 90`` (north) or ``mindec = -90`` (south).  Dec bounds
include the poleward bulge of great-circle edges, so they enclose the whole polygon, not only
its vertices.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from astropy.wcs import WCS

__all__ = [
    "radec_to_xyz", "xyz_to_radec", "angular_distance", "gnomonic", "inverse_gnomonic",
    "corners_from_wcs", "polygon_centers", "polygon_radii", "polygon_bounds", "contains_pole",
    "points_in_polygons", "polygon_areas", "overlap_fractions", "box_polygon",
]

_TINY = 1e-15


def radec_to_xyz(ra: np.ndarray | float, dec: np.ndarray | float) -> np.ndarray:
    """Unit vectors of sky positions.

    Parameters
    ----------
    ra, dec : array_like
        Degrees; broadcast together.

    Returns
    -------
    numpy.ndarray
        Shape ``broadcast_shape + (3,)``.
    """
    ra_r, dec_r = np.radians(ra), np.radians(dec)
    cos_dec = np.cos(dec_r)
    return np.stack(np.broadcast_arrays(cos_dec * np.cos(ra_r), cos_dec * np.sin(ra_r),
                                        np.sin(dec_r)), axis=-1)


def xyz_to_radec(xyz: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """RA in [0, 360) and Dec (degrees) of vectors of shape (..., 3); they need not be unit."""
    xyz = np.asarray(xyz, dtype=float)
    x, y, z = xyz[..., 0], xyz[..., 1], xyz[..., 2]
    ra = np.degrees(np.arctan2(y, x)) % 360.0
    dec = np.degrees(np.arctan2(z, np.hypot(x, y)))
    return ra, dec


def angular_distance(ra1, dec1, ra2, dec2) -> np.ndarray:
    """Great-circle distance in degrees (Vincenty formula, accurate at all separations)."""
    ra1, dec1, ra2, dec2 = (np.radians(np.asarray(v, dtype=float)) for v in (ra1, dec1, ra2, dec2))
    dra = ra2 - ra1
    num = np.hypot(np.cos(dec2) * np.sin(dra),
                   np.cos(dec1) * np.sin(dec2) - np.sin(dec1) * np.cos(dec2) * np.cos(dra))
    den = np.sin(dec1) * np.sin(dec2) + np.cos(dec1) * np.cos(dec2) * np.cos(dra)
    return np.degrees(np.arctan2(num, den))


def _tangent_basis(ra0, dec0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centre, east and north unit vectors of the tangent plane at (ra0, dec0), each (..., 3)."""
    a, d = np.radians(ra0), np.radians(dec0)
    centre = radec_to_xyz(ra0, dec0)
    east = np.stack(np.broadcast_arrays(-np.sin(a), np.cos(a), np.zeros_like(a)), axis=-1)
    north = np.stack(np.broadcast_arrays(-np.sin(d) * np.cos(a), -np.sin(d) * np.sin(a), np.cos(d)),
                     axis=-1)
    return centre, east, north


def gnomonic(ra, dec, ra0, dec0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gnomonic projection of (ra, dec) about (ra0, dec0).

    Parameters
    ----------
    ra, dec : array_like
        Degrees.
    ra0, dec0 : array_like
        Projection centre, degrees; broadcast against ``ra, dec``.

    Returns
    -------
    xi, eta : numpy.ndarray
        Tangent-plane coordinates (radians at the centre): xi towards increasing RA (east), eta
        north.  Meaningless where ``valid`` is False.
    valid : numpy.ndarray of bool
        True where the point is less than 90 degrees from the centre.
    """
    point = radec_to_xyz(ra, dec)
    centre, east, north = _tangent_basis(ra0, dec0)
    cos_c = np.sum(point * centre, axis=-1)
    valid = cos_c > 1e-9
    safe = np.where(valid, cos_c, 1.0)
    return np.sum(point * east, axis=-1) / safe, np.sum(point * north, axis=-1) / safe, valid


def inverse_gnomonic(xi, eta, ra0, dec0) -> tuple[np.ndarray, np.ndarray]:
    """RA, Dec (degrees) of tangent-plane points; the inverse of `gnomonic`."""
    centre, east, north = _tangent_basis(ra0, dec0)
    xi, eta = np.asarray(xi, dtype=float), np.asarray(eta, dtype=float)
    return xyz_to_radec(centre + xi[..., None] * east + eta[..., None] * north)


def corners_from_wcs(shape: tuple[int, int], wcs: WCS) -> tuple[np.ndarray, np.ndarray]:
    """RA and Dec of the four outer corners of an image.

    Parameters
    ----------
    shape : tuple of int
        ``(ny, nx)`` of the image.
    wcs : astropy.wcs.WCS
        Celestial WCS of the image (0-based pixel convention is handled by astropy).

    Returns
    -------
    ra, dec : numpy.ndarray
        Shape (4,), degrees, RA in [0, 360): corners ``00, 10, 11, 01`` in this order (a closed
        path around the image), where corner ``ij`` is at pixel ``x = -0.5`` (i = 0) or
        ``nx - 0.5`` (i = 1) and ``y = -0.5`` (j = 0) or ``ny - 0.5`` (j = 1), i.e. the outer
        edges of the corner pixels.

    Raises
    ------
    ValueError
        If ``shape`` is not two positive integers or the WCS gives non-finite coordinates.
    """
    if len(shape) != 2 or min(shape) < 1:
        raise ValueError(f"shape must be (ny, nx) with positive sizes, got {tuple(shape)}")
    ny, nx = shape
    x = np.array([-0.5, nx - 0.5, nx - 0.5, -0.5])
    y = np.array([-0.5, -0.5, ny - 0.5, ny - 0.5])
    ra, dec = wcs.celestial.pixel_to_world_values(x, y)
    ra, dec = np.asarray(ra, dtype=float) % 360.0, np.asarray(dec, dtype=float)
    if not (np.all(np.isfinite(ra)) and np.all(np.isfinite(dec))):
        raise ValueError(f"the WCS gives non-finite corner coordinates for shape {tuple(shape)}")
    return ra, dec


def _as_polygons(poly_ra, poly_dec) -> tuple[np.ndarray, np.ndarray]:
    ra = np.atleast_2d(np.asarray(poly_ra, dtype=float))
    dec = np.atleast_2d(np.asarray(poly_dec, dtype=float))
    if ra.shape != dec.shape or ra.shape[-1] < 3:
        raise ValueError(f"polygon RA and Dec must have the same shape (N, M) with M >= 3 vertices, "
                         f"got {ra.shape} and {dec.shape}")
    return ra, dec


def polygon_centers(poly_ra, poly_dec) -> tuple[np.ndarray, np.ndarray]:
    """Centre of each polygon: the normalized mean of its vertices' unit vectors.

    Parameters
    ----------
    poly_ra, poly_dec : array_like
        Vertices, degrees, shape (M,) or (N, M).

    Returns
    -------
    ra, dec : numpy.ndarray
        Shape (N,), degrees.
    """
    ra, dec = _as_polygons(poly_ra, poly_dec)
    return xyz_to_radec(radec_to_xyz(ra, dec).sum(axis=-2))


def polygon_radii(poly_ra, poly_dec, ra_c, dec_c) -> np.ndarray:
    """Distance (deg) from each centre to the farthest vertex of its polygon, shape (N,).

    Every point of a convex polygon smaller than a hemisphere lies within this distance.
    """
    ra, dec = _as_polygons(poly_ra, poly_dec)
    ra_c = np.asarray(ra_c, dtype=float).reshape(-1, 1)
    dec_c = np.asarray(dec_c, dtype=float).reshape(-1, 1)
    return angular_distance(ra, dec, ra_c, dec_c).max(axis=-1)


def _edge_dec_extrema(xyz: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Highest and lowest Dec reached inside the great-circle edges of (N, M, 3) polygons."""
    a = xyz
    b = np.roll(xyz, -1, axis=-2)
    normal = np.cross(a, b)
    norm = np.linalg.norm(normal, axis=-1, keepdims=True)
    n_hat = normal / np.where(norm > _TINY, norm, 1.0)
    z = np.array([0.0, 0.0, 1.0])
    top = z - n_hat[..., 2:3] * n_hat           # projection of the pole onto the edge's plane
    top_norm = np.linalg.norm(top, axis=-1, keepdims=True)
    usable = (norm[..., 0] > _TINY) & (top_norm[..., 0] > _TINY)
    top = top / np.where(top_norm > _TINY, top_norm, 1.0)
    highest = np.full(a.shape[:-1], -90.0)
    lowest = np.full(a.shape[:-1], 90.0)
    for sign, out in ((1.0, highest), (-1.0, lowest)):
        p = sign * top
        on_arc = ((np.sum(np.cross(a, p) * normal, axis=-1) >= 0)
                  & (np.sum(np.cross(p, b) * normal, axis=-1) >= 0) & usable)
        dec = np.degrees(np.arcsin(np.clip(p[..., 2], -1.0, 1.0)))
        out[on_arc] = dec[on_arc]
    return highest.max(axis=-1), lowest.min(axis=-1)


def polygon_bounds(poly_ra, poly_dec) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """RA/Dec bounding box of each polygon, with the RA-wrap and pole rules of this module.

    Parameters
    ----------
    poly_ra, poly_dec : array_like
        Vertices, degrees, shape (M,) or (N, M).

    Returns
    -------
    minra, maxra, mindec, maxdec : numpy.ndarray
        Shape (N,), degrees.  ``minra > maxra`` when the polygon straddles RA = 0; a polygon
        containing a pole gets ``minra, maxra = 0, 360`` and a Dec bound of +-90.
    """
    ra, dec = _as_polygons(poly_ra, poly_dec)
    xyz = radec_to_xyz(ra, dec)
    ra_c, _ = xyz_to_radec(xyz.sum(axis=-2))
    offset = (ra - ra_c[:, None] + 180.0) % 360.0 - 180.0
    minra = (ra_c + offset.min(axis=-1)) % 360.0
    maxra = (ra_c + offset.max(axis=-1)) % 360.0
    edge_high, edge_low = _edge_dec_extrema(xyz)
    maxdec = np.maximum(dec.max(axis=-1), edge_high)
    mindec = np.minimum(dec.min(axis=-1), edge_low)
    pole = contains_pole(ra, dec)
    minra[pole != 0] = 0.0
    maxra[pole != 0] = 360.0
    maxdec[pole > 0] = 90.0
    mindec[pole < 0] = -90.0
    return minra, maxra, mindec, maxdec


def contains_pole(poly_ra, poly_dec) -> np.ndarray:
    """+1 where a polygon contains the north pole, -1 the south pole, 0 neither; shape (N,)."""
    ra, dec = _as_polygons(poly_ra, poly_dec)
    north = points_in_polygons(0.0, 90.0, ra, dec)
    south = points_in_polygons(0.0, -90.0, ra, dec)
    return north.astype(int) - south.astype(int)


def points_in_polygons(ra, dec, poly_ra, poly_dec) -> np.ndarray:
    """Whether each polygon contains its point (exact on the sphere).

    Parameters
    ----------
    ra, dec : array_like
        The point(s), degrees: a scalar (the same point for every polygon) or shape (N,).
    poly_ra, poly_dec : array_like
        Vertices, degrees, shape (M,) or (N, M); any simple polygon, convex or not.

    Returns
    -------
    numpy.ndarray of bool
        Shape (N,).  False for polygons with a vertex 90 degrees or more from the point.
        Points exactly on an edge may go either way, but always the same way for the same numbers.
    """
    pra, pdec = _as_polygons(poly_ra, poly_dec)
    ra = np.asarray(ra, dtype=float).reshape(-1, 1)
    dec = np.asarray(dec, dtype=float).reshape(-1, 1)
    x, y, valid = gnomonic(pra, pdec, ra, dec)
    x2, y2 = np.roll(x, -1, axis=-1), np.roll(y, -1, axis=-1)
    straddles = (y > 0) != (y2 > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        x_cross = x + (0.0 - y) * (x2 - x) / (y2 - y)
    crossings = np.sum(straddles & (x_cross > 0), axis=-1)
    return (crossings % 2 == 1) & valid.all(axis=-1)


def _fan_areas(xyz: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Areas (sr) of convex polygons (N, W, 3) with ``counts`` valid leading vertices each."""
    n_poly, width = xyz.shape[:2]
    if width < 3:
        return np.zeros(n_poly)
    v0 = xyz[:, :1, :]
    vi, vj = xyz[:, 1:-1, :], xyz[:, 2:, :]
    triple = np.abs(np.sum(v0 * np.cross(vi, vj), axis=-1))
    den = 1.0 + np.sum(v0 * vi, axis=-1) + np.sum(vi * vj, axis=-1) + np.sum(vj * v0, axis=-1)
    excess = 2.0 * np.arctan2(triple, den)
    use = (np.arange(2, width)[None, :] < counts[:, None])
    return np.sum(np.where(use, excess, 0.0), axis=-1)


def polygon_areas(poly_ra, poly_dec) -> np.ndarray:
    """Solid angle (square degrees) of convex spherical polygons, shape (N,)."""
    ra, dec = _as_polygons(poly_ra, poly_dec)
    xyz = radec_to_xyz(ra, dec)
    counts = np.full(ra.shape[0], ra.shape[1])
    return _fan_areas(xyz, counts) * np.degrees(1.0) ** 2


def _clip_half_plane(px, py, counts, ax, ay, bx, by):
    """Sutherland-Hodgman step: keep the part of each polygon left of the line a -> b."""
    n_poly, width = px.shape
    idx = np.arange(width)[None, :]
    valid = idx < counts[:, None]
    nxt = (idx + 1) % np.maximum(counts, 1)[:, None]
    qx, qy = np.take_along_axis(px, nxt, axis=1), np.take_along_axis(py, nxt, axis=1)
    ex, ey = bx - ax, by - ay
    side_p = ex * (py - ay) - ey * (px - ax)
    side_q = ex * (qy - ay) - ey * (qx - ax)
    in_p, in_q = side_p >= 0, side_q >= 0
    with np.errstate(divide="ignore", invalid="ignore"):
        t = side_p / (side_p - side_q)
        ix, iy = px + t * (qx - px), py + t * (qy - py)
    # Each edge p -> q emits the crossing point (if it crosses) then q (if q is inside).
    out_x = np.stack([ix, qx], axis=2).reshape(n_poly, 2 * width)
    out_y = np.stack([iy, qy], axis=2).reshape(n_poly, 2 * width)
    keep = np.stack([(in_p != in_q) & valid, in_q & valid], axis=2).reshape(n_poly, 2 * width)
    order = np.argsort(~keep, axis=1, kind="stable")
    new_counts = keep.sum(axis=1)
    new_width = max(int(new_counts.max(initial=0)), 1)
    order = order[:, :new_width]
    used = np.arange(new_width)[None, :] < new_counts[:, None]
    return (np.where(used, np.take_along_axis(out_x, order, axis=1), 0.0),
            np.where(used, np.take_along_axis(out_y, order, axis=1), 0.0), new_counts)


def overlap_fractions(poly_ra, poly_dec, target_ra, target_dec, *,
                      of: Literal["target", "polygon"] = "target") -> np.ndarray:
    """Fraction of the target's (or each polygon's) area covered by their intersection.

    Parameters
    ----------
    poly_ra, poly_dec : array_like
        Vertices of N polygons, degrees, shape (M,) or (N, M); convex.
    target_ra, target_dec : array_like
        Vertices of one convex target polygon, degrees, shape (K,).
    of : {"target", "polygon"}
        Divide the intersection's area by the target's area ("target") or by each polygon's
        area ("polygon").

    Returns
    -------
    numpy.ndarray
        Shape (N,), in [0, 1].  Polygons with a vertex 90 degrees or more from the target's
        centre count as not overlapping.

    Raises
    ------
    ValueError
        If ``of`` is not one of the two choices, or the target is degenerate or has a vertex
        90 degrees or more from its centre.
    """
    if of not in ("target", "polygon"):
        raise ValueError(f"of must be 'target' or 'polygon', got {of!r}")
    ra, dec = _as_polygons(poly_ra, poly_dec)
    t_ra, t_dec = _as_polygons(target_ra, target_dec)
    ra0, dec0 = (float(v[0]) for v in polygon_centers(t_ra, t_dec))
    tx, ty, t_valid = gnomonic(t_ra[0], t_dec[0], ra0, dec0)
    if not t_valid.all():
        raise ValueError("the target polygon must lie within 90 degrees of its centre")
    signed = 0.5 * np.sum(tx * np.roll(ty, -1) - np.roll(tx, -1) * ty)
    if abs(signed) < _TINY:
        raise ValueError("the target polygon has zero area")
    if signed < 0:
        tx, ty = tx[::-1], ty[::-1]
    px, py, valid = gnomonic(ra, dec, ra0, dec0)
    usable = valid.all(axis=-1)
    counts = np.where(usable, ra.shape[1], 0)
    px, py = np.where(valid, px, 0.0), np.where(valid, py, 0.0)
    for k in range(len(tx)):
        px, py, counts = _clip_half_plane(px, py, counts, tx[k], ty[k],
                                          tx[(k + 1) % len(tx)], ty[(k + 1) % len(tx)])
    centre, east, north = _tangent_basis(ra0, dec0)
    xyz = centre + px[..., None] * east + py[..., None] * north
    xyz /= np.linalg.norm(xyz, axis=-1, keepdims=True)
    inter = _fan_areas(xyz, counts) * np.degrees(1.0) ** 2
    denominator = polygon_areas(t_ra, t_dec) if of == "target" else polygon_areas(ra, dec)
    with np.errstate(divide="ignore", invalid="ignore"):
        fraction = np.where(denominator > 0, inter / denominator, 0.0)
    return np.clip(fraction, 0.0, 1.0)


def box_polygon(minra: float, maxra: float, mindec: float, maxdec: float) -> tuple[np.ndarray, np.ndarray]:
    """The four corners of an RA/Dec box as a polygon (great-circle edges).

    Parameters
    ----------
    minra, maxra, mindec, maxdec : float
        Degrees; ``minra > maxra`` means the box wraps through RA = 0.

    Returns
    -------
    ra, dec : numpy.ndarray
        Shape (4,): (minra, mindec), (maxra, mindec), (maxra, maxdec), (minra, maxdec).

    Raises
    ------
    ValueError
        If ``mindec >= maxdec``, a Dec is outside [-90, 90], or the box spans 180 degrees of RA
        or more (such a box is not a polygon smaller than a hemisphere).
    """
    if not (-90.0 <= mindec < maxdec <= 90.0):
        raise ValueError(f"box needs -90 <= mindec < maxdec <= 90, got mindec={mindec}, maxdec={maxdec}")
    span = (maxra - minra) % 360.0
    if span <= 0.0 or span >= 180.0:
        raise ValueError(f"box RA span must be between 0 and 180 degrees, got minra={minra}, "
                         f"maxra={maxra} (span {span} deg)")
    ra = np.array([minra, maxra, maxra, minra], dtype=float) % 360.0
    dec = np.array([mindec, mindec, maxdec, maxdec], dtype=float)
    return ra, dec
