"""Models and data the tests and examples train: the demo's scenario networks, made deterministic. One
source with the demo's scenarios (gradwatch.demo.scenarios), so a test and the demo train the same;
plus `dead_and_saturated`, a variant for activation tests."""

import torch
from torch import nn

from gradwatch.demo.scenarios import mixed_mlp, regression_data, unscaled_regression_model, sigmoid_stack

__all__ = ["dead_and_saturated", "mixed_mlp", "regression_data", "unscaled_regression_model", "sigmoid_stack"]


def dead_and_saturated() -> nn.Sequential:
    """`mixed_mlp` whose activation statistics are not trivially zero: four of the ReLU's 32 units are dead
    for every sample (their LayerNorm bias is -10, and the ReLU passes them no gradient to recover), and
    the tanh's inputs are scaled 20x, so many are beyond its saturation limit."""
    model = mixed_mlp()
    with torch.no_grad():
        model[1].bias[:4] = -10.0
        model[3].weight.mul_(20.0)
    return model
