"""HTTP to the control plane's agent channel (docs/design/agent-channel.md), with httpx.

Each call returns the decoded answer or raises `ChannelError`, which says whether a retry can
help (`retryable`: network errors, timeouts, 5xx, 429) and whether the credential was refused
(`unauthorized`: 401, or 403 on our own routes once the server unpaired us). `call_with_retry`
retries retryable errors with exponential backoff for calls that must not wait for the core's
next tick (activation at start-up); uploads and heartbeats are retried by the core instead, so
a dead server never blocks the agent's loop for long.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

import httpx

from bulkhead.agent.arrowipc import MEDIA_TYPE as ARROW_MEDIA_TYPE
from bulkhead.agent.arrowipc import EncodeError, encode_flows

T = TypeVar("T")


class ChannelError(RuntimeError):
    def __init__(self, message: str, *, status: int | None = None, retryable: bool = True,
                 unauthorized: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.retryable = retryable
        self.unauthorized = unauthorized


def _problem(resp: httpx.Response) -> str:
    try:
        data = resp.json()
    except ValueError:
        return resp.text[:300]
    if isinstance(data, dict):
        detail = str(data.get("detail") or data.get("title") or "")
        errs = data.get("errors")
        if isinstance(errs, list) and errs:
            detail += " (" + "; ".join(f"{e.get('path')}: {e.get('message')}" for e in errs[:3]
                                       if isinstance(e, dict)) + ")"
        return detail
    return str(data)[:300]


def _json(resp: httpx.Response, method: str, path: str) -> dict[str, Any]:
    """The answer's JSON object; anything else (a proxy's HTML page, a cut body) is a
    retryable ChannelError, not a crash of the calling loop."""
    try:
        data = resp.json()
    except ValueError as exc:
        raise ChannelError(f"{method} {path}: HTTP {resp.status_code}: answer is not JSON: "
                           f"{exc}", status=resp.status_code) from None
    if not isinstance(data, dict):
        raise ChannelError(f"{method} {path}: HTTP {resp.status_code}: answer is not a JSON "
                           f"object", status=resp.status_code)
    return data


class AgentClient:
    def __init__(self, server: str, *, timeout: float = 10.0,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.server = server.rstrip("/")
        self.base = self.server + "/api/v1"
        self.agent_id: int | None = None
        self.credential: str | None = None
        self.http = httpx.Client(timeout=httpx.Timeout(timeout, connect=3.0),
                                 transport=transport)
        # the long-poll has its own connection: it is parked while other calls go on
        self.poll_http = httpx.Client(timeout=httpx.Timeout(timeout, connect=3.0),
                                      transport=transport)

    def close(self) -> None:
        self.http.close()
        self.poll_http.close()

    def set_credential(self, agent_id: int | None, credential: str | None) -> None:
        self.agent_id, self.credential = agent_id, credential

    def _headers(self) -> dict[str, str]:
        if self.credential is None:
            raise ChannelError("not paired", retryable=False, unauthorized=True)
        return {"Authorization": f"Bearer {self.credential}"}

    def _request(self, method: str, path: str, *, http: httpx.Client | None = None,
                 auth: bool = True, timeout: float | None = None,
                 ok: tuple[int, ...] = (200, 201), **kw: Any) -> httpx.Response:
        headers = dict(kw.pop("headers", {}))
        if auth:
            headers.update(self._headers())
        client = http or self.http
        try:
            resp = client.request(method, self.base + path, headers=headers,
                                  timeout=timeout if timeout is not None else
                                  httpx.USE_CLIENT_DEFAULT, **kw)
        except httpx.HTTPError as exc:
            raise ChannelError(f"{method} {path}: {type(exc).__name__}: {exc}") from None
        if resp.status_code in ok:
            return resp
        status = resp.status_code
        raise ChannelError(f"{method} {path}: HTTP {status}: {_problem(resp)}", status=status,
                           retryable=status >= 500 or status in (408, 429),
                           unauthorized=status == 401 or (status == 403 and auth))

    def _me(self) -> str:
        if self.agent_id is None:
            raise ChannelError("not paired", retryable=False, unauthorized=True)
        return f"/agents/{self.agent_id}"

    # -- the channel -----------------------------------------------------------------------
    def activate(self, *, pairing_key: str, hostname: str, ips: list[str],
                 agent_version: str, os: str = "linux") -> dict[str, Any]:
        resp = self._request("POST", "/agents/activate", auth=False, json={
            "pairing_key": pairing_key, "hostname": hostname, "os": os, "ips": ips[:64],
            "agent_version": agent_version})
        data = _json(resp, "POST", "/agents/activate")
        for key, kind in (("agent_id", int), ("credential", str), ("workload", str)):
            if not isinstance(data.get(key), kind):
                raise ChannelError(f"POST /agents/activate: answer field {key}: expected "
                                   f"{kind.__name__}", status=resp.status_code)
        return data

    def heartbeat(self, payload: dict[str, Any]) -> dict[str, Any]:
        path = self._me() + "/heartbeat"
        return _json(self._request("POST", path, json=payload), "POST", path)

    def inventory(self, inv: dict[str, Any]) -> None:
        self._request("PUT", self._me() + "/inventory", json=inv)

    def upload_flows(self, batch_id: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """An Arrow IPC batch (the server decodes it without a Python object per flow); rows
        the encoder cannot write go as JSON, whose answer names the bad field. The server
        de-duplicates by batch id, so a retry is always safe."""
        path = self._me() + "/flows"
        try:
            body = encode_flows(rows)
        except EncodeError:
            resp = self._request("POST", path, json={"batch_id": batch_id, "flows": rows})
        else:
            resp = self._request("POST", path, content=body, headers={
                "Content-Type": ARROW_MEDIA_TYPE, "X-Batch-Id": batch_id})
        return _json(resp, "POST", path)

    def fetch_policy(self, known: str | None, wait: float) -> tuple[str, Any] | None:
        """(version, wire document), or None when unchanged (304)."""
        params: dict[str, Any] = {"wait": wait}
        if known is not None:
            params["known"] = known
        resp = self._request("GET", self._me() + "/policy", http=self.poll_http,
                             timeout=wait + 15.0, ok=(200, 304), params=params)
        if resp.status_code == 304:
            return None
        data = _json(resp, "GET", self._me() + "/policy")
        if not isinstance(data.get("version"), str):
            raise ChannelError("policy answer without a version", retryable=True)
        return data["version"], data.get("compiled")


def call_with_retry(fn: Callable[[], T], *, attempts: int = 5, first_delay: float = 0.5,
                    max_delay: float = 10.0, sleep: Callable[[float], None] = time.sleep) -> T:
    delay = first_delay
    for i in range(attempts):
        try:
            return fn()
        except ChannelError as exc:
            if not exc.retryable or i == attempts - 1:
                raise
        sleep(delay)
        delay = min(max_delay, delay * 2)
    raise AssertionError("unreachable")
