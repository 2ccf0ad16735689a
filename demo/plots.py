"""The pictures people draw by hand when a run goes wrong, from a demo run: loss and global gradient norm over steps
with alerts and commands marked, and a layer x step heatmap of per-layer gradient norms (the
vanishing-gradient picture: early layers dark, late layers bright)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .summary import RunLog  # noqa: E402


def _series(log: RunLog, key: str) -> tuple[list[int], list[float]]:
    steps, values = [], []
    for event in log.steps:
        value = event.get(key)
        if isinstance(value, (int, float)):
            steps.append(event["step"])
            values.append(value if math.isfinite(value) and value > 0 else float("nan"))
    return steps, values


def loss_and_grad_norm(log: RunLog, path: Path) -> Path:
    fig, (ax_loss, ax_norm) = plt.subplots(2, 1, sharex=True, figsize=(10, 6))
    for ax, key, label in ((ax_loss, "loss", "loss (mean across ranks)"), (ax_norm, "grad_norm", "global gradient norm")):
        steps, values = _series(log, key)
        ax.plot(steps, values, lw=1.2, color="tab:blue", label=label)
        ax.set_yscale("log")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    bound_steps, bounds = _series(log, "clip_bound")
    if bounds:
        ax_norm.plot(bound_steps, bounds, lw=1, ls="--", color="tab:gray", label="guard clip bound")
    for step in log.guard.skipped_steps:
        ax_norm.axvline(step, color="black", lw=0.8, ls=":")
    for alert in log.alerts:
        if alert.state == "firing" and alert.step is not None:
            for ax in (ax_loss, ax_norm):
                ax.axvline(alert.step, color="tab:red", lw=1)
            ax_loss.annotate(alert.alertname.removeprefix("Gradwatch"), (alert.step, 1), xycoords=("data", "axes fraction"),
                             rotation=90, va="top", ha="right", fontsize=7, color="tab:red")
    for cmd in log.commands:
        for ax in (ax_loss, ax_norm):
            ax.axvline(cmd.step, color="tab:green", lw=1.5)
        ax_norm.annotate(f"{cmd.kind} {cmd.value:g}", (cmd.step, 1), xycoords=("data", "axes fraction"),
                         rotation=90, va="top", ha="right", fontsize=7, color="tab:green")
    ax_norm.set_xlabel("step")
    ax_norm.legend(loc="lower right", fontsize=8)
    fig.suptitle(f"{log.job} ({log.scenario}): red = alert fired, green = command applied, dotted = step skipped", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def layer_heatmap(log: RunLog, path: Path) -> Path:
    layers = (log.start or {}).get("layers") or []
    rows = [e for e in log.steps if len(e.get("layer_grad_norm") or []) == len(layers)]
    grid = np.full((len(layers), max(len(rows), 1)), np.nan)
    for col, event in enumerate(rows):
        for row, value in enumerate(event["layer_grad_norm"]):
            if isinstance(value, (int, float)) and math.isfinite(value) and value > 0:
                grid[row, col] = math.log10(value)
    fig, ax = plt.subplots(figsize=(10, max(3.0, 0.18 * len(layers) + 1.5)))
    image = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="viridis",
                      extent=(rows[0]["step"] - 0.5 if rows else 0, rows[-1]["step"] + 0.5 if rows else 1, len(layers) - 0.5, -0.5))
    ax.set_yticks(range(len(layers)))
    ax.set_yticklabels(layers, fontsize=6 if len(layers) > 30 else 8)
    ax.set_xlabel("step")
    ax.set_ylabel("layer (model order)")
    fig.colorbar(image, ax=ax, label="log10 gradient L2 norm")
    ax.set_title(f"{log.job} ({log.scenario}): per-layer gradient norm (white: non-finite or zero)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def save(log: RunLog, directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    return [loss_and_grad_norm(log, directory / "loss_grad_norm.png"), layer_heatmap(log, directory / "layer_grad_norm_heatmap.png")]
