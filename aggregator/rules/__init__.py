"""Rule specs (pydantic), their compilation to PromQL, and Prometheus rule-file export.

Needs only pydantic at import; YAML is read lazily, so the agent can embed the rules."""

from .compile import CompiledRule, alert_name, compile_rule, compile_rules
from .loader import RuleFileError, load_rules, parse_rules
from .rulefile import export_text, rule_groups
from .specs import RULE_TYPES, RuleSet, RuleSpec

__all__ = [
    "CompiledRule", "RuleFileError", "RuleSet", "RuleSpec", "RULE_TYPES", "alert_name", "compile_rule",
    "compile_rules", "export_text", "load_rules", "parse_rules", "rule_groups",
]
