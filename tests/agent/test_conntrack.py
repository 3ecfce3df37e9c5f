"""Conntrack netlink parser (on messages captured from the kernel) and socket (privileged)."""

from __future__ import annotations

import struct
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bulkhead.agent import conntrack
from bulkhead.agent.conntrack import ConntrackSocket, CtEvent, parse
from bulkhead.agent.netlink import NetlinkError, attr
from tests.agent._sensors import A4, A6, B4, B6, buffers, two_hosts

EVENTS = buffers("ct_events.hex")
DUMP = buffers("ct_dump.hex")


def _key(e: CtEvent) -> tuple[object, ...]:
    port = e.icmp_type if e.proto in (1, 58) else e.dport
    return e.family, e.proto, e.src, e.dst, port


# -- pure: captured kernel messages -------------------------------------------------------------

def test_captured_new_events_have_the_original_tuple() -> None:
    events = [e for buf in EVENTS for e in parse(buf)]
    new = {_key(e) for e in events if e.kind == "new"}
    assert {
        (4, 6, A4, B4, 80), (6, 6, A6, B6, 80), (4, 17, A4, B4, 53), (6, 17, A6, B6, 53),
        (4, 1, A4, B4, 8), (6, 58, A6, B6, 128), (4, 6, A4, B4, 81), (6, 17, A6, B6, 54),
    } <= new
    tcp = next(e for e in events if e.kind == "new" and _key(e) == (4, 6, A4, B4, 80))
    assert 32768 <= tcp.sport <= 65535 and tcp.icmp_type is None and tcp.ct_id > 0
    icmp = next(e for e in events if e.kind == "new" and e.proto == 1)
    assert (icmp.sport, icmp.dport, icmp.icmp_type, icmp.icmp_code) == (0, 0, 8, 0)
    assert {e.kind for e in events} == {"new", "update", "destroy"}


def test_captured_destroy_events_carry_counters() -> None:
    events = [e for buf in EVENTS for e in parse(buf)]
    tcp = next(e for e in events if e.kind == "destroy" and _key(e) == (4, 6, A4, B4, 80))
    # handshake + request-less line + FIN exchange: 4 packets out, 3 back
    assert (tcp.packets_orig, tcp.packets_reply) == (4, 3)
    assert tcp.bytes_orig > 4 * 40 and tcp.bytes_reply > 3 * 40
    dropped = next(e for e in events if e.kind == "destroy" and e.dport == 81)
    assert (dropped.packets_orig, dropped.packets_reply) == (1, 0)


def test_captured_dump() -> None:
    events = parse(b"".join(DUMP))
    assert events and all(e.kind == "dump" for e in events)
    assert len({e.ct_id for e in events}) == len(events) == 9
    by_key = {_key(e): e for e in events}
    assert by_key[(6, 6, A6, B6, 80)].packets_orig == 4
    assert by_key[(6, 58, A6, B6, 128)].bytes_reply > 0


def test_one_buffer_or_many_give_the_same_events() -> None:
    one_by_one = [e for buf in EVENTS for e in parse(buf)]
    assert parse(b"".join(EVENTS)) == one_by_one
    assert parse(bytearray(b"".join(EVENTS))) == one_by_one  # any bytes-like


def test_fast_path_agrees_with_the_generic_walk(monkeypatch: pytest.MonkeyPatch) -> None:
    data = b"".join(EVENTS + DUMP)
    fast = parse(data)
    monkeypatch.setattr(conntrack, "_V4_EXPECT", ())
    monkeypatch.setattr(conntrack, "_V6_EXPECT", ())
    assert parse(data) == fast


def test_truncated_buffers_give_a_prefix_of_the_events() -> None:
    data = b"".join(EVENTS[:6])
    full = parse(data)
    for cut in range(len(data) + 1):
        got = parse(data[:cut])
        assert got == full[: len(got)]


def _with_unknown_attrs(msg: bytes) -> bytes:
    """The message with an unknown top-level and an unknown nested attribute added."""
    extra = attr(250, b"\x01\x02\x03") + attr(0x8000 | 251, attr(7, b"\xff" * 8))
    body = msg[16:] + extra
    return struct.pack("=I", 16 + len(body)) + msg[4:16] + body


def test_unknown_attributes_are_ignored() -> None:
    for buf in EVENTS[:4]:
        assert parse(_with_unknown_attrs(buf)) == parse(buf)


def test_malformed_header_and_error_reply_raise_netlink_error() -> None:
    with pytest.raises(NetlinkError, match="length 8 < 16"):
        parse(struct.pack("=IHHII", 8, 0x100, 0, 0, 0))
    err = struct.pack("=IHHII", 36, 2, 0, 1, 0) + struct.pack("=i", -1) + b"\0" * 16
    with pytest.raises(NetlinkError, match="errno 1") as info:
        parse(err)
    assert info.value.errno == 1


def test_other_messages_and_missing_tuple_are_skipped() -> None:
    done = struct.pack("=IHHII", 20, 3, 2, 0, 0) + b"\0" * 4
    expect = struct.pack("=IHHII", 20, (2 << 8) | 0, 0, 0, 0) + b"\0" * 4  # expectation
    no_tuple = struct.pack("=IHHII", 28, 1 << 8, 0x600, 0, 0) + b"\2\0\0\0" + attr(3, b"\0" * 4)
    assert parse(expect + no_tuple + done) == []


def test_counters_32_bit_status_mark_id() -> None:
    ip = attr(0x8000 | 1, attr(1, bytes([10, 0, 0, 1])) + attr(2, bytes([10, 0, 0, 2])))
    proto = attr(0x8000 | 2, attr(1, b"\x11") + attr(2, b"\x04\xd2") + attr(3, b"\x00\x35"))
    counters = attr(0x8000 | 9, attr(3, struct.pack(">I", 7)) + attr(4, struct.pack(">I", 700)))
    body = (b"\2\0\0\0" + attr(0x8000 | 1, ip + proto) + counters
            + attr(3, struct.pack(">I", 0x8)) + attr(8, struct.pack(">I", 0x42))
            + attr(12, struct.pack(">I", 99)))
    msg = struct.pack("=IHHII", 16 + len(body), 2 << 8 | 0, 0, 0, 0)  # not conntrack
    ct_msg = struct.pack("=IHHII", 16 + len(body), 1 << 8 | 2, 0, 0, 0) + body  # DELETE
    assert parse(msg + body) == []
    assert parse(ct_msg) == [CtEvent("destroy", 4, 17, "10.0.0.1", "10.0.0.2", 1234, 53,
                                     None, None, 7, 700, 0, 0, 99, 8, 0x42)]


# -- pure: fuzzing -----------------------------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_arbitrary_bytes_never_crash(data: bytes) -> None:
    try:
        events = parse(data)
    except NetlinkError:
        return
    assert all(isinstance(e, CtEvent) for e in events)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(EVENTS + DUMP),
       st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=8))
def test_mutated_kernel_messages_never_crash(buf: bytes, flips: list[tuple[int, int]]) -> None:
    data = bytearray(buf)
    for pos, value in flips:
        if data:
            data[pos % len(data)] = value
    try:
        events = parse(bytes(data))
    except NetlinkError:
        return
    assert all(e.family in (4, 6) and 0 <= e.sport <= 65535 for e in events)


# -- privileged: the real kernel ---------------------------------------------------------------

PROBES = [(B4, "tcp", 80), (B6, "tcp", 80), (B4, "udp", 53), (B6, "udp", 53),
          (B4, "icmp", 0), (B6, "icmpv6", 0)]
EXPECTED = {(4, 6, A4, B4, 80), (6, 6, A6, B6, 80), (4, 17, A4, B4, 53),
            (6, 17, A6, B6, 53), (4, 1, A4, B4, 8), (6, 58, A6, B6, 128)}


def _ours(e: CtEvent) -> bool:
    return e.proto in (6, 17) or e.icmp_type in (8, 128)


def _drain(sock: ConntrackSocket, want: int, timeout: float = 3.0) -> list[CtEvent]:
    events: list[CtEvent] = []
    deadline = time.monotonic() + timeout
    while len(events) < want and time.monotonic() < deadline:
        events += sock.read()
        time.sleep(0.02)
    return events


@pytest.mark.privileged
def test_new_events_on_both_ends_v4_v6_tcp_udp_icmp() -> None:
    with two_hosts() as lab:
        lab.serve("b", tcp=[80], udp=[53])
        with ConntrackSocket.events(netns=lab.netns_path("a")) as ca, \
                ConntrackSocket.events(conntrack.NEW, netns=lab.netns_path("b")) as cb:
            assert ca.read() == []  # non-blocking when idle
            assert lab.probe("a", PROBES) == ["open"] * 6
            # (neighbour discovery and MLD could add ICMPv6 entries of their own: not ours)
            got_a = [e for e in _drain(ca, 6) if e.kind == "new" and _ours(e)]
            got_b = [e for e in _drain(cb, 6) if e.kind == "new" and _ours(e)]
        assert {_key(e) for e in got_a} == EXPECTED
        assert {_key(e) for e in got_b} == EXPECTED  # the server sees the same original tuple
        ports_a = {(e.proto, e.sport) for e in got_a if e.proto in (6, 17)}
        assert ports_a == {(e.proto, e.sport) for e in got_b if e.proto in (6, 17)}
        assert ca.overruns == 0


@pytest.mark.privileged
def test_dump_has_counters() -> None:
    with two_hosts() as lab:
        lab.serve("b", tcp=[80], udp=[53])
        assert conntrack.enable_accounting(lab.netns_path("a"))
        assert lab.probe("a", PROBES) == ["open"] * 6
        dump = [e for e in ConntrackSocket.dump(netns=lab.netns_path("a")) if _ours(e)]
        assert {_key(e) for e in dump} == EXPECTED
        assert all(e.kind == "dump" and e.packets_orig >= 1 and e.bytes_orig > 0 for e in dump)
        tcp = next(e for e in dump if _key(e) == (4, 6, A4, B4, 80))
        assert tcp.packets_reply >= 2 and tcp.bytes_reply > tcp.packets_reply * 40
        dump6 = ConntrackSocket.dump(6, netns=lab.netns_path("a"))
        assert {_key(e) for e in dump6 if _ours(e)} == {k for k in EXPECTED if k[0] == 6}
        assert all(e.family == 6 for e in dump6)


@pytest.mark.privileged
def test_overrun_is_counted_not_raised() -> None:
    # the smallest receive buffer the kernel allows (rcvbuf=1): a burst overflows it
    with two_hosts() as lab, ConntrackSocket.events(
            conntrack.NEW | conntrack.DESTROY, rcvbuf=1, netns=lab.netns_path("a")) as ca:
        lab.probe("a", [(B4, "udp", port) for port in range(2000, 2300)], timeout=0.3)
        time.sleep(0.1)
        events = ca.read()
        assert ca.overruns >= 1
        assert 0 < len(events) < 300
