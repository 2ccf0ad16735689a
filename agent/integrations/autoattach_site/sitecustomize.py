"""Loaded at interpreter start-up because `gradwatch run --auto-attach` put this folder first on
PYTHONPATH. It runs any sitecustomize it shadows, then, in torch.distributed rank processes only
(RANK and WORLD_SIZE set, as torchrun sets them), installs gradwatch's auto-attach patches.

Shipped as package data (not a module of the package) so that it is a plain file on disk in every
install; it must never stop the interpreter from starting.
"""

import os
import sys


def _chain_shadowed() -> None:
    """Import the next `sitecustomize` on sys.path (the one this file shadows), if there is one."""
    here = os.path.dirname(os.path.abspath(__file__))
    ours = sys.modules.pop("sitecustomize", None)
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    try:
        import importlib

        importlib.import_module("sitecustomize")
    except ImportError as exc:
        if exc.name != "sitecustomize":
            print(f"gradwatch: the shadowed sitecustomize failed: {exc!r}", file=sys.stderr)
    except Exception as exc:
        print(f"gradwatch: the shadowed sitecustomize failed: {exc!r}", file=sys.stderr)
    finally:
        sys.path[:] = saved
        if ours is not None:
            sys.modules["sitecustomize"] = ours


def _install() -> None:
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return  # the launcher itself (torchrun), helper tools, spawned non-rank processes
    try:
        from gradwatch.agent.integrations import autoattach

        autoattach.install()
    except Exception as exc:  # fail-open: the training starts unmonitored
        print(f"gradwatch: auto-attach not installed (training goes on unmonitored): {exc!r}", file=sys.stderr)


_chain_shadowed()
_install()
