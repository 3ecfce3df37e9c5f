"""Errors of the pure core.

A `PolicyError` carries every problem found, each with the path of the offending object
(`rulesets[2].rules[0].providers[1]`) and, when the input came from a file, the line.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, order=True)
class Issue:
    path: str
    message: str
    line: int | None = None
    source: str | None = None

    def __str__(self) -> str:
        where = ""
        if self.source:
            where = f"{self.source}:{self.line}: " if self.line else f"{self.source}: "
        elif self.line:
            where = f"line {self.line}: "
        path = f"{self.path}: " if self.path else ""
        return f"{where}{path}{self.message}"


class PolicyError(ValueError):
    """Input that does not form a valid policy (or flow, or topology). Nothing was applied."""

    def __init__(self, issues: list[Issue]) -> None:
        self.issues = sorted(issues, key=lambda i: (i.line or 0, i.path, i.message))
        super().__init__("\n".join(str(i) for i in self.issues))

    @classmethod
    def single(cls, path: str, message: str) -> PolicyError:
        return cls([Issue(path, message)])
