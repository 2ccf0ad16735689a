"""Annotation templates rendered exactly as Prometheus renders them, for the subset gradwatch uses.

Prometheus expands annotations with Go's text/template; the aggregator and the in-process evaluator
must produce the same text (promtool compares annotations byte for byte in the conformance test).
Supported: `{{ $labels.name }}` (missing label: empty), `{{ $value | humanize }}`,
`{{ $value | humanizePercentage }}`, `{{ $value | humanizeDuration }}`, `{{ printf "%.4g" $value }}` and `{{ if $labels.name }}...{{ end }}` (not nested). Anything else is
rejected when a rule is compiled, not silently passed through.
"""

from __future__ import annotations

import math
import re
from typing import Mapping

_ACTION = re.compile(r"\{\{-?\s*(.*?)\s*-?\}\}")
_LABEL = re.compile(r"\$labels\.([A-Za-z_][A-Za-z0-9_]*)")


class TemplateError(ValueError):
    pass


def _go_g4(value: float) -> str:
    """Go's fmt `%.4g`."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return "%.4g" % value


def humanize(value: float) -> str:
    """Prometheus's `humanize`: SI prefixes, 4 significant digits."""
    if value == 0 or math.isnan(value) or math.isinf(value):
        return _go_g4(value)
    prefix = ""
    if abs(value) >= 1:
        for p in ("k", "M", "G", "T", "P", "E", "Z", "Y"):
            if abs(value) < 1000:
                break
            prefix = p
            value /= 1000
    else:
        for p in ("m", "u", "n", "p", "f", "a", "z", "y"):
            if abs(value) >= 1:
                break
            prefix = p
            value *= 1000
    return _go_g4(value) + prefix


def humanize_duration(seconds: float) -> str:
    """Prometheus's `humanizeDuration`: '1d 2h 3m 4s' down to whole seconds, then 4 significant
    digits with an SI prefix below one second."""
    v = seconds
    if math.isnan(v) or math.isinf(v):
        return _go_g4(v)
    if v == 0:
        return _go_g4(v) + "s"
    if abs(v) >= 1:
        sign = "-" if v < 0 else ""
        v = abs(v)
        whole = int(v)  # Go's int64(v): truncation
        s, m, h, d = whole % 60, whole // 60 % 60, whole // 3600 % 24, whole // 86400
        if d:
            return f"{sign}{d}d {h}h {m}m {s}s"
        if h:
            return f"{sign}{h}h {m}m {s}s"
        if m:
            return f"{sign}{m}m {s}s"
        return sign + _go_g4(v) + "s"
    prefix = ""
    for p in ("m", "u", "n", "p", "f", "a", "z", "y"):
        if abs(v) >= 1:
            break
        prefix = p
        v *= 1000
    return _go_g4(v) + prefix + "s"


def _evaluate(action: str, labels: Mapping[str, str], value: float) -> str:
    if action in ("$value | humanize", "humanize $value"):
        return humanize(value)
    if action == 'printf "%.4g" $value':
        return _go_g4(value)
    if action in ("$value | humanizeDuration", "humanizeDuration $value"):
        return humanize_duration(value)
    if action in ("$value | humanizePercentage", "humanizePercentage $value"):
        return _go_g4(value * 100) + "%"
    m = _LABEL.fullmatch(action)
    if m:
        return labels.get(m.group(1), "")
    raise TemplateError(f"unsupported template action {{{{ {action} }}}}")


def render(template: str, labels: Mapping[str, str], value: float) -> str:
    out: list[str] = []
    pos = 0
    skipping = False
    in_if = False
    for m in _ACTION.finditer(template):
        if not skipping:
            out.append(template[pos:m.start()])
        pos = m.end()
        action = m.group(1)
        if action.startswith("if "):
            if in_if:
                raise TemplateError("nested {{ if }} is not supported")
            cond = _LABEL.fullmatch(action[3:].strip())
            if cond is None:
                raise TemplateError(f"unsupported condition {{{{ {action} }}}}")
            in_if, skipping = True, not labels.get(cond.group(1), "")
        elif action == "end":
            if not in_if:
                raise TemplateError("{{ end }} without {{ if }}")
            in_if = skipping = False
        elif not skipping:
            out.append(_evaluate(action, labels, value))
    if in_if:
        raise TemplateError("{{ if }} without {{ end }}")
    out.append(template[pos:])
    return "".join(out)


def check(template: str) -> None:
    """Raise TemplateError if `template` uses anything this renderer cannot reproduce."""
    render(template, {}, 1.0)
