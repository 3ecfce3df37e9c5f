"""Policy generation: `POST /generate` (candidates from the flow store; policy:read) and
`POST /generate/apply` (a candidate's objects into the draft; policy:write). Thin: the work
is in `bulkhead.server.services.generate`; shapes in docs/design/generator.md."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends
from pydantic import Field

from bulkhead.server.api.traffic import PolicyLoaderDep, StoreDep
from bulkhead.server.auth import Principal
from bulkhead.server.deps import SessionDep, require
from bulkhead.server.schemas.policy import Input
from bulkhead.server.services import generate as svc

router = APIRouter(tags=["generate"])
Reader = Annotated[Principal, Depends(require("policy:read"))]
Writer = Annotated[Principal, Depends(require("policy:write"))]
TIME = "RFC 3339 with a zone, epoch seconds, or relative such as -24h"


class GenerateRequest(Input):
    granularity: Literal["env", "app", "tier", "service", "process"] | None = None
    scope: dict[str, str] = Field(default_factory=dict, description="label selector")
    since: str | None = Field(None, max_length=64, description=TIME)
    until: str | None = Field(None, max_length=64, description=TIME)
    train_until: str | None = Field(None, max_length=64, description=TIME)
    external: Literal["cidr", "internet"] = "cidr"
    noise: list[str] | None = Field(None, description="noise filters (default: all)")
    crown_jewels: list[dict[str, str]] = Field(default_factory=list, max_length=50)
    policy: str = Field("draft", max_length=40, description="draft, active, or a version")


class ApplyRequest(Input):
    rulesets: list[dict[str, Any]] = Field(default_factory=list, max_length=10_000)
    ip_lists: list[dict[str, Any]] = Field(default_factory=list, max_length=10_000)
    services: list[dict[str, Any]] = Field(default_factory=list, max_length=10_000)
    tests: list[dict[str, Any]] = Field(default_factory=list, max_length=10_000)


@router.post("/generate", summary="Candidate policies from observed flows, with reports")
def generate(body: GenerateRequest, session: SessionDep, store: StoreDep, _: Reader,
             loader: PolicyLoaderDep) -> dict[str, Any]:
    return svc.generate_candidates(
        session=session, store=store, loader=loader, ref=body.policy,
        granularity=body.granularity, scope=body.scope, since=body.since, until=body.until,
        train_until=body.train_until, external=body.external, noise=body.noise,
        crown_jewels=body.crown_jewels)


@router.post("/generate/apply", status_code=201,
             summary="Add a candidate's IP lists, services, rulesets and tests to the draft")
def apply(body: ApplyRequest, session: SessionDep, actor: Writer) -> dict[str, Any]:
    return svc.apply_candidate(session, actor=actor, rulesets=body.rulesets,
                               ip_lists=body.ip_lists, services=body.services,
                               tests=body.tests)
