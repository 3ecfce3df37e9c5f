"""Host inventory in the shape of `PUT /api/v1/agents/{id}/inventory` (server InventoryIn).

`collect()` gathers hostname, interfaces and addresses (`ip -j addr`, `lo` skipped) and the
listening sockets with their process (`ProcessResolver.listening()`); `build()` is the pure
part. `fingerprint()` hashes an inventory canonically so the runtime reports only on change.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
from typing import Any

from bulkhead.agent.procs import ListeningSocket, ProcessResolver

__all__ = ["InventoryError", "build", "collect", "fingerprint", "interfaces_from_ip_json"]

_MAX_INTERFACES, _MAX_ADDRESSES, _MAX_LISTENING = 256, 256, 8192
_MAX_CMDLINE, _MAX_PROCESS, _MAX_UNIT = 8192, 4096, 256
_SBIN = ("/usr/local/sbin", "/usr/sbin", "/sbin")


class InventoryError(RuntimeError):
    """A tool the inventory needs failed or printed something unexpected."""


def interfaces_from_ip_json(links: Any) -> list[dict[str, Any]]:
    """`ip -j addr` output -> [{name, mac, addresses}], `lo` skipped, sorted by name.

    Raises InventoryError naming the entry when the JSON is not the expected list of links."""
    if not isinstance(links, list):
        raise InventoryError("ip -j addr: expected a JSON list of links")
    out: list[dict[str, Any]] = []
    for i, link in enumerate(links):
        if not isinstance(link, dict) or not isinstance(link.get("ifname"), str):
            raise InventoryError(f"ip -j addr: link #{i} has no ifname")
        name = link["ifname"]
        if name == "lo" or link.get("link_type") == "loopback":
            continue
        mac = link.get("address")
        if not isinstance(mac, str) or link.get("link_type") not in ("ether", None):
            mac = None  # tunnels, none/ipip links: their "address" is not a MAC
        addresses: list[str] = []
        for a in link.get("addr_info") or []:
            local = a.get("local") if isinstance(a, dict) else None
            if isinstance(local, str) and local not in addresses:
                addresses.append(local)
        out.append({"name": name[:64], "mac": mac, "addresses": addresses[:_MAX_ADDRESSES]})
    out.sort(key=lambda d: d["name"])
    return out[:_MAX_INTERFACES]


def build(hostname: str, interfaces: list[dict[str, Any]],
          listening: list[ListeningSocket]) -> dict[str, Any]:
    """The inventory document from its parts (pure): sorted, de-duplicated, within limits."""
    rows: dict[tuple[str, int, str], dict[str, Any]] = {}
    for s in listening:
        key = (s.proto, s.port, s.addr)
        if key in rows and rows[key]["process"] is not None:
            continue
        p = s.process
        rows[key] = {
            "proto": s.proto,
            "port": s.port,
            "addr": s.addr,
            "process": p.exe[:_MAX_PROCESS] if p else None,
            "cmdline": p.cmdline[:_MAX_CMDLINE] if p else None,
            "unit": p.unit[:_MAX_UNIT] if p and p.unit else None,
        }
    return {
        "hostname": hostname,
        "os": "linux",
        "interfaces": interfaces,
        "listening": [rows[k] for k in sorted(rows)][:_MAX_LISTENING],
    }


def _ip_json(netns: str | None) -> Any:
    ip = shutil.which("ip", path=os.pathsep.join([os.environ.get("PATH", ""), *_SBIN]))
    if ip is None:
        raise InventoryError("`ip` (iproute2) not found on PATH")
    argv = [ip, "-j", "addr", "show"]
    if netns is not None:
        argv = ["nsenter", f"--net={netns}", *argv]
    try:
        cp = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise InventoryError(f"{' '.join(argv)}: {exc}") from exc
    if cp.returncode != 0:
        raise InventoryError(f"{' '.join(argv)} failed: {cp.stderr.strip()}")
    try:
        return json.loads(cp.stdout or "[]")
    except json.JSONDecodeError as exc:
        raise InventoryError(f"{' '.join(argv)}: bad JSON at line {exc.lineno}: {exc}") from exc


def collect(
    hostname: str | None = None,
    resolver: ProcessResolver | None = None,
    *,
    netns: str | None = None,
) -> dict[str, Any]:
    """The host's inventory now. Uses (and does not close) `resolver` when given."""
    own = resolver is None
    res = resolver if resolver is not None else ProcessResolver(netns=netns)
    try:
        listening = res.listening()
    finally:
        if own:
            res.close()
    return build(hostname or socket.gethostname(), interfaces_from_ip_json(_ip_json(netns)),
                 listening)


def fingerprint(inv: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON of `inv`; list order does not matter."""

    def canon(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: canon(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            items = [canon(x) for x in v]
            return sorted(items, key=lambda x: json.dumps(x, sort_keys=True))
        return v

    text = json.dumps(canon(inv), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()
