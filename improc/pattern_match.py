"""Match detected sources to a reference catalog when the header WCS is only roughly right.

Sources are put on the sky with the guessed WCS and both lists are projected onto one tangent
plane (gnomonic, arcsec, +xi east, +eta north).  There they differ by a similarity transform
(shift, rotation and a scale close to 1) plus small distortions.  The transform is found by
triangle matching (Groth 1986; Valdes et al. 1995): triangles of each bright star with pairs of
its nearest bright neighbours are compared by their shape (side ratios) and by the direction of
their longest side, each pair of similar triangles proposes a transform, the proposals vote,
and the best-supported proposals are checked by counting how many bright stars they match.
All sources are then matched one-to-one (mutual nearest neighbours) with a shrinking radius,
refitting an affine transform at each step.

`match_few_stars` matches fields with too few stars for triangles (1 to ~10) by brute force
over pairs of stars, and refuses matches that another set of pairs fits equally well.

`AstrometryError` lives here because matching is the first step that can fail; it is re-exported
by `improc.astrometry`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from astropy.wcs import WCS
from scipy.spatial import cKDTree

from improc.errors import BadDataError

__all__ = [
    "AstrometryError",
    "SimilarityTransform",
    "MatchResult",
    "tangent_plane",
    "from_tangent_plane",
    "mutual_nearest",
    "match_to_catalog",
    "match_few_stars",
]

_ARCSEC = 3600.0
#: Shortest longest side of a triangle used for matching, arcsec: shorter ones change shape
#: too much with centroid errors and uncorrected distortion.
_MIN_SIDE_ARCSEC = 10.0


class AstrometryError(BadDataError):
    """Astrometric calibration failed; the message carries the numbers (matches, rms, limits)."""


@dataclass(frozen=True)
class SimilarityTransform:
    """The correction that carries sources placed by the guessed WCS onto the catalog.

    In the tangent plane at ``tangent_point`` (arcsec, +x east, +y north), with z = x + i y:
    ``z_catalog = scale * exp(i * rotation) * z_source + shift``.

    Attributes
    ----------
    shift_arcsec : tuple of float
        (east, north) shift at the tangent point, arcsec.
    rotation_deg : float
        Counter-clockwise rotation (east towards north), degrees.
    scale : float
        Scale factor (1 when the guessed pixel scale is right).
    tangent_point : tuple of float
        (ra, dec) of the tangent point in degrees: the guessed sky position of the centre of the
        sources' bounding box.
    """

    shift_arcsec: tuple[float, float]
    rotation_deg: float
    scale: float
    tangent_point: tuple[float, float]


@dataclass(frozen=True)
class MatchResult:
    """One-to-one matches between sources and catalog stars.

    Attributes
    ----------
    source_index, catalog_index : numpy.ndarray
        int arrays of equal length k: source ``source_index[j]`` is catalog star
        ``catalog_index[j]`` (indices into the caller's arrays).
    residual_arcsec : numpy.ndarray
        Shape (k,) distance of each pair after the final affine correction of the guessed WCS.
    transform : SimilarityTransform
        The similarity transform that best maps the matched sources onto their catalog stars.
    n_votes : int
        Number of triangle pairs that voted for the transform found by pattern matching.
    """

    source_index: np.ndarray
    catalog_index: np.ndarray
    residual_arcsec: np.ndarray
    transform: SimilarityTransform
    n_votes: int


def tangent_plane(ra: np.ndarray, dec: np.ndarray, ra0: float, dec0: float) -> tuple[np.ndarray, np.ndarray]:
    """Gnomonic (TAN) projection of (ra, dec) about (ra0, dec0), all in degrees.

    Returns
    -------
    xi, eta : numpy.ndarray
        Standard coordinates in degrees (+xi east, +eta north); NaN for points 90 degrees or
        more from the tangent point.
    """
    a, d = np.radians(ra) - np.radians(ra0), np.radians(dec)
    d0 = np.radians(dec0)
    cos_c = np.sin(d0) * np.sin(d) + np.cos(d0) * np.cos(d) * np.cos(a)
    cos_c = np.where(cos_c > 0, cos_c, np.nan)
    xi = np.cos(d) * np.sin(a) / cos_c
    eta = (np.cos(d0) * np.sin(d) - np.sin(d0) * np.cos(d) * np.cos(a)) / cos_c
    return np.degrees(xi), np.degrees(eta)


def from_tangent_plane(xi: np.ndarray, eta: np.ndarray, ra0: float,
                       dec0: float) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of `tangent_plane`: standard coordinates (degrees) back to (ra, dec) in degrees."""
    x, y, d0 = np.radians(xi), np.radians(eta), np.radians(dec0)
    denom = np.cos(d0) - y * np.sin(d0)
    dec = np.arctan2(np.sin(d0) + y * np.cos(d0), np.hypot(x, denom))
    ra = np.radians(ra0) + np.arctan2(x, denom)
    return np.mod(np.degrees(ra), 360.0), np.degrees(dec)


def mutual_nearest(src: np.ndarray, cat: np.ndarray, radius: float, *,
                   cat_tree: cKDTree | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One-to-one matches: pairs that are each other's nearest neighbour and closer than radius.

    Parameters
    ----------
    src, cat : numpy.ndarray
        Shapes (n, 2) and (m, 2), same units as ``radius``.
    cat_tree : scipy.spatial.cKDTree, optional
        A tree of ``cat`` already built (callers that match many times against one catalog).

    Returns
    -------
    i_src, i_cat, dist : numpy.ndarray
        Matched indices into ``src`` and ``cat``, and their distances.
    """
    if len(src) == 0 or len(cat) == 0:
        empty = np.zeros(0, dtype=int)
        return empty, empty, np.zeros(0)
    d_sc, j_sc = (cat_tree if cat_tree is not None else cKDTree(cat)).query(src, distance_upper_bound=radius)
    _, j_cs = cKDTree(src).query(cat, distance_upper_bound=radius)
    i_src = np.flatnonzero(np.isfinite(d_sc))
    i_cat = j_sc[i_src]
    mutual = j_cs[i_cat] == i_src
    return i_src[mutual], i_cat[mutual], d_sc[i_src[mutual]]


def _triangles(points: np.ndarray, k: int = 6) -> np.ndarray:
    """Index triples (t, 3): each point with every pair of its k nearest neighbours, deduplicated."""
    n = len(points)
    k = min(k, n - 1)
    if k < 2:
        return np.zeros((0, 3), dtype=int)
    _, nn = cKDTree(points).query(points, k=k + 1)
    a, b = np.triu_indices(k, 1)
    tri = np.column_stack([np.repeat(np.arange(n), len(a)), nn[:, 1:][:, a].ravel(), nn[:, 1:][:, b].ravel()])
    return np.unique(np.sort(tri, axis=1), axis=0)


def _describe(points: np.ndarray, tri: np.ndarray, tol: float, rot_weight: float, min_side: float):
    """Triangles with vertices ordered by opposite side (longest first) and their descriptors.

    Descriptor: (mid/long, short/long, w cos phi, w sin phi), phi the direction of the longest
    side.  Triangles that are too small, or whose sides are too close in length to order them
    reliably, are dropped.
    """
    v = points[tri]  # (t, 3, 2)
    sides = np.stack([np.hypot(*(v[:, 1] - v[:, 2]).T), np.hypot(*(v[:, 0] - v[:, 2]).T),
                      np.hypot(*(v[:, 0] - v[:, 1]).T)], axis=1)  # side opposite each vertex
    order = np.argsort(-sides, axis=1)
    s = np.take_along_axis(sides, order, axis=1)
    tri = np.take_along_axis(tri, order, axis=1)
    gap = 2 * tol * s[:, 0]
    keep = (s[:, 0] >= min_side) & (s[:, 0] - s[:, 1] > gap) & (s[:, 1] - s[:, 2] > gap)
    tri, s = tri[keep], s[keep]
    longest = points[tri[:, 2]] - points[tri[:, 1]]  # the side opposite vertex 0
    phi = np.arctan2(longest[:, 1], longest[:, 0])
    desc = np.column_stack([s[:, 1] / s[:, 0], s[:, 2] / s[:, 0],
                            rot_weight * np.cos(phi), rot_weight * np.sin(phi)])
    return tri, desc


def _fit_similarity(zs: np.ndarray, zc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares w, t with zc = w zs + t along the last axis (complex arrays)."""
    ms, mc = zs.mean(axis=-1, keepdims=True), zc.mean(axis=-1, keepdims=True)
    w = np.sum((zc - mc) * np.conj(zs - ms), axis=-1) / np.sum(np.abs(zs - ms) ** 2, axis=-1)
    return w, mc[..., 0] - w * ms[..., 0]


def _candidate_transforms(src: np.ndarray, cat: np.ndarray, *, max_offset: float, max_rotation: float,
                          max_scale_error: float, tol: float = 0.01):
    """Transforms proposed by pairs of similar triangles.

    Returns w, t (complex: z_cat = w z_src + t), the votes for each proposal (how many
    proposals agree with it within ``vote_radius``), their vote-space coordinates and that radius.
    """
    rot_weight = tol / (2.0 * np.sin(max(max_rotation, 1e-3) / 2.0))
    tri_s, desc_s = _describe(src, _triangles(src), tol, rot_weight, _MIN_SIDE_ARCSEC)
    tri_c, desc_c = _describe(cat, _triangles(cat), tol, rot_weight, _MIN_SIDE_ARCSEC)
    if len(tri_s) == 0 or len(tri_c) == 0:
        return np.zeros(0, complex), np.zeros(0, complex), np.zeros(0, int), np.zeros((0, 4)), 1.0
    pairs = cKDTree(desc_s).sparse_distance_matrix(cKDTree(desc_c), 2.0 * tol, output_type="ndarray")
    zs = (src[:, 0] + 1j * src[:, 1])[tri_s[pairs["i"]]]
    zc = (cat[:, 0] + 1j * cat[:, 1])[tri_c[pairs["j"]]]
    w, t = _fit_similarity(zs, zc)
    worst = np.max(np.abs(w[:, None] * zs + t[:, None] - zc), axis=1) if len(zs) else np.zeros(0)
    ok = ((np.abs(np.angle(w)) <= max_rotation) & (np.abs(np.abs(w) - 1.0) <= max_scale_error)
          & (np.abs(t) <= max_offset) & (worst <= 3.0 * tol * np.abs(zs[:, 0] - zs[:, 1])))
    w, t = w[ok], t[ok]
    # Vote space: shift, and rotation and scale error as displacements at the field's edge (arcsec).
    edge = np.max(np.hypot(src[:, 0], src[:, 1]))
    params = np.column_stack([t.real, t.imag, edge * np.angle(w), edge * (np.abs(w) - 1.0)])
    vote_radius = max(2.0, 0.05 * max_offset)
    votes = (cKDTree(params).query_ball_point(params, r=vote_radius, return_length=True) if len(w)
             else np.zeros(0, int))
    return w, t, votes, params, vote_radius


def _best_transform(src: np.ndarray, cat: np.ndarray, verify_src: np.ndarray, verify_cat: np.ndarray, *,
                    max_offset: float, max_rotation: float, max_scale_error: float,
                    verify_radius: float, n_clusters: int = 5) -> tuple[complex, complex, int]:
    """The proposal (w, t) that matches the most of ``verify_src`` to ``verify_cat``, and its votes.

    Proposals are taken in order of votes, skipping those within the vote radius of one already
    taken, so that ``n_clusters`` distinct transforms are checked.
    """
    w, t, votes, params, vote_radius = _candidate_transforms(
        src, cat, max_offset=max_offset, max_rotation=max_rotation, max_scale_error=max_scale_error)
    if len(w) == 0:
        raise AstrometryError(
            f"pattern matching found no pair of similar triangles within {max_offset:.0f}\" shift and "
            f"{np.degrees(max_rotation):.1f} deg rotation among {len(src)} bright sources and "
            f"{len(cat)} bright catalog stars")
    taken: list[int] = []
    for idx in np.argsort(-votes, kind="stable"):
        if all(np.linalg.norm(params[idx] - params[j]) > vote_radius for j in taken):
            taken.append(idx)
            if len(taken) == n_clusters:
                break
    zsrc = verify_src[:, 0] + 1j * verify_src[:, 1]
    n_matched = []
    for idx in taken:
        moved = w[idx] * zsrc + t[idx]
        n_matched.append(len(mutual_nearest(np.column_stack([moved.real, moved.imag]), verify_cat,
                                            verify_radius)[0]))
    best = taken[int(np.argmax(n_matched))]
    if max(n_matched) < 3:
        raise AstrometryError(f"the best pattern-matching transform matches only {max(n_matched)} of "
                              f"{len(verify_src)} bright sources within {verify_radius:.1f}\", need >= 3")
    return w[best], t[best], int(votes[best])


def _fit_affine(src: np.ndarray, cat: np.ndarray) -> np.ndarray:
    """(3, 2) matrix M with cat ~= [x, y, 1] @ M, by least squares."""
    design = np.column_stack([src, np.ones(len(src))])
    return np.linalg.lstsq(design, cat, rcond=None)[0]


def _project(x, y, flux, cat_ra, cat_dec, wcs_guess: WCS):
    """Sources (placed by the guessed WCS) and catalog stars in one tangent plane, arcsec.

    Returns the indices of the finite sources and catalog stars, their (k, 2) positions, and the
    tangent point: the guessed sky position of the centre of the sources' bounding box.
    """
    good_s = np.flatnonzero(np.isfinite(x) & np.isfinite(y) & np.isfinite(flux))
    good_c = np.flatnonzero(np.isfinite(cat_ra) & np.isfinite(cat_dec))
    if len(good_s) < 3 or len(good_c) < 3:
        raise AstrometryError(f"need at least 3 sources and 3 catalog stars with finite positions, "
                              f"got {len(good_s)} and {len(good_c)}")
    xc, yc = 0.5 * (x[good_s].min() + x[good_s].max()), 0.5 * (y[good_s].min() + y[good_s].max())
    ra0, dec0 = (float(v[0]) for v in wcs_guess.all_pix2world([xc], [yc], 0))
    src = np.column_stack(tangent_plane(*wcs_guess.all_pix2world(x[good_s], y[good_s], 0), ra0, dec0))
    cat = np.column_stack(tangent_plane(cat_ra[good_c], cat_dec[good_c], ra0, dec0))
    on_sky = np.all(np.isfinite(cat), axis=1)  # drops stars 90 degrees or more away
    return good_s, good_c[on_sky], src * _ARCSEC, cat[on_sky] * _ARCSEC, (ra0, dec0)


def _refine(src: np.ndarray, moved: np.ndarray, cat: np.ndarray, start_radius: float, radius: float):
    """One-to-one matching with a radius shrinking from start_radius to radius, refitting an affine
    transform of ``src`` at each step (``moved`` is ``src`` after the pattern-matching transform)."""
    current = moved
    with_one = np.column_stack([src, np.ones(len(src))])
    for r in np.geomspace(max(start_radius, radius), radius, 4):
        i_s, i_c, _ = mutual_nearest(current, cat, r)
        if len(i_s) < 3:
            raise AstrometryError(f"only {len(i_s)} sources matched catalog stars within {r:.1f}\" after "
                                  f"pattern matching, need >= 3")
        current = with_one @ _fit_affine(src[i_s], cat[i_c])
    return mutual_nearest(current, cat, radius)


def _check_inputs(x, y, flux, cat_ra, cat_dec, cat_mag):
    x, y, flux = (np.asarray(a, dtype=float).ravel() for a in (x, y, flux))
    cat_ra, cat_dec, cat_mag = (np.asarray(a, dtype=float).ravel() for a in (cat_ra, cat_dec, cat_mag))
    if not len(x) == len(y) == len(flux):
        raise ValueError(f"x, y and flux must have the same length, got {len(x)}, {len(y)}, {len(flux)}")
    if not len(cat_ra) == len(cat_dec) == len(cat_mag):
        raise ValueError(f"cat_ra, cat_dec and cat_mag must have the same length, "
                         f"got {len(cat_ra)}, {len(cat_dec)}, {len(cat_mag)}")
    return x, y, flux, cat_ra, cat_dec, cat_mag


#: Windows of catalog stars `match_to_catalog` tries, each half a window fainter than the last.
_CATALOG_WINDOWS = 64


def match_to_catalog(x: np.ndarray, y: np.ndarray, flux: np.ndarray, cat_ra: np.ndarray, cat_dec: np.ndarray,
                     cat_mag: np.ndarray, *, wcs_guess: WCS, max_offset_arcsec: float = 60.0,
                     max_rotation_deg: float = 2.0, max_scale_error: float = 0.02, n_bright: int = 50,
                     match_radius_arcsec: float = 2.0) -> MatchResult:
    """Match sources to catalog stars, tolerating a wrong shift, rotation and scale in the WCS.

    Parameters
    ----------
    x, y : numpy.ndarray
        Shape (n,) 0-based pixel positions of the sources.
    flux : numpy.ndarray
        Shape (n,) source fluxes (any unit); only their order matters.
    cat_ra, cat_dec : numpy.ndarray
        Shape (m,) catalog positions in degrees, at the epoch of the image.
    cat_mag : numpy.ndarray
        Shape (m,) catalog magnitudes (NaN counts as faintest); only their order matters.
    wcs_guess : astropy.wcs.WCS
        The approximate (header) WCS; its distortion terms, if any, are used.
    max_offset_arcsec : float
        Largest shift of the guessed WCS to search for, arcsec.
    max_rotation_deg : float
        Largest rotation of the guessed WCS to search for, degrees.
    max_scale_error : float
        Largest fractional pixel-scale error to accept.
    n_bright : int
        Number of brightest sources used for pattern matching; the catalog contributes its
        brightest stars in the searched area, in proportion to that area (at most 4 n_bright),
        or, when those give no match (saturated in the image), fainter ones: windows each half
        a window fainter, at most `_CATALOG_WINDOWS`.
    match_radius_arcsec : float
        Final radius of the one-to-one matching, arcsec; it should exceed the distortion that
        an affine correction of the guessed WCS leaves.

    Returns
    -------
    MatchResult
        The matches, their residuals and the transform found.

    Raises
    ------
    AstrometryError
        If no consistent transform is found, or fewer than 3 stars match.
    ValueError
        If the array lengths disagree or an option is out of range.
    """
    x, y, flux, cat_ra, cat_dec, cat_mag = _check_inputs(x, y, flux, cat_ra, cat_dec, cat_mag)
    for name, value in (("max_offset_arcsec", max_offset_arcsec), ("max_rotation_deg", max_rotation_deg),
                        ("match_radius_arcsec", match_radius_arcsec), ("n_bright", n_bright)):
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value}")
    good_s, good_c, src, cat, tangent_point = _project(x, y, flux, cat_ra, cat_dec, wcs_guess)

    # Catalog stars that can fall on the image for any allowed transform.
    max_rot = np.radians(max_rotation_deg)
    margin = max_offset_arcsec + np.max(np.hypot(src[:, 0], src[:, 1])) * (max_rot + max_scale_error)
    lo, hi = src.min(axis=0) - margin, src.max(axis=0) + margin
    inside = np.all((cat >= lo) & (cat <= hi), axis=1)
    good_c, cat = good_c[inside], cat[inside]
    if len(good_c) < 3:
        raise AstrometryError(f"only {len(good_c)} catalog stars within {margin:.0f}\" of the sources' "
                              f"footprint, need >= 3")

    # Pattern matching on the brightest stars, at the same density in both lists.
    by_flux = np.argsort(-flux[good_s], kind="stable")
    bright_s = by_flux[:n_bright]
    area_ratio = np.prod(hi - lo) / max(np.prod(src.max(axis=0) - src.min(axis=0)), 1.0)
    n_cat = int(np.clip(round(len(bright_s) * area_ratio), len(bright_s), 4 * n_bright))
    mag = np.where(np.isfinite(cat_mag[good_c]), cat_mag[good_c], np.inf)
    by_mag = np.argsort(mag, kind="stable")
    # The brightest catalog stars may be saturated, hence missing among the sources (a dense
    # field): then the window of catalog stars slides fainter by half a window at a time, so that
    # some window overlaps the brightest unsaturated sources (each try costs ~10-20 ms).
    step = max(n_cat // 2, 1)
    skips = [k * step for k in range(_CATALOG_WINDOWS) if k == 0 or k * step + 3 <= len(by_mag)]
    for number, skip in enumerate(skips):
        bright_c = by_mag[skip:skip + n_cat]
        try:
            w, t, votes = _best_transform(src[bright_s], cat[bright_c], src[by_flux[:4 * n_bright]], cat,
                                          max_offset=max_offset_arcsec, max_rotation=max_rot,
                                          max_scale_error=max_scale_error,
                                          verify_radius=max(match_radius_arcsec, 0.03 * max_offset_arcsec))
            break
        except AstrometryError:
            if number == len(skips) - 1:
                raise
    zs = w * (src[:, 0] + 1j * src[:, 1]) + t
    start = max(3.0 * match_radius_arcsec, 0.1 * max_offset_arcsec)
    i_s, i_c, dist = _refine(src, np.column_stack([zs.real, zs.imag]), cat, start, match_radius_arcsec)
    w_fin, t_fin = _fit_similarity(src[i_s, 0] + 1j * src[i_s, 1], cat[i_c, 0] + 1j * cat[i_c, 1])
    transform = SimilarityTransform(shift_arcsec=(float(t_fin.real), float(t_fin.imag)),
                                    rotation_deg=float(np.degrees(np.angle(w_fin))),
                                    scale=float(np.abs(w_fin)), tangent_point=tangent_point)
    return MatchResult(source_index=good_s[i_s], catalog_index=good_c[i_c], residual_arcsec=dist,
                       transform=transform, n_votes=votes)


# --- few stars ----------------------------------------------------------------------------------

def _project_any(x, y, cat_ra, cat_dec, wcs_guess: WCS):
    """`_project` for any number (>= 1) of sources and catalog stars."""
    good_s = np.flatnonzero(np.isfinite(x) & np.isfinite(y))
    good_c = np.flatnonzero(np.isfinite(cat_ra) & np.isfinite(cat_dec))
    if len(good_s) == 0 or len(good_c) == 0:
        raise AstrometryError(f"need at least 1 source and 1 catalog star with finite positions, "
                              f"got {len(good_s)} and {len(good_c)}")
    xc, yc = 0.5 * (x[good_s].min() + x[good_s].max()), 0.5 * (y[good_s].min() + y[good_s].max())
    ra0, dec0 = (float(v[0]) for v in wcs_guess.all_pix2world([xc], [yc], 0))
    src = np.column_stack(tangent_plane(*wcs_guess.all_pix2world(x[good_s], y[good_s], 0), ra0, dec0))
    cat = np.column_stack(tangent_plane(cat_ra[good_c], cat_dec[good_c], ra0, dec0))
    on_sky = np.all(np.isfinite(cat), axis=1)
    return good_s, good_c[on_sky], src * _ARCSEC, cat[on_sky] * _ARCSEC, (ra0, dec0)


def _rigid_fit(zs: np.ndarray, zc: np.ndarray) -> tuple[float, complex]:
    """Least-squares rotation and shift (scale fixed to 1): zc = exp(i theta) zs + t."""
    ms, mc = zs.mean(), zc.mean()
    theta = float(np.angle(np.sum((zc - mc) * np.conj(zs - ms)))) if len(zs) > 1 else 0.0
    return theta, complex(mc - np.exp(1j * theta) * ms)


def _pair_hypotheses(zs: np.ndarray, zc: np.ndarray, bright: np.ndarray, *, max_offset: float,
                     max_rotation: float, radius: float) -> list[tuple[float, complex]]:
    """(theta, t) proposed by every pair of bright sources whose separation and direction a pair
    of catalog stars repeats (lengths within 2 radius, rotation and shift within the limits)."""
    tree = cKDTree(np.column_stack([zc.real, zc.imag]))
    out = []
    for n_a, a in enumerate(bright):
        reach = max_offset + abs(zs[a]) * max_rotation + radius
        first = np.asarray(tree.query_ball_point([zs[a].real, zs[a].imag], reach), dtype=int)
        for b in bright[n_a + 1:]:
            v = zs[b] - zs[a]
            if abs(v) <= 2.0 * radius or len(first) == 0:
                continue            # too short to measure a rotation
            centres = zc[first] + v
            seconds = tree.query_ball_point(np.column_stack([centres.real, centres.imag]),
                                            abs(v) * max_rotation + 2.0 * radius)
            for k, ls in zip(first, seconds):
                for l_ in ls:
                    if l_ == k or abs(abs(zc[l_] - zc[k]) - abs(v)) > 2.0 * radius:
                        continue
                    theta, t = _rigid_fit(zs[[a, b]], zc[[k, l_]])
                    if abs(theta) <= max_rotation and abs(t) <= max_offset:
                        out.append((theta, t))
    return out


def _single_hypotheses(zs: np.ndarray, zc: np.ndarray, bright: np.ndarray, *,
                       max_offset: float) -> list[tuple[float, complex]]:
    """Pure shifts (theta = 0) carrying one bright source onto one catalog star."""
    tree = cKDTree(np.column_stack([zc.real, zc.imag]))
    return [(0.0, complex(zc[k] - zs[a])) for a in bright
            for k in tree.query_ball_point([zs[a].real, zs[a].imag], max_offset)]


def _settle(theta: float, t: complex, zs: np.ndarray, zc: np.ndarray, *, radius: float, max_offset: float,
            max_rotation: float, n_iter: int = 3, cat_tree: cKDTree | None = None):
    """Mutual-nearest matches within ``radius`` of the sources moved by (theta, t), refitting the
    shift (and, from 2 matches on, the rotation) to them until they no longer change.

    Returns the matched index arrays, the final (theta, t) and the distances, or None when nothing
    matches or the refit leaves the allowed range.
    """
    pts_c = np.column_stack([zc.real, zc.imag])
    if cat_tree is None:
        cat_tree = cKDTree(pts_c)
    previous = None
    for _ in range(n_iter):
        moved = np.exp(1j * theta) * zs + t
        i_s, i_c, dist = mutual_nearest(np.column_stack([moved.real, moved.imag]), pts_c, radius,
                                        cat_tree=cat_tree)
        if len(i_s) == 0:
            return None
        key = (tuple(i_s), tuple(i_c))
        if key == previous:
            break
        previous = key
        theta, t = _rigid_fit(zs[i_s], zc[i_c])
        if abs(theta) > max_rotation or abs(t) > max_offset:
            return None
    moved = np.exp(1j * theta) * zs[i_s] + t
    return i_s, i_c, theta, t, np.abs(moved - zc[i_c])


def match_few_stars(x: np.ndarray, y: np.ndarray, flux: np.ndarray, cat_ra: np.ndarray, cat_dec: np.ndarray,
                    *, wcs_guess: WCS, max_offset_arcsec: float = 60.0, max_rotation_deg: float = 2.0,
                    match_radius_arcsec: float = 2.0, n_bright: int = 10, min_matches: int = 2) -> MatchResult:
    """Match a handful of sources to catalog stars by brute force, refusing ambiguous matches.

    For fields with too few stars for triangle matching (`match_to_catalog`).  Sources placed by
    the guessed WCS and catalog stars are projected onto one tangent plane (as there), where they
    are assumed to differ by a shift (<= ``max_offset_arcsec``) and a rotation
    (<= ``max_rotation_deg``) at the guessed pixel scale.  Every pair of the ``n_bright``
    brightest sources whose separation (within 2 ``match_radius_arcsec``) and direction a pair of
    catalog stars repeats proposes a rotation and shift; with ``min_matches`` 1, every catalog
    star within ``max_offset_arcsec`` of a bright source also proposes a pure shift.  Each
    proposal is settled: the ``4 n_bright`` brightest sources are moved by it and matched one to
    one (mutual nearest neighbours within ``match_radius_arcsec``) to the catalog, the shift and
    rotation (the shift alone for one match) are refitted to the matches, until they no longer
    change.

    **Ambiguity rule**: the largest settled set of source-catalog pairs wins; when two different
    sets are equally large, the data cannot tell which is right and the match is refused.  A
    one-star solution is therefore accepted only when exactly one source-catalog pair is
    possible within the search range (and no proposal matches two stars).

    Parameters
    ----------
    x, y, flux : numpy.ndarray
        Shape (n,): 0-based pixel positions and fluxes (only their order matters) of the sources.
    cat_ra, cat_dec : numpy.ndarray
        Shape (m,): catalog positions in degrees, at the epoch of the image.
    wcs_guess : astropy.wcs.WCS
        The approximate (header) WCS, with its distortion, if any.
    max_offset_arcsec : float
        Largest shift of the guessed WCS (at the centre of the sources), arcsec.
    max_rotation_deg : float
        Largest rotation of the guessed WCS, degrees.
    match_radius_arcsec : float
        Radius of the one-to-one matching, arcsec.
    n_bright : int
        Number of brightest sources that propose transforms (4 times as many verify them).
    min_matches : int
        Fewest matched stars accepted: 2 (shift and rotation) or 1 (a pure shift is accepted
        from a single unambiguous pair).

    Returns
    -------
    MatchResult
        The matches, their residuals, the transform (``scale`` 1; ``rotation_deg`` 0 for a
        single match) and, as ``n_votes``, the number of proposals that settled on the matches.

    Raises
    ------
    AstrometryError
        If nothing matches, fewer than ``min_matches`` stars match, or the match is ambiguous;
        the message says which and gives the numbers.
    ValueError
        If the array lengths disagree or an option is out of range.
    """
    x, y, flux, cat_ra, cat_dec, _ = _check_inputs(x, y, flux, cat_ra, cat_dec, np.zeros(np.size(cat_ra)))
    for name, value in (("max_offset_arcsec", max_offset_arcsec), ("max_rotation_deg", max_rotation_deg),
                        ("match_radius_arcsec", match_radius_arcsec), ("n_bright", n_bright)):
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value}")
    if min_matches not in (1, 2):
        raise ValueError(f"min_matches must be 1 or 2, got {min_matches}")
    finite = np.isfinite(flux)
    good_s, good_c, src, cat, tangent_point = _project_any(np.where(finite, x, np.nan), y, cat_ra, cat_dec,
                                                           wcs_guess)
    max_rot = np.radians(max_rotation_deg)
    by_flux = np.argsort(-flux[good_s], kind="stable")[:4 * n_bright]
    good_s, src = good_s[by_flux], src[by_flux]
    zs, zc = src[:, 0] + 1j * src[:, 1], cat[:, 0] + 1j * cat[:, 1]
    bright = np.arange(min(n_bright, len(zs)))
    limits = dict(max_offset=max_offset_arcsec, max_rotation=max_rot)
    proposals = _pair_hypotheses(zs, zc, bright, radius=match_radius_arcsec, **limits)
    if min_matches == 1:
        proposals += _single_hypotheses(zs, zc, bright, max_offset=max_offset_arcsec)
    settled: dict[tuple, tuple] = {}
    votes: dict[tuple, int] = {}
    cat_tree = cKDTree(np.column_stack([zc.real, zc.imag]))
    for theta, t in proposals:
        result = _settle(theta, t, zs, zc, radius=match_radius_arcsec, cat_tree=cat_tree, **limits)
        if result is not None:
            key = tuple(sorted(zip(result[0].tolist(), result[1].tolist())))
            settled.setdefault(key, result)
            votes[key] = votes.get(key, 0) + 1
    what = (f"{len(bright)} bright sources and {len(zc)} catalog stars within {max_offset_arcsec:.0f}\" shift "
            f"and {max_rotation_deg:g} deg rotation")
    if not settled:
        found = ("no source-catalog match" if min_matches == 1 else
                 "no pair of sources matches a pair of catalog stars (a rotation needs >= 2 matched stars)")
        raise AstrometryError(f"{found} among {what}",
                              figures={"n_sources": len(zs), "n_catalog": len(zc), "n_matches": 0})
    size = max(len(k) for k in settled)
    if size < min_matches:
        raise AstrometryError(f"only {size} source matches a catalog star among {what}, need >= {min_matches}",
                              figures={"n_matches": size, "needed": min_matches})
    best = [k for k in settled if len(k) == size]
    if len(best) > 1:
        examples = "; ".join(", ".join(f"{good_s[i]}->{good_c[j]}" for i, j in k) for k in best[:3])
        raise AstrometryError(f"ambiguous match: {len(best)} different sets of {size} source->catalog pairs "
                              f"(source index->catalog index: {examples}) fit equally well among {what}; "
                              f"refusing to guess", figures={"n_matches": size, "n_alternatives": len(best)})
    i_s, i_c, theta, t, dist = settled[best[0]]
    transform = SimilarityTransform(shift_arcsec=(float(t.real), float(t.imag)),
                                    rotation_deg=float(np.degrees(theta)), scale=1.0, tangent_point=tangent_point)
    return MatchResult(source_index=good_s[i_s], catalog_index=good_c[i_c], residual_arcsec=dist,
                       transform=transform, n_votes=votes[best[0]])
