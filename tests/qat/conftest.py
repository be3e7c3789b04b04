"""Fixtures of the QAT tests."""
from __future__ import annotations

import copy

import pytest
import torch

import specquant as sq
from specquant.models.mlp import MLP, train_mlp


@pytest.fixture
def teacher_student():
    """A float MLP trained on a 4-class linear task (the teacher), its 2-bit RTN copy (the student),
    and the 512 training samples: (teacher, student, x, y)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 16, generator=g)  # (N, 16)
    y = (x @ torch.randn(16, 4, generator=g)).argmax(1)  # (N,)
    teacher = train_mlp(MLP((16, 32, 4)), x, y, epochs=20, lr=3e-3, batch_size=64, seed=0).eval()
    student = copy.deepcopy(teacher)
    sq.quantize(student, sq.RTNConfig(bits=2), calib=x[:128], progress=False)
    return teacher, student, x, y
