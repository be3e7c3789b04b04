"""Bit packing: exact round trip for every width and length, byte layout, bad input."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from specquant.core.pack import pack, pack_trits, packed_nbytes, trits_nbytes, unpack, unpack_trits


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


@pytest.mark.parametrize("bits", range(1, 9))
@settings(max_examples=10, deadline=None)
@given(data=st.binary(max_size=40), n=st.integers(0, 320))
def test_unpack_matches_reference_bit_stream(bits, data, n):
    # any bytes (not only pack's output) decode as the documented little-endian bit stream
    n = min(n, len(data) * 8 // bits)
    acc = int.from_bytes(data, "little")
    expect = [(acc >> (i * bits)) & ((1 << bits) - 1) for i in range(n)]
    assert unpack(torch.tensor(list(data), dtype=torch.uint8), bits, n).tolist() == expect


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
