"""The demo's scenarios by name: what each does and what it should raise (no torch here, so the
command line can list them cheaply)."""

from __future__ import annotations

SCENARIOS = ("exploding", "vanishing", "nan", "dead-relu", "healthy")

# What each scenario should raise (the demo prints it, its tests check it).
EXPECTED_ALERTS: dict[str, tuple[str, ...]] = {
    "exploding": ("GradwatchExplodingGradient",),
    "vanishing": ("GradwatchVanishingGradient",),
    "nan": ("GradwatchNanGradient",),
    "dead-relu": ("GradwatchDeadUnits",),
    "healthy": (),
}

DESCRIPTIONS = {
    "exploding": "regression on an unscaled target (|y| in the hundreds), SGD lr 0.01 - NaN by step 11 untouched",
    "vanishing": "30 Linear+Sigmoid blocks with N(0, 1) weights - the sigmoids saturate, early layers get no gradient",
    "nan": "a NaN appears in one module's output on rank 1 only, for one step",
    "dead-relu": "a ReLU MLP trained with Adam at lr 0.1 - most units of the second ReLU die and never recover",
    "healthy": "a small mixed MLP on a standardised target, Adam lr 1e-3 - nothing should page",
}

# Steps run slowly at the start of a scenario whose fault outruns the monitoring loop at full pace:
# the unscaled regression is NaN by step 11, and the loop (1 s scrape, 1 s evaluation, 0.2 s command poll) needs a few
# seconds to clip and lower the learning rate. (first N steps, seconds each)
SLOW_START: dict[str, tuple[int, float]] = {"exploding": (12, 2.0)}
