"""Shared netlink helpers: message/attribute walking (pure) and a thin socket base class.

Pure parts work on `bytes` with offsets (no copies): `iter_messages` splits a `recv` buffer
into netlink messages, `iter_attrs` walks the TLV attributes of one payload. The socket part
opens `AF_NETLINK` sockets, optionally inside another network namespace (`in_netns`): a
netlink socket belongs to the namespace it was created in, whatever the thread does later.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Generic, Self, TypeVar

__all__ = [
    "NLMSG_DONE",
    "NLMSG_ERROR",
    "NLM_F_ACK",
    "NLM_F_DUMP",
    "NLM_F_MULTI",
    "NLM_F_REQUEST",
    "NetlinkError",
    "NetlinkSocket",
    "attr",
    "in_netns",
    "iter_attrs",
    "iter_messages",
    "nlmsg",
]

NLMSG_NOOP, NLMSG_ERROR, NLMSG_DONE, NLMSG_OVERRUN = 1, 2, 3, 4
NLM_F_REQUEST, NLM_F_MULTI, NLM_F_ACK = 0x1, 0x2, 0x4
NLM_F_DUMP = 0x300  # NLM_F_ROOT | NLM_F_MATCH
NLA_TYPE_MASK = 0x3FFF  # strips NLA_F_NESTED and NLA_F_NET_BYTEORDER
NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid (host byte order)
_NLA = struct.Struct("=HH")  # len, type
_ERR = struct.Struct("=i")
SOL_NETLINK = 270
NETLINK_NO_ENOBUFS = 5
SO_RCVBUFFORCE = 33
CLONE_NEWNET = 0x40000000


class NetlinkError(OSError):
    """A malformed netlink header, or an error reply from the kernel (`errno` set).

    An OSError, so callers that handle socket failures handle this one too."""

    def __init__(self, message: str, errno_: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno_


def iter_messages(data: bytes) -> Iterator[tuple[int, int, int, int, int]]:
    """Yield (type, flags, seq, payload start, payload end) for each message in `data`.

    A header whose length is below 16 raises NetlinkError (the stream cannot be
    resynchronised). A truncated trailing message (shorter than its header says, or than a
    header) ends the walk quietly: the kernel never splits a message, so only a short read
    cuts one. Error replies with a non-zero errno raise NetlinkError; ACKs are skipped.
    """
    off, end = 0, len(data)
    while end - off >= 16:
        length, mtype, flags, seq, _pid = NLMSGHDR.unpack_from(data, off)
        if length < 16:
            raise NetlinkError(f"netlink message at byte {off}: length {length} < 16")
        if off + length > end:
            return
        stop = off + length
        if mtype == NLMSG_ERROR:
            if stop - off >= 20:
                (err,) = _ERR.unpack_from(data, off + 16)
                if err:
                    code = -err
                    raise NetlinkError(
                        f"netlink error reply: {os.strerror(code)} (errno {code})", code
                    )
        elif mtype == NLMSG_DONE:
            yield mtype, flags, seq, off + 16, stop
            return
        elif mtype not in (NLMSG_NOOP, NLMSG_OVERRUN):
            yield mtype, flags, seq, off + 16, stop
        off += (length + 3) & ~3


def iter_attrs(data: bytes, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """Yield (type, value start, value end) of the attributes in data[start:end].

    Stops quietly at a truncated or zero-length attribute (robust to garbage)."""
    off = start
    while end - off >= 4:
        alen, atype = _NLA.unpack_from(data, off)
        if alen < 4 or off + alen > end:
            return
        yield atype & NLA_TYPE_MASK, off + 4, off + alen
        off += (alen + 3) & ~3


def attr(atype: int, value: bytes) -> bytes:
    """Encode one attribute (with padding)."""
    raw = _NLA.pack(4 + len(value), atype) + value
    return raw + b"\0" * (-len(raw) % 4)


def nlmsg(mtype: int, flags: int, seq: int, payload: bytes) -> bytes:
    return NLMSGHDR.pack(16 + len(payload), mtype, flags, seq, 0) + payload


# ------------------------------------------------------------------------------ namespaces

_libc: ctypes.CDLL | None = None
_ns_lock = threading.Lock()


def _setns(fd: int) -> None:
    global _libc
    if hasattr(os, "setns"):  # Python >= 3.12
        os.setns(fd, CLONE_NEWNET)
        return
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"setns: {os.strerror(code)}")


@contextlib.contextmanager
def in_netns(path: str | None) -> Iterator[None]:
    """Run the body with the calling thread in the network namespace at `path` (None: stay).

    Sockets created inside stay in that namespace after the thread switches back. Needs root
    (CAP_SYS_ADMIN). Serialised by a lock so two threads never interleave switches."""
    if path is None:
        yield
        return
    with _ns_lock:
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        try:
            target = os.open(path, os.O_RDONLY)
            try:
                _setns(target)
            finally:
                os.close(target)
            try:
                yield
            finally:
                _setns(own)
        finally:
            os.close(own)


# ------------------------------------------------------------------------------ sockets


class NetlinkSocket:
    """An AF_NETLINK datagram socket of one protocol, optionally in another namespace."""

    def __init__(
        self,
        protocol: int,
        *,
        groups: int = 0,
        rcvbuf: int | None = None,
        netns: str | None = None,
        nonblocking: bool = False,
    ) -> None:
        with in_netns(netns):
            self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, protocol)
        try:
            if rcvbuf:
                try:  # root may exceed net.core.rmem_max
                    self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
                except OSError:
                    self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            self.sock.bind((0, groups))
            self.sock.setblocking(not nonblocking)
        except BaseException:
            self.sock.close()
            raise
        self.portid: int = self.sock.getsockname()[0]
        self._seq = 0
        self.overruns = 0
        self._buf = bytearray(1 << 16)
        self._view = memoryview(self._buf)

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()

    def next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        return self._seq

    def send(self, message: bytes) -> None:
        self.sock.sendto(message, (0, 0))

    def recv_available(self) -> list[bytes]:
        """Non-blocking drain of everything queued; ENOBUFS counts an overrun and goes on.

        Receives into one preallocated buffer (a fresh 64 KiB allocation per datagram would
        cost more than parsing it); netlink datagrams are at most 32 KiB."""
        out: list[bytes] = []
        buf, view = self._buf, self._view
        while True:
            try:
                n = self.sock.recv_into(buf, 0, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return out
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    self.overruns += 1
                    continue
                raise
            if not n:
                return out
            out.append(bytes(view[:n]))

    def request(self, message: bytes, *, timeout: float = 5.0) -> list[bytes]:
        """Send a request (dump or ACKed) and collect reply buffers up to DONE or the ACK.

        Raises NetlinkError on an error reply, TimeoutError when the kernel stays silent."""
        seq = NLMSGHDR.unpack_from(message, 0)[3]
        self.send(message)
        if self.sock.gettimeout() != timeout:
            self.sock.settimeout(timeout)
        out: list[bytes] = []
        while True:
            try:
                n = self.sock.recv_into(self._buf)
            except TimeoutError as exc:
                raise TimeoutError("netlink: no reply from the kernel") from exc
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    self.overruns += 1
                    continue
                raise
            data = bytes(self._view[:n])
            out.append(data)
            if _finished(data, seq):
                return out


def _finished(data: bytes, seq: int) -> bool:
    """True when `data` holds our DONE, our ACK/error, or a non-multipart reply to us."""
    off, end = 0, len(data)
    while end - off >= 16:
        length, mtype, flags, mseq, _ = NLMSGHDR.unpack_from(data, off)
        if length < 16:
            raise NetlinkError(f"netlink message at byte {off}: length {length} < 16")
        if mseq == seq and (mtype in (NLMSG_DONE, NLMSG_ERROR) or not flags & NLM_F_MULTI):
            if mtype == NLMSG_ERROR and end - off >= 20:
                (err,) = _ERR.unpack_from(data, off + 16)
                if err:
                    raise NetlinkError(
                        f"netlink error reply: {os.strerror(-err)} (errno {-err})", -err
                    )
            return True
        off += (length + 3) & ~3
    return False


T = TypeVar("T")


class Subscription(Generic[T]):
    """A non-blocking netlink socket delivering messages that `_parse` turns into records
    (conntrack events, NFLOG'd packets): drained with `read()`, selectable by `fileno()`."""

    _parse: Callable[[bytes], list[T]]

    def __init__(self, nl: NetlinkSocket) -> None:
        self._nl = nl

    @property
    def overruns(self) -> int:
        """ENOBUFS seen by `read()`: messages the kernel dropped because we were too slow."""
        return self._nl.overruns

    def fileno(self) -> int:
        return self._nl.fileno()

    def read(self) -> list[T]:
        """Every record queued now, without blocking ([] when none)."""
        out: list[T] = []
        for buf in self._nl.recv_available():
            out.extend(self._parse(buf))
        return out

    def read_raw(self) -> list[bytes]:
        """The queued buffers as received (for capture and benchmarks)."""
        return self._nl.recv_available()

    def close(self) -> None:
        self._nl.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
