"""The distribution's shape: one `gradwatch` namespace, halves that import without each other's deps."""

from __future__ import annotations

import subprocess
import sys

import pytest

BLOCK = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {blocked!r}:
            raise ImportError('blocked by test: ' + name)
sys.meta_path.insert(0, Block())
"""


def run_python(code: str) -> subprocess.CompletedProcess:
    # Run from / so neither the repo root nor the tests folder is on sys.path: only the installed package.
    return subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, timeout=120)


def test_aggregator_imports_without_torch():
    code = "import gradwatch.aggregator.service.app, gradwatch.cli, gradwatch.cli.main, gradwatch.aggregator.evaluate"
    result = run_python(BLOCK.format(blocked={"torch"}) + code)
    assert result.returncode == 0, result.stderr


def test_agent_imports_without_service_dependencies_or_frameworks():
    service = {"ray", "fastapi", "grafana_client", "uvicorn", "httpx", "yaml",
               "lightning", "pytorch_lightning", "transformers", "accelerate"}
    # the agent embeds the rules evaluator (pydantic only): that works without the service's deps too;
    # the framework-free integrations (auto-attach, the launcher, step routing) need no framework either
    code = ("import sys, gradwatch.agent, gradwatch.agent.alerting\n"
            "import gradwatch.agent.integrations.autoattach, gradwatch.agent.integrations.launch\n"
            "import gradwatch.agent.integrations.adapters, gradwatch.agent.step_router\n"
            "from gradwatch.aggregator.evaluate import RuleEngine\nfrom gradwatch.aggregator.rules import RuleSet\n"
            "RuleEngine(RuleSet()).evaluate(0.0)\n"
            f"print(sorted(m for m in {sorted(service)!r} if m in sys.modules))")
    result = run_python(BLOCK.format(blocked=service) + code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_wire_imports_with_pydantic_only():
    """What both halves exchange (commands, metric names) needs neither half nor their dependencies."""
    blocked = {"torch", "prometheus_client", "pydantic_settings", "fastapi", "uvicorn", "httpx", "yaml"}
    code = ("import sys, gradwatch.wire.commands, gradwatch.wire.metric_names\n"
            "print(sorted(m for m in sys.modules if m.startswith(('gradwatch.agent', 'gradwatch.aggregator'))))")
    result = run_python(BLOCK.format(blocked=blocked) + code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_agent_and_aggregator_do_not_import_each_other():
    """The agent reaches the aggregator's package only for in-process rules (gradwatch.agent.alerting,
    imported by watch_rules); the aggregator never imports the agent."""
    agent = ("import sys, gradwatch.agent, gradwatch.agent.remote, gradwatch.agent.exporter\n"
             "print(sorted(m for m in sys.modules if m.startswith('gradwatch.aggregator')))")
    aggregator = ("import sys, gradwatch.aggregator.service.app, gradwatch.aggregator.service.policy\n"
                  "print(sorted(m for m in sys.modules if m.startswith('gradwatch.agent')))")
    for code in (agent, aggregator):
        result = run_python(code)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("bare", ["agent", "aggregator", "wire"])
def test_no_bare_top_level_packages(bare):
    result = run_python(f"import {bare}")
    assert result.returncode != 0 and "No module named" in result.stderr
