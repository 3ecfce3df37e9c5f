"""Network-namespace lab: a few hosts on one machine, real packets between them.

Theory of operation
-------------------
`NetnsLab.up()` builds, with plain `ip` commands (run as root):

* one network namespace per `HostSpec` (``/var/run/netns/<prefix>-<name>``) and one
  "switch" namespace (``<prefix>--sw``) holding a bridge ``br0`` (STP and multicast
  snooping off, forward delay 0, so ports forward at once);
* one veth pair per host: ``p<i>`` on the switch side (enslaved to ``br0``), ``eth0`` on the
  host side carrying the host's IPv4 / IPv6 address. Before the veth exists, the host
  namespace gets ``accept_dad=0`` (addresses usable at once, link-local included; global v6
  addresses are also added ``nodad``) and ICMP error rate limiting off (so a matrix of
  closed UDP ports yields "refused" everywhere instead of a few refused and then timeouts);
* it then polls ``ip -j addr`` until every ``eth0`` is UP with no tentative address.

Every name is under a per-lab prefix (default ``bht<6 hex>``), so parallel runs never
collide; interface names only need to be unique per namespace, so they are fixed.
Everything else is a process entered into a namespace with ``nsenter --net=<path>`` - not
``ip netns exec``, which also unshares the mount namespace and remounts /sys (hiding the
cgroup tree). Only the network namespace changes: the file system, /sys/fs/cgroup and the
cgroup of the caller stay the host's.

* `serve()` starts `responder.py` (stdlib only, run by path with ``python -I``) in its own
  process group, optionally first moved into a cgroup v2 directory the lab creates under
  ``<cgroup2 mount>/<prefix>/<name>``; it returns when the responder printed ``READY``.
* `probe()` runs `probe.py` in the source namespace with the probes as JSON on stdin; it
  runs all of them concurrently, so a matrix costs about one timeout.
* `nft()`, `iptables_restore()`, `ipset_restore()` load rules in a host namespace.
* `down()` SIGTERMs (then SIGKILLs) the process groups it started, kills whatever else still
  runs in its namespaces (``ip netns pids``) or cgroups (``cgroup.kill``), removes the
  cgroups and deletes the namespaces (which destroys the veths and the bridge). It is
  idempotent and ignores what is already gone.

A new namespace has no conntrack entries until some rule there uses conntrack (ct state,
ct helper, NAT...): conntrack is instantiated per namespace on first use.

`NetnsLab` is not thread-safe; use one lab per thread or lock around it.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import ipaddress
import json
import os
import re
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = [
    "HostSpec",
    "NetnsError",
    "NetnsLab",
    "cgroup2_mount",
    "privileged_available",
]

NETNS_DIR = "/var/run/netns"
# nft resolves `socket cgroupv2 level N "<path>"` relative to this directory (hard-coded in
# nftables userspace), whatever the cgroup2 mount point is. See NetnsLab.cgroup_path().
NFT_CGROUP_BASE = "/sys/fs/cgroup"

_HERE = Path(__file__).resolve().parent
_RESPONDER = _HERE / "responder.py"
_PROBE = _HERE / "probe.py"

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,39}$")
_PREFIX_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,23}$")
_PROTOS = ("tcp", "udp", "icmp", "icmpv6")
_RESULTS = ("open", "refused", "timeout")
_SBIN = ("/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/local/bin", "/usr/bin", "/bin")


class NetnsError(RuntimeError):
    """A lab operation failed; `stderr` holds the failing tool's stderr when there is one."""

    def __init__(self, message: str, *, stderr: str = "") -> None:
        super().__init__(message)
        self.stderr = stderr


@dataclass(frozen=True)
class HostSpec:
    name: str  # short logical name, e.g. "web-1"
    ipv4: str | None = None  # e.g. "10.99.0.11" (prefix length taken from the lab's v4 network)
    ipv6: str | None = None  # e.g. "fd00:99::11"


# --------------------------------------------------------------------------- helpers


def _env() -> dict[str, str]:
    """Our environment with the sbin directories on PATH (ip, nft... live there)."""
    env = dict(os.environ)
    parts = [p for p in env.get("PATH", "").split(os.pathsep) if p]
    env["PATH"] = os.pathsep.join(parts + [p for p in _SBIN if p not in parts])
    return env


def _which(tool: str) -> str | None:
    return shutil.which(tool, path=_env()["PATH"])


def _cmd(
    argv: Sequence[str], *, input: str | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """Run argv in our own namespaces; never raises for a non-zero exit status."""
    try:
        return subprocess.run(
            list(argv),
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=_env(),
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NetnsError(f"{' '.join(argv)}: {exc}") from exc


def _check(argv: Sequence[str], *, input: str | None = None) -> str:
    cp = _cmd(argv, input=input)
    if cp.returncode != 0:
        raise NetnsError(
            f"{' '.join(argv)} failed ({cp.returncode}): {cp.stderr.strip()}", stderr=cp.stderr
        )
    return cp.stdout


def _unescape_mountinfo(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _cgroup2_mount_info() -> tuple[str, str] | None:
    """(mount point, root inside the hierarchy) of the first cgroup2 mount, from mountinfo."""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields, tail = left.split(), right.split()
        if len(fields) >= 5 and tail and tail[0] == "cgroup2":
            return _unescape_mountinfo(fields[4]), _unescape_mountinfo(fields[3])
    return None


def cgroup2_mount() -> str | None:
    """The cgroup v2 mount point (``/sys/fs/cgroup``, ``/sys/fs/cgroup/unified``...) or None."""
    info = _cgroup2_mount_info()
    return info[0] if info else None


def privileged_available() -> str | None:
    """None when the lab can run here, else the reason it cannot.

    Checks root, `ip`, `nft` and `nsenter`, then really creates a throwaway namespace, runs
    `nft list ruleset` inside it through nsenter, and deletes it.
    """
    if not sys.platform.startswith("linux"):
        return f"network namespaces need Linux (this is {sys.platform})"
    if os.geteuid() != 0:
        return "needs root (network namespaces, nftables)"
    for tool in ("ip", "nft", "nsenter"):
        if _which(tool) is None:
            return f"{tool!r} not found on PATH"
    name = f"bhtcheck{secrets.token_hex(4)}"
    try:
        cp = _cmd(["ip", "netns", "add", name], timeout=10)
        if cp.returncode != 0:
            return f"cannot create a network namespace: {cp.stderr.strip()}"
        cp = _cmd(["nsenter", f"--net={NETNS_DIR}/{name}", "nft", "list", "ruleset"], timeout=10)
        if cp.returncode != 0:
            return f"cannot run nft inside a network namespace: {cp.stderr.strip()}"
    except NetnsError as exc:
        return str(exc)
    finally:
        with contextlib.suppress(NetnsError):
            _cmd(["ip", "netns", "del", name], timeout=10)
    return None


def _kill_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


# --------------------------------------------------------------------------- the lab

# Labs that are up, so an interpreter exiting without down() does not leak namespaces.
_LIVE: set[NetnsLab] = set()


@atexit.register
def _down_forgotten_labs() -> None:
    for lab in list(_LIVE):
        with contextlib.suppress(Exception):
            lab.down()


class NetnsLab:
    """Hosts in network namespaces on one bridge. See the module docstring."""

    def __init__(
        self,
        hosts: Sequence[HostSpec],
        *,
        v4_net: str = "10.99.0.0/24",
        v6_net: str = "fd00:99::/64",
        prefix: str | None = None,
    ) -> None:
        self.v4_net = ipaddress.IPv4Network(v4_net)
        self.v6_net = ipaddress.IPv6Network(v6_net)
        self.prefix = prefix if prefix is not None else f"bht{secrets.token_hex(3)}"
        if not _PREFIX_RE.match(self.prefix):
            raise ValueError(f"bad lab prefix {self.prefix!r}: want [A-Za-z0-9_.-], <= 24 chars")
        self._hosts: dict[str, HostSpec] = {}
        seen: set[ipaddress.IPv4Address | ipaddress.IPv6Address] = set()
        for spec in hosts:
            if not _NAME_RE.match(spec.name):
                raise ValueError(f"bad host name {spec.name!r}: want [A-Za-z0-9_.-], <= 40 chars")
            if spec.name in self._hosts:
                raise ValueError(f"duplicate host name {spec.name!r}")
            for addr, net in ((spec.ipv4, self.v4_net), (spec.ipv6, self.v6_net)):
                if addr is None:
                    continue
                ip = ipaddress.ip_address(addr)
                if ip.version != net.version or ip not in net:
                    raise ValueError(f"{spec.name}: address {addr} is not in {net}")
                if (
                    net.version == 4
                    and net.prefixlen < 31
                    and ip
                    in (
                        net.network_address,
                        net.broadcast_address,
                    )
                ):
                    raise ValueError(f"{spec.name}: {addr} is the network/broadcast address")
                if ip in seen:
                    raise ValueError(f"{spec.name}: address {addr} used twice")
                seen.add(ip)
            self._hosts[spec.name] = spec
        self._switch = f"{self.prefix}--sw"  # host names cannot start with "-": no clash
        self._up = False
        self._namespaces: list[str] = []  # created (or being created) by us
        self._procs: list[subprocess.Popen[bytes]] = []
        self._cgroup_base: Path | None = None  # <cgroup2 mount>/<prefix>, when we made it
        self._cgroups: dict[str, Path] = {}

    # ---------------------------------------------------------------- introspection

    @property
    def hosts(self) -> tuple[HostSpec, ...]:
        return tuple(self._hosts.values())

    @property
    def pids(self) -> tuple[int, ...]:
        """Pids of the responders started by `serve()` and not yet stopped."""
        return tuple(p.pid for p in self._procs)

    def detach(self) -> None:
        """Keep the lab running after this process exits (no teardown at exit).

        Whoever detaches takes over teardown (e.g. `bulkhead.lab.runner.teardown`, which
        finds everything by the lab prefix).
        """
        _LIVE.discard(self)

    def ns_name(self, host: str) -> str:
        """Name of the host's namespace as `ip netns list` shows it."""
        if host not in self._hosts:
            known = ", ".join(self._hosts) or "none"
            raise KeyError(f"unknown lab host {host!r} (known: {known})")
        return f"{self.prefix}-{host}"

    def netns_path(self, host: str) -> str:
        return f"{NETNS_DIR}/{self.ns_name(host)}"

    # ---------------------------------------------------------------- lifecycle

    def __enter__(self) -> NetnsLab:
        self.up()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.down()

    def up(self) -> None:
        if self._up:
            return
        self._up = True
        _LIVE.add(self)
        try:
            self._create_namespaces()
            self._wire()
            self._wait_ready()
        except BaseException:
            with contextlib.suppress(Exception):
                self.down()
            raise

    def _create_namespaces(self) -> None:
        names = [self._switch, *(self.ns_name(h) for h in self._hosts)]
        taken = [n for n in names if os.path.exists(f"{NETNS_DIR}/{n}")]
        if taken:
            raise NetnsError(
                f"network namespace(s) {', '.join(taken)} already exist: another lab with "
                f"prefix {self.prefix!r}? (remove stale ones with `ip netns del <name>`)"
            )
        self._namespaces.extend(names)  # before creating: down() skips the missing ones
        _check(["ip", "-batch", "-"], input="".join(f"netns add {n}\n" for n in names))

        def sysctls(ns: str, settings: dict[str, str], optional: dict[str, str]) -> None:
            # Written in the namespace through /proc/sys (per netns by the opener's netns).
            script = ["set -e"]
            script += [f"echo {v} > /proc/sys/{k}" for k, v in settings.items()]
            script += [f"echo {v} > /proc/sys/{k} 2>/dev/null || true" for k, v in optional.items()]
            _check(["nsenter", f"--net={NETNS_DIR}/{ns}", "sh", "-c", "\n".join(script)])

        has_v6 = os.path.isdir("/proc/sys/net/ipv6")
        v6_off = {"net/ipv6/conf/all/disable_ipv6": "1", "net/ipv6/conf/default/disable_ipv6": "1"}
        # The switch only bridges frames: no addresses, no IPv6 chatter of its own.
        sysctls(self._switch, {}, v6_off if has_v6 else {})
        host_settings: dict[str, str] = {}
        if has_v6:
            host_settings = {
                "net/ipv6/conf/all/accept_dad": "0",
                "net/ipv6/conf/default/accept_dad": "0",
            }
        optional = {
            "net/ipv4/icmp_ratemask": "0",  # no ICMP error rate limit (per-peer or global)
            "net/ipv4/icmp_ratelimit": "0",
        }
        if has_v6:
            optional |= {"net/ipv6/icmp/ratemask": "0", "net/ipv6/icmp/ratelimit": "0"}
        for host in self._hosts:
            sysctls(self.ns_name(host), host_settings, optional)

    def _wire(self) -> None:
        lines = [
            "link set lo up",
            "link add br0 type bridge forward_delay 0 stp_state 0 mcast_snooping 0",
            "link set br0 up",
        ]
        for i, host in enumerate(self._hosts):
            # Created from the switch side with the peer born inside the host namespace,
            # so eth0 picks up that namespace's defaults (accept_dad=0) on creation.
            lines += [
                f"link add p{i} type veth peer name eth0 netns {self.ns_name(host)}",
                f"link set p{i} master br0",
                f"link set p{i} up",
            ]
        _check(["ip", "-n", self._switch, "-batch", "-"], input="\n".join(lines) + "\n")
        for host, spec in self._hosts.items():
            lines = ["link set lo up"]
            if spec.ipv4:
                lines.append(f"addr add {spec.ipv4}/{self.v4_net.prefixlen} dev eth0")
            if spec.ipv6:
                lines.append(f"addr add {spec.ipv6}/{self.v6_net.prefixlen} dev eth0 nodad")
            lines.append("link set eth0 up")
            _check(["ip", "-n", self.ns_name(host), "-batch", "-"], input="\n".join(lines) + "\n")

    def _wait_ready(self, timeout: float = 10.0) -> None:
        """Until every eth0 is UP, holds its addresses and none is tentative."""
        deadline = time.monotonic() + timeout
        pending = list(self._hosts)
        while True:
            problems: dict[str, str] = {}
            for host in pending:
                out = _check(["ip", "-n", self.ns_name(host), "-j", "addr", "show", "dev", "eth0"])
                problem = self._link_problem(self._hosts[host], json.loads(out or "[]"))
                if problem:
                    problems[host] = problem
            if not problems:
                return
            if time.monotonic() > deadline:
                detail = "; ".join(f"{h}: {p}" for h, p in problems.items())
                raise NetnsError(f"lab links not ready after {timeout:.0f}s: {detail}")
            pending = list(problems)
            time.sleep(0.02)

    @staticmethod
    def _link_problem(spec: HostSpec, links: list[dict[str, Any]]) -> str | None:
        if not links:
            return "eth0 missing"
        link = links[0]
        if link.get("operstate") != "UP":
            return f"eth0 is {link.get('operstate')}"
        infos = link.get("addr_info", [])
        have = {ipaddress.ip_address(a["local"]) for a in infos if "local" in a}
        for want in (spec.ipv4, spec.ipv6):
            if want and ipaddress.ip_address(want) not in have:
                return f"{want} missing"
        for a in infos:
            if a.get("tentative") or a.get("dadfailed"):
                return f"{a.get('local')} tentative/dadfailed"
        return None

    def down(self) -> None:
        errors: list[str] = []
        # 1. Our responders: SIGTERM every group, then wait, SIGKILL the slow ones.
        procs, self._procs = self._procs, []
        for proc in procs:
            if proc.poll() is None:
                _kill_group(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 2.0
        for proc in procs:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _kill_group(proc.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(2.0)
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()
        # 2. Anything else still living in our namespaces (started with run(...) + "&"...).
        for ns in self._namespaces:
            if not os.path.exists(f"{NETNS_DIR}/{ns}"):
                continue
            with contextlib.suppress(NetnsError):
                cp = _cmd(["ip", "netns", "pids", ns], timeout=10)
                for pid in cp.stdout.split():
                    if pid.isdigit() and int(pid) != os.getpid():
                        with contextlib.suppress(ProcessLookupError, PermissionError):
                            os.kill(int(pid), signal.SIGKILL)
        # 3. Our cgroups (leaves first), killing whatever is left in them.
        for name, path in reversed(list(self._cgroups.items())):
            problem = _remove_cgroup(path)
            if problem:
                errors.append(f"cgroup {name}: {problem}")
        self._cgroups.clear()
        if self._cgroup_base is not None:
            problem = _remove_cgroup(self._cgroup_base)
            if problem:
                errors.append(f"cgroup {self._cgroup_base}: {problem}")
            self._cgroup_base = None
        # 4. The namespaces; deleting them destroys the veths and the bridge.
        present = [ns for ns in self._namespaces if os.path.exists(f"{NETNS_DIR}/{ns}")]
        for ns in present:
            cp = _cmd(["ip", "netns", "del", ns], timeout=10)
            if cp.returncode != 0 and os.path.exists(f"{NETNS_DIR}/{ns}"):
                errors.append(f"ip netns del {ns}: {cp.stderr.strip()}")
        self._namespaces.clear()
        self._up = False
        _LIVE.discard(self)
        if errors:
            raise NetnsError("lab teardown incomplete: " + "; ".join(errors))

    # ---------------------------------------------------------------- running things

    def _ns_argv(self, host: str, argv: Sequence[str]) -> list[str]:
        if isinstance(argv, str):
            raise TypeError("argv must be a sequence of strings, not a string")
        return ["nsenter", f"--net={self.netns_path(host)}", "--", *argv]

    def run(
        self,
        host: str,
        argv: Sequence[str],
        *,
        input: str | None = None,
        check: bool = True,
        timeout: float = 30,
    ) -> subprocess.CompletedProcess[str]:
        """Run argv in the host's network namespace (and nothing else changed).

        The command runs in its own process group; on timeout the whole group is killed and
        NetnsError raised. With check=True a non-zero exit status raises NetnsError too.
        """
        cmd = self._ns_argv(host, argv)
        try:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=_env(),
                start_new_session=True,
            )
        except OSError as exc:
            raise NetnsError(f"{host}: cannot start {' '.join(argv)}: {exc}") from exc
        try:
            out, err = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            raise NetnsError(
                f"{host}: {' '.join(argv)} timed out after {timeout}s", stderr=err
            ) from None
        except BaseException:
            _kill_group(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
        cp = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
        if check and cp.returncode != 0:
            raise NetnsError(
                f"{host}: {' '.join(argv)} failed ({cp.returncode}): {err.strip()}", stderr=err
            )
        return cp

    def serve(
        self,
        host: str,
        *,
        tcp: Iterable[int] = (),
        udp: Iterable[int] = (),
        cgroup: str | None = None,
        executable: str | None = None,
    ) -> None:
        """Start a responder in the host namespace; return once its sockets are bound.

        TCP ports answer one line (``"<host> tcp <port>\\n"``) and close; UDP ports echo.
        With `cgroup`, the responder is moved into the lab cgroup of that name (created if
        needed) *before* it execs, hence before it opens any socket - a socket belongs to
        the cgroup of the process that created it, for good. `executable` replaces the
        Python interpreter (e.g. a copy of it named ``mysqld``, so /proc/PID/exe says so).
        """
        tcp_ports, udp_ports = sorted(set(tcp)), sorted(set(udp))
        if not tcp_ports and not udp_ports:
            raise ValueError("serve() needs at least one tcp or udp port")
        python = executable or sys.executable
        argv = [python, "-I", str(_RESPONDER), "--name", host]
        if tcp_ports:
            argv += ["--tcp", ",".join(map(str, tcp_ports))]
        if udp_ports:
            argv += ["--udp", ",".join(map(str, udp_ports))]
        cmd = self._ns_argv(host, argv)
        if cgroup is not None:
            procs = self._ensure_cgroup(cgroup) / "cgroup.procs"
            # sh moves itself, then execs nsenter which execs python: one pid throughout.
            cmd = ["sh", "-c", 'echo $$ > "$0" && exec "$@"', str(procs), *cmd]
        try:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=_env(),
                start_new_session=True,
            )
        except OSError as exc:
            raise NetnsError(f"{host}: cannot start responder: {exc}") from exc
        self._procs.append(proc)
        line = _read_line(proc, timeout=10.0)
        if not line.startswith("READY"):
            self._procs.remove(proc)
            _kill_group(proc.pid, signal.SIGKILL)
            proc.wait()
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            what = f"tcp={tcp_ports} udp={udp_ports}"
            raise NetnsError(
                f"{host}: responder ({what}) did not start: {err.strip() or line or 'no output'}",
                stderr=err,
            )

    # ---------------------------------------------------------------- cgroups

    def _ensure_cgroup(self, name: str) -> Path:
        parts = name.split("/")
        if not all(_NAME_RE.match(p) for p in parts):
            raise ValueError(
                f"bad cgroup name {name!r}: want [A-Za-z0-9_.-], <= 40 chars (per / part)"
            )
        if name in self._cgroups:
            return self._cgroups[name]
        if len(parts) > 1:  # nested ("web-1/mysql.service"): parents first, removed last
            self._ensure_cgroup("/".join(parts[:-1]))
        mount = cgroup2_mount()
        if mount is None:
            raise NetnsError("no cgroup2 file system mounted (see /proc/self/mountinfo)")
        base = Path(mount) / self.prefix
        if self._cgroup_base is None:
            try:
                base.mkdir()
            except FileExistsError:
                raise NetnsError(f"cgroup {base} already exists (stale lab?)") from None
            except OSError as exc:
                raise NetnsError(f"cannot create cgroup {base}: {exc}") from exc
            self._cgroup_base = base
        path = base / name
        try:
            path.mkdir(exist_ok=True)
        except OSError as exc:
            raise NetnsError(f"cannot create cgroup {path}: {exc}") from exc
        self._cgroups[name] = path
        return path

    # What nft needs (measured with nftables 1.0.6 on Linux 6.x, hybrid host whose cgroup2
    # is mounted at /sys/fs/cgroup/unified): nft turns `socket cgroupv2 level N "PATH"`
    # into a cgroup id by stat()ing "/sys/fs/cgroup/PATH" when the rule is LOADED, in its
    # own mount namespace (the host's: we only enter the net namespace). The kernel then
    # compares that id with the ancestor at depth N (root = 0) of the cgroup of the socket.
    # So PATH is relative to /sys/fs/cgroup, NOT to the cgroup2 mount, while N counts from
    # the cgroup2 root: here `level 2 "unified/bhtXXXXXX/svc"`; with cgroup2 at
    # /sys/fs/cgroup it is `level 2 "bhtXXXXXX/svc"`. Without "unified/" the load fails
    # ("cgroupv2 path fails: No such file or directory"); levels 1 and 3 match nothing.
    # The id is fixed at load time: the cgroup must exist before the rule is loaded, and
    # a re-created cgroup needs the rule reloaded.

    def cgroup_path(self, name: str) -> str:
        """The lab cgroup `name` as nft's ``socket cgroupv2 level N "<path>"`` wants it.

        Creates the cgroup if needed (nft resolves the path when the rule is loaded). Use
        it with ``level`` = `cgroup_level(name)`, e.g.::

            socket cgroupv2 level {lab.cgroup_level("db")} "{lab.cgroup_path("db")}" accept

        The path is relative to /sys/fs/cgroup, which nft hard-codes: ``"<prefix>/db"``
        when cgroup2 is mounted there, ``"unified/<prefix>/db"`` on a hybrid host.
        """
        path = self._ensure_cgroup(name)
        return os.path.relpath(path, NFT_CGROUP_BASE)

    def cgroup_level(self, name: str) -> int:
        """The ``level`` for `cgroup_path(name)`: its depth below the cgroup2 root.

        Our cgroups sit at ``<cgroup2 root>/<prefix>/<name>``, so this is 2 (plus one per
        ``/`` in a nested name, plus the depth of the mount's root when only a subtree of
        the hierarchy is mounted). Inside a
        cgroup namespace the kernel counts from the real root, which cannot be seen from
        here: the lab assumes it runs in the initial cgroup namespace.
        """
        self._ensure_cgroup(name)
        info = _cgroup2_mount_info()
        root = info[1] if info else "/"
        return len([p for p in root.split("/") if p]) + 2 + name.count("/")

    def cgroup_dir(self, name: str) -> str:
        """Absolute directory of the lab cgroup `name` (created if needed)."""
        return str(self._ensure_cgroup(name))

    # ---------------------------------------------------------------- probing & rules

    def probe(
        self, host: str, probes: Sequence[tuple[str, str, int]], *, timeout: float = 1.0
    ) -> list[str]:
        """(dst_ip, proto, port) -> "open" | "refused" | "timeout", run concurrently in host.

        proto is "tcp", "udp", "icmp" or "icmpv6" (the ICMP version follows dst's family;
        the port is ignored for ICMP). See `bulkhead.lab.probe` for the exact semantics.
        """
        if not probes:
            self.ns_name(host)  # still reject unknown hosts
            return []
        items = []
        for dst, proto, port in probes:
            if proto not in _PROTOS:
                raise ValueError(f"unknown probe protocol {proto!r} (want one of {_PROTOS})")
            items.append({"dst": str(dst), "proto": proto, "port": int(port)})
        argv = [sys.executable, "-I", str(_PROBE), "--timeout", repr(float(timeout))]
        cp = self.run(host, argv, input=json.dumps(items), timeout=timeout + 30)
        try:
            results = json.loads(cp.stdout)
        except ValueError as exc:
            raise NetnsError(f"{host}: probe printed no JSON: {cp.stdout!r}") from exc
        if (
            not isinstance(results, list)
            or len(results) != len(items)
            or not all(r in _RESULTS for r in results)
        ):
            raise NetnsError(f"{host}: unexpected probe output {cp.stdout!r}")
        return [str(r) for r in results]

    def nft(self, host: str, script: str) -> None:
        """`nft -f -` in the host namespace; NetnsError with nft's stderr on failure."""
        cp = self.run(host, ["nft", "-f", "-"], input=script, check=False)
        if cp.returncode != 0:
            raise NetnsError(f"{host}: nft failed:\n{cp.stderr.rstrip()}", stderr=cp.stderr)

    def iptables_restore(self, host: str, v4: str, v6: str | None = None) -> None:
        """iptables-restore (and ip6tables-restore when v6 is given) in the host namespace."""
        for tool, script in (("iptables-restore", v4), ("ip6tables-restore", v6)):
            if script is None:
                continue
            cp = self.run(host, [tool], input=script, check=False)
            if cp.returncode != 0:
                raise NetnsError(f"{host}: {tool} failed:\n{cp.stderr.rstrip()}", stderr=cp.stderr)

    def ipset_restore(self, host: str, script: str) -> None:
        """`ipset restore` in the host namespace (ipsets are per network namespace)."""
        cp = self.run(host, ["ipset", "restore"], input=script, check=False)
        if cp.returncode != 0:
            raise NetnsError(
                f"{host}: ipset restore failed:\n{cp.stderr.rstrip()}", stderr=cp.stderr
            )


def _read_line(proc: subprocess.Popen[bytes], timeout: float) -> str:
    """First stdout line of proc ("" on EOF or timeout), without blocking past timeout."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    buf = b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                return ""
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            buf += chunk
    return buf.split(b"\n", 1)[0].decode(errors="replace")


def _remove_cgroup(path: Path) -> str | None:
    """Kill what is in the cgroup, rmdir it; None when gone, else what went wrong."""
    procs = path / "cgroup.procs"
    deadline = time.monotonic() + 3.0
    last = ""
    while True:
        try:
            members = procs.read_text().split()
        except FileNotFoundError:
            return None  # already gone
        except OSError as exc:
            members = []
            last = str(exc)
        if members:
            kill = path / "cgroup.kill"
            if kill.exists():
                with contextlib.suppress(OSError):
                    kill.write_text("1")
            else:
                for pid in members:
                    with contextlib.suppress(ProcessLookupError, PermissionError, ValueError):
                        os.kill(int(pid), signal.SIGKILL)
        else:
            try:
                path.rmdir()
                return None
            except FileNotFoundError:
                return None
            except OSError as exc:
                if exc.errno not in (errno.EBUSY, errno.ENOTEMPTY):
                    return str(exc)
                last = str(exc)
        if time.monotonic() > deadline:
            return f"not removable: {last if not members else f'processes {members} remain'}"
        time.sleep(0.02)
