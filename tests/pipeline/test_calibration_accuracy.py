"""Science accuracy of single-image calibration, measured against the simulator's ground truth.

One image is simulated once per module (fixed seeds) and calibrated once by the pure ``compute``
methods of the pipeline steps, with their default parameters and no database:
`Backgrounder` -> `Extractor` -> `AstroCalibrator` -> `PhotoCalibrator`.

The image: 2048 x 2048 pixels of 0.26", a Moffat (beta 3) PSF of FWHM 1.0" (3.85 px) at the
centre that grows by 10 % across the chip, with ellipticity 0.05-0.075 turning by +-20 deg;
1500 stars of Gaia G 14-23 (a moderately crowded field, ~70 000 per square degree: a third
of the stars have a neighbour within 5 FWHM), 50 galaxies, bad columns, cosmic rays,
saturation at 50 000 ADU with bleed trails, a sky of 1000 ADU with a gradient, zero point
31.0 in r; the header WCS is off by 30" and rotated by 1 deg.  60 faint point sources
(r = 23.6-24.6, not in the reference catalog) are injected for the limiting magnitude.

Measured on this image (seed 11; the whole file runs in ~20 s on 2 cores):

* detection: 99.4 % of the 1352 counted stars with S/N > 10 within 1 px;
* PSF fluxes of isolated stars with S/N > 50: median flux/true 1.0001, S/N**2-weighted
  mean 1.0008; pulls (flux - true) / error of isolated stars with 10 < S/N < 500: std 1.04;
* PSF model: largest residual 0.43 % of the peak over the inner chip, 0.79 % in a corner;
* astrometry: 2.4 mas rms for stars with S/N > 20, 2.5 mas rms (6.5 max) over a grid;
* zero point: 0.0016 mag from the truth; aperture corrections: within 0.0005 mag;
* 5-sigma limiting magnitude: within 0.001 mag of the analytic value, 0.007 of forced
  photometry.
(Seeds 12 and 13 give 99.7 / 99.8 %, 0.9999 / 1.0000, 0.99 / 1.01, 0.35 / 0.35 % and 0.61 / 0.48 %,
2.3 / 3.2 mas, 0.0007 / 0.0008 mag, <= 0.0007 mag.)

Each test states its tolerance and what it leaves out, and why.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from astropy.table import Table
from scipy.spatial import cKDTree

from improc.color_transforms import gaia_to_band
from improc.photometry import PhotometryError
from improc.psf_photometry import model_aperture_sums, psf_fluxes
from improc.simulator import SimulatedImage, SimulationParams, simulate_image
from pipeline.astro_cal import AstroCalibrator, AstroCalParams
from pipeline.backgrounding import Backgrounder, BackgroundingParams
from pipeline.catalogs import stars_at_epoch
from improc.source_measurement import SourceMeasurement
from pipeline.extraction import ExtractionParams, Extractor
from improc.photometric_calibration import PhotometricCalibration, calibrate_photometry
from pipeline.photo_cal import PhotoCalibrator, PhotoCalParams

PARAMS = SimulationParams(seed=11, n_stars=1500, pointing_error_arcsec=30.0, rotation_error_deg=1.0)
FWHM = PARAMS.fwhm_arcsec / PARAMS.pixel_scale          # 3.85 px at the chip centre
N_INJECTED = 60


@dataclass
class Calibrated:
    """The simulation and everything the calibration steps made of it."""

    sim: SimulatedImage
    mesh: object
    extraction: SourceMeasurement
    astrometry: object
    photometry: PhotometricCalibration
    calibrators: np.ndarray      # indices into the sources of the stars the zero point used


def _injected_faint_sources() -> Table:
    """Faint point sources on a jittered grid, r = 23.6 to 24.6, around the expected limit."""
    rng = np.random.default_rng(7)
    side = int(np.ceil(np.sqrt(N_INJECTED)))
    grid = (np.arange(side) + 0.5) * (PARAMS.nx / side)
    gx, gy = (g.ravel()[:N_INJECTED] for g in np.meshgrid(grid, grid))
    return Table({"x": gx + rng.uniform(-20, 20, N_INJECTED), "y": gy + rng.uniform(-20, 20, N_INJECTED),
                  "mag": rng.uniform(23.6, 24.6, N_INJECTED)})


def _photometric_calibration(sources: Table, wcs, gaia: Table, mesh, psf,
                             **options) -> tuple[PhotometricCalibration, np.ndarray]:
    """What `PhotoCalibrator.run` does, without the database (its parameters, by name)."""
    params = PhotoCalibrator(params=PhotoCalParams()).params
    ra, dec = wcs.all_pix2world(np.asarray(sources["x"]), np.asarray(sources["y"]), 0)
    cat_ra, cat_dec = stars_at_epoch(gaia, PARAMS.mjd)
    n_ap = len(sources.meta["aperture_radii"])
    result = calibrate_photometry(
        np.asarray(sources["psfflux"]), np.asarray(sources["psffluxerr"]),
        np.column_stack([np.asarray(sources[f"apflux_{i}"]) for i in range(n_ap)]),
        apflux_errs=np.column_stack([np.asarray(sources[f"apfluxerr_{i}"]) for i in range(n_ap)]),
        flags=np.asarray(sources["flags"]), size=np.asarray(sources["fwhm"], float), ra=ra, dec=dec,
        fwhm_pixels=float(sources.meta["fwhm"]), catalog_ra=cat_ra, catalog_dec=cat_dec,
        catalog_g=np.asarray(gaia["phot_g_mean_mag"], float), catalog_bp=np.asarray(gaia["phot_bp_mean_mag"], float),
        catalog_rp=np.asarray(gaia["phot_rp_mean_mag"], float), transform=PARAMS.band_transform, sky_rms=mesh.median_rms,
        psf_stamp=psf.get_clip(PARAMS.nx / 2.0, PARAMS.ny / 2.0),
        **{**params.kwargs_for(calibrate_photometry), **options})
    return result, result.source_index


@pytest.fixture(scope="module")
def calibrated() -> Calibrated:
    sim = simulate_image(PARAMS, transients=_injected_faint_sources())
    mask = sim.flags != 0
    mesh = Backgrounder(params=BackgroundingParams()).compute(sim.data, mask=mask)
    extraction = Extractor(params=ExtractionParams()).compute(
        sim.data, background=mesh.counts(), variance=mesh.variance(), mask=mask,
        gain=PARAMS.gain, saturation=PARAMS.saturation_adu)
    sources = extraction.sources
    astro = AstroCalibrator(params=AstroCalParams())
    use = (np.asarray(sources["flags"]) == 0) & (np.asarray(sources["snr"]) >= astro.params.min_snr)
    solution = astro.compute(np.asarray(sources["x"])[use], np.asarray(sources["y"])[use],
                             np.asarray(sources["psfflux"])[use], sim.gaia, mjd=PARAMS.mjd,
                             wcs_guess=sim.header_wcs, image_shape=(PARAMS.ny, PARAMS.nx))
    photometry, calibrators = _photometric_calibration(sources, solution.wcs, sim.gaia, mesh, extraction.psf)
    return Calibrated(sim=sim, mesh=mesh, extraction=extraction, astrometry=solution,
                      photometry=photometry, calibrators=calibrators)


# ---------------------------------------------------------------------------------------------
# Truth helpers
# ---------------------------------------------------------------------------------------------

def _truth_points(sim: SimulatedImage) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Positions and fluxes of every point source rendered: the stars and the injected ones."""
    stars, extra = sim.stars, sim.transients
    return (np.r_[np.asarray(stars["x"]), np.asarray(extra["x"])],
            np.r_[np.asarray(stars["y"]), np.asarray(extra["y"])],
            np.r_[np.asarray(stars["flux_adu"]), np.asarray(extra["flux_adu"])])


def _isolated(sim: SimulatedImage, *, radius: float, ratio: float) -> np.ndarray:
    """Stars with no other point source above ``ratio`` times their flux within ``radius``
    pixels, no galaxy within twice that, and no flagged pixel within ``radius``."""
    x, y, flux = _truth_points(sim)
    isolated = np.ones(x.size, bool)
    pairs = cKDTree(np.column_stack([x, y])).query_pairs(radius, output_type="ndarray")
    i, j = pairs[:, 0], pairs[:, 1]
    isolated[i[flux[j] > ratio * flux[i]]] = False
    isolated[j[flux[i] > ratio * flux[j]]] = False
    galaxy_distance, _ = cKDTree(np.column_stack([sim.galaxies["x"], sim.galaxies["y"]])).query(
        np.column_stack([x, y]))
    isolated &= galaxy_distance > 2 * radius
    return isolated[:len(sim.stars)] & ~_near_flagged(sim, radius)


def _near_flagged(sim: SimulatedImage, radius: float) -> np.ndarray:
    """Stars whose centroid is within ``radius`` pixels of a flagged pixel (any flag)."""
    fy, fx = np.nonzero(sim.flags)
    distance, _ = cKDTree(np.column_stack([fx, fy])).query(np.column_stack([sim.stars["x"], sim.stars["y"]]))
    return distance <= radius


def _nearest_source(sim: SimulatedImage, sources: Table) -> tuple[np.ndarray, np.ndarray]:
    """For each true star, the distance (pixels) to the nearest source and its index."""
    tree = cKDTree(np.column_stack([sources["x"], sources["y"]]))
    return tree.query(np.column_stack([sim.stars["x"], sim.stars["y"]]))


def _true_psf(sim: SimulatedImage, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """True PSF stamps (n, S, S) with each star at its sub-pixel position relative to the centre
    of the central pixel ``floor(x + 0.5)`` -- the convention of `PixelPSF.get_clip`."""
    x, y = np.atleast_1d(x).astype(float), np.atleast_1d(y).astype(float)
    return sim.psf_field.stamps(x, y, phase_x=x - np.floor(x + 0.5), phase_y=y - np.floor(y + 0.5))


def _true_aperture_fraction(sim: SimulatedImage, x: np.ndarray, y: np.ndarray, radius: float,
                            oversample: int = 9) -> np.ndarray:
    """Fraction of each star's true PSF inside a circle of ``radius`` around its true centre,
    by summing the true pixel values with the exact-to-1/81 pixel area inside the circle."""
    out = np.empty(len(x))
    sub = (np.arange(oversample) + 0.5) / oversample - 0.5
    for start in range(0, len(x), 32):
        xs, ys = np.asarray(x[start:start + 32], float), np.asarray(y[start:start + 32], float)
        stamps = _true_psf(sim, xs, ys)
        h = stamps.shape[1] // 2
        fine = (np.arange(-h, h + 1)[:, None] + sub[None, :]).ravel()
        dx = fine[None, None, :] - (xs - np.floor(xs + 0.5))[:, None, None]
        dy = fine[None, :, None] - (ys - np.floor(ys + 0.5))[:, None, None]
        inside = (dx**2 + dy**2 <= radius**2).reshape(len(xs), 2 * h + 1, oversample, 2 * h + 1, oversample)
        out[start:start + 32] = (stamps * inside.mean(axis=(2, 4))).sum(axis=(1, 2))
    return out


# ---------------------------------------------------------------------------------------------
# Detection
# ---------------------------------------------------------------------------------------------

def _undetectable(sim: SimulatedImage) -> dict[str, np.ndarray]:
    """Stars that no single-image detection can separate or place within 1 px, by reason."""
    stars = sim.stars
    x, y, flux = (np.asarray(stars[c], float) for c in ("x", "y", "flux_adu"))
    edge = 2 * FWHM
    tree = cKDTree(np.column_stack([x, y]))
    pairs = tree.query_pairs(2 * FWHM, output_type="ndarray")
    i, j = pairs[:, 0], pairs[:, 1]
    separation = np.hypot(x[i] - x[j], y[i] - y[j])
    blended = np.zeros(x.size, bool)      # the pair's light-weighted centroid is > 0.5 px away
    blended[i[separation * flux[j] / (flux[i] + flux[j]) > 0.5]] = True
    blended[j[separation * flux[i] / (flux[i] + flux[j]) > 0.5]] = True
    saturated = np.flatnonzero(np.asarray(stars["saturated"]))
    near_saturated = np.zeros(x.size, bool)
    for found in tree.query_ball_point(np.column_stack([x[saturated], y[saturated]]), 5 * FWHM):
        near_saturated[found] = True
    on_galaxy = np.zeros(x.size, bool)
    for galaxy in sim.galaxies:
        reach = 4 * galaxy["r_eff_arcsec"] / PARAMS.pixel_scale + FWHM
        on_galaxy[tree.query_ball_point([galaxy["x"], galaxy["y"]], reach)] |= (
            flux[tree.query_ball_point([galaxy["x"], galaxy["y"]], reach)] < galaxy["flux_adu"])
    return {"edge": (x < edge) | (x > PARAMS.nx - 1 - edge) | (y < edge) | (y > PARAMS.ny - 1 - edge),
            "flagged": _near_flagged(sim, 2 * FWHM), "blended": blended,
            "near_saturated": near_saturated, "on_galaxy": on_galaxy}


def test_detects_99_percent_of_stars_above_snr_10(calibrated):
    """>= 99 % of the true stars with S/N > 10 have a source within 1 px (measured: 99.4 %,
    1344 of 1352).

    Not counted (140 of 1492, some for two reasons; each a star that no single-image detection
    can separate or place within 1 px): stars within 2 FWHM of the image edge (35) or of a
    flagged pixel (23: bad column, saturated or bleed pixel, cosmic ray); stars with a
    neighbour within 2 FWHM whose light moves the pair's centroid by more than 0.5 px (80: one
    detection, at the blend's centroid); stars within 5 FWHM, the PSF's extent, of a saturated
    star (8), whose model cannot be fitted to its masked core; stars within 4 half-light radii
    + 1 FWHM of a brighter galaxy (5), in its light.
    """
    sim, sources = calibrated.sim, calibrated.extraction.sources
    counted = np.asarray(sim.stars["in_image"]) & (np.asarray(sim.stars["snr"]) > 10)
    reasons = _undetectable(sim)
    left_out = counted & np.any(list(reasons.values()), axis=0)
    distance, _ = _nearest_source(sim, sources)
    found = distance[counted & ~left_out] < 1.0
    assert found.size > 1300 and left_out.sum() < 0.12 * counted.sum()
    assert found.mean() >= 0.99, (f"{found.mean():.4f} of {found.size} stars with S/N > 10 found "
                                  f"within 1 px")


# ---------------------------------------------------------------------------------------------
# PSF photometry
# ---------------------------------------------------------------------------------------------

def _isolated_measured(calibrated) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Isolated, unsaturated, detected stars: true flux, S/N, PSF flux and error.

    Isolated: no point source above 1 % of the star's flux within 5 FWHM (the PSF's extent),
    no galaxy within 10 FWHM, no flagged pixel within 5 FWHM.
    """
    sim, sources = calibrated.sim, calibrated.extraction.sources
    distance, index = _nearest_source(sim, sources)
    use = (_isolated(sim, radius=5 * FWHM, ratio=0.01) & ~np.asarray(sim.stars["saturated"])
           & np.asarray(sim.stars["in_image"]) & (distance < 1.0))
    k = index[use]
    return (np.asarray(sim.stars["flux_adu"])[use], np.asarray(sim.stars["snr"])[use],
            np.asarray(sources["psfflux"])[k], np.asarray(sources["psffluxerr"])[k])


def test_psf_fluxes_of_isolated_stars_are_unbiased(calibrated):
    """Isolated unsaturated stars with S/N > 50: median and S/N**2-weighted mean of PSF flux /
    true flux within 0.5 % of 1 (measured 1.0001 and 1.0008 over 306 stars).

    The true flux is the total the simulator added; the PSF model sums to 1 over its ~13 FWHM
    stamp, which holds the whole true PSF (truncated at 5 FWHM).
    """
    true, snr, flux, err = _isolated_measured(calibrated)
    bright = snr > 50
    ratio = flux[bright] / true[bright]
    assert bright.sum() > 150
    assert abs(np.median(ratio) - 1.0) < 0.005
    assert abs(np.average(ratio, weights=(true[bright] / err[bright]) ** 2) - 1.0) < 0.005


def test_psf_flux_errors_describe_the_scatter(calibrated):
    """(flux - true) / error of isolated unsaturated stars with 10 < S/N < 500 has a standard
    deviation in [0.9, 1.1] (measured 1.03 over 877 stars) and a mean within 0.15 of 0 (0.13;
    0.08 before the PSF's wings became a Moffat tail, extraction 1.4: the simulator truncates its
    PSF at 5 FWHM, while the model's tail, fitted out to the stamp's edge, goes on to 6.4 FWHM).

    Above S/N ~ 500 the PSF model's own error (~0.2 % of the flux, see the PSF test) exceeds
    the photon noise, which is all that ``psffluxerr`` contains, and the pulls widen (std 1.14
    over all S/N > 10).
    """
    true, snr, flux, err = _isolated_measured(calibrated)
    use = (snr > 10) & (snr < 500)
    pull = (flux[use] - true[use]) / err[use]
    assert use.sum() > 500 and np.ptp(np.log10(snr[use])) > 1.3
    assert 0.9 <= np.std(pull) <= 1.1
    assert abs(np.mean(pull)) < 0.15


def test_psf_model_matches_the_true_psf(calibrated):
    """Model - truth, as a fraction of the true peak, on a 5 x 5 grid from 30 px off the edges,
    at three sub-pixel positions each (both stamps with the star at the same offset from the
    centre of their central pixel, the truth zero-padded to the model's size).

    Tolerances: < 1 % of the peak anywhere (measured 0.79 %, in a corner; 0.61 and 0.48 % with
    seeds 12 and 13), < 0.6 % over the inner 3 x 3 positions (300-1750 px; 0.43 %) and < 0.45 %
    median over the grid (0.31 %).  The cubic low-rank model (`improc.psf_modes`) is what
    meets 1 % at the corners: a degree-2 pixel polynomial reached 1.3-2.1 % there.
    """
    sim, psf = calibrated.sim, calibrated.extraction.psf
    grid = (30.0, 300.0, 1024.0, 1750.0, 2017.0)
    worst = np.zeros((len(grid), len(grid)))
    for a, gy in enumerate(grid):
        for b, gx in enumerate(grid):
            for fx, fy in ((0.0, 0.0), (0.3, -0.2), (-0.45, 0.45)):
                x, y = gx + fx, gy + fy
                model = psf.get_clip(x, y)
                truth = _true_psf(sim, x, y)[0]
                h, t = model.shape[0] // 2, truth.shape[0] // 2
                assert h >= t, "the model stamp must cover the true PSF's support"
                padded = np.zeros_like(model)
                padded[h - t:h + t + 1, h - t:h + t + 1] = truth
                worst[a, b] = max(worst[a, b], np.abs(model - padded).max() / truth.max())
    assert worst.max() < 0.01, worst
    assert worst[1:4, 1:4].max() < 0.006, worst
    assert np.median(worst) < 0.0045, worst


# ---------------------------------------------------------------------------------------------
# Astrometry
# ---------------------------------------------------------------------------------------------

def test_astrometry_recovers_a_header_off_by_30_arcsec_and_1_degree(calibrated):
    """The matching finds the header's error: shift within 1" of 30", rotation within 0.02 deg
    of 1 deg; the fit uses > 500 stars with an rms residual < 0.05"."""
    solution = calibrated.astrometry
    transform = solution.initial_match.transform
    assert np.hypot(*transform.shift_arcsec) == pytest.approx(PARAMS.pointing_error_arcsec, abs=1.0)
    assert abs(transform.rotation_deg) == pytest.approx(abs(PARAMS.rotation_error_deg), abs=0.02)
    assert solution.n_matches > 500
    assert solution.rms_arcsec < 0.05


def test_fitted_wcs_matches_the_truth_to_20_mas(calibrated):
    """The fitted WCS evaluated at the TRUE pixel positions of stars with S/N > 20 against their
    true (image-epoch) RA, Dec: rms <= 20 mas (measured 2.4 mas); over a 30 x 30 grid covering
    the chip against the true TAN-SIP WCS: rms <= 20 mas (2.5 mas) and max <= 50 mas (6.5)."""
    sim, wcs = calibrated.sim, calibrated.astrometry.wcs
    stars = sim.stars[np.asarray(sim.stars["in_image"]) & (np.asarray(sim.stars["snr"]) > 20)]
    ra, dec = wcs.all_pix2world(np.asarray(stars["x"]), np.asarray(stars["y"]), 0)
    offset = _offset_mas(ra, dec, np.asarray(stars["ra"]), np.asarray(stars["dec"]))
    assert len(stars) > 1000
    assert np.sqrt(np.mean(offset**2)) <= 20.0
    gx, gy = (g.ravel() for g in np.meshgrid(np.linspace(0, PARAMS.nx - 1, 30), np.linspace(0, PARAMS.ny - 1, 30)))
    grid = _offset_mas(*wcs.all_pix2world(gx, gy, 0), *sim.true_wcs.all_pix2world(gx, gy, 0))
    assert np.sqrt(np.mean(grid**2)) <= 20.0
    assert grid.max() <= 50.0


def _offset_mas(ra1, dec1, ra2, dec2) -> np.ndarray:
    """On-sky distance in milliarcseconds (small-angle)."""
    dra = (np.asarray(ra1) - np.asarray(ra2) + 180.0) % 360.0 - 180.0
    return 3.6e6 * np.hypot(dra * np.cos(np.radians(dec2)), np.asarray(dec1) - np.asarray(dec2))


# ---------------------------------------------------------------------------------------------
# Photometric calibration
# ---------------------------------------------------------------------------------------------

def test_zero_point_within_5_mmag(calibrated):
    """|zp - true| <= 0.005 mag (measured 0.0016), with zp defined by
    ``mag = -2.5 log10(PSF flux) + zp`` and the PSF flux a total flux (see the flux test); the
    band magnitudes follow from Gaia by the same transformation the simulator used."""
    fit = calibrated.photometry.fit
    assert fit.n_stars > 500
    assert abs(fit.zp - PARAMS.zero_point) <= 0.005


def test_aperture_corrections_within_5_mmag(calibrated):
    """Each aperture correction within 0.005 mag of the truth (measured: -0.0005, +0.0005,
    +0.0001, +0.0004 for the 1, 2, 3, 5 FWHM apertures).

    The true correction of a star is 2.5 log10 of the fraction of its true PSF inside the
    aperture around its true centre.  It varies over the chip (the 1-FWHM one by 1 % rms, 0.01
    mag between the centre and the mean), so the truth is 2.5 log10 of the mean true fraction
    over the stars the zero point used: `PhotoCalibrator.compute` combines them by a
    random-effects mean, which weighs them nearly equally where that variation dominates.
    """
    sim, sources, result = calibrated.sim, calibrated.extraction.sources, calibrated.photometry
    used = calibrated.calibrators[result.fit.used]
    distance, index = cKDTree(np.column_stack([sim.stars["x"], sim.stars["y"]])).query(
        np.column_stack([sources["x"][used], sources["y"][used]]))
    assert np.median(distance) < 0.1
    true_x, true_y = np.asarray(sim.stars["x"])[index], np.asarray(sim.stars["y"])[index]
    for i, radius in enumerate(sources.meta["aperture_radii"]):
        truth = 2.5 * np.log10(np.mean(_true_aperture_fraction(sim, true_x, true_y, radius)))
        assert result.aper_cors[i] == pytest.approx(truth, abs=0.005), f"aperture {i}, r = {radius:.2f} px"


def test_two_calibrators_take_aperture_corrections_from_the_psf_model(calibrated):
    """With two calibrators (``min_stars=2``), too few to measure aperture corrections, they
    come from the PSF model's fractions in the apertures at those stars: within 0.005 mag of
    the truth for two stars at opposite corners, where the PSF differs most from the chip's
    mean (measured: -0.0003, -0.0005, -0.0011, -0.0008 for the 1, 2, 3, 5 FWHM apertures).
    Without the fractions photocal refuses."""
    sim, sources, extraction = calibrated.sim, calibrated.extraction.sources, calibrated.extraction
    used = calibrated.calibrators[calibrated.photometry.fit.used]
    x, y = np.asarray(sources["x"])[used], np.asarray(sources["y"])[used]
    pair = used[[np.argmin(x + y), np.argmax(x + y)]]            # lower-left and upper-right
    distance, index = cKDTree(np.column_stack([sim.stars["x"], sim.stars["y"]])).query(
        np.column_stack([sources["x"][pair], sources["y"][pair]]))
    assert distance.max() < 0.2
    true_x, true_y = np.asarray(sim.stars["x"])[index], np.asarray(sim.stars["y"])[index]
    assert np.hypot(true_x[1] - true_x[0], true_y[1] - true_y[0]) > 0.7 * np.hypot(PARAMS.nx, PARAMS.ny)
    radii = sources.meta["aperture_radii"]
    pair_x, pair_y = np.asarray(sources["x"])[pair], np.asarray(sources["y"])[pair]

    def fractions(rows):
        return model_aperture_sums(extraction.psf, pair_x[rows], pair_y[rows], 1.0, radii)

    two = sources[pair]
    two.meta.update(sources.meta)
    gaia = sim.gaia[np.isin(sim.gaia["source_id"], np.asarray(sim.stars["source_id"])[index])]
    result, _ = _photometric_calibration(two, calibrated.astrometry.wcs, gaia, calibrated.mesh, extraction.psf,
                                         min_stars=2, model_fractions=fractions)
    assert result.fit.n_stars == 2 and result.aper_cors_from == "psf_model" and not result.few_stars
    flux, err = np.asarray(two["psfflux"]), np.asarray(two["psffluxerr"])
    sigma = np.sqrt((1.0857 * err / flux) ** 2 + 0.01**2)        # fit_zero_point's default error floor
    assert abs(result.fit.zp - PARAMS.zero_point) <= 3.0 / np.sqrt(np.sum(sigma**-2.0))
    truth = [2.5 * np.log10(np.mean(_true_aperture_fraction(sim, true_x, true_y, r))) for r in radii]
    assert np.abs(result.aper_cors - truth).max() <= 0.005, f"model - truth {result.aper_cors - truth}"
    with pytest.raises(PhotometryError, match="aperture corrections need 3 stars"):
        _photometric_calibration(two, calibrated.astrometry.wcs, gaia, calibrated.mesh, extraction.psf,
                                 min_stars=2)
    # one calibrator: a zero point flagged few_stars, whose error holds the prior scatter
    one = sources[pair[:1]]
    one.meta.update(sources.meta)
    single, _ = _photometric_calibration(one, calibrated.astrometry.wcs, gaia, calibrated.mesh, extraction.psf,
                                         fewest_stars=1, model_fractions=lambda rows: fractions(rows[:1]))
    assert single.few_stars and single.fit.n_stars == 1
    assert single.fit.dzp >= 0.03 and abs(single.fit.zp - PARAMS.zero_point) < 2 * single.fit.dzp


def test_limiting_magnitude_matches_analytic_and_injected_sources(calibrated):
    """The 5-sigma limiting magnitude within 0.1 mag of (measured: 24.050 vs 24.049 and 24.043):

    * the analytic limit, the magnitude whose optimal S/N with the true PSF on the true sky
      at the chip centre is 5 (photon noise of sky and source, read noise);
    * forced PSF photometry of the injected faint sources at their true positions: the
      magnitude at which their median flux error is a fifth of the flux, with the true zero
      point.
    """
    sim, result, psf = calibrated.sim, calibrated.photometry, calibrated.extraction.psf
    stamp = _true_psf(sim, PARAMS.nx / 2.0, PARAMS.ny / 2.0)[0]
    sky = float(sim.sky[PARAMS.ny // 2, PARAMS.nx // 2])

    def snr(flux: float) -> float:
        counts = flux * stamp
        variance = (sky + counts) / PARAMS.gain + (PARAMS.read_noise / PARAMS.gain) ** 2
        return float(np.sqrt(np.sum(counts**2 / variance)))

    flux = 10 ** np.linspace(2, 4, 2001)
    analytic = PARAMS.zero_point - 2.5 * np.log10(np.interp(5.0, [snr(f) for f in flux], flux))
    injected = sim.transients
    forced = psf_fluxes(sim.data, np.asarray(injected["x"]), np.asarray(injected["y"]), psf,
                        background=calibrated.mesh.counts(), variance=calibrated.mesh.variance(),
                        mask=sim.flags != 0)
    measured = PARAMS.zero_point - 2.5 * np.log10(5.0 * np.nanmedian(forced.flux_err))
    assert result.lim_mag == pytest.approx(analytic, abs=0.1)
    assert result.lim_mag == pytest.approx(measured, abs=0.1)
