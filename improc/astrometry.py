"""Astrometric calibration: fit a TAN-SIP WCS to sources matched to a reference catalog.

`solve_astrometry` is the usual entry point: it matches sources to catalog stars with
`match_to_catalog` (which tolerates a header WCS off by tens of arcsec and a degree or two),
fits a TAN-SIP WCS with `fit_wcs`, re-matches all sources with the fitted WCS and refits.

The fit is a direct linear least-squares problem.  With ``u, v`` the pixel offsets from CRPIX and
``xi, eta`` the gnomonic (standard) coordinates of the catalog stars about CRVAL, the SIP model

    (xi, eta) = CD @ (u + A(u, v), v + B(u, v))

is, written out, a pair of polynomials of total order ``sip_order`` in ``u, v`` whose linear
terms are CD and whose higher terms are CD @ (A, B).  Both polynomials are fitted (with a
constant term), CRVAL is moved to absorb the constant term and the fit repeated until the
constant vanishes, with sigma clipping of outliers around it.  The inverse polynomials AP, BP
(used by other software to go from sky to pixels), of order ``sip_order + 2``, are fitted on a
grid covering the image (they invert A, B to ~1e-3 pixel).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from astropy.wcs import WCS, Sip

from improc.pattern_match import (
    AstrometryError,
    MatchResult,
    SimilarityTransform,
    from_tangent_plane,
    match_to_catalog,
    mutual_nearest,
    tangent_plane,
)

__all__ = [
    "AstrometryError",
    "MatchResult",
    "SimilarityTransform",
    "WcsFit",
    "AstrometrySolution",
    "propagate_proper_motion",
    "match_to_catalog",
    "fit_wcs",
    "solve_astrometry",
]

_ARCSEC = 3600.0
_MAS_PER_DEG = 3.6e6


@dataclass(frozen=True)
class WcsFit:
    """Result of `fit_wcs`.

    Attributes
    ----------
    wcs : astropy.wcs.WCS
        The fitted WCS (0-based pixels in astropy calls with origin 0), CTYPE ``RA---TAN-SIP``
        with A, B, AP, BP when ``sip_order >= 2``, else ``RA---TAN``.
    rms_arcsec : float
        Root mean square of the on-sky distance between fitted and catalog positions of the
        stars used (radial rms; the per-axis scatter is this over sqrt(2)).
    n_stars : int
        Number of stars used in the final fit.
    used : numpy.ndarray
        Shape (n,) bool, the stars kept by sigma clipping.
    residuals_arcsec : numpy.ndarray
        Shape (n,) on-sky distance of every star (used or not) from its fitted position; NaN for
        stars with non-finite inputs.
    sip_order : int
        Polynomial order of the fit (1 means a pure TAN projection).
    """

    wcs: WCS
    rms_arcsec: float
    n_stars: int
    used: np.ndarray
    residuals_arcsec: np.ndarray
    sip_order: int


@dataclass(frozen=True)
class AstrometrySolution:
    """Result of `solve_astrometry`.

    Attributes
    ----------
    wcs : astropy.wcs.WCS
        The fitted WCS.
    source_index, catalog_index : numpy.ndarray
        Final one-to-one matches (indices into the caller's source and catalog arrays) that
        entered the fit; ``fit.used`` tells which survived clipping.
    fit : WcsFit
        The final fit.
    initial_match : MatchResult
        The matching done with the guessed WCS (its ``transform`` says how wrong that WCS was).
    """

    wcs: WCS
    source_index: np.ndarray
    catalog_index: np.ndarray
    fit: WcsFit
    initial_match: MatchResult

    @property
    def rms_arcsec(self) -> float:
        """Radial rms of the final fit, arcsec."""
        return self.fit.rms_arcsec

    @property
    def n_matches(self) -> int:
        """Number of stars used in the final fit."""
        return self.fit.n_stars


def propagate_proper_motion(ra: np.ndarray, dec: np.ndarray, pmra: np.ndarray, pmdec: np.ndarray, *,
                            from_epoch: float | np.ndarray, to_epoch: float) -> tuple[np.ndarray, np.ndarray]:
    """Move catalog positions along their proper motions to another epoch.

    The motion is a straight line in the tangent plane at each star, which is exact to far below
    a milliarcsecond for decades of motion; parallax and radial velocity are ignored.

    Parameters
    ----------
    ra, dec : numpy.ndarray
        Positions in degrees at ``from_epoch``, shape (n,).
    pmra : numpy.ndarray
        Proper motion in RA *including* the cos(dec) factor (as Gaia gives it), mas/yr; NaN means 0.
    pmdec : numpy.ndarray
        Proper motion in Dec, mas/yr; NaN means 0.
    from_epoch : float or numpy.ndarray
        Epoch of the positions in Julian years (e.g. Gaia's ``ref_epoch``, 2016.0 for DR3).
    to_epoch : float
        Wanted epoch in Julian years.

    Returns
    -------
    ra, dec : numpy.ndarray
        Positions in degrees at ``to_epoch``, ra in [0, 360).

    Raises
    ------
    ValueError
        If an epoch is not finite.
    """
    ra, dec = np.asarray(ra, dtype=float), np.asarray(dec, dtype=float)
    dt = np.asarray(to_epoch, dtype=float) - np.asarray(from_epoch, dtype=float)
    if not np.all(np.isfinite(dt)):
        raise ValueError(f"epochs must be finite, got {np.count_nonzero(~np.isfinite(dt))} non-finite "
                         f"value(s) in from_epoch / to_epoch")
    pmra = np.nan_to_num(np.asarray(pmra, dtype=float), nan=0.0)
    pmdec = np.nan_to_num(np.asarray(pmdec, dtype=float), nan=0.0)
    return from_tangent_plane(pmra * dt / _MAS_PER_DEG, pmdec * dt / _MAS_PER_DEG, ra, dec)


def _terms(order: int) -> list[tuple[int, int]]:
    """Exponents (p, q) of u^p v^q with p + q <= order, by increasing total order; (0, 0) first."""
    return [(p, total - p) for total in range(order + 1) for p in range(total, -1, -1)]


def _design(u: np.ndarray, v: np.ndarray, terms: list[tuple[int, int]]) -> np.ndarray:
    return np.column_stack([u ** p * v ** q for p, q in terms])


def _mean_position(ra: np.ndarray, dec: np.ndarray) -> tuple[float, float]:
    """(ra, dec) in degrees of the mean unit vector of the positions."""
    r, d = np.radians(ra), np.radians(dec)
    vx, vy, vz = np.sum(np.cos(d) * np.cos(r)), np.sum(np.cos(d) * np.sin(r)), np.sum(np.sin(d))
    return float(np.degrees(np.arctan2(vy, vx)) % 360.0), float(np.degrees(np.arctan2(vz, np.hypot(vx, vy))))


def _sky_distance_arcsec(ra1, dec1, ra2, dec2) -> np.ndarray:
    """Great-circle distance (haversine), arcsec."""
    r1, d1, r2, d2 = (np.radians(a) for a in (ra1, dec1, ra2, dec2))
    h = np.sin((d2 - d1) / 2) ** 2 + np.cos(d1) * np.cos(d2) * np.sin((r2 - r1) / 2) ** 2
    return np.degrees(2 * np.arcsin(np.sqrt(np.clip(h, 0, 1)))) * _ARCSEC


def _fit_polynomials(u, v, ra, dec, weights, terms, scale, crval):
    """Weighted fit of (xi, eta) as polynomials in (u, v) / scale, moving CRVAL to kill the constant.

    Returns the new CRVAL and the (n_terms, 2) coefficients (degrees) for (u, v) / scale, whose
    constant term is then zero.
    """
    sw = np.sqrt(weights)[:, None]
    design = _design(u / scale, v / scale, terms)
    for _ in range(6):
        xi, eta = tangent_plane(ra, dec, *crval)
        target = np.column_stack([xi, eta])
        coef = np.linalg.lstsq(design * sw, target * sw, rcond=None)[0]
        crval = tuple(float(c) for c in from_tangent_plane(coef[0, 0], coef[0, 1], *crval))
        if np.hypot(coef[0, 0], coef[0, 1]) < 1e-12:
            break
    coef[0] = 0.0
    return crval, coef


def _inverse_sip(a: np.ndarray, b: np.ndarray, image_shape: tuple[int, int], crpix0: tuple[float, float],
                 order: int) -> tuple[np.ndarray, np.ndarray]:
    """AP, BP of the given order fitted so that (U, V) + AP/BP(U, V) inverts (u, v) + A/B(u, v)."""
    ny, nx = image_shape
    gx, gy = np.meshgrid(np.linspace(-0.05 * nx, 1.05 * nx, 40), np.linspace(-0.05 * ny, 1.05 * ny, 40))
    u, v = gx.ravel() - crpix0[0], gy.ravel() - crpix0[1]
    big_u = u + np.polynomial.polynomial.polyval2d(u, v, a)
    big_v = v + np.polynomial.polynomial.polyval2d(u, v, b)
    terms = _terms(order)
    scale = max(nx, ny) / 2.0
    design = _design(big_u / scale, big_v / scale, terms)
    coef = np.linalg.lstsq(design, np.column_stack([u - big_u, v - big_v]), rcond=None)[0]
    ap, bp = np.zeros((order + 1, order + 1)), np.zeros((order + 1, order + 1))
    for (p, q), (cu, cv) in zip(terms, coef):
        ap[p, q], bp[p, q] = cu / scale ** (p + q), cv / scale ** (p + q)
    return ap, bp


def _build_wcs(crval, coef, terms, scale, crpix0, image_shape, sip_order) -> WCS:
    """An astropy WCS from the fitted polynomial coefficients (for (u, v) / scale)."""
    real = {pq: c / scale ** sum(pq) for pq, c in zip(terms, coef)}
    cd = np.array([[real[(1, 0)][0], real[(0, 1)][0]], [real[(1, 0)][1], real[(0, 1)][1]]])
    wcs = WCS(naxis=2)
    wcs.wcs.crpix = [crpix0[0] + 1.0, crpix0[1] + 1.0]
    wcs.wcs.crval = list(crval)
    wcs.wcs.cd = cd
    wcs.wcs.cunit = ["deg", "deg"]
    wcs.wcs.radesys = "ICRS"
    wcs.pixel_shape = (image_shape[1], image_shape[0])
    if sip_order >= 2:
        cd_inv = np.linalg.inv(cd)
        a, b = np.zeros((sip_order + 1, sip_order + 1)), np.zeros((sip_order + 1, sip_order + 1))
        for (p, q), c in real.items():
            if p + q >= 2:
                a[p, q], b[p, q] = cd_inv @ c
        ap, bp = _inverse_sip(a, b, image_shape, crpix0, sip_order + 2)
        wcs.wcs.ctype = ["RA---TAN-SIP", "DEC--TAN-SIP"]
        wcs.sip = Sip(a, b, ap, bp, wcs.wcs.crpix)
    else:
        wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.set()
    return wcs


def _check_fit_inputs(x, y, ra, dec, weights, image_shape, sip_order, clip_sigma, max_iter):
    arrays = [np.asarray(a, dtype=float).ravel() for a in (x, y, ra, dec)]
    if len({len(a) for a in arrays}) != 1:
        raise ValueError(f"x, y, ra and dec must have the same length, got {[len(a) for a in arrays]}")
    w = np.ones(len(arrays[0])) if weights is None else np.asarray(weights, dtype=float).ravel()
    if len(w) != len(arrays[0]):
        raise ValueError(f"weights must have length {len(arrays[0])} like x, got {len(w)}")
    if len(image_shape) != 2 or min(image_shape) < 1:
        raise ValueError(f"image_shape must be (ny, nx) with positive sizes, got {image_shape}")
    if not 1 <= sip_order <= 9:
        raise ValueError(f"sip_order must be in 1..9, got {sip_order}")
    if not clip_sigma > 0 or max_iter < 0:
        raise ValueError(f"need clip_sigma > 0 and max_iter >= 0, got {clip_sigma} and {max_iter}")
    return (*arrays, w)


def fit_wcs(x: np.ndarray, y: np.ndarray, ra: np.ndarray, dec: np.ndarray, *, image_shape: tuple[int, int],
            crpix: tuple[float, float] | None = None, sip_order: int = 3, weights: np.ndarray | None = None,
            clip_sigma: float = 3.0, max_iter: int = 5) -> WcsFit:
    """Least-squares TAN-SIP WCS from matched pixel and sky positions, with outlier rejection.

    Parameters
    ----------
    x, y : numpy.ndarray
        Shape (n,) 0-based pixel positions.
    ra, dec : numpy.ndarray
        Shape (n,) sky positions of the same stars, degrees.
    image_shape : tuple of int
        (ny, nx) of the image: sets the default CRPIX, the grid of the inverse SIP fit and the
        WCS's pixel_shape.
    crpix : tuple of float or None
        0-based (x, y) reference pixel; None means the image centre ((nx - 1) / 2, (ny - 1) / 2).
        The FITS CRPIX of the result is this plus 1.
    sip_order : int
        Total polynomial order; 1 fits a pure TAN WCS (CRVAL and CD only), 2..9 add SIP terms.
    weights : numpy.ndarray or None
        Shape (n,) relative weights, e.g. 1 / sigma^2; zero excludes a star; None weighs all equally.
    clip_sigma : float
        A star is rejected when a coordinate of its (weight-normalised) residual exceeds
        ``clip_sigma`` times the robust per-axis scatter, sqrt(median(r^2) / (2 ln 2)).
        Rejected stars may come back in later iterations.
    max_iter : int
        Largest number of clip-and-refit iterations (0: no clipping).

    Returns
    -------
    WcsFit
        The WCS, its residuals and the stars used.

    Raises
    ------
    AstrometryError
        If fewer than (number of coefficients per axis + 1) usable stars remain.
    ValueError
        If the inputs have inconsistent lengths or an option is out of range.
    """
    x, y, ra, dec, w = _check_fit_inputs(x, y, ra, dec, weights, image_shape, sip_order, clip_sigma, max_iter)
    ny, nx = image_shape
    crpix0 = ((nx - 1) / 2.0, (ny - 1) / 2.0) if crpix is None else (float(crpix[0]), float(crpix[1]))
    valid = np.isfinite(x) & np.isfinite(y) & np.isfinite(ra) & np.isfinite(dec) & np.isfinite(w) & (w > 0)
    terms, scale = _terms(sip_order), max(nx, ny) / 2.0
    need = len(terms) + 1
    used = valid.copy()
    u, v = x - crpix0[0], y - crpix0[1]
    crval = _mean_position(ra[valid], dec[valid]) if valid.any() else (0.0, 0.0)
    for iteration in range(max_iter + 1):
        if used.sum() < need:
            raise AstrometryError(f"only {used.sum()} usable stars for a sip_order {sip_order} fit "
                                  f"({len(terms)} coefficients per axis), need >= {need}")
        crval, coef = _fit_polynomials(u[used], v[used], ra[used], dec[used], w[used], terms, scale, crval)
        if iteration == max_iter:
            break
        xi, eta = tangent_plane(np.where(valid, ra, crval[0]), np.where(valid, dec, crval[1]), *crval)
        resid = np.column_stack([xi, eta]) - _design(u / scale, v / scale, terms) @ coef
        norm = resid * np.sqrt(np.where(valid, w, 0.0) / np.mean(w[used]))[:, None]
        sigma = max(np.sqrt(np.median(np.sum(norm[used] ** 2, axis=1)) / (2 * np.log(2))), 1e-12)
        new_used = valid & np.all(np.abs(norm) <= clip_sigma * sigma, axis=1)
        if np.array_equal(new_used, used):
            break
        used = new_used
    wcs = _build_wcs(crval, coef, terms, scale, crpix0, image_shape, sip_order)
    fit_ra, fit_dec = wcs.all_pix2world(np.where(valid, x, 0.0), np.where(valid, y, 0.0), 0)
    resid = np.where(valid, _sky_distance_arcsec(fit_ra, fit_dec, ra, dec), np.nan)
    return WcsFit(wcs=wcs, rms_arcsec=float(np.sqrt(np.mean(resid[used] ** 2))), n_stars=int(used.sum()),
                  used=used, residuals_arcsec=resid, sip_order=sip_order)


def _usable_order(n_matches: int, sip_order: int) -> int:
    """Highest order <= sip_order with at least 2 matches per coefficient and axis (at least 1)."""
    order = sip_order
    while order > 1 and n_matches < 2 * len(_terms(order)):
        order -= 1
    return order


def _fit_unclipped_order(x, y, ra, dec, *, image_shape: tuple[int, int], sip_order: int,
                         clip_sigma: float) -> WcsFit:
    """`fit_wcs` at the highest usable order (`_usable_order`) for the stars that *survive*
    clipping: an order chosen for all the matches, with a quarter of them clipped, fits the
    rest too closely (a few mas) and extrapolates by arcseconds where no star holds it."""
    order = _usable_order(len(x), sip_order)
    while True:
        fit = fit_wcs(x, y, ra, dec, image_shape=image_shape, sip_order=order, clip_sigma=clip_sigma)
        if order == 1 or _usable_order(fit.n_stars, order) == order:
            return fit
        order -= 1


def _rematch(wcs: WCS, x, y, cat_ra, cat_dec, radius_arcsec: float) -> tuple[np.ndarray, np.ndarray]:
    """Mutual-nearest matches of all sources placed by ``wcs`` to the catalog, within a radius."""
    ra0, dec0 = wcs.wcs.crval
    good_s = np.flatnonzero(np.isfinite(x) & np.isfinite(y))
    good_c = np.flatnonzero(np.isfinite(cat_ra) & np.isfinite(cat_dec))
    src = np.column_stack(tangent_plane(*wcs.all_pix2world(x[good_s], y[good_s], 0), ra0, dec0)) * _ARCSEC
    cat = np.column_stack(tangent_plane(cat_ra[good_c], cat_dec[good_c], ra0, dec0)) * _ARCSEC
    ok = np.all(np.isfinite(cat), axis=1)
    i_s, i_c, _ = mutual_nearest(src, cat[ok], radius_arcsec)
    return good_s[i_s], good_c[ok][i_c]


def solve_astrometry(x: np.ndarray, y: np.ndarray, flux: np.ndarray, cat_ra: np.ndarray, cat_dec: np.ndarray,
                     cat_mag: np.ndarray, *, wcs_guess: WCS, image_shape: tuple[int, int], sip_order: int = 3,
                     min_matches: int = 10, max_arcsec_residual: float = 0.3, max_offset_arcsec: float = 60.0,
                     max_rotation_deg: float = 2.0, n_bright: int = 50, match_radius_arcsec: float = 2.0,
                     clip_sigma: float = 3.0) -> AstrometrySolution:
    """Match sources to a reference catalog and fit a TAN-SIP WCS.

    Steps: `match_to_catalog` with the guessed WCS; `fit_wcs`; two rounds of re-matching all
    sources with the fitted WCS (radius: 5 times the fit rms, between 0.5" and
    ``match_radius_arcsec``) and refitting.  The SIP order is lowered when there are fewer than
    2 matches per coefficient and axis that survive the clipping (order 3 needs 20 matches,
    order 2 needs 12).

    Parameters
    ----------
    x, y, flux : numpy.ndarray
        Shape (n,) 0-based pixel positions and fluxes of the detected sources.
    cat_ra, cat_dec, cat_mag : numpy.ndarray
        Shape (m,) catalog positions (degrees, already at the image epoch, see
        `propagate_proper_motion`) and magnitudes.
    wcs_guess : astropy.wcs.WCS
        The approximate (header) WCS.
    image_shape : tuple of int
        (ny, nx) of the image.
    sip_order : int
        Highest polynomial order to fit (see `fit_wcs`).
    min_matches : int
        Fewest matched stars accepted.
    max_arcsec_residual : float
        Largest accepted radial rms of the fit, arcsec.
    max_offset_arcsec, max_rotation_deg, n_bright, match_radius_arcsec
        Passed to `match_to_catalog`.
    clip_sigma : float
        Passed to `fit_wcs`.

    Returns
    -------
    AstrometrySolution
        The WCS, the final matches, the fit and the initial matching.

    Raises
    ------
    AstrometryError
        If matching fails, fewer than ``min_matches`` stars match, or the rms exceeds
        ``max_arcsec_residual``; the message gives the numbers.
    """
    x, y = np.asarray(x, dtype=float).ravel(), np.asarray(y, dtype=float).ravel()
    cat_ra, cat_dec = np.asarray(cat_ra, dtype=float).ravel(), np.asarray(cat_dec, dtype=float).ravel()
    match = match_to_catalog(x, y, flux, cat_ra, cat_dec, cat_mag, wcs_guess=wcs_guess,
                             max_offset_arcsec=max_offset_arcsec, max_rotation_deg=max_rotation_deg,
                             n_bright=n_bright, match_radius_arcsec=match_radius_arcsec)
    i_s, i_c = match.source_index, match.catalog_index
    for round_ in range(3):
        if len(i_s) < min_matches:
            raise AstrometryError(f"only {len(i_s)} catalog matches, need >= {min_matches}")
        fit = _fit_unclipped_order(x[i_s], y[i_s], cat_ra[i_c], cat_dec[i_c], image_shape=image_shape,
                                   sip_order=sip_order, clip_sigma=clip_sigma)
        if round_ == 2:
            break
        radius = float(np.clip(5.0 * fit.rms_arcsec, 0.5, match_radius_arcsec))
        new_s, new_c = _rematch(fit.wcs, x, y, cat_ra, cat_dec, radius)
        if np.array_equal(new_s, i_s) and np.array_equal(new_c, i_c):
            break
        i_s, i_c = new_s, new_c
    if fit.n_stars < min_matches:
        raise AstrometryError(f"only {fit.n_stars} catalog matches survive clipping, need >= {min_matches}")
    if fit.rms_arcsec > max_arcsec_residual:
        raise AstrometryError(f"rms {fit.rms_arcsec:.3f}\" exceeds max_arcsec_residual "
                              f"{max_arcsec_residual}\" "
                              f"({fit.n_stars} stars, sip_order {fit.sip_order})")
    return AstrometrySolution(wcs=fit.wcs, source_index=i_s, catalog_index=i_c, fit=fit, initial_match=match)
