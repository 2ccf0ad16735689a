"""Models and data the tests and examples train: the seeds' networks, made deterministic. One
source with the demo's scenarios (gradwatch.demo.scenarios), so a test and the demo train the same."""

from gradwatch.demo.scenarios import mixed_mlp, regression_data, seed003_model, sigmoid_stack

__all__ = ["mixed_mlp", "regression_data", "seed003_model", "sigmoid_stack"]
