"""Programming the host firewall: render, check, apply atomically, read back, remove.

`Enforcer.apply(cw, ctx)` renders the compiled policy with the project's renderers
(`render_nftables`, or `render_iptables` + `restore_commands` where there is no `nft`),
checks it (`nft -c -f -`), then applies it as one transaction (`nft -f -`: the old table is
replaced whole, or not at all). When any step fails it raises `ApplyError` and the ruleset
running before stays in place (the last good one). All four enforcement states go through
the same single apply (`idle` renders a script that only removes our table), so switching
between them is atomic too.

After each apply the enforcer reads our table back (`nft -j list table inet T`), normalises
it (no handles, no counter values) and keeps its digest: `check()` compares the live table to
it and names what changed (tamper.py). The control-plane endpoints in `HostContext` are
always accepted by the renderers, so applying never cuts the agent off its server.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from bulkhead.dataplane.iptables import remove_iptables, render_iptables, restore_commands
from bulkhead.dataplane.model import CompiledWorkload, Endpoint, HostContext
from bulkhead.dataplane.nftables import remove_nftables, render_nftables

Runner = Callable[[Sequence[str], str], tuple[int, str, str]]  # argv, stdin -> rc, out, err
NFT_CGROUP_BASE = "/sys/fs/cgroup"


class ApplyError(RuntimeError):
    pass


def run_command(argv: Sequence[str], stdin: str) -> tuple[int, str, str]:
    try:
        cp = subprocess.run(list(argv), input=stdin, capture_output=True, text=True,
                            timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return 127, "", f"{argv[0]}: {exc}"
    return cp.returncode, cp.stdout, cp.stderr


def detect_backend() -> str:
    """`nft` when the nft tool exists, else `iptables` (with ipset)."""
    return "nft" if shutil.which("nft") else "iptables"


# -- host facts for the renderers ------------------------------------------------------------
def cgroup2_root() -> tuple[str, int]:
    """(cgroup2 mount point relative to /sys/fs/cgroup, depth of its root in the hierarchy)."""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fields, tail = left.split(), right.split()
                if len(fields) >= 5 and tail and tail[0] == "cgroup2":
                    mount, root = fields[4], fields[3]
                    rel = os.path.relpath(mount, NFT_CGROUP_BASE)
                    return ("" if rel == "." else rel), len([p for p in root.split("/") if p])
    except OSError:
        pass
    return "", 0


def host_context(cw: CompiledWorkload, control_plane: Iterable[Endpoint],
                 processes: Iterable[tuple[str | None, str | None, str | None]],
                 *, table: str = "bulkhead", nflog_group: int = 7,
                 cgroup_base: tuple[str, int] = ("", 0)) -> HostContext:
    """The renderers' host facts. `processes` are (executable, unit, cgroup path as in
    /proc/PID/cgroup) of listening processes; each process or unit named by an inbound
    service gets the cgroup of the first listener matching it (none: the renderer fails
    closed for that service)."""
    wanted: set[str] = set()
    for rule in cw.inbound:
        for svc in rule.services:
            wanted.update(n for n in (svc.process, svc.unit) if n)
    cgroups: dict[str, tuple[str, int]] = {}
    mount, depth = cgroup_base
    for exe, unit, cgroup in processes:
        if not cgroup or not cgroup.startswith("/") or cgroup == "/":
            continue
        name = exe.rsplit("/", 1)[-1] if exe else None
        parts = [p for p in cgroup.split("/") if p]
        path = "/".join([mount, *parts] if mount else parts)
        for key in (name, unit):
            if key and key in wanted and key not in cgroups:
                cgroups[key] = (path, depth + len(parts))
    return HostContext(control_plane=tuple(control_plane), cgroups=cgroups,
                       nflog_group=nflog_group, table=table)


# -- reading our table back --------------------------------------------------------------------
def _strip(obj: Any) -> Any:
    """Normalised nft JSON: no handles, no counter values (they change with traffic)."""
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            if k == "handle":
                continue
            if k == "counter" and isinstance(v, dict):
                out[k] = {}
                continue
            out[k] = _strip(v)
        return out
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def describe_items(items: list[Any]) -> dict[str, str]:
    """One short text per table object (chain, rule, set), keyed by a stable identity."""
    out: dict[str, str] = {}
    counts: dict[str, int] = {}
    for item in items:
        if not isinstance(item, dict) or len(item) != 1:
            continue
        (kind, body), = item.items()
        if kind in ("metainfo", "table"):
            continue
        if not isinstance(body, dict):
            continue
        text = json.dumps(body, sort_keys=True)
        if kind == "rule":
            base = f"rule in chain {body.get('chain')}"
            n = counts.get(base, 0)
            counts[base] = n + 1
            out[f"{base} #{n}"] = text
        else:
            out[f"{kind} {body.get('name')}"] = text
    return out


@dataclass
class Snapshot:
    present: bool
    digest: str
    items: dict[str, str]


class Enforcer:
    def __init__(self, *, table: str = "bulkhead", backend: str | None = None,
                 run: Runner = run_command, iptables_backend: str | None = None) -> None:
        self.table = table
        self.backend = backend or detect_backend()
        self.run = run
        self.ipt_backend = iptables_backend or (
            "legacy" if shutil.which("iptables-legacy") else "default")
        self.expected: Snapshot | None = None  # None: nothing applied yet

    # -- apply -----------------------------------------------------------------------------
    def apply(self, cw: CompiledWorkload, ctx: HostContext) -> str:
        """Program `cw`; return the enforcement state now running. ApplyError on failure."""
        try:
            if self.backend == "nft":
                self._nft(render_nftables(cw, ctx))
            else:
                self._iptables(render_iptables(cw, ctx))
        except ValueError as exc:
            raise ApplyError(f"cannot render policy: {exc}") from None
        self.expected = self.snapshot()
        return cw.enforcement

    def remove(self, ctx: HostContext) -> None:
        """Remove everything of ours (safe when nothing is there)."""
        if self.backend == "nft":
            self._nft(remove_nftables(ctx), check=False)
        else:
            self._iptables(remove_iptables(ctx))
        self.expected = None

    def _nft(self, script: str, *, check: bool = True) -> None:
        if check:
            rc, _, err = self.run(["nft", "-c", "-f", "-"], script)
            if rc != 0:
                raise ApplyError(f"nft -c rejected the ruleset: {err.strip()[:1500]}")
        rc, _, err = self.run(["nft", "-f", "-"], script)
        if rc != 0:
            raise ApplyError(f"nft -f failed: {err.strip()[:1500]}")

    def _iptables(self, art: Any) -> None:
        backend: Literal["legacy", "nft", "default"] = (
            "legacy" if self.ipt_backend == "legacy" else "default")
        for argv, stdin in restore_commands(art, backend):
            rc, _, err = self.run(argv, stdin)
            if rc != 0:
                raise ApplyError(f"{' '.join(argv[:2])} failed: {err.strip()[:1500]}")

    # -- read back -------------------------------------------------------------------------
    def snapshot(self) -> Snapshot:
        if self.backend == "nft":
            rc, out, err = self.run(["nft", "-j", "list", "table", "inet", self.table], "")
            if rc != 0:
                if "No such file" in err or "does not exist" in err:
                    return Snapshot(False, "", {})
                raise ApplyError(f"nft list table failed: {err.strip()[:500]}")
            try:
                data = json.loads(out)
            except ValueError as exc:
                raise ApplyError(f"nft -j printed no JSON: {exc}") from None
            items = _strip(data.get("nftables", []) if isinstance(data, dict) else [])
            described = describe_items(items)
        else:
            described = {}
            chain = self.table.upper()
            for tool in ("iptables", "ip6tables"):
                exe = f"{tool}-legacy-save" if self.ipt_backend == "legacy" else f"{tool}-save"
                rc, out, err = self.run([exe, "-t", "filter"], "")
                if rc != 0:
                    raise ApplyError(f"{exe} failed: {err.strip()[:500]}")
                n = 0
                for line in out.splitlines():
                    if chain in line and not line.startswith("#"):
                        described[f"{tool} line #{n}"] = line.split(" [")[0]
                        n += 1
        present = bool(described)
        digest = hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()
        return Snapshot(present, digest if present else "", described)

    def check(self) -> tuple[bool, str]:
        """(changed?, what changed) comparing the live table with the one we applied."""
        if self.expected is None:
            return False, ""
        live = self.snapshot()
        if live.digest == self.expected.digest:
            return False, ""
        return True, diff_text(self.table, self.expected, live)


def diff_text(table: str, expected: Snapshot, live: Snapshot) -> str:
    if expected.present and not live.present:
        return f"table inet {table} was removed (ruleset flushed or table deleted)"
    if not expected.present and live.present:
        return f"table inet {table} appeared while it should be absent"
    gone = sorted(k for k in expected.items if k not in live.items)
    new = sorted(k for k in live.items if k not in expected.items)
    changed = sorted(k for k in expected.items
                     if k in live.items and expected.items[k] != live.items[k])
    parts = []
    for label, keys in (("removed", gone), ("added", new), ("changed", changed)):
        if keys:
            shown = ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
            parts.append(f"{label}: {shown}")
    return f"table inet {table} modified: " + "; ".join(parts or ["contents differ"])
