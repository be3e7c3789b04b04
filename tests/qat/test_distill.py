"""Distillation from a float teacher (qat/distill.py and finetune(teacher=...)): the loss against
its formula and gradient, the loss decreasing on a tiny model, seeded runs, the teacher untouched."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from specquant.qat import QATConfig, distill_kl, distill_loss, feature_loss, finetune

pytestmark = pytest.mark.usefixtures("one_thread")


def test_kl_term_is_zero_on_equal_logits_and_its_gradient_is_hintons():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(6, 5, generator=g, dtype=torch.float64)
    assert float(distill_kl(t, t, 3.0)) == pytest.approx(0.0, abs=1e-12)
    T = 3.0
    kl = distill_kl(s, t, T)
    assert float(kl.detach()) > 0
    kl.backward()
    # d/ds of T²·KL(p_t ‖ p_s), mean over the batch: T·(softmax(s/T) − softmax(t/T)) / B
    expect = T * (torch.softmax(s.detach() / T, 1) - torch.softmax(t / T, 1)) / s.shape[0]
    assert torch.allclose(s.grad, expect, atol=1e-12)
    # α = 0 is plain cross-entropy; α = 1 the soft term alone
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    ce = nn.functional.cross_entropy(s.detach(), y)
    assert float(distill_loss(s.detach(), t, y, 0.0, T)) == pytest.approx(float(ce))
    assert float(distill_loss(s.detach(), t, y, 1.0, T)) == pytest.approx(float(distill_kl(s.detach(), t, T)))


def _objective(student, teacher, x, y, cfg) -> float:
    with torch.no_grad():
        return float(distill_loss(student(x), teacher(x), y, cfg.distill_alpha, cfg.distill_temperature))


def test_distilled_qat_lowers_the_loss_is_seeded_and_leaves_the_teacher_alone(teacher_student):
    teacher, student, x, y = teacher_student
    t_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    twin = copy.deepcopy(student)
    cfg = QATConfig(batch_size=64, distill_alpha=0.7, distill_temperature=2.0)
    before = _objective(student, teacher, x, y, cfg)
    ce_before = float(nn.functional.cross_entropy(student(x), y).detach())
    result = finetune(student, (x, y), cfg, epochs=10, lr=3e-3, seed=5, teacher=teacher)
    assert result.distilled
    assert _objective(student, teacher, x, y, cfg) < 0.85 * before
    assert float(nn.functional.cross_entropy(student(x), y).detach()) < ce_before
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in t_state.items())
    finetune(twin, (x, y), cfg, epochs=10, lr=3e-3, seed=5, teacher=teacher)
    assert torch.equal(twin(x), student(x))  # same seed, same model


def test_bad_distillation_settings_are_one_line_errors(teacher_student):
    with pytest.raises(ValueError, match="distill_alpha must be a number in"):
        QATConfig(distill_alpha=1.5)
    with pytest.raises(ValueError, match="distill_temperature must be a finite number > 0"):
        QATConfig(distill_temperature=0)
    teacher, student, x, y = teacher_student
    with pytest.raises(ValueError, match="teacher must be another model"):
        finetune(student, (x, y), epochs=1, teacher=student)
    with pytest.raises(ValueError, match="teacher must be an nn.Module"):
        finetune(student, (x, y), epochs=1, teacher="float")
    with pytest.raises(ValueError, match="both be"):
        distill_kl(torch.zeros(2, 3), torch.zeros(2, 4), 1.0)


def test_feature_loss_is_relative_and_its_gradient_is_the_formula():
    g = torch.Generator().manual_seed(1)
    t = [torch.randn(4, 3, 5, generator=g, dtype=torch.float64), torch.randn(4, 7, generator=g, dtype=torch.float64)]
    assert float(feature_loss(t, t)) == 0.0
    s = [(ti + 0.1 * torch.randn(ti.shape, generator=g, dtype=torch.float64)).requires_grad_() for ti in t]
    loss = feature_loss(s, t)
    expect = sum(float(((si.detach() - ti) ** 2).sum() / (ti ** 2).sum()) for si, ti in zip(s, t)) / 2
    assert float(loss.detach()) == pytest.approx(expect, rel=1e-12)
    with torch.no_grad():  # scale-free: both sides doubled, same value
        assert float(feature_loss([2 * s[0]], [2 * t[0]])) == pytest.approx(float(feature_loss(s[:1], t[:1])),
                                                                            rel=1e-12)
    loss.backward()
    for si, ti in zip(s, t):  # d/ds of ‖s − t‖²/‖t‖², halved by the mean over the two features
        assert torch.allclose(si.grad, (si.detach() - ti) / (ti ** 2).sum(), atol=1e-12)
    with pytest.raises(ValueError, match="feature 0: student output"):
        feature_loss([torch.zeros(2, 3)], [torch.zeros(2, 4)])
    with pytest.raises(ValueError, match="as many student as teacher"):
        feature_loss([], [])


def _hidden_error(student, teacher, x) -> float:
    with torch.no_grad():
        hs, ht = student.act1(student.fc1(x)), teacher.act1(teacher.fc1(x))
        return float(((hs - ht) ** 2).sum() / (ht ** 2).sum())


def test_feature_distillation_keeps_the_hidden_layer_near_the_teachers(teacher_student):
    """Trained for the output loss alone, the 2-bit student's hidden layer drifts away from the
    teacher's; with the feature term on that layer it stays much closer (same seed and steps)."""
    teacher, student, x, y = teacher_student
    twin = copy.deepcopy(student)
    finetune(twin, (x, y), QATConfig(batch_size=64), epochs=10, lr=1e-2, seed=2, teacher=teacher)
    cfg = QATConfig(batch_size=64, feature_distill=1.0, feature_layers=("act1",))
    result = finetune(student, (x, y), cfg, epochs=10, lr=1e-2, seed=2, teacher=teacher)
    assert len(result.epoch_feature) == 10 and all(v > 0 for v in result.epoch_feature)
    assert _hidden_error(student, teacher, x) < 0.7 * _hidden_error(twin, teacher, x)  # measured 0.131 vs 0.219
    assert not student.act1._forward_hooks and not teacher.act1._forward_hooks  # the hooks are gone


def test_bad_feature_distillation_settings_are_one_line_errors(teacher_student):
    teacher, student, x, y = teacher_student
    with pytest.raises(ValueError, match="feature_distill must be a finite number >= 0"):
        QATConfig(feature_distill=-1.0)
    with pytest.raises(ValueError, match="needs feature_layers"):
        QATConfig(feature_distill=1.0)
    with pytest.raises(ValueError, match="feature_layers must be a sequence of module names"):
        QATConfig(feature_layers="act1")
    cfg = QATConfig(feature_distill=1.0, feature_layers=("act1",))
    with pytest.raises(ValueError, match="needs a teacher"):
        finetune(student, (x, y), cfg, epochs=1)
    with pytest.raises(ValueError, match="the student has no module 'nope'"):
        finetune(student, (x, y), QATConfig(feature_distill=1.0, feature_layers=("nope",)), epochs=1, teacher=teacher)
