"""Quantization-aware training (``specquant.qat``): fake-quant layers with the straight-through
estimator (Bengio et al. 2013), learned step sizes (LSQ, Esser et al., ICLR 2020), the κ-regularizer
of the spectral-limits note, distillation from a float teacher (Hinton et al. 2015; its
intermediate outputs too, FitNets-style), and
``finetune``, which starts from a PTQ result and writes the trained
codes back so that ``specquant.save`` packs them."""
from specquant.qat.distill import distill_kl, distill_loss, feature_loss
from specquant.qat.kappa import KAPPA_KINDS, kappa_penalty
from specquant.qat.layers import FakeQuantLayer, finalize_qat, prepare_qat, qat_layers, unpack_model
from specquant.qat.ste import act_fake_quant_ste, fake_quant_ste, grad_scale, lsq_grad_factor, round_ste
from specquant.qat.train import AUGMENTS, OPTIMIZERS, QATConfig, QATResult, crop_flip, finetune, mix_batch

__all__ = [
    "distill_kl", "distill_loss", "feature_loss",
    "KAPPA_KINDS", "kappa_penalty", "FakeQuantLayer", "finalize_qat", "prepare_qat", "qat_layers", "unpack_model",
    "act_fake_quant_ste", "fake_quant_ste", "grad_scale", "lsq_grad_factor", "round_ste", "AUGMENTS", "OPTIMIZERS",
    "QATConfig", "QATResult", "crop_flip", "finetune", "mix_batch",
]
