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

Under torch.compile the hooks are traced into the model's graph, and Dynamo guards on every piece of
Python state a hook reads. So a traced hook reads none that changes: whether the step is sampled is a
0-dim device flag (the statistics are computed every step and masked by it, so one graph serves every
step), the forward position is a device counter, and dead units accumulate into a fixed buffer of
TRACED_UNITS per module (allocated up front: its size cannot wait for the ranks' agreement). Each hook
has a code object of its own, so a hook Dynamo compiles as a frame of its own (after a graph break)
does not share one compile cache, and its size limit, with every other module's hook.
"""

from __future__ import annotations

import logging
import types
from typing import Callable, Optional, Sequence

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
# Units per module tracked for the dead-unit fraction by traced (compiled) hooks; a module with more
# reports the fraction over its first TRACED_UNITS units.
TRACED_UNITS = 1024


def _first_tensor(output: object) -> Optional[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        for o in output:  # a loop, not a generator: Dynamo traces it without a graph break
            if isinstance(o, torch.Tensor):
                return o
    return None


def _own_code(fn: Callable) -> Callable:
    """`fn` with a copy of its code object: Dynamo keeps its compile cache on the code object."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


def eligible(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Leaf layers with parameters and activation modules, by clean name, in model order."""
    picked = []
    for name, module in model.named_modules():
        if next(module.children(), None) is not None or isinstance(module, _SKIPPED_TYPES):
            continue
        if isinstance(module, ACTIVATION_TYPES) or next(module.parameters(recurse=False), None) is not None:
            picked.append((clean_name(name), module))
    return picked


def cap(names: Sequence[str], max_modules: int) -> tuple[str, ...]:
    """At most `max_modules` of the job's modules, evenly spread: a pure function of the job-wide list, so
    every rank keeps the same ones."""
    if len(names) <= max_modules:
        return tuple(names)
    stride = len(names) / max_modules
    log.warning(
        "gradwatch: %d modules eligible for activation statistics exceed max_activation_modules=%d; "
        "hooking every %.1f-th", len(names), max_modules, stride,
    )
    return tuple(names[int(i * stride)] for i in range(max_modules))


class ActivationMonitor:
    """Owns the hooks and the per-step device accumulators for activations.

    Its slots are the job's modules (`job_modules`, the union over ranks: pipeline stages hold different
    ones), so every rank's buffers have one size and one order; a rank hooks the ones it holds and leaves
    the others' slots zero, which every reduction (SUM, MAX of non-negative values) ignores."""

    def __init__(self, model: nn.Module, device: torch.device, max_modules: int,
                 job_modules: Optional[Sequence[str]] = None) -> None:
        local = eligible(model)
        self.names: tuple[str, ...] = cap([n for n, _ in local] if job_modules is None else job_modules, max_modules)
        slot = {name: i for i, name in enumerate(self.names)}
        picked = [(slot[name], module) for name, module in local if name in slot]
        n = len(self.names)
        self.device = device
        self.sampling = False
        self.failed: Optional[BaseException] = None
        self.failed_in: Optional[str] = None  # the module whose traced hook failed
        self.units: Optional[tuple[int, ...]] = None  # agreed unit counts, once known
        self._local_units = [0] * n
        self._first_bad = torch.full((n,), float("inf"), device=device)
        self._calls = 0
        self._acc = torch.zeros(5, n, dtype=torch.float64, device=device)
        self._max_abs = torch.zeros(n, dtype=torch.float64, device=device)
        self._alive: list[Optional[torch.Tensor]] = [None] * n
        # What traced hooks read and write instead of Python state (module docstring). `traced` turns
        # on once one has run; eager hooks then count positions on the device too, in the same order.
        self.traced = False
        self._on = torch.zeros((), dtype=torch.bool, device=device)
        self._position = torch.zeros((), dtype=torch.float32, device=device)
        self._traced_units = torch.zeros(n, dtype=torch.float64, device=device)
        self._traced_alive = torch.zeros(n * TRACED_UNITS + 1, dtype=torch.float64, device=device)  # + an always-zero slot
        self._traced_gather: Optional[torch.Tensor] = None  # the agreed layout's units in _traced_alive
        self._handles = [module.register_forward_hook(self._make_hook(i, module)) for i, module in picked]

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
            if self.traced:
                self._position.zero_()
        self.sampling = sampling
        self._on.fill_(sampling)  # every step: compiled hooks may start at any step
        if sampling:
            self._acc.zero_()
            self._max_abs.zero_()
            if self.traced:
                self._traced_alive.zero_()
            if self.units is not None:
                self._alive = [torch.zeros(u, dtype=torch.float64, device=self.device) if u else None for u in self.units]

    def _make_hook(self, index: int, module: nn.Module):
        saturation = "tanh" if isinstance(module, nn.Tanh) else "sigmoid" if isinstance(module, nn.Sigmoid) else None
        name = self.names[index]
        trace = types.MethodType(_own_code(ActivationMonitor._trace), self)  # per module too (module docstring)

        def hook(_module: nn.Module, inputs: tuple, output: object) -> None:
            if torch.compiler.is_compiling():  # a constant while Dynamo traces: no guard, no graph break
                if torch.is_grad_enabled():
                    trace(index, name, output, inputs, saturation)
                return
            if self.failed is not None or not torch.is_grad_enabled():
                return  # disabled, or an evaluation forward pass
            try:
                y = _first_tensor(output)
                if y is None or not y.is_floating_point():
                    return
                self._observe(index, y.detach(), inputs, saturation)
            except Exception as exc:  # never let a hook break the user's forward pass
                self.failed = exc

        return _own_code(hook)

    def _observe(self, index: int, y: torch.Tensor, inputs: tuple, saturation: Optional[str]) -> None:
        if y.numel() == 0:
            return  # e.g. an expert that received no tokens
        # The slot keeps the earliest forward position (this rank, this step) whose output was non-finite.
        slot = self._first_bad[index]
        total = y.sum(dtype=torch.float32)
        if self.traced:  # compiled hooks count on the device: take the same counter
            torch.fmin(slot, torch.where(torch.isfinite(total), float("inf"), self._position), out=slot)
            self._position.add_(1)
        else:
            position = self._calls
            self._calls += 1
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

    def _trace(self, index: int, name: str, output: object, inputs: tuple, saturation: Optional[str]) -> None:
        """`_observe` as Dynamo traces it: the same statistics from device state only, masked by the
        sampling flag. A failure is recorded, not raised (the training goes on; `fill` reports it)."""
        try:
            y = _first_tensor(output)
            if y is None or not y.is_floating_point() or y.numel() == 0:
                return
            if type(y) not in (torch.Tensor, nn.Parameter) or y.layout != torch.strided:  # a DTensor, a sparse tensor
                raise TypeError("traced hooks take plain dense tensors, not " + type(y).__name__)
            self.traced = True
            y = y.detach()
            total = y.sum(dtype=torch.float32)
            slot = self._first_bad[index]
            slot.copy_(torch.fmin(slot, torch.where(torch.isfinite(total), float("inf"), self._position)))
            self._position.add_(1)
            on = self._on
            yf = y.double()
            x = _first_tensor(inputs)
            if saturation == "tanh" and x is not None:
                saturated = (x.detach().abs() > TANH_SATURATION).sum()
            elif saturation == "sigmoid" and x is not None:
                low, high = SIGMOID_SATURATION
                saturated = ((x.detach() < low) | (x.detach() > high)).sum()
            else:
                saturated = torch.zeros((), dtype=torch.int64, device=y.device)
            rows = torch.stack([yf.sum(), (yf * yf).sum(), torch.full((), y.numel(), dtype=torch.float64, device=y.device),
                                (~torch.isfinite(yf)).sum().double(), saturated.double()])
            acc = self._acc[:, index]
            acc.add_(torch.where(on, rows, 0.0))
            slot = self._max_abs[index]
            slot.copy_(torch.maximum(slot, torch.where(on, yf.abs().amax(), 0.0)))
            if y.ndim:
                unit_dim = 1 if y.ndim >= 4 else y.ndim - 1
                units = y.shape[unit_dim]
                k = min(units, TRACED_UNITS)
                per_unit = y.movedim(unit_dim, -1).reshape(-1, units)[:, :k].ne(0).sum(0)
                alive = self._traced_alive[index * TRACED_UNITS : index * TRACED_UNITS + k]
                alive.add_(torch.where(on, per_unit, 0).double())
                seen = self._traced_units[index]
                seen.copy_(torch.maximum(seen, torch.where(on, float(k), 0.0)))
        except Exception as exc:  # traced: the except branch is in the graph, and the training goes on
            if self.failed is None:  # the first failure names the module
                self.failed, self.failed_in = exc, name

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
            where = f" on module {self.failed_in!r} under torch.compile" if self.failed_in is not None else ""
            raise RuntimeError(f"activation hook failed{where}: {self.failed!r}") from self.failed
        if "act_acc" not in packet:
            return
        packet.put("act_acc", self._acc)
        packet.put("act_max_abs", self._max_abs)
        if "act_units" in packet:
            units = packet.slot("act_units")
            for i, u in enumerate(self._local_units):
                if u:
                    units[i].fill_(float(u))  # a scalar fill, not a host-to-device copy
            if self.traced:
                torch.maximum(units, self._traced_units, out=units)
        else:
            alive = [a for a in self._alive if a is not None]
            if alive:
                eager = torch.cat(alive)
                packet.put("act_alive", eager + self._traced_alive[self._gather()] if self.traced else eager)

    def _gather(self) -> torch.Tensor:
        """Where each unit of the agreed layout sits in the traced buffer (units past TRACED_UNITS: the zero
        slot). Made on the device once (aranges, not a host-to-device copy)."""
        if self._traced_gather is None:
            assert self.units is not None
            zero, parts = len(self._traced_alive) - 1, []
            for i, u in enumerate(self.units):
                kept = min(u, TRACED_UNITS)
                parts.append(torch.arange(i * TRACED_UNITS, i * TRACED_UNITS + kept, device=self.device))
                parts.append(torch.full((u - kept,), zero, dtype=torch.int64, device=self.device))
            self._traced_gather = torch.cat(parts)
        return self._traced_gather

    def agree_units(self, reduced_units: list[float]) -> None:
        """Adopt the unit counts every rank now holds identically (max across ranks)."""
        self.units = tuple(int(u) for u in reduced_units)
