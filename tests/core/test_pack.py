"""Bit packing: exact round trip for every width and length, byte layout, bad input."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from specquant.core.pack import (
    code_bits,
    grid_nbytes,
    pack,
    pack_grid,
    pack_rows,
    pack_trits,
    packed_nbytes,
    packing_for,
    rows_nbytes,
    trits_nbytes,
    unpack,
    unpack_grid,
    unpack_rows,
    unpack_trits,
)


def _random_codes(n: int, bits: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 1 << bits, (n,), generator=g, dtype=torch.int64).to(torch.uint8)


def _reference_pack(codes: list[int], bits: int) -> bytes:
    """Plain-Python little-endian bit stream: the layout the module docstring promises."""
    acc = 0
    for i, c in enumerate(codes):
        acc |= c << (i * bits)
    return acc.to_bytes((len(codes) * bits + 7) // 8, "little")


@pytest.mark.parametrize("bits", range(1, 9))
@settings(max_examples=50, deadline=None)
@given(n=st.integers(0, 1000), seed=st.integers(0, 2**31 - 1))
def test_round_trip_any_length(bits, n, seed):
    codes = _random_codes(n, bits, seed)
    data = pack(codes, bits)
    assert data.dtype == torch.uint8 and data.dim() == 1
    assert data.numel() == packed_nbytes(n, bits) == -(-n * bits // 8)
    out = unpack(data, bits, n)
    assert out.dtype == torch.uint8 and out.shape == (n,)
    assert torch.equal(out, codes)


@pytest.mark.parametrize("bits", range(1, 9))
@settings(max_examples=10, deadline=None)
@given(n=st.integers(0, 40), seed=st.integers(0, 2**31 - 1))
def test_layout_matches_reference_bit_stream(bits, n, seed):
    codes = _random_codes(n, bits, seed)
    assert bytes(pack(codes, bits).tolist()) == _reference_pack(codes.tolist(), bits)


def test_known_bytes():
    # 4 bits: code 0 in the low nibble; 3 bits: 5 | 6 << 3 | 7 << 6 = 501 = 0x1F5, straddling byte 0
    assert pack(torch.tensor([1, 2], dtype=torch.uint8), 4).tolist() == [0x21]
    assert pack(torch.tensor([5, 6, 7], dtype=torch.uint8), 3).tolist() == [0xF5, 0x01]
    assert pack(torch.tensor([1, 0, 1, 1, 0, 0, 0, 0, 1], dtype=torch.uint8), 1).tolist() == [0b1101, 1]


def test_extreme_codes_and_any_shape():
    for bits in range(1, 9):
        codes = torch.full((3, 5, 7), (1 << bits) - 1, dtype=torch.uint8)
        codes[1] = 0
        out = unpack(pack(codes, bits), bits, codes.numel()).reshape(codes.shape)
        assert torch.equal(out, codes)


def test_non_contiguous_input():
    codes = _random_codes(60, 5, 0).reshape(6, 10).T  # a transposed view
    assert torch.equal(unpack(pack(codes, 5), 5, 60), codes.reshape(-1))


def test_extra_bytes_are_ignored():
    codes = _random_codes(11, 3, 1)
    data = torch.cat([pack(codes, 3), torch.tensor([255, 255], dtype=torch.uint8)])
    assert torch.equal(unpack(data, 3, 11), codes)


@pytest.mark.parametrize("bits", [0, 9, -1, 2.0, True])
def test_bad_bits(bits):
    with pytest.raises(ValueError, match="1..8"):
        pack(torch.zeros(4, dtype=torch.uint8), bits)
    with pytest.raises(ValueError, match="1..8"):
        unpack(torch.zeros(4, dtype=torch.uint8), bits, 4)
    with pytest.raises(ValueError, match="1..8"):
        packed_nbytes(4, bits)


def test_code_too_large():
    codes = torch.tensor([0, 3, 8, 9], dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"2 code\(s\) do not fit in 3 bits.*index 2 with value 8"):
        pack(codes, 3)


@pytest.mark.parametrize("dtype", [torch.int8, torch.int32, torch.int64, torch.float32])
def test_non_uint8_input(dtype):
    with pytest.raises(ValueError, match="uint8"):
        pack(torch.zeros(4, dtype=dtype), 4)
    with pytest.raises(ValueError, match="uint8"):
        unpack(torch.zeros(4, dtype=dtype), 4, 4)
    with pytest.raises(ValueError, match="uint8"):
        pack([1, 2, 3], 4)


def test_too_short_data():
    data = pack(_random_codes(10, 7, 2), 7)  # 9 bytes
    with pytest.raises(ValueError, match="holds 9 byte.*need 10"):
        unpack(data, 7, 11)


def test_bad_numel():
    with pytest.raises(ValueError, match="non-negative"):
        unpack(torch.zeros(4, dtype=torch.uint8), 4, -1)


# ---- ternary (five per byte) and per-row layouts ------------------------------------------------

@pytest.mark.parametrize("n", [0, 1, 4, 5, 6, 9, 10, 11, 997])
def test_trits_round_trip_and_size(n):
    d = torch.randint(0, 3, (n,), generator=torch.Generator().manual_seed(n), dtype=torch.uint8)
    p = pack_trits(d)
    assert p.dtype == torch.uint8 and p.numel() == trits_nbytes(n) == -(-n // 5)
    assert int(p.max()) <= 242 if n else True
    assert torch.equal(unpack_trits(p, n), d)


def test_trits_layout_is_base3_little_endian():
    d = torch.tensor([1, 2, 0, 1, 2, 2], dtype=torch.uint8)
    assert pack_trits(d).tolist() == [1 + 2 * 3 + 0 * 9 + 1 * 27 + 2 * 81, 2]


def test_trits_errors_are_one_line():
    with pytest.raises(ValueError, match="ternary digit"):
        pack_trits(torch.tensor([0, 3], dtype=torch.uint8))
    with pytest.raises(ValueError, match="need 2"):
        unpack_trits(torch.zeros(1, dtype=torch.uint8), 6)
    with pytest.raises(ValueError, match="exceeds 242"):
        unpack_trits(torch.tensor([250], dtype=torch.uint8), 5)


def test_only_three_level_two_bit_grids_are_trit_packed():
    assert packing_for(3, 2) == "trits" and code_bits(3, 2) == 1.6
    assert packing_for(4, 2) == "bits" and code_bits(4, 2) == 2.0
    assert packing_for(7, 3) == "bits" and code_bits(7, 3) == 3.0
    codes = torch.tensor([1, 3, 2, 2, 1, 3, 3], dtype=torch.uint8)  # narrow 2-bit grid: codes 1..3
    p = pack_grid(codes, 3, 2, 1)
    assert p.numel() == grid_nbytes(7, 3, 2) == 2
    assert torch.equal(unpack_grid(p, 3, 2, 1, 7), codes)
    with pytest.raises(ValueError, match="below the grid's smallest code"):
        pack_grid(torch.tensor([0], dtype=torch.uint8), 3, 2, 1)


def _grid(b):  # (levels, qmin) of the default symmetric grid of width b
    from specquant.core.grid import GridSpec

    g = GridSpec.default(b, True)
    return g.levels, g.qmin


def test_rows_layout_round_trip_and_size():
    from specquant.core.grid import GridSpec

    g = torch.Generator().manual_seed(0)
    widths = [2, 8, 3, 2, 1, 4, 8, 2]
    n = 13
    rows = []
    for b in widths:
        spec = GridSpec.default(b, True)
        rows.append(torch.randint(spec.qmin, spec.qmax + 1, (n,), generator=g).to(torch.uint8))
    codes = torch.stack(rows)  # (8, 13)
    p = pack_rows(codes, widths, _grid)
    expect = trits_nbytes(3 * n) + sum(packed_nbytes(widths.count(b) * n, b) for b in (1, 3, 4, 8))
    assert p.numel() == rows_nbytes(widths, n, _grid) == expect
    assert torch.equal(unpack_rows(p, widths, n, _grid), codes)
    with pytest.raises(ValueError, match="rows need"):
        unpack_rows(p[:-1], widths, n, _grid)
