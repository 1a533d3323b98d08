"""A PSF as a mean stamp plus a few pixel modes with polynomial coefficients, fitted to star stamps.

`fit_psf` (``improc.psf_fit``) works on each star's estimate of the PSF moved onto the model's
pixel grid, ``Y_n`` (``P = size**2`` pixels), with weights ``W_n``.  The model is

    Y(x, y) = phi[0] + sum_m c_m(x, y) phi[m],        c_m(x, y) = sum_t coef[m, t] * monomial_t(u, v),

``K`` pixel modes ``phi[1:]`` whose amplitudes ``c_m`` are polynomials of the scaled position
(`improc.psf.monomials`).  The same model is a `~improc.psf.PixelPSF` of the coefficients' degree
whose basis has rank ``K`` in its non-constant terms (`to_basis`).

A pixel-wise polynomial (PSFEx) is the special case of one mode per non-constant monomial;
it is what the first passes of the fit use, and where the modes come from
(`principal_modes`).  Fewer modes than terms have much less noise: each pixel has ``1 + K``
unknowns instead of ``n_terms``, and the ``K x n_terms`` coefficients are fitted with every pixel
of every star.  So the coefficients can be of higher degree (e.g. cubic, needed to follow a FWHM
that varies quadratically over the chip) without the noise of a cubic pixel-wise fit.
Modes and coefficients are fitted alternately (`fit_modes`, `fit_coefficients`), both linear
least squares.
"""

from __future__ import annotations

import numpy as np
import scipy.fft

from improc.psf import exponents

__all__ = ["embed_coefficients", "to_basis", "fit_modes", "fit_coefficients", "normalized", "recentred",
           "principal_modes", "denoised", "radial_wings"]


def embed_coefficients(coef: np.ndarray, degree: int, new_degree: int) -> np.ndarray:
    """The same polynomials, written over the monomials of a degree >= ``degree``."""
    new = exponents(new_degree)
    out = np.zeros((coef.shape[0], len(new)))
    for k, e in enumerate(exponents(degree)):
        out[:, new.index(e)] = coef[:, k]
    return out


def to_basis(phi: np.ndarray, coef: np.ndarray) -> np.ndarray:
    """The polynomial basis (n_terms, S, S) of a `PixelPSF` equal to the model (phi, coef)."""
    basis = np.tensordot(coef.T, phi[1:], axes=1)
    basis[0] += phi[0]
    return basis


def fit_modes(y: np.ndarray, w: np.ndarray, features: np.ndarray,
              previous: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-wise weighted least squares of the stars' stamps on their features.

    Parameters
    ----------
    y, w : ndarray
        (n, P) stars' stamps on the model grid and their weights.
    features : ndarray
        (n, F): 1 and the modes' amplitudes at each star.
    previous : ndarray, optional
        (F, P) the current mean stamp and modes: a pixel that no star constrains (every star's
        pixel rejected) keeps its value instead of dropping to 0.

    Returns
    -------
    phi : ndarray
        (F, P), the mean stamp and the modes.
    normal : ndarray
        (P, F, F), the normal matrices (their inverses are the pixels' covariances).
    """
    n, f = features.shape
    # sums over the stars as matrix products: no (n, P, F) temporary
    pairs = (features[:, :, None] * features[:, None, :]).reshape(n, f * f)
    normal = (w.T @ pairs).reshape(-1, f, f)                          # (P, F, F)
    rhs = (w * y).T @ features                                        # (P, F)
    ridge = 1e-9 * np.trace(normal, axis1=1, axis2=2)[:, None] + 1e-300
    if previous is not None:       # a ridge towards the current values rather than towards 0
        rhs = rhs + ridge * previous.T
    phi = np.linalg.solve(normal + ridge[:, :, None] * np.eye(features.shape[1]), rhs[:, :, None])[:, :, 0]
    return phi.T, normal


def fit_coefficients(y: np.ndarray, w: np.ndarray, monos: np.ndarray, phi: np.ndarray) -> np.ndarray:
    """Weighted least squares of the modes' polynomial coefficients, the modes fixed.

    Parameters
    ----------
    y, w : ndarray
        (n, P) stars' stamps on the model grid and their weights.
    monos : ndarray
        (n, T) monomials at the stars.
    phi : ndarray
        (1 + K, P) mean stamp and modes.

    Returns
    -------
    ndarray
        (K, T) coefficients.
    """
    modes = phi[1:]
    k, t = modes.shape[0], monos.shape[1]
    if k == 0:
        return np.zeros((0, t))
    # sums over the pixels as matrix products: no (n, K, P) temporary
    cross = (w @ (modes[:, None, :] * modes[None, :, :]).reshape(k * k, -1).T).reshape(-1, k, k)   # (n, K, K)
    proj = (w * (y - phi[0])) @ modes.T                              # (n, K)
    normal = np.einsum("nkl,nt,ns->ktls", cross, monos, monos, optimize=True).reshape(k * t, k * t)
    rhs = np.einsum("nk,nt->kt", proj, monos).ravel()
    normal += (1e-12 * np.trace(normal) / (k * t) + 1e-300) * np.eye(k * t)
    return np.linalg.solve(normal, rhs).reshape(k, t)


def normalized(phi: np.ndarray, coef: np.ndarray | None = None, monos: np.ndarray | None = None,
               star_weight: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """The same model with the mean stamp summing to 1 and every mode to 0 (so the PSF sums to 1
    everywhere); given the coefficients (and the stars' monomials and weights), also each mode's
    amplitude of zero weighted mean over the stars (its mean goes into the mean stamp) and each
    mode of unit norm (its scale goes into the coefficients)."""
    phi = phi / phi[0].sum()
    phi[1:] -= phi[1:].sum(axis=(1, 2))[:, None, None] * phi[0]
    if coef is None or len(coef) == 0:
        return phi, coef
    coef = coef.copy()
    mean = (star_weight @ (monos @ coef.T)) / star_weight.sum()
    coef[:, 0] -= mean
    phi[0] = phi[0] + np.tensordot(mean, phi[1:], axes=1)
    norm = np.sqrt((phi[1:] ** 2).sum(axis=(1, 2)))
    norm[norm == 0] = 1.0
    phi[1:] /= norm[:, None, None]
    coef *= norm[:, None]
    return phi, coef


def recentred(phi: np.ndarray, sigma: float) -> np.ndarray:
    """Shift the mean stamp and every mode so that their first moments in a Gaussian window vanish.

    Then the model's centroid (windowed, as for a windowed centroid) is the centre of its central
    pixel at every position: this fixes the convention for a star's centre and removes the
    degeneracy between the model's centring and the stars' fitted positions.
    """
    size = phi.shape[1]
    off = np.arange(size) - size // 2
    window = np.exp(-0.5 * (off[None, :] ** 2 + off[:, None] ** 2) / sigma**2)
    moments = np.stack([window * off[None, :], window * off[:, None]])       # x and y weights
    spectrum = scipy.fft.rfft2(phi[0])
    grads = np.stack([scipy.fft.irfft2(spectrum * (2j * np.pi * f), s=(size, size))
                      for f in (scipy.fft.rfftfreq(size)[None, :], scipy.fft.fftfreq(size)[:, None])])
    response = np.einsum("myx,gyx->mg", moments, grads)                    # moment m per gradient g
    for _ in range(2):
        first = np.einsum("myx,kyx->km", moments, phi)
        amounts = -np.linalg.solve(response, first.T).T                    # (F, 2)
        phi = phi + np.einsum("kg,gyx->kyx", amounts, grads)
    return phi


def principal_modes(basis: np.ndarray, normal: np.ndarray, monos: np.ndarray, star_weight: np.ndarray,
                    core: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The modes of a pixel-wise polynomial model that the stars detect above the noise.

    The non-constant terms, scaled by the spread of the stars' (weighted) monomials, are
    decomposed over the core pixels (SVD in term space); a mode is kept if its energy exceeds
    three times the noise energy that the fit's normal matrices predict for it.

    Parameters
    ----------
    basis : ndarray
        (T, S, S) pixel-wise polynomial model.
    normal : ndarray
        (S*S, T, T) normal matrices of its fit.
    monos, star_weight : ndarray
        (n, T) monomials at the stars and (n,) the stars' total weights.
    core : ndarray of bool
        (S, S) pixels where modes are detected.

    Returns
    -------
    phi : ndarray
        (1 + K, S, S): the mean stamp (the model at the stars' weighted mean position with the
        undetected variation) and the K detected modes.
    coef : ndarray
        (K, T) the modes' coefficients over the same monomials.
    """
    t = basis.shape[0]
    flat = basis.reshape(t, -1)
    w = star_weight / star_weight.sum()
    mean = w @ monos
    centred = monos[:, 1:] - mean[1:]
    evals, evecs = np.linalg.eigh((centred * w[:, None]).T @ centred) if t > 1 else (np.ones(0), None)
    if t == 1 or evals.min() <= 1e-12 * evals.max():        # no variation, or the stars cannot tell
        return basis.copy(), np.eye(t)[1:]
    half = (evecs * np.sqrt(evals)) @ evecs.T
    core = core.ravel()
    u, s, _ = np.linalg.svd(half @ flat[1:, core], full_matrices=False)
    cov = np.linalg.pinv(normal[core], hermitian=True)[:, 1:, 1:].sum(axis=0)
    noise = np.einsum("kj,kl,lj->j", u, half @ cov @ half, u)
    keep = u[:, s**2 > 2.0 * noise]                                       # (T - 1, K)
    modes = keep.T @ (half @ flat[1:])                                     # (K, P)
    coef = np.zeros((keep.shape[1], t))
    coef[:, 1:] = np.linalg.solve(half, keep).T
    variation = coef[:, 1:].T @ modes
    constant = flat[0] + mean[1:] @ (flat[1:] - variation)
    return np.vstack([constant[None], modes]).reshape((-1,) + basis.shape[1:]), coef



def denoised(phi: np.ndarray) -> np.ndarray:
    """The modes (not the mean stamp) with white pixel noise suppressed by a Wiener filter.

    Each mode's power, averaged in annuli of spatial frequency, is compared with its noise floor,
    the median power at the highest frequencies (beyond 0.4 cycles per pixel, where a PSF of
    FWHM >~ 2.5 px has no power); frequencies are weighted by (power - noise) / power.
    """
    size = phi.shape[1]
    fy = scipy.fft.fftfreq(size)[:, None]
    fx = scipy.fft.rfftfreq(size)[None, :]
    k = np.hypot(fx, fy)
    bins = np.minimum((k * size).astype(int), size // 2 + 1)
    out = phi.copy()
    spectra = scipy.fft.rfft2(phi[1:])
    for m, spectrum in enumerate(spectra, start=1):
        power = np.abs(spectrum) ** 2
        noise = np.median(power[k > 0.4])
        mean = np.bincount(bins.ravel(), power.ravel(), minlength=bins.max() + 1)
        count = np.bincount(bins.ravel(), minlength=bins.max() + 1)
        radial = mean / np.maximum(count, 1)
        gain = np.clip(1.0 - noise / np.maximum(radial, 1e-300), 0.0, 1.0)[bins]
        out[m] = scipy.fft.irfft2(spectrum * gain, s=(size, size))
    return out


def radial_wings(basis: np.ndarray, radius: float, *, fit_range: tuple[float, float] | None = None,
                 taper: float | None = None) -> np.ndarray:
    """A `~improc.psf.PixelPSF` basis whose wings beyond ``radius`` are a Moffat tail fitted to the
    constant term's azimuthal profile.

    Beyond a few FWHM a star stamp's pixels hold ~1e-5 of its flux each, far below the noise of
    any star but the brightest, so a pixel-wise fit puts there noise and the light of unmasked
    neighbours: on a 512 x 512 field with ~200 PSF stars the wings beyond 3 FWHM of a fitted
    model summed to -15 % .. +30 % of the flux (the truth: +1 %), in blobs of a few per mille of
    the peak.  A ZOGY subtraction divides by the sharper PSF at high frequencies and turns those
    wings, times a bright star's flux, into a square patch of residuals the size of the stamp.

    The constant term's azimuthal mean (annuli of rounded distance, the mean of the pixels within
    3 sigma of the annulus's median) is fitted over ``fit_range`` by
    ``A (1 + r**2 / alpha**2)**-beta``: ``alpha`` makes the Moffat's FWHM the model's (from its
    area above half maximum), ``beta`` is the best of a grid from 2 to 12 (a tail that falls at
    least as r**-4, so that noise cannot extrapolate into a large flux at the stamp's corners)
    and ``A >= 0`` is linear, each annulus weighted by the inverse variance of its mean (its
    pixels' robust scatter over their number).  Each other term gets the same tail with the
    amplitude that fits its own profile, if 3 sigma from 0 (else none): the wings' flux varies
    over the image only as far as the stars measure it.  Inside ``radius - taper`` the basis is
    untouched; between, a cosine taper goes from the model to the tail; beyond ``radius`` the
    wings are the tails only.  Then the constant term is scaled to sum to 1 and the others are
    made to sum to 0 by subtracting a multiple of it.

    Parameters
    ----------
    basis : numpy.ndarray
        (n_terms, size, size) basis; ``basis[0]`` is the model at the reference position and
        sums to 1, the other terms sum to 0.
    radius : float
        Distance from the central pixel (pixels) beyond which the wings are the tail (> 0).
    fit_range : tuple of float, optional
        Inner and outer distances (pixels) of the annuli the tail is fitted to; None means
        ``(2/3, 4/3) * radius`` (2 to 4 FWHM for a radius of 3 FWHM).  The outer one is cut at
        the stamp's edge.
    taper : float, optional
        Width (pixels, >= 0) of the blend inside ``radius``; None means ``radius / 6``.

    Returns
    -------
    numpy.ndarray
        The new basis, ``basis[0]`` summing to 1 and the other terms to 0 (so the model still
        sums to 1 at every position).

    Raises
    ------
    ValueError
        If ``radius`` is not > 0, ``fit_range`` not two distances with ``0 <= inner < outer``,
        ``taper`` not in [0, radius], or the basis not a stack of odd square stamps.
    """
    basis = np.asarray(basis, dtype=float)
    if basis.ndim != 3 or basis.shape[1] != basis.shape[2] or basis.shape[1] % 2 == 0:
        raise ValueError(f"basis must be (n_terms, size, size) with an odd size, got shape {basis.shape}")
    if not (np.isfinite(radius) and radius > 0):
        raise ValueError(f"radius must be > 0, got {radius!r}")
    inner, outer = (2.0 * radius / 3.0, 4.0 * radius / 3.0) if fit_range is None else fit_range
    if not (np.isfinite(inner) and np.isfinite(outer) and 0 <= inner < outer):
        raise ValueError(f"fit_range must be (inner, outer) with 0 <= inner < outer, got {fit_range!r}")
    taper = radius / 6.0 if taper is None else taper
    if not (np.isfinite(taper) and 0 <= taper <= radius):
        raise ValueError(f"taper must be in [0, radius = {radius}], got {taper!r}")
    size = basis.shape[1]
    off = np.arange(size) - size // 2
    distance = np.hypot(off[None, :], off[:, None])
    if not (distance > radius - taper).any():
        return basis.copy()
    outer = min(outer, size // 2)
    tail = _moffat_shape(basis[0], distance, inner, outer)
    blend = np.clip((radius - distance) / taper, 0.0, 1.0) if taper > 0 else (distance <= radius) * 1.0
    blend = 0.5 - 0.5 * np.cos(np.pi * blend)            # 1 inside radius - taper, 0 beyond radius
    out = basis * blend
    for term, stamp in enumerate(basis):
        out[term] += (1.0 - blend) * _tail_amplitude(stamp, tail, distance, inner, outer,
                                                     constant=term == 0) * tail
    out[0] /= out[0].sum()
    out[1:] -= out[1:].sum(axis=(1, 2))[:, None, None] * out[0]
    return out


def _profile(stamp: np.ndarray, distance: np.ndarray, inner: float,
             outer: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The stamp's azimuthal mean in the annuli of rounded distance from ``inner`` to ``outer``:
    their radii, means (of the pixels within 3 sigma of the median) and the means' inverse
    variances (the pixels' robust scatter squared over their number)."""
    ring = np.rint(distance).astype(int).ravel()
    values = stamp.ravel()
    radii, means, variances = [], [], []
    floor = 1e-12 * np.abs(stamp).max() + 1e-300
    for k in range(int(np.ceil(inner)), int(np.floor(outer)) + 1):
        pixels = values[ring == k]
        if pixels.size < 4:
            continue
        median = np.median(pixels)
        scatter = max(1.4826 * np.median(np.abs(pixels - median)), floor)
        kept = pixels[np.abs(pixels - median) <= 3.0 * scatter]
        radii.append(k)
        means.append(kept.mean())
        variances.append(scatter**2 / kept.size)
    return np.array(radii, float), np.array(means), 1.0 / np.array(variances)


def _moffat_shape(stamp: np.ndarray, distance: np.ndarray, inner: float, outer: float) -> np.ndarray:
    """``(1 + distance**2 / alpha**2)**-beta`` of the stamp's FWHM and the ``beta`` that fits its
    profile between ``inner`` and ``outer`` best (see `radial_wings`)."""
    radii, means, inv_var = _profile(stamp, distance, inner, outer)
    fwhm = 2.0 * np.sqrt(np.count_nonzero(stamp >= 0.5 * stamp.max()) / np.pi)
    best, best_chi2 = 3.0, np.inf
    for beta in np.geomspace(2.0, 12.0, 50):
        alpha2 = fwhm**2 / (4.0 * (2.0 ** (1.0 / beta) - 1.0))
        shape = (1.0 + radii**2 / alpha2) ** -beta
        amplitude = max((inv_var * shape * means).sum() / (inv_var * shape**2).sum(), 0.0)
        chi2 = (inv_var * (means - amplitude * shape) ** 2).sum()
        if chi2 < best_chi2:
            best, best_chi2 = beta, chi2
    alpha2 = fwhm**2 / (4.0 * (2.0 ** (1.0 / best) - 1.0))
    return (1.0 + distance**2 / alpha2) ** -best


def _tail_amplitude(stamp: np.ndarray, tail: np.ndarray, distance: np.ndarray, inner: float, outer: float,
                    *, constant: bool) -> float:
    """Weighted least-squares amplitude of the tail's profile on the stamp's between ``inner`` and
    ``outer``: for the constant term at least 0, for a variation term 0 unless 3 sigma from 0 (so
    that the wings vary over the image only as far as the stars measure it); 0 if no annulus."""
    radii, means, inv_var = _profile(stamp, distance, inner, outer)
    if radii.size == 0:
        return 0.0
    shape = _profile(tail, distance, inner, outer)[1]
    information = (inv_var * shape**2).sum()
    amplitude = (inv_var * shape * means).sum() / information
    if constant:
        return max(amplitude, 0.0)
    return amplitude if amplitude**2 * information > 9.0 else 0.0
