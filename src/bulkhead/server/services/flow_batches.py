"""Flow batches on the agent channel: decode (JSON or Arrow IPC), fill the defaults, set what
the server knows from the credential (`reporter`, the reporting side's workload), check, name
the far end from the inventory, and log into the flow store (docs/design/agent-channel.md).

Everything up to the store is a function of its inputs (`decode_flows`, `prepare_flows`).
The CPU stages of a batch (decode, check, naming, the log write: `stage_flows`) hold the GIL
for most of their 1 to 3 ms per 1,000 flows, so a thread gains them nothing: a small batch
(`INLINE_BYTES`) runs them on the event loop, which saves the thread hand-offs; a larger one
runs them on a worker thread, one batch at a time (`_STAGES`: threads contending for the
GIL across PyArrow's many short calls spent twice the CPU per batch). The fsync that makes a
batch durable always runs off the loop, shared by the batches in flight (`Committer`).
The store de-duplicates by batch id, namespaced per agent (`agent-<id>:<batch id>`) so that
no agent can shadow another's batches.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import threading
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import msgspec
import numpy as np
import numpy.typing as npt
import pyarrow as pa  # type: ignore[import-untyped]
import pyarrow.compute as pc  # type: ignore[import-untyped]

from bulkhead.flows.schema import (
    TS_TYPE,
    FlowBatchError,
    name_workloads,
    validate_batch,
)
from bulkhead.server.errors import DomainError, FieldError, Invalid
from bulkhead.server.schemas.agents import BATCH_ID_PATTERN, FlowBatch, FlowRecord

ARROW_STREAM: Final = "application/vnd.apache.arrow.stream"
MAX_FLOWS: Final = 100_000
# bodies up to this size are staged on the event loop: about 5,500 JSON flows (234 bytes
# each) or 12,000 Arrow ones (107 bytes), at most about 15 ms of the loop's time; larger
# ones on a worker thread
INLINE_BYTES: Final = 1_310_720
_BATCH_ID_RE = re.compile(BATCH_ID_PATTERN)
_JSON = msgspec.json.Decoder(FlowBatch)
# what an agent may leave out of an Arrow batch (JSON has the same defaults in FlowRecord)
DEFAULTS: Final = {"dst_port": pa.scalar(-1, pa.int32()), "connections": pa.scalar(1, pa.int64()),
                   "bytes": pa.scalar(0, pa.int64()), "decision": pa.scalar("unknown")}
SERVER_SET: Final = ("reporter", "src_workload", "dst_workload")


class UnsupportedMedia(DomainError):
    def __init__(self, detail: str) -> None:
        super().__init__(detail, [], 415, "Unsupported media type", "/problems/media-type")


class Unavailable(DomainError):
    def __init__(self, detail: str) -> None:
        super().__init__(detail, [], 503, "Service unavailable", "/problems/unavailable")


@dataclass(frozen=True)
class IngestResult:
    batch_id: str
    stored: int
    duplicate: bool


def decode_flows(body: bytes, content_type: str, batch_id: str | None = None,
                 ) -> tuple[str, pa.Table]:
    """A flow batch (JSON, or an Arrow IPC stream with the id in `batch_id`) as (batch id,
    Arrow table in the agent's columns; not yet validated)."""
    if content_type == ARROW_STREAM:
        if not batch_id or not _BATCH_ID_RE.match(batch_id):
            raise Invalid("an Arrow batch needs its id in the X-Batch-Id header",
                          [FieldError("header:x-batch-id", f"must match {BATCH_ID_PATTERN}")])
        try:
            table = pa.ipc.open_stream(body).read_all()
        except (pa.ArrowInvalid, OSError) as exc:
            raise Invalid(f"not an Arrow IPC stream: {exc}") from None
        if table.num_rows > MAX_FLOWS:
            raise Invalid(f"a batch holds at most {MAX_FLOWS} flows, not {table.num_rows}")
        return batch_id, table
    if content_type in ("application/json", ""):
        try:
            batch = _JSON.decode(body)
        except msgspec.ValidationError as exc:
            raise Invalid("invalid flow batch",
                          [FieldError(_msgspec_path(str(exc)), str(exc))]) from None
        except msgspec.DecodeError as exc:
            raise Invalid(f"malformed JSON: {exc}") from None
        return batch.batch_id, rows_to_table(batch.flows)
    raise UnsupportedMedia(f"flows must be application/json or {ARROW_STREAM}, "
                           f"not {content_type!r}")


def _msgspec_path(message: str) -> str:
    m = re.search(r"at `\$(.*)`", message)
    return m.group(1).lstrip(".") if m else ""


def rows_to_table(rows: list[FlowRecord]) -> pa.Table:
    """JSON flow records as Arrow columns (epoch seconds become UTC timestamps)."""
    n = len(rows)
    ts = _timestamps(np.fromiter([r.ts for r in rows], np.float64, n))
    return pa.table({
        "ts": ts,
        "first_seen": _optional_timestamps([r.first_seen for r in rows], ts),
        "last_seen": _optional_timestamps([r.last_seen for r in rows], ts),
        "src_ip": pa.array([r.src_ip for r in rows], pa.string()),
        "dst_ip": pa.array([r.dst_ip for r in rows], pa.string()),
        "src_port": pa.array([r.src_port for r in rows], pa.int32()),
        "proto": pa.array(np.fromiter([r.proto for r in rows], np.int16, n)),
        "dst_port": pa.array(np.fromiter([r.dst_port for r in rows], np.int32, n)),
        "process": pa.array([r.process for r in rows], pa.string()),
        "unit": pa.array([r.unit for r in rows], pa.string()),
        "user": pa.array([r.user for r in rows], pa.string()),
        "direction": pa.array([r.direction for r in rows], pa.string()),
        "connections": pa.array(np.fromiter([r.connections for r in rows], np.int64, n)),
        "bytes": pa.array(np.fromiter([r.bytes for r in rows], np.int64, n)),
        "decision": pa.array([r.decision for r in rows], pa.string()),
        "rule": pa.array([r.rule for r in rows], pa.string()),
    })


def _timestamps(seconds: npt.NDArray[np.float64]) -> pa.Array:
    # FlowRecord bounds the seconds (0 .. year 9999): the microseconds fit in an int64
    return pa.array(np.floor(seconds * 1e6).astype(np.int64), TS_TYPE)


def _optional_timestamps(seconds: list[float | None], default: pa.Array) -> pa.Array:
    """`seconds` as timestamps, `default`'s where None."""
    present = pa.array(seconds, pa.float64())
    if present.null_count == len(present):
        return default
    if present.null_count == 0:
        return _timestamps(present.to_numpy())
    stamps = _timestamps(present.fill_null(0.0).to_numpy())
    return pc.if_else(present.is_valid(), stamps, default)


def prepare_flows(table: pa.Table, *, workload: str) -> pa.Table:
    """The batch as exactly `FLOW_SCHEMA`: defaults filled, `reporter` and the reporting
    side's workload set from the credential (whatever the agent sent there is replaced),
    then `validate_batch`; its issues become a 422 naming row and column."""
    n = table.num_rows
    for name in SERVER_SET:
        if name in table.column_names:
            table = table.drop_columns([name])
    for name, value in DEFAULTS.items():
        if name not in table.column_names:
            table = table.append_column(name, pa.repeat(value, n))
    me = pa.repeat(pa.scalar(workload), n)
    table = table.append_column("reporter", me)
    if "direction" in table.column_names and n:
        direction = table.column("direction")
        if direction.type != pa.string():
            direction = direction.cast(pa.string())
        none = pa.nulls(n, pa.string())
        out = pc.equal(direction, "out")  # else "in": any other value fails the check below
        table = table.append_column("src_workload", pc.if_else(out, me, none))
        table = table.append_column("dst_workload", pc.if_else(out, none, me))
    try:
        return validate_batch(table)
    except FlowBatchError as exc:
        raise Invalid(str(exc), [
            FieldError(f"flows[{i.row}].{i.column}" if i.row is not None
                       else f"flows.{i.column}", i.message) for i in exc.issues]) from None


_STAGES = threading.Lock()  # one batch at a time through the threaded stages (docstring)
Commit = Callable[[], int]


def stage_flows(store: Any, *, agent_id: int, workload: str, body: bytes, content_type: str,
                batch_id: str | None = None, owners: dict[str, str] | None = None,
                ) -> tuple[str, Commit | None]:
    """The CPU stages: decode, check, name the far ends (`owners`: address -> workload, for
    the ones that are ours) and write to the store's log. Returns the batch id and the
    commit that makes the batch durable (it blocks: `finish` on a thread, or `COMMITS`);
    None for an empty batch."""
    if store is None:
        raise Unavailable("no flow store is configured on this server")
    batch_id, table = decode_flows(body, content_type, batch_id)
    return batch_id, _log(store, agent_id, batch_id, prepare_flows(table, workload=workload),
                          owners)


def ingest_flows(store: Any, *, agent_id: int, workload: str, body: bytes,
                 content_type: str, batch_id: str | None = None,
                 owners: dict[str, str] | None = None) -> IngestResult:
    """`stage_flows` (one batch at a time) then `finish`, on the calling thread: appended
    once per (agent, batch id), so a retry stores nothing."""
    with _STAGES:
        batch_id, commit = stage_flows(store, agent_id=agent_id, workload=workload, body=body,
                                       content_type=content_type, batch_id=batch_id,
                                       owners=owners)
    return finish(batch_id, commit)


def _log(store: Any, agent_id: int, batch_id: str, flows: pa.Table,
         owners: dict[str, str] | None) -> Commit | None:
    """Name the far ends and write the batch to the store's log; the commit follows."""
    if owners:
        flows = name_workloads(flows, owners)
    if flows.num_rows == 0:
        return None
    key = f"agent-{agent_id}:{batch_id}"
    log_batch = getattr(store, "log", None)  # a store that splits append (DuckDBFlowStore)
    if log_batch is None:
        return lambda: int(store.append(flows, batch_id=key))
    commit: Commit = log_batch(flows, batch_id=key).wait
    return commit


def finish(batch_id: str, commit: Commit | None) -> IngestResult:
    """Make a staged batch durable (blocks on the fsync: call it off the event loop)."""
    return _result(batch_id, None if commit is None else int(commit()))


async def finish_on_committer(batch_id: str, commit: Commit | None) -> IngestResult:
    """`finish` for an event loop: the commit runs on `COMMITS`' thread."""
    return _result(batch_id, None if commit is None else await COMMITS.commit(commit))


def _result(batch_id: str, stored: int | None) -> IngestResult:
    """None stored: an empty batch (nothing to store, not a duplicate); 0: a retry."""
    return IngestResult(batch_id, stored or 0, stored == 0)


_Settled = tuple[asyncio.Future[int], int, BaseException | None]  # (future, rows, error)


class Committer:
    """Makes staged batches durable on a thread of its own, for requests on event loops.
    Each round takes every batch queued so far: the first one's fsync covers them all (the
    store's group commit) and their requests are woken by one call into their loop. A worker
    thread per request cost the loop about 0.2 ms and more GIL hand-offs each."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queue: list[tuple[Commit, asyncio.Future[int]]] = []  # (guarded by _lock)
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    async def commit(self, commit: Commit) -> int:
        """`commit()` run on the committer thread: the rows stored, or what it raised."""
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        with self._lock:
            self._queue.append((commit, future))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="flow-commit",
                                                daemon=True)
                self._thread.start()
        self._wake.set()
        return await future

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            with self._lock:
                queued, self._queue = self._queue, []
            settled: defaultdict[asyncio.AbstractEventLoop, list[_Settled]] = defaultdict(list)
            for commit, future in queued:
                try:
                    outcome: tuple[int, BaseException | None] = (commit(), None)
                except BaseException as exc:  # handed to the request; this thread goes on
                    outcome = (0, exc)
                settled[future.get_loop()].append((future, *outcome))
            for loop, results in settled.items():
                with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits now
                    loop.call_soon_threadsafe(_settle, results)


def _settle(results: list[_Settled]) -> None:
    for future, stored, error in results:
        if future.done():  # the request was cancelled (its client went away)
            continue
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(stored)


COMMITS = Committer()
