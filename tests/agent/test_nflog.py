"""NFLOG parser (on messages captured from the kernel), prefix decoding, socket (privileged)."""

from __future__ import annotations

import socket
import struct
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bulkhead.agent.netlink import NetlinkError, attr
from bulkhead.agent.nflog import LoggedPacket, NflogSocket, decode_prefix, parse
from tests.agent._sensors import A4, A6, B4, B6, buffers, two_hosts

CAPTURED = buffers("nflog.hex")


def _msg(*attrs: bytes, family: int = 2) -> bytes:
    body = struct.pack("=BBH", family, 0, socket.htons(7)) + b"".join(attrs)
    return struct.pack("=IHHII", 16 + len(body), 4 << 8, 0, 0, 0) + body


def _ipv6(next_header: int, ext: bytes, l4: bytes) -> bytes:
    src = socket.inet_pton(socket.AF_INET6, "2001:db8::1")
    dst = socket.inet_pton(socket.AF_INET6, "2001:db8::2")
    return struct.pack(">IHBB", 6 << 28, len(ext + l4), next_header, 64) + src + dst + ext + l4


# -- pure --------------------------------------------------------------------------------------

def test_captured_packets() -> None:
    got = [p for buf in CAPTURED for p in parse(buf)]
    assert [(p.prefix, p.family, p.proto, p.src, p.dst, p.dport) for p in got] == [
        ("bh:n:-", 6, 17, A6, B6, 54),
        ("bh:d:3", 4, 6, A4, B4, 81),
        ("bh:o:12", 4, 6, A4, B4, 82),
    ]
    assert all(p.sport >= 1024 for p in got)
    # kernel timestamps, in order, seconds since the epoch
    assert got[0].ts <= got[1].ts <= got[2].ts and got[0].ts > 1.6e9


def test_decode_prefix() -> None:
    assert decode_prefix("bh:d:3") == ("deny", 3)
    assert decode_prefix("bh:o:12") == ("override_deny", 12)
    assert decode_prefix("bh:n:-") == ("default", None)
    for bad in ("", "bh:d:-", "bh:n:3", "bh:a:1", "xx:d:1", "bh:d:1:2", "bh:d:٣", "bh:d:-1"):
        with pytest.raises(ValueError, match="not a Bulkhead log prefix"):
            decode_prefix(bad)


def test_ipv6_extension_headers_and_fragments() -> None:
    udp = struct.pack(">HHHH", 5353, 53, 8, 0)
    hop = bytes([17, 0]) + b"\0" * 6  # hop-by-hop, 8 bytes, next: UDP
    (pkt,) = parse(_msg(attr(10, b"bh:n:-\0"), attr(9, _ipv6(0, hop, udp)), family=10))
    assert (pkt.family, pkt.proto, pkt.src, pkt.sport, pkt.dport) == (6, 17, "2001:db8::1",
                                                                      5353, 53)
    later_fragment = bytes([6, 0]) + struct.pack(">H", 8 << 3) + b"\0" * 4
    (frag,) = parse(_msg(attr(9, _ipv6(44, later_fragment, udp)), family=10))
    assert (frag.proto, frag.sport, frag.dport, frag.prefix) == (6, 0, 0, "")


def test_ipv4_without_ports_and_non_ip_payloads() -> None:
    icmp = bytes([0x45, 0, 0, 28, 0, 0, 0, 0, 64, 1, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2]) + b"\x08" * 8
    (pkt,) = parse(_msg(attr(10, b"bh:d:1\0"), attr(9, icmp)))
    assert (pkt.proto, pkt.src, pkt.dst, pkt.sport, pkt.dport) == (1, "10.0.0.1", "10.0.0.2", 0, 0)
    assert parse(_msg(attr(9, b"\x12" * 40))) == []  # neither IPv4 nor IPv6
    assert parse(_msg(attr(10, b"bh:d:1\0"))) == []  # no payload at all
    before = time.time()
    (stamped,) = parse(_msg(attr(9, icmp)))  # no kernel timestamp: time of parsing
    assert before <= stamped.ts <= time.time()


def test_truncation_and_bad_headers() -> None:
    data = b"".join(CAPTURED)
    full = parse(data)
    for cut in range(0, len(data) + 1, 3):
        got = parse(data[:cut])
        assert [p.prefix for p in got] == [p.prefix for p in full[: len(got)]]
    with pytest.raises(NetlinkError):
        parse(struct.pack("=IHHII", 4, 4 << 8, 0, 0, 0) + b"\0" * 12)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_arbitrary_bytes_never_crash(data: bytes) -> None:
    try:
        out = parse(data)
    except NetlinkError:
        return
    assert all(isinstance(p, LoggedPacket) for p in out)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=120), st.binary(max_size=40))
def test_arbitrary_payloads_and_prefixes_never_crash(payload: bytes, prefix: bytes) -> None:
    for p in parse(_msg(attr(10, prefix), attr(9, payload))):
        assert 0 <= p.sport <= 65535 and p.family in (4, 6)


# -- privileged --------------------------------------------------------------------------------

@pytest.mark.privileged
def test_logged_drops_arrive_with_their_prefix() -> None:
    with two_hosts() as lab:
        lab.serve("b", tcp=[82])
        with NflogSocket(7, netns=lab.netns_path("b")) as log:
            assert log.read() == []
            results = lab.probe("a", [(B4, "tcp", 81), (B6, "tcp", 81), (B6, "udp", 54),
                                      (B4, "tcp", 82)], timeout=0.3)
            assert results == ["timeout", "timeout", "timeout", "open"]
            packets: list[LoggedPacket] = []
            deadline = time.monotonic() + 3
            while len(packets) < 4 and time.monotonic() < deadline:
                packets += log.read()
                time.sleep(0.02)
        seen = {(p.prefix, p.family, p.proto, p.src, p.dst, p.dport) for p in packets}
        assert {
            ("bh:d:3", 4, 6, A4, B4, 81), ("bh:d:3", 6, 6, A6, B6, 81),
            ("bh:n:-", 6, 17, A6, B6, 54), ("bh:o:12", 4, 6, A4, B4, 82),
        } <= seen
        assert all(decode_prefix(p.prefix)[0] in ("deny", "default", "override_deny")
                   for p in packets)
        assert all(abs(p.ts - time.time()) < 30 for p in packets)
