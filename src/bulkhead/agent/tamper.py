"""Tamper detection: is our table still what we applied?

The runtime calls `TamperWatch.check()` every `tamper_every_s` (1-2 s): it lists our table as
JSON (`nft -j list table inet T`, or `iptables-save` lines of our chains), normalises it (no
handles, no counter values) and compares its digest with the one taken right after our last
apply. A flushed ruleset, a deleted table, or any rule, chain or set added, removed or changed
is reported with a short description (`diff_text`); the core then re-applies the expected
ruleset and sends a tamper report. A listing that fails (say, `nft` briefly locked) is not a
change: it is retried at the next check. Other firewall managers are reported separately
(`firewalls.scan`) as warnings, because their drops still apply after our accept.
"""

from __future__ import annotations

from dataclasses import dataclass

from bulkhead.agent.enforce import ApplyError, Enforcer


@dataclass(frozen=True)
class TamperResult:
    changed: bool
    detail: str = ""
    error: str = ""


class TamperWatch:
    def __init__(self, enforcer: Enforcer) -> None:
        self.enforcer = enforcer
        self.checks = 0
        self.detected = 0

    def check(self) -> TamperResult:
        self.checks += 1
        try:
            changed, detail = self.enforcer.check()
        except ApplyError as exc:
            return TamperResult(False, error=str(exc))
        if changed:
            self.detected += 1
        return TamperResult(changed, detail)
