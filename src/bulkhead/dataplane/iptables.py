"""iptables renderer: one workload's compiled policy as `ipset restore` + `iptables-restore`.

Theory of operation
-------------------
`render_iptables(cw, ctx)` is a pure function from a `CompiledWorkload` and the agent's
`HostContext` to an `IptablesArtifact`: an `ipset restore` script and one
`iptables-restore --noflush` transaction per IP family. `restore_commands(art)` lists the
commands that apply it, in order; nothing here does I/O.

We own two chains in the filter table, `<T>-IN` and `<T>-OUT` (T = ctx.table upper-cased),
each hooked by exactly one jump at the top of INPUT / OUTPUT. Other managers' rules are never
flushed: a transaction declares (creates or flushes) only our chains, refills them, and moves
our hooks back to the top (`-D` + `-I`), so the kernel switches from the old policy to the new
one in a single commit per family. `-D` needs the hook to exist, and no stateless sequence of
`-I`/`-D` can add a hook on a fresh host without duplicating it on a configured one, so a
small idempotent step run first (see `restore_commands`) creates the hooks, pointing at an
empty chain, when they are missing. Removal unhooks, then declares and deletes our chains.

Each chain is laid out like the nftables renderer's: essential traffic (loopback,
established/related, control plane, DHCP, ICMP errors, ICMPv6 neighbour discovery and MLD),
then override_deny, allow, deny rules, then the default. First match wins, which realises the
order-free precedence (an allow above a deny: allowed across the boundary). Enforcement only
changes verdicts: `full` drops at deny rules and the default, `selective` at deny rules only,
`visibility` drops nothing; every non-allow verdict is an NFLOG rule (prefix
`bh:<o|d|n>:<instance>`) followed by the same match with DROP or ACCEPT. `idle` removes.

Peers are ipsets (`hash:ip` for hosts, `hash:net` for networks), one per distinct content,
named `<t>-p<N>-<h|n><4|6>` in order of first use. An update fills a temporary set, swaps it
with the live one and destroys the old contents, so a live set is never half-filled. Sets no
longer used are destroyed after both transactions. Rules are written in iptables-save's own
canonical form, so `iptables-save` reads back exactly the lines we wrote.

Inbound process/unit bindings use `-m cgroup --path`, with the path relative to the cgroup2
root (see `xt_cgroup_path`). xt_cgroup only sees a socket the packet was already demultiplexed
to, never the listener of a new connection, so such an allow cannot admit a new connection and
a bound deny is widened to the port: both fail closed (docs/design/iptables.md).
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from bulkhead.dataplane.model import (
    CompiledRule,
    CompiledWorkload,
    HostContext,
    PeerSet,
    ServiceGroup,
    family_hosts,
    group_services,
)
from bulkhead.domain.ports import ICMP_PROTOS, PORTED, PortSpec

__all__ = ["IptablesArtifact", "remove_iptables", "render_iptables", "restore_commands",
           "xt_cgroup_path"]

ENFORCEMENT = ("idle", "visibility", "selective", "full")
InboundProcess = Literal["cgroup", "port"]
Backend = Literal["legacy", "nft", "default"]
BACKENDS: dict[str, tuple[str, str]] = {"legacy": ("iptables-legacy", "ip6tables-legacy"),
                                        "nft": ("iptables-nft", "ip6tables-nft"),
                                        "default": ("iptables", "ip6tables")}
TABLE_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,11}$")  # keeps chain and set names short
MULTIPORT_SLOTS = 15  # xt_multiport: at most 15 ports per rule, a range takes two
SET_MAXELEM = 1 << 24  # one value for every set: `create -exist` compares maxelem
SET_NAME_MAX = 31
COMMENT_MAX = 255
_UNSAFE = re.compile(r"[^A-Za-z0-9_.:@/+\-=,() ]")
_PLAIN = re.compile(r"^[A-Za-z0-9_-]+$")  # iptables-save leaves these words unquoted
_CGROUP_PATH_RE = re.compile(r"^[A-Za-z0-9_.:@+\-/]{1,4000}$")
_PROTO_NAMES = {1: "icmp", 6: "tcp", 17: "udp", 50: "esp", 51: "ah", 58: "ipv6-icmp",
                132: "sctp", 136: "udplite"}  # as iptables-save prints them; others by number
_LOG_LETTER = {"override_deny": "o", "deny": "d", "default": "n"}
_SECTION = {"override_deny": "override_deny rules (beat every allow)",
            "allow": "allow rules",
            "deny": "deny rules (an allow above wins: allowed across the boundary)"}


@dataclass(frozen=True)
class _Family:
    version: int
    af: socket.AddressFamily
    set_family: str
    icmp: int
    icmp_type: str  # match prefix for one ICMP type
    dhcp_in: str
    dhcp_out: str
    essential_icmp: tuple[tuple[str, tuple[int, ...]], ...]


V4 = _Family(4, socket.AF_INET, "inet", 1, "-p icmp -m icmp --icmp-type",
             "-p udp -m udp --sport 67 --dport 68", "-p udp -m udp --dport 67",
             (("essential: ICMP errors", (3, 11, 12)),))
V6 = _Family(6, socket.AF_INET6, "inet6", 58, "-p ipv6-icmp -m icmp6 --icmpv6-type",
             "-p udp -m udp --dport 546", "-p udp -m udp --dport 547",
             (("essential: ICMPv6 errors", (1, 2, 3, 4)),
              ("essential: ICMPv6 neighbour discovery", (133, 134, 135, 136, 137)),
              ("essential: ICMPv6 MLD", (130, 131, 132, 143))))


# -- the artefact -------------------------------------------------------------------------------

@dataclass(frozen=True)
class IptablesArtifact:
    """Scripts plus what the apply steps around them need (see `restore_commands`)."""

    ipset: str  # `ipset restore`: run first
    v4: str  # `iptables-restore --noflush`: one transaction
    v6: str  # `ip6tables-restore --noflush`: one transaction
    hooks: tuple[tuple[str, str], ...] = (("INPUT", "BULKHEAD-IN"), ("OUTPUT", "BULKHEAD-OUT"))
    hooked: bool = True  # the transactions expect our hooks present (False: absent)
    set_prefix: str = "bulkhead-"  # our sets; those not in `sets` are destroyed last
    sets: tuple[str, ...] = ()

    def text(self) -> str:
        """All scripts with headers, as `bulkhead policy compile --target iptables` prints."""
        hooks = ", ".join(f"{base} -> {ours}" for base, ours in self.hooks)
        keep = " ".join(self.sets) or "(none)"
        out = ["# Bulkhead iptables artefact. Apply in this order (restore_commands() in",
               "# bulkhead.dataplane.iptables gives the exact commands):",
               "#   1. ipset restore < [ipset]",
               f"#   2. hooks {hooks}: " + (
                   "created, pointing at an empty chain, when missing" if self.hooked
                   else "every one deleted"),
               "#   3. iptables-restore -w --noflush < [v4]",
               "#   4. ip6tables-restore -w --noflush < [v6]",
               f"#   5. ipset destroy every set named {self.set_prefix}* except: {keep}",
               "", "# ==== [ipset] ipset restore ====",
               self.ipset.rstrip("\n") or "# (no sets)",
               "", "# ==== [v4] iptables-restore -w --noflush ====", self.v4.rstrip("\n"),
               "", "# ==== [v6] ip6tables-restore -w --noflush ====", self.v6.rstrip("\n")]
        return "\n".join(out) + "\n"


def restore_commands(art: IptablesArtifact,
                     backend: Backend = "legacy") -> list[tuple[list[str], str]]:
    """(argv, stdin) pairs that apply `art`, in order; stop at the first failure.

    `legacy` (the default) uses iptables-legacy, what a host without nftables has; `nft` the
    nf_tables backend, `default` whatever `iptables` points at. The hook step is idempotent;
    each restore is one transaction; the last step destroys our sets no longer referenced."""
    v4_tool, v6_tool = BACKENDS[backend]
    steps: list[tuple[list[str], str]] = []
    if art.ipset:
        steps.append((["ipset", "restore"], art.ipset))
    prepare = _ensure_hooks_sh if art.hooked else _unhook_sh
    hook_script = "\n".join(prepare(tool, art.hooks) for tool in (v4_tool, v6_tool))
    steps.append((["sh", "-c", "set -e\n" + hook_script], ""))
    steps.append(([f"{v4_tool}-restore", "-w", "--noflush"], art.v4))
    steps.append(([f"{v6_tool}-restore", "-w", "--noflush"], art.v6))
    steps.append((["sh", "-c", _stale_sets_sh(art.set_prefix, art.sets)], ""))
    return steps


def _ensure_hooks_sh(tool: str, hooks: Sequence[tuple[str, str]]) -> str:
    """At least one `-A BASE -j OURS` for each hook; a new one jumps to an empty chain.

    The listing is captured first so that a failing `-S` stops the script (`set -e`)
    instead of reading as "no hook", which would flush a live chain."""
    out = []
    for base, ours in hooks:
        out.append(f"r=$({tool} -w -S {base})\n"
                   f"if ! printf '%s\\n' \"$r\" | grep -qxF -- '-A {base} -j {ours}'; then "
                   f"{tool} -w -N {ours} 2>/dev/null || {tool} -w -F {ours}; "
                   f"{tool} -w -I {base} 1 -j {ours}; fi")
    return "\n".join(out)


def _unhook_sh(tool: str, hooks: Sequence[tuple[str, str]]) -> str:
    return "\n".join(f"while {tool} -w -D {base} -j {ours} 2>/dev/null; do :; done"
                     for base, ours in hooks)


def _stale_sets_sh(prefix: str, keep: Sequence[str]) -> str:
    kept = f"{'|'.join(keep)}) ;; " if keep else ""
    return (f'for s in $(ipset list -n); do case "$s" in {kept}'
            f'{prefix}*) ipset destroy "$s";; esac; done')


# -- public API ---------------------------------------------------------------------------------

def render_iptables(cw: CompiledWorkload, ctx: HostContext, *,
                    inbound_process: InboundProcess = "cgroup") -> IptablesArtifact:
    """The artefact enforcing `cw` on its host (`idle`: the one removing ours).

    `inbound_process="port"` matches process/unit-bound inbound services by port alone (the
    process is then not enforced) instead of failing closed."""
    if cw.enforcement not in ENFORCEMENT:
        raise ValueError(f"unknown enforcement state {cw.enforcement!r}")
    if cw.outbound_mode not in ("enforce", "allow"):
        raise ValueError(f"unknown outbound mode {cw.outbound_mode!r}")
    if cw.os != "linux":
        raise ValueError(f"workload {cw.workload!r} runs {cw.os}: iptables is for linux")
    if not 0 <= ctx.nflog_group <= 65535:
        raise ValueError(f"NFLOG group {ctx.nflog_group} out of range 0-65535")
    if inbound_process not in ("cgroup", "port"):
        raise ValueError(f"inbound_process must be 'cgroup' or 'port', not {inbound_process!r}")
    for rule in cw.inbound + cw.outbound:
        if rule.action not in _SECTION:
            raise ValueError(f"rule {rule.rule_id!r}: unknown action {rule.action!r}")
    if cw.enforcement == "idle":
        return remove_iptables(ctx, reason=f"workload {_text(cw.workload)} is idle")
    r = _Renderer(cw, ctx, inbound_process)
    v4 = r.script(V4)
    v6 = r.script(V6)
    return IptablesArtifact(r.sets.script(), v4, v6, r.hooks, True, r.set_prefix,
                            tuple(s.name for s in r.sets.defs))


def remove_iptables(ctx: HostContext, *, reason: str = "") -> IptablesArtifact:
    """Removes our hooks, chains and sets; safe when none of them exist."""
    chain_in, chain_out, prefix = _names(ctx)
    hooks = (("INPUT", chain_in), ("OUTPUT", chain_out))
    scripts = []
    for fam in (V4, V6):
        lines = [f"# Bulkhead: remove our IPv{fam.version} chains" + (f" ({reason})"
                                                                    if reason else ""),
                 "# The hooks are deleted before; declaring creates or flushes, so this is",
                 "# safe when the chains are absent.", "*filter"]
        lines += [f":{c} - [0:0]" for c in (chain_in, chain_out)]
        lines += [f"-X {c}" for c in (chain_in, chain_out)]
        lines.append("COMMIT")
        scripts.append("\n".join(lines) + "\n")
    return IptablesArtifact("", scripts[0], scripts[1], hooks, False, prefix, ())


def xt_cgroup_path(nft_path: str, level: int) -> str | None:
    """The `-m cgroup --path` for a cgroup that nft knows as `socket cgroupv2 level N PATH`.

    nft resolves PATH under /sys/fs/cgroup (so `unified/bh/db` on a hybrid host), while
    xt_cgroup resolves it from the cgroup2 root (`bh/db`). N is the cgroup's depth below that
    root, so the xt path is the last N components. None when that cannot be derived (N out
    of range, e.g. a mount of a sub-tree) or the path has unsafe characters."""
    if not isinstance(level, int) or not _CGROUP_PATH_RE.match(nft_path):
        return None
    parts = [p for p in nft_path.split("/") if p]
    if not 1 <= level <= len(parts) or any(p in (".", "..") for p in parts):
        return None
    return "/".join(parts[-level:])


# -- names and text ------------------------------------------------------------------------------

def _names(ctx: HostContext) -> tuple[str, str, str]:
    """(inbound chain, outbound chain, set prefix) derived from ctx.table."""
    if not TABLE_RE.match(ctx.table):
        raise ValueError(f"table name {ctx.table!r} must be a letter then up to 11 letters, "
                         "digits or _")
    upper = ctx.table.upper()
    return f"{upper}-IN", f"{upper}-OUT", f"{ctx.table}-"


def _text(s: str) -> str:
    """Text made safe for a `#` line or a comment match."""
    return _UNSAFE.sub("_", s)


def _q(s: str) -> str:
    """A word as iptables-save writes it: bare when plain, else double-quoted."""
    return s if _PLAIN.match(s) else f'"{s}"'


def _comment(s: str) -> str:
    return f"-m comment --comment {_q(_text(s)[:COMMENT_MAX])}"


def _proto(p: int) -> str:
    return _PROTO_NAMES.get(p, str(p))


# -- peer sets ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class _SetDef:
    name: str
    fam: _Family
    kind: str  # h: hash:ip, n: hash:net
    elements: tuple[str, ...]

    def create(self, name: str) -> str:
        kind = "hash:ip" if self.kind == "h" else "hash:net"
        size = 1024
        while size < len(self.elements) // 2 and size < 1 << 20:
            size *= 2
        return (f"create {name} {kind} family {self.fam.set_family} hashsize {size} "
                f"maxelem {SET_MAXELEM} -exist")


@dataclass
class _Sets:
    prefix: str
    defs: list[_SetDef] = field(default_factory=list)
    by_content: dict[tuple[int, str, tuple[str, ...]], str] = field(default_factory=dict)
    peer_index: dict[PeerSet, int] = field(default_factory=dict)
    cache: dict[tuple[PeerSet, int], list[tuple[str, tuple[str, ...]]]] = field(
        default_factory=dict)

    def parts(self, peers: PeerSet, fam: _Family) -> list[tuple[str, tuple[str, ...]]]:
        """(kind, elements) of one family: hosts, then networks; empty parts left out."""
        key = (peers, fam.version)
        got = self.cache.get(key)
        if got is None:
            got = []
            hosts = _hosts(peers.hosts, fam)
            if hosts:
                got.append(("h", hosts))
            nets = _nets(peers, fam)
            if nets:
                got.append(("n", nets))
            self.cache[key] = got
        return got

    def name(self, peers: PeerSet, fam: _Family, kind: str, elements: tuple[str, ...]) -> str:
        key = (fam.version, kind, elements)
        name = self.by_content.get(key)
        if name is None:
            idx = self.peer_index.setdefault(peers, len(self.peer_index))
            name = f"{self.prefix}p{idx}-{kind}{fam.version}"
            if len(name) + 2 > SET_NAME_MAX:
                raise ValueError(f"set name {name!r} too long for ipset")
            if len(elements) > SET_MAXELEM:
                raise ValueError(f"set {name!r}: {len(elements)} elements, at most "
                                 f"{SET_MAXELEM}")
            self.by_content[key] = name
            self.defs.append(_SetDef(name, fam, kind, elements))
        return name

    def script(self) -> str:
        """Fill temporaries, then swap them all live, then destroy the old contents."""
        if not self.defs:
            return ""
        out = ["# Bulkhead ipset update: every set is filled as <name>-t, swapped live,",
               "# and its old contents destroyed; a live set is never half-filled."]
        for d in self.defs:
            tmp = f"{d.name}-t"
            out += [d.create(d.name), d.create(tmp), f"flush {tmp}"]
            out += [f"add {tmp} {e}" for e in d.elements]
        out += [f"swap {d.name}-t {d.name}" for d in self.defs]
        out += [f"destroy {d.name}-t" for d in self.defs]
        return "\n".join(out) + "\n"


def _hosts(hosts: Iterable[str], fam: _Family) -> tuple[str, ...]:
    return family_hosts(hosts, fam.version)


def _nets(peers: PeerSet, fam: _Family) -> tuple[str, ...]:
    """Networks of one family as CIDRs; hash:net rejects /0, so it becomes two /1."""
    out: list[str] = []
    for c in peers.nets.cidrs(fam.version):
        if c.endswith("/0"):
            out += ["0.0.0.0/1", "128.0.0.0/1"] if fam.version == 4 else ["::/1", "8000::/1"]
        else:
            out.append(c)
    return tuple(out)


# -- services -----------------------------------------------------------------------------------

def _port_chunks(ranges: Iterable[tuple[int, int]]) -> list[str]:
    """Merged port ranges as multiport lists of at most MULTIPORT_SLOTS slots each."""
    merged: list[list[int]] = []
    for lo, hi in sorted(ranges):
        if merged and lo <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    chunks: list[list[str]] = [[]]
    used = 0
    for lo, hi in merged:
        cost = 1 if lo == hi else 2
        if used + cost > MULTIPORT_SLOTS:
            chunks.append([])
            used = 0
        chunks[-1].append(str(lo) if lo == hi else f"{lo}:{hi}")
        used += cost
    return [",".join(c) for c in chunks if c]


def _service_matches(specs: Sequence[PortSpec], fam: _Family, action: str) -> list[str]:
    """The protocol matches of `specs` for one family, one rule each ("" = every packet)."""
    if any(s.proto is None for s in specs):
        return [""]
    if any(s.proto == 0 for s in specs):
        # `-p 0` means every protocol to iptables: exact for no flow, so fail closed
        if action != "allow":
            return [""]
        specs = [s for s in specs if s.proto != 0]
    whole: set[int] = set()
    ported: dict[int, list[tuple[int, int]]] = {}
    icmp_types: set[int] = set()
    for s in specs:
        assert s.proto is not None
        if s.proto in ICMP_PROTOS and s.proto != fam.icmp:
            continue  # the other family's ICMP: never matches here
        if s.lo is None:
            whole.add(s.proto)
        elif s.proto in PORTED:
            ported.setdefault(s.proto, []).append((s.lo, s.hi if s.hi is not None else s.lo))
        else:
            icmp_types.add(s.lo)
    out = [f"-p {_proto(p)} -m multiport --dports {chunk}"
           for p in sorted(ported) if p not in whole for chunk in _port_chunks(ported[p])]
    if fam.icmp not in whole:
        out += [f"{fam.icmp_type} {t}" for t in sorted(icmp_types)]
    out += [f"-p {_proto(p)}" for p in sorted(whole)]
    return out


def _uid_ranges(uids: Iterable[int]) -> list[str]:
    out: list[list[int]] = []
    for u in sorted(set(uids)):
        if out and u == out[-1][1] + 1:
            out[-1][1] = u
        else:
            out.append([u, u])
    return [str(a) if a == b else f"{a}-{b}" for a, b in out]


# -- rules --------------------------------------------------------------------------------------

class _Renderer:
    def __init__(self, cw: CompiledWorkload, ctx: HostContext,
                 inbound_process: InboundProcess) -> None:
        self.cw = cw
        self.ctx = ctx
        self.chain_in, self.chain_out, self.set_prefix = _names(ctx)
        self.hooks = (("INPUT", self.chain_in), ("OUTPUT", self.chain_out))
        self.sets = _Sets(self.set_prefix)
        self.inbound_process = inbound_process
        self.drop_rules = cw.enforcement in ("full", "selective")
        self.drop_default = cw.enforcement == "full"

    def script(self, fam: _Family) -> str:
        cw = self.cw
        lines = [f"# Bulkhead iptables (IPv{fam.version}) ruleset for workload "
                 f"{_text(cw.workload)}",
                 f"# enforcement: {cw.enforcement}; outbound: {cw.outbound_mode}; "
                 f"addresses: {_text(' '.join(cw.addresses)) or '-'}",
                 "# One transaction: our chains are refilled and re-hooked at the top of",
                 "# INPUT/OUTPUT atomically; other rules are untouched. Generated; do not edit.",
                 "*filter", f":{self.chain_in} - [0:0]", f":{self.chain_out} - [0:0]"]
        for base, ours in self.hooks:
            lines += [f"-D {base} -j {ours}", f"-I {base} 1 -j {ours}"]
        lines += self.chain(fam, inbound=True)
        if cw.outbound_mode == "enforce":
            lines += self.chain(fam, inbound=False)
        else:
            lines.append("# settings.outbound is allow: outbound is not filtered")
            lines.append(f"-A {self.chain_out} {_comment('outbound: allow')} -j RETURN")
        lines.append("COMMIT")
        return "\n".join(lines) + "\n"

    def line(self, chain: str, parts: Iterable[str], comment: str, targets: list[str]) -> list[str]:
        head = " ".join(["-A", chain, *(p for p in parts if p), _comment(comment)])
        return [f"{head} {t}" for t in targets]

    def targets(self, action: str, instance: str) -> list[str]:
        if action == "allow":
            return ["-j ACCEPT"]
        drop = self.drop_default if action == "default" else self.drop_rules
        prefix = _q(f"bh:{_LOG_LETTER[action]}:{instance}")
        return [f"-j NFLOG --nflog-prefix {prefix} --nflog-group {self.ctx.nflog_group}",
                "-j DROP" if drop else "-j ACCEPT"]

    def essential(self, fam: _Family, inbound: bool) -> list[str]:
        chain = self.chain_in if inbound else self.chain_out
        out = self.line(chain, ["-i lo" if inbound else "-o lo"], "essential: loopback",
                        ["-j ACCEPT"])
        out += self.line(chain, ["-m conntrack --ctstate RELATED,ESTABLISHED"],
                         "essential: established/related", ["-j ACCEPT"])
        for ep in self.ctx.control_plane:
            try:
                addr = ipaddress.ip_address(ep.address)
            except ValueError:
                raise ValueError(f"control-plane address {ep.address!r} is not an IP") from None
            if ep.port is not None and not 1 <= ep.port <= 65535:
                raise ValueError(f"control-plane port {ep.port} out of range 1-65535")
            if addr.version != fam.version:
                continue
            where = f"-s {addr}/{addr.max_prefixlen}" if inbound else (
                f"-d {addr}/{addr.max_prefixlen}")
            port = "" if ep.port is None else (
                f" -m tcp --{'sport' if inbound else 'dport'} {ep.port}")
            out += self.line(chain, [where, f"-p tcp{port}"], "essential: control plane",
                             ["-j ACCEPT"])
        out += self.line(chain, [fam.dhcp_in if inbound else fam.dhcp_out],
                         f"essential: DHCP{'v6' if fam.version == 6 else 'v4'}", ["-j ACCEPT"])
        for comment, types in fam.essential_icmp:
            for t in types:
                out += self.line(chain, [f"{fam.icmp_type} {t}"], comment, ["-j ACCEPT"])
        return out

    def chain(self, fam: _Family, *, inbound: bool) -> list[str]:
        chain = self.chain_in if inbound else self.chain_out
        out = ["# essential traffic: never blocked", *self.essential(fam, inbound)]
        rules = self.cw.inbound if inbound else self.cw.outbound
        for action in ("override_deny", "allow", "deny"):
            lines: list[str] = []
            for rule in rules:
                if rule.action == action:
                    lines += self.rule(rule, fam, inbound=inbound)
            if lines:
                out += [f"# {_SECTION[action]}", *lines]
        out.append(f"# default (no rule): {'drop' if self.drop_default else 'log only'}")
        out += self.line(chain, [], "default: no rule", self.targets("default", "-"))
        return out

    def groups(self, rule: CompiledRule, *, inbound: bool) -> list[ServiceGroup]:
        """The rule's services grouped by their process/unit binding (inbound only)."""
        plain, bound = group_services(rule, inbound=inbound)
        out = [ServiceGroup(plain)] if plain else []
        out += [self.bound_group(rule, process, unit, specs)
                for (process, unit), specs in bound]
        return out

    def bound_group(self, rule: CompiledRule, process: str | None, unit: str | None,
                    specs: list[PortSpec]) -> ServiceGroup:
        named = [(k, n) for k, n in (("process", process), ("unit", unit)) if n]
        what = " and ".join(f"{k} {_text(n)}" for k, n in named)
        ports = ", ".join(str(s) for s in specs)
        rid = _text(rule.rule_id)
        if self.inbound_process == "port":
            return ServiceGroup(specs, notes=[f"# {rid}: {ports} of {what} matched by port alone "
                                        "(inbound_process=port): the process is not enforced"])
        paths: list[str] = []
        missing: list[str] = []
        for kind, name in named:
            got = self.ctx.cgroups.get(name)
            path = xt_cgroup_path(got[0], got[1]) if got is not None else None
            if path is None:
                missing.append(f"{kind} {_text(name)}")
            else:
                paths.append(path)
        if rule.action == "allow":
            if missing:
                return ServiceGroup([], notes=[f"# {rid}: no usable cgroup for "
                                         f"{' and '.join(missing)}: {ports} not allowed "
                                         "(fail closed)"])
            return ServiceGroup(specs, " ".join(f"-m cgroup --path {_q(p)}" for p in paths),
                          [f"# {rid}: {ports} only for {what}; xt_cgroup cannot see the "
                           "listener of a new connection, so this admits none (fail closed)"])
        why = (f"no usable cgroup for {' and '.join(missing)}" if missing
               else "xt_cgroup cannot match a new inbound connection")
        return ServiceGroup(specs, notes=[f"# {rid}: {why}: {ports} {rule.action} widened to every "
                                    "process (fail closed)"])

    def rule(self, rule: CompiledRule, fam: _Family, *, inbound: bool) -> list[str]:
        """The iptables rules (and explanatory comments) for one compiled rule."""
        if not rule.peers:
            return []
        chain, direction, local_flag = ((self.chain_in, "src", "-d") if inbound
                                        else (self.chain_out, "dst", "-s"))
        locals_ = [""] if rule.local is None else [
            f"{local_flag} {c}" for c in rule.local.cidrs(fam.version)]
        owners = [""]
        if not inbound and rule.users is not None:
            uids = [uid for user, uid in self.ctx.uids.items() if user in rule.users
                    and isinstance(uid, int) and 0 <= uid < 2**32]
            if not uids:
                return [f"# {_text(rule.rule_id)}: none of its users has a uid on this host"]
            owners = [f"-m owner --uid-owner {r}" for r in _uid_ranges(uids)]
        targets = self.targets(rule.action, str(int(rule.instance)))
        out: list[str] = []
        for group in self.groups(rule, inbound=inbound):
            out += group.notes
            services = _service_matches(group.specs, fam, rule.action) if group.specs else []
            if not services or not locals_:
                continue
            for kind, elements in self.sets.parts(rule.peers, fam):
                match = f"-m set --match-set {self.sets.name(rule.peers, fam, kind, elements)} "
                for loc in locals_:
                    for svc in services:
                        for owner in owners:
                            parts = [loc, svc, match + direction, owner, group.extra]
                            out += self.line(chain, parts, rule.rule_id, targets)
        return out
