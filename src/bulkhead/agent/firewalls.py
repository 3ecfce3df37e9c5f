"""Other firewall managers on the host: their drops still apply after Bulkhead's accept.

`detect` is pure: it reads `nft -j list ruleset` JSON and `iptables-save` text (IPv4 and IPv6,
legacy and nft variants concatenated) and returns one `Warning` per manager found: Docker,
firewalld, ufw, kube-proxy, plus any other non-empty nftables table ("nftables") or iptables
rules ("iptables"). Bulkhead's own table (`own_table`, any family) and its own iptables chains
(`<OWN>-IN`, `<OWN>-OUT` and the jumps to them) are ignored. `scan` does the I/O.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from typing import Any

__all__ = ["Warning", "detect", "scan"]

# Tables iptables-nft creates; their content is reported from iptables-save instead.
_XT_TABLES = {"filter", "nat", "mangle", "raw", "security"}
_SBIN = ("/usr/local/sbin", "/usr/sbin", "/sbin")


@dataclass(frozen=True)
class Warning:  # the name is part of the agent-sensors interface (shadows the builtin)
    manager: str  # docker | firewalld | ufw | kube-proxy | nftables | iptables | scan
    detail: str


def _manager_of_name(name: str) -> str | None:
    low = name.lower()
    if low.startswith("docker") or low.startswith("docker-"):
        return "docker"
    if low.startswith("ufw-") or low.startswith("ufw6-"):
        return "ufw"
    if low.startswith("kube-") or low == "kube-proxy":
        return "kube-proxy"
    if low == "firewalld" or low.startswith(("in_", "fwd_", "out_", "fwdi_", "fwdo_")) or \
            low.endswith(("_direct", "_zones", "_zones_source")):
        return "firewalld"
    return None


def _manager_of_word(word: str) -> str | None:
    """A rule's interface or comment naming its manager (`-o docker0`, `br-1a2b`...)."""
    low = word.strip('"').lower()
    if low.startswith(("docker", "br-")):
        return "docker"
    if low.startswith("kube-"):
        return "kube-proxy"
    if low.startswith("ufw"):
        return "ufw"
    return None


def _nft_items(ruleset: dict[str, Any]) -> list[dict[str, Any]]:
    items = ruleset.get("nftables") if isinstance(ruleset, dict) else None
    return [i for i in items if isinstance(i, dict)] if isinstance(items, list) else []


def _detect_nft(ruleset: dict[str, Any], own: str, found: dict[str, list[str]]) -> None:
    rules: dict[tuple[str, str], int] = {}
    chains: dict[tuple[str, str], list[str]] = {}
    tables: list[tuple[str, str]] = []
    for item in _nft_items(ruleset):
        for kind in ("table", "chain", "rule"):
            obj = item.get(kind)
            if not isinstance(obj, dict):
                continue
            fam, table = str(obj.get("family", "")), str(obj.get("table", obj.get("name", "")))
            if kind == "table":
                tables.append((fam, table))
            elif kind == "chain":
                chains.setdefault((fam, table), []).append(str(obj.get("name", "")))
            else:
                rules[(fam, table)] = rules.get((fam, table), 0) + 1
    for fam, table in tables:
        if table == own:
            continue
        key = (fam, table)
        manager = _manager_of_name(table)
        if manager is None:
            for chain in chains.get(key, []):
                manager = _manager_of_name(chain)
                if manager:
                    break
        n = rules.get(key, 0)
        if manager is not None:
            if fam in ("ip", "ip6") and table in _XT_TABLES:
                continue  # iptables-nft: reported from iptables-save
            found.setdefault(manager, []).append(f"nft table {fam} {table} ({n} rules)")
        elif n and not (fam in ("ip", "ip6", "arp", "bridge") and table in _XT_TABLES):
            found.setdefault("nftables", []).append(f"nft table {fam} {table} ({n} rules)")


def _detect_iptables(text: str, own: str, found: dict[str, list[str]]) -> None:
    mine = (f"{own.upper()}-IN", f"{own.upper()}-OUT")
    table = "?"
    other: dict[str, int] = {}
    per_manager: dict[str, dict[str, int]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("*"):
            table = line[1:]
        elif line.startswith(":"):
            parts = line[1:].split()
            # a built-in chain whose policy is not ACCEPT drops on its own
            if len(parts) >= 2 and parts[1] in ("DROP", "REJECT"):
                other[f"{table}/{parts[0]} policy {parts[1]}"] = 1
        elif line.startswith("-A "):
            words = line.split()
            chain = words[1] if len(words) > 1 else ""
            target = words[words.index("-j") + 1] if "-j" in words[:-1] else ""
            if chain in mine or target in mine:
                continue
            manager = _manager_of_name(chain) or _manager_of_name(target) or next(
                (m for w in words[2:] if (m := _manager_of_word(w))), None)
            if manager is not None:
                counts = per_manager.setdefault(manager, {})
                counts[table] = counts.get(table, 0) + 1
            else:
                key = f"{table}/{chain}"
                other[key] = other.get(key, 0) + 1
    for manager, counts in per_manager.items():
        detail = ", ".join(f"{n} rules in {t}" for t, n in sorted(counts.items()))
        found.setdefault(manager, []).append(f"iptables: {detail}")
    if other:
        detail = ", ".join(k if "policy" in k else f"{k}: {n} rules"
                           for k, n in sorted(other.items()))
        found.setdefault("iptables", []).append(f"iptables rules outside Bulkhead ({detail})")


def detect(nft_ruleset_json: dict[str, Any], iptables_save: str, own_table: str) -> list[Warning]:
    """One Warning per other firewall manager found (pure; see the module docstring)."""
    found: dict[str, list[str]] = {}
    _detect_nft(nft_ruleset_json, own_table, found)
    _detect_iptables(iptables_save, own_table, found)
    order = ["docker", "firewalld", "ufw", "kube-proxy", "nftables", "iptables"]
    return [Warning(m, "; ".join(dict.fromkeys(found[m])))
            for m in sorted(found, key=lambda m: order.index(m) if m in order else 99)]


def _run(argv: list[str], netns: str | None) -> str:
    if netns is not None:
        argv = ["nsenter", f"--net={netns}", *argv]
    cp = subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False)
    if cp.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({cp.returncode}): {cp.stderr.strip()}")
    return cp.stdout


def scan(own_table: str = "bulkhead", *, netns: str | None = None) -> list[Warning]:
    """Run `nft -j list ruleset` and the iptables-save variants present, then `detect`.

    A missing tool is skipped; a failing one becomes a Warning with manager "scan"."""
    path = os.pathsep.join([os.environ.get("PATH", ""), *_SBIN])
    problems: list[Warning] = []
    ruleset: dict[str, Any] = {}
    nft = shutil.which("nft", path=path)
    if nft:
        try:
            ruleset = json.loads(_run([nft, "-j", "list", "ruleset"], netns) or "{}")
        except (OSError, RuntimeError, subprocess.TimeoutExpired, json.JSONDecodeError) as exc:
            problems.append(Warning("scan", f"nft -j list ruleset: {exc}"))
    texts: list[str] = []
    seen_tools: set[tuple[str, bool]] = set()
    for tool in ("iptables-save", "ip6tables-save", "iptables-legacy-save",
                 "ip6tables-legacy-save"):
        exe = shutil.which(tool, path=path)
        if exe is None:
            continue
        real = os.path.realpath(exe)
        if (real, tool.startswith("ip6")) in seen_tools:
            continue  # iptables-save may itself be the legacy binary
        seen_tools.add((real, tool.startswith("ip6")))
        try:
            texts.append(_run([exe], netns))
        except (OSError, RuntimeError, subprocess.TimeoutExpired) as exc:
            problems.append(Warning("scan", f"{tool}: {exc}"))
    return detect(ruleset, "\n".join(texts), own_table) + problems
