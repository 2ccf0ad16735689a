"""Models and data the tests and examples train: the seeds' networks, made deterministic."""

from __future__ import annotations

import torch
from torch import nn


def sigmoid_stack(depth: int = 10, width: int = 50) -> nn.Sequential:
    """Seed 001: Linear+Sigmoid blocks with N(0, 1) weights (too large: the sigmoids saturate)."""
    net = nn.Sequential(*[nn.Sequential(nn.Linear(width, width), nn.Sigmoid()) for _ in range(depth)])
    for module in net.modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=1.0)
    return net


def regression_data(n_samples: int = 1000, n_features: int = 10, noise: float = 0.1, seed: int = 42) -> tuple[torch.Tensor, torch.Tensor]:
    """Seed 003's data, built like scikit-learn's make_regression: standard-normal features, an
    unscaled target whose coefficients are uniform in [0, 100) (so |y| reaches the hundreds)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_samples, n_features, generator=g)
    coef = 100 * torch.rand(n_features, 1, generator=g)
    y = x @ coef + noise * torch.randn(n_samples, 1, generator=g)
    return x, y


def seed003_model() -> nn.Sequential:
    torch.manual_seed(11)
    model = nn.Sequential()
    model.add_module("fc1", nn.Linear(10, 15))
    model.add_module("act", nn.ReLU())
    model.add_module("fc2", nn.Linear(15, 1))
    return model


def mixed_mlp() -> nn.Sequential:
    """A small MLP with the module kinds the agent treats differently (norm, ReLU, tanh, sigmoid)."""
    return nn.Sequential(
        nn.Linear(12, 32), nn.LayerNorm(32), nn.ReLU(),
        nn.Linear(32, 32), nn.Tanh(),
        nn.Linear(32, 16), nn.Sigmoid(),
        nn.Linear(16, 4),
    )
