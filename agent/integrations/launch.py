"""`gradwatch run [options] -- CMD...`: run a training command with the agent configured on every rank.

The options become `GRADWATCH_*` environment variables, which every process CMD starts inherits and
`HealthAgent.from_env` (or any `HealthAgent(...)`) reads. They are validated with `AgentConfig`
first, together with any `GRADWATCH_*` already set, so a bad value fails here and not on rank 7 an
hour later. The aggregator's token is read from the environment as the agent reads it
(GRADWATCH_AGGREGATOR_TOKEN), never from the command line, where `ps` would show it.

With `--auto-attach`, the folder holding gradwatch's sitecustomize.py goes first on PYTHONPATH, so
every rank of an unmodified script attaches an agent to its DDP/FSDP model (autoattach.py).

The launcher then *execs* CMD: it becomes CMD, so CMD's exit status is the launcher's and signals
(Ctrl-C, a scheduler's SIGTERM) reach CMD directly, with no process in between to forward them.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from importlib import resources
from pathlib import Path
from typing import Mapping, Optional

from pydantic import ValidationError

from ..config import AgentConfig

SITE_FOLDER = "autoattach_site"  # package data of gradwatch.agent.integrations


class LaunchError(ValueError):
    """A launcher input that cannot work; the message says what to fix."""


def site_dir() -> Path:
    """The folder holding the auto-attach sitecustomize.py, wherever gradwatch is installed."""
    folder = resources.files("gradwatch.agent.integrations").joinpath(SITE_FOLDER)
    if not folder.joinpath("sitecustomize.py").is_file():
        raise LaunchError(f"gradwatch's {SITE_FOLDER}/sitecustomize.py is missing from the installed package")
    return Path(str(folder))  # setuptools installs package data as plain files


def launch_env(
    environ: Mapping[str, str],
    *,
    job: Optional[str] = None,
    aggregator_url: Optional[str] = None,
    mode: Optional[str] = None,
    metrics_port: Optional[int] = None,
    auto_attach: bool = False,
) -> dict[str, str]:
    """The environment CMD runs in: `environ` plus the options as GRADWATCH_* variables.

    Validates against AgentConfig as the ranks will see it (`environ` is expected to be this
    process's environment, which AgentConfig also reads)."""
    settings = {"job": job, "aggregator_url": aggregator_url, "mode": mode, "metrics_port": metrics_port}
    settings = {k: v for k, v in settings.items() if v is not None}
    config = AgentConfig(**settings)
    if config.aggregator_url and config.aggregator_token is None:
        raise LaunchError("--aggregator needs GRADWATCH_AGGREGATOR_TOKEN in the environment (the aggregator's token)")
    env = dict(environ)
    env.update({f"GRADWATCH_{key.upper()}": str(value) for key, value in settings.items()})
    if auto_attach:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site_dir()), environ.get("PYTHONPATH", "")) if p)
    return env


def run(args: argparse.Namespace) -> int:
    """`gradwatch run` (its options are declared in cli/main.py, which must import without
    torch): validate, then exec the command. Returns only on an error: 2 bad input, 127 not found,
    126 found but not executable (as a shell does)."""
    try:
        return _run(args)
    except (LaunchError, ValidationError) as exc:
        print(f"gradwatch run: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    command = list(args.cmd)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise LaunchError("missing the command to run: gradwatch run [options] -- torchrun ... train.py")
    env = launch_env(os.environ, job=args.job, aggregator_url=args.aggregator_url, mode=args.mode,
                     metrics_port=args.metrics_port, auto_attach=args.auto_attach)
    executable = shutil.which(command[0], path=env.get("PATH"))
    if executable is None:
        print(f"gradwatch: command not found: {command[0]}", file=sys.stderr)
        return 127
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(executable, command, env)
    except OSError as exc:  # found but not runnable: not executable, no shebang, a wrong-arch binary
        print(f"gradwatch: cannot execute {executable}: {exc.strerror or exc}", file=sys.stderr)
        return 126
    return 0  # pragma: no cover - execve does not return
