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

Few stars: the ladder of models
-------------------------------
`solve_astrometry` chooses the model by the number ``n`` of matched stars (``model`` in the
result), going down the ladder only as far as ``simplest_model`` allows:

* "sip": ``n >= min_matches`` and at least ``stars_per_term`` (2) stars per coefficient and axis
  for order 2 (12 stars; 20 for order 3): CRVAL, CD and the SIP polynomials (`fit_wcs`);
* "tan": ``n >= min_matches`` (>= 4) but too few for order 2: CRVAL and CD;
* "shift_rotation": ``2 <= n < min_matches``, or triangle matching failed: a shift and a
  rotation of the header WCS;
* "shift": one star: a shift of the header WCS.

The last two *correct the header WCS* (``wcs_guess``): its pixel scale and distortion are kept,
and the corrected mapping is re-expressed as a TAN-SIP WCS fitted to a grid of pixels (within
``header_fit_tol_arcsec``).  Their stars are matched by `match_few_stars`, which refuses a match
that another set of pairs fits equally well (see there); a one-star shift is accepted only when
a single source-catalog pair is possible within the search range.  One star can be matched to
the wrong catalog star (or be no star) with nothing to tell, so the ``"shift"`` model is
opt-in and its solutions deserve a flag.

Uncertainty
-----------
``AstrometrySolution.uncertainty_arcsec`` is the rms over the image of the radial 1-sigma error
of a position computed with the WCS.  Each star's per-axis error is the quadrature sum of its
centroid error (``centroid_err_px`` times the pixel scale), its catalog error
(``cat_err_arcsec``) and ``systematic_err_arcsec``.

* Header corrections: the weighted least-squares covariance of the shift (and rotation),
  multiplied by chi2 / dof when that exceeds 1 (a single star has dof 0 and is not scaled),
  propagated to a 9 x 9 grid of pixels spanning the image; plus the header's pixel scale (``header_scale_err``)
  and, for the shift, its rotation (``header_rotation_err_deg``), which are not fitted but
  whose errors move positions in proportion to their distance from the stars.
* Fitted WCS: the weighted least-squares covariance of the polynomial coefficients, multiplied
  by chi2 / dof when that exceeds 1, propagated to the grid.  A distortion of higher order than
  the fit's is only seen through chi2 / dof; it may dominate near the corners.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from astropy.wcs import WCS, Sip
from astropy.wcs.utils import proj_plane_pixel_scales

from improc.pattern_match import (
    AstrometryError,
    MatchResult,
    SimilarityTransform,
    from_tangent_plane,
    match_few_stars,
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
    "match_few_stars",
    "AstrometryModel",
    "fit_wcs",
    "solve_astrometry",
]

_ARCSEC = 3600.0
_MAS_PER_DEG = 3.6e6

#: The models of the ladder, from the richest to the simplest (see the module docstring).
AstrometryModel = Literal["sip", "tan", "shift_rotation", "shift"]


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
        The fitted WCS, or the corrected header WCS (TAN-SIP in both cases).
    source_index, catalog_index : numpy.ndarray
        Final one-to-one matches (indices into the caller's source and catalog arrays) that
        entered the fit; ``fit.used`` tells which survived clipping.
    fit : WcsFit
        The final fit; for the header corrections, the TAN-SIP representation of the corrected
        header (``sip_order`` its order) and the residuals of the matched stars.
    initial_match : MatchResult
        The matching done with the guessed WCS (its ``transform`` says how wrong that WCS was):
        by `match_to_catalog`, or by `match_few_stars` for the header corrections.
    model : {"sip", "tan", "shift_rotation", "shift"}
        The model fitted (see the module docstring).
    uncertainty_arcsec : float
        Rms over the image of the radial 1-sigma error of positions (see the module docstring).
    chi2 : float
        Sum of the squared residuals of the stars used over their squared errors (both axes).
    dof : int
        Degrees of freedom of that chi-square: 2 n minus the parameters fitted (0 for a shift
        from one star).
    correction : SimilarityTransform or None
        For the header corrections, the shift and rotation applied to the header WCS
        (``scale`` 1); None for fitted WCSs.
    """

    wcs: WCS
    source_index: np.ndarray
    catalog_index: np.ndarray
    fit: WcsFit
    initial_match: MatchResult
    model: AstrometryModel
    uncertainty_arcsec: float
    chi2: float
    dof: int
    correction: SimilarityTransform | None

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


def _usable_order(n_matches: int, sip_order: int, stars_per_term: float = 2.0) -> int:
    """Highest order <= sip_order with at least ``stars_per_term`` matches per coefficient and
    axis (at least 1)."""
    order = sip_order
    while order > 1 and n_matches < stars_per_term * len(_terms(order)):
        order -= 1
    return order


@dataclass(frozen=True)
class _Options:
    """The options of `solve_astrometry` that its helpers need (see there)."""

    wcs_guess: WCS
    image_shape: tuple[int, int]
    sip_order: int
    min_matches: int
    simplest_model: str
    max_offset_arcsec: float
    max_rotation_deg: float
    max_scale_error: float
    n_bright: int
    n_bright_few: int
    match_radius_arcsec: float
    clip_sigma: float
    max_clip_iter: int
    stars_per_term: float
    rematch_rounds: int
    rematch_rms_factor: float
    min_rematch_radius_arcsec: float
    header_fit_tol_arcsec: float


@dataclass(frozen=True)
class _Errors:
    """Per-axis position errors of sources and catalog stars, and of the header's scale and
    rotation (see the module docstring)."""

    centroid_px: np.ndarray
    catalog_arcsec: np.ndarray
    systematic_arcsec: float
    pixel_scale_arcsec: float
    scale: float
    rotation_rad: float

    def sigma(self, i_s: np.ndarray, i_c: np.ndarray) -> np.ndarray:
        """Per-axis 1-sigma error (arcsec) of the offset between matched sources and stars."""
        return np.sqrt((self.centroid_px[i_s] * self.pixel_scale_arcsec) ** 2 + self.catalog_arcsec[i_c] ** 2
                       + self.systematic_arcsec ** 2)


def _fit_unclipped_order(x, y, ra, dec, sigma, o: _Options) -> WcsFit:
    """`fit_wcs` (weights 1 / sigma**2) at the highest usable order (`_usable_order`) for the
    stars that *survive* clipping: an order chosen for all the matches, with a quarter of them
    clipped, fits the rest too closely (a few mas) and extrapolates by arcseconds where no star
    holds it."""
    order = _usable_order(len(x), o.sip_order, o.stars_per_term)
    while True:
        fit = fit_wcs(x, y, ra, dec, image_shape=o.image_shape, sip_order=order, weights=1.0 / sigma ** 2,
                      clip_sigma=o.clip_sigma, max_iter=o.max_clip_iter)
        if order == 1 or _usable_order(fit.n_stars, order, o.stars_per_term) == order:
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


def _fitted_solution(x, y, cat_ra, cat_dec, match: MatchResult, o: _Options, errors: _Errors) -> AstrometrySolution:
    """The "sip" and "tan" rungs: fit, re-match all sources with the fit and refit.

    Raises AstrometryError when fewer than ``min_matches`` stars match or survive clipping.
    """
    i_s, i_c = match.source_index, match.catalog_index
    for round_ in range(o.rematch_rounds + 1):
        if len(i_s) < o.min_matches:
            raise AstrometryError(f"only {len(i_s)} catalog matches, need >= {o.min_matches}",
                                  figures={"n_matches": len(i_s), "needed": o.min_matches})
        fit = _fit_unclipped_order(x[i_s], y[i_s], cat_ra[i_c], cat_dec[i_c], errors.sigma(i_s, i_c), o)
        if round_ == o.rematch_rounds:
            break
        radius = float(np.clip(o.rematch_rms_factor * fit.rms_arcsec, o.min_rematch_radius_arcsec,
                               o.match_radius_arcsec))
        new_s, new_c = _rematch(fit.wcs, x, y, cat_ra, cat_dec, radius)
        if np.array_equal(new_s, i_s) and np.array_equal(new_c, i_c):
            break
        i_s, i_c = new_s, new_c
    if fit.n_stars < o.min_matches:
        raise AstrometryError(f"only {fit.n_stars} catalog matches survive clipping, need >= {o.min_matches}",
                              figures={"n_matches": fit.n_stars, "needed": o.min_matches})
    sigma = errors.sigma(i_s, i_c)[fit.used]
    chi2 = float(np.sum(fit.residuals_arcsec[fit.used] ** 2 / sigma ** 2))
    dof = 2 * (fit.n_stars - len(_terms(fit.sip_order)))
    uncertainty = _fitted_uncertainty(x[i_s][fit.used], y[i_s][fit.used], sigma, fit.sip_order, o.image_shape,
                                      max(1.0, chi2 / dof))
    return AstrometrySolution(wcs=fit.wcs, source_index=i_s, catalog_index=i_c, fit=fit, initial_match=match,
                              model="sip" if fit.sip_order >= 2 else "tan", uncertainty_arcsec=uncertainty,
                              chi2=chi2, dof=dof, correction=None)


def _image_grid(image_shape: tuple[int, int], n: int = 9) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) of an n x n grid of pixels spanning the image, corners included."""
    ny, nx = image_shape
    return tuple(g.ravel() for g in np.meshgrid(np.linspace(0, nx - 1, n), np.linspace(0, ny - 1, n)))


def _fitted_uncertainty(x, y, sigma, order: int, image_shape: tuple[int, int], inflate: float) -> float:
    """Rms over the image of the radial 1-sigma error of a fitted polynomial WCS: the weighted
    least-squares covariance of the coefficients (per axis, times ``inflate``) on a grid."""
    ny, nx = image_shape
    terms, scale = _terms(order), max(nx, ny) / 2.0
    design = _design((x - (nx - 1) / 2.0) / scale, (y - (ny - 1) / 2.0) / scale, terms)
    cov = np.linalg.pinv(design.T @ (design / sigma[:, None] ** 2)) * inflate
    gx, gy = _image_grid(image_shape)
    grid = _design((gx - (nx - 1) / 2.0) / scale, (gy - (ny - 1) / 2.0) / scale, terms)
    return float(np.sqrt(2.0 * np.mean(np.einsum("ij,jk,ik->i", grid, cov, grid))))


# --- corrections of the header WCS ------------------------------------------------------------

def _plane(ra, dec, tangent_point) -> np.ndarray:
    """Complex standard coordinates (arcsec, real east, imaginary north) about the tangent point."""
    xi, eta = tangent_plane(np.asarray(ra, float), np.asarray(dec, float), *tangent_point)
    return (xi + 1j * eta) * _ARCSEC


def _fit_correction(zs: np.ndarray, zc: np.ndarray, sigma: np.ndarray, model: str) -> tuple[float, complex, float, int]:
    """Weighted least-squares rotation (for "shift_rotation") and shift with zc = exp(i theta) zs + t.

    Returns theta (radians), t (arcsec), the chi-square and its degrees of freedom.
    """
    w = 1.0 / sigma ** 2
    if model == "shift_rotation":
        ms, mc = np.sum(w * zs) / np.sum(w), np.sum(w * zc) / np.sum(w)
        theta = float(np.angle(np.sum(w * (zc - mc) * np.conj(zs - ms))))
        t = complex(mc - np.exp(1j * theta) * ms)
    else:
        theta, t = 0.0, complex(np.sum(w * (zc - zs)) / np.sum(w))
    chi2 = float(np.sum(w * np.abs(zc - np.exp(1j * theta) * zs - t) ** 2))
    return theta, t, chi2, 2 * len(zs) - (3 if model == "shift_rotation" else 2)


def _columns(z: np.ndarray, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """Derivatives of the corrected positions (rows x0, y0, x1, ...) with respect to the shift,
    the rotation (columns, (2n, 3)) and the scale ((2n,))."""
    rho = np.exp(1j * theta) * z
    cols = np.zeros((2 * len(z), 3))
    cols[0::2, 0], cols[1::2, 1] = 1.0, 1.0
    cols[0::2, 2], cols[1::2, 2] = -rho.imag, rho.real
    scale = np.column_stack([rho.real, rho.imag]).ravel()
    return cols, scale


def _correction_uncertainty(zq: np.ndarray, zs: np.ndarray, sigma: np.ndarray, theta: float, model: str,
                            chi2: float, dof: int, errors: _Errors) -> float:
    """Rms over the points zq of the radial 1-sigma error of corrected positions: the fit's
    covariance (scaled by chi2 / dof when > 1) and the errors of the header's unfitted scale
    (and, for a shift, rotation) as they reach zq through the fit."""
    a_all, a_scale = _columns(zs, theta)
    q_all, q_scale = _columns(zq, theta)
    n_par = 3 if model == "shift_rotation" else 2
    a, q = a_all[:, :n_par], q_all[:, :n_par]
    w = np.repeat(1.0 / sigma ** 2, 2)
    normal_inv = np.linalg.inv(a.T @ (w[:, None] * a))
    inflate = max(1.0, chi2 / dof) if dof > 0 else 1.0
    var = np.einsum("ij,jk,ik->i", q, normal_inv, q) * inflate
    nuisances = [(a_scale, q_scale, errors.scale)]
    if model == "shift":
        nuisances.append((a_all[:, 2], q_all[:, 2], errors.rotation_rad))
    for a_nu, q_nu, sigma_nu in nuisances:
        var += (sigma_nu * (q_nu - q @ (normal_inv @ (a.T @ (w * a_nu))))) ** 2
    return float(np.sqrt(np.mean(var[0::2] + var[1::2])))


def _corrected_wcs(correction: SimilarityTransform, o: _Options) -> WcsFit:
    """The header WCS corrected by a shift and rotation, as a TAN-SIP WCS fitted to a grid of
    pixels: the lowest order (up to 5) whose rms reaches ``header_fit_tol_arcsec``, else the best."""
    ny, nx = o.image_shape
    gx, gy = (g.ravel() for g in np.meshgrid(np.linspace(-0.5, nx - 0.5, 15), np.linspace(-0.5, ny - 0.5, 15)))
    z = _plane(*o.wcs_guess.all_pix2world(gx, gy, 0), correction.tangent_point)
    z = np.exp(1j * np.radians(correction.rotation_deg)) * z + complex(*correction.shift_arcsec)
    ra, dec = from_tangent_plane(z.real / _ARCSEC, z.imag / _ARCSEC, *correction.tangent_point)
    best = None
    for order in range(1, 6):
        fit = fit_wcs(gx, gy, ra, dec, image_shape=o.image_shape, sip_order=order, max_iter=0)
        if best is None or fit.rms_arcsec < best.rms_arcsec:
            best = fit
        if fit.rms_arcsec <= o.header_fit_tol_arcsec:
            break
    return best


def _clipped_correction(zs: np.ndarray, zc: np.ndarray, sigma: np.ndarray, model: str, o: _Options) -> np.ndarray:
    """The stars kept by sigma clipping a shift-and-rotation fit, as `fit_wcs` clips (from 5
    stars on; at least 4 are kept)."""
    used = np.ones(len(zs), bool)
    if model != "shift_rotation" or len(zs) < 5:
        return used
    for _ in range(o.max_clip_iter):
        theta, t, _, _ = _fit_correction(zs[used], zc[used], sigma[used], model)
        norm = (zc - np.exp(1j * theta) * zs - t) / sigma
        scatter = max(np.sqrt(np.median(np.abs(norm[used]) ** 2) / (2 * np.log(2))), 1e-12)
        new = (np.abs(norm.real) <= o.clip_sigma * scatter) & (np.abs(norm.imag) <= o.clip_sigma * scatter)
        if new.sum() < 4 or np.array_equal(new, used):
            break
        used = new
    return used


def _corrected_header(x, y, flux, cat_ra, cat_dec, o: _Options, errors: _Errors,
                      failure: AstrometryError) -> AstrometrySolution:
    """The "shift_rotation" and "shift" rungs (or a fitted WCS if `match_few_stars` finds
    ``min_matches`` stars after all); ``failure`` is why the fitted WCS failed."""
    try:
        match = match_few_stars(x, y, flux, cat_ra, cat_dec, wcs_guess=o.wcs_guess,
                                max_offset_arcsec=o.max_offset_arcsec, max_rotation_deg=o.max_rotation_deg,
                                match_radius_arcsec=o.match_radius_arcsec, n_bright=o.n_bright_few,
                                min_matches=1 if o.simplest_model == "shift" else 2)
    except AstrometryError as exc:
        raise AstrometryError(f"{failure}; few-star matching: {exc}", figures=exc.figures) from exc
    if len(match.source_index) >= o.min_matches:
        try:
            return _fitted_solution(x, y, cat_ra, cat_dec, match, o, errors)
        except AstrometryError:
            pass            # too few survive clipping: correct the header with all of them
    i_s, i_c = match.source_index, match.catalog_index
    model = "shift_rotation" if len(i_s) >= 2 else "shift"
    tangent_point = match.transform.tangent_point
    zs = _plane(*o.wcs_guess.all_pix2world(x[i_s], y[i_s], 0), tangent_point)
    zc = _plane(cat_ra[i_c], cat_dec[i_c], tangent_point)
    sigma = errors.sigma(i_s, i_c)
    used = _clipped_correction(zs, zc, sigma, model, o)
    theta, t, chi2, dof = _fit_correction(zs[used], zc[used], sigma[used], model)
    correction = SimilarityTransform(shift_arcsec=(t.real, t.imag), rotation_deg=float(np.degrees(theta)),
                                     scale=1.0, tangent_point=tangent_point)
    grid = _corrected_wcs(correction, o)
    resid = _sky_distance_arcsec(*grid.wcs.all_pix2world(x[i_s], y[i_s], 0), cat_ra[i_c], cat_dec[i_c])
    fit = WcsFit(wcs=grid.wcs, rms_arcsec=float(np.sqrt(np.mean(resid[used] ** 2))), n_stars=int(used.sum()),
                 used=used, residuals_arcsec=resid, sip_order=grid.sip_order)
    zq = _plane(*o.wcs_guess.all_pix2world(*_image_grid(o.image_shape), 0), tangent_point)
    uncertainty = np.hypot(_correction_uncertainty(zq, zs[used], sigma[used], theta, model, chi2, dof, errors),
                           grid.rms_arcsec)
    return AstrometrySolution(wcs=grid.wcs, source_index=i_s, catalog_index=i_c, fit=fit, initial_match=match,
                              model=model, uncertainty_arcsec=float(uncertainty), chi2=chi2, dof=dof,
                              correction=correction)


# --- the entry point --------------------------------------------------------------------------

def _per_star(value, n: int, name: str) -> np.ndarray:
    """A scalar or shape-(n,) error, as a (n,) array of finite values >= 0."""
    arr = np.broadcast_to(np.asarray(value, dtype=float), (n,)) if np.ndim(value) == 0 else np.asarray(value, float)
    if arr.shape != (n,):
        raise ValueError(f"{name} must be a scalar or have shape ({n},), got shape {arr.shape}")
    if not np.all(np.isfinite(arr) & (arr >= 0)):
        raise ValueError(f"{name} must be finite and >= 0")
    return arr


def _errors(wcs_guess: WCS, n_sources: int, n_catalog: int, centroid_err_px, cat_err_arcsec,
            systematic_err_arcsec: float, header_scale_err: float, header_rotation_err_deg: float) -> _Errors:
    for name, value in (("systematic_err_arcsec", systematic_err_arcsec), ("header_scale_err", header_scale_err),
                        ("header_rotation_err_deg", header_rotation_err_deg)):
        if not (np.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be finite and >= 0, got {value}")
    centroid = _per_star(centroid_err_px, n_sources, "centroid_err_px")
    catalog = _per_star(cat_err_arcsec, n_catalog, "cat_err_arcsec")
    if systematic_err_arcsec == 0 and (np.any(centroid == 0) and np.any(catalog == 0)):
        raise ValueError("position errors must be > 0: give centroid_err_px, cat_err_arcsec or "
                         "systematic_err_arcsec > 0")
    scale = float(np.mean(proj_plane_pixel_scales(wcs_guess.celestial))) * _ARCSEC
    return _Errors(centroid, catalog, float(systematic_err_arcsec), scale, float(header_scale_err),
                   float(np.radians(header_rotation_err_deg)))


def _check_options(o: _Options) -> None:
    if o.simplest_model not in ("tan", "shift_rotation", "shift"):
        raise ValueError(f"simplest_model must be 'tan', 'shift_rotation' or 'shift', got {o.simplest_model!r}")
    if o.min_matches < 4:
        raise ValueError(f"min_matches must be >= 4 (a TAN fit has 3 coefficients per axis), got {o.min_matches}")
    if o.rematch_rounds < 0 or o.max_clip_iter < 0 or o.n_bright_few < 1:
        raise ValueError(f"need rematch_rounds >= 0, max_clip_iter >= 0 and n_bright_few >= 1, got "
                         f"{o.rematch_rounds}, {o.max_clip_iter} and {o.n_bright_few}")
    for name in ("stars_per_term", "rematch_rms_factor", "min_rematch_radius_arcsec", "header_fit_tol_arcsec",
                 "max_scale_error"):
        if not getattr(o, name) > 0:
            raise ValueError(f"{name} must be > 0, got {getattr(o, name)}")


def solve_astrometry(x: np.ndarray, y: np.ndarray, flux: np.ndarray, cat_ra: np.ndarray, cat_dec: np.ndarray,
                     cat_mag: np.ndarray, *, wcs_guess: WCS, image_shape: tuple[int, int], sip_order: int = 3,
                     min_matches: int = 10, max_arcsec_residual: float = 0.3, max_offset_arcsec: float = 60.0,
                     max_rotation_deg: float = 2.0, n_bright: int = 50, match_radius_arcsec: float = 2.0,
                     clip_sigma: float = 3.0, simplest_model: Literal["tan", "shift_rotation", "shift"] = "tan",
                     centroid_err_px: np.ndarray | float = 0.1, cat_err_arcsec: np.ndarray | float = 0.0,
                     systematic_err_arcsec: float = 0.02, header_scale_err: float = 2e-4,
                     header_rotation_err_deg: float = 0.02, max_scale_error: float = 0.02,
                     n_bright_few: int = 10, stars_per_term: float = 2.0, max_clip_iter: int = 5,
                     rematch_rounds: int = 2, rematch_rms_factor: float = 5.0,
                     min_rematch_radius_arcsec: float = 0.5,
                     header_fit_tol_arcsec: float = 0.001) -> AstrometrySolution:
    """Match sources to a reference catalog and fit a TAN-SIP WCS, or correct the header's.

    Steps: `match_to_catalog` with the guessed WCS; `fit_wcs`, weighted by the stars' errors
    (see the module docstring); ``rematch_rounds`` rounds of re-matching all sources with the
    fitted WCS (radius: ``rematch_rms_factor`` times the fit rms, between
    ``min_rematch_radius_arcsec`` and ``match_radius_arcsec``) and refitting.  The
    SIP order is lowered when fewer than ``stars_per_term`` matches per coefficient and axis
    survive the clipping (order 3 needs 20 matches, order 2 needs 12, by default).  When that
    fails for lack of stars and ``simplest_model`` allows it, the header WCS is corrected
    instead (the ladder of the module docstring).

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
        Fewest matched stars for a fitted (TAN or TAN-SIP) WCS, >= 4.
    max_arcsec_residual : float
        Largest accepted radial rms of the matched stars about the solution, arcsec.
    max_offset_arcsec, max_rotation_deg, max_scale_error, n_bright, match_radius_arcsec
        Passed to `match_to_catalog` (the first three and the last to `match_few_stars` too).
    clip_sigma : float
        Passed to `fit_wcs`.
    simplest_model : {"tan", "shift_rotation", "shift"}
        How far down the ladder to go when fewer than ``min_matches`` stars match: "tan" never
        (an AstrometryError, as without the ladder); "shift_rotation" corrects the header WCS
        by a shift and a rotation fitted to 2 to ``min_matches - 1`` stars; "shift" also by a
        shift alone from a single star.
    centroid_err_px : numpy.ndarray or float
        Shape (n,) or scalar: per-axis 1-sigma centroid errors of the sources, pixels (about
        0.6 FWHM / S/N for a windowed centroid, plus a floor).
    cat_err_arcsec : numpy.ndarray or float
        Shape (m,) or scalar: per-axis 1-sigma errors of the catalog positions at the image's
        epoch, arcsec.
    systematic_err_arcsec : float
        Per-axis error added in quadrature to every star (distortion left by the model, e.g.
        of the header for the corrections), arcsec.
    header_scale_err : float
        Fractional 1-sigma error of the header's pixel scale, which the corrections keep.
    header_rotation_err_deg : float
        1-sigma error of the header's rotation, degrees, which the "shift" model keeps.
    n_bright_few : int
        Brightest sources that propose matches in `match_few_stars` (``n_bright`` there).
    stars_per_term : float
        Fewest matches per SIP coefficient and axis for an order (see above).
    max_clip_iter : int
        Passed to `fit_wcs` as ``max_iter``.
    rematch_rounds, rematch_rms_factor, min_rematch_radius_arcsec : int, float, float
        The re-matching with the fitted WCS (see above).
    header_fit_tol_arcsec : float
        Rms to which a corrected header WCS is re-expressed as TAN-SIP (order 1 to 5); what is
        left is added to the uncertainty.

    Returns
    -------
    AstrometrySolution
        The WCS, the model, its uncertainty, the final matches, the fit and the initial matching.

    Raises
    ------
    AstrometryError
        If matching fails, too few stars match for ``simplest_model``, the few-star match is
        ambiguous, or the rms exceeds ``max_arcsec_residual``; the message gives the numbers.
    ValueError
        If an option is out of range or an error array has the wrong shape.
    """
    x, y = np.asarray(x, dtype=float).ravel(), np.asarray(y, dtype=float).ravel()
    cat_ra, cat_dec = np.asarray(cat_ra, dtype=float).ravel(), np.asarray(cat_dec, dtype=float).ravel()
    o = _Options(wcs_guess=wcs_guess, image_shape=tuple(image_shape), sip_order=sip_order, min_matches=min_matches,
                 simplest_model=simplest_model, max_offset_arcsec=max_offset_arcsec,
                 max_rotation_deg=max_rotation_deg, max_scale_error=max_scale_error, n_bright=n_bright,
                 n_bright_few=n_bright_few, match_radius_arcsec=match_radius_arcsec, clip_sigma=clip_sigma,
                 max_clip_iter=max_clip_iter, stars_per_term=stars_per_term, rematch_rounds=rematch_rounds,
                 rematch_rms_factor=rematch_rms_factor, min_rematch_radius_arcsec=min_rematch_radius_arcsec,
                 header_fit_tol_arcsec=header_fit_tol_arcsec)
    _check_options(o)
    errors = _errors(wcs_guess, len(x), len(cat_ra), centroid_err_px, cat_err_arcsec, systematic_err_arcsec,
                     header_scale_err, header_rotation_err_deg)
    try:
        match = match_to_catalog(x, y, flux, cat_ra, cat_dec, cat_mag, wcs_guess=wcs_guess,
                                 max_offset_arcsec=max_offset_arcsec, max_rotation_deg=max_rotation_deg,
                                 max_scale_error=max_scale_error, n_bright=n_bright,
                                 match_radius_arcsec=match_radius_arcsec)
        solution = _fitted_solution(x, y, cat_ra, cat_dec, match, o, errors)
    except AstrometryError as exc:
        if simplest_model == "tan":
            raise
        solution = _corrected_header(x, y, flux, cat_ra, cat_dec, o, errors, exc)
    fit = solution.fit
    if fit.rms_arcsec > max_arcsec_residual:
        raise AstrometryError(f"rms {fit.rms_arcsec:.3f}\" exceeds max_arcsec_residual "
                              f"{max_arcsec_residual}\" "
                              f"({fit.n_stars} stars, model {solution.model}, sip_order {fit.sip_order})",
                              figures={"rms_arcsec": fit.rms_arcsec, "n_stars": fit.n_stars})
    return solution
