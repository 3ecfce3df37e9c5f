"""Control-plane settings, from the environment (`BULKHEAD_*`) with zero-set-up defaults."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


def _default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "bulkhead"


@dataclass(frozen=True)
class Settings:
    data_dir: Path = field(default_factory=_default_data_dir)
    database_url: str | None = None  # default: SQLite file in data_dir
    flows_path: Path | None = None  # default: DuckDB file in data_dir
    max_body_bytes: int = 32 * 1024 * 1024
    session_hours: float = 12.0
    agent_offline_after_s: float = 900.0  # missed heartbeats before "agent offline"
    long_poll_max_s: float = 60.0

    @classmethod
    def from_env(cls, **overrides: object) -> Settings:
        env = os.environ
        values: dict[str, object] = {}
        if "BULKHEAD_DATA_DIR" in env:
            values["data_dir"] = Path(env["BULKHEAD_DATA_DIR"])
        if "BULKHEAD_DATABASE_URL" in env:
            values["database_url"] = env["BULKHEAD_DATABASE_URL"]
        if "BULKHEAD_FLOWS_PATH" in env:
            values["flows_path"] = Path(env["BULKHEAD_FLOWS_PATH"])
        if "BULKHEAD_MAX_BODY_BYTES" in env:
            values["max_body_bytes"] = int(env["BULKHEAD_MAX_BODY_BYTES"])
        values.update(overrides)
        return cls(**values)  # type: ignore[arg-type]

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'bulkhead.db'}"

    @property
    def flows_file(self) -> Path:
        return self.flows_path or self.data_dir / "flows.duckdb"
