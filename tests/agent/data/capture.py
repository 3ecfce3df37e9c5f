"""Re-capture the hex fixtures of this directory from the running kernel (as root).

    sudo .venv/bin/python tests/agent/data/capture.py

Builds the two-host lab of tests/agent/_sensors.py, sends TCP/UDP/ICMP v4 and v6 from a to
b (and to ports b's rules drop and log), and writes one recv() buffer per line, in hex:
ct_events.hex (events in a, then `conntrack -F`), ct_dump.hex (dump with counters),
nflog.hex (NFLOG group 7 in b), sockdiag_listen.hex (listeners in b).
"""

from __future__ import annotations

import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))  # the repository root, for tests.agent._sensors

from tests.agent._sensors import B4, B6, two_hosts  # noqa: E402

from bulkhead.agent import conntrack, nflog, procs  # noqa: E402

PROBES = [(B4, "tcp", 80), (B6, "tcp", 80), (B4, "udp", 53), (B6, "udp", 53), (B4, "icmp", 0),
          (B6, "icmpv6", 0), (B4, "tcp", 81), (B6, "udp", 54), (B4, "tcp", 82)]


def save(name: str, bufs: list[bytes], note: str) -> None:
    lines = [f"# {note}", f"# one recv() buffer per line, hex; captured from Linux "
             f"{platform.release()} by tests/agent/data/capture.py"]
    (HERE / name).write_text("\n".join(lines + [b.hex() for b in bufs]) + "\n")


def main() -> None:
    with two_hosts() as lab:
        na, nb = lab.netns_path("a"), lab.netns_path("b")
        assert conntrack.enable_accounting(na)
        lab.serve("b", tcp=[80, 82], udp=[53])
        groups = conntrack.NEW | conntrack.UPDATE | conntrack.DESTROY
        with conntrack.ConntrackSocket.events(groups, netns=na) as ct, \
                nflog.NflogSocket(7, netns=nb) as log:
            print(lab.probe("a", PROBES, timeout=0.3))
            time.sleep(0.1)
            dump = conntrack.ConntrackSocket.dump_raw(netns=na)
            subprocess.run(["nsenter", f"--net={na}", "conntrack", "-F"], check=True,
                           capture_output=True)
            time.sleep(0.1)
            save("ct_events.hex", ct.read_raw(), "conntrack NEW/UPDATE/DESTROY events in "
                 "host a: tcp/udp/icmp to b, v4 and v6, then `conntrack -F`")
            save("ct_dump.hex", dump, "conntrack dump (nf_conntrack_acct=1) in host a")
            save("nflog.hex", log.read_raw(), "NFLOG group 7 in host b: udp/54 bh:n:- (v6), "
                 "tcp/81 bh:d:3 (v4), tcp/82 bh:o:12 accept (v4)")
        with procs.ProcessResolver(netns=nb) as res:
            bufs: list[bytes] = []
            for fam in (4, 6):
                for proto, states in ((6, 1 << 10), (17, 1 << 7)):
                    msg = procs.diag_request(fam, proto, states, None, 1)
                    bufs += res._nl.request(msg)
        save("sockdiag_listen.hex", bufs, "sock_diag dumps of TCP listeners and unconnected "
             "UDP sockets in host b (v4, then v6); tcp 80,82 and udp 53 on `::`")


if __name__ == "__main__":
    main()
