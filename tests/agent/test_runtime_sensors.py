"""The runtime's threads with stand-ins (no root): sensor coalescing, shutdown, cleanup; the
poll thread surviving an unexpected error."""

from __future__ import annotations

import queue
import socket
import threading
from typing import Any

import pytest

from bulkhead.agent import conntrack, nflog, procs
from bulkhead.agent import runtime as rt
from bulkhead.agent.summary import Summarizer


class FakeSock:
    """A readable (or idle) file descriptor with the sensor sockets' interface."""

    def __init__(self, readable: bool) -> None:
        self.a, self.b = socket.socketpair()
        if readable:
            self.b.send(b"x")  # stays readable: read() below does not consume it
        self.reads = 0
        self.closed = False
        self.overruns = 0

    def fileno(self) -> int:
        return self.a.fileno()

    def read(self) -> list[Any]:
        self.reads += 1
        return []

    def close(self) -> None:
        self.closed = True
        self.a.close()
        self.b.close()


class RecordingStop(threading.Event):
    """Records waits; the first wait is where a SIGTERM arrives."""

    def __init__(self) -> None:
        super().__init__()
        self.waits: list[float | None] = []

    def wait(self, timeout: float | None = None) -> bool:
        self.waits.append(timeout)
        self.set()
        return True


def _runtime(monkeypatch: pytest.MonkeyPatch, ct: Any, nf: Any) -> rt.Runtime:
    monkeypatch.setattr(conntrack, "enable_accounting", lambda *a, **k: True)
    monkeypatch.setattr(conntrack.ConntrackSocket, "events",
                        classmethod(lambda cls, *a, **k: ct))
    monkeypatch.setattr(procs, "ProcessResolver", lambda: None)
    monkeypatch.setattr(nflog, "NflogSocket", nf)
    r = rt.Runtime.__new__(rt.Runtime)
    r.opts = rt.AgentOptions(server="http://127.0.0.1:1", pairing_key=None,
                             state_dir=None)  # type: ignore[arg-type]
    r.stop = RecordingStop()
    r.lock = threading.Lock()
    r.summary = Summarizer(["10.0.0.1"], lambda *a: (None, None))
    r.stats = {"ct_events": 0, "nflog_packets": 0, "overruns": 0}
    r.resolver = None
    r.sensing = False
    return r


def test_conntrack_wake_waits_on_stop_and_shutdown_cuts_it_short(
        monkeypatch: pytest.MonkeyPatch) -> None:
    ct, nf = FakeSock(readable=True), FakeSock(readable=False)
    r = _runtime(monkeypatch, ct, lambda group: nf)
    r._sensor_loop()
    assert r.stop.waits == [rt.COALESCE_S]  # type: ignore[attr-defined]
    assert ct.reads == 0  # stopped during the delay: the loop ended without draining
    assert ct.closed and nf.closed


class GoOnStop(threading.Event):
    """Records waits without stopping; a read sets it."""

    def __init__(self) -> None:
        super().__init__()
        self.waits: list[float | None] = []

    def wait(self, timeout: float | None = None) -> bool:
        self.waits.append(timeout)
        return False


def test_a_verdict_and_its_connection_are_drained_together(
        monkeypatch: pytest.MonkeyPatch) -> None:
    ct, nf = FakeSock(readable=True), FakeSock(readable=True)
    five = dict(proto=6, src="10.0.0.2", dst="10.0.0.1", sport=40000, dport=6000)
    pkt = nflog.LoggedPacket(prefix="bh:n:-", family=4, ts=1.0, **five)  # type: ignore[arg-type]
    new = conntrack.CtEvent(kind="new", family=4, icmp_type=None, icmp_code=None,
                            packets_orig=0, bytes_orig=0, packets_reply=0, bytes_reply=0,
                            ct_id=9, status=0, mark=0, **five)  # type: ignore[arg-type]
    r = _runtime(monkeypatch, ct, lambda group: nf)
    r.stop = GoOnStop()
    r.summary.set_policy("visibility", {})

    def nf_read() -> list[Any]:
        nf.reads += 1
        return [pkt]

    def ct_read() -> list[Any]:
        ct.reads += 1
        r.stop.set()
        return [new]

    nf.read = nf_read  # type: ignore[method-assign]
    ct.read = ct_read  # type: ignore[method-assign]
    r._sensor_loop()
    assert r.stop.waits == [rt.COALESCE_S]
    assert (nf.reads, ct.reads) == (1, 1)
    assert r.stats["nflog_packets"] == 1 and r.stats["ct_events"] == 1
    rows = r.summary.flush(2.0)
    assert [(x["connections"], x["decision"]) for x in rows] == [
        (1, "potentially_blocked_no_rule")]


def test_nflog_failure_closes_the_conntrack_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    ct = FakeSock(readable=False)

    def refuse(group: int) -> Any:
        raise OSError(16, "NFLOG group 7: Device or resource busy")

    r = _runtime(monkeypatch, ct, refuse)
    r._sensor_loop()
    assert ct.closed and not r.sensing


def test_poll_thread_survives_an_unexpected_error() -> None:
    class Client:
        def fetch_policy(self, known: str | None, wait: float) -> None:
            raise KeyError("version")

    r = rt.Runtime.__new__(rt.Runtime)
    r.stop = threading.Event()
    r.client = Client()  # type: ignore[assignment]
    r.events = queue.Queue()
    r.poll_requests = queue.Queue()
    r.poll_requests.put(("v1", 1.0))
    r.poll_requests.put(None)
    r._poll_loop()  # returns at the None, not with a KeyError
    ev = r.events.get_nowait()
    assert ev.version is None and "KeyError" in ev.error  # type: ignore[union-attr]
