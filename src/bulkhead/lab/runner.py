"""The running lab: build it from a topology, remember it in a state dir, probe, attack, tear down.

`Lab(state_dir)` is usable from any process: `up()` builds the hosts (`NetnsLab`), a gateway
link from this machine into the lab bridge, an "internet" host for `external:` addresses,
responders, a local control plane (unless given one), agents and traffic generators, writes
everything it started into ``state.json`` as it goes, and returns once every agent is online.
`status()`, `probe()`, `attack()` and `down()` work from another invocation by reading the
state dir. `down()` (and `up()`, first) removes everything by the lab's name prefix - derived
from the state dir, so it also works after a `lab up` killed with SIGKILL midway:

* processes recorded in the state file (pid + start time, so a recycled pid is left alone);
* whatever still runs in a namespace of the prefix (``ip netns pids``) or in the cgroup tree
  ``<cgroup2>/<prefix>`` (``cgroup.kill``; the local server runs in ``<prefix>/server``);
* the cgroups, the namespaces (which takes the veths and the bridge along), the gateway
  link ``<prefix>gw``, and the files the lab wrote in its state dir.

See docs/design/lab.md for the layout and docs/lab.md for the topology format.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from bulkhead.lab.netns import (
    NETNS_DIR,
    HostSpec,
    NetnsError,
    NetnsLab,
    _env,
    cgroup2_mount,
)
from bulkhead.lab.synth import schedules
from bulkhead.lab.topology import INTERNET_HOST, Topology, load_topology, loads_topology

__all__ = ["DEFAULT_STATE_DIR", "Lab", "LabError", "ProbeResult", "lab_prefix", "state_dir"]

DEFAULT_STATE_DIR = "/run/bulkhead-lab"
STATE_FILE = "state.json"
TOPOLOGY_FILE = "topology.yaml"
# Written first by `up`: only a state dir holding it (or the lab's state file) is the lab's,
# so `down` never deletes a user's own ``logs/`` or ``bin/`` in a directory it was pointed at.
MARKER_FILE = ".bulkhead-lab"
# What the lab writes in its state dir (down removes these, and the dir when then empty).
_OWNED = (STATE_FILE, TOPOLOGY_FILE, "bin", "server", "agents", "traffic", "logs")
_TRAFFIC = Path(__file__).resolve().parent / "traffic.py"
_BULKHEAD = "import sys; from bulkhead.cli.main import app; sys.argv[0] = 'bulkhead'; app()"
# Environment the local server must not inherit: the lab's server keeps embedded storage.
_SERVER_ENV_DROP = ("BULKHEAD_DATABASE_URL", "BULKHEAD_FLOWS_PATH", "BULKHEAD_DATA_DIR")

Progress = Callable[[str], None]


class LabError(RuntimeError):
    """A lab operation failed; the message says what and where."""


class UsageError(LabError):
    """Bad arguments (unknown host, port, attack) or no lab up: exit status 2 in the CLI."""


@dataclass(frozen=True)
class ProbeResult:
    source: str
    target: str  # as given (host name or address)
    ip: str
    port: str  # "tcp/22", "icmp"
    result: str  # "open" | "refused" | "timeout"

    @property
    def connected(self) -> bool:
        return self.result == "open"

    def as_dict(self) -> dict[str, Any]:
        return {"from": self.source, "to": self.target, "ip": self.ip, "port": self.port,
                "result": self.result}


def state_dir() -> Path:
    """`BULKHEAD_LAB_DIR`, else /run/bulkhead-lab."""
    return Path(os.environ.get("BULKHEAD_LAB_DIR") or DEFAULT_STATE_DIR)


def lab_prefix(directory: Path) -> str:
    """Name prefix of everything the lab of `directory` creates (namespaces, links, cgroups)."""
    digest = hashlib.sha256(str(directory.resolve()).encode()).hexdigest()
    return f"bhl{digest[:6]}"


def _start_time(pid: int) -> str | None:
    """Start time of pid (field 22 of /proc/PID/stat), to tell a recycled pid apart."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as fh:
            stat = fh.read()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[19]


def _run(argv: Sequence[str], *, input: str | None = None, timeout: float = 30,
         env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(list(argv), input=input, capture_output=True, text=True,
                              timeout=timeout, env=env or _env(), check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LabError(f"{' '.join(argv)}: {exc}") from exc


def _check(argv: Sequence[str], *, input: str | None = None, timeout: float = 30,
           env: dict[str, str] | None = None) -> str:
    cp = _run(argv, input=input, timeout=timeout, env=env)
    if cp.returncode != 0:
        raise LabError(f"{' '.join(argv)} failed ({cp.returncode}): "
                       f"{(cp.stderr or cp.stdout).strip()}")
    return cp.stdout


def _free_port(host: str) -> int:
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def parse_probe_port(text: str) -> tuple[str, int]:
    """`tcp/22` -> ("tcp", 22), `udp/53`, `icmp` -> ("icmp", 0); UsageError otherwise."""
    t = text.strip().lower()
    if t == "icmp":
        return "icmp", 0
    proto, _, num = t.partition("/")
    if proto in ("tcp", "udp") and num.isdigit() and 0 < int(num) < 65536:
        return proto, int(num)
    raise UsageError(f"bad port {text!r} (want tcp/N, udp/N or icmp)")


def _port_text(proto: str, port: int) -> str:
    return "icmp" if proto == "icmp" else f"{proto}/{port}"


class Lab:
    """One lab, identified by its state dir. See the module docstring."""

    def __init__(self, directory: Path | str | None = None) -> None:
        self.dir = Path(directory) if directory is not None else state_dir()
        self.prefix = lab_prefix(self.dir)
        self._state: dict[str, Any] | None = None

    # ---------------------------------------------------------------- state

    @property
    def state_path(self) -> Path:
        return self.dir / STATE_FILE

    def state(self) -> dict[str, Any]:
        """The state file of the lab that is up; UsageError when there is none."""
        if self._state is None:
            try:
                self._state = json.loads(self.state_path.read_text(encoding="utf-8"))
            except FileNotFoundError:
                raise UsageError(f"no lab is up (no {self.state_path}; run `bulkhead lab up "
                                 "TOPOLOGY` first)") from None
            except (OSError, ValueError) as exc:
                raise LabError(f"{self.state_path}: unreadable lab state: {exc}") from exc
        return self._state

    def _save(self) -> None:
        assert self._state is not None
        tmp = self.state_path.with_suffix(".tmp")
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w",
                  encoding="utf-8") as fh:
            json.dump(self._state, fh, indent=1)
        os.replace(tmp, self.state_path)

    def _remember(self, role: str, host: str | None, pid: int) -> None:
        assert self._state is not None
        self._state["processes"].append({"role": role, "host": host, "pid": pid,
                                         "start": _start_time(pid)})
        self._save()

    def topology(self) -> Topology:
        st = self.state()
        text = (self.dir / TOPOLOGY_FILE).read_text(encoding="utf-8")
        return loads_topology(text, source=st.get("topology_source") or TOPOLOGY_FILE)

    @property
    def server_url(self) -> str:
        return str(self.state()["server"]["url"])

    @property
    def api_key(self) -> str:
        return str(self.state()["server"]["api_key"])

    def _netns(self, topo: Topology) -> NetnsLab:
        """A NetnsLab naming the lab's namespaces (not brought up: for run/probe)."""
        specs = [HostSpec(h.name, h.ip) for h in topo.hosts]
        specs.append(HostSpec(INTERNET_HOST, topo.internet_ip))
        return NetnsLab(specs, v4_net=topo.network, prefix=self.prefix)

    # ---------------------------------------------------------------- server API

    def api(self, method: str, path: str, *, json_body: Any = None, content: str | None = None,
            content_type: str | None = None, timeout: float = 30.0) -> Any:
        """One call to the lab's control plane (`/api/v1` + path) with the lab's API key."""
        import httpx

        st = self.state()["server"]
        headers = {"Authorization": f"Bearer {st['api_key']}"}
        if content_type:
            headers["Content-Type"] = content_type
        try:
            r = httpx.request(method, f"{st['url']}/api/v1{path}", json=json_body,
                              content=content, headers=headers, timeout=timeout)
        except httpx.HTTPError as exc:
            raise LabError(f"control plane {st['url']}: {method} {path}: {exc}") from exc
        if r.status_code >= 400:
            raise LabError(f"control plane: {method} {path} -> {r.status_code}: {r.text[:500]}")
        return r.json() if r.content else None

    # ---------------------------------------------------------------- up

    def up(self, topology: str | Path, *, server: str | None = None, api_key: str | None = None,
           agents: bool = True, labels: bool = True, traffic: bool = True, seed: int = 0,
           agent_timeout: float = 120.0, progress: Progress | None = None) -> dict[str, Any]:
        """Build and start the lab; return `status()` once every agent is online.

        Leftovers of an earlier lab in the same state dir are removed first. On failure
        everything started so far is torn down again and LabError raised.
        """
        say = progress or (lambda _msg: None)
        topo = load_topology(str(topology))  # PolicyError before touching anything
        if server is not None and not api_key:
            raise UsageError("--server needs an API key (--api-key or BULKHEAD_API_KEY)")
        say("removing leftovers of an earlier lab")
        self.down()
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / MARKER_FILE).write_text(f"{self.prefix}\n", encoding="utf-8")
        (self.dir / TOPOLOGY_FILE).write_text(Path(topology).read_text(encoding="utf-8"),
                                              encoding="utf-8")
        self._state = {"version": 1, "prefix": self.prefix, "status": "starting",
                       "topology_source": str(topology), "name": topo.name,
                       "started_at": time.time(), "processes": [], "server": None,
                       "agents": agents, "traffic": traffic, "seed": seed}
        self._save()
        try:
            self._build(topo, server=server, api_key=api_key, agents=agents, labels=labels,
                        traffic=traffic, seed=seed, agent_timeout=agent_timeout, say=say)
        except BaseException as exc:
            try:
                self.down(keep_logs=True)  # the error may point at a log
            except Exception as cleanup:
                if isinstance(exc, Exception):  # say so: something of the lab is still there
                    raise LabError(f"{exc}\nand the cleanup after it failed: {cleanup} "
                                   "(run `bulkhead lab down`)") from exc
            raise
        self._state["status"] = "up"
        self._save()
        return self.status()

    def _build(self, topo: Topology, *, server: str | None, api_key: str | None, agents: bool,
               labels: bool, traffic: bool, seed: int, agent_timeout: float,
               say: Progress) -> None:
        assert self._state is not None
        for d in ("bin", "logs", "agents", "traffic"):
            (self.dir / d).mkdir(exist_ok=True)
        init = self._server_init() if server is None else None  # slow: overlap it
        say(f"creating {len(topo.hosts) + 1} hosts")
        net = self._netns(topo)
        try:
            net.up()
        finally:
            net.detach()  # this process exits long before the lab goes down
        self._gateway(net, topo)
        self._externals(net, topo)
        run = None
        if init is not None:
            say("starting the control plane")
            run = self._server_run(net, topo, init)
        say("starting services")
        self._responders(net, topo)
        if run is not None:
            self._server_ready(topo, run)
        elif server is not None:
            agent_url = _agent_url(server.rstrip("/"), topo)
            self._state["server"] = {"url": server.rstrip("/"), "api_key": api_key,
                                     "agent_url": agent_url, "local": False}
            self._save()
            self._route_to_server(net, topo, agent_url)
        say("importing workloads" + (" and labels" if labels else ""))
        self._import(topo, labels=labels)
        managed = [h.name for h in topo.hosts if h.managed]
        if agents and managed:
            say(f"starting {len(managed)} agents")
            self._agents(net, topo, managed)
        if traffic:
            say("starting traffic")
            self._traffic(net, topo, seed)
        if agents and managed:
            say("waiting for agents to report in")
            self._wait_agents(managed, agent_timeout, say)
            self._set_enforcement(topo)

    def _gateway(self, net: NetnsLab, topo: Topology) -> None:
        """A veth from this machine into the lab bridge, holding the gateway address."""
        import ipaddress

        link = f"{self.prefix}gw"
        plen = ipaddress.IPv4Network(topo.network).prefixlen
        switch = f"{self.prefix}--sw"
        _check(["ip", "link", "add", link, "type", "veth", "peer", "name", "gw", "netns", switch])
        _check(["ip", "-n", switch, "link", "set", "gw", "master", "br0"])
        _check(["ip", "-n", switch, "link", "set", "gw", "up"])
        _check(["ip", "addr", "add", f"{topo.gateway_ip}/{plen}", "dev", link])
        _check(["ip", "link", "set", link, "up"])
        deadline = time.monotonic() + 10
        while "UP" not in _run(["ip", "-br", "link", "show", link]).stdout.split()[1:2]:
            if time.monotonic() > deadline:
                raise LabError(f"gateway link {link} did not come up")
            time.sleep(0.05)

    def _externals(self, net: NetnsLab, topo: Topology) -> None:
        """The internet host holds every external address; the others route them to it."""
        if not topo.externals:
            return
        inet = net.ns_name(INTERNET_HOST)
        _check(["ip", "-n", inet, "-batch", "-"],
               input="".join(f"addr add {ip}/32 dev eth0\n" for ip in topo.externals))
        for h in topo.hosts:
            _check(["ip", "-n", net.ns_name(h.name), "-batch", "-"],
                   input="".join(f"route add {ip}/32 dev eth0\n" for ip in topo.externals))

    def _route_to_server(self, net: NetnsLab, topo: Topology, url: str) -> None:
        """Hosts reach a server outside the lab network through the gateway (this machine)."""
        import ipaddress
        import socket

        host = urlsplit(url).hostname or ""
        try:
            ip = ipaddress.ip_address(socket.gethostbyname(host))
        except (OSError, ValueError) as exc:
            raise LabError(f"--server {url}: cannot resolve {host!r}: {exc}") from exc
        if ip in ipaddress.ip_network(topo.network):
            return
        for h in topo.hosts:
            _check(["ip", "-n", net.ns_name(h.name), "route", "replace", f"{ip}/32", "via",
                    topo.gateway_ip])

    def _executable(self, name: str) -> str:
        """A copy (or hard link) of the interpreter named `name`: /proc/PID/exe says `name`."""
        path = self.dir / "bin" / name
        if not path.exists():
            real = os.path.realpath(sys.executable)
            try:
                os.link(real, path)
            except OSError:
                shutil.copy2(real, path)
        return str(path)

    def _responders(self, net: NetnsLab, topo: Topology) -> None:
        assert self._state is not None
        before = set(net.pids)
        jobs: list[tuple[str, dict[str, Any]]] = []
        for h in topo.hosts:
            for s in h.serve:
                kw: dict[str, Any] = {s.proto: [s.port]}
                if s.process or s.unit:
                    # Each host's units in a cgroup of their own: <prefix>/<host>/<unit>.
                    kw["cgroup"] = f"{h.name}/{s.unit or s.process}"
                    net.cgroup_dir(kw["cgroup"])  # created here, not in the threads below
                if s.process:
                    kw["executable"] = self._executable(s.process)
                jobs.append((h.name, kw))
        # Start them a few at a time: serve() only appends to a list once its cgroup exists.
        with ThreadPoolExecutor(max_workers=8) as pool:
            for f in [pool.submit(net.serve, host, **kw) for host, kw in jobs]:
                f.result()
        tcp: set[int] = set()
        udp: set[int] = set()
        for e in topo.edges:
            if e.external:
                (tcp if e.proto == "tcp" else udp).add(e.port)
        for a in topo.attacks:
            if any(t.startswith("external:") for t in a.targets):
                for proto, port in a.ports:
                    if proto in ("tcp", "udp"):
                        (tcp if proto == "tcp" else udp).add(port)
        if tcp or udp:
            net.serve(INTERNET_HOST, tcp=tcp, udp=udp)
        for pid in net.pids:
            if pid not in before:
                self._state["processes"].append({"role": "responder", "host": None, "pid": pid,
                                                 "start": _start_time(pid)})
        self._save()

    def _bulkhead(self, *args: str) -> list[str]:
        return [sys.executable, "-c", _BULKHEAD, *args]

    def _server_env(self) -> dict[str, str]:
        return {k: v for k, v in _env().items() if k not in _SERVER_ENV_DROP}

    def _server_init(self) -> subprocess.Popen[bytes]:
        """Start `bulkhead server init` (data dir in the state dir) in the background."""
        assert self._state is not None
        data = self.dir / "server"
        data.mkdir(mode=0o700, exist_ok=True)
        password = secrets.token_urlsafe(12)
        self._state["server"] = {"user": "admin", "password": password, "local": True,
                                 "data_dir": str(data)}
        with open(self.dir / "logs" / "server-init.log", "ab") as log:
            proc = subprocess.Popen(
                self._bulkhead("server", "init", "--data-dir", str(data), "--name", "admin",
                               "--password-stdin"),
                stdin=subprocess.PIPE, stdout=log, stderr=log, env=self._server_env(),
                start_new_session=True)
        self._remember("server-init", None, proc.pid)
        assert proc.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.write((password + "\n").encode())
            proc.stdin.close()
        return proc

    def _server_run(self, net: NetnsLab, topo: Topology,
                    init: subprocess.Popen[bytes]) -> subprocess.Popen[bytes]:
        """Once init is done, start `bulkhead server run` on the gateway address."""
        assert self._state is not None
        try:
            code = init.wait(120)
        except subprocess.TimeoutExpired:
            raise LabError("`bulkhead server init` did not finish within 120 s") from None
        if code != 0:
            raise LabError(f"`bulkhead server init` failed ({code}); see "
                           f"{self.dir / 'logs' / 'server-init.log'}")
        self._state["processes"] = [p for p in self._state["processes"]
                                    if p["role"] != "server-init"]  # done: not a lab process
        port = _free_port(topo.gateway_ip)
        url = f"http://{topo.gateway_ip}:{port}"
        self._state["server"].update(url=url, agent_url=url)
        procs = net.cgroup_dir("server") + "/cgroup.procs"
        with open(self.dir / "logs" / "server.log", "ab") as log:
            # sh moves itself into the lab's server cgroup, then execs the server.
            proc = subprocess.Popen(
                ["sh", "-c", 'echo $$ > "$0" && exec "$@"', procs,
                 *self._bulkhead("server", "run", "--data-dir", self._state["server"]["data_dir"],
                                 "--host", topo.gateway_ip, "--port", str(port),
                                 "--log-level", "warning")],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=self._server_env(),
                start_new_session=True)
        self._remember("server", None, proc.pid)
        return proc

    def _server_ready(self, topo: Topology, proc: subprocess.Popen[bytes]) -> None:
        """Wait for /healthz, then log in and create the lab's API key."""
        import httpx

        assert self._state is not None
        srv = self._state["server"]
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                raise LabError(f"the local control plane exited ({proc.returncode}); see "
                               f"{self.dir / 'logs' / 'server.log'}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{srv['url']}/healthz", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise LabError(f"the local control plane did not answer on {srv['url']} "
                               "within 90 s")
            time.sleep(0.2)
        try:
            r = httpx.post(f"{srv['url']}/api/v1/auth/login", timeout=30,
                           json={"name": srv["user"], "password": srv["password"]})
            r.raise_for_status()
            r = httpx.post(f"{srv['url']}/api/v1/auth/api-keys", timeout=30,
                           headers={"Authorization": f"Bearer {r.json()['token']}"},
                           json={"name": f"lab {topo.name}"})
            r.raise_for_status()
        except httpx.HTTPError as exc:
            raise LabError(f"cannot create the lab's API key on {srv['url']}: {exc}") from exc
        srv["api_key"] = r.json()["token"]
        self._save()

    def _import(self, topo: Topology, *, labels: bool) -> None:
        have = {k["name"] for k in self.api("GET", "/label-keys")}
        for key in topo.label_keys:
            if key not in have:
                self.api("POST", "/label-keys", json_body={"name": key})
        rows = []
        for h in topo.hosts:
            row: dict[str, Any] = {"name": h.name, "hostname": h.name, "ips": [h.ip],
                                   "managed": h.managed, "enforcement": h.enforcement}
            if labels:
                row["labels"] = h.label_dict
            rows.append(row)
        self.api("POST", "/workloads/import", json_body=rows)

    def import_labels(self) -> dict[str, Any]:
        """Import the topology's labels as a CMDB would (CSV), e.g. after `up(labels=False)`."""
        result = self.api("POST", "/workloads/import", content=self.topology().labels_csv(),
                          content_type="text/csv")
        assert isinstance(result, dict)
        return result

    def _agents(self, net: NetnsLab, topo: Topology, managed: list[str]) -> None:
        assert self._state is not None
        key = self.api("POST", "/pairing-keys", json_body={
            "name": f"lab {topo.name}", "max_uses": len(managed), "expires_in_s": 86400})
        url = self._state["server"]["agent_url"]
        for name in managed:
            sdir = self.dir / "agents" / name
            sdir.mkdir(exist_ok=True)
            argv = ["nsenter", f"--net={NETNS_DIR}/{net.ns_name(name)}", "--",
                    *self._bulkhead("agent", "run", "--server", url, "--pairing-key",
                                    key["key"], "--state-dir", str(sdir), "--hostname", name,
                                    "--flow-window", "2", "--heartbeat", "2")]
            with open(self.dir / "logs" / f"agent-{name}.log", "ab") as log:
                proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                        env=_env(), start_new_session=True)
            self._remember("agent", name, proc.pid)

    def _traffic(self, net: NetnsLab, topo: Topology, seed: int) -> None:
        by_source: dict[str, list[dict[str, Any]]] = {}
        for s in schedules(topo, seed=seed):
            by_source.setdefault(s.source, []).append({
                "path": s.edge.path, "proto": s.edge.proto, "port": s.edge.port,
                "every": s.edge.every_s, "phase": s.phase, "first": s.first,
                "dst": list(s.dst_ips)})
        for host, items in by_source.items():
            spec = self.dir / "traffic" / f"{host}.json"
            spec.write_text(json.dumps({"host": host, "timeout": 1.0, "schedules": items,
                                        "status": str(self.dir / "traffic" /
                                                      f"{host}.status")}), encoding="utf-8")
            argv = ["nsenter", f"--net={NETNS_DIR}/{net.ns_name(host)}", "--",
                    sys.executable, "-I", str(_TRAFFIC), str(spec)]
            with open(self.dir / "logs" / f"traffic-{host}.log", "ab") as log:
                proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                        env=_env(), start_new_session=True)
            self._remember("traffic", host, proc.pid)

    def _agent_rows(self) -> list[dict[str, Any]]:
        rows = self.api("GET", "/agents?state=paired&limit=5000")
        assert isinstance(rows, list)
        return rows

    def _wait_agents(self, managed: list[str], timeout: float, say: Progress) -> None:
        assert self._state is not None
        want = set(managed)
        deadline = time.monotonic() + timeout
        last = -1
        while True:
            online = {a["hostname"] for a in self._agent_rows() if a.get("online")} & want
            if len(online) != last:
                last = len(online)
                say(f"agents online: {len(online)}/{len(want)}")
            if online == want:
                return
            dead = [p for p in self._state["processes"]
                    if p["role"] == "agent" and not _alive(p)]
            if dead:
                names = ", ".join(p["host"] for p in dead)
                log = self.dir / "logs" / f"agent-{dead[0]['host']}.log"
                with contextlib.suppress(OSError):
                    tail = log.read_text(errors="replace").strip().splitlines()[-5:]
                    names += ":\n  " + "\n  ".join(tail)
                raise LabError(f"agent(s) exited: {names}\n(logs in {self.dir / 'logs'})")
            if time.monotonic() > deadline:
                missing = ", ".join(sorted(want - online))
                raise LabError(f"agents not online after {timeout:.0f} s: {missing}")
            time.sleep(0.5)

    def _set_enforcement(self, topo: Topology) -> None:
        groups: dict[str, list[str]] = {}
        for h in topo.hosts:
            groups.setdefault(h.enforcement, []).append(h.name)
        for state, names in groups.items():
            self.api("POST", "/workloads/enforcement",
                     json_body={"enforcement": state, "names": names})

    # ---------------------------------------------------------------- status

    def status(self) -> dict[str, Any]:
        """Hosts (address, labels, namespace, agent), server, traffic counters, as plain data."""
        st = self.state()
        topo = self.topology()
        net = self._netns(topo)
        agents: dict[str, dict[str, Any]] = {}
        server_error = None
        if st.get("server"):
            try:
                agents = {a["hostname"]: a for a in self._agent_rows()}
            except LabError as exc:
                server_error = str(exc)
        traffic: dict[str, dict[str, int]] = {}
        for f in sorted((self.dir / "traffic").glob("*.status")):
            with contextlib.suppress(OSError, ValueError):
                for e in json.loads(f.read_text(encoding="utf-8"))["edges"]:
                    t = traffic.setdefault(f.stem, {"ok": 0, "failed": 0})
                    t["ok"] += e["ok"]
                    t["failed"] += e["failed"]
        hosts = []
        for h in topo.hosts:
            a = agents.get(h.name)
            hosts.append({
                "name": h.name, "ip": h.ip, "labels": h.label_dict, "managed": h.managed,
                "namespace": net.ns_name(h.name),
                "up": os.path.exists(net.netns_path(h.name)),
                "serve": [s.spec for s in h.serve],
                "agent": None if a is None else {
                    "id": a["id"], "online": a["online"], "status": a["status"],
                    "enforcement": a["enforcement"], "policy_version": a["policy_version"],
                    "applied_version": a["applied_version"], "in_sync": a["in_sync"]},
                "traffic": traffic.get(h.name)})
        processes = [{**p, "alive": _alive(p)} for p in st["processes"]]
        server = dict(st["server"] or {})
        server.pop("api_key", None)
        server.pop("password", None)
        return {"name": st["name"], "status": st["status"], "state_dir": str(self.dir),
                "prefix": self.prefix, "topology": st["topology_source"],
                "network": topo.network, "gateway": topo.gateway_ip,
                "internet": {"ip": topo.internet_ip, "externals": list(topo.externals)},
                "server": server, "server_error": server_error, "hosts": hosts,
                "processes": processes}

    # ---------------------------------------------------------------- probe / attack

    def _resolve(self, topo: Topology, target: str) -> str:
        import ipaddress

        name = target.removeprefix("external:")
        if name == INTERNET_HOST:
            return topo.internet_ip
        try:
            return str(ipaddress.ip_address(name))
        except ValueError:
            pass
        try:
            return topo.host(name).ip
        except KeyError as exc:
            raise UsageError(str(exc.args[0])) from None

    def probe(self, source: str, target: str, port: str, *, timeout: float = 1.5) -> ProbeResult:
        """One real connection attempt from lab host `source` to `target` (host or address)."""
        topo = self.topology()
        if source != INTERNET_HOST:
            try:
                topo.host(source)
            except KeyError as exc:
                raise UsageError(str(exc.args[0])) from None
        ip = self._resolve(topo, target)
        proto, num = parse_probe_port(port)
        net = self._netns(topo)
        try:
            [result] = net.probe(source, [(ip, proto, num)], timeout=timeout)
        except NetnsError as exc:
            raise LabError(str(exc)) from exc
        return ProbeResult(source, target, ip, _port_text(proto, num), result)

    def attack(self, name: str, *, timeout: float = 1.5) -> list[ProbeResult]:
        """Run the named attack: every (source, target, port) at once, per source."""
        topo = self.topology()
        try:
            attack = topo.attack(name)
        except KeyError as exc:
            raise UsageError(str(exc.args[0])) from None
        return self._probe_each(topo, {
            src: [(t, self._resolve(topo, t), proto, port)
                  for t in attack.targets if t != src for proto, port in attack.ports]
            for src in attack.sources}, timeout)

    def probe_traffic(self, *, noise: bool = True, timeout: float = 1.5) -> list[ProbeResult]:
        """Probe every declared traffic (and noise) edge once: each source to each target.

        One concurrent probe run per source host. `result == "open"` everywhere means all
        legitimate traffic of the topology flows.
        """
        topo = self.topology()
        per_source: dict[str, list[tuple[str, str, str, int]]] = {}
        for e in topo.traffic + (topo.noise if noise else ()):
            for src in e.sources:
                targets = [f"external:{e.external}"] if e.external else e.targets_for(src)
                for t in targets:
                    item = (t, self._resolve(topo, t), e.proto, e.port)
                    if item not in per_source.setdefault(src, []):
                        per_source[src].append(item)
        return self._probe_each(topo, per_source, timeout)

    def _probe_each(self, topo: Topology,
                    per_source: dict[str, list[tuple[str, str, str, int]]],
                    timeout: float) -> list[ProbeResult]:
        """Probe (target, ip, proto, port) items: one concurrent run per source host."""
        net = self._netns(topo)
        out: list[ProbeResult] = []
        for src, items in per_source.items():
            try:
                results = net.probe(src, [(ip, p, n) for _, ip, p, n in items], timeout=timeout)
            except NetnsError as exc:
                raise LabError(str(exc)) from exc
            out += [ProbeResult(src, t, ip, _port_text(p, n), r)
                    for (t, ip, p, n), r in zip(items, results, strict=True)]
        return out

    # ---------------------------------------------------------------- down

    def down(self, *, keep_logs: bool = False) -> list[str]:
        """Remove everything of this lab (safe when nothing is there); what was removed.

        With `keep_logs`, the state dir keeps its ``logs/`` (a failed `up` does this).
        """
        removed: list[str] = []
        try:
            procs = json.loads(self.state_path.read_text(encoding="utf-8")).get("processes", [])
        except (OSError, ValueError):
            procs = []
        # 1. Recorded processes (server, agents, traffic, responders): TERM, then KILL.
        live = [p for p in procs if _alive(p)]
        for p in live:
            _signal_group(int(p["pid"]), signal.SIGTERM)
        deadline = time.monotonic() + 3.0
        while live and time.monotonic() < deadline:
            live = [p for p in live if _alive(p)]
            time.sleep(0.05)
        for p in live:
            _signal_group(int(p["pid"]), signal.SIGKILL)
        removed += [f"process {p['role']} {p['pid']}" for p in procs if p.get("start")]
        # 2. Whatever else runs in the lab's namespaces.
        namespaces = self._namespaces()
        for ns in namespaces:
            cp = _run(["ip", "netns", "pids", ns], timeout=10)
            for pid in cp.stdout.split():
                if pid.isdigit() and int(pid) != os.getpid():
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(int(pid), signal.SIGKILL)
        # 3. The cgroup tree, leaves first, killing what is left in it. A problem here or
        # below does not stop the rest of the teardown; it is reported at the end.
        problems: list[str] = []
        mount = cgroup2_mount()
        if mount is not None:
            base = Path(mount) / self.prefix
            if base.is_dir():
                cg_problems = _remove_cgroup_tree(base)
                problems += cg_problems
                if not cg_problems:
                    removed.append(f"cgroup {base}")
        # 4. Namespaces (veths and bridge go with them), then the gateway link.
        for ns in namespaces:
            cp = _run(["ip", "netns", "del", ns], timeout=10)
            if cp.returncode != 0 and os.path.exists(f"{NETNS_DIR}/{ns}"):
                problems.append(f"ip netns del {ns}: {cp.stderr.strip()}")
                continue
            removed.append(f"namespace {ns}")
        link = f"{self.prefix}gw"
        if _run(["ip", "link", "show", link]).returncode == 0:
            _run(["ip", "link", "del", link])
            removed.append(f"link {link}")
        if problems:
            raise LabError("lab teardown incomplete: " + "; ".join(problems))
        # 5. The files the lab wrote - only in a state dir that is the lab's.
        if self._owns_dir():
            for name in _OWNED:
                if keep_logs and name == "logs":
                    continue
                path = self.dir / name
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                elif path.exists() or path.is_symlink():
                    path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                self.state_path.with_suffix(".tmp").unlink(missing_ok=True)
            if not keep_logs:
                (self.dir / MARKER_FILE).unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                self.dir.rmdir()  # only when empty
        self._state = None
        return removed

    def _owns_dir(self) -> bool:
        """Whether the state dir was set up by a lab (`up` writes the marker first)."""
        if (self.dir / MARKER_FILE).is_file():
            return True
        try:
            st = json.loads(self.state_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        return isinstance(st, dict) and st.get("prefix") == self.prefix

    def _namespaces(self) -> list[str]:
        try:
            names = os.listdir(NETNS_DIR)
        except FileNotFoundError:
            return []
        return sorted(n for n in names if n.startswith(f"{self.prefix}-"))

    def leftovers(self) -> list[str]:
        """What of this lab still exists (namespaces, link, cgroups, processes): [] when clean."""
        out = [f"namespace {n}" for n in self._namespaces()]
        if _run(["ip", "link", "show", f"{self.prefix}gw"]).returncode == 0:
            out.append(f"link {self.prefix}gw")
        mount = cgroup2_mount()
        if mount is not None and (Path(mount) / self.prefix).exists():
            out.append(f"cgroup {Path(mount) / self.prefix}")
        if self.state_path.exists():
            out.append(f"state {self.state_path}")
        return out


def _alive(p: dict[str, Any]) -> bool:
    start = p.get("start")
    return start is not None and _start_time(int(p["pid"])) == start


def _signal_group(pid: int, sig: int) -> None:
    """Signal pid's process group (each lab process leads its own), else pid itself."""
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)
    except PermissionError:
        pass


def _walk_post(base: Path) -> Iterator[Path]:
    for child in sorted(p for p in base.iterdir() if p.is_dir()):
        yield from _walk_post(child)
    yield base


def _remove_cgroup_tree(base: Path) -> list[str]:
    """Kill everything in the tree and remove it, leaves first; problems found."""
    kill = base / "cgroup.kill"
    if kill.exists():
        with contextlib.suppress(OSError):
            kill.write_text("1")
    problems = []
    for cg in _walk_post(base):
        deadline = time.monotonic() + 3.0
        while True:
            try:
                members = (cg / "cgroup.procs").read_text().split()
            except FileNotFoundError:
                break
            for pid in members:
                with contextlib.suppress(ProcessLookupError, PermissionError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            try:
                cg.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError as exc:
                if exc.errno not in (errno.EBUSY, errno.ENOTEMPTY) or \
                        time.monotonic() > deadline:
                    problems.append(f"cgroup {cg}: {exc}")
                    break
            time.sleep(0.02)
    return problems


def _agent_url(url: str, topo: Topology) -> str:
    """The server as agents in the lab reach it: loopback becomes the lab gateway."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if host in ("localhost", "127.0.0.1", "::1") or host.startswith("127."):
        netloc = topo.gateway_ip + (f":{parts.port}" if parts.port else "")
        return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
    return url
