"""Load a `RuleSet` from YAML. A bad file is rejected with its path, the line and the reason, so a
typo in a threshold stops the service at start instead of silently keeping a default."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

from pydantic import ValidationError

from .specs import RuleSet


class RuleFileError(ValueError):
    """`path:line: where: reason` for each problem found."""


def _positions(node: Any, path: tuple = (), out: Optional[dict] = None) -> dict[tuple, int]:
    """1-based line of every mapping key/sequence item in a composed YAML node tree."""
    import yaml

    out = {} if out is None else out
    out.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            sub = path + (key.value,)
            out[sub] = key.start_mark.line + 1
            _positions(value, sub, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _positions(item, path + (i,), out)
    return out


def _line(positions: dict[tuple, int], loc: tuple) -> int:
    for end in range(len(loc), -1, -1):
        if loc[:end] in positions:
            return positions[loc[:end]]
    return 1


def parse_rules(text: str, source: str = "<rules>") -> RuleSet:
    import yaml

    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 1
        raise RuleFileError(f"{source}:{line}: not valid YAML: {exc.problem or exc}") from None
    if data is None:
        return RuleSet()
    if not isinstance(data, dict):
        raise RuleFileError(f"{source}:1: expected a mapping with 'rules:' (and optionally 'interval:', 'group:'), got {type(data).__name__}")
    try:
        return RuleSet.model_validate(data)
    except ValidationError as exc:
        positions = _positions(node)
        problems = [
            f"{source}:{_line(positions, tuple(err['loc']))}: {'.'.join(map(str, err['loc'])) or '(top)'}: {err['msg']}"
            for err in exc.errors()
        ]
        raise RuleFileError("\n".join(problems)) from None


def load_rules(path: Union[str, Path, None]) -> RuleSet:
    """The built-in defaults overridden by the YAML file at `path` (None: defaults only)."""
    if path is None:
        return RuleSet()
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RuleFileError(f"{path}: cannot read: {exc.strerror}") from None
    return parse_rules(text, str(path))
