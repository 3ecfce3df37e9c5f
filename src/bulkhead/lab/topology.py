"""The lab topology file (docs/lab.md): load, validate, resolve. Pure: no I/O but reading the file.

`load_topology(path)` / `loads_topology(text, source=...)` return a `Topology` in which every
reference is resolved: replicas are expanded, addresses allocated in file order, selectors
turned into host-name lists, durations into seconds. Every problem found is reported at once
in a `PolicyError` whose issues name the file, line and key path (``traffic[2].to``).

Addresses: in `network`, the first usable address is the lab gateway (the machine itself,
where a local server listens), hosts follow in file order unless they give `address`, and
the last usable address is the "internet" host that serves `external:` targets.
"""

from __future__ import annotations

import csv
import io
import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any

from bulkhead.domain.errors import Issue, PolicyError
from bulkhead.domain.model import (
    DEFAULT_LABEL_KEYS,
    ENFORCEMENT_STATES,
    Enforcement,
    Policy,
    Selector,
    Workload,
)
from bulkhead.policy.fileformat import Reader, kind_of
from bulkhead.policy.source import Document, join, parse_text, read_file

__all__ = [
    "DEFAULT_NETWORK",
    "INTERNET_HOST",
    "Attack",
    "Edge",
    "Host",
    "Serve",
    "Topology",
    "load_topology",
    "loads_topology",
    "parse_duration",
    "selector_matches",
]

DEFAULT_NETWORK = "10.77.0.0/16"
INTERNET_HOST = "internet"  # reserved name of the host standing in for the internet
# Lower case: an agent's workload is its hostname, lower-cased.
HOST_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,39}$")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # lab and attack names
KEY_RE = re.compile(r"^[a-z][a-z0-9_.-]{0,62}$")
PROCESS_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")
UNIT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,31}\.service$")
PORT_RE = re.compile(r"^(tcp|udp)/(\d{1,5})$")
ATTACK_PORT_RE = re.compile(r"^(tcp|udp)/(\d{1,5})$|^(icmp)$")
DURATION_RE = re.compile(r"^(\d+(?:\.\d+)?)\s*(ms|s|m|h)$")
MIN_EVERY_S = 0.05

_TOP = ("version", "name", "description", "network", "hosts", "traffic", "noise", "attacks")
_HOST = ("name", "description", "labels", "serve", "managed", "enforcement", "replicas_of",
         "address")
_SERVE = ("port", "process", "unit")
_EDGE = ("from", "to", "port", "every", "description")
_ATTACK = ("name", "description", "from", "probe")
_PROBE = ("to", "ports")


@dataclass(frozen=True)
class Serve:
    """One listening process: `proto`/`port`, optionally a named executable and unit."""

    proto: str  # "tcp" | "udp"
    port: int
    process: str | None = None
    unit: str | None = None

    @property
    def spec(self) -> str:
        return f"{self.proto}/{self.port}"


@dataclass(frozen=True)
class Host:
    name: str
    ip: str
    labels: tuple[tuple[str, str], ...] = ()
    serve: tuple[Serve, ...] = ()
    managed: bool = True
    enforcement: Enforcement = "visibility"
    replicas_of: str | None = None

    @property
    def label_dict(self) -> dict[str, str]:
        return dict(self.labels)

    def serving(self, proto: str, port: int) -> Serve | None:
        for s in self.serve:
            if s.proto == proto and s.port == port:
                return s
        return None


@dataclass(frozen=True)
class Edge:
    """A traffic or noise entry: every source host opens one connection each `every_s`.

    `targets` are host names (round-robin), or empty with `external` set to an address.
    """

    path: str  # "traffic[2]" / "noise[0]"
    sources: tuple[str, ...]
    targets: tuple[str, ...]
    external: str | None
    proto: str
    port: int
    every_s: float

    def targets_for(self, source: str) -> tuple[str, ...]:
        """The targets `source` cycles through (never itself)."""
        return tuple(t for t in self.targets if t != source)


@dataclass(frozen=True)
class Attack:
    """From each source host, try every (target, port); targets are host names or addresses."""

    name: str
    sources: tuple[str, ...]
    targets: tuple[str, ...]  # host names; addresses for external targets ("external:IP")
    ports: tuple[tuple[str, int], ...]  # ("tcp", 22), ("icmp", 0)


@dataclass(frozen=True)
class Topology:
    name: str
    network: str
    gateway_ip: str
    internet_ip: str
    hosts: tuple[Host, ...]
    traffic: tuple[Edge, ...] = ()
    noise: tuple[Edge, ...] = ()
    attacks: tuple[Attack, ...] = ()
    label_keys: tuple[str, ...] = DEFAULT_LABEL_KEYS
    source: str | None = None
    _by_name: dict[str, Host] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        self._by_name.update({h.name: h for h in self.hosts})

    def host(self, name: str) -> Host:
        try:
            return self._by_name[name]
        except KeyError:
            known = ", ".join(self._by_name) or "none"
            raise KeyError(f"unknown lab host {name!r} (known: {known})") from None

    def host_by_ip(self, ip: str) -> Host | None:
        for h in self.hosts:
            if h.ip == ip:
                return h
        return None

    @property
    def edges(self) -> tuple[Edge, ...]:
        return self.traffic + self.noise

    @property
    def externals(self) -> tuple[str, ...]:
        """Every `external:` address in traffic, noise and attacks (sorted, unique)."""
        out = {e.external for e in self.edges if e.external}
        out |= {t.removeprefix("external:") for a in self.attacks for t in a.targets
                if t.startswith("external:")}
        return tuple(sorted(out, key=ipaddress.ip_address))

    def attack(self, name: str) -> Attack:
        for a in self.attacks:
            if a.name == name:
                return a
        known = ", ".join(a.name for a in self.attacks) or "none"
        raise KeyError(f"unknown attack {name!r} (known: {known})")

    def to_policy(self, *, labels: bool = True) -> Policy:
        """The hosts as workloads (no rulesets): name, address, labels, managed, enforcement."""
        return Policy(
            label_keys=self.label_keys,
            workloads=tuple(
                Workload(h.name, (h.ip,), h.labels if labels else (), h.name, h.managed,
                         h.enforcement)
                for h in self.hosts
            ),
        )

    def labels_csv(self) -> str:
        """CMDB-style label import: header `name,<label keys...>`, one row per host."""
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["name", *self.label_keys])
        for h in self.hosts:
            d = h.label_dict
            w.writerow([h.name, *(d.get(k, "") for k in self.label_keys)])
        return buf.getvalue()


# --------------------------------------------------------------------------- helpers


def parse_duration(value: Any) -> float:
    """"2s", "500ms", "1m", "1h" or a number of seconds -> seconds (ValueError otherwise)."""
    if isinstance(value, bool):
        raise ValueError("expected a duration like '2s', '500ms' or '1m'")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        m = DURATION_RE.match(value.strip())
        if not m:
            raise ValueError(f"bad duration {value!r} (want e.g. '2s', '500ms', '1m')")
        seconds = float(m.group(1)) * {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}[m.group(2)]
    else:
        raise ValueError("expected a duration like '2s', '500ms' or '1m'")
    if seconds < MIN_EVERY_S:
        raise ValueError(f"duration {value!r} is below the minimum of {MIN_EVERY_S * 1000:.0f}ms")
    return seconds


def selector_matches(selector: Selector, labels: dict[str, str]) -> bool:
    for key, want in selector.terms:
        have = labels.get(key)
        if isinstance(want, str):
            if have != want:
                return False
        elif isinstance(want, tuple):
            if have not in want:
                return False
        else:  # label groups do not exist in topology files
            return False
    return True


class _Loader(Reader):
    WORD = "key"

    def __init__(self, doc: Document) -> None:
        self.doc = doc
        self.issues: list[Issue] = []
        self.hosts: dict[str, Host] = {}
        self.label_keys: list[str] = list(DEFAULT_LABEL_KEYS)

    # ---------------------------------------------------------------- top level

    def load(self) -> Topology:
        top = self.mapping(self.doc.data, "", _TOP, ("hosts",))
        if top is None:
            raise PolicyError(self.issues)
        if top.get("version", 1) != 1:
            self.err("version", f"unsupported version {top.get('version')!r} (want 1)")
        name = self.string(top.get("name", "lab"), "name", pattern=NAME_RE,
                           what="lab name") or "lab"
        net = self.network(top.get("network", DEFAULT_NETWORK))
        gateway, internet = ("", "")
        if net is not None:
            gateway, internet = str(net.network_address + 1), str(net.broadcast_address - 1)
        self.load_hosts(top.get("hosts"), net, gateway, internet)
        traffic = self.edges(top.get("traffic"), "traffic")
        noise = self.edges(top.get("noise"), "noise")
        attacks = self.attacks(top.get("attacks"))
        if self.issues:
            raise PolicyError(self.issues)
        return Topology(name, str(net), gateway, internet, tuple(self.hosts.values()),
                        tuple(traffic), tuple(noise), tuple(attacks), tuple(self.label_keys),
                        self.doc.source)

    def network(self, value: Any) -> ipaddress.IPv4Network | None:
        text = self.string(value, "network", what="an IPv4 network")
        if text is None:
            return None
        try:
            net = ipaddress.IPv4Network(text, strict=True)
        except ValueError as exc:
            self.err("network", f"invalid IPv4 network {text!r}: {exc}")
            return None
        if net.prefixlen > 28:
            self.err("network", f"network {text} is too small (want /28 or larger)")
            return None
        return net

    # ---------------------------------------------------------------- hosts

    def load_hosts(self, value: Any, net: ipaddress.IPv4Network | None, gateway: str,
                   internet: str) -> None:
        items = self.seq(value, "hosts")
        if not items and isinstance(value, list):
            self.err("hosts", "a lab needs at least one host")
        used: dict[str, str] = {}
        if net is not None:
            used = {gateway: "the lab gateway", internet: "the internet host"}
        pending: list[tuple[str, dict[str, Any], Host]] = []
        for i, item in enumerate(items):
            p = f"hosts[{i}]"
            m = self.mapping(item, p, _HOST, ("name",))
            if m is None:
                continue
            name = self.string(m.get("name"), join(p, "name"), pattern=HOST_NAME_RE,
                               what="host name")
            if name is None:
                continue
            if name == INTERNET_HOST:
                self.err(join(p, "name"), f"host name {INTERNET_HOST!r} is reserved for the "
                                          "host standing in for the internet")
                continue
            if name in self.hosts:
                self.err(join(p, "name"), f"duplicate host name {name!r}")
                continue
            base: Host | None = None
            if "replicas_of" in m:
                ref = self.string(m["replicas_of"], join(p, "replicas_of"),
                                  pattern=HOST_NAME_RE, what="host name")
                if ref is not None:
                    base = self.hosts.get(ref)
                    if base is None:
                        self.err(join(p, "replicas_of"),
                                 f"no host {ref!r} defined before this one")
            labels = (self.labels(m["labels"], join(p, "labels")) if "labels" in m
                      else (base.labels if base else ()))
            serve = (self.serves(m["serve"], join(p, "serve")) if "serve" in m
                     else (base.serve if base else ()))
            managed = base.managed if base else True
            if "managed" in m:
                if isinstance(m["managed"], bool):
                    managed = m["managed"]
                else:
                    self.err(join(p, "managed"), f"expected true or false, got "
                                                 f"{kind_of(m['managed'])}")
            enforcement: Enforcement = base.enforcement if base else "visibility"
            if "enforcement" in m:
                if m["enforcement"] in ENFORCEMENT_STATES:
                    enforcement = m["enforcement"]
                else:
                    self.err(join(p, "enforcement"),
                             f"expected one of {', '.join(ENFORCEMENT_STATES)}, "
                             f"got {m['enforcement']!r}")
            host = Host(name, "", labels, serve, managed, enforcement,
                        base.name if base else None)
            self.hosts[name] = host
            pending.append((p, m, host))
        if net is None:
            return
        # Explicit addresses first, then the others in file order.
        for p, m, host in pending:
            if "address" not in m:
                continue
            text = self.string(m["address"], join(p, "address"), what="an IPv4 address")
            if text is None:
                continue
            try:
                ip = ipaddress.IPv4Address(text)
            except ValueError:
                self.err(join(p, "address"), f"invalid IPv4 address {text!r}")
                continue
            if ip not in net or ip in (net.network_address, net.broadcast_address):
                self.err(join(p, "address"), f"address {ip} is not a host address of {net}")
            elif str(ip) in used:
                self.err(join(p, "address"), f"address {ip} is already {used[str(ip)]}")
            else:
                used[str(ip)] = f"used by {host.name!r}"
                self.hosts[host.name] = _replace_ip(host, str(ip))
        free = (str(a) for a in net.hosts())
        for p, m, host in pending:
            if "address" in m:
                continue
            ip_text = next((a for a in free if a not in used), None)
            if ip_text is None:
                self.err(p, f"network {net} has no free address left for {host.name!r}")
                break
            used[ip_text] = f"used by {host.name!r}"
            self.hosts[host.name] = _replace_ip(host, ip_text)

    def labels(self, value: Any, path: str) -> tuple[tuple[str, str], ...]:
        if value is None:
            return ()
        if not isinstance(value, dict):
            self.err(path, f"expected a mapping of label key to value, got {kind_of(value)}")
            return ()
        out = []
        for k, v in value.items():
            kp = join(path, str(k))
            if not isinstance(k, str) or not KEY_RE.match(k):
                self.err(kp, f"invalid label key {k!r} (want lower case, e.g. 'role')")
                continue
            s = self.string(v, kp, what="a label value")
            if s is None:
                continue
            if k not in self.label_keys:
                self.label_keys.append(k)
            out.append((k, s))
        return tuple(sorted(out))

    def serves(self, value: Any, path: str) -> tuple[Serve, ...]:
        out: list[Serve] = []
        seen: dict[str, int] = {}
        for i, item in enumerate(self.seq(value, path)):
            p = join(path, i)
            process = unit = None
            if isinstance(item, dict):
                m = self.mapping(item, p, _SERVE, ("port",))
                if m is None or "port" not in m:
                    continue
                if "process" in m:
                    process = self.string(m["process"], join(p, "process"),
                                          pattern=PROCESS_RE, what="process name")
                if "unit" in m:
                    unit = self.string(m["unit"], join(p, "unit"), pattern=UNIT_RE,
                                       what="unit (like 'mysql.service')")
                port_value, pp = m["port"], join(p, "port")
            else:
                port_value, pp = item, p
            parsed = self.port(port_value, pp)
            if parsed is None:
                continue
            serve = Serve(parsed[0], parsed[1], process, unit)
            if serve.spec in seen:
                self.err(pp, f"{serve.spec} is served twice (first at {path}[{seen[serve.spec]}])")
                continue
            seen[serve.spec] = i
            out.append(serve)
        return tuple(out)

    def port(self, value: Any, path: str) -> tuple[str, int] | None:
        text = self.string(value, path, what="a port like 'tcp/443' or 'udp/53'")
        if text is None:
            return None
        m = PORT_RE.match(text.strip().lower())
        if not m or not 0 < int(m.group(2)) < 65536:
            self.err(path, f"invalid port {text!r} (want 'tcp/N' or 'udp/N', N in 1-65535)")
            return None
        return m.group(1), int(m.group(2))

    # ---------------------------------------------------------------- references

    def selector(self, value: dict[Any, Any], path: str) -> Selector | None:
        terms: dict[str, str | tuple[str, ...]] = {}
        ok = True
        for k, v in value.items():
            kp = join(path, str(k))
            if not isinstance(k, str) or k not in self.label_keys:
                self.err(kp, f"label key {k!r} is not used by any host")
                ok = False
                continue
            if isinstance(v, list):
                if not v:
                    self.err(kp, "an empty list of values matches nothing")
                    ok = False
                    continue
                vals = [self.string(x, join(kp, j), what="a label value")
                        for j, x in enumerate(v)]
                if any(x is None for x in vals):
                    ok = False
                    continue
                terms[k] = tuple(x for x in vals if x is not None)
            else:
                s = self.string(v, kp, what="a label value or a list of values")
                if s is None:
                    ok = False
                    continue
                terms[k] = s
        return Selector.of(dict(terms)) if ok else None

    def hosts_of(self, value: Any, path: str, *, external: bool) -> tuple[str, ...] | str | None:
        """Host names for a host name or selector; "external:IP" when allowed; None on error."""
        if isinstance(value, str) and value.startswith("external:"):
            if not external:
                self.err(path, "an external address cannot be a source")
                return None
            addr = value.removeprefix("external:").strip()
            try:
                ip = ipaddress.IPv4Address(addr)
            except ValueError:
                self.err(path, f"invalid external address {addr!r} (want external:IPv4)")
                return None
            if ip.is_loopback or ip.is_multicast or ip.is_unspecified:
                self.err(path, f"external address {ip} cannot be routed in the lab")
                return None
            if self.host_ip_net is not None and ip in self.host_ip_net:
                self.err(path, f"external address {ip} is inside the lab network "
                               f"{self.host_ip_net}")
                return None
            return f"external:{ip}"
        if isinstance(value, str):
            if value not in self.hosts:
                self.err(path, f"unknown host {value!r}")
                return None
            return (value,)
        if isinstance(value, dict):
            sel = self.selector(value, path)
            if sel is None:
                return None
            found = tuple(h.name for h in self.hosts.values()
                          if selector_matches(sel, h.label_dict))
            if not found:
                self.err(path, f"selector {value!r} matches no host")
                return None
            return found
        self.err(path, f"expected a host name, a label selector or 'external:IP', got "
                       f"{kind_of(value)}")
        return None

    host_ip_net: ipaddress.IPv4Network | None = None

    def edges(self, value: Any, section: str) -> list[Edge]:
        out: list[Edge] = []
        for i, item in enumerate(self.seq(value, section)):
            p = f"{section}[{i}]"
            m = self.mapping(item, p, _EDGE, ("from", "to", "port", "every"))
            if m is None or any(k not in m for k in ("from", "to", "port", "every")):
                continue
            sources = self.hosts_of(m["from"], join(p, "from"), external=False)
            targets = self.hosts_of(m["to"], join(p, "to"), external=True)
            port = self.port(m["port"], join(p, "port"))
            try:
                every = parse_duration(m["every"])
            except ValueError as exc:
                self.err(join(p, "every"), str(exc))
                continue
            if sources is None or targets is None or port is None:
                continue
            assert isinstance(sources, tuple)
            if isinstance(targets, str):
                out.append(Edge(p, sources, (), targets.removeprefix("external:"), *port, every))
                continue
            bad = [t for t in targets if self.hosts[t].serving(*port) is None]
            if bad:
                self.err(join(p, "port"), f"{port[0]}/{port[1]} is not served by "
                                          f"{', '.join(bad)}")
                continue
            if all(not set(targets) - {s} for s in sources):
                self.err(join(p, "to"), "every source would only connect to itself")
                continue
            out.append(Edge(p, sources, targets, None, *port, every))
        return out

    def attacks(self, value: Any) -> list[Attack]:
        out: list[Attack] = []
        seen: dict[str, int] = {}
        for i, item in enumerate(self.seq(value, "attacks")):
            p = f"attacks[{i}]"
            m = self.mapping(item, p, _ATTACK, ("name", "from", "probe"))
            if m is None or any(k not in m for k in ("name", "from", "probe")):
                continue
            name = self.string(m["name"], join(p, "name"), pattern=NAME_RE, what="attack name")
            if name is not None:
                if name in seen:
                    self.err(join(p, "name"), f"duplicate attack name {name!r} "
                                              f"(first at attacks[{seen[name]}])")
                seen[name] = i
            sources = self.hosts_of(m["from"], join(p, "from"), external=False)
            pp = join(p, "probe")
            probe = self.mapping(m["probe"], pp, _PROBE, ("to", "ports"))
            if probe is None or "to" not in probe or "ports" not in probe:
                continue
            targets: list[str] = []
            tos = probe["to"] if isinstance(probe["to"], list) else [probe["to"]]
            ok = True
            for j, to in enumerate(tos):
                tp = join(join(pp, "to"), j) if isinstance(probe["to"], list) else join(pp, "to")
                got = self.hosts_of(to, tp, external=True)
                if got is None:
                    ok = False
                elif isinstance(got, str):
                    targets.append(got)
                else:
                    targets += [t for t in got if t not in targets]
            ports: list[tuple[str, int]] = []
            raw_ports = self.seq(probe["ports"], join(pp, "ports"))
            if not raw_ports:
                self.err(join(pp, "ports"), "an attack needs at least one port")
            for j, item2 in enumerate(raw_ports):
                jp = join(join(pp, "ports"), j)
                text = self.string(item2, jp, what="a port like 'tcp/22'")
                mm = ATTACK_PORT_RE.match(text.strip().lower()) if text else None
                if mm is None or (mm.group(2) and not 0 < int(mm.group(2)) < 65536):
                    if text is not None:
                        self.err(jp, f"invalid port {text!r} (want 'tcp/N', 'udp/N' or 'icmp')")
                    ok = False
                    continue
                ports.append(("icmp", 0) if mm.group(3) else (mm.group(1), int(mm.group(2))))
            if ok and name is not None and sources is not None and raw_ports:
                assert isinstance(sources, tuple)
                out.append(Attack(name, sources, tuple(targets), tuple(ports)))
        return out


def _replace_ip(host: Host, ip: str) -> Host:
    from dataclasses import replace

    return replace(host, ip=ip)


def topology_from_document(doc: Document) -> Topology:
    loader = _Loader(doc)
    data = doc.data
    if isinstance(data, dict) and isinstance(data.get("network", DEFAULT_NETWORK), str):
        try:
            loader.host_ip_net = ipaddress.IPv4Network(data.get("network", DEFAULT_NETWORK))
        except ValueError:
            loader.host_ip_net = None
    return loader.load()


def loads_topology(text: str, source: str | None = None) -> Topology:
    """Parse and validate topology text; PolicyError listing every problem otherwise."""
    return topology_from_document(parse_text(text, source))


def load_topology(path: str) -> Topology:
    """Read, parse and validate a topology file; PolicyError naming file:line and key path."""
    return topology_from_document(read_file(str(path)))
