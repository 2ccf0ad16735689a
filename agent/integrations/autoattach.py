"""Zero-code attach (`gradwatch run --auto-attach`): instrument a training script nobody edited.

Installed in each rank process by the launcher's sitecustomize. It patches, and only records:
  - `DistributedDataParallel.__init__`, FSDP1 `FullyShardedDataParallel.__init__` and FSDP2's
    `FSDPState.init` (what `fully_shard` calls): the wrapped modules, remembered weakly;
  - `Tensor.backward` on a one-element tensor: its loss, detached (no copy, no sync), into the step's
    loss window (adapters.py); the unscaled one when it came from `GradScaler.scale`;
  - one global optimizer step pre-hook. At the first optimizer step of the process it picks the
    remembered module that holds most of that optimizer's parameters, attaches
    `HealthAgent.from_env(model, optimizer)` and routes later `optimizer.step()` calls through it.

Every input to that decision (the module structure, which optimizer steps first) is the same on
every rank, so every rank decides alike at the same step. The one thing that may differ - whether
the agent could be built - is agreed in a single all-reduce, once, so either every rank measures
or none does (if that all-reduce itself fails, none does, and the agent built is closed). A script that made its own `HealthAgent` is left alone (`attached_agent`).

Limits: the first optimizer step is taken before the agent exists and is not measured; the loss
is the mean over the step's one-element `backward()` calls (its micro-batches under gradient
accumulation, as the script scaled them), and is missing when the script calls
`torch.autograd.backward` directly; one model and optimizer pair.
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
import sys
import weakref
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from ..health_agent import HealthAgent, attached_agent
from .adapters import LossWindow, OnceLogger

log = logging.getLogger("gradwatch.agent")

_models: list["weakref.ref[torch.nn.Module]"] = []
_losses = LossWindow(OnceLogger("auto-attach"))  # the one-element backward() calls since the last step
_state: dict[str, Any] = {"installed": False, "decided": False, "hook": None, "agent": None}


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else int(os.environ.get("RANK", "0"))


def _say(message: str) -> None:
    """One line on rank 0's stderr: the script configured no logging, and the user must see this."""
    if _rank() == 0:
        print(f"gradwatch: {message}", file=sys.stderr, flush=True)


def _remember(module: Any) -> None:
    if isinstance(module, torch.nn.Module):
        _models.append(weakref.ref(module))


def _after(cls: type, name: str, record: Callable[..., None]) -> None:
    """Replace `cls.name` with a call to the original followed by `record(self, *args, **kwargs)`."""
    original = getattr(cls, name)
    if getattr(original, "_gradwatch_patched", False):
        return

    @functools.wraps(original)
    def patched(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = original(self, *args, **kwargs)
        try:
            record(self, *args, **kwargs)
        except Exception as exc:  # recording must never break the script's own call
            log.debug("gradwatch: auto-attach could not record %s: %r", cls.__name__, exc)
        return result

    patched._gradwatch_patched = True  # type: ignore[attr-defined]
    setattr(cls, name, patched)


def _patch_wrappers() -> None:
    from torch.nn.parallel import DistributedDataParallel

    _after(DistributedDataParallel, "__init__", lambda self, *a, **k: _remember(self))
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel

        _after(FullyShardedDataParallel, "__init__", lambda self, *a, **k: _remember(self))
    except ImportError:
        pass
    try:  # `fully_shard` is re-exported under several names; the state class it builds is one
        from torch.distributed.fsdp._fully_shard._fsdp_state import FSDPState

        _after(FSDPState, "init", lambda self, modules, *a, **k: [_remember(m) for m in modules])
    except ImportError:
        pass


def _patch_loss_capture() -> None:
    def capture(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        if tensor.numel() == 1:  # metadata only: no sync
            unscaled = getattr(tensor, "_gradwatch_unscaled", None)
            _losses.add(unscaled if unscaled is not None else tensor)

    _after(torch.Tensor, "backward", capture)
    original = torch.amp.GradScaler.scale
    if getattr(original, "_gradwatch_patched", False):
        return

    @functools.wraps(original)
    def scale(self: Any, outputs: Any) -> Any:
        scaled = original(self, outputs)
        if isinstance(outputs, torch.Tensor) and isinstance(scaled, torch.Tensor) and outputs.numel() == 1:
            try:
                scaled._gradwatch_unscaled = outputs.detach()  # type: ignore[attr-defined]
            except Exception:
                pass
        return scaled

    scale._gradwatch_patched = True  # type: ignore[attr-defined]
    torch.amp.GradScaler.scale = scale  # type: ignore[method-assign]


def install() -> None:
    """Patch this process once. Idempotent; each patch that fails is skipped (fail-open)."""
    if _state["installed"]:
        return
    _state["installed"] = True
    for patch in (_patch_wrappers, _patch_loss_capture):
        try:
            patch()
        except Exception as exc:
            _say(f"auto-attach: {patch.__name__} failed, continuing without it: {exc!r}")
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    _state["hook"] = register_optimizer_step_pre_hook(_on_first_step)


def _on_first_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    """The global pre-hook: decide once, at the first optimizer step, then do nothing."""
    if _state["decided"]:
        return None
    _state["decided"] = True  # the hook cannot remove itself while torch iterates the hooks
    try:
        _decide(optimizer)
    except Exception as exc:
        _say(f"auto-attach failed; training goes on unmonitored: {exc!r}")
    return None


def _owner(optimizer: torch.optim.Optimizer) -> Optional[torch.nn.Module]:
    """The remembered wrapper holding most of the optimizer's parameters (latest on a tie)."""
    ids = {id(p) for group in optimizer.param_groups for p in group["params"]}
    best, best_count = None, 0
    for ref in _models:
        module = ref()
        if module is None:
            continue
        count = sum(id(p) in ids for p in module.parameters())
        if count and count >= best_count:
            best, best_count = module, count
    return best


def _backend_device() -> torch.device:
    """Where the default group's collectives take tensors: NCCL the current CUDA device, else the
    host (a model's first parameter may sit elsewhere: CPU offload, meta, another device)."""
    if "nccl" in str(dist.get_backend()).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_ranks_ok(ok: bool) -> bool:
    """One MIN all-reduce, once per process: every rank attaches, or none does."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return ok
    flag = torch.tensor([1.0 if ok else 0.0], device=_backend_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _decide(optimizer: torch.optim.Optimizer) -> None:
    models = [m for m in (ref() for ref in _models) if m is not None]
    if attached_agent(optimizer) is not None or any(attached_agent(m) is not None for m in models):
        _say("the script attaches its own HealthAgent; auto-attach does nothing")
        return
    model = _owner(optimizer)
    if model is None:
        _say(f"auto-attach found no DDP/FSDP model holding the parameters of {type(optimizer).__name__}; not attached")
        return
    agent: Optional[HealthAgent] = None
    try:
        agent = HealthAgent.from_env(model, optimizer)
    except Exception as exc:
        log.error("gradwatch: auto-attach could not build the agent on rank %d: %r", _rank(), exc)
    try:
        everyone = _all_ranks_ok(agent is not None)
    except Exception as exc:  # the agreement itself failed: attach nowhere, and free what was built
        log.error("gradwatch: auto-attach could not agree with the other ranks on rank %d: %r", _rank(), exc)
        everyone = False
    if not everyone:
        if agent is not None:
            agent.close()
        _say("auto-attach failed on some rank; training goes on unmonitored on every rank")
        return
    assert agent is not None
    _losses.clear()  # the step just taken, before the agent existed, is not measured
    agent.wrap(optimizer, loss=_loss_and_unhook)
    _state["agent"] = agent
    atexit.register(agent.close)
    port = f", metrics on port {agent.metrics_port}" if agent.metrics_port else ""
    _say(f"auto-attached to {type(model).__name__} and {type(optimizer).__name__} (job {agent.config.job}, "
         f"mode {agent.config.mode}{port}); measuring from the next optimizer step")


def _loss_and_unhook() -> Optional[torch.Tensor]:
    """The step's loss for `route_step`; on the first routed step also drops the global hook (it
    runs before the optimizer's own step, outside torch's loop over the hooks)."""
    hook = _state.pop("hook", None)
    if hook is not None:
        hook.remove()
    return _losses.take()
