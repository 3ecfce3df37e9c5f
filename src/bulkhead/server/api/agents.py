"""Pairing keys and agents: administration (user credentials with `agents:*` permissions) and
the agent channel (the agent's own `bhg_` credential, and only for its own id).

Agent calls authenticate in a short transaction of their own (`AgentDep`), so the policy
long-poll holds no database session while it waits and flow uploads hold none while they are
decoded and stored. A background task (started by this router's lifespan) marks silent agents
offline; listing agents runs the same sweep, so the view is current even between sweeps.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from typing import Annotated, Any

import msgspec
from fastapi import APIRouter, Depends, FastAPI, Header, Path, Query, Request, Response
from fastapi.concurrency import run_in_threadpool

from bulkhead.server.auth import Principal, token_digest
from bulkhead.server.db import utcnow
from bulkhead.server.deps import SessionDep, SettingsDep, bearer, get_db, require
from bulkhead.server.errors import DomainError, Forbidden, Unauthorized
from bulkhead.server.metrics import FLOW_BATCHES, FLOWS_INGESTED, LONG_POLLS
from bulkhead.server.policystate import PolicyState
from bulkhead.server.schemas.agents import (
    ActivateIn,
    ActivateOut,
    AgentPublic,
    FlowUploadOut,
    HeartbeatIn,
    HeartbeatOut,
    InventoryIn,
    InventoryOut,
    PairingKeyCreate,
    PairingKeyCreated,
    PairingKeyPublic,
    UnpairIn,
)
from bulkhead.server.services import agents as svc
from bulkhead.server.services import flow_batches as flow_svc
from bulkhead.server.settings import Settings

log = logging.getLogger(__name__)


# -- offline sweeper --------------------------------------------------------------------------
def sweep_period(settings: Settings) -> float:
    return max(1.0, min(60.0, settings.agent_offline_after_s / 4))


def sweep_once(app: FastAPI) -> list[int]:
    with app.state.db.transaction() as session:
        return svc.mark_offline(session, utcnow(),
                                after_s=app.state.settings.agent_offline_after_s)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    async def sweep_forever() -> None:
        period = sweep_period(app.state.settings)
        while True:
            await asyncio.sleep(period)
            try:
                await run_in_threadpool(sweep_once, app)
            except Exception:
                log.exception("offline sweep failed")

    task = asyncio.create_task(sweep_forever())
    try:
        yield
    finally:
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task


router = APIRouter(tags=["agents"], lifespan=lifespan)


# -- dependencies -----------------------------------------------------------------------------
CALLER_TTL_S = 30.0


class CallerCache:
    """Paired agents by credential digest, for `CALLER_TTL_S`: a flow upload need not read
    the database to authenticate. Exact because an agent's only transition is paired ->
    unpaired, which `PolicyState.unpaired` records at commit in this (the only) process:
    an entry of an unpaired agent is never used."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[str, tuple[float, svc.Caller]] = {}

    def get(self, digest: str, state: PolicyState) -> svc.Caller | None:
        with self._lock:
            hit = self._entries.get(digest)
        if hit is None or hit[0] < time.monotonic() or state.is_unpaired(hit[1].id):
            return None
        return hit[1]

    def put(self, digest: str, caller: svc.Caller) -> None:
        if caller.state != "paired":
            return
        with self._lock:
            if len(self._entries) > 100_000:
                self._entries.clear()
            self._entries[digest] = (time.monotonic() + CALLER_TTL_S, caller)


async def agent_caller(request: Request) -> svc.Caller:
    """The calling agent, from its credential: cached (no thread hop), else read in a
    transaction of its own on a worker thread."""
    token = bearer(request)
    if token is None:
        raise Unauthorized("missing bearer token")
    cache: CallerCache | None = getattr(request.app.state, "agent_callers", None)
    if cache is None:
        cache = request.app.state.agent_callers = CallerCache()
    digest = token_digest(token)
    ps = policy_state(request)
    caller = cache.get(digest, ps)
    if caller is None:
        def lookup() -> svc.Caller | None:
            with get_db(request).transaction() as session:
                return svc.authenticate(session, token)

        caller = await run_in_threadpool(lookup)
        if caller is None:
            raise Unauthorized("invalid or revoked agent credential")
        cache.put(digest, caller)
    request.state.principal = caller.principal
    return caller


AgentDep = Annotated[svc.Caller, Depends(agent_caller)]
# ids are INTEGER columns (32-bit on PostgreSQL): a larger one would fail in the driver (a 500)
AgentId = Annotated[int, Path(ge=1, le=2**31 - 1)]
KeyId = Annotated[int, Path(ge=1, le=2**31 - 1)]
AgentsReader = Annotated[Principal, Depends(require("agents:read"))]
AgentsWriter = Annotated[Principal, Depends(require("agents:write"))]


def own(caller: svc.Caller, agent_id: int, *, unpaired_ok: bool = False) -> svc.Caller:
    """Agents reach only their own id (403 for any other, existing or not)."""
    if caller.id != agent_id:
        raise Forbidden("an agent may access only its own data")
    if caller.state != "paired" and not unpaired_ok:
        raise Forbidden("this agent is unpaired")
    return caller


def policy_state(request: Request) -> PolicyState:
    state = request.app.state.policy
    assert isinstance(state, PolicyState)
    return state


def interval(settings: Settings) -> float:
    return min(svc.HEARTBEAT_INTERVAL_S, settings.agent_offline_after_s / 3)


# -- pairing keys -----------------------------------------------------------------------------
@router.post("/pairing-keys", status_code=201, response_model=PairingKeyCreated)
def create_pairing_key(body: PairingKeyCreate, session: SessionDep,
                       principal: AgentsWriter) -> dict[str, Any]:
    key, secret = svc.create_pairing_key(session, actor=principal, **body.model_dump())
    return {**svc.pairing_key_view(key), "key": secret}


@router.get("/pairing-keys", response_model=list[PairingKeyPublic])
def list_pairing_keys(session: SessionDep, _: AgentsReader,
                      include_revoked: bool = False) -> list[dict[str, Any]]:
    now = utcnow()
    return [svc.pairing_key_view(k, now)
            for k in svc.list_pairing_keys(session, include_revoked=include_revoked)]


@router.get("/pairing-keys/{key_id}", response_model=PairingKeyPublic)
def get_pairing_key(key_id: KeyId, session: SessionDep,
                    _: AgentsReader) -> dict[str, Any]:
    return svc.pairing_key_view(svc.get_pairing_key(session, key_id=key_id))


@router.delete("/pairing-keys/{key_id}", status_code=204)
def revoke_pairing_key(key_id: KeyId, session: SessionDep,
                       principal: AgentsWriter) -> Response:
    svc.revoke_pairing_key(session, actor=principal, key_id=key_id)
    return Response(status_code=204)


# -- administration of agents -----------------------------------------------------------------
@router.get("/agents", response_model=list[AgentPublic])
def list_agents(request: Request, session: SessionDep, settings: SettingsDep,
                _: AgentsReader, state: str | None = Query(None,
                                                                       pattern="^(un)?paired$"),
                online: bool | None = None, limit: int = Query(500, ge=1, le=5000),
                offset: int = Query(0, ge=0, le=2**31 - 1)) -> list[dict[str, Any]]:
    svc.mark_offline(session, utcnow(), after_s=settings.agent_offline_after_s)
    ps = policy_state(request)
    return [svc.agent_view(a, ps.snapshot(a.workload_name).label)
            for a in svc.list_agents(session, state=state, online=online, limit=limit,
                                     offset=offset)]


@router.get("/agents/{agent_id}", response_model=AgentPublic)
def get_agent(agent_id: AgentId, request: Request, session: SessionDep, settings: SettingsDep,
              _: AgentsReader) -> dict[str, Any]:
    svc.mark_offline(session, utcnow(), after_s=settings.agent_offline_after_s)
    agent = svc.get_agent(session, agent_id=agent_id)
    return svc.agent_view(agent, policy_state(request).snapshot(agent.workload_name).label)


@router.get("/agents/{agent_id}/inventory", response_model=InventoryOut)
def get_inventory(agent_id: AgentId, session: SessionDep,
                  _: AgentsReader) -> dict[str, Any]:
    row = svc.get_inventory(session, agent_id=agent_id)
    return {"agent_id": row.agent_id, "updated_at": row.updated_at, "data": row.data}


@router.post("/agents/{agent_id}/unpair", response_model=AgentPublic)
def unpair(agent_id: AgentId, body: UnpairIn, request: Request, session: SessionDep,
           principal: AgentsWriter) -> dict[str, Any]:
    ps = policy_state(request)
    agent = svc.unpair(session, actor=principal, agent_id=agent_id,
                       final_state=body.final_state, state=ps)
    return svc.agent_view(agent, ps.snapshot(agent.workload_name).label)


# -- the agent channel ------------------------------------------------------------------------
@router.post("/agents/activate", status_code=201, response_model=ActivateOut)
def activate(body: ActivateIn, request: Request, session: SessionDep,
             settings: SettingsDep) -> dict[str, Any]:
    """Exchange a pairing key (no user credential) for an agent id and its credential."""
    agent, credential = svc.activate(session, pairing_key=body.pairing_key,
                                     hostname=body.hostname, os=body.os, ips=body.ips,
                                     agent_version=body.agent_version,
                                     state=policy_state(request))
    return {"agent_id": agent.id, "credential": credential, "workload": agent.workload_name,
            "heartbeat_interval_s": interval(settings),
            "offline_after_s": settings.agent_offline_after_s,
            "long_poll_max_s": settings.long_poll_max_s}


@router.post("/agents/{agent_id}/heartbeat", response_model=HeartbeatOut)
def heartbeat(agent_id: AgentId, body: HeartbeatIn, caller: AgentDep, request: Request,
              session: SessionDep, settings: SettingsDep) -> dict[str, Any]:
    own(caller, agent_id, unpaired_ok=True)
    data = body.model_dump(mode="json")
    result = svc.heartbeat(session, agent_id=agent_id, status=body.status,
                           applied_version=body.applied_version, enforcement=body.enforcement,
                           agent_version=body.agent_version, errors=data["errors"],
                           tamper=data["tamper"])
    final = result.unpair_final_state
    return {"state": result.agent.state,
            "policy_version": policy_state(request).snapshot(caller.workload).label,
            "heartbeat_interval_s": interval(settings),
            "unpair": None if final is None else {"final_state": final}}


@router.put("/agents/{agent_id}/inventory", response_model=InventoryOut)
def put_inventory(agent_id: AgentId, body: InventoryIn, caller: AgentDep, request: Request,
                  session: SessionDep) -> dict[str, Any]:
    own(caller, agent_id)
    row = svc.put_inventory(session, agent_id=agent_id, data=body.model_dump(mode="json"),
                            state=policy_state(request))
    return {"agent_id": row.agent_id, "updated_at": row.updated_at, "data": row.data}


_UPLOADED = {k: FLOW_BATCHES.labels(k) for k in ("stored", "duplicate", "rejected")}
_UPLOAD_OUT = msgspec.json.Encoder()


# The hottest route: its answer is encoded directly rather than validated through a response
# model; the schema is still documented (`responses`).
@router.post("/agents/{agent_id}/flows", response_class=Response,
             responses={200: {"model": FlowUploadOut, "description": "Stored, or a retry "
                                                                    "of a stored batch"}})
async def upload_flows(agent_id: AgentId, caller: AgentDep, request: Request,
                       x_batch_id: Annotated[str | None, Header()] = None) -> Response:
    """A batch of flow summaries, JSON `{batch_id, flows: [...]}` or an Arrow IPC stream
    (`application/vnd.apache.arrow.stream`, id in `X-Batch-Id`). Idempotent by batch id."""
    own(caller, agent_id)
    store = request.app.state.flows
    body = await request.body()
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    owners = policy_state(request).owners()
    args: dict[str, Any] = {"agent_id": caller.id, "workload": caller.workload, "body": body,
                            "content_type": ctype, "batch_id": x_batch_id, "owners": owners}
    try:
        if len(body) <= flow_svc.INLINE_BYTES:  # staged here, made durable by the committer
            result = await flow_svc.finish_on_committer(*flow_svc.stage_flows(store, **args))
        else:
            result = await run_in_threadpool(lambda: flow_svc.ingest_flows(store, **args))
    except DomainError:
        _UPLOADED["rejected"].inc()
        raise
    _UPLOADED["duplicate" if result.duplicate else "stored"].inc()
    FLOWS_INGESTED.inc(result.stored)
    return Response(_UPLOAD_OUT.encode({"batch_id": result.batch_id, "stored": result.stored,
                                        "duplicate": result.duplicate}),
                    media_type="application/json")


@router.get("/agents/{agent_id}/policy", responses={304: {"description": "unchanged"}})
async def get_policy(agent_id: AgentId, caller: AgentDep, request: Request,
                     known: Annotated[str | None, Query(max_length=40)] = None,
                     wait: Annotated[float, Query(ge=0)] = 0.0) -> Response:
    """The agent's compiled policy. With `known` (the version it holds) and `wait`, a
    long-poll: returns as soon as its policy differs from `known`, else 304 after
    min(wait, long_poll_max_s) seconds. No database session is held while waiting."""
    own(caller, agent_id)
    ps = policy_state(request)
    # settings straight from the app: a sync dependency would cost a threadpool hop per poll
    timeout = min(wait, request.app.state.settings.long_poll_max_s)
    if known is not None and timeout > 0:
        LONG_POLLS.inc()
        try:
            snap = await ps.wait_for_change(caller.workload, known, timeout)
        finally:
            LONG_POLLS.dec()
        if ps.is_unpaired(caller.id):
            raise Forbidden("this agent is unpaired")
    else:
        snap = ps.snapshot(caller.workload)
    headers = {"ETag": f'"{snap.label}"', "Cache-Control": "no-store"}
    if known is not None and snap.label == known:
        return Response(status_code=304, headers=headers)
    return Response(svc.policy_document(snap), media_type="application/json", headers=headers)
