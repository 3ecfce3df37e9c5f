"""Tiny TCP/UDP responder run inside a lab network namespace.

Usage::

    python -m bulkhead.lab.responder --name web-1 --tcp 80,443 --udp 53

(or run this file directly: it imports nothing outside the standard library, so the lab
starts it by path and it works even where `bulkhead` is not installed.)

* TCP port: accept, send one short line ``"<name> tcp <port>\\n"``, close.
* UDP port: echo every datagram back to its sender.

Every port is one dual-stack socket (``::`` with ``IPV6_V6ONLY=0``, so IPv4 peers arrive as
v4-mapped addresses); if IPv6 is unavailable in the namespace it falls back to ``0.0.0.0``.
All sockets share one `selectors` loop in one process. Once every socket is bound the
responder prints a single line ``READY pid=<pid> tcp=<ports> udp=<ports>`` on stdout (the
harness waits for it) and then stays silent. SIGTERM / SIGINT make it close its sockets and
exit with status 0. Binding errors go to stderr with exit status 1.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import selectors
import signal
import socket
import sys
from collections.abc import Sequence


def _ports(values: Sequence[str]) -> list[int]:
    """`["80,443", "8080"]` -> `[80, 443, 8080]` (order kept, duplicates dropped)."""
    out: list[int] = []
    for value in values:
        for part in value.split(","):
            part = part.strip()
            if not part:
                continue
            port = int(part)
            if not 0 < port < 65536:
                raise ValueError(f"port out of range: {port}")
            if port not in out:
                out.append(port)
    return out


def _bind(kind: socket.SocketKind, port: int) -> socket.socket:
    """A non-blocking socket of `kind` bound to `port` on all v4 and v6 addresses."""
    try:
        sock = socket.socket(socket.AF_INET6, kind)
    except OSError as exc:
        if exc.errno not in (errno.EAFNOSUPPORT, errno.EPROTONOSUPPORT):
            raise
        sock = socket.socket(socket.AF_INET, kind)
        address: tuple[str, int] = ("0.0.0.0", port)
    else:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        address = ("::", port)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        if kind == socket.SOCK_STREAM:
            sock.listen(128)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def serve(name: str, tcp: Sequence[int], udp: Sequence[int]) -> int:
    sel = selectors.DefaultSelector()
    wake_r, wake_w = socket.socketpair()
    wake_r.setblocking(False)
    wake_w.setblocking(False)
    stop = False

    def _on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
    sel.register(wake_r, selectors.EVENT_READ, ("wake", 0))

    sockets: list[socket.socket] = []
    try:
        for port in tcp:
            sock = _bind(socket.SOCK_STREAM, port)
            sockets.append(sock)
            sel.register(sock, selectors.EVENT_READ, ("tcp", port))
        for port in udp:
            sock = _bind(socket.SOCK_DGRAM, port)
            sockets.append(sock)
            sel.register(sock, selectors.EVENT_READ, ("udp", port))
    except OSError as exc:
        print(f"responder: cannot bind: {exc}", file=sys.stderr, flush=True)
        for sock in sockets:
            sock.close()
        return 1

    tcp_s = ",".join(map(str, tcp))
    udp_s = ",".join(map(str, udp))
    print(f"READY pid={os.getpid()} tcp={tcp_s} udp={udp_s}", flush=True)

    while not stop:
        for key, _mask in sel.select():
            ready = key.fileobj
            assert isinstance(ready, socket.socket)
            kind, port = key.data
            if kind == "wake":
                with contextlib.suppress(BlockingIOError):
                    ready.recv(512)
            elif kind == "tcp":
                _answer_tcp(ready, f"{name} tcp {port}\n".encode())
            else:
                _echo_udp(ready)

    for sock in sockets:
        sock.close()
    signal.set_wakeup_fd(-1)
    wake_r.close()
    wake_w.close()
    sel.close()
    return 0


def _answer_tcp(listener: socket.socket, line: bytes) -> None:
    try:
        conn, _peer = listener.accept()
    except (BlockingIOError, InterruptedError, ConnectionError):
        return
    # The line is far smaller than any socket buffer: one send on the fresh socket does it;
    # a peer that already went away is not our problem.
    with conn, contextlib.suppress(OSError):
        conn.send(line)


def _echo_udp(sock: socket.socket) -> None:
    while True:
        try:
            data, peer = sock.recvfrom(65535)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:  # e.g. ECONNREFUSED left behind by an earlier ICMP error
            return
        with contextlib.suppress(OSError):
            sock.sendto(data, peer)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bulkhead.lab.responder")
    parser.add_argument("--name", default=socket.gethostname(), help="name put in TCP lines")
    parser.add_argument("--tcp", action="append", default=[], help="TCP port(s), e.g. 80,443")
    parser.add_argument("--udp", action="append", default=[], help="UDP port(s), e.g. 53")
    args = parser.parse_args(argv)
    try:
        tcp = _ports(args.tcp)
        udp = _ports(args.udp)
    except ValueError as exc:
        parser.error(str(exc))
    return serve(args.name, tcp, udp)


if __name__ == "__main__":
    sys.exit(main())
