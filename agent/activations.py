"""Forward hooks on leaf layers and activation modules: a non-finite sentinel every step, full
statistics on sampled steps. Everything accumulates in device buffers; nothing is read back here.

Every step (cheap: one reduction and three scalar kernels per hooked module):
  the position, in this rank's forward order, of the first call whose output was non-finite, so a
  NaN is attributed to the (step, rank, module) where it first appeared.
Sampled steps (`activation_every`), summed over every micro-batch of the step and across ranks:
  mean, std, max-abs, non-finite count, saturated fraction (tanh/sigmoid *inputs* beyond
  SageMaker Debugger's limits: |x| > 9.4999 for tanh, x < -23 or x > 16.99999 for sigmoid), and the
  dead-unit fraction: units whose output is zero for every sample of the global batch. A unit is the
  channel (dim 1) of a 4-D/5-D output and the last dimension otherwise.

Dead units need a per-unit buffer whose size every rank must agree on before it can be all-reduced.
The sizes are agreed inside the first sampled step's MAX collective (no extra collective), so dead
fractions are reported from the second sampled step on.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
from torch import nn

from .layers import clean_name
from .packet import Entry, Packet, Reduce

log = logging.getLogger("gradwatch.agent")

ACTIVATION_TYPES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Tanh, nn.Sigmoid, nn.Hardtanh, nn.Hardsigmoid, nn.Hardswish, nn.Softplus,
    nn.Softsign, nn.Tanhshrink, nn.LogSigmoid, nn.Threshold, nn.GLU,
)
_SKIPPED_TYPES: tuple[type[nn.Module], ...] = (nn.Dropout, nn.Identity)
TANH_SATURATION = 9.4999
SIGMOID_SATURATION = (-23.0, 16.99999)

# Rows of the per-module accumulator.
_SUM, _SUMSQ, _COUNT, _NONFINITE, _SATURATED = range(5)


def _first_tensor(output: object) -> Optional[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return next((o for o in output if isinstance(o, torch.Tensor)), None)
    return None


def _eligible(model: nn.Module) -> list[tuple[str, nn.Module]]:
    picked = []
    for name, module in model.named_modules():
        if next(module.children(), None) is not None or isinstance(module, _SKIPPED_TYPES):
            continue
        if isinstance(module, ACTIVATION_TYPES) or next(module.parameters(recurse=False), None) is not None:
            picked.append((clean_name(name), module))
    return picked


class ActivationMonitor:
    """Owns the hooks and the per-step device accumulators for activations."""

    def __init__(self, model: nn.Module, device: torch.device, max_modules: int) -> None:
        picked = _eligible(model)
        if len(picked) > max_modules:
            stride = len(picked) / max_modules
            log.warning(
                "gradwatch: %d modules eligible for activation statistics exceed max_activation_modules=%d; "
                "hooking every %.1f-th", len(picked), max_modules, stride,
            )
            picked = [picked[int(i * stride)] for i in range(max_modules)]
        self.names: tuple[str, ...] = tuple(n for n, _ in picked)
        self.device = device
        self.sampling = False
        self.failed: Optional[BaseException] = None
        self.units: Optional[tuple[int, ...]] = None  # agreed unit counts, once known
        self._local_units = [0] * len(picked)
        self._first_bad = torch.full((len(picked),), float("inf"), device=device)
        self._calls = 0
        self._acc = torch.zeros(5, len(picked), dtype=torch.float64, device=device)
        self._max_abs = torch.zeros(len(picked), dtype=torch.float64, device=device)
        self._alive: list[Optional[torch.Tensor]] = [None] * len(picked)
        self._handles = [
            module.register_forward_hook(self._make_hook(i, module)) for i, (_, module) in enumerate(picked)
        ]

    @property
    def num_modules(self) -> int:
        return len(self.names)

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def begin_step(self, sampling: bool, reset_sentinel: bool) -> None:
        """Reset the accumulators before the forward passes of a step (all its micro-batches).

        The non-finite sentinel is reset only after a measured step, so with `stats_every > 1` it
        still catches a NaN in the steps between measurements."""
        if reset_sentinel:
            self._calls = 0
            self._first_bad.fill_(float("inf"))
        self.sampling = sampling
        if sampling:
            self._acc.zero_()
            self._max_abs.zero_()
            if self.units is not None:
                self._alive = [torch.zeros(u, dtype=torch.float64, device=self.device) if u else None for u in self.units]

    def _make_hook(self, index: int, module: nn.Module):
        saturation = "tanh" if isinstance(module, nn.Tanh) else "sigmoid" if isinstance(module, nn.Sigmoid) else None

        def hook(_module: nn.Module, inputs: tuple, output: object) -> None:
            if self.failed is not None or not torch.is_grad_enabled():
                return  # disabled, or an evaluation forward pass
            try:
                y = _first_tensor(output)
                if y is None or not y.is_floating_point():
                    return
                self._observe(index, y.detach(), inputs, saturation)
            except Exception as exc:  # never let a hook break the user's forward pass
                self.failed = exc

        return hook

    def _observe(self, index: int, y: torch.Tensor, inputs: tuple, saturation: Optional[str]) -> None:
        if y.numel() == 0:
            return  # e.g. an expert that received no tokens
        position = self._calls
        self._calls += 1
        total = y.sum(dtype=torch.float32)
        # The slot keeps the earliest forward position (this rank, this step) whose output was non-finite.
        slot = self._first_bad[index]
        torch.fmin(slot, torch.where(torch.isfinite(total), float("inf"), float(position)), out=slot)
        if not self.sampling:
            return
        # float64 sums: std comes from E[x^2] - mean^2, which cancels badly in float32.
        yf = y.double()
        acc = self._acc[:, index]
        acc[_SUM] += yf.sum()
        acc[_SUMSQ] += (yf * yf).sum()
        acc[_COUNT] += y.numel()
        acc[_NONFINITE] += (~torch.isfinite(yf)).sum()
        x = _first_tensor(inputs)
        if saturation == "tanh" and x is not None:
            acc[_SATURATED] += (x.detach().abs() > TANH_SATURATION).sum()
        elif saturation == "sigmoid" and x is not None:
            low, high = SIGMOID_SATURATION
            acc[_SATURATED] += ((x.detach() < low) | (x.detach() > high)).sum()
        slot = self._max_abs[index]
        torch.maximum(slot, yf.abs().amax().double(), out=slot)
        self._count_alive(index, y)

    def _count_alive(self, index: int, y: torch.Tensor) -> None:
        if y.ndim == 0:
            return
        unit_dim = 1 if y.ndim >= 4 else y.ndim - 1
        units = y.shape[unit_dim]
        if self.units is None:
            self._local_units[index] = max(self._local_units[index], units)
            return
        alive = self._alive[index]
        if alive is None or alive.numel() != units:
            return  # this call's shape differs from the agreed layout; skip it rather than mis-count
        per_unit = y.movedim(unit_dim, -1).reshape(-1, units).ne(0).sum(0)
        alive += per_unit

    # ---- packet -------------------------------------------------------------------------------

    def spec(self, sampling: bool) -> list[Entry]:
        n = self.num_modules
        if not sampling:
            return []
        entries = [Entry("act_acc", Reduce.SUM, 5 * n), Entry("act_max_abs", Reduce.MAX, n)]
        if self.units is None:
            entries.append(Entry("act_units", Reduce.MAX, n))
        else:
            entries.append(Entry("act_alive", Reduce.SUM, sum(self.units)))
        return entries

    def first_bad(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(1 + index of the module that went non-finite first on this rank, or 0; number of such modules)."""
        earliest = self._first_bad.min() if self.num_modules else torch.full((), float("inf"), device=self.device)
        found = torch.isfinite(earliest)
        index = self._first_bad.argmin() + 1 if self.num_modules else torch.zeros((), device=self.device)
        return torch.where(found, index.double(), 0.0), torch.isfinite(self._first_bad).sum().double()

    def fill(self, packet: Packet) -> None:
        if self.failed is not None:
            raise RuntimeError("activation hook failed") from self.failed
        if "act_acc" not in packet:
            return
        packet.put("act_acc", self._acc)
        packet.put("act_max_abs", self._max_abs)
        if "act_units" in packet:
            units = packet.slot("act_units")
            for i, u in enumerate(self._local_units):
                if u:
                    units[i].fill_(float(u))  # a scalar fill, not a host-to-device copy
        else:
            alive = [a for a in self._alive if a is not None]
            if alive:
                packet.put("act_alive", torch.cat(alive))

    def agree_units(self, reduced_units: list[float]) -> None:
        """Adopt the unit counts every rank now holds identically (max across ranks)."""
        self.units = tuple(int(u) for u in reduced_units)
