"""NFLOG over NETLINK_NETFILTER: packets the Bulkhead ruleset logged, with their prefix.

The compiled nftables ruleset logs every non-allow verdict to one NFLOG group with the prefix
`bh:<o|d|n>:<rule instance|->` (see bulkhead.dataplane.nftables). `NflogSocket(group)` binds
that group in packet-copy mode with a small copy range (headers only); `parse` decodes the
prefix and the IPv4/IPv6 + TCP/UDP header of each logged packet. Pure parser, thin socket.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import time
from dataclasses import dataclass

from bulkhead.agent.netlink import (
    NLM_F_ACK,
    NLM_F_REQUEST,
    NetlinkError,
    NetlinkSocket,
    Subscription,
    attr,
    iter_attrs,
    iter_messages,
    nlmsg,
)

__all__ = ["LoggedPacket", "NetlinkError", "NflogSocket", "decode_prefix", "parse"]

NETLINK_NETFILTER = 12
_SUBSYS_ULOG = 4 << 8
_MSG_PACKET, _MSG_CONFIG = _SUBSYS_ULOG | 0, _SUBSYS_ULOG | 1
# NFULA_* packet attributes
_TIMESTAMP, _PAYLOAD, _PREFIX = 3, 9, 10
# NFULA_CFG_* config attributes and values
_CFG_CMD, _CFG_MODE, _CFG_NLBUFSIZ, _CFG_TIMEOUT, _CFG_QTHRESH = 1, 2, 3, 4, 5
_CMD_BIND, _CMD_UNBIND = 1, 2
_COPY_PACKET = 2
_V6_EXT = {0, 43, 60}  # hop-by-hop, routing, destination options (length in 8-octet units)
_FRAGMENT = 44
_ACTIONS = {"o": "override_deny", "d": "deny", "n": "default"}
_BE16 = struct.Struct(">H")
_PORTS = struct.Struct(">HH")
_TS = struct.Struct(">QQ")


@dataclass(frozen=True, slots=True)
class LoggedPacket:
    prefix: str
    family: int  # 4 | 6
    proto: int  # IP protocol number (the upper layer after IPv6 extension headers)
    src: str
    dst: str
    sport: int  # 0 when not TCP/UDP/SCTP/UDP-Lite, or the header was cut off
    dport: int
    ts: float  # epoch seconds: the kernel's timestamp, else the time of parsing


def decode_prefix(prefix: str) -> tuple[str, int | None]:
    """`bh:d:3` -> ("deny", 3); `bh:o:5` -> ("override_deny", 5); `bh:n:-` -> ("default", None).

    ValueError, naming the prefix, for anything that is not a Bulkhead log prefix."""
    parts = prefix.split(":")
    if len(parts) == 3 and parts[0] == "bh" and parts[1] in _ACTIONS:
        action, inst = _ACTIONS[parts[1]], parts[2]
        if action == "default" and inst == "-":
            return action, None
        if action != "default" and inst.isdigit() and inst.isascii():
            return action, int(inst)
    raise ValueError(f"not a Bulkhead log prefix: {prefix!r} (want bh:<o|d>:<n> or bh:n:-)")


def _packet(payload: bytes) -> tuple[int, int, str, str, int, int] | None:
    """(family, proto, src, dst, sport, dport) of an IP packet's headers, or None."""
    if not payload:
        return None
    version = payload[0] >> 4
    if version == 4:
        if len(payload) < 20:
            return None
        ihl = (payload[0] & 0x0F) * 4
        proto = payload[9]
        src = socket.inet_ntop(socket.AF_INET, payload[12:16])
        dst = socket.inet_ntop(socket.AF_INET, payload[16:20])
        frag_offset = _BE16.unpack_from(payload, 6)[0] & 0x1FFF
        family, l4 = 4, (ihl if ihl >= 20 and frag_offset == 0 else -1)
    elif version == 6:
        if len(payload) < 40:
            return None
        proto = payload[6]
        src = socket.inet_ntop(socket.AF_INET6, payload[8:24])
        dst = socket.inet_ntop(socket.AF_INET6, payload[24:40])
        family, l4 = 6, 40
        for _ in range(8):  # bounded walk of extension headers
            if proto in _V6_EXT and len(payload) >= l4 + 2:
                proto, l4 = payload[l4], l4 + (payload[l4 + 1] + 1) * 8
            elif proto == _FRAGMENT and len(payload) >= l4 + 8:
                first = _BE16.unpack_from(payload, l4 + 2)[0] & 0xFFF8 == 0
                proto, l4 = payload[l4], (l4 + 8 if first else -1)
                break
            else:
                break
    else:
        return None
    sport = dport = 0
    if proto in (6, 17, 132, 136) and l4 >= 0 and len(payload) >= l4 + 4:
        sport, dport = _PORTS.unpack_from(payload, l4)
    return family, proto, src, dst, sport, dport


def parse(data: bytes | bytearray | memoryview) -> list[LoggedPacket]:
    """Logged packets in a buffer of netlink messages; non-IP payloads are skipped.

    Raises only NetlinkError (a malformed netlink header or an error reply)."""
    if not isinstance(data, bytes):
        data = bytes(data)
    out: list[LoggedPacket] = []
    for mtype, _flags, _seq, start, end in iter_messages(data):
        if mtype != _MSG_PACKET:
            continue
        prefix = ""
        ts: float | None = None
        pkt = None
        for atype, vs, ve in iter_attrs(data, start + 4, end):
            if atype == _PREFIX:
                prefix = data[vs:ve].split(b"\0", 1)[0].decode("utf-8", "replace")
            elif atype == _TIMESTAMP and ve - vs >= 16:
                sec, usec = _TS.unpack_from(data, vs)
                ts = sec + usec / 1e6
            elif atype == _PAYLOAD:
                pkt = _packet(data[vs:ve])
        if pkt is None:
            continue
        family, proto, src, dst, sport, dport = pkt
        out.append(LoggedPacket(prefix, family, proto, src, dst, sport, dport,
                                ts if ts is not None else time.time()))
    return out


def _config(group: int, *attrs: bytes, family: int = 0) -> bytes:
    return struct.pack("=BBH", family, 0, socket.htons(group)) + b"".join(attrs)


class NflogSocket(Subscription[LoggedPacket]):
    """A socket bound to one NFLOG group, copying `copy_range` bytes of each packet."""

    _parse = staticmethod(parse)

    def __init__(
        self,
        group: int,
        *,
        copy_range: int = 128,
        rcvbuf: int = 4 << 20,
        netns: str | None = None,
    ) -> None:
        if not 0 <= group <= 0xFFFF:
            raise ValueError(f"NFLOG group must be 0..65535, got {group}")
        self.group = group
        super().__init__(NetlinkSocket(NETLINK_NETFILTER, rcvbuf=rcvbuf, netns=netns,
                                       nonblocking=True))
        try:
            self._cmd(attr(_CFG_CMD, struct.pack("=B", _CMD_BIND)))
            self._cmd(
                attr(_CFG_MODE, struct.pack(">IBB", copy_range, _COPY_PACKET, 0)),
                attr(_CFG_QTHRESH, struct.pack(">I", 1)),  # deliver each packet at once
                attr(_CFG_TIMEOUT, struct.pack(">I", 1)),  # else flush within 10 ms
            )
        except BaseException:
            self._nl.close()
            raise

    def _cmd(self, *attrs: bytes) -> None:
        seq = self._nl.next_seq()
        msg = nlmsg(_MSG_CONFIG, NLM_F_REQUEST | NLM_F_ACK, seq, _config(self.group, *attrs))
        try:
            self._nl.request(msg)
        except NetlinkError as exc:
            raise NetlinkError(f"NFLOG group {self.group}: {exc}", exc.errno) from exc
        self._nl.sock.setblocking(False)

    def close(self) -> None:
        with contextlib.suppress(OSError):  # closing releases the binding anyway
            self._nl.send(nlmsg(_MSG_CONFIG, NLM_F_REQUEST, self._nl.next_seq(),
                                _config(self.group, attr(_CFG_CMD, bytes([_CMD_UNBIND])))))
        super().close()
