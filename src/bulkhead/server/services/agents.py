"""The agent channel: pairing keys, activation, credentials, heartbeats, inventory, unpairing
and offline detection (see docs/design/agent-channel.md); flow batches are `flow_batches`.

Theory of operation. A pairing key (`bhp_…`, stored as a SHA-256 digest) is consumed by
`activate`, atomically (`uses < max_uses` is re-checked inside the UPDATE), and yields a new
`Agent` row with its own credential (`bhg_…`, digest only) and a managed workload named after
the host (lower-cased). Every agent call resolves its credential to a `Caller` and may touch
only that agent's own rows. `unpair` flips the state; the next heartbeat carries the final
firewall state to the host and then destroys the credential. `mark_offline` is one conditional
UPDATE … RETURNING, so concurrent sweepers emit `agent_offline` exactly once per transition,
and a heartbeat racing the sweep wins.

Workloads belong to `bulkhead.server.services.inventory`; this module creates or updates them
through its public functions (`_upsert_workload`) and otherwise keeps only the agent ->
workload name link.

Functions are keyword-only (except `session`/`now`), run inside the caller's transaction and
raise domain errors.
"""

from __future__ import annotations

import importlib
import ipaddress
import threading
import weakref
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final

import msgspec
from sqlalchemy import func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from bulkhead.dataplane.model import PeerSet
from bulkhead.dataplane.wire import peers_to_data, to_data
from bulkhead.policy.fileformat import NAME_RE
from bulkhead.server.auth import AGENT_PERMISSIONS, Principal, new_token, token_digest
from bulkhead.server.db import after_commit as db_after_commit
from bulkhead.server.db import utcnow
from bulkhead.server.errors import (
    Conflict,
    FieldError,
    Forbidden,
    Invalid,
    NotFound,
    Unauthorized,
)
from bulkhead.server.models.agents import Agent, AgentInventory, PairingKey
from bulkhead.server.policystate import PolicyState, Snapshot
from bulkhead.server.services.audit import audit, emit
from bulkhead.server.settings import Settings

HEARTBEAT_INTERVAL_S: Final = 300.0  # as Illumio's VEN; flows every 10 min
AGENT_PREFIX: Final = "bhg_"


# -- pairing keys -----------------------------------------------------------------------------
def create_pairing_key(session: Session, *, actor: Principal, name: str = "",
                       expires_in_s: float | None = None, max_uses: int | None = None,
                       labels: dict[str, str] | None = None, enforcement: str = "visibility",
                       now: datetime | None = None) -> tuple[PairingKey, str]:
    """A new key and its secret (returned once, stored only as a digest)."""
    now = now or utcnow()
    secret = new_token("pairing")
    key = PairingKey(name=name, key_digest=token_digest(secret), key_prefix=secret[:10],
                     created_at=now, created_by=actor.label, max_uses=max_uses,
                     expires_at=None if expires_in_s is None else now + timedelta(
                         seconds=expires_in_s),
                     labels=dict(labels or {}), enforcement=enforcement, uses=0)
    session.add(key)
    session.flush()
    audit(session, actor=actor, action="pairing_key.create", target=f"pairing_key:{key.id}",
          after={"name": name, "key_prefix": key.key_prefix, "expires_at": _iso(key.expires_at),
                 "max_uses": max_uses, "labels": key.labels, "enforcement": enforcement})
    return key, secret


def pairing_key_view(key: PairingKey, now: datetime | None = None) -> dict[str, Any]:
    now = now or utcnow()
    usable = (key.revoked_at is None
              and (key.expires_at is None or key.expires_at > now)
              and (key.max_uses is None or key.uses < key.max_uses))
    return {"id": key.id, "name": key.name, "key_prefix": key.key_prefix,
            "created_at": key.created_at, "created_by": key.created_by,
            "expires_at": key.expires_at, "max_uses": key.max_uses, "uses": key.uses,
            "labels": dict(key.labels), "enforcement": key.enforcement,
            "revoked_at": key.revoked_at, "usable": usable}


def list_pairing_keys(session: Session, *, include_revoked: bool = False) -> list[PairingKey]:
    q = select(PairingKey).order_by(PairingKey.id)
    if not include_revoked:
        q = q.where(PairingKey.revoked_at.is_(None))
    return list(session.scalars(q))


def get_pairing_key(session: Session, *, key_id: int) -> PairingKey:
    key = session.get(PairingKey, key_id)
    if key is None:
        raise NotFound(f"no pairing key {key_id}")
    return key


def revoke_pairing_key(session: Session, *, actor: Principal, key_id: int,
                       now: datetime | None = None) -> None:
    """Revoked keys pair nothing more; the row stays, so agents keep their provenance."""
    key = get_pairing_key(session, key_id=key_id)
    if key.revoked_at is None:
        key.revoked_at = now or utcnow()
        audit(session, actor=actor, action="pairing_key.revoke", target=f"pairing_key:{key.id}")


# -- activation and credentials ---------------------------------------------------------------
@dataclass(frozen=True)
class Caller:
    """The agent behind a credential (what agent endpoints authorise against)."""

    id: int
    hostname: str
    workload: str
    state: str

    @property
    def principal(self) -> Principal:
        return Principal("agent", self.id, self.hostname, permissions=AGENT_PERMISSIONS)


def activate(session: Session, *, pairing_key: str, hostname: str, os: str, ips: list[str],
             agent_version: str = "", state: PolicyState | None = None,
             now: datetime | None = None) -> tuple[Agent, str]:
    """Exchange a pairing key for a new agent and its credential (returned once)."""
    now = now or utcnow()
    key = session.scalar(select(PairingKey).where(
        PairingKey.key_digest == token_digest(pairing_key)))
    if key is None:
        raise Unauthorized("unknown pairing key")
    if key.revoked_at is not None:
        raise Forbidden("pairing key revoked")
    if key.expires_at is not None and key.expires_at <= now:
        raise Forbidden("pairing key expired")
    consumed = session.execute(
        update(PairingKey)
        .where(PairingKey.id == key.id,
               or_(PairingKey.max_uses.is_(None), PairingKey.uses < PairingKey.max_uses))
        .values(uses=PairingKey.uses + 1)
        .execution_options(synchronize_session=False))
    if consumed.rowcount != 1:  # type: ignore[attr-defined]
        raise Forbidden("pairing key used up")
    name = hostname.strip().lower()
    if not NAME_RE.match(name):
        raise Invalid("hostname cannot name a workload",
                      [FieldError("hostname", f"{hostname!r} is not a valid workload name")])
    if session.scalar(select(Agent.id).where(Agent.workload_name == name,
                                             Agent.state == "paired")) is not None:
        raise Conflict(f"workload {name!r} already has a paired agent; unpair it first")
    credential = new_token("agent")
    agent = Agent(hostname=hostname.strip(), workload_name=name, os=os, ips=list(ips),
                  agent_version=agent_version, credential_digest=token_digest(credential),
                  state="paired", online=True, status="new", labels=dict(key.labels),
                  enforcement=key.enforcement, pairing_key_id=key.id, paired_at=now,
                  errors=[])
    session.add(agent)
    try:
        session.flush()
    except IntegrityError:  # a concurrent activation of the same host won the unique index
        raise Conflict(f"workload {name!r} already has a paired agent") from None
    caller = _caller(agent)
    _upsert_workload(session, actor=caller.principal, name=name, ips=list(ips), state=state,
                     labels=dict(key.labels), enforcement=key.enforcement,
                     hostname=agent.hostname, os=os)
    audit(session, actor=caller.principal, action="agent.pair", target=f"agent:{agent.id}",
          after={"hostname": agent.hostname, "workload": name, "os": os, "ips": list(ips),
                 "pairing_key_id": key.id}, note=key.name or None)
    return agent, credential


def authenticate(session: Session, token: str) -> Caller | None:
    """The agent holding `token`, or None (unknown, or already told to unpair)."""
    if not token.startswith(AGENT_PREFIX):
        return None
    row = session.execute(
        select(Agent.id, Agent.hostname, Agent.workload_name, Agent.state)
        .where(Agent.credential_digest == token_digest(token))).first()
    return None if row is None else Caller(row[0], row[1], row[2], row[3])


def resolve_agent(session: Session, token: str) -> Principal | None:
    """`deps.TOKEN_RESOLVERS["bhg_"]`: an agent credential as a `Principal`."""
    caller = authenticate(session, token)
    return None if caller is None else caller.principal


def _caller(agent: Agent) -> Caller:
    return Caller(agent.id, agent.hostname, agent.workload_name, agent.state)


# -- the agent's own calls --------------------------------------------------------------------
def get_agent(session: Session, *, agent_id: int) -> Agent:
    agent = session.get(Agent, agent_id)
    if agent is None:
        raise NotFound(f"no agent {agent_id}")
    return agent


@dataclass(frozen=True)
class HeartbeatResult:
    agent: Agent
    unpair_final_state: str | None  # set once, when the unpair instruction is delivered


def heartbeat(session: Session, *, agent_id: int, status: str,
              applied_version: str | None = None, enforcement: str | None = None,
              agent_version: str | None = None, errors: list[dict[str, Any]] | None = None,
              tamper: list[dict[str, Any]] | None = None,
              now: datetime | None = None) -> HeartbeatResult:
    now = now or utcnow()
    agent = get_agent(session, agent_id=agent_id)
    subject = f"agent:{agent.id}"
    errors = list(errors or [])
    if not agent.online:
        emit(session, kind="agent_online", subject=subject,
             data={"workload": agent.workload_name, "offline_since": _iso(
                 agent.last_heartbeat_at)})
    known = {_apply_key(e) for e in agent.errors if e.get("kind") == "apply"}
    for e in errors:
        if e.get("kind") == "apply" and _apply_key(e) not in known:
            emit(session, kind="policy_apply_failed", subject=subject, severity="error",
                 data={"workload": agent.workload_name, "version": e.get("version"),
                       "message": e.get("message", "")})
    for t in tamper or []:
        emit(session, kind="tamper_detected", subject=subject,
             severity="warning" if t.get("restored") else "error",
             data={"workload": agent.workload_name, **_jsonable(t)})
    agent.online = True
    agent.last_heartbeat_at = now
    agent.status = status
    agent.errors = [_jsonable(e) for e in errors]
    if applied_version is not None:
        agent.applied_version = applied_version
    if enforcement is not None:
        agent.applied_enforcement = enforcement
    if agent_version is not None:
        agent.agent_version = agent_version
    final_state = None
    if agent.state == "unpaired":  # deliver the instruction once, then forget the credential
        final_state = agent.unpair_final_state or "remove"
        agent.credential_digest = None
        audit(session, actor=_caller(agent).principal, action="agent.unpair_delivered",
              target=subject, after={"final_state": final_state})
    return HeartbeatResult(agent, final_state)


def _apply_key(e: dict[str, Any]) -> tuple[str, str]:
    return str(e.get("version")), str(e.get("message", ""))


def put_inventory(session: Session, *, agent_id: int, data: dict[str, Any],
                  state: PolicyState | None = None,
                  now: datetime | None = None) -> AgentInventory:
    """Store the latest inventory; a change of usable addresses updates the workload's IPs."""
    now = now or utcnow()
    agent = get_agent(session, agent_id=agent_id)
    row = session.get(AgentInventory, agent.id)
    if row is None:
        row = AgentInventory(agent_id=agent.id, updated_at=now, data=data)
        session.add(row)
    else:
        row.updated_at = now
        row.data = data
    ips = usable_ips(data.get("interfaces", []))
    if ips and ips != list(agent.ips):
        agent.ips = ips
        _upsert_workload(session, actor=_caller(agent).principal, name=agent.workload_name,
                         ips=ips, state=state)
    agent.os = str(data.get("os", agent.os))
    return row


def usable_ips(interfaces: list[dict[str, Any]]) -> list[str]:
    """Addresses other hosts can reach: no loopback, link-local, multicast or unspecified."""
    out: dict[str, None] = {}
    for itf in interfaces:
        for a in itf.get("addresses", []):
            ip = ipaddress.ip_address(a)
            if not (ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_unspecified):
                out[str(ip)] = None
    return list(out)


def get_inventory(session: Session, *, agent_id: int) -> AgentInventory:
    row = session.get(AgentInventory, get_agent(session, agent_id=agent_id).id)
    if row is None:
        raise NotFound(f"agent {agent_id} has not reported an inventory yet")
    return row


# -- administration ---------------------------------------------------------------------------
def list_agents(session: Session, *, state: str | None = None, online: bool | None = None,
                limit: int = 500, offset: int = 0) -> list[Agent]:
    q = select(Agent).order_by(Agent.id).limit(limit).offset(offset)
    if state is not None:
        q = q.where(Agent.state == state)
    if online is not None:
        q = q.where(Agent.online.is_(online))
    return list(session.scalars(q))


def unpair(session: Session, *, actor: Principal, agent_id: int, final_state: str,
           state: PolicyState | None = None, now: datetime | None = None) -> Agent:
    """Unpair an agent: its workload becomes unmanaged; the host learns `final_state` (remove
    our firewall rules, or keep them) on its next heartbeat."""
    agent = get_agent(session, agent_id=agent_id)
    if agent.state != "paired":
        raise Conflict(f"agent {agent_id} is already unpaired")
    agent.state = "unpaired"
    agent.unpaired_at = now or utcnow()
    agent.unpair_final_state = final_state
    _upsert_workload(session, actor=actor, name=agent.workload_name, ips=list(agent.ips),
                     managed=False, state=state)
    audit(session, actor=actor, action="agent.unpair", target=f"agent:{agent.id}",
          after={"workload": agent.workload_name, "final_state": final_state})
    if state is not None:  # a parked long-poll answers 403 at once: the agent asks now
        agent_id, workload = agent.id, agent.workload_name
        db_after_commit(session, lambda: state.unpaired(agent_id, workload))
    return agent


def mark_offline(session: Session, now: datetime, *,
                 after_s: float = Settings.agent_offline_after_s) -> list[int]:
    """Mark paired agents silent for longer than `after_s` offline; one `agent_offline` event
    per transition (the UPDATE re-checks its condition, so racing sweepers and heartbeats are
    safe). Returns the ids marked."""
    cutoff = now - timedelta(seconds=after_s)
    last = func.coalesce(Agent.last_heartbeat_at, Agent.paired_at)
    rows = session.execute(
        update(Agent)
        .where(Agent.state == "paired", Agent.online.is_(True), last < cutoff)
        .values(online=False)
        .returning(Agent.id, Agent.workload_name, Agent.last_heartbeat_at)
        .execution_options(synchronize_session=False)).all()
    for agent_id, workload, seen in rows:
        emit(session, kind="agent_offline", subject=f"agent:{agent_id}", severity="warning",
             data={"workload": workload, "last_heartbeat_at": _iso(seen), "after_s": after_s})
    return sorted(r[0] for r in rows)


def agent_view(agent: Agent, policy_version: str) -> dict[str, Any]:
    return {"id": agent.id, "hostname": agent.hostname, "workload": agent.workload_name,
            "state": agent.state, "online": agent.online, "status": agent.status,
            "os": agent.os, "agent_version": agent.agent_version, "ips": list(agent.ips),
            "labels": dict(agent.labels), "enforcement": agent.enforcement,
            "applied_version": agent.applied_version,
            "applied_enforcement": agent.applied_enforcement,
            "policy_version": policy_version, "in_sync": agent.applied_version == policy_version,
            "errors": list(agent.errors), "pairing_key_id": agent.pairing_key_id,
            "paired_at": agent.paired_at, "last_heartbeat_at": agent.last_heartbeat_at,
            "unpaired_at": agent.unpaired_at, "unpair_final_state": agent.unpair_final_state}


def policy_document(snap: Snapshot) -> bytes:
    """The body of `GET /agents/{id}/policy`: version label and compiled policy (wire form)."""
    return msgspec.json.encode({
        "version": snap.label, "provisioned_version": snap.version, "revision": snap.revision,
        "compiled": None if snap.compiled is None else to_data(snap.compiled, _PEERS)})


class PeersCache:
    """Peer sets as pre-encoded JSON. The compiler gives every workload of a rule instance
    the same `PeerSet` object, so a provision that changes 1,000 agents' policies encodes each
    peer set once, not once per agent: looked up by identity first (a weak reference guards
    against a recycled id), then by value (equal sets of other rule instances; comparing two
    large sets costs far less than encoding one). Bounded: the oldest entries go first."""

    def __init__(self, limit: int = 8192) -> None:
        self.limit = limit
        self._by_id: dict[int, tuple[weakref.ref[PeerSet], msgspec.Raw]] = {}
        self._by_value: dict[PeerSet, msgspec.Raw] = {}
        self._lock = threading.Lock()

    def __call__(self, peers: PeerSet) -> msgspec.Raw:
        hit = self._by_id.get(id(peers))
        if hit is not None and hit[0]() is peers:
            return hit[1]
        raw = self._by_value.get(peers)
        with self._lock:
            if raw is None:
                raw = msgspec.Raw(msgspec.json.encode(peers_to_data(peers)))
                self._by_value[peers] = raw
                _trim(self._by_value, self.limit)
            self._by_id[id(peers)] = (weakref.ref(peers), raw)
            _trim(self._by_id, self.limit)
        return raw


def _trim(d: dict[Any, Any], limit: int) -> None:
    while len(d) > limit:
        del d[next(iter(d))]


_PEERS = PeersCache()


# -- the inventory service, when it is there --------------------------------------------------
def _upsert_workload(session: Session, *, actor: Principal, name: str, ips: list[str],
                     state: PolicyState | None, managed: bool = True,
                     labels: dict[str, str] | None = None, enforcement: str | None = None,
                     hostname: str | None = None, os: str | None = None) -> None:
    """Create or update the agent's workload through `bulkhead.server.services.inventory`
    (its validation, audit and after-commit `PolicyState` sync). Its `upsert_workload`
    when it has one; else composed from `get_workload` / `create_workload` /
    `patch_workload`. A new workload takes the pairing key's labels and enforcement; an
    existing one keeps its own (only `ips`, when known, and `managed` change). Without the
    inventory module the agent keeps the link by name only."""
    try:
        inventory = importlib.import_module("bulkhead.server.services.inventory")
    except ModuleNotFoundError as exc:
        if exc.name != "bulkhead.server.services.inventory":
            raise
        return
    upsert = getattr(inventory, "upsert_workload", None)
    if upsert is not None:
        extra: dict[str, Any] = {}
        if labels is not None:
            extra["labels"] = labels
        if enforcement is not None:
            extra["enforcement"] = enforcement
        upsert(session, actor=actor, name=name, ips=ips, managed=managed, state=state, **extra)
        return
    try:
        inventory.get_workload(session, name=name)
    except NotFound:
        if managed:
            data: dict[str, Any] = {"name": name, "ips": ips, "managed": True,
                                    "labels": labels or {},
                                    "enforcement": enforcement or "visibility"}
            data.update({k: v for k, v in (("hostname", hostname), ("os", os)) if v})
            inventory.create_workload(session, actor=actor, data=data, state=state)
        return
    changes: dict[str, Any] = {"managed": managed}
    if ips:
        changes["ips"] = ips
    inventory.patch_workload(session, actor=actor, name=name, changes=changes, state=state)


def _iso(dt: datetime | None) -> str | None:
    return None if dt is None else dt.isoformat()


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in d.items()}
