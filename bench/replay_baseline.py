"""The exact-replay baseline of policy generation: one allow rule per observed
(consumer label set, provider label set, port), external peers as one /32 IP list each,
workloads lacking a role, app or env label by
name (as the generator treats them). No generalisation, no ranges, no merging; noise filtered the
same way as the generator does, so both see the same flows.

    from replay_baseline import replay
    draft = replay(policy, flows)   # flows: bulkhead.generate.FlowColumns (training window)
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from bulkhead.domain.model import Actor, IPList, Policy, Rule, Ruleset, Selector
from bulkhead.generate import FlowColumns
from bulkhead.generate.generator import _spec
from bulkhead.generate.noise import DEFAULT_NOISE, NOISE_FILTERS

FULL = ("role", "app", "env")


def replay(policy: Policy, flows: FlowColumns, noise: tuple[str, ...] = DEFAULT_NOISE) -> Policy:
    by_ip = {ip: w for w in policy.workloads for ip in w.ips}
    skip = {(p, q) for n in noise for p, q in NOISE_FILTERS[n]}
    proto = np.asarray(flows.proto).tolist()
    port = np.asarray(flows.dst_port).tolist()
    seen: dict[tuple[object, object, str], None] = {}
    externals: dict[str, None] = {}

    def actor_key(ip: str) -> object:
        w = by_ip.get(ip)
        if w is None:
            externals[ip] = None
            return ("ip", ip)
        full = all(k in w.label_dict for k in FULL if k in policy.label_keys)
        return ("labels", w.labels) if w.labels and full else ("workload", w.name)

    for s, d, pr, po in zip(flows.src_ip, flows.dst_ip, proto, port, strict=True):
        if (pr, po) in skip or (pr, -2) in skip:
            continue
        seen.setdefault((actor_key(s), actor_key(d), _spec(pr, po)), None)

    def actor(key: object) -> Actor:
        kind, val = key  # type: ignore[misc]
        if kind == "labels":
            return Actor("labels", Selector.of(dict(val)))
        if kind == "workload":
            return Actor("workload", name=val)
        return Actor("ip_list", name=f"replay-{val.replace(':', '-')}")

    rules = tuple(Rule("allow", (actor(c),), (actor(p),), (svc,), id=f"replay-{i + 1}")
                  for i, (c, p, svc) in enumerate(seen))
    lists = tuple(IPList(f"replay-{ip.replace(':', '-')}", (ip,)) for ip in externals)
    return replace(policy, ip_lists=policy.ip_lists + lists,
                   rulesets=(*policy.rulesets, Ruleset("replay", rules)))
