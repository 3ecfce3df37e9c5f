"""Assertions shared by the API tests."""

from __future__ import annotations

from typing import Any

API = "/api/v1"
PROBLEM = "application/problem+json"


def problem(r: Any, status: int) -> dict[str, Any]:
    """The problem+json body of a response that must have `status`."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == PROBLEM
    body: dict[str, Any] = r.json()
    assert body["status"] == status
    return body


def paths(body: dict[str, Any]) -> list[str]:
    """The field paths a problem names."""
    return [e["path"] for e in body.get("errors", [])]
