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


def test_flows_go_as_arrow_and_rows_it_cannot_encode_as_json() -> None:
    import msgspec
    import pyarrow as pa

    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"batch_id": "b1", "stored": 1, "duplicate": False})

    c = AgentClient("http://cp.test", transport=httpx.MockTransport(handler))
    c.set_credential(7, "bha_secret")
    row = {"ts": 1.5, "src_ip": "10.0.0.1", "dst_ip": "10.0.0.2", "proto": 6,
           "direction": "out", "dst_port": 22, "process": "ssh"}
    assert c.upload_flows("b1", [row])["stored"] == 1
    req = seen[-1]
    assert req.url.path.endswith("/agents/7/flows")
    assert req.headers["content-type"] == "application/vnd.apache.arrow.stream"
    assert req.headers["x-batch-id"] == "b1"
    table = pa.ipc.open_stream(req.content).read_all()
    assert table.column("process").to_pylist() == ["ssh"]
    # a row the encoder refuses goes as JSON: the server's 422 will name the field
    c.upload_flows("b2", [{**row, "proto": "tcp"}])
    req = seen[-1]
    assert req.headers["content-type"] == "application/json"
    assert msgspec.json.decode(req.content)["flows"][0]["proto"] == "tcp"
