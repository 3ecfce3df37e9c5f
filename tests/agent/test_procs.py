"""Socket -> process attribution: pure parts, this process's own sockets, and a lab."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bulkhead.agent.netlink import NetlinkError
from bulkhead.agent.procs import (
    ProcessResolver,
    parse_cgroup,
    parse_diag,
    process_info,
    scan_socket_inodes,
    unit_from_cgroup,
)
from tests.agent._sensors import A4, A6, B4, B6, buffers, two_hosts

# -- pure --------------------------------------------------------------------------------------


def test_unit_from_cgroup() -> None:
    assert unit_from_cgroup("/system.slice/nginx.service") == "nginx.service"
    assert unit_from_cgroup("/system.slice/nginx.service/worker") == "nginx.service"
    assert unit_from_cgroup("/user.slice/user-1000.slice/session-2.scope") == "session-2.scope"
    assert unit_from_cgroup("/user.slice/user-1000.slice/user@1000.service/app.slice/"
                            "run-r1.scope") == "user@1000.service"
    assert unit_from_cgroup("/") is None
    assert unit_from_cgroup("/kubepods/burstable/pod1") is None
    assert unit_from_cgroup("/.service") is None


def test_parse_cgroup_v2_and_hybrid() -> None:
    assert parse_cgroup("0::/system.slice/sshd.service\n") == (
        "/system.slice/sshd.service", "sshd.service")
    hybrid = ("12:memory:/system.slice/cron.service\n1:name=systemd:/system.slice/cron.service\n"
              "0::/\n")
    assert parse_cgroup(hybrid) == ("/", "cron.service")
    assert parse_cgroup("4:memory:/x\n") == ("/x", None)
    assert parse_cgroup("") == ("", None)
    assert parse_cgroup("garbage\n0:\n") == ("", None)


def test_parse_captured_sock_diag_dump() -> None:
    socks = [s for buf in buffers("sockdiag_listen.hex") for s in parse_diag(buf, 0)]
    assert sorted((s.family, s.state, s.local_ip, s.local_port, s.v6only) for s in socks) == [
        (6, 7, "::", 53, False), (6, 10, "::", 80, False), (6, 10, "::", 82, False)]
    assert all(s.inode > 0 and s.remote_port == 0 for s in socks)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_sock_diag_parser_never_crashes(data: bytes) -> None:
    try:
        socks = parse_diag(data, 6)
    except NetlinkError:
        return
    assert all(s.family in (4, 6) and 0 <= s.local_port <= 65535 for s in socks)


def _fake_proc(root: Path, pid: int, *, exe: str, argv: list[str], cgroup: str,
               sockets: list[int]) -> None:
    d = root / str(pid)
    (d / "fd").mkdir(parents=True)
    (d / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
    (d / "cgroup").write_text(cgroup)
    (d / "comm").write_text(Path(exe).name[:15] + "\n")
    os.symlink(exe, d / "exe")
    for i, inode in enumerate(sockets):
        os.symlink(f"socket:[{inode}]", d / "fd" / str(i + 3))
    os.symlink("/dev/null", d / "fd" / "0")


def test_process_info_and_inode_scan_on_a_fake_proc(tmp_path: Path) -> None:
    _fake_proc(tmp_path, 40, exe="/usr/sbin/nginx (deleted)", argv=["nginx", "-g", "daemon off;"],
               cgroup="0::/system.slice/nginx.service\n", sockets=[900, 901])
    _fake_proc(tmp_path, 41, exe="/usr/sbin/nginx", argv=["nginx: worker"],
               cgroup="0::/system.slice/nginx.service\n", sockets=[901, 902])
    (tmp_path / "self").mkdir()
    assert scan_socket_inodes(str(tmp_path)) == {900: 40, 901: 40, 902: 41}  # lowest pid
    assert scan_socket_inodes(str(tmp_path), [41]) == {901: 41, 902: 41}
    info = process_info(40, str(tmp_path))
    assert info is not None
    assert (info.pid, info.exe, info.cmdline, info.unit, info.cgroup) == (
        40, "nginx", "nginx -g daemon off;", "nginx.service", "/system.slice/nginx.service")
    assert process_info(99, str(tmp_path)) is None


# -- this process's own sockets (no root needed: sock_diag and our own /proc) -----------------

def test_resolver_finds_this_process_on_loopback() -> None:
    server = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(server.getsockname())
    conn, _ = server.accept()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    try:
        with ProcessResolver(refresh_interval=0.0) as res:
            me = os.getpid()
            lport = server.getsockname()[1]
            c_ip, c_port = client.getsockname()
            out = res.lookup("tcp", c_ip, c_port, "127.0.0.1", lport)
            assert out is not None and out.pid == me
            assert out.exe == Path(os.readlink(f"/proc/{me}/exe")).name
            got = res.lookup(6, "127.0.0.1", lport, c_ip, c_port)
            assert got is not None and got.pid == me
            listener = res.listener("tcp", "127.0.0.1", lport)
            assert listener is not None and listener.pid == me
            uport = udp.getsockname()[1]
            assert (res.listener(17, "127.0.0.1", uport) or listener).pid == me
            udp_in = res.lookup("udp", "127.0.0.1", uport, "127.0.0.9", 5000)  # unconnected
            assert udp_in is not None and udp_in.pid == me
            # no such connection: the kernel's lookup falls back to the listener (the
            # serving process); on a port nobody listens on there is nothing
            assert res.lookup("tcp", "127.0.0.1", lport, "127.0.0.9", 1) == listener
            assert res.lookup("tcp", "127.0.0.1", c_port, "127.0.0.9", 1) is None
            assert res.lookup("sctp", "127.0.0.1", lport, c_ip, c_port) is None
            assert any(s.port == lport and s.proto == "tcp" and s.process
                       and s.process.pid == me for s in res.listening())
    finally:
        for s in (client, conn, server, udp):
            s.close()


def test_new_sockets_resolve_between_full_scans() -> None:
    """A busy process opening connection after connection: no full /proc scan per miss."""
    server = socket.create_server(("127.0.0.1", 0))
    clients: list[socket.socket] = []
    try:
        with ProcessResolver(refresh_interval=3600.0) as res:
            for _ in range(5):
                client = socket.create_connection(server.getsockname())
                clients.append(client)
                got = res.lookup("tcp", *client.getsockname(), *server.getsockname())
                assert got is not None and got.pid == os.getpid()
            assert res.scans == 1  # the first miss only; later ones scanned just this pid
    finally:
        for s in [server, *clients]:
            s.close()


# -- privileged: both ends of real connections in a lab ----------------------------------------

HOLD = """
import socket, sys
mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
if mode == "serve":
    s = socket.socket(socket.AF_INET6); s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind(("::", port)); s.listen(); print("READY", flush=True)
    conns = [s.accept()[0] for _ in range(int(sys.argv[4]))]
else:
    t = socket.create_connection((host, port))
    u = socket.socket(fam, socket.SOCK_DGRAM); u.connect((host, 53)); u.send(b"x"); u.recv(9)
    print(t.getsockname()[1], u.getsockname()[1], flush=True)
sys.stdin.read()
"""


@contextmanager
def _held(netns: str, exe: str, *args: str) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """A holder process in `netns`; yields it and its first stdout line; ends on exit."""
    proc = subprocess.Popen(["nsenter", f"--net={netns}", exe, "-I", "-c", HOLD, *args],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        yield proc, proc.stdout.readline().strip()
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.privileged
def test_both_ends_attributed_in_a_lab(tmp_path: Path) -> None:
    python = os.path.realpath(sys.executable)
    server_exe, client_exe = tmp_path / "bhserved", tmp_path / "bhclient"
    for exe in (server_exe, client_exe):
        shutil.copy(python, exe)
    with two_hosts() as lab:
        na, nb = lab.netns_path("a"), lab.netns_path("b")
        lab.serve("b", udp=[53], cgroup="echo.service")  # udp echo in a unit-like cgroup
        udp_pid = lab.pids[-1]
        with _held(nb, str(server_exe), "serve", "::", "8080", "2") as (srv, ready), \
                ProcessResolver(netns=na) as ra, ProcessResolver(netns=nb) as rb:
            assert ready == "READY"
            for dst, src in ((B4, A4), (B6, A6)):
                with _held(na, str(client_exe), "connect", dst, "8080") as (cli, ports):
                    tport, uport = map(int, ports.split())
                    client = ra.lookup("tcp", src, tport, dst, 8080)
                    assert client is not None and (client.pid, client.exe) == (cli.pid,
                                                                               "bhclient")
                    assert "connect" in client.cmdline
                    served = rb.lookup("tcp", dst, 8080, src, tport)
                    assert served is not None and (served.pid, served.exe) == (srv.pid,
                                                                               "bhserved")
                    listener = rb.listener("tcp", dst, 8080)  # `::` dual-stack listener
                    assert listener is not None and listener.pid == srv.pid
                    udp_client = ra.lookup("udp", src, uport, dst, 53)
                    assert udp_client is not None and udp_client.pid == cli.pid
                    udp_server = rb.lookup("udp", dst, 53, src, uport)
                    assert udp_server is not None and udp_server.pid == udp_pid
                    assert udp_server.unit == "echo.service"
                    assert udp_server.cgroup.endswith("/echo.service")
            listening = {(s.proto, s.port): s for s in rb.listening()}
            assert listening[("tcp", 8080)].addr == "::"
            proc = listening[("udp", 53)].process
            assert proc is not None and proc.unit == "echo.service"
        # the holder is gone: its connection and process resolve to nothing
        time.sleep(0.05)
        with ProcessResolver(netns=nb) as rb:
            assert rb.listener("tcp", B4, 8080) is None
