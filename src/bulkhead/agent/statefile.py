"""The agent's state directory (default `/var/lib/bulkhead-agent`).

    credential.json   0600  {server, agent_id, credential, workload}: the pairing
    policy.json       0600  {version, document}: the last policy applied successfully
    status.json       0644  what `bulkhead agent status` shows, rewritten as it changes
    spool/                  flow batches not yet acknowledged (see spool.py)

Every file is written atomically (temporary file, fsync, rename). Several agents on one host
(the lab: one per network namespace) each take their own directory.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bulkhead.agent.spool import write_atomic

DEFAULT_STATE_DIR = Path("/var/lib/bulkhead-agent")


class StateError(RuntimeError):
    pass


@dataclass(frozen=True)
class Credential:
    server: str
    agent_id: int
    credential: str
    workload: str


class StateDir:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.path, 0o700)

    @property
    def spool_dir(self) -> Path:
        return self.path / "spool"

    def _read(self, name: str) -> dict[str, Any] | None:
        path = self.path / name
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise StateError(f"{path}: unreadable: {exc}") from None
        if not isinstance(data, dict):
            raise StateError(f"{path}: expected a JSON object")
        return data

    # -- credential ------------------------------------------------------------------------
    def credential(self) -> Credential | None:
        data = self._read("credential.json")
        if data is None:
            return None
        path = self.path / "credential.json"
        for key, kind in (("server", str), ("agent_id", int), ("credential", str),
                          ("workload", str)):
            if not isinstance(data.get(key), kind):
                raise StateError(f"{path}: field {key}: expected {kind.__name__}")
        return Credential(data["server"], data["agent_id"], data["credential"],
                          data["workload"])

    def save_credential(self, cred: Credential) -> None:
        write_atomic(self.path / "credential.json", json.dumps(cred.__dict__).encode(), 0o600)
        os.chmod(self.path / "credential.json", 0o600)

    def clear_credential(self) -> None:
        (self.path / "credential.json").unlink(missing_ok=True)

    # -- last good policy ------------------------------------------------------------------
    def policy(self) -> tuple[str, Any] | None:
        data = self._read("policy.json")
        if data is None or not isinstance(data.get("version"), str):
            return None
        return data["version"], data.get("document")

    def save_policy(self, version: str, document: Any) -> None:
        write_atomic(self.path / "policy.json",
                     json.dumps({"version": version, "document": document}).encode(), 0o600)

    def clear_policy(self) -> None:
        (self.path / "policy.json").unlink(missing_ok=True)

    # -- status ----------------------------------------------------------------------------
    def status(self) -> dict[str, Any] | None:
        return self._read("status.json")

    def save_status(self, status: dict[str, Any]) -> None:
        write_atomic(self.path / "status.json",
                     json.dumps(status, default=str, sort_keys=True).encode(), 0o644)
