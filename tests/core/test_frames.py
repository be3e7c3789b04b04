import pytest
import torch

from specquant.core.frames import (
    analysis,
    check_frame_size,
    frame_size,
    frame_variation,
    funtf_errors,
    harmonic_frame,
    make_frame,
    random_frame,
    synthesis,
)

# (d, N): even and odd d, N = d (a basis), N = d + 1, non-multiples and multiples of d
SIZES = [(1, 1), (1, 5), (2, 2), (2, 3), (3, 3), (4, 4), (4, 5), (5, 12), (8, 8), (8, 9), (8, 13),
         (16, 48), (27, 54), (27, 40), (64, 65), (64, 100)]


@pytest.mark.parametrize("kind", ["harmonic", "random"])
@pytest.mark.parametrize("d,N", SIZES)
def test_funtf_properties(kind, d, N):
    F = make_frame(kind, d, N, seed=3)
    assert F.shape == (d, N) and F.dtype == torch.float64
    norm_err, tight_err = funtf_errors(F)
    assert norm_err < 1e-6, "every frame vector has unit norm"
    assert tight_err < 1e-6, "F·Fᵀ = (N/d)·I"


def test_harmonic_matches_the_standard_construction():
    d, N = 5, 12
    F = harmonic_frame(d, N)
    n = torch.arange(N, dtype=torch.float64)
    c = (2 / d) ** 0.5
    assert torch.allclose(F[0], torch.full((N,), 1 / d**0.5, dtype=torch.float64))
    for k in (1, 2):
        assert torch.allclose(F[2 * k - 1], c * torch.cos(2 * torch.pi * k * n / N))
        assert torch.allclose(F[2 * k], c * torch.sin(2 * torch.pi * k * n / N))


def test_harmonic_even_d_sums_to_zero_and_has_bounded_variation():
    F8 = harmonic_frame(8, 64)
    assert F8.sum(dim=1).abs().max() < 1e-12
    # frame variation of the smooth path does not grow with N
    assert abs(frame_variation(harmonic_frame(8, 4096)) - frame_variation(harmonic_frame(8, 512))) < 0.05
    assert frame_variation(random_frame(8, 512)) > 10 * frame_variation(harmonic_frame(8, 512))


def test_random_frame_is_seeded():
    assert torch.equal(random_frame(6, 17, seed=1), random_frame(6, 17, seed=1))
    assert not torch.allclose(random_frame(6, 17, seed=1), random_frame(6, 17, seed=2))


@pytest.mark.parametrize("kind", ["harmonic", "random"])
@pytest.mark.parametrize("d,N", [(7, 7), (7, 30), (16, 40)])
def test_analysis_synthesis_perfect_reconstruction(kind, d, N):
    F = make_frame(kind, d, N, seed=0)
    V = torch.randn(d, 11, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    X = analysis(F, V)
    assert X.shape == (N, 11)
    assert torch.allclose(X[:, 4], F.T @ V[:, 4])
    assert torch.allclose(synthesis(F, X), V, atol=1e-10)
    assert torch.allclose(synthesis(F, analysis(F, V[:, 0])), V[:, 0], atol=1e-10)  # 1-D input


def test_frame_size_rounding_and_errors():
    assert frame_size(27, 1.5) == 41 and frame_size(10, 1.5) == 15 and frame_size(4, 1) == 4
    with pytest.raises(ValueError, match="redundancy"):
        frame_size(4, 0.5)
    with pytest.raises(ValueError, match="N >= d"):
        check_frame_size(8, 7)
    with pytest.raises(ValueError, match="N >= d"):
        harmonic_frame(8, 7)
    with pytest.raises(ValueError, match="cannot be built|can be built"):
        harmonic_frame(1 << 16, 1 << 16)
    with pytest.raises(ValueError, match="dimension"):
        harmonic_frame(0, 3)
    with pytest.raises(ValueError, match="frame kind"):
        make_frame("gabor", 4, 8)
    with pytest.raises(ValueError, match="shape"):
        analysis(harmonic_frame(4, 8), torch.zeros(5, 2, dtype=torch.float64))
