"""The on-disk flow spool: batches wait here until the control plane acknowledges them.

One file per batch, `<batch id>.n<rows>.json`, written to a temporary name, fsync'd, renamed
into place and the directory fsync'd, so a batch is either whole on disk or absent. A batch is
removed only after the server acknowledged it (stored, or already stored: a duplicate), so
nothing acknowledged is lost and nothing is re-sent under a new id. Batch ids come from a
sequence number persisted in `state.json` *before* the batch file is written: after a
restart the spool resumes with the same ids for the batches it holds and never reuses an id
for new data (the server would take it for a retry and drop it).

The spool is bounded (`max_bytes`, `max_batches`); when a new batch does not fit, the oldest
batches are dropped and the flows they held are counted in `state.json` (`dropped_flows`,
`dropped_batches`), which the agent reports in every heartbeat and in `agent status`.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_NAME = re.compile(r"^(b\d{12})\.n(\d+)\.json$")


class SpoolError(RuntimeError):
    pass


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write `data` to `path` so that readers see the old or the new content, never a mix."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


@dataclass(frozen=True)
class PutResult:
    evicted: tuple[str, ...]
    dropped_flows: int


class Spool:
    def __init__(self, directory: Path, *, max_bytes: int = 64 << 20,
                 max_batches: int = 10_000) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.max_bytes = max_bytes
        self.max_batches = max_batches
        for stale in self.dir.glob(".*.tmp"):  # a write interrupted by a crash
            stale.unlink(missing_ok=True)
        self.state = self._load_state()
        self._files: dict[str, tuple[Path, int, int]] = {}  # id -> (path, rows, size)
        for p in sorted(self.dir.iterdir()):
            m = _NAME.match(p.name)
            if m:
                self._files[m.group(1)] = (p, int(m.group(2)), p.stat().st_size)
        top = max((int(b[1:]) for b in self._files), default=-1)
        self.state["next_seq"] = max(int(self.state.get("next_seq", 0)), top + 1)

    def _load_state(self) -> dict[str, Any]:
        path = self.dir / "state.json"
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return {"next_seq": 0, "dropped_flows": 0, "dropped_batches": 0}
        except (OSError, ValueError) as exc:
            raise SpoolError(f"{path}: unreadable spool state: {exc}") from None
        if not isinstance(data, dict) or not isinstance(data.get("next_seq"), int):
            raise SpoolError(f"{path}: field next_seq: expected an integer")
        return data

    def _save_state(self) -> None:
        write_atomic(self.dir / "state.json", json.dumps(self.state).encode())

    # -- queries ---------------------------------------------------------------------------
    @property
    def next_seq(self) -> int:
        return int(self.state["next_seq"])

    @property
    def dropped_flows(self) -> int:
        return int(self.state.get("dropped_flows", 0))

    def ids(self) -> tuple[str, ...]:
        return tuple(sorted(self._files))

    def size_bytes(self) -> int:
        return sum(f[2] for f in self._files.values())

    def rows(self, batch_id: str) -> list[dict[str, Any]]:
        got = self._files.get(batch_id)
        if got is None:
            raise SpoolError(f"batch {batch_id} is not in the spool {self.dir}")
        try:
            data = json.loads(got[0].read_bytes())
        except (OSError, ValueError) as exc:
            raise SpoolError(f"{got[0]}: unreadable batch: {exc}") from None
        rows = data.get("rows") if isinstance(data, dict) else None
        if not isinstance(rows, list):
            raise SpoolError(f"{got[0]}: field rows: expected a list")
        return rows

    # -- changes ---------------------------------------------------------------------------
    def put(self, batch_id: str, seq: int, rows: list[dict[str, Any]] | tuple[Any, ...]
            ) -> PutResult:
        if not re.fullmatch(r"b\d{12}", batch_id):
            raise SpoolError(f"bad batch id {batch_id!r}")
        if seq + 1 > self.next_seq:
            self.state["next_seq"] = seq + 1
            self._save_state()  # the id is used for good before its data exists
        data = json.dumps({"batch_id": batch_id, "rows": list(rows)},
                          separators=(",", ":")).encode()
        evicted = self._make_room(len(data))
        path = self.dir / f"{batch_id}.n{len(rows)}.json"
        write_atomic(path, data)
        self._files[batch_id] = (path, len(rows), len(data))
        return PutResult(evicted, self.dropped_flows)

    def _make_room(self, incoming: int) -> tuple[str, ...]:
        evicted: list[str] = []
        total = self.size_bytes()
        for batch in sorted(self._files):
            if total + incoming <= self.max_bytes and len(self._files) < self.max_batches:
                break
            path, nrows, size = self._files.pop(batch)
            path.unlink(missing_ok=True)
            total -= size
            evicted.append(batch)
            self.state["dropped_flows"] = self.dropped_flows + nrows
            self.state["dropped_batches"] = int(self.state.get("dropped_batches", 0)) + 1
        if evicted:
            self._save_state()
        return tuple(evicted)

    def ack(self, batch_id: str) -> None:
        """The server has the batch: forget it."""
        got = self._files.pop(batch_id, None)
        if got is not None:
            got[0].unlink(missing_ok=True)
            _fsync_dir(self.dir)
