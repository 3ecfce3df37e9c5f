"""Reading YAML/JSON text into plain data while remembering the line of every path.

YAML is parsed to a node tree (`yaml.compose`) and turned into dicts/lists/scalars here, so
each value's path (`rulesets[0].rules[1]`) maps to its line, and duplicate keys are errors
instead of silently keeping the last one. JSON is YAML for this purpose; a file that YAML
cannot read is tried as strict JSON for a clearer message.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import yaml
from yaml.constructor import SafeConstructor

from bulkhead.domain.errors import Issue, PolicyError


@dataclass
class Document:
    data: Any
    lines: dict[str, int] = field(default_factory=dict)
    source: str | None = None

    def line(self, path: str) -> int | None:
        while True:
            if path in self.lines:
                return self.lines[path]
            if not path:
                return None
            cut = max(path.rfind("."), path.rfind("["))
            path = path[:cut] if cut > 0 else ""

    def issue(self, path: str, message: str) -> Issue:
        return Issue(path, message, self.line(path), self.source)


def join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


_constructor = SafeConstructor()


def _convert(node: yaml.Node, path: str, lines: dict[str, int], issues: list[Issue],
             source: str | None) -> Any:
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        out: dict[Any, Any] = {}
        for knode, vnode in node.value:
            if knode.tag == "tag:yaml.org,2002:merge":
                issues.append(Issue(path, "YAML merge keys (<<) are not supported",
                                    knode.start_mark.line + 1, source))
                continue
            key = _convert(knode, path, {}, issues, source)
            if isinstance(key, (dict, list)):
                issues.append(Issue(path, "mapping keys must be scalars",
                                    knode.start_mark.line + 1, source))
                continue
            sub = join(path, str(key))
            if key in out:
                issues.append(Issue(sub, f"duplicate key {key!r}", knode.start_mark.line + 1,
                                    source))
            lines[sub] = knode.start_mark.line + 1
            out[key] = _convert(vnode, sub, lines, issues, source)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_convert(v, join(path, i), lines, issues, source)
                for i, v in enumerate(node.value)]
    return _constructor.construct_object(node, deep=True)


def parse_text(text: str, source: str | None = None) -> Document:
    """Parse YAML or JSON text; raise PolicyError naming the line on syntax errors."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        if source and source.endswith(".json"):
            try:
                return Document(json.loads(text), {}, source)
            except json.JSONDecodeError as jexc:
                raise PolicyError([Issue("", f"invalid JSON: {jexc.msg}", jexc.lineno,
                                         source)]) from None
        problem = getattr(exc, "problem", None) or str(exc)
        raise PolicyError([Issue("", f"invalid YAML: {problem}", line, source)]) from None
    if node is None:
        return Document(None, {}, source)
    lines: dict[str, int] = {}
    issues: list[Issue] = []
    data = _convert(node, "", lines, issues, source)
    if issues:
        raise PolicyError(issues)
    return Document(data, lines, source)


def read_file(path: str) -> Document:
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        raise PolicyError([Issue("", f"cannot read: {exc.strerror}", None, path)]) from None
    except UnicodeDecodeError:
        raise PolicyError([Issue("", "not UTF-8 text", None, path)]) from None
    return parse_text(text, path)
