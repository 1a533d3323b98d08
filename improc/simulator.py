"""Simulated astronomical images with exact ground truth, reproducible from a seed.

`simulate_image` renders stars (from a given scene catalog, or drawn with counts rising as
``10**(0.3 m)``) and Sersic galaxies with a spatially varying Moffat PSF (`improc.sim_psf`) on
a sky with a gradient, reads them out through a detector with Poisson and read noise, gain,
saturation with bleed trails, bad columns and cosmic rays (`improc.sim_detector`), and returns
with the image its true TAN-SIP WCS, a wrong header WCS (`improc.sim_wcs`), truth tables and a
Gaia-like reference catalog whose positions are at the catalog epoch (`improc.sim_catalogs`).

Photometric truth: a star of Gaia magnitudes G, BP, RP has the band magnitude
``mag = transform(G, BP, RP) + color_term * (BP - RP - 1)`` and adds exactly
``flux_adu = 10**(-0.4 * (mag - zero_point))`` ADU to the image (total over the exposure).
Astrometric truth: its position at the image epoch is the catalog position moved by its proper
motion (`improc.sim_catalogs.propagate_positions`), and its centroid ``x, y`` (0-based) is that
position through the true WCS.  ``transform`` is the simulated camera's Gaia-to-band
transformation (`improc.color_transforms.BandTransform`); by default the ``Synthetic``
instrument's, DECam's published one (``decam_zhou2020``) for g, r, i, z and ``m = G`` for other
bands.  Give another to simulate another camera (``SimulatedImage.params.band_transform`` is the
one used).

Two images of the same sky with different noise, PSF, pointing or epoch: give them the same
``scene_seed`` (and footprint), or pass ``stars=first.star_catalog, galaxies=first.galaxies``.
For example, a reference and a new image with a supernova in a galaxy::

    ref = simulate_image(SimulationParams(nx=1024, ny=1024, seed=1))
    sn = place_transients_in_hosts(ref.galaxies, [20.5], np.random.default_rng(0))
    new = simulate_image(SimulationParams(nx=1024, ny=1024, seed=2, fwhm_arcsec=1.3,
                                          mjd=60300.0, pointing_error_arcsec=5.0),
                         stars=ref.star_catalog, galaxies=ref.galaxies, transients=sn)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from astropy.io import fits
from astropy.table import Table
from astropy.time import Time
from astropy.wcs import WCS

from improc import sim_catalogs, sim_detector, sim_galaxies, sim_wcs
from improc.color_transforms import DECAM_ZHOU2020, BandTransform
from improc.sim_psf import PsfField, render_point_sources

__all__ = ["SimulationParams", "SimulatedImage", "simulate_image", "make_star_catalog",
           "place_transients_in_hosts"]

place_transients_in_hosts = sim_galaxies.place_transients_in_hosts

_SQ_ARCSEC_PER_SQ_DEG = 3600.0**2


def _param(default: Any, doc: str) -> Any:
    """A dataclass field with its documentation in ``metadata['doc']``."""
    return field(default=default, metadata={"doc": doc})


@dataclass(frozen=True, kw_only=True)
class SimulationParams:
    """Everything that defines a simulated image; each field's doc is in ``metadata['doc']``.

    Raises
    ------
    ValueError
        On construction, if a field is out of its range (the message names the field).
    """

    nx: int = _param(2048, "Image width, pixels (1..8192).")
    ny: int = _param(2048, "Image height, pixels (1..8192).")
    pixel_scale: float = _param(0.26, "Pixel scale at the image centre, arcsec/pixel.")
    ra: float = _param(150.0, "True RA of the image centre, degrees.")
    dec: float = _param(2.0, "True Dec of the image centre, degrees (|dec| < 89).")
    band: str = _param("r", "Band (FILTER); with transform None, also picks the Gaia color transformation.")
    transform: BandTransform | None = _param(None, "Gaia-to-band transformation of the simulated camera; "
                                                   "None: the Synthetic instrument's (DECam's published one "
                                                   "for g, r, i, z, m = G otherwise).")
    exp_time: float = _param(60.0, "Exposure time, s (header only: counts are per exposure).")
    mjd: float = _param(60000.0, "MJD of the exposure; sets the image epoch.")
    catalog_epoch: float = _param(2016.0, "Epoch of the reference catalog, Julian years.")
    airmass: float = _param(1.2, "Airmass (header only).")
    fwhm_arcsec: float = _param(1.0, "PSF FWHM at the image centre, arcsec.")
    fwhm_variation: float = _param(0.1, "Fractional FWHM change from corner (0, 0) to corner "
                                        "(nx-1, ny-1); in [0, 0.5].")
    ellipticity: float = _param(0.05, "PSF ellipticity 1 - b/a at the centre (1.5x at the "
                                      "corners); in [0, 0.6).")
    psf_position_angle_deg: float = _param(30.0, "PSF major axis at the centre, degrees "
                                                 "counter-clockwise from +x.")
    moffat_beta: float = _param(3.0, "Moffat power index (> 1.5).")
    psf_radius_fwhm: float = _param(5.0, "PSF support radius (end of the taper), in FWHM.")
    psf_oversample: int = _param(3, "Sub-pixel samples per axis integrating the PSF (1..9).")
    sky_adu: float = _param(1000.0, "Sky at the image centre, ADU per pixel (>= 0).")
    sky_gradient: float = _param(0.05, "Fractional sky change from left to right edge (half "
                                       "that from bottom to top); |value| < 1.")
    gain: float = _param(4.0, "Gain, electrons per ADU.")
    read_noise: float = _param(5.0, "Read noise, electrons.")
    saturation_adu: float = _param(50000.0, "Saturation, ADU; full well = saturation * gain.")
    bleed_trails: bool = _param(True, "Spill charge above the full well along columns.")
    zero_point: float = _param(31.0, "mag = -2.5 log10(total ADU) + zero_point.")
    color_term: float = _param(0.0, "Extra color term: mag += color_term * (BP - RP - 1).")
    n_stars: int | None = _param(None, "Stars over the image footprint (the catalog area "
                                       "beyond it gets as many per area); None: star_density.")
    star_density: float = _param(10000.0, "Stars per square degree in star_mag_range.")
    star_mag_range: tuple[float, float] = _param((14.0, 23.0), "(bright, faint) G range.")
    catalog_margin_arcsec: float = _param(60.0, "Stars are drawn over the footprint plus this "
                                                "margin on each side, arcsec.")
    gaia_missing_fraction: float = _param(0.0, "Fraction of stars missing from the Gaia "
                                               "catalog; in [0, 1).")
    n_galaxies: int = _param(50, "Galaxies over the image.")
    galaxy_mag_range: tuple[float, float] = _param((17.0, 22.0), "(bright, faint) galaxy "
                                                                 "magnitudes in the band.")
    n_cosmic_rays: int = _param(20, "Cosmic-ray hits (1-3 pixels each).")
    n_bad_columns: int = _param(2, "Bad (dead or hot, whole or partial) columns.")
    sip_amplitude_pix: float = _param(2.0, "Corner displacement of the radial SIP term, pixels "
                                           "(at >= 1000 pixels from the centre); 0..20.")
    pointing_error_arcsec: float = _param(0.0, "Header pointing error, arcsec (0..3600); "
                                               "direction drawn from the seed.")
    rotation_error_deg: float = _param(0.0, "Header rotation error, degrees (|value| <= 10).")
    noise: bool = _param(True, "Add Poisson and read noise (False: noiseless, for tests; "
                               "cosmic rays and bad columns still follow their counts).")
    seed: int = _param(42, "Seed of the exposure (noise, detector, header pointing error).")
    scene_seed: int | None = _param(None, "Seed of the sky (stars, galaxies, missing Gaia "
                                          "stars); None: use seed.")
    detector_seed: int | None = _param(None, "Seed of the detector's fixed defects (where the bad "
                                             "columns are, their kind and extent), shared by the "
                                             "exposures of one detector; None: use seed.")

    def __post_init__(self) -> None:
        for name in ("nx", "ny", "psf_oversample", "n_galaxies", "n_cosmic_rays",
                     "n_bad_columns", "seed"):
            _check_int(name, getattr(self, name))
        for name in ("n_stars", "scene_seed", "detector_seed"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name))
        for name in ("nx", "ny"):
            _check_range(name, getattr(self, name), 1, 8192)
        for name in ("pixel_scale", "fwhm_arcsec", "gain", "saturation_adu", "psf_radius_fwhm",
                     "star_density", "airmass"):
            _check_range(name, getattr(self, name), 0.0, np.inf, low_open=True)
        for name in ("sky_adu", "read_noise", "catalog_margin_arcsec", "exp_time", "n_galaxies", "n_cosmic_rays", "n_bad_columns"):
            _check_range(name, getattr(self, name), 0, np.inf)
        _check_range("dec", self.dec, -89.0, 89.0)
        _check_range("fwhm_variation", self.fwhm_variation, 0.0, 0.5)
        _check_range("ellipticity", self.ellipticity, 0.0, 0.6, high_open=True)
        _check_range("moffat_beta", self.moffat_beta, 1.5, np.inf, low_open=True)
        _check_range("psf_oversample", self.psf_oversample, 1, 9)
        _check_range("sky_gradient", self.sky_gradient, -1.0, 1.0, low_open=True, high_open=True)
        _check_range("gaia_missing_fraction", self.gaia_missing_fraction, 0.0, 1.0,
                     high_open=True)
        _check_range("pointing_error_arcsec", self.pointing_error_arcsec, 0.0, 3600.0)
        _check_range("rotation_error_deg", self.rotation_error_deg, -10.0, 10.0)
        _check_range("sip_amplitude_pix", self.sip_amplitude_pix, 0.0, 20.0)
        if self.n_stars is not None:
            _check_range("n_stars", self.n_stars, 0, np.inf)
        if self.transform is not None and not isinstance(self.transform, BandTransform):
            raise ValueError(f"transform must be an improc.color_transforms.BandTransform or None, "
                             f"got {type(self.transform).__name__}")
        for name in ("star_mag_range", "galaxy_mag_range"):
            lo, hi = getattr(self, name)
            if not lo < hi:
                raise ValueError(f"{name} must be (bright, faint) with bright < faint, "
                                 f"got {(lo, hi)}")

    @property
    def band_transform(self) -> BandTransform | None:
        """The transformation the stars are rendered with (None: ``m = G``)."""
        return self.transform if self.transform is not None else DECAM_ZHOU2020.get(self.band)

    @property
    def epoch(self) -> float:
        """Epoch of the image, Julian years."""
        return sim_wcs.mjd_to_julian_year(self.mjd)


def _check_int(name: str, value: Any) -> None:
    """Raise ValueError naming ``name`` unless ``value`` is an integer (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")


def _check_range(name: str, value: Any, low: float, high: float, *, low_open: bool = False,
                 high_open: bool = False) -> None:
    """Raise ValueError naming ``name`` unless ``low <(=) value <(=) high``."""
    ok_low = value > low if low_open else value >= low
    ok_high = value < high if high_open else value <= high
    if not (np.isfinite(value) and ok_low and ok_high):
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be in {interval}, got {value!r}")


@dataclass(frozen=True, eq=False)
class SimulatedImage:
    """A simulated image and its truth.

    Attributes
    ----------
    data : numpy.ndarray
        Shape (ny, nx), float32, ADU, sky not subtracted.
    weight : numpy.ndarray
        Shape (ny, nx), float32: inverse variance (1/ADU**2) of the noiseless model (sky +
        objects) plus read noise; 0 on bad-column, saturated and bleed pixels.
    flags : numpy.ndarray
        Shape (ny, nx), uint16 bitmask: 1 bad column, 2 saturated, 4 cosmic ray (truth),
        8 bleed trail (see `improc.sim_detector`).
    header : astropy.io.fits.Header
        Header WCS plus MJD-OBS, DATE-OBS, EXPTIME, FILTER, GAIN (e-/ADU), RDNOISE (e-),
        SATURATE (ADU), RA, DEC (header pointing, degrees), AIRMASS, INSTRUME='Synthetic'.
    true_wcs : astropy.wcs.WCS
        The true TAN-SIP WCS.
    header_wcs : astropy.wcs.WCS
        The plain TAN WCS of the header, with the pointing and rotation errors.
    stars : astropy.table.Table
        Truth for every star of the scene, also those off the image: ``source_id, x, y``
        (0-based true centroid), ``ra, dec`` (image epoch), ``mag`` (band), ``flux_adu``,
        ``G, BP, RP, pmra, pmdec, parallax``, ``peak_adu`` (brightest pixel, sky excluded),
        ``saturated`` (peak + sky >= saturation), ``snr`` (expected S/N of optimal
        photometry), ``in_image`` (centroid on the image), ``in_gaia``.  ``peak_adu`` and
        ``snr`` are 0 for stars too far off the image to touch it.
    galaxies : astropy.table.Table
        Galaxy catalog (`improc.sim_galaxies`) plus ``x, y, flux_adu``.
    transients : astropy.table.Table
        The given transients' columns plus ``transient_id, x, y, ra, dec, mag, flux_adu,
        peak_adu, snr``; empty if none.
    gaia : astropy.table.Table
        Gaia-like reference catalog at ``catalog_epoch`` (`improc.sim_catalogs`).
    sky : numpy.ndarray
        Shape (ny, nx), float32: the true sky, ADU.
    params : SimulationParams
        The parameters used.
    star_catalog : astropy.table.Table
        The scene catalog at ``catalog_epoch`` (to render the same stars again).
    psf_field : PsfField
        The true PSF of the image.
    """

    data: np.ndarray
    weight: np.ndarray
    flags: np.ndarray
    header: fits.Header
    true_wcs: WCS
    header_wcs: WCS
    stars: Table
    galaxies: Table
    transients: Table
    gaia: Table
    sky: np.ndarray
    params: SimulationParams
    star_catalog: Table
    psf_field: PsfField

    def psf(self, x: float, y: float, size: int | None = None) -> np.ndarray:
        """The true PSF at ``(x, y)``, centred on the stamp's central pixel, exactly as rendered.

        Parameters
        ----------
        x, y : float
            0-based image position setting the PSF shape.
        size : int or None
            Odd stamp width; None gives the full support (``2 * psf_field.half_size + 1``),
            which sums to 1.  A smaller stamp is a cut-out (sum slightly below 1), a larger
            one zero-padded.

        Returns
        -------
        numpy.ndarray
            Shape (size, size), float64; a star of flux F at the centre of the central pixel
            adds ``F * psf`` to the image.

        Raises
        ------
        ValueError
            If ``size`` is not a positive odd integer.
        """
        return self.psf_field.stamp(x, y, size)


def make_star_catalog(params: SimulationParams, rng: np.random.Generator) -> Table:
    """Draw the scene catalog of stars over the image footprint plus a margin.

    Parameters
    ----------
    params : SimulationParams
        Footprint (nx, ny, pixel_scale, ra, dec), ``catalog_margin_arcsec``, ``n_stars`` or
        ``star_density``, ``star_mag_range``.
    rng : numpy.random.Generator
        Source of the draws.

    Returns
    -------
    astropy.table.Table
        Scene catalog at ``catalog_epoch`` (see `improc.sim_catalogs`).
    """
    width = params.nx * params.pixel_scale
    height = params.ny * params.pixel_scale
    half_w = width / 2.0 + params.catalog_margin_arcsec
    half_h = height / 2.0 + params.catalog_margin_arcsec
    if params.n_stars is None:
        density = params.star_density / _SQ_ARCSEC_PER_SQ_DEG
    else:
        density = params.n_stars / (width * height)
    n = int(round(density * 4.0 * half_w * half_h))
    return sim_catalogs.draw_stars(ra=params.ra, dec=params.dec, half_width_arcsec=half_w,
                                   half_height_arcsec=half_h, n=n,
                                   mag_range=params.star_mag_range, rng=rng)


def simulate_image(params: SimulationParams = SimulationParams(), *, stars: Table | None = None,
                   galaxies: Table | None = None,
                   transients: Table | None = None) -> SimulatedImage:
    """Simulate an image and its truth.

    Parameters
    ----------
    params : SimulationParams
        What to simulate.
    stars : astropy.table.Table or None
        Scene catalog at ``params.catalog_epoch`` (columns of
        `improc.sim_catalogs.SCENE_COLUMNS`); None draws one (`make_star_catalog`).
    galaxies : astropy.table.Table or None
        Galaxy catalog (columns of `improc.sim_galaxies.GALAXY_COLUMNS`); None draws
        ``params.n_galaxies`` over the image.
    transients : astropy.table.Table or None
        Point sources that are not in the reference catalog: a ``mag`` column and either
        ``ra, dec`` (degrees) or ``x, y`` (0-based pixels); other columns are kept.

    Returns
    -------
    SimulatedImage
        The image and its truth.

    Raises
    ------
    ValueError
        If a catalog lacks columns or has invalid values.
    """
    scene_rngs, exposure_rngs = _generators(params)
    true_wcs = sim_wcs.make_true_wcs(params.nx, params.ny, ra=params.ra, dec=params.dec,
                                     pixel_scale=params.pixel_scale,
                                     sip_amplitude_pix=params.sip_amplitude_pix)
    header_wcs = sim_wcs.make_header_wcs(true_wcs,
                                         pointing_error_arcsec=params.pointing_error_arcsec,
                                         rotation_error_deg=params.rotation_error_deg,
                                         rng=exposure_rngs[0])
    psf_field = PsfField(nx=params.nx, ny=params.ny,
                         fwhm_pix=params.fwhm_arcsec / params.pixel_scale,
                         fwhm_variation=params.fwhm_variation, ellipticity=params.ellipticity,
                         position_angle_deg=params.psf_position_angle_deg,
                         beta=params.moffat_beta, radius_fwhm=params.psf_radius_fwhm,
                         oversample=params.psf_oversample)
    star_catalog = (make_star_catalog(params, scene_rngs[0]) if stars is None
                    else sim_catalogs.check_scene_catalog(stars))
    galaxies = _galaxy_catalog(galaxies, params, scene_rngs[1])
    sky = sim_detector.sky_model((params.ny, params.nx), level=params.sky_adu,
                                 gradient=params.sky_gradient)
    gaia, in_gaia = sim_catalogs.make_gaia_catalog(
        star_catalog, epoch=params.catalog_epoch, missing_fraction=params.gaia_missing_fraction,
        rng=scene_rngs[2])
    star_truth, model = _render_stars(star_catalog, in_gaia, params, true_wcs, psf_field, sky)
    galaxy_truth, galaxy_image = _render_galaxies(galaxies, params, true_wcs, psf_field)
    transient_truth, transient_image = _render_transients(transients, params, true_wcs,
                                                          psf_field, sky)
    model += galaxy_image
    model += transient_image
    model += sky
    data, flags = sim_detector.expose(
        model, gain=params.gain, read_noise=params.read_noise,
        saturation_adu=params.saturation_adu, bleed_trails=params.bleed_trails,
        n_cosmic_rays=params.n_cosmic_rays, n_bad_columns=params.n_bad_columns,
        noise=params.noise, rng=exposure_rngs[1], defects_rng=_defects_generator(params))
    weight = sim_detector.inverse_variance(model, flags, gain=params.gain,
                                           read_noise=params.read_noise)
    return SimulatedImage(
        data=data, weight=weight, flags=flags, header=_make_header(params, header_wcs),
        true_wcs=true_wcs, header_wcs=header_wcs, stars=star_truth, galaxies=galaxy_truth,
        transients=transient_truth, gaia=gaia, sky=sky.astype(np.float32), params=params,
        star_catalog=star_catalog, psf_field=psf_field)


def _galaxy_catalog(galaxies: Table | None, params: SimulationParams,
                    rng: np.random.Generator) -> Table:
    """The given galaxy catalog, checked, or ``params.n_galaxies`` drawn over the image."""
    if galaxies is not None:
        return sim_galaxies.check_galaxy_catalog(galaxies)
    return sim_galaxies.draw_galaxies(
        ra=params.ra, dec=params.dec, half_width_arcsec=0.47 * params.nx * params.pixel_scale,
        half_height_arcsec=0.47 * params.ny * params.pixel_scale, n=params.n_galaxies,
        mag_range=params.galaxy_mag_range, rng=rng)


def _generators(params: SimulationParams) -> tuple[list[np.random.Generator],
                                                   list[np.random.Generator]]:
    """Independent generators: (stars, galaxies, gaia) of the scene; (header WCS, detector)."""
    scene_entropy = params.seed if params.scene_seed is None else params.scene_seed
    scene = np.random.SeedSequence(scene_entropy, spawn_key=(0,))
    exposure = np.random.SeedSequence(params.seed, spawn_key=(1,))
    return ([np.random.default_rng(s) for s in scene.spawn(3)],
            [np.random.default_rng(s) for s in exposure.spawn(2)])


def _defects_generator(params: SimulationParams) -> np.random.Generator | None:
    """The generator of the detector's defects, or None to draw them with the exposure's."""
    if params.detector_seed is None:
        return None
    return np.random.default_rng(np.random.SeedSequence(params.detector_seed, spawn_key=(2,)))


def _render_stars(catalog: Table, in_gaia: np.ndarray, params: SimulationParams, wcs: WCS,
                  psf: PsfField, sky: np.ndarray) -> tuple[Table, np.ndarray]:
    """Truth table of the scene's stars and the image (ADU, float64) of those near the chip."""
    ra, dec = sim_catalogs.propagate_positions(catalog["ra"], catalog["dec"], catalog["pmra"],
                                               catalog["pmdec"],
                                               params.epoch - params.catalog_epoch)
    x, y = sim_wcs.world_to_pixel(wcs, ra, dec)
    mag = sim_catalogs.band_magnitudes(catalog["G"], catalog["BP"], catalog["RP"], params.band_transform,
                                       color_term=params.color_term)
    flux = 10.0 ** (-0.4 * (mag - params.zero_point))
    truth = Table({"source_id": np.asarray(catalog["source_id"], dtype=np.int64),
                   "x": x, "y": y, "ra": ra, "dec": dec, "mag": mag, "flux_adu": flux})
    for name in ("G", "BP", "RP", "pmra", "pmdec", "parallax"):
        truth[name] = np.asarray(catalog[name], dtype=float)
    rendered, image = _render_points(x, y, flux, params, psf, sky)
    sky_at = _sky_at(sky, x, y)
    truth["peak_adu"] = rendered["peak"]
    truth["saturated"] = rendered["peak"] + sky_at >= params.saturation_adu
    truth["snr"] = rendered["snr"]
    truth["in_image"] = _in_image(x, y, params)
    truth["in_gaia"] = in_gaia
    return truth, image


def _render_points(x: np.ndarray, y: np.ndarray, flux: np.ndarray, params: SimulationParams,
                   psf: PsfField, sky: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Render the point sources whose stamps touch the image; peak and S/N (0 for the others)."""
    h = psf.half_size
    near = (x > -h - 1) & (x < params.nx + h) & (y > -h - 1) & (y < params.ny + h)
    rendered = render_point_sources(psf, x[near], y[near], flux[near], (params.ny, params.nx),
                                    sky=_sky_at(sky, x[near], y[near]), gain=params.gain,
                                    read_noise=params.read_noise)
    peak, snr = np.zeros(x.size), np.zeros(x.size)
    peak[near], snr[near] = rendered.peak, rendered.snr
    return {"peak": peak, "snr": snr}, rendered.image


def _sky_at(sky: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Sky at the nearest on-image pixel of each position."""
    ny, nx = sky.shape
    ix = np.clip(np.rint(x), 0, nx - 1).astype(np.int64)
    iy = np.clip(np.rint(y), 0, ny - 1).astype(np.int64)
    return sky[iy, ix]


def _in_image(x: np.ndarray, y: np.ndarray, params: SimulationParams) -> np.ndarray:
    """Whether 0-based positions fall on the image's pixels."""
    return (x >= -0.5) & (x < params.nx - 0.5) & (y >= -0.5) & (y < params.ny - 0.5)


def _render_galaxies(galaxies: Table, params: SimulationParams, wcs: WCS,
                     psf: PsfField) -> tuple[Table, np.ndarray]:
    """Galaxy truth (catalog plus x, y, flux_adu) and their image (ADU, float64)."""
    truth = Table(galaxies, copy=True)
    x, y = sim_wcs.world_to_pixel(wcs, galaxies["ra"], galaxies["dec"])
    flux = 10.0 ** (-0.4 * (np.asarray(galaxies["mag"], dtype=float) - params.zero_point))
    truth["x"], truth["y"], truth["flux_adu"] = x, y, flux
    if len(galaxies) == 0:
        return truth, np.zeros((params.ny, params.nx))
    jacobians = sim_wcs.local_jacobian(wcs, x, y)
    image = sim_galaxies.render_galaxies(x, y, flux, galaxies, jacobians, psf,
                                         (params.ny, params.nx))
    return truth, image


def _render_transients(transients: Table | None, params: SimulationParams, wcs: WCS,
                       psf: PsfField, sky: np.ndarray) -> tuple[Table, np.ndarray]:
    """Transient truth and image (ADU, float64); an empty table and zeros if none."""
    empty = {name: np.zeros(0) for name in ("x", "y", "ra", "dec", "mag", "flux_adu")}
    truth = Table(empty) if transients is None else Table(transients, copy=True)
    if "mag" not in truth.colnames:
        raise ValueError(f"transients must have a 'mag' column, found {truth.colnames}")
    if {"ra", "dec"} <= set(truth.colnames):
        truth["x"], truth["y"] = sim_wcs.world_to_pixel(wcs, truth["ra"], truth["dec"])
    elif {"x", "y"} <= set(truth.colnames):
        ra, dec = wcs.all_pix2world(np.asarray(truth["x"], float),
                                    np.asarray(truth["y"], float), 0)
        truth["ra"], truth["dec"] = ra, dec
    else:
        raise ValueError(f"transients must have columns 'ra', 'dec' or 'x', 'y', "
                         f"found {truth.colnames}")
    if "transient_id" not in truth.colnames:
        truth["transient_id"] = np.arange(len(truth), dtype=np.int64)
    x, y = np.asarray(truth["x"], dtype=float), np.asarray(truth["y"], dtype=float)
    truth["flux_adu"] = 10.0 ** (-0.4 * (np.asarray(truth["mag"], float) - params.zero_point))
    rendered, image = _render_points(x, y, np.asarray(truth["flux_adu"]), params, psf, sky)
    truth["peak_adu"], truth["snr"] = rendered["peak"], rendered["snr"]
    return truth, image


def _make_header(params: SimulationParams, header_wcs: WCS) -> fits.Header:
    """The FITS header: the (wrong) header WCS and the exposure keywords."""
    header = header_wcs.to_header()
    ra, dec = header_wcs.wcs.crval
    cards = [
        ("INSTRUME", "Synthetic", "simulated by improc.simulator"),
        ("FILTER", params.band, "band"),
        ("EXPTIME", params.exp_time, "exposure time [s]"),
        ("MJD-OBS", params.mjd, "MJD at the start of the exposure"),
        ("DATE-OBS", Time(params.mjd, format="mjd", scale="utc").isot, "UTC date of the exposure"),
        ("AIRMASS", params.airmass, "airmass"),
        ("RA", ra, "telescope pointing RA [deg]"),
        ("DEC", dec, "telescope pointing Dec [deg]"),
        ("GAIN", params.gain, "gain [e-/ADU]"),
        ("RDNOISE", params.read_noise, "read noise [e-]"),
        ("SATURATE", params.saturation_adu, "saturation level [ADU]"),
    ]
    for key, value, comment in cards:
        header[key] = (value, comment)
    return header
