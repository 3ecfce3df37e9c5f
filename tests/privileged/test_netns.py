"""Tests of the network-namespace lab harness itself (bulkhead.lab.netns)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from bulkhead.lab.netns import (
    NFT_CGROUP_BASE,
    HostSpec,
    NetnsError,
    NetnsLab,
    cgroup2_mount,
    privileged_available,
)

pytestmark = pytest.mark.privileged

LabFactory = Callable[..., NetnsLab]  # the `netns_lab` fixture of conftest.py

A = HostSpec("a", "10.99.0.11", "fd00:99::11")
B = HostSpec("b", "10.99.0.12", "fd00:99::12")
C = HostSpec("c", "10.99.0.13", "fd00:99::13")
B4, B6, C4, C6 = "10.99.0.12", "fd00:99::12", "10.99.0.13", "fd00:99::13"
SHORT = 0.4  # probe timeout where a "timeout" result is expected


def _netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in out.stdout.splitlines() if line.strip()}


def _gone(pid: int) -> bool:
    """True when pid no longer exists (or is only a zombie waiting for its reaper)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def _wait_gone(pid: int, timeout: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout
    while not _gone(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_privileged_available() -> None:
    assert privileged_available() is None


def test_tcp_udp_open_refused_v4_v6(netns_lab: LabFactory) -> None:
    lab = netns_lab([A, B, C])
    lab.serve("b", tcp=[80, 443], udp=[53])
    lab.serve("c", tcp=[22])
    probes = [
        (dst, proto, port)
        for dst in (B4, B6)
        for proto, port in (("tcp", 80), ("tcp", 443), ("udp", 53), ("tcp", 81), ("udp", 54))
    ] + [(C4, "tcp", 22), (C6, "tcp", 22), (C4, "tcp", 80)]
    expect = ["open", "open", "open", "refused", "refused"] * 2 + ["open", "open", "refused"]
    assert lab.probe("a", probes) == expect
    # The responder really answers from the right host, with its line.
    code = (
        "import socket,sys; s=socket.create_connection((sys.argv[1], 80), timeout=2);"
        "print(s.recv(100).decode(), end='')"
    )
    for dst in (B4, B6):
        out = lab.run("a", [sys.executable, "-c", code, dst]).stdout
        assert out == "b tcp 80\n"
    # Many closed UDP ports at once: all refused (ICMP error rate limiting is off).
    closed = [(B4, "udp", 40000 + i) for i in range(40)] + [
        (B6, "udp", 41000 + i) for i in range(40)
    ]
    assert set(lab.probe("a", closed)) == {"refused"}


def test_nft_drop_gives_timeout_reject_gives_refused(netns_lab: LabFactory) -> None:
    lab = netns_lab([A, B])
    lab.serve("b", tcp=[80, 443], udp=[53, 54])
    lab.nft(
        "b",
        """
        table inet filt {
          chain input {
            type filter hook input priority 0; policy accept;
            tcp dport 80 drop
            udp dport 53 drop
            tcp dport 443 reject with tcp reset
            udp dport 54 reject
          }
        }
        """,
    )
    probes = [(dst, p, n) for dst in (B4, B6) for p, n in (("tcp", 80), ("udp", 53))] * 5
    probes += [(dst, p, n) for dst in (B4, B6) for p, n in (("tcp", 443), ("udp", 54))]
    t0 = time.monotonic()
    results = lab.probe("a", probes, timeout=SHORT)
    elapsed = time.monotonic() - t0
    assert results == ["timeout"] * 20 + ["refused"] * 4
    # 20 timeouts cost about one timeout, not twenty: the probes ran concurrently.
    assert elapsed < SHORT + 1.0, elapsed


def test_nft_errors_raise_with_stderr(netns_lab: LabFactory) -> None:
    lab = netns_lab([A])
    with pytest.raises(NetnsError) as info:
        lab.nft("a", "table inet t { chain c { this is not nft } }")
    assert "Error" in info.value.stderr
    assert "Error" in str(info.value)


def test_icmp_echo_v4_v6(netns_lab: LabFactory) -> None:
    lab = netns_lab([A, B, C])
    assert lab.probe("a", [(B4, "icmp", 0), (B6, "icmpv6", 0), (C4, "icmp", 0)]) == ["open"] * 3
    lab.nft(
        "b",
        """
        table inet filt {
          chain input {
            type filter hook input priority 0; policy accept;
            icmp type echo-request drop
            icmpv6 type echo-request drop
          }
        }
        """,
    )
    lab.nft(
        "c",
        """
        table inet filt {
          chain input {
            type filter hook input priority 0; policy accept;
            icmp type echo-request reject
            icmpv6 type echo-request reject
          }
        }
        """,
    )
    probes = [(B4, "icmp", 0), (B6, "icmpv6", 0), (C4, "icmp", 0), (C6, "icmpv6", 0)]
    assert lab.probe("a", probes, timeout=SHORT) == ["timeout", "timeout", "refused", "refused"]


def test_socket_cgroupv2_matches_only_the_cgroup_bound_socket(netns_lab: LabFactory) -> None:
    if cgroup2_mount() is None:
        pytest.skip("no cgroup2 file system mounted")
    lab = netns_lab([A, B])
    lab.serve("b", tcp=[5001], cgroup="svc")  # in <cgroup2>/<prefix>/svc
    lab.serve("b", tcp=[5002])  # same namespace, not in that cgroup
    path, level = lab.cgroup_path("svc"), lab.cgroup_level("svc")
    # The path is what nft resolves: relative to /sys/fs/cgroup, naming our directory.
    assert os.path.samefile(os.path.join(NFT_CGROUP_BASE, path), lab.cgroup_dir("svc"))
    assert path.endswith(f"{lab.prefix}/svc")
    assert level == 2
    members = Path(lab.cgroup_dir("svc"), "cgroup.procs").read_text().split()
    assert members == [str(lab.pids[0])]
    lab.nft(
        "b",
        f"""
        table inet filt {{
          chain input {{
            type filter hook input priority 0; policy drop;
            ct state established,related accept
            icmpv6 type {{ nd-neighbor-solicit, nd-neighbor-advert }} accept  # else no v6 at all
            socket cgroupv2 level {level} "{path}" tcp dport {{ 5001, 5002 }} accept
          }}
        }}
        """,
    )
    probes = [(B4, "tcp", 5001), (B6, "tcp", 5001), (B4, "tcp", 5002), (B6, "tcp", 5002)]
    assert lab.probe("a", probes, timeout=SHORT) == ["open", "open", "timeout", "timeout"]


def test_iptables_and_ipset_restore(netns_lab: LabFactory) -> None:
    lab = netns_lab([A, B, C])
    lab.serve("b", tcp=[80])
    lab.ipset_restore(
        "b",
        "create allow4 hash:ip family inet\nadd allow4 10.99.0.11\n"
        "create allow6 hash:ip family inet6\nadd allow6 fd00:99::11\n",
    )
    rules = (
        "*filter\n:INPUT DROP [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n"
        "-A INPUT -i lo -j ACCEPT\n"
        "-A INPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT\n"
        "-A INPUT -p {icmp} -j ACCEPT\n"
        "-A INPUT -p tcp --dport 80 -m set --match-set {set} src -j ACCEPT\n"
        "COMMIT\n"
    )
    lab.iptables_restore(
        "b",
        rules.format(icmp="icmp", set="allow4"),
        rules.format(icmp="ipv6-icmp", set="allow6"),
    )
    both = [(B4, "tcp", 80), (B6, "tcp", 80)]
    assert lab.probe("a", both, timeout=SHORT) == ["open", "open"]
    assert lab.probe("c", both, timeout=SHORT) == ["timeout", "timeout"]


def test_parallel_labs_are_isolated(netns_lab: LabFactory) -> None:
    one = netns_lab([A, B])
    two = netns_lab([A, B])  # same names and addresses, other prefix
    assert one.prefix != two.prefix
    one.serve("b", tcp=[80])
    assert one.probe("a", [(B4, "tcp", 80)]) == ["open"]
    assert two.probe("a", [(B4, "tcp", 80)]) == ["refused"]


def test_serve_failure_is_reported(netns_lab: LabFactory) -> None:
    lab = netns_lab([A])
    lab.serve("a", tcp=[80])
    with pytest.raises(NetnsError, match="did not start"):
        lab.serve("a", tcp=[80])  # already bound
    assert len(lab.pids) == 1
    with pytest.raises(NetnsError, match="failed"):
        lab.run("a", ["sh", "-c", "exit 3"])
    assert lab.run("a", ["sh", "-c", "exit 3"], check=False).returncode == 3
    with pytest.raises(KeyError):
        lab.run("nope", ["true"])


def test_down_removes_everything_and_is_idempotent() -> None:
    lab = NetnsLab([A, B])
    with lab:
        names = {lab.ns_name("a"), lab.ns_name("b")}
        assert names <= _netns_names()
        lab.serve("a", tcp=[80], cgroup="svc")
        lab.serve("b", udp=[53])
        cgroup_dir = Path(lab.cgroup_dir("svc"))
        pids = list(lab.pids)
        # A stray background process the lab did not start itself.
        stray = int(lab.run("b", ["sh", "-c", "sleep 60 >/dev/null 2>&1 & echo $!"]).stdout)
        pids.append(stray)
        assert all(not _gone(pid) for pid in pids)
    assert not {n for n in _netns_names() if n.startswith(lab.prefix)}
    assert all(_wait_gone(pid) for pid in pids)
    assert not cgroup_dir.exists()
    assert not cgroup_dir.parent.exists()  # <cgroup2>/<prefix>
    assert lab.pids == ()
    lab.down()  # twice: nothing left, nothing raised
    lab.down()
