"""Socket -> process attribution: sock_diag (NETLINK_SOCK_DIAG) plus an inode -> pid cache.

sock_diag answers, per network namespace, which socket holds a connection and its inode (an
exact query per connection, or a dump of the listening sockets); `/proc/*/fd` links map
socket inodes to pids. That scan is the expensive part: it is cached and redone only on a
miss, at most once per `refresh_interval`. Never per event. Pure parts (`parse_diag`,
`unit_from_cgroup`, `parse_cgroup`) are separate from the I/O.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import socket
import struct
import time
from collections import Counter
from dataclasses import dataclass

from bulkhead.agent.netlink import (
    NLM_F_DUMP,
    NLM_F_REQUEST,
    NetlinkError,
    NetlinkSocket,
    iter_attrs,
    iter_messages,
    nlmsg,
)

__all__ = [
    "DiagSocket",
    "ListeningSocket",
    "ProcessInfo",
    "ProcessResolver",
    "parse_cgroup",
    "parse_diag",
    "unit_from_cgroup",
]

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
_TCP_ESTABLISHED, _TCP_CLOSE, _TCP_LISTEN, _TCP_TIME_WAIT = 1, 7, 10, 6
_INET_DIAG_SKV6ONLY = 11
_NOCOOKIE = 0xFFFFFFFF
_REQ = struct.Struct("=BBBBI")
_ID = struct.Struct(">HH16s16sII")  # sport, dport, src, dst, if (host order in fact), cookie
_MSG = struct.Struct("=BBBB")
_PORTS = struct.Struct(">HH")
_U32 = struct.Struct("=I")
_PROTOS = {6: 6, 17: 17, "tcp": 6, "udp": 17}
_NAMES = {6: "tcp", 17: "udp"}
_WILDCARD = {"0.0.0.0", "::"}
_RECENT_MAX_SOCKETS = 512  # above this, a process's fds are rescanned only on the slow tick


@dataclass(frozen=True)
class ProcessInfo:
    pid: int
    exe: str  # base name of the executable (else the command name)
    cmdline: str  # argv joined with spaces
    unit: str | None  # systemd unit from /proc/PID/cgroup, else None
    cgroup: str  # cgroup v2 path ("0::" line), else the first hierarchy's path


@dataclass(frozen=True)
class ListeningSocket:
    proto: str  # "tcp" | "udp"
    addr: str  # "0.0.0.0" / "::" for wildcard
    port: int
    process: ProcessInfo | None


@dataclass(frozen=True, slots=True)
class DiagSocket:
    """One socket as sock_diag reports it (local = this host's end)."""

    family: int  # 4 | 6
    proto: int
    state: int  # TCP state number; UDP: 1 connected, 7 unconnected
    local_ip: str
    local_port: int
    remote_ip: str
    remote_port: int
    inode: int
    v6only: bool | None  # IPv6 sockets only


def _ip(family: int, raw: bytes) -> str:
    if family == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, raw[:4])
    return socket.inet_ntop(socket.AF_INET6, raw)


def parse_diag(data: bytes | bytearray | memoryview, proto: int) -> list[DiagSocket]:
    """Sockets in a buffer of SOCK_DIAG_BY_FAMILY replies (inet_diag_msg + attributes).

    Raises only NetlinkError (malformed netlink header or error reply); skips short messages
    and families other than AF_INET/AF_INET6."""
    if not isinstance(data, bytes):
        data = bytes(data)
    out: list[DiagSocket] = []
    for mtype, _flags, _seq, start, end in iter_messages(data):
        if mtype != SOCK_DIAG_BY_FAMILY or end - start < 72:
            continue
        family, state = data[start], data[start + 1]
        if family not in (socket.AF_INET, socket.AF_INET6):
            continue
        sport, dport, src, dst, _if, _c0 = _ID.unpack_from(data, start + 4)
        (inode,) = _U32.unpack_from(data, start + 68)
        v6only: bool | None = None
        for atype, vs, ve in iter_attrs(data, start + 72, end):
            if atype == _INET_DIAG_SKV6ONLY and ve > vs:
                v6only = bool(data[vs])
        out.append(DiagSocket(4 if family == socket.AF_INET else 6, proto, state,
                              _ip(family, src), sport, _ip(family, dst), dport, inode, v6only))
    return out


def _sockid(family: int, lip: str, lport: int, rip: str, rport: int) -> bytes:
    af = socket.AF_INET if family == 4 else socket.AF_INET6
    src = socket.inet_pton(af, lip).ljust(16, b"\0")
    dst = socket.inet_pton(af, rip).ljust(16, b"\0")
    return _ID.pack(lport, rport, src, dst, 0, _NOCOOKIE) + _U32.pack(_NOCOOKIE)


def diag_request(family: int, proto: int, states: int, sockid: bytes | None, seq: int) -> bytes:
    """An inet_diag_req_v2: a dump (sockid None) or an exact lookup."""
    af = socket.AF_INET if family == 4 else socket.AF_INET6
    flags = NLM_F_REQUEST | (NLM_F_DUMP if sockid is None else 0)
    body = _REQ.pack(af, proto, 0, 0, states) + (sockid or b"\0" * 48)
    return nlmsg(SOCK_DIAG_BY_FAMILY, flags, seq, body)


# ------------------------------------------------------------------------------ /proc facts


def unit_from_cgroup(path: str) -> str | None:
    """The systemd unit a cgroup path lies in: the innermost `*.service`, else `*.scope`."""
    parts = [p for p in path.split("/") if p]
    for suffix in (".service", ".scope"):
        for part in reversed(parts):
            if part.endswith(suffix) and len(part) > len(suffix):
                return part
    return None


def parse_cgroup(text: str) -> tuple[str, str | None]:
    """(cgroup path, systemd unit) from the text of /proc/PID/cgroup.

    The path is the unified (v2, "0::") one when present, else the first line's. The unit
    comes from that path, else from the `name=systemd` hierarchy (hybrid hosts)."""
    unified = first = systemd = None
    for line in text.splitlines():
        hid, sep, rest = line.partition(":")
        controllers, sep2, path = rest.partition(":")
        if not sep or not sep2:
            continue
        if first is None:
            first = path
        if hid == "0" and controllers == "":
            unified = path
        elif controllers == "name=systemd":
            systemd = path
    path = unified if unified is not None else (first or "")
    unit = unit_from_cgroup(path)
    if unit is None and systemd is not None:
        unit = unit_from_cgroup(systemd)
    return path, unit


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def process_info(pid: int, proc: str = "/proc") -> ProcessInfo | None:
    """What /proc says about pid, or None when it is gone."""
    base = f"{proc}/{pid}"
    raw_cmd = _read(f"{base}/cmdline")
    if raw_cmd is None:
        return None
    cmdline = " ".join(p.decode("utf-8", "replace") for p in raw_cmd.split(b"\0") if p)
    try:
        exe = os.path.basename(os.readlink(f"{base}/exe")).removesuffix(" (deleted)")
    except OSError:
        comm = _read(f"{base}/comm")
        exe = comm.decode("utf-8", "replace").strip() if comm else ""
    cg = _read(f"{base}/cgroup")
    cgroup, unit = parse_cgroup(cg.decode("utf-8", "replace")) if cg else ("", None)
    return ProcessInfo(pid, exe, cmdline, unit, cgroup)


def _pids(proc: str) -> set[int]:
    try:
        return {int(d) for d in os.listdir(proc) if d.isdigit()}
    except OSError:
        return set()


def scan_socket_inodes(proc: str = "/proc", pids: list[int] | None = None) -> dict[int, int]:
    """inode -> pid for every socket open in every process, or in `pids` only (lowest pid
    wins when a socket is shared)."""
    out: dict[int, int] = {}
    pids = sorted(_pids(proc) if pids is None else pids, reverse=True)
    for pid in pids:  # descending, so the lowest pid is written last and wins
        fd_dir = f"{proc}/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"{fd_dir}/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                out[int(link[8:-1])] = pid
    return out


# ------------------------------------------------------------------------------ resolver


@functools.lru_cache(maxsize=4096)
def _norm(ip: str) -> tuple[int, str]:
    """(family, canonical text); IPv4-mapped IPv6 becomes IPv4."""
    addr = ipaddress.ip_address(ip)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return 4, str(addr.ipv4_mapped)
    return addr.version, str(addr)


class ProcessResolver:
    """Socket -> process for one network namespace; see the module docstring."""

    def __init__(
        self, *, netns: str | None = None, refresh_interval: float = 1.0, proc: str = "/proc"
    ) -> None:
        self.refresh_interval = refresh_interval
        self.proc = proc
        self._nl = NetlinkSocket(NETLINK_SOCK_DIAG, rcvbuf=4 << 20, netns=netns)
        self._inodes: dict[int, int] = {}
        self._scanned_at = self._hot_at = -1e18
        self._known_pids: set[int] = set()
        self._sockets_of: Counter[int] = Counter()  # pid -> sockets seen at its last scan
        self._recent: list[int] = []  # pids that owned the latest missed sockets
        self._listeners: list[DiagSocket] = []
        self._listeners_at = -1e18
        self._infos: dict[int, ProcessInfo] = {}
        self.scans = 0  # /proc scans done (observability and tests)

    def close(self) -> None:
        self._nl.close()

    def __enter__(self) -> ProcessResolver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- sock_diag

    def _query(
        self, family: int, proto: int, states: int, sockid: bytes | None
    ) -> list[DiagSocket]:
        msg = diag_request(family, proto, states, sockid, self._nl.next_seq())
        return parse_diag(b"".join(self._nl.request(msg)), proto)

    def _exact(self, proto: int, lip: str, lport: int, rip: str, rport: int) -> DiagSocket | None:
        fam_l, lip = _norm(lip)
        fam_r, rip = _norm(rip)
        if fam_l != fam_r:
            return None
        if proto == 17:
            # udp_dump_one looks the socket up as for a packet arriving from (src, sport)
            # to (dst, dport): the remote end goes in src.
            sockid = _sockid(fam_l, rip, rport, lip, lport)
        else:
            sockid = _sockid(fam_l, lip, lport, rip, rport)
        try:
            found = self._query(fam_l, proto, 0xFFFFFFFF, sockid)
        except NetlinkError:
            found = []  # ENOENT: no such socket
        if not found and fam_l == 4:
            # a dual-stack IPv6 socket may hold an IPv4 connection (v4-mapped addresses)
            m = f"::ffff:{lip}", f"::ffff:{rip}"
            sockid = (_sockid(6, m[1], rport, m[0], lport) if proto == 17
                      else _sockid(6, m[0], lport, m[1], rport))
            try:
                found = self._query(6, proto, 0xFFFFFFFF, sockid)
            except NetlinkError:
                found = []
        return next((s for s in found if s.inode), None)

    def _listening_sockets(self, force: bool = False) -> list[DiagSocket]:
        now = time.monotonic()
        if force or now - self._listeners_at >= self.refresh_interval:
            socks: list[DiagSocket] = []
            for family in (4, 6):
                socks += self._query(family, 6, 1 << _TCP_LISTEN, None)
                socks += [s for s in self._query(family, 17, 1 << _TCP_CLOSE, None)
                          if s.remote_port == 0]
            self._listeners, self._listeners_at = socks, now
        return self._listeners

    def _match_listener(self, proto: int, lip: str, lport: int) -> DiagSocket | None:
        family, lip = _norm(lip)
        best: DiagSocket | None = None
        for s in self._listening_sockets():
            if s.proto != proto or s.local_port != lport:
                continue
            sfam, sip = _norm(s.local_ip)
            if sip == lip and sfam == family:
                return s
            if s.local_ip in _WILDCARD and (
                s.family == family or (family == 4 and s.family == 6 and s.v6only is False)
            ):
                best = best or s
        return best

    # -- /proc

    def _pid_of(self, inode: int) -> int | None:
        pid = self._inodes.get(inode)
        if pid is not None:
            return pid
        now = time.monotonic()
        if now - self._scanned_at >= self.refresh_interval:
            self._known_pids = _pids(self.proc)
            self._inodes = scan_socket_inodes(self.proc, sorted(self._known_pids))
            self._sockets_of = Counter(self._inodes.values())
            self._infos.clear()  # pids may have been reused since the last scan
            self._scanned_at = self._hot_at = now
            self.scans += 1
        else:
            # Between full scans: processes started since the last look (a listdir of
            # /proc); the few that owned the last missed sockets, when they hold few
            # sockets (a busy client opening one connection after another); and, at most
            # every refresh_interval/20, every process already owning sockets.
            current = _pids(self.proc)
            pids = current - self._known_pids
            self._known_pids = current
            pids |= {p for p in self._recent
                     if p in current and self._sockets_of.get(p, 0) <= _RECENT_MAX_SOCKETS}
            if now - self._hot_at >= self.refresh_interval / 20:
                self._hot_at = now
                pids |= set(self._sockets_of) & current
            if pids:
                found = scan_socket_inodes(self.proc, sorted(pids))
                self._inodes.update(found)
                counts = Counter(found.values())
                for p in pids:
                    self._sockets_of[p] = counts.get(p, 0)
        pid = self._inodes.get(inode)
        if pid is not None:
            self._recent = [pid, *(p for p in self._recent if p != pid)][:4]
        return pid

    def _process(self, inode: int) -> ProcessInfo | None:
        pid = self._pid_of(inode)
        if pid is None:
            return None
        info = self._infos.get(pid)
        if info is None:
            info = process_info(pid, self.proc)
            if info is None:
                return None
            self._infos[pid] = info
        return info

    # -- public

    def lookup(
        self, proto: int | str, local_ip: str, local_port: int, remote_ip: str, remote_port: int
    ) -> ProcessInfo | None:
        """The process holding this exact connection. As in the kernel's own lookup, a
        socket listening on (or, for UDP, bound unconnected to) the local port also counts:
        the serving process of an inbound connection. None when there is no such socket or
        no process owns it any more."""
        p = _PROTOS.get(proto)
        if p is None:
            return None
        sock = self._exact(p, local_ip, local_port, remote_ip, remote_port)
        if sock is None and p == 17:
            sock = self._match_listener(p, local_ip, local_port)
        return self._process(sock.inode) if sock else None

    def listener(self, proto: int | str, local_ip: str, local_port: int) -> ProcessInfo | None:
        """The process serving (proto, local_ip, local_port); wildcard listeners match."""
        p = _PROTOS.get(proto)
        if p is None:
            return None
        sock = self._match_listener(p, local_ip, local_port)
        if sock is None and time.monotonic() - self._listeners_at > 0.05:
            self._listening_sockets(force=True)  # a listener newer than the cached table
            sock = self._match_listener(p, local_ip, local_port)
        return self._process(sock.inode) if sock else None

    def listening(self) -> list[ListeningSocket]:
        """Every TCP listener and unconnected bound UDP socket, with its process."""
        out = []
        for s in self._listening_sockets(force=True):
            out.append(ListeningSocket(_NAMES[s.proto], s.local_ip, s.local_port,
                                       self._process(s.inode) if s.inode else None))
        return out
