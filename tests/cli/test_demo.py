"""The README's main command: the demo walk-through runs to the end and agrees with the
evaluator on every real connection (live part as root)."""

from __future__ import annotations

import pytest

from bulkhead.cli.demo import run_demo


def test_demo_walk_through_without_namespaces(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_demo(live=False) == 0
    out = capsys.readouterr().out
    assert "inet bulkhead" in out and "Semantic diff" in out and "PASS" in out


@pytest.mark.privileged
def test_demo_live_enforcement_agrees(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_demo(live=True) == 0
    out = capsys.readouterr().out
    assert "0 disagree with the evaluator" in out
    assert "Every connection matched the evaluator." in out
