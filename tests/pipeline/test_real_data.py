"""Acceptance tests on real data: our calibration steps against SExtractor and the Legacy Surveys.

* ``sep/``: background maps and detections of the step computes against SExtractor's own outputs.
* ``legacypipe/testcase8``: one DECam CP image through ingest and the pipeline, against the
  Legacy Surveys' calibration of the same CCD (``survey-ccds-1.fits.gz``: FWHM, sky, zero point,
  astrometric offsets of the community-pipeline WCS).
* ``decam_sfft``: ten DECam cutouts of one field; their relative astrometry, measured through each
  image's WCS, after calibrating each exposure against the consensus of the other nine.

The Legacy Surveys' conventions (legacyzpts' ``DecamMeasurer``): CP images are in ADU; ``zpt`` and
``ccdzpt`` are the magnitude of 1 ADU/s measured with PSF fits to Pan-STARRS stars, so the zero
point of the image in ADU is ``ccdzpt + 2.5 log10(exptime)``; ``fwhm`` is the CP's FWHM in pixels;
``ccdskycounts`` is the sky in ADU/s; ``sig1`` is the per-pixel noise in nanomaggies (flux of
magnitude 22.5); ``ccdraoff``, ``ccddecoff`` are the median offsets Gaia - CP WCS in arcsec.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from astropy.time import Time
from astropy.wcs import WCS, FITSFixedWarning

from models.image import ingest_file
from models.quality import QualityFlag
from pipeline.backgrounding import Backgrounder
from pipeline.extraction import Extractor
from pipeline.step import step_class
from pipeline.top import Pipeline
from util.config import Config

pytestmark = pytest.mark.real_data

TESTCASE8 = Path("legacypipe") / "testcase8"
TESTCASE8_IMAGE = TESTCASE8 / "images/decam/CP/V4.8.2a/CP20171112/c4d_171113_060340_ooi_r_ls9.N6.fits"
MAS_PER_DEG = 3.6e6


def _read_fits(path: Path, hdu: int = 0) -> tuple[np.ndarray, fits.Header]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # non-standard ESO-LOG cards in the sep image
        with fits.open(path) as hdul:
            return np.asarray(hdul[hdu].data, dtype=np.float64), hdul[hdu].header.copy()


def _header_wcs(header: fits.Header) -> WCS:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        return WCS(header)


# ---------------------------------------------------------------------------------------------
# sep: SExtractor's background maps and catalog


def _sextractor_config(path: Path) -> dict[str, str]:
    config = {}
    for line in path.read_text().splitlines():
        words = line.split("#")[0].split()
        if len(words) >= 2:
            config[words[0]] = words[1]
    return config


def _sextractor_catalog(path: Path) -> Table:
    """An ASCII_HEAD catalog; a vector parameter's name gets its first column."""
    header = [line.split() for line in path.read_text().splitlines() if line.startswith("#")]
    rows = np.loadtxt(path, comments="#")
    return Table({words[2]: rows[:, int(words[1]) - 1] for words in header})


def _matched_threshold(sextractor_thresh: float, conv_path: Path) -> float:
    """SExtractor's DETECT_THRESH (per-pixel sigma, kernel normalised to unit sum) as a significance.

    The extraction step detects with sep's matched filter, whose threshold is in units of the
    noise of the filtered image: ``sum(k) / sqrt(sum(k**2))`` times larger for the same pixels.
    """
    kernel = np.loadtxt(conv_path, comments=("#", "CONV"))
    return sextractor_thresh * kernel.sum() / np.sqrt(np.sum(kernel**2))


def test_sep_steps_reproduce_sextractor(shared_data):
    """Backgrounder and Extractor computes with default.sex settings: maps to 1%, >= 95% of objects."""
    folder = shared_data / "sep"
    sex = _sextractor_config(folder / "default.sex")
    image, _ = _read_fits(folder / "image.fits")
    back, _ = _read_fits(folder / "back.fits")
    rms, _ = _read_fits(folder / "rms.fits")

    mesh = Backgrounder(box_size=int(sex["BACK_SIZE"]), filter_size=int(sex["BACK_FILTERSIZE"])).compute(
        image, mask=None)
    assert np.max(np.abs(mesh.counts() / back - 1)) < 0.01
    assert np.max(np.abs(mesh.rms_map() / rms - 1)) < 0.01

    extractor = Extractor(threshold=_matched_threshold(float(sex["DETECT_THRESH"]), folder / "default.conv"),
                          minarea=int(sex["DETECT_MINAREA"]), deblend_nthresh=int(sex["DEBLEND_NTHRESH"]),
                          deblend_cont=float(sex["DEBLEND_MINCONT"]))
    result = extractor.compute(image, background=mesh.counts(), variance=mesh.variance(),
                               mask=np.zeros(image.shape, bool), gain=None,  # GAIN 0: sky noise only
                               saturation=float(sex["SATUR_LEVEL"]))
    catalog = _sextractor_catalog(folder / "image.cat")
    xwin, ywin = catalog["XWIN_IMAGE"] - 1.0, catalog["YWIN_IMAGE"] - 1.0  # 1-based in SExtractor
    x, y = np.asarray(result.sources["x"]), np.asarray(result.sources["y"])
    distance = np.hypot(x[None, :] - xwin[:, None], y[None, :] - ywin[:, None]).min(axis=1)
    assert len(catalog) == 65 and np.mean(distance < 1.0) >= 0.95


# ---------------------------------------------------------------------------------------------
# legacypipe testcase8: one DECam CP image against the Legacy Surveys' calibration


def _testcase8_config(shared_data: Path, database) -> Config:
    gaia = {"catalog": "gaia_folder", "catalog_folder": str(shared_data / TESTCASE8 / "gaia")}
    return database.config(**{
        # The 375 x 280 cutout is dominated by an elliptical galaxy whose halo covers its middle;
        # a 128-pixel mesh (2 x 3 boxes) leaves the halo under the stars, and too few clean
        # sources remain to measure the FWHM.  32 pixels (8 FWHM), the small end of the range
        # SExtractor's manual suggests (32 to 256), follows the halo.
        "backgrounding": {"box_size": 32},
        # Six Gaia stars with G <= 21 fall on the cutout: the nucleus of the galaxy, a star with
        # a G = 21.0 neighbour 0.7" away (a blend at 1" seeing, left out as not isolated) and four
        # stars, one of them faint and at the edge.  A handful of references cannot constrain
        # distortion terms: fit a plain TAN (sip_order 1) and accept 4 matches (the fewest allowed).
        "astrocal": {**gaia, "min_matches": 4, "sip_order": 1},
        # two clean stars of S/N >= 20 are all this cutout offers (see the zero-point test)
        "photocal": {**gaia, "min_stars": 2},
    })


def _legacy_survey_row(shared_data: Path, header: dict) -> Table.Row:
    ccds = Table.read(shared_data / TESTCASE8 / "survey-ccds-1.fits.gz")
    rows = [row for row in ccds if int(row["expnum"]) == int(header["EXPNUM"])
            and str(row["ccdname"]).strip() == "N6"]
    assert len(rows) == 1, f"survey-ccds-1.fits.gz has {len(rows)} rows for expnum {header['EXPNUM']} N6"
    return rows[0]


def _testcase8_run(shared_data: Path, database, processes: tuple[str, ...]):
    exposure, images = ingest_file(shared_data / TESTCASE8_IMAGE)
    assert not exposure.is_raw and [im.section_id for im in images] == ["N6"]
    config = _testcase8_config(shared_data, database)
    ds = Pipeline(config, steps=[step_class(name)(config=config) for name in processes]).run(images[0])
    return ds, _legacy_survey_row(shared_data, ds.get_image().header)


def test_testcase8_fwhm_sky_and_wcs_agree_with_legacy_surveys(database, shared_data, tmp_path):
    ds, ls = _testcase8_run(shared_data, database, ("backgrounding", "extraction", "astrocal"))
    image = ds.get_image()
    assert image.filter == "r" and image.exp_time == pytest.approx(float(ls["exptime"]))
    assert image.mjd == pytest.approx(float(ls["mjd_obs"]), abs=1e-6)

    # Sky level and noise in ADU; sig1 (nanomaggies) converts with the zero point convention above.
    zp_ls = float(ls["ccdzpt"]) + 2.5 * np.log10(float(ls["exptime"]))
    background = ds.get_background()
    assert background.level_median == pytest.approx(float(ls["ccdskycounts"]) * float(ls["exptime"]), rel=0.03)
    assert background.rms_median == pytest.approx(float(ls["sig1"]) * 10 ** (0.4 * (zp_ls - 22.5)), rel=0.05)

    assert ds.get_psf().fwhm_pixels == pytest.approx(float(ls["fwhm"]), rel=0.10)

    # Our Gaia solution against the CP's TPV WCS shifted by the offsets LS measured against Gaia
    # (legacypipe applies them to CRVAL the same way), on a grid covering the whole chip.
    wcs = ds.get_wcs()
    assert wcs.num_stars >= 4 and wcs.rms_arcsec < 0.1
    with fits.open(shared_data / TESTCASE8_IMAGE) as hdul:
        cp_wcs = _header_wcs(hdul[1].header)
    yy, xx = np.mgrid[0:image.ny:15, 0:image.nx:15]
    ra, dec = wcs.wcs.pixel_to_world_values(xx.ravel(), yy.ravel())
    cp_ra, cp_dec = cp_wcs.pixel_to_world_values(xx.ravel(), yy.ravel())
    cp_dec = cp_dec + float(ls["ccddecoff"]) / 3600.0
    cp_ra = cp_ra + float(ls["ccdraoff"]) / 3600.0 / np.cos(np.radians(cp_dec))
    offset = np.hypot((ra - cp_ra) * np.cos(np.radians(dec)), dec - cp_dec) * 3600.0
    assert np.sqrt(np.mean(offset**2)) < 0.1
    assert offset.max() < 0.2


def test_testcase8_zero_point_agrees_with_legacy_surveys(database, shared_data, tmp_path):
    """Zero point within 0.05 mag of the Legacy Surveys' (PSF photometry of Pan-STARRS stars).

    Measured +0.042 from two stars that agree to 0.02 mag: a pass, by a margin smaller than
    the uncertainty.  LS's ``ccdzpt`` (ADU/s, the median over 583 Pan-STARRS stars of the whole
    CCD N6) + 2.5 log10(45 s) = 29.3015 in our total-ADU convention (the CP image is in ADU;
    checked against legacyzpts).  Of the eight Gaia sources on the 375 x 280 cutout, one is the
    galaxy nucleus, one a 0.6" pair, two are faint and truncated or suspect (parallax 21 mas);
    of the three stars left, the one on the halo at (148, 116) is flagged MERGED and its BP/RP
    colour is contaminated (excess 1.65), which leaves two calibrators (``min_stars=2``), too
    few to measure aperture corrections, which therefore come from the PSF model.  The budget
    is ~0.03 mag (1 sigma), dominated by systematics the two stars share: with the PSF fitted
    to 2-4 stars, a sky error of 0.1 ADU/pixel over the 53 x 53 stamp moves the zero point by
    0.014 mag, and the sky next to the galaxy is uncertain by 0.2-0.4 ADU/pixel (our mesh and
    LS's spline differ by 0.8 at the clean star); LS's own PSFEx model on our sky gives +0.010.
    The Gaia -> DECam transform (R. Zhou 2020) agrees with LS's Pan-STARRS system to 0.00-0.02
    per star.  So this test checks the chain (units, exposure time, band transformation, PSF
    normalization) to a few hundredths, not the 0.05 itself.
    """
    ds, ls = _testcase8_run(shared_data, database,
                            ("backgrounding", "extraction", "astrocal", "photocal"))
    zp_ls = float(ls["ccdzpt"]) + 2.5 * np.log10(float(ls["exptime"]))  # ADU/s -> ADU
    zp = ds.get_zp()
    assert zp.num_stars == 2 and zp.scatter < 0.03
    assert zp.zp == pytest.approx(zp_ls, abs=0.05)


# ---------------------------------------------------------------------------------------------
# Sparse real frames: testcase6 (six 100 x 100 cutouts, one saturated Gaia star each) and testcase8


def _gaia_on_chip(folder: Path, image) -> int:
    stars = [Table.read(path) for path in sorted(folder.glob("chunk-*.fits"))]
    ra = np.concatenate([np.asarray(t["ra"], float) for t in stars])
    dec = np.concatenate([np.asarray(t["dec"], float) for t in stars])
    x, y = image.wcs.world_to_pixel_values(ra, dec)
    return int(np.sum((x > -0.5) & (x < image.nx - 0.5) & (y > -0.5) & (y < image.ny - 0.5)))


@pytest.mark.parametrize("case", ["testcase6", "testcase8"])
def test_sparse_frames_get_the_best_honest_calibration(database, shared_data, case):
    """Every CP frame of the case goes through photocal with the default parameters (a local Gaia
    folder, and the 32-pixel mesh that the testcase8 galaxy needs, see `_testcase8_config`); the
    degraded products say so, and where two or more Gaia stars fall on the chip the zero point
    agrees with the Legacy Surveys' ccdzpt within 0.1 mag and within twice its stated error.

    Measured (this commit): testcase6, one saturated G = 10.5 star per chip and cosmic rays: a
    Moffat of the nominal seeing (PSF_DEFAULT), the header WCS kept (WCS_HEADER_ONLY, 5"), no zero
    point (ZP_UNCALIBRATED).  testcase8: a Moffat fitted to its 2 stars (FWHM 3.73 px, LS 4.02),
    the header shifted and rotated to 4 stars (0.038"), zero point -0.032 +- 0.023 from LS with
    2 stars (ZP_FEW_STARS): 1.4 sigma.
    """
    folder = shared_data / "legacypipe" / case
    gaia = {"catalog": "gaia_folder", "catalog_folder": str(folder / "gaia")}
    config = database.config(**{"backgrounding": {"box_size": 32}, "astrocal": gaia, "photocal": dict(gaia)})
    ccds = Table.read(folder / "survey-ccds-1.fits.gz")
    paths = sorted(folder.glob("images/decam/CP/*/*/*_ooi_*.fits"))
    assert len(paths) == {"testcase6": 6, "testcase8": 1}[case]
    for path in paths:
        _, (image,) = ingest_file(path)
        ds = Pipeline(config).run(image)
        psf, wcs, zp = ds.get_psf(), ds.get_wcs(), ds.get_zp()
        assert ds.image.bad_flags == 0 and zp is not None, path.name
        row = next(r for r in ccds if r["image_filename"].strip().endswith(path.name))
        zp_ls = float(row["ccdzpt"]) + 2.5 * np.log10(float(row["exptime"]))
        if _gaia_on_chip(folder / "gaia", image) >= 2:
            assert abs(zp.zp - zp_ls) < 0.1 and abs(zp.zp - zp_ls) < 2 * zp.dzp, (path.name, zp.zp, zp.dzp, zp_ls)
            assert zp.quality_flags & QualityFlag.ZP_FEW_STARS and psf.kind == "moffat"
            assert wcs.model == "shift_rotation" and wcs.uncertainty_arcsec < 0.1
        else:
            assert zp.zp is None and zp.quality_flags == QualityFlag.ZP_UNCALIBRATED
            assert psf.kind == "moffat_default" and psf.quality_flags == QualityFlag.PSF_DEFAULT
            assert wcs.model == "header" and wcs.quality_flags == QualityFlag.WCS_HEADER_ONLY
            assert psf.fwhm_pixels == pytest.approx(1.2 / 0.2637, rel=0.05)   # the nominal seeing


# ---------------------------------------------------------------------------------------------
# decam_sfft: relative astrometry of ten exposures of one field


def _basename_mjd(basename: str) -> float:
    """MJD of a NOIRLab archive name ``c4d_YYMMDD_HHMMSS_...``."""
    date, time = re.match(r"c4d_(\d{6})_(\d{6})_", basename).groups()
    iso = f"20{date[:2]}-{date[2:4]}-{date[4:]}T{time[:2]}:{time[2:4]}:{time[4:]}"
    return Time(iso, format="isot", scale="utc").mjd


def _well_measured_stars(ds, *, min_snr: float = 30.0) -> tuple[np.ndarray, np.ndarray]:
    """RA, Dec (through the image's WCS) of bright, unflagged point sources.

    Aperture flags are ignored (they do not move a centroid); point sources are those whose size
    (twice the half-light radius) is within 1.5 times the PSF FWHM, which rejects the galaxies.
    """
    sources = ds.get_sources()
    table = sources.data
    aperture_bits = 16 | 32 | 64 | 128  # improc.extraction.SourceFlag.APER_*
    good = ((np.asarray(table["snr"]) >= min_snr)
            & ((np.asarray(table["flags"]) & ~aperture_bits) == 0)
            & (np.asarray(table["fwhm"]) < 1.5 * sources.fwhm_pixels))
    return ds.get_image().wcs.pixel_to_world_values(sources.x[good], sources.y[good])


def _offsets_to_reference(stars: list[tuple[np.ndarray, np.ndarray]], *, radius_mas: float = 500.0):
    """Offsets (n_exposures, n_stars, 2) in mas of the stars of every exposure from those of the first.

    Only the first exposure's stars found within ``radius_mas`` in every exposure are kept.
    """
    ref_ra, ref_dec = stars[0]
    cos_dec = np.cos(np.radians(np.mean(ref_dec)))
    offsets = np.full((len(stars), len(ref_ra), 2), np.nan)
    for k, (ra, dec) in enumerate(stars):
        dx = (ra[None, :] - ref_ra[:, None]) * cos_dec * MAS_PER_DEG
        dy = (dec[None, :] - ref_dec[:, None]) * MAS_PER_DEG
        nearest = np.hypot(dx, dy).argmin(axis=1)
        rows = np.arange(len(ref_ra))
        close = np.hypot(dx[rows, nearest], dy[rows, nearest]) < radius_mas
        offsets[k, close] = np.column_stack([dx[rows, nearest], dy[rows, nearest]])[close]
    return offsets[:, np.all(np.isfinite(offsets[..., 0]), axis=0)]


def test_decam_sfft_relative_astrometry_and_epochs(database, shared_data, tmp_path):
    """Ten exposures: the 2016 ones get their true epoch; relative astrometry <= 50 mas.

    All ten cutouts carry the same header WCS, but the 2016 frames sit ~0.5 pixel (~170 mas) off
    the 2018 ones: the resampling used each season's own CP astrometry.  Calibrating each
    exposure against the others means fitting that shift, as a registration would; what the
    pipeline controls, and what is asserted, is the scatter of the well-measured stars about it:
    centroids stable to <= 50 mas through seeing from 3.5 to 5.6 pixels (and two years of proper
    motion).  Each exposure is compared with the mean of the other nine, so it is not its own
    reference.
    """
    config = database.config()
    pipeline = Pipeline(config, steps=[step_class(name)(config=config)
                                       for name in ("backgrounding", "extraction")])
    paths = sorted((shared_data / "decam_sfft").glob("DEC-OBS*.mini.fits"))
    assert len(paths) == 10
    stars = []
    for path in paths:
        _, images = ingest_file(path)
        image = images[0]
        basename = fits.getheader(path)["EXP_BN"]
        if "OBS18" in path.name:  # header DATE-OBS / MJD-OBS are the 2018 frame's
            assert image.mjd == pytest.approx(_basename_mjd(basename), abs=1.0 / 86400)
            assert Time(image.mjd, format="mjd").datetime.year == 2016
        else:
            assert Time(image.mjd, format="mjd").isot.startswith("2018-08-04")
        stars.append(_well_measured_stars(pipeline.run(image)))

    offsets = _offsets_to_reference(stars)
    assert offsets.shape[1] >= 3, f"only {offsets.shape[1]} stars are well measured in all ten exposures"
    for k, path in enumerate(paths):
        against_others = offsets[k] - np.delete(offsets, k, axis=0).mean(axis=0)
        residual = against_others - against_others.mean(axis=0)
        rms = np.sqrt(np.mean(np.sum(residual**2, axis=1)))
        assert rms <= 50.0, f"{path.name}: relative astrometry rms {rms:.1f} mas"


# ---------------------------------------------------------------------------------------------
# decam_sfft: difference imaging between two seasons, calibrated relative to the reference


def _empty_catalog_folder(tmp_path: Path) -> str:
    """A Gaia folder that does not cover the decam_sfft field (none exists): a simulated field's."""
    from improc.simulator import SimulationParams, simulate_image
    from util.gaia import write_gaia_folder

    sim = simulate_image(SimulationParams(nx=64, ny=64, seed=1, star_density=1000.0))
    write_gaia_folder(sim.gaia, tmp_path / "gaia_elsewhere")
    return str(tmp_path / "gaia_elsewhere")


def _source_free(sub, new_ds, *, grow: int = 6) -> np.ndarray:
    """Pixels of the difference far from every source of the new image and from flagged pixels."""
    from scipy import ndimage

    sources = new_ds.get_sources()
    mask = np.zeros((sub.ny, sub.nx), bool)
    ix = np.clip(np.round(sources.x).astype(int), 0, sub.nx - 1)
    iy = np.clip(np.round(sources.y).astype(int), 0, sub.ny - 1)
    mask[iy, ix] = True
    radius = int(np.ceil(3 * sources.fwhm_pixels))
    mask = ndimage.binary_dilation(mask, iterations=radius) | ndimage.binary_dilation(sub.flags != 0,
                                                                                    iterations=grow)
    mask[:grow], mask[-grow:], mask[:, :grow], mask[:, -grow:] = True, True, True, True
    return ~mask


def _bright_star_residuals(sub, new_ds, *, min_snr: float = 200.0) -> np.ndarray:
    """|sum of D| within 2 FWHM of each bright, unflagged source of the new image / its PSF flux;
    sources where something was detected (the transient and its host) are left out."""
    sources = new_ds.get_sources()
    table = sources.data
    flux, err = sources.psffluxadu()
    bright = (flux > min_snr * err) & (np.asarray(table["flags"]) & ~(16 | 32 | 64 | 128) == 0)
    radius = 2.0 * sources.fwhm_pixels
    found = [(m.x, m.y) for m in new_ds.get_measurement_set().measurements if not m.is_bad]
    for fx, fy in found:
        bright &= np.hypot(sources.x - fx, sources.y - fy) > 2.0 * radius
    yy, xx = np.mgrid[0:sub.ny, 0:sub.nx]
    out = []
    for x, y, f in zip(sources.x[bright], sources.y[bright], flux[bright]):
        disc = (np.hypot(xx - x, yy - y) <= radius) & (sub.flags == 0)
        if disc.sum() > 0.8 * np.pi * radius**2:
            out.append(abs(float(np.sum(sub.data[disc]))) / f)
    return np.array(out)


def test_decam_sfft_seasons_subtract_relative_to_their_reference(database, shared_data, tmp_path, capsys):
    """Two seasons of real DECam cutouts with no catalog: the 2016 coadd is the reference, the 2018
    coadd and each 2018 exposure are subtracted from it.  The noise comes from the sky and the gain
    (the instrument's noise model, `models.image`); registration and flux ratio from the sources
    both images measured, the products saying so."""
    if database.kind == "postgresql":
        pytest.skip("real-data subtraction runs once, on SQLite (test_difference_imaging covers PostgreSQL)")
    from models.context import Context
    from pipeline.data_store import DataStore
    from pipeline.make_ref import make_coadd, make_reference
    from pipeline.runner import run_all

    catalog = {"catalog": "gaia_folder", "catalog_folder": _empty_catalog_folder(tmp_path)}
    config = database.config(astrocal=catalog, photocal=catalog, referencing={"require_calibrated": False})
    context = Context.from_config(config)
    paths = sorted((shared_data / "decam_sfft").glob("DEC-OBS*.mini.fits"))
    images = {p.name: ingest_file(p, context=context)[1][0] for p in paths}
    season16 = [im for name, im in images.items() if "OBS18" in name]
    season18 = [im for name, im in images.items() if "OBS04" in name]
    made = make_reference(context, image_ids=[str(im.id) for im in season16])
    assert made.coadd.header.get("RELCAL") and "MAGZERO" not in made.coadd.header
    coadd18 = make_coadd(context, season18).image
    assert coadd18.header.get("RELCAL")

    lines = []
    results = {}
    for name, image in [("2018 coadd", coadd18), *((im.describe(), im) for im in season18)]:
        ds = Pipeline(context).run(DataStore(image, context=context))
        sub = ds.get_sub_image()
        assert ds.get_reference().id == made.reference.id
        assert sub.header["FLUXRATF"] == "stars" and sub.header["REGFROM"] == "sources"
        free = _source_free(sub, ds)
        noise = float(np.std(sub.data[free] * np.sqrt(sub.weight[free])))
        score_noise = float(np.std(sub.extra("SCORE")[free]))
        residuals = _bright_star_residuals(sub, ds)
        ms = ds.get_measurement_set()
        kept = [m for m in ms.measurements if not m.is_bad]
        results[name] = (noise, score_noise, residuals, sub)
        lines.append(f"{name}: flux ratio {sub.header['FLUXRAT']:.3f}, registration offset "
                     f"({sub.header['REGDX']:+.2f}, {sub.header['REGDY']:+.2f}) px from {sub.header['REGNSTAR']} "
                     f"sources, normalized noise of D {noise:.2f} and of S_corr {score_noise:.2f} over {free.mean():.0%} "
                     f"of pixels, bright-star residuals "
                     f"{', '.join(f'{r:.1%}' for r in residuals)}; {ms.num_detections} detections, "
                     f"{len(kept)} kept: " + "; ".join(f"({m.x:.0f}, {m.y:.0f}) {m.flux_psf:+.0f} ADU "
                                                        f"S/N {m.snr:.0f}" for m in kept[:8]))
    with capsys.disabled():
        print("\n" + "\n".join(lines))
    for name, (noise, score_noise, residuals, sub) in results.items():
        # The weights come from the sky and the gain (no weight planes): SWarp's resampling of these
        # cutouts correlated their noise, which lowers the pixel-to-pixel scatter (D's normalized
        # pixel noise 0.90-1.00) but not the noise at the PSF's scale, which S_corr sees.
        assert free_fraction_ok(sub) and 0.85 <= noise <= 1.2, f"{name}: normalized noise {noise:.2f}"
        assert 0.9 <= score_noise <= 1.2, f"{name}: S_corr noise {score_noise:.2f}"
        assert residuals.size >= 1 and np.all(residuals < 0.05), f"{name}: residuals {residuals}"


def free_fraction_ok(sub) -> bool:
    return np.mean(sub.flags == 0) > 0.5
