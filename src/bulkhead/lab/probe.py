"""Concurrent connectivity probe run inside a lab network namespace.

Usage::

    echo '[{"dst": "10.99.0.12", "proto": "tcp", "port": 80}]' \\
        | python -m bulkhead.lab.probe --timeout 1.0
    ["open"]

(or run this file directly: it imports nothing outside the standard library.)

Reads a JSON list of probes ``{"dst": ip, "proto": "tcp"|"udp"|"icmp"|"icmpv6", "port": n}``
from stdin and prints a JSON list with one result per probe, in input order:

* ``"open"``    - TCP connect succeeded / UDP echo came back / ICMP echo reply came back;
* ``"refused"`` - an active negative answer arrived: TCP RST, or an ICMP destination
  unreachable of any code (port unreachable, admin prohibited, host unreachable, ...);
* ``"timeout"`` - nothing came back within the timeout. A packet dropped by the *sending*
  namespace's own output path (``sendto`` failing with EPERM/EACCES) also counts as
  ``"timeout"``: it was dropped, not rejected.

All probes run concurrently on one asyncio loop, so a whole matrix costs about one timeout.
ICMP uses raw sockets (needs CAP_NET_RAW; the lab runs as root) matched by echo identifier;
``"icmp"`` and ``"icmpv6"`` both pick the ICMP version from the family of ``dst``, and
``port`` is ignored for them. UDP probes use a connected socket, so an ICMP port unreachable
surfaces as ECONNREFUSED. Exit status 2 on malformed input.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import ipaddress
import itertools
import json
import os
import resource
import socket
import struct
import sys
import time
from collections.abc import Sequence
from typing import Any

OPEN = "open"
REFUSED = "refused"
TIMEOUT = "timeout"
PROTOS = ("tcp", "udp", "icmp", "icmpv6")

# Errors that mean "our own namespace dropped it on the way out" rather than "refused".
_LOCAL_DROP = (errno.EPERM, errno.EACCES)

_ids = itertools.count((os.getpid() * 7919) & 0xFFFF)


def _family(dst: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ipaddress.ip_address(dst).version == 6 else socket.AF_INET


def _classify(exc: OSError, *, sending: bool) -> str:
    if sending and exc.errno in _LOCAL_DROP:
        return TIMEOUT
    return REFUSED


async def probe_tcp(dst: str, port: int, timeout: float) -> str:
    loop = asyncio.get_running_loop()
    with socket.socket(_family(dst), socket.SOCK_STREAM) as sock:
        sock.setblocking(False)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, (dst, port)), timeout)
        except TimeoutError:
            return TIMEOUT
        except OSError as exc:
            # A SYN dropped by our own OUTPUT chain is retransmitted by the kernel, so it
            # ends as a timeout; anything raised here is an answer from the network.
            return _classify(exc, sending=False)
    return OPEN


async def probe_udp(dst: str, port: int, timeout: float) -> str:
    loop = asyncio.get_running_loop()
    token = os.urandom(12)
    deadline = time.monotonic() + timeout
    with socket.socket(_family(dst), socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        try:
            sock.connect((dst, port))
            sock.send(token)
        except OSError as exc:
            return _classify(exc, sending=True)
        while (left := deadline - time.monotonic()) > 0:
            try:
                data = await asyncio.wait_for(loop.sock_recv(sock, 2048), left)
            except TimeoutError:
                return TIMEOUT
            except OSError as exc:
                return _classify(exc, sending=False)
            if data == token:
                return OPEN
    return TIMEOUT


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _parse_icmp4(packet: bytes, ident: int) -> str | None:
    """Result for a packet received on a raw IPv4 ICMP socket (IP header included)."""
    if len(packet) < 20:
        return None
    ihl = (packet[0] & 0x0F) * 4
    icmp = packet[ihl:]
    if len(icmp) < 8:
        return None
    kind = icmp[0]
    if kind == 0 and struct.unpack("!H", icmp[4:6])[0] == ident:  # echo reply
        return OPEN
    if kind == 3 and len(icmp) >= 8 + 20:  # destination unreachable: quotes our request
        inner = icmp[8:]
        inner_ihl = (inner[0] & 0x0F) * 4
        quoted = inner[inner_ihl:]
        if len(quoted) >= 6 and quoted[0] == 8 and struct.unpack("!H", quoted[4:6])[0] == ident:
            return REFUSED
    return None


def _parse_icmp6(packet: bytes, ident: int) -> str | None:
    """Result for a packet received on a raw ICMPv6 socket (no IP header)."""
    if len(packet) < 8:
        return None
    kind = packet[0]
    if kind == 129 and struct.unpack("!H", packet[4:6])[0] == ident:  # echo reply
        return OPEN
    if kind == 1 and len(packet) >= 8 + 40 + 6:  # destination unreachable
        quoted = packet[8 + 40 :]  # assumes no extension headers in our own request
        if quoted[0] == 128 and struct.unpack("!H", quoted[4:6])[0] == ident:
            return REFUSED
    return None


async def probe_icmp(dst: str, timeout: float) -> str:
    loop = asyncio.get_running_loop()
    family = _family(dst)
    ident = next(_ids) & 0xFFFF
    payload = b"bulkhead-probe" + os.urandom(8)
    if family == socket.AF_INET:
        proto, parse = socket.IPPROTO_ICMP, _parse_icmp4
        header = struct.pack("!BBHHH", 8, 0, 0, ident, 1)
        csum = _checksum(header + payload)
        message = struct.pack("!BBHHH", 8, 0, csum, ident, 1) + payload
    else:
        # The kernel fills in the ICMPv6 checksum on raw IPPROTO_ICMPV6 sockets.
        proto, parse = socket.IPPROTO_ICMPV6, _parse_icmp6
        message = struct.pack("!BBHHH", 128, 0, 0, ident, 1) + payload
    deadline = time.monotonic() + timeout
    with socket.socket(family, socket.SOCK_RAW, proto) as sock:
        sock.setblocking(False)
        try:
            await loop.sock_sendto(sock, message, (dst, 0))
        except OSError as exc:
            return _classify(exc, sending=True)
        while (left := deadline - time.monotonic()) > 0:
            try:
                data = await asyncio.wait_for(loop.sock_recv(sock, 65535), left)
            except TimeoutError:
                return TIMEOUT
            except OSError:
                continue
            result = parse(data, ident)
            if result is not None:
                return result
    return TIMEOUT


def _validate(raw: Any) -> list[tuple[str, str, int]]:
    if not isinstance(raw, list):
        raise ValueError("input must be a JSON list of probes")
    probes: list[tuple[str, str, int]] = []
    for i, item in enumerate(raw):
        if isinstance(item, dict):
            dst, proto, port = item.get("dst"), item.get("proto"), item.get("port", 0)
        elif isinstance(item, list) and len(item) == 3:
            dst, proto, port = item
        else:
            raise ValueError(f"probe {i}: expected an object with dst, proto, port")
        if not isinstance(dst, str):
            raise ValueError(f"probe {i}: dst must be a string")
        ipaddress.ip_address(dst)  # raises ValueError on junk
        if proto not in PROTOS:
            raise ValueError(f"probe {i}: proto must be one of {', '.join(PROTOS)}")
        if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port < 65536:
            raise ValueError(f"probe {i}: port must be an integer 0..65535")
        if proto in ("tcp", "udp") and port == 0:
            raise ValueError(f"probe {i}: {proto} needs a port")
        probes.append((dst, proto, port))
    return probes


async def run_probes(probes: Sequence[tuple[str, str, int]], timeout: float) -> list[str]:
    async def one(dst: str, proto: str, port: int) -> str:
        if proto == "tcp":
            return await probe_tcp(dst, port, timeout)
        if proto == "udp":
            return await probe_udp(dst, port, timeout)
        return await probe_icmp(dst, timeout)

    return list(await asyncio.gather(*(one(*p) for p in probes)))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bulkhead.lab.probe")
    parser.add_argument("--timeout", type=float, default=1.0, help="seconds per probe")
    args = parser.parse_args(argv)
    # One socket per probe, all open at once: lift the soft fd limit for big matrices.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        probes = _validate(json.load(sys.stdin))
    except ValueError as exc:  # json.JSONDecodeError is a ValueError too
        print(f"probe: bad input: {exc}", file=sys.stderr)
        return 2
    with contextlib.suppress(BrokenPipeError):
        print(json.dumps(asyncio.run(run_probes(probes, args.timeout))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
