"""Knowledge distillation loss: the quantized student matches the float teacher's softened outputs.

Reference: Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network", arXiv
1503.02531 (2015).  With temperature T and weight α, the training loss is

    (1 − α) · CE(student, labels) + α · T² · KL(softmax(teacher / T) ‖ softmax(student / T))

The T² keeps the soft term's gradient on the scale of the hard one (its gradient with respect to
the student logits is T · (softmax(s/T) − softmax(t/T)), Hinton et al. §2).

Feature distillation (``feature_loss``): the student's intermediate outputs (e.g. each residual
block's) are pulled towards the teacher's on the same inputs, as hint training does (Romero et al.,
"FitNets: Hints for Thin Deep Nets", ICLR 2015) and as block-output reconstruction does for
quantized networks (Li et al., "BRECQ", ICLR 2021): every training image then carries the teacher's
whole feature maps as targets, not only its ten logits.  Pure, on tensors.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def distill_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · KL(softmax(teacher/T) ‖ softmax(student/T)), mean over the batch; logits (B, classes)."""
    if student.shape != teacher.shape or student.dim() != 2:
        raise ValueError(f"student and teacher logits must both be (batch, classes), got {tuple(student.shape)} "
                         f"and {tuple(teacher.shape)}")
    log_p_s = F.log_softmax(student / temperature, dim=1)  # (B, C)
    log_p_t = F.log_softmax(teacher.detach() / temperature, dim=1)  # (B, C)
    return temperature ** 2 * F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, alpha: float,
                 temperature: float) -> torch.Tensor:
    """(1 − α)·CE(student, labels) + α·T²·KL(teacher ‖ student) on logits (B, classes), labels (B,)."""
    return blend_with_teacher(F.cross_entropy(student, labels), student, teacher, alpha, temperature)


def blend_with_teacher(hard: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor, alpha: float,
                       temperature: float) -> torch.Tensor:
    """(1 − α)·hard + α·T²·KL(teacher ‖ student): the distillation loss around any label loss
    ``hard`` (e.g. mixup's λ-mixed cross-entropy); logits (B, classes)."""
    return (1 - alpha) * hard + alpha * distill_kl(student, teacher, temperature)


def feature_loss(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """Mean over the feature pairs of the relative squared error ‖s − t‖² / ‖t‖², each summed over the
    batch and the feature's elements (s, t of one shape (B, …)); the teacher's side is a constant."""
    if len(student) != len(teacher) or not student:
        raise ValueError(f"feature_loss needs as many student as teacher features (at least one), got "
                         f"{len(student)} and {len(teacher)}")
    total = student[0].new_zeros(())
    for i, (s, t) in enumerate(zip(student, teacher)):
        if s.shape != t.shape:
            raise ValueError(f"feature {i}: student output {tuple(s.shape)} and teacher output {tuple(t.shape)} "
                             "differ in shape")
        t = t.detach()
        total = total + (s - t).pow(2).sum() / t.pow(2).sum().clamp_min(torch.finfo(t.dtype).tiny)
    return total / len(student)
