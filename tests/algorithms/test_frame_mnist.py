"""Frame ΣΔ with 1-bit codes on the real MNIST MLP reaches the paper's 97.29 % (Czaja & Na 2024).

R = 3 is the smallest redundancy of the grid 1, 1.5, 2, 3, 4, 6, 8 that reaches the figure
(97.70 % from a 98.55 % float network; benchmarks/frame_vs_uniform.py, part (a)).  Accuracy is
not monotone in R: finer scans hit 97.29 % already at R = 2.45 but fall below it again at
R = 2.5 and 2.7, so the test uses the grid value, which every R in [2.75, 3] also passes.
Trains mnist-mlp into the cache once when it is missing (about 15 s).
"""
import pytest
import torch

import specquant as sq
from specquant.algorithms.frame import FrameConfig, FrameQuantizedWeight
from specquant.models.zoo import evaluate, get_model

PAPER_ACCURACY = 97.29
REDUNDANCY = 3.0


@pytest.mark.slow
def test_mnist_mlp_one_bit_frame_reaches_paper_accuracy(data_dir):
    model, entry = get_model("mnist-mlp", data_dir)
    x, y = entry.test(data_dir)
    assert x.shape[0] == 10_000  # the full test set
    report = sq.quantize(model, FrameConfig(bits=1, redundancy=REDUNDANCY, order=1), example_input=x[:8],
                         progress=False)
    assert [r.name for r in report.layers] == ["fc1", "fc2", "fc3"]
    for name in ("fc1", "fc2", "fc3"):
        q = getattr(model, name).qweight
        assert isinstance(q, FrameQuantizedWeight) and q.levels == 2
        assert q.codes.dtype == torch.uint8 and int(q.codes.max()) <= 1  # 1-bit ΣΔ codes
        assert q.frame_size == int(REDUNDANCY) * q.frame_dim  # N = R·d frame vectors
    # true storage: 1 bit × N/d codes plus one float32 step (default scale dtype) per neuron, ≈ 3.048 bits
    assert REDUNDANCY < report.bits_per_weight < REDUNDANCY + 0.05
    acc = evaluate(model, x, y)
    assert acc >= PAPER_ACCURACY, f"1-bit frame ΣΔ at R={REDUNDANCY}: {acc:.2f} % < {PAPER_ACCURACY} %"
