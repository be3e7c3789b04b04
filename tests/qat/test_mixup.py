"""Mixup in QAT (qat/train.py ``mix_batch`` and ``QATConfig.mixup``): the blend is the formula, λ follows
Beta(c, c) (its mean and variance), runs are seeded, training with it lowers the loss."""
from __future__ import annotations

import copy

import pytest
import torch

from specquant.qat import QATConfig, finetune
from specquant.qat.train import mix_batch

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_blend_is_lambda_x_plus_one_minus_lambda_x_permuted():
    x = torch.randn(16, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    mixed, perm, lam = mix_batch(x, torch.Generator().manual_seed(7), 0.4)
    assert 0.0 <= lam <= 1.0
    assert sorted(perm.tolist()) == list(range(16))
    assert torch.allclose(mixed, lam * x + (1 - lam) * x[perm], atol=0, rtol=0)
    again = mix_batch(x, torch.Generator().manual_seed(7), 0.4)
    assert torch.equal(again[0], mixed) and torch.equal(again[1], perm) and again[2] == lam


@pytest.mark.parametrize("c", [0.2, 1.0, 4.0])
def test_lambda_has_the_mean_and_variance_of_beta_c_c(c):
    gen = torch.Generator().manual_seed(0)
    x = torch.zeros(2, 1)
    lams = torch.tensor([mix_batch(x, gen, c)[2] for _ in range(4000)], dtype=torch.float64)
    var = 1.0 / (4 * (2 * c + 1))  # Beta(c, c): mean 1/2, variance 1 / (4 (2c + 1))
    se_mean = (var / lams.numel()) ** 0.5
    assert abs(float(lams.mean()) - 0.5) < 5 * se_mean
    assert float(lams.var()) == pytest.approx(var, rel=0.12)


@pytest.mark.parametrize("with_teacher", [False, True])
def test_mixup_training_lowers_the_loss_and_is_seeded(with_teacher, teacher_student):
    teacher, student, x, y = teacher_student
    twin, plain = copy.deepcopy(student), copy.deepcopy(student)
    cfg = QATConfig(batch_size=64, mixup=0.4)
    with torch.no_grad():
        before = float(torch.nn.functional.cross_entropy(student(x), y))
    kw = {"teacher": teacher} if with_teacher else {}
    finetune(student, (x, y), cfg, epochs=8, lr=3e-3, seed=3, **kw)
    finetune(twin, (x, y), cfg, epochs=8, lr=3e-3, seed=3, **kw)
    with torch.no_grad():
        after = float(torch.nn.functional.cross_entropy(student(x), y))
        assert torch.equal(student(x), twin(x))  # same seed, same model
    assert after < before
    # mixup draws from the run's generator: the result differs from a run without it
    finetune(plain, (x, y), QATConfig(batch_size=64), epochs=8, lr=3e-3, seed=3, **kw)
    with torch.no_grad():
        assert not torch.equal(plain(x), student(x))


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf"), True])
def test_a_bad_mixup_parameter_is_a_one_line_error(bad):
    with pytest.raises(ValueError, match="mixup must be a finite number >= 0"):
        QATConfig(mixup=bad)
