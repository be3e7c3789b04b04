"""Layouts: exact round trips, sizes, records, one clear error per bad case, and a new layout in one class."""
import dataclasses
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from specquant.core.grid import Granularity, GridSpec
from specquant.core.layouts import (
    BitsLayout,
    FrameLayout,
    Layout,
    RowsLayout,
    TritsLayout,
    grid_code_bits,
    grid_layout,
    layout_class,
    layout_tensor_names,
    register_layout,
    unregister_layout,
)
from specquant.core.pack import pack, packed_nbytes, trits_nbytes, unpack


def _codes(shape, lo: int, hi: int, seed: int) -> torch.Tensor:
    """uint8 codes in lo..hi."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(lo, hi + 1, tuple(shape), generator=g, dtype=torch.int64).to(torch.uint8)


def _roundtrip(layout: Layout, codes: torch.Tensor) -> torch.Tensor:
    data = layout.pack(codes)
    assert data.dtype == torch.uint8 and data.dim() == 1 and data.numel() == layout.nbytes()
    layout.validate(data)  # its own bytes are valid
    out = layout.unpack(data)
    assert out.dtype == torch.uint8 and tuple(out.shape) == layout.shape
    assert torch.equal(out, codes)
    return data


def _from_record(layout: Layout, spec: GridSpec, weight_shape) -> Layout:
    return Layout.from_record(layout.to_record(), layout.tensors(), spec=spec, weight_shape=weight_shape)


# ---- round trips and sizes --------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(1, 8), rows=st.integers(1, 12), cols=st.integers(1, 40), seed=st.integers(0, 2**31 - 1),
       r=st.data())
def test_bits_round_trip_size_and_row_slices(bits, rows, cols, seed, r):
    layout = BitsLayout(bits, (rows, cols))
    codes = _codes((rows, cols), 0, (1 << bits) - 1, seed)
    data = _roundtrip(layout, codes)
    assert layout.nbytes() == packed_nbytes(rows * cols, bits) == -(-rows * cols * bits // 8)
    assert torch.equal(data, pack(codes, bits))  # the core bit stream, nothing added
    assert layout.code_bits() == rows * cols * bits and layout.identity_bytes == (bits == 8)
    r0 = r.draw(st.integers(0, rows - 1))
    r1 = r.draw(st.integers(r0 + 1, rows))
    assert torch.equal(layout.unpack_rows(data, r0, r1), codes[r0:r1])  # aligned or not


@settings(max_examples=30, deadline=None)
@given(shape=st.lists(st.integers(1, 9), min_size=1, max_size=3), seed=st.integers(0, 2**31 - 1))
def test_trits_round_trip_and_size(shape, seed):
    layout = TritsLayout(tuple(shape))
    codes = _codes(shape, 1, 3, seed)  # the narrow 2-bit grid's codes
    data = _roundtrip(layout, codes)
    n = codes.numel()
    assert layout.nbytes() == trits_nbytes(n) == -(-n // 5) and int(data.max()) <= 242
    assert layout.code_bits() == Fraction(8, 5) * n


@settings(max_examples=30, deadline=None)
@given(widths=st.lists(st.integers(1, 8), min_size=1, max_size=10), cols=st.integers(1, 23),
       symmetric=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_rows_round_trip_and_size(widths, cols, symmetric, seed):
    layout = RowsLayout(widths, (len(widths), cols), symmetric)
    rows = []
    for i, b in enumerate(widths):
        g = GridSpec.default(b, symmetric)
        rows.append(_codes((cols,), g.qmin, g.qmax, seed + i))
    codes = torch.stack(rows)  # (out, cols), row i on the default grid of its width
    _roundtrip(layout, codes)
    trit = symmetric  # the symmetric 2-bit default grid has 3 levels: five codes per byte
    expect = sum(trits_nbytes(widths.count(b) * cols) if (b == 2 and trit) else packed_nbytes(widths.count(b) * cols, b)
                 for b in set(widths))
    assert layout.nbytes() == expect
    assert layout.code_bits() == sum(Fraction(8, 5) if (b == 2 and trit) else b for b in widths) * cols
    assert layout.extra_bits() == 8 * len(widths) and layout.tensors()["row_bits"].tolist() == widths
    assert layout.identity_bytes == (set(widths) == {8})


def test_rows_segments_are_each_width_in_increasing_order():
    layout = RowsLayout([4, 1, 4, 3], (4, 6))
    codes = torch.stack([_codes((6,), 1, 15, 0), _codes((6,), 0, 1, 1), _codes((6,), 1, 15, 2), _codes((6,), 1, 7, 3)])
    expect = torch.cat([pack(codes[[1]], 1), pack(codes[[3]], 3), pack(codes[[0, 2]], 4)])
    assert torch.equal(layout.pack(codes), expect)


def test_frame_round_trip_is_bit_packed_coefficients():
    layout = FrameLayout(3, (10, 4), frame_kind="harmonic", dim=5, size=10, seed=0, order=1, along="input")
    codes = _codes((10, 4), 0, 7, 0)
    data = _roundtrip(layout, codes)
    assert torch.equal(data, BitsLayout(3, (10, 4)).pack(codes)) and layout.code_bits() == 120
    assert not layout.codes_are_weights and not layout.identity_bytes


def test_grid_layout_and_code_bits():
    assert grid_layout(GridSpec(2, "narrow"), (3, 4)) == TritsLayout((3, 4))
    for spec in (GridSpec(2, "full"), GridSpec(2, "asymmetric"), GridSpec(1, "binary"), GridSpec(8, "narrow")):
        assert grid_layout(spec, (3, 4)) == BitsLayout(spec.bits, (3, 4))
    ternary = GridSpec(2, "narrow")
    assert grid_code_bits(ternary) == Fraction(8, 5) and float(grid_code_bits(ternary)) == 1.6
    assert grid_code_bits(GridSpec(2, "midrise")) == 2 and grid_code_bits(GridSpec(7, "narrow")) == 7


def test_for_shape():
    assert BitsLayout(3, (4, 6)).for_shape((2, 3, 4, 5)) == BitsLayout(3, (2, 3, 4, 5))
    assert RowsLayout([1, 2], (2, 6)).for_shape((2, 3, 2)) == RowsLayout([1, 2], (2, 3, 2))
    with pytest.raises(ValueError, match="row_bits has 2 widths for 3 rows"):
        RowsLayout([1, 2], (2, 6)).for_shape((3, 4))
    frame = FrameLayout(2, (6, 3), frame_kind="random", dim=4, size=6, seed=1, order=2, along="input")
    assert frame.for_shape((6, 3)) is frame
    with pytest.raises(ValueError, match="cannot be reshaped"):
        frame.for_shape((3, 6))


# ---- records ----------------------------------------------------------------------------------


_SPEC4, _SPEC2 = GridSpec(4, "narrow"), GridSpec(2, "narrow")
RECORD_CASES = [  # (layout, its grid, the weight shape, the record it writes)
    (BitsLayout(4, (8, 6)), _SPEC4, (8, 6), {"kind": "uniform", "packing": "bits"}),
    (TritsLayout((8, 6)), _SPEC2, (8, 6), {"kind": "uniform", "packing": "trits"}),
    (RowsLayout([4, 2, 3, 4], (4, 5)), _SPEC4, (4, 5), {"kind": "uniform", "packing": "rows"}),
    (FrameLayout(2, (12, 3), frame_kind="harmonic", dim=6, size=12, seed=0, order=1, along="input"),
     GridSpec(2, "midrise"), (3, 6),
     {"kind": "frame", "packing": "bits", "codes_shape": [12, 3],
      "frame": {"kind": "harmonic", "dim": 6, "size": 12, "seed": 0, "order": 1, "along": "input"}}),
]


@pytest.mark.parametrize("layout,spec,weight_shape,record", RECORD_CASES, ids=lambda v: getattr(v, "name", None))
def test_record_round_trip(layout, spec, weight_shape, record):
    assert layout.to_record() == record
    assert list(layout.to_record().get("frame", {})) == list(record.get("frame", {}))  # key order is file bytes
    back = _from_record(layout, spec, weight_shape)
    assert type(back) is type(layout) and back == layout
    assert set(layout.tensors()) == set(layout.tensor_names)
    for k, t in layout.tensors().items():
        assert torch.equal(back.tensors()[k], t)


def test_records_without_packing_are_bit_packed():
    # files written before the "packing" field
    assert layout_class({"kind": "uniform"}) is BitsLayout and layout_class({"kind": "frame"}) is FrameLayout
    assert set(layout_tensor_names()) >= {"row_bits"}


# ---- every bad case: one line naming the problem ----------------------------------------------


def _record(layout_record, tensors=None, spec=_SPEC4, shape=(4, 5)):
    return lambda: Layout.from_record(layout_record, tensors or {}, spec=spec, weight_shape=shape, layer="fc")


_ROW_BITS = torch.tensor([4, 2, 3, 4], dtype=torch.uint8)
_FRAME = {"kind": "harmonic", "dim": 5, "size": 10, "seed": 0, "order": 1, "along": "input"}
_FREC = {"kind": "frame", "packing": "bits", "codes_shape": [10, 4], "frame": _FRAME}
BAD = [
    # records
    (_record({"kind": "lattice"}), "layer 'fc': unknown weight kind 'lattice'"),
    (_record({"packing": "bits"}), "unknown weight kind None"),
    (_record({"kind": "uniform", "packing": "zip"}), "unknown code packing 'zip' for uniform weights"),
    (_record({"kind": "uniform", "packing": 7}), "unknown code packing 7"),
    (_record({"kind": "frame", "packing": "trits"}), "unknown code packing 'trits' for frame weights"),
    (_record({"kind": "uniform", "packing": "rows"}), r"'fc.row_bits' should be uint8 \(4,\), got nothing"),
    (_record({"kind": "uniform", "packing": "rows"}, {"row_bits": _ROW_BITS.long()}), "'fc.row_bits' should be uint8"),
    (_record({"kind": "uniform", "packing": "rows"}, {"row_bits": _ROW_BITS[:3]}), "'fc.row_bits' should be uint8"),
    (_record({"kind": "uniform", "packing": "rows"}, {"row_bits": _ROW_BITS * 0}), "widths in 1..8"),
    (_record({"kind": "uniform", "packing": "rows"}, {"row_bits": _ROW_BITS + 5}), "widths in 1..8"),
    (_record({"kind": "uniform", "packing": "rows"}, {"row_bits": _ROW_BITS}, spec=GridSpec(5, "narrow")),
     "whose largest is the layer's 5 bits"),
    (_record({"kind": "frame"}), "layer 'fc': lacks its frame parameters"),
    (_record({**_FREC, "frame": {**_FRAME, "extra": 1}}), "lacks its frame parameters"),
    (_record({**_FREC, "codes_shape": [10]}), "lacks its codes shape"),
    (_record({**_FREC, "codes_shape": [10, "4"]}), "lacks its codes shape"),
    (_record({**_FREC, "frame": {**_FRAME, "order": 3}}), "layer 'fc': invalid frame parameters"),
    (_record({**_FREC, "frame": {**_FRAME, "kind": ["harmonic"]}}), "invalid frame parameters"),
    (_record({**_FREC, "frame": {**_FRAME, "seed": -1}}), "invalid frame parameters"),
    (_record({**_FREC, "frame": {**_FRAME, "along": "diagonal"}}), "invalid frame parameters"),
    (_record({**_FREC, "frame": {**_FRAME, "dim": True}}), "invalid frame parameters"),
    (_record({**_FREC, "frame": {**_FRAME, "size": 4}}), "at least as many vectors"),
    (_record({**_FREC, "codes_shape": [9, 4]}), r"frame codes must have shape \(size, vectors\)"),
    # constructors
    (lambda: BitsLayout(9, (2, 2)), "bits must be an integer in 1..8"),
    (lambda: BitsLayout(4, (2, -1)), "codes shape must be a tuple of non-negative integers"),
    (lambda: RowsLayout([1, 9], (2, 3)), "row width must be an integer in 1..8, got 9"),
    (lambda: RowsLayout([1, 2.5], (2, 3)), "row width must be an integer in 1..8, got 2.5"),
    (lambda: RowsLayout([1, 2, 3], (4, 3)), "row_bits has 3 widths for 4 rows"),
    # validate: the grid, the granularity, the weight shape, the bytes
    (lambda: BitsLayout(4, (4, 5)).validate(spec=GridSpec(3, "narrow"), layer="fc"),
     "layer 'fc': the layout packs 4-bit codes, the grid has 3 bits"),
    (lambda: TritsLayout((4, 5)).validate(spec=GridSpec(3, "narrow")), "'trits' packing on a 7-level grid"),
    (lambda: TritsLayout((4, 5)).validate(spec=GridSpec(2, "full")), "'trits' packing on a 4-level grid"),
    (lambda: RowsLayout(_ROW_BITS, (4, 5)).validate(spec=GridSpec(8, "narrow")),
     "the grid's width 8 must be the largest row width 4"),
    (lambda: RowsLayout(_ROW_BITS, (4, 5)).validate(spec=GridSpec(4, "full")), "default grid of its width"),
    (lambda: RowsLayout(_ROW_BITS, (4, 5)).validate(granularity=Granularity("tensor")),
     r"per-row widths need per-output-channel scales \(granularity 'channel', axis 0\), not tensor"),
    (lambda: RowsLayout(_ROW_BITS, (4, 5)).validate(granularity=Granularity("channel", axis=1)),
     "per-output-channel scales"),
    (lambda: BitsLayout(4, (4, 5)).validate(weight_shape=(5, 4)), r"codes of shape \(4, 5\) do not fit a weight of "),
    (lambda: FrameLayout(2, (10, 4), **{f"frame_{k}" if k == "kind" else k: v for k, v in _FRAME.items()}
                         ).validate(weight_shape=(4, 6), layer="fc"),
     r"layer 'fc': frame parameters .* do not fit a weight of shape \(4, 6\)"),
    (lambda: FrameLayout(2, (10, 4), **{f"frame_{k}" if k == "kind" else k: v for k, v in _FRAME.items()}
                         ).validate(weight_shape=(5, 4)), "do not fit a weight of shape"),
    (lambda: BitsLayout(4, (4, 5)).validate(torch.zeros(9, dtype=torch.uint8), layer="fc"),
     r"'fc.codes' is uint8 \(9,\), expected uint8 \(10,\) for 20 codes in BitsLayout\(bits=4, shape=\(4, 5\)\)"),
    (lambda: BitsLayout(4, (4, 5)).validate(torch.zeros(10, dtype=torch.int8)), r"'codes' is int8 \(10,\)"),
    (lambda: BitsLayout(4, (4, 5)).validate(torch.zeros(2, 5, dtype=torch.uint8)), r"is uint8 \(2, 5\)"),
    (lambda: TritsLayout((4, 5)).validate(torch.zeros(5, dtype=torch.uint8)), r"expected uint8 \(4,\)"),
    (lambda: RowsLayout(_ROW_BITS, (4, 5)).validate(torch.zeros(7, dtype=torch.uint8)), r"expected uint8 \(8,\)"),
    # packing codes that do not fit
    (lambda: BitsLayout(3, (2, 2)).pack(torch.full((2, 2), 8, dtype=torch.uint8)), "do not fit in 3 bits"),
    (lambda: BitsLayout(3, (2, 2)).pack(torch.zeros(4, dtype=torch.uint8)), r"codes of shape \(4,\) do not fit"),
    (lambda: BitsLayout(3, (2, 2)).pack(torch.zeros(2, 2)), "codes must be a uint8 tensor"),
    (lambda: TritsLayout((3,)).pack(torch.tensor([1, 0, 2], dtype=torch.uint8)), "below the grid's smallest code 1"),
    (lambda: TritsLayout((3,)).pack(torch.tensor([1, 4, 2], dtype=torch.uint8)), "ternary digit"),
    (lambda: RowsLayout([2, 3], (2, 2)).unpack(torch.zeros(1, dtype=torch.uint8)), "the rows need 2"),
]


@pytest.mark.parametrize("call,match", BAD, ids=[m for _, m in BAD])
def test_bad_cases_are_one_clear_line(call, match):
    with pytest.raises(ValueError, match=match) as info:
        call()
    assert "\n" not in str(info.value)


def test_registration_refuses_clashes():
    class Clash(BitsLayout):
        name = "clash"  # same ("uniform", "bits") as BitsLayout

    with pytest.raises(ValueError, match="already read by BitsLayout"):
        register_layout(Clash)

    class Shadow(BitsLayout):
        name, packing, tensor_names = "shadow", "shadow", ("scale",)

    with pytest.raises(ValueError, match="tensor names must be identifiers other than a layer's own"):
        register_layout(Shadow)


# ---- a new stored field is one class ----------------------------------------------------------


class PermutedRowsLayout(BitsLayout):
    """Bits, with the rows stored in a permuted order kept as a tensor ``perm``: row i of the
    stored codes is row ``perm[i]`` of the weight (what an act-order/group layout needs to carry)."""

    name = "bits-perm"
    packing = "bits-perm"
    tensor_names = ("perm",)
    cheap_row_slices = False

    def __init__(self, bits, shape, perm) -> None:
        super().__init__(bits, shape)
        self.perm = torch.as_tensor(perm, dtype=torch.int64)
        if sorted(self.perm.tolist()) != list(range(self.shape[0])):
            raise ValueError(f"perm must be a permutation of the {self.shape[0]} rows")

    def pack(self, codes):
        self._check_codes(codes)
        return pack(codes[self.perm].contiguous(), self.bits)

    def unpack(self, data):
        stored = unpack(data, self.bits, self.numel).reshape(self.shape)
        out = torch.empty_like(stored)
        out[self.perm] = stored
        return out

    def tensors(self):
        return {"perm": self.perm}

    def for_shape(self, shape):
        return PermutedRowsLayout(self.bits, shape, self.perm)

    @classmethod
    def _from_record(cls, record, tensors, spec, weight_shape, layer):
        perm = tensors.get("perm")
        if not (isinstance(perm, torch.Tensor) and perm.dtype == torch.int64 and tuple(perm.shape) == weight_shape[:1]):
            raise ValueError(f"'{layer}.perm' should be int64 ({weight_shape[0]},)")
        return cls(spec.bits, weight_shape, perm)

    def _params(self):
        return {**super()._params(), "perm": tuple(self.perm.tolist())}


@pytest.fixture
def permuted_rows():
    register_layout(PermutedRowsLayout)
    yield PermutedRowsLayout
    unregister_layout(PermutedRowsLayout)


def test_a_new_stored_field_is_one_class(permuted_rows, tmp_path):
    """A layout defined here (a stored row permutation) goes through quantize → convert → save →
    load with no other change: io writes its record and tensor and reads them back, nn packs with it."""
    from safetensors import safe_open

    from specquant.algorithms import RTNConfig
    from specquant.engine.apply import quantize
    from specquant.io import SQFormatError, load, read_header, save
    from specquant.models import zoo

    torch.manual_seed(0)
    model = zoo.get_entry("digits-mlp").build().eval()
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    quantize(model, RTNConfig(bits=4), calib=x, progress=False)
    qw = model.fc2.qweight
    perm = torch.randperm(qw.shape[0], generator=torch.Generator().manual_seed(2))
    model.fc2.qweight = dataclasses.replace(qw, layout=PermutedRowsLayout(4, qw.shape, perm))
    assert not torch.equal(model.fc2.qweight.layout.pack(qw.codes), pack(qw.codes, 4))  # really stored permuted

    path = save(model, tmp_path / "perm.sq", model_id="digits-mlp")
    rec = next(r for r in read_header(path)["layers"] if r["name"] == "fc2")
    assert rec["packing"] == "bits-perm" and rec["kind"] == "uniform"
    with safe_open(str(path), "pt") as f:
        assert torch.equal(f.get_tensor("fc2.perm"), perm)
    loaded = load(path, kernel="torch")
    assert loaded.fc2.packed.layout == model.fc2.qweight.layout
    assert torch.equal(loaded.fc2.packed.unpack(), qw.codes)
    assert torch.equal(loaded.fc2.packed.perm, perm)  # its tensor is a buffer of the packed weight
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))

    unregister_layout(PermutedRowsLayout)  # a reader that does not know the layout: one clear line
    with pytest.raises(SQFormatError, match="unknown code packing 'bits-perm'"):
        load(path)


# --------------------------------------------------------------------------- FP8


@pytest.mark.parametrize("kind", ["fp8-e4m3", "fp8-e5m2"])
def test_fp8_layout_round_trip_size_record_and_bad_codes(kind):
    from specquant.core.layouts import FP8Layout, Layout
    from specquant.core.quantizer import quantize_tensor
    from specquant.core.qweight import QuantizedWeight

    spec = GridSpec(8, kind)
    finite = torch.isfinite(torch.arange(256, dtype=torch.int32).to(torch.uint8).view(spec.fp8.dtype).float())
    codes = torch.nonzero(finite).reshape(-1).to(torch.uint8)  # every finite bit pattern
    codes = torch.cat([codes, codes.flip(0)])[:240].reshape(6, 40)
    lay = grid_layout(spec, codes.shape)
    assert isinstance(lay, FP8Layout) and lay.nbytes() == codes.numel() and lay.code_bits() == 8 * codes.numel()
    data = lay.pack(codes)
    assert torch.equal(lay.unpack(data), codes) and torch.equal(lay.unpack_rows(data, 2, 5), codes[2:5])
    lay.validate(data, spec=spec, weight_shape=(6, 40))
    back = Layout.from_record(lay.to_record(), {}, spec=spec, weight_shape=(6, 40))
    assert back == lay and lay.to_record() == {"kind": "uniform", "packing": "fp8"}
    bad = data.clone()
    bad[7] = 0x7F  # NaN in both formats
    with pytest.raises(ValueError, match=rf"'fc.codes' byte 7 \(0x7f\) is not a finite {kind} value"):
        lay.validate(bad, spec=spec, layer="fc")
    with pytest.raises(ValueError, match="'fp8' packing on a narrow grid"):
        lay.validate(spec=GridSpec(8, "narrow"))
    with pytest.raises(ValueError, match="stored with 'fp8' packing, not 'bits'"):
        BitsLayout(8, (6, 40)).validate(spec=spec)
    # a weight: 8 bits per weight + one float32 scale per row
    qw = quantize_tensor(torch.randn(6, 40), bits=8, grid=kind)
    assert isinstance(qw.layout, FP8Layout)
    assert qw.storage_bits() == 8 * 240 + 32 * 6
    assert isinstance(QuantizedWeight(qw.codes, qw.scale, qw.zero_point, spec, qw.granularity).layout, FP8Layout)
