"""Tests of improc.color_transforms: band transformations, published tables, digests."""

from __future__ import annotations

import numpy as np
import pytest

from improc.color_transforms import (DECAM_ZHOU2020, PUBLISHED_TRANSFORMS, BandTransform, gaia_to_band,
                                     table_digest, transform_table)

MADE_UP = BandTransform(coefficients=(0.2, -0.45, 0.06), color_range=(-0.3, 3.2), average_color=1.1)


def test_magnitudes_are_g_plus_the_polynomial_in_the_clipped_colour():
    g = np.array([16.0, 17.0, 18.0, 19.0, 20.0])
    bp = g + np.array([0.4, 1.2, 2.4, np.nan, -0.8])
    rp = g - np.array([0.2, 0.3, 2.0, 0.5, 0.0])
    color = np.array([0.6, 1.5, 3.2, 1.1, -0.3])     # 4.4 clipped to 3.2, NaN -> 1.1, -0.8 -> -0.3
    expected = g + 0.2 - 0.45 * color + 0.06 * color**2
    np.testing.assert_allclose(gaia_to_band(g, bp, rp, MADE_UP), expected, rtol=0, atol=1e-12)
    assert np.isnan(MADE_UP.magnitudes([np.nan], [1.0], [0.5]))[0]


def test_decam_r_keeps_the_published_zhou_2020_polynomial():
    """The numbers of R. Zhou (2020) used before transformations belonged to instruments."""
    r = DECAM_ZHOU2020["r"]
    assert r.color_range == (-0.6, 4.1) and r.average_color == 1.4
    assert r.coefficients[:3] == (0.1139078673, -0.2868955307, 0.0013196434) and len(r.coefficients) == 13
    assert sorted(DECAM_ZHOU2020) == ["g", "i", "r", "z"]
    # at the average colour and beyond the range (clipped)
    value = np.polynomial.polynomial.polyval(1.4, r.coefficients)
    assert gaia_to_band(np.array([18.0]), np.array([np.nan]), np.array([17.0]), r)[0] == pytest.approx(18.0 + value)
    at_edge = gaia_to_band([18.0], [22.1], [18.0], r)[0]
    assert at_edge == gaia_to_band([18.0], [30.0], [18.0], r)[0]
    assert PUBLISHED_TRANSFORMS["decam_zhou2020"] is DECAM_ZHOU2020
    with pytest.raises(TypeError):
        DECAM_ZHOU2020["Y"] = MADE_UP        # the published table is read-only


def test_mapping_round_trip_and_digest_follows_content():
    table = transform_table({"r": MADE_UP.as_dict()})
    assert table == {"r": MADE_UP}
    assert table_digest(table) == table_digest({"r": BandTransform((0.2, -0.45, 0.06), (-0.3, 3.2), 1.1)})
    assert table_digest(table) == table_digest({"r": BandTransform([0.2, -0.45, 0.06], [-0.3, 3.2], 1.1)})
    changed = BandTransform(coefficients=(0.2, -0.45, 0.0600001), color_range=(-0.3, 3.2), average_color=1.1)
    assert table_digest({"r": changed}) != table_digest(table)
    assert table_digest({"i": MADE_UP}) != table_digest(table)            # the band is part of it
    assert table_digest(DECAM_ZHOU2020).startswith("sha256:") and len(table_digest(DECAM_ZHOU2020)) == 23
    assert transform_table("decam_zhou2020") == dict(DECAM_ZHOU2020)
    assert transform_table(None) == {}


@pytest.mark.parametrize("kwargs, match", [
    (dict(coefficients=(), color_range=(0, 1)), "coefficients must be one or more finite"),
    (dict(coefficients=(0.1, np.nan), color_range=(0, 1)), "coefficients must be one or more finite"),
    (dict(coefficients=(0.1,), color_range=(1, 0)), "color_range must be finite"),
    (dict(coefficients=(0.1,), color_range=(0, np.inf)), "color_range must be finite"),
    (dict(coefficients=(0.1,), color_range=(0, 1), average_color=1.4), r"average_color must be in color_range"),
])
def test_bad_transforms_raise_naming_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BandTransform(**kwargs)


@pytest.mark.parametrize("value, match", [
    ("decam_zhou2021", r"cam\.yaml: transforms: unknown published transformation table 'decam_zhou2021'"),
    ({"r": {"coefficients": [0.1]}}, r"cam\.yaml: transforms\.r: unknown keys \[\] / missing keys \['color_range'\]"),
    ({"r": {"coefficients": [0.1], "color_range": [0, 2], "slope": 1}}, r"transforms\.r: unknown keys \['slope'\]"),
    ({"g": {"coefficients": [0.1], "color_range": [2, 0]}}, r"transforms\.g: color_range must be"),
    ({"g": [0.1, 0.2]}, r"transforms\.g must be a mapping"),
    ([0.1, 0.2], r"transforms must be a table name or a mapping"),
])
def test_bad_tables_name_where_and_the_band(value, match):
    with pytest.raises(ValueError, match=match):
        transform_table(value, where="cam.yaml: transforms")
