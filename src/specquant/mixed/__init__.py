"""specquant.mixed: per-layer sensitivities, allocation policies and the exact bit-budget solver."""
from specquant.mixed.allocate import POLICIES, Allocation, LayerAllocation, allocate
from specquant.mixed.policies import (
    DEFAULT_CANDIDATES,
    fit_spectral_rule,
    lock_bits,
    spectral_costs,
    spectral_rule_bits,
)
from specquant.mixed.sensitivity import LayerSensitivity, SensitivityReport, measure_sensitivity
from specquant.mixed.solver import BitChoice, KnapsackSolution, budget_capacity, solve_bits, solve_mckp

__all__ = [
    "POLICIES", "Allocation", "LayerAllocation", "allocate", "DEFAULT_CANDIDATES", "fit_spectral_rule",
    "lock_bits", "spectral_costs", "spectral_rule_bits", "LayerSensitivity", "SensitivityReport",
    "measure_sensitivity", "BitChoice", "KnapsackSolution", "budget_capacity", "solve_bits", "solve_mckp",
]
