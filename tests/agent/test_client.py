"""AgentClient against canned answers (httpx.MockTransport): odd answers are ChannelErrors."""

from __future__ import annotations

import httpx
import pytest

from bulkhead.agent.client import AgentClient, ChannelError


def client(status: int, body: bytes, ctype: str = "application/json") -> AgentClient:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, content=body, headers={"content-type": ctype})

    c = AgentClient("http://cp.test", transport=httpx.MockTransport(handler))
    c.set_credential(7, "bha_secret")
    return c


@pytest.mark.parametrize("body", [b"<html>gateway</html>", b'{"cut', b"[1, 2]"])
def test_non_json_answers_are_retryable_channel_errors(body: bytes) -> None:
    # a proxy page or a cut body must not raise ValueError/AttributeError out of the
    # poll thread (it would die and the agent would never poll again)
    c = client(200, body, "text/html")
    for call in (lambda: c.fetch_policy(None, 1.0), lambda: c.heartbeat({}),
                 lambda: c.upload_flows("b000000000001", []),
                 lambda: c.activate(pairing_key="k", hostname="h", ips=[],
                                    agent_version="0")):
        with pytest.raises(ChannelError) as got:
            call()
        assert got.value.retryable and "not" in str(got.value) and "JSON" in str(got.value)


def test_activation_answer_missing_a_field_names_it() -> None:
    c = client(201, b'{"agent_id": 3, "workload": "web"}')
    with pytest.raises(ChannelError, match="field credential"):
        c.activate(pairing_key="k", hostname="h", ips=[], agent_version="0")


def test_good_answers_decode() -> None:
    c = client(200, b'{"version": "v1", "compiled": {"x": 1}}')
    assert c.fetch_policy("v0", 1.0) == ("v1", {"x": 1})
    c = client(201, b'{"agent_id": 3, "credential": "bha_x", "workload": "web"}')
    assert c.activate(pairing_key="k", hostname="h", ips=[], agent_version="0")["agent_id"] == 3
