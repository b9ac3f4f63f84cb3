"""Code tables: NF4/FP4 values and bitsandbytes' dynamic map, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

from msbnb_pass import formats as fm

NF4 = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
]


def test_nf4_and_fp4_tables():
    np.testing.assert_array_equal(fm.get_4bit_code("nf4"), np.array(NF4, np.float32))
    fp4 = np.array([0, 0.0625, 8, 12, 4, 6, 2, 3, 0, -0.0625, -8, -12, -4, -6, -2, -3], np.float32) / 12
    np.testing.assert_array_equal(fm.get_4bit_code("fp4"), fp4)
    assert fm.get_4bit_code("int4")[1] == -1.0 and fm.get_4bit_code("int4")[15] == 1.0
    assert fm.get_4bit_code("int4")[8] == 0.0
    asym = fm.get_4bit_code("int4", symmetric=False)
    np.testing.assert_allclose(np.diff(asym), 2 / 15, rtol=1e-6)
    assert asym[0] == -1.0 and asym[-1] == 1.0


def test_get_4bit_code_returns_a_private_copy():
    code = fm.get_4bit_code("nf4")
    code[0] = 5.0
    assert fm.get_4bit_code("nf4")[0] == -1.0


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_is_bitsandbytes_map(bnb_golden, signed):
    ref = bnb_golden["dynamic_map/signed" if signed else "dynamic_map/unsigned"]
    ours = fm.create_dynamic_map(signed=signed)
    assert ours.dtype == np.float32 and ours.shape == (256,)
    np.testing.assert_array_equal(ours.view(np.uint32), ref.view(np.uint32))
    assert np.all(np.diff(ours) >= 0)


def test_dynamic_map_bad_arguments():
    with pytest.raises(ValueError, match=r"max_exponent_bits must be in \[1, 7\], got 9"):
        fm.create_dynamic_map(max_exponent_bits=9)
    with pytest.raises(ValueError, match="total_bits must be 8, got 4"):
        fm.create_dynamic_map(total_bits=4)
