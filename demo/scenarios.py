"""The demo's fault scenarios: small networks, each failing the way the textbook case does.

Every scenario is deterministic (fixed seeds, a fixed global batch per step, each rank taking its
slice), so two runs of the demo tell the same story.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from .catalog import SCENARIOS


@dataclass
class Setup:
    model: nn.Module
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer]
    inputs: torch.Tensor
    targets: torch.Tensor
    poison: Optional[nn.Module] = None  # nan: the module whose output turns NaN on rank 1 at the fault step


def regression_data(n_samples: int = 1000, n_features: int = 10, noise: float = 0.1, seed: int = 42) -> tuple[torch.Tensor, torch.Tensor]:
    """The exploding scenario's data, built like scikit-learn's make_regression: standard-normal features, an
    unscaled target whose coefficients are uniform in [0, 100) (so |y| reaches the hundreds)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_samples, n_features, generator=g)
    coef = 100 * torch.rand(n_features, 1, generator=g)
    y = x @ coef + noise * torch.randn(n_samples, 1, generator=g)
    return x, y


def unscaled_regression_model() -> nn.Sequential:
    """The exploding scenario's regressor: Linear(10, 15), ReLU, Linear(15, 1), seeded."""
    torch.manual_seed(11)
    model = nn.Sequential()
    model.add_module("fc1", nn.Linear(10, 15))
    model.add_module("act", nn.ReLU())
    model.add_module("fc2", nn.Linear(15, 1))
    return model


def sigmoid_stack(depth: int = 10, width: int = 50) -> nn.Sequential:
    """The vanishing scenario: Linear+Sigmoid blocks with N(0, 1) weights (too large: the sigmoids saturate)."""
    net = nn.Sequential(*[nn.Sequential(nn.Linear(width, width), nn.Sigmoid()) for _ in range(depth)])
    for module in net.modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=1.0)
    return net


def mixed_mlp() -> nn.Sequential:
    """A small MLP with the module kinds the agent treats differently (norm, ReLU, tanh, sigmoid)."""
    return nn.Sequential(
        nn.Linear(12, 32), nn.LayerNorm(32), nn.ReLU(),
        nn.Linear(32, 32), nn.Tanh(),
        nn.Linear(32, 16), nn.Sigmoid(),
        nn.Linear(16, 4),
    )


def build(name: str) -> Setup:
    """The scenario's model, optimizer factory and data (identical on every rank)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    if name == "exploding":
        x, y = regression_data()
        return Setup(unscaled_regression_model(), lambda m: torch.optim.SGD(m.parameters(), lr=0.01), x, y)
    if name == "vanishing":
        model = sigmoid_stack(depth=30)
        x, y = torch.randn(256, 50, generator=g), torch.rand(256, 50, generator=g)
        return Setup(model, lambda m: torch.optim.SGD(m.parameters(), lr=1e-3), x, y)
    if name == "dead-relu":
        model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
        x = torch.randn(2048, 16, generator=g)
        y = torch.sin(x[:, :4].sum(1, keepdim=True))
        return Setup(model, lambda m: torch.optim.Adam(m.parameters(), lr=0.1), x, y)
    if name in ("nan", "healthy"):
        model = mixed_mlp()
        x = torch.randn(512, 12, generator=g)
        y = torch.tanh(x[:, :4]) + 0.05 * torch.randn(512, 4, generator=g)
        return Setup(model, lambda m: torch.optim.Adam(m.parameters(), lr=1e-3), x, y,
                     poison=model[3] if name == "nan" else None)
    raise ValueError(f"unknown scenario {name!r}; choose from {', '.join(SCENARIOS)}")


def batch(setup: Setup, step: int, rank: int, world: int, per_rank: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's slice of step `step`'s global batch."""
    start = step * per_rank * world + rank * per_rank
    idx = torch.arange(start, start + per_rank) % len(setup.inputs)
    return setup.inputs[idx], setup.targets[idx]
