"""Spherical footprints: corners, bounds, point-in-polygon, areas and overlaps (no database)."""

import numpy as np
import pytest

from improc import footprint as fp
from tests.models.synthetic_files import tan_wcs


def _tan_wcs(ra, dec, *, scale_arcsec=1.0, rotation_deg=0.0, shape=(100, 200)):
    return tan_wcs(ra, dec, shape, scale_arcsec=scale_arcsec, rotation_deg=rotation_deg)


def _random_points_in_bounds(rng, minra, maxra, mindec, maxdec, n):
    """Points uniform on the sphere inside an RA/Dec box (wrap allowed)."""
    span = (maxra - minra) % 360.0
    ra = (minra + rng.uniform(0, span, n)) % 360.0
    z = rng.uniform(np.sin(np.radians(mindec)), np.sin(np.radians(maxdec)), n)
    return ra, np.degrees(np.arcsin(z)), span


def test_corners_from_wcs_match_astropy_at_outer_pixel_edges():
    wcs = _tan_wcs(150.0, 2.0, rotation_deg=30.0, shape=(100, 200))
    ra, dec = fp.corners_from_wcs((100, 200), wcs)
    x, y = [-0.5, 199.5, 199.5, -0.5], [-0.5, -0.5, 99.5, 99.5]
    ref_ra, ref_dec = wcs.pixel_to_world_values(x, y)
    np.testing.assert_allclose(ra, ref_ra, atol=1e-12)
    np.testing.assert_allclose(dec, ref_dec, atol=1e-12)
    with pytest.raises(ValueError, match="shape must be"):
        fp.corners_from_wcs((0, 10), wcs)


def test_gnomonic_round_trip_and_validity():
    ra = np.array([10.0, 10.5, 9.0, 190.0])
    dec = np.array([20.0, 21.0, 19.0, -20.0])
    xi, eta, valid = fp.gnomonic(ra, dec, 10.0, 20.0)
    assert valid.tolist() == [True, True, True, False]
    back_ra, back_dec = fp.inverse_gnomonic(xi[:3], eta[:3], 10.0, 20.0)
    np.testing.assert_allclose(back_ra, ra[:3], atol=1e-10)
    np.testing.assert_allclose(back_dec, dec[:3], atol=1e-10)
    assert xi[1] > 0 and eta[1] > 0  # east and north of the centre


def test_octant_area_is_exact():
    area = fp.polygon_areas([0.0, 90.0, 0.0], [0.0, 0.0, 90.0])
    assert area[0] == pytest.approx(4 * np.pi / 8 * np.degrees(1.0) ** 2, rel=1e-12)


def test_bounds_include_great_circle_bulge():
    ra, dec = np.array([0.0, 2.0, 2.0, 0.0]), np.array([59.0, 59.0, 60.0, 60.0])
    minra, maxra, mindec, maxdec = fp.polygon_bounds(ra, dec)
    expected_top = np.degrees(np.arctan(np.tan(np.radians(60.0)) / np.cos(np.radians(1.0))))
    assert maxdec[0] == pytest.approx(expected_top, abs=1e-9)
    assert maxdec[0] > 60.003  # the top edge bulges north of its corners by ~13 arcsec
    assert mindec[0] == pytest.approx(59.0, abs=1e-9)  # the bottom edge bulges inwards
    assert minra[0] == pytest.approx(0.0, abs=1e-9) and maxra[0] == pytest.approx(2.0)


def test_ra_wrap_bounds_and_containment():
    ra, dec = np.array([359.5, 0.5, 0.5, 359.5]), np.array([-0.5, -0.5, 0.5, 0.5])
    minra, maxra, _, _ = fp.polygon_bounds(ra, dec)
    assert minra[0] == pytest.approx(359.5) and maxra[0] == pytest.approx(0.5)
    inside = fp.points_in_polygons([359.9, 0.1, 0.6, 359.4], [0.0, 0.0, 0.0, 0.0], np.tile(ra, (4, 1)),
                                   np.tile(dec, (4, 1)))
    assert inside.tolist() == [True, True, False, False]


@pytest.mark.parametrize("sign", [1, -1])
def test_polygon_around_a_pole(sign):
    ra, dec = np.array([0.0, 90.0, 180.0, 270.0]), sign * np.full(4, 89.5)
    assert fp.contains_pole(ra, dec)[0] == sign
    minra, maxra, mindec, maxdec = fp.polygon_bounds(ra, dec)
    assert (minra[0], maxra[0]) == (0.0, 360.0)
    if sign > 0:
        assert maxdec[0] == 90.0 and mindec[0] == pytest.approx(89.5)
    else:
        assert mindec[0] == -90.0 and maxdec[0] == pytest.approx(-89.5)
    assert fp.points_in_polygons(123.0, sign * 89.9, ra, dec)[0]
    assert not fp.points_in_polygons(45.0, sign * 89.0, ra, dec)[0]


def test_near_pole_polygon_not_containing_it():
    ra, dec = np.array([10.0, 50.0, 50.0, 10.0]), np.array([-89.0, -89.0, -88.0, -88.0])
    assert fp.contains_pole(ra, dec)[0] == 0
    minra, maxra, mindec, maxdec = fp.polygon_bounds(ra, dec)
    assert minra[0] == pytest.approx(10.0) and maxra[0] == pytest.approx(50.0)
    assert mindec[0] < -89.0  # the bottom edge bulges towards the pole
    assert maxdec[0] == pytest.approx(-88.0, abs=1e-9)


def test_points_in_polygons_matches_wcs_pixel_test():
    """A point is inside a TAN image's corner polygon iff its pixel position is inside the image."""
    rng = np.random.default_rng(1)
    shape = (300, 500)
    for ra0, dec0 in [(0.05, 0.0), (200.0, 89.95), (20.0, -60.0)]:
        wcs = _tan_wcs(ra0, dec0, scale_arcsec=1.0, rotation_deg=rng.uniform(0, 90), shape=shape)
        cra, cdec = fp.corners_from_wcs(shape, wcs)
        x = rng.uniform(-100, shape[1] + 100, 4000)
        y = rng.uniform(-100, shape[0] + 100, 4000)
        ra, dec = wcs.pixel_to_world_values(x, y)
        truth = (x > -0.5) & (x < shape[1] - 0.5) & (y > -0.5) & (y < shape[0] - 0.5)
        got = fp.points_in_polygons(ra, dec, np.tile(cra, (len(x), 1)), np.tile(cdec, (len(x), 1)))
        # TAN maps straight pixel edges onto great circles, so the test is exact.
        assert np.array_equal(got, truth)


def test_overlap_half_shifted_boxes():
    a = fp.box_polygon(0.0, 1.0, 0.0, 1.0)
    b = fp.box_polygon(0.5, 1.5, 0.0, 1.0)
    assert fp.overlap_fractions(*a, *a)[0] == pytest.approx(1.0, abs=1e-12)
    assert fp.overlap_fractions(*b, *a)[0] == pytest.approx(0.5, abs=1e-4)
    assert fp.overlap_fractions(*fp.box_polygon(10, 11, 0, 1), *a)[0] == 0.0
    small = fp.box_polygon(0.25, 0.5, 0.25, 0.5)
    assert fp.overlap_fractions(*small, *a, of="polygon")[0] == pytest.approx(1.0, abs=1e-12)
    assert fp.overlap_fractions(*small, *a, of="target")[0] == pytest.approx(1 / 16, rel=1e-3)


@pytest.mark.parametrize("target_box", [(359.0, 1.0, -1.0, 1.0), (100.0, 140.0, 87.0, 89.0),
                                        (30.0, 32.0, -45.0, -43.0)])
def test_overlap_matches_monte_carlo(target_box):
    """Random rotated images against a box: clipping + spherical areas vs counting points."""
    rng = np.random.default_rng(7)
    target = fp.box_polygon(*target_box)
    (t_ra,), (t_dec,) = fp.polygon_centers(*target)
    radius = fp.polygon_radii(*target, t_ra, t_dec)[0]
    polys_ra, polys_dec = [], []
    for _ in range(12):
        offset = rng.uniform(-1, 1, 2) * radius
        ra_i, dec_i = fp.inverse_gnomonic(np.radians(offset[0]), np.radians(offset[1]), t_ra, t_dec)
        wcs = _tan_wcs(float(ra_i), float(dec_i), scale_arcsec=radius * 3600 / 150,
                       rotation_deg=rng.uniform(0, 90), shape=(200, 250))
        cra, cdec = fp.corners_from_wcs((200, 250), wcs)
        polys_ra.append(cra)
        polys_dec.append(cdec)
    polys_ra, polys_dec = np.array(polys_ra), np.array(polys_dec)
    fractions = fp.overlap_fractions(polys_ra, polys_dec, *target)
    # Monte Carlo: points uniform in the target's bounding box, kept if inside the target.
    bounds = [b[0] for b in fp.polygon_bounds(*target)]
    ra, dec, _ = _random_points_in_bounds(rng, *bounds, 60000)
    in_target = fp.points_in_polygons(ra, dec, np.tile(target[0], (len(ra), 1)), np.tile(target[1], (len(ra), 1)))
    ra, dec = ra[in_target], dec[in_target]
    for k in range(len(polys_ra)):
        inside = fp.points_in_polygons(ra, dec, np.tile(polys_ra[k], (len(ra), 1)),
                                       np.tile(polys_dec[k], (len(ra), 1)))
        sigma = np.sqrt(max(fractions[k] * (1 - fractions[k]), 1e-4) / len(ra))
        assert fractions[k] == pytest.approx(inside.mean(), abs=5 * sigma + 1e-4)
    assert np.any((fractions > 0.05) & (fractions < 0.95))  # partial overlaps were exercised
    # vectorized == one at a time
    one_by_one = [fp.overlap_fractions(polys_ra[k], polys_dec[k], *target)[0] for k in range(len(polys_ra))]
    np.testing.assert_allclose(fractions, one_by_one, atol=1e-14)


def test_radius_encloses_polygon():
    ra, dec = np.array([10.0, 12.0, 12.0, 10.0]), np.array([40.0, 40.0, 41.0, 41.0])
    ra_c, dec_c = fp.polygon_centers(ra, dec)
    radius = fp.polygon_radii(ra, dec, ra_c, dec_c)[0]
    np.testing.assert_allclose(radius, fp.angular_distance(ra, dec, ra_c[0], dec_c[0]).max())
    edge_mid = fp.xyz_to_radec(fp.radec_to_xyz(10.0, 41.0) + fp.radec_to_xyz(12.0, 41.0))
    assert fp.angular_distance(*edge_mid, ra_c[0], dec_c[0]) < radius


def test_bad_arguments():
    with pytest.raises(ValueError, match="mindec < maxdec"):
        fp.box_polygon(0, 1, 2, 1)
    with pytest.raises(ValueError, match="RA span"):
        fp.box_polygon(0, 200, 0, 1)
    with pytest.raises(ValueError, match="same shape"):
        fp.polygon_bounds([0, 1, 2], [0, 1])
    with pytest.raises(ValueError, match="of must be"):
        fp.overlap_fractions(*fp.box_polygon(0, 1, 0, 1), *fp.box_polygon(0, 1, 0, 1), of="image")
