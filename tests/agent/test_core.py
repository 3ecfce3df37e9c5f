"""Transcripts of the agent core: events in, commands out (no root, no I/O, no clock)."""

from __future__ import annotations

from typing import Any

import pytest

from bulkhead.agent import core as c
from bulkhead.dataplane.model import CompiledWorkload
from bulkhead.dataplane.wire import to_data

CFG = c.CoreConfig(heartbeat_s=5, flow_window_s=1, tamper_every_s=2, inventory_every_s=60,
                   long_poll_s=30, backoff_min_s=1, backoff_max_s=8)


def doc(enforcement: str = "visibility") -> dict[str, Any]:
    return to_data(CompiledWorkload("web", ("10.0.0.1",), enforcement, "linux", "enforce"))


def kinds(cmds: list[c.Command]) -> list[str]:
    """Command names, without the bookkeeping every answer carries (status, logs)."""
    return [type(x).__name__ for x in cmds if not isinstance(x, c.SaveStatus | c.Log)]


def only(cmds: list[c.Command], kind: type) -> Any:
    got = [x for x in cmds if isinstance(x, kind)]
    assert len(got) == 1, f"want one {kind.__name__} in {kinds(cmds)}"
    return got[0]


def paired_core(now: float = 100.0) -> c.AgentCore:
    """A core that is paired, polled, heartbeated and collected inventory (all idle)."""
    core = c.AgentCore(CFG)
    core.handle(c.Started(now, paired=True, next_seq=0))
    core.handle(c.HeartbeatDone(now, True))
    core.handle(c.InventoryCollected(now, "fp"))
    core.handle(c.InventorySent(now, "fp", True))
    return core


def test_first_start_activates_then_polls_heartbeats_and_collects() -> None:
    core = c.AgentCore(CFG)
    out = core.handle(c.Started(10.0, paired=False, next_seq=0))
    assert kinds(out) == ["Activate", "Sleep"]
    out = core.handle(c.Activated(10.5, ok=True))
    assert kinds(out) == ["FetchPolicy", "Heartbeat", "CollectInventory", "Sleep"]
    assert only(out, c.FetchPolicy) == c.FetchPolicy(None, 30)
    hb = only(out, c.Heartbeat).payload
    assert hb["applied_version"] is None and hb["errors"] == [] and hb["tamper"] == []
    assert only(out, c.Sleep).until == 11.0  # the first flow window's end


def test_failed_activation_backs_off_exponentially() -> None:
    core = c.AgentCore(CFG)
    core.handle(c.Started(0.0, paired=False, next_seq=0))
    deadlines = []
    t = 0.0
    for _ in range(5):
        out = core.handle(c.Activated(t, ok=False, error="HTTP 403: pairing key used up"))
        assert "Activate" not in kinds(out)
        retry = core.s.next_activate
        deadlines.append(retry - t)
        t = retry
        assert "Activate" in kinds(core.handle(c.Tick(t)))
    assert deadlines == [1, 2, 4, 8, 8]


def test_policy_is_applied_and_reported_in_the_heartbeat() -> None:
    core = paired_core()
    out = core.handle(c.PolicyFetched(101.0, "3.1", doc("full")))
    apply = only(out, c.Apply)
    assert (apply.version, apply.compiled.enforcement, apply.reason) == ("3.1", "full", "policy")
    assert only(out, c.FetchPolicy).known == "3.1"  # the next long-poll knows the version
    hb = only(core.handle(c.Applied(101.2, "3.1", True, "full")), c.Heartbeat).payload
    assert (hb["applied_version"], hb["enforcement"], hb["status"]) == ("3.1", "full", "ok")


def test_unchanged_policy_just_polls_again() -> None:
    core = paired_core()
    core.handle(c.PolicyFetched(101.0, "3.1", doc()))
    core.handle(c.Applied(101.1, "3.1", True, "visibility"))
    out = core.handle(c.PolicyFetched(131.1, None))  # 304 after the wait
    assert kinds(out)[0] == "FetchPolicy" and "Apply" not in kinds(out)


def test_a_failed_apply_keeps_the_last_good_and_reports_once() -> None:
    core = paired_core()
    core.handle(c.PolicyFetched(101.0, "3.1", doc()))
    core.handle(c.Applied(101.1, "3.1", True, "visibility"))
    core.handle(c.HeartbeatDone(101.15, True))
    core.handle(c.PolicyFetched(102.0, "4.1", doc("full")))
    out = core.handle(c.Applied(102.1, "4.1", False, error="nft -c rejected the ruleset: x"))
    hb = only(out, c.Heartbeat).payload  # an error is reported at once
    assert hb["applied_version"] == "3.1" and hb["enforcement"] == "visibility"
    assert hb["errors"] == [{"kind": "apply", "version": "4.1",
                             "message": "nft -c rejected the ruleset: x"}]
    assert core.status()["applied_version"] == "3.1"
    # a later good apply clears the error
    core.handle(c.HeartbeatDone(102.2, True))
    core.handle(c.PolicyFetched(103.0, "5.1", doc("full")))
    core.handle(c.Applied(103.1, "5.1", True, "full"))
    assert core.status()["errors"] == []


def test_an_unreadable_policy_is_not_applied_and_names_the_field() -> None:
    core = paired_core()
    bad = doc()
    bad["enforcement"] = "strict"
    out = core.handle(c.PolicyFetched(101.0, "3.1", bad))
    assert "Apply" not in kinds(out)
    assert "enforcement" in only(out, c.Heartbeat).payload["errors"][0]["message"]


def test_one_apply_at_a_time_and_the_newest_waiting_one_wins() -> None:
    core = paired_core()
    core.handle(c.PolicyFetched(101.0, "3.1", doc()))
    assert "Apply" not in kinds(core.handle(c.PolicyFetched(101.1, "4.1", doc("selective"))))
    assert "Apply" not in kinds(core.handle(c.PolicyFetched(101.2, "5.1", doc("full"))))
    out = core.handle(c.Applied(101.3, "3.1", True, "visibility"))
    assert only(out, c.Apply).version == "5.1"


def test_windows_become_spooled_batches_with_sequential_ids_then_uploads() -> None:
    core = paired_core()
    core.s.seq = 41
    out = core.handle(c.Tick(101.0))
    assert "CloseWindow" in kinds(out)
    rows = ({"src_ip": "10.0.0.2", "dst_ip": "10.0.0.1", "proto": 6, "direction": "in"},)
    out = core.handle(c.WindowClosed(101.0, rows))
    assert only(out, c.SpoolBatch) == c.SpoolBatch("b000000000041", 41, rows)
    out = core.handle(c.Spooled(101.0, "b000000000041", True))
    assert only(out, c.Upload).batch_id == "b000000000041"
    core.handle(c.Uploaded(101.1, "b000000000041", True))
    assert core.status()["spooled_batches"] == 0 and core.status()["last_upload"] == 101.1
    # an empty window makes no batch and uses no id
    core.handle(c.Tick(102.0))
    assert "SpoolBatch" not in kinds(core.handle(c.WindowClosed(102.0, ())))
    assert core.s.seq == 42


def test_server_down_keeps_batches_in_order_and_backs_off() -> None:
    core = c.AgentCore(CFG)
    out = core.handle(c.Started(200.0, paired=True, next_seq=7,
                                spooled=("b000000000005", "b000000000006")))
    assert only(out, c.Upload).batch_id == "b000000000005"  # oldest first, one at a time
    out = core.handle(c.Uploaded(200.1, "b000000000005", False, error="connection refused"))
    assert "Upload" not in kinds(out)
    assert "Upload" not in kinds(core.handle(c.Tick(200.5)))
    out = core.handle(c.Tick(201.1))
    assert only(out, c.Upload).batch_id == "b000000000005"  # same id: never duplicated
    core.handle(c.Uploaded(201.2, "b000000000005", False, error="refused"))
    assert core.s.next_upload == pytest.approx(203.2)  # 1 s, then 2 s
    out = core.handle(c.Tick(203.2))
    out = core.handle(c.Uploaded(203.3, "b000000000005", True))
    assert only(out, c.Upload).batch_id == "b000000000006"
    out = core.handle(c.Uploaded(203.4, "b000000000006", True))
    assert "Upload" not in kinds(out) and core.status()["spooled_batches"] == 0


def test_a_rejected_batch_is_dropped_and_counted() -> None:
    core = c.AgentCore(CFG)
    core.handle(c.Started(0.0, paired=True, next_seq=2, spooled=("b000000000001",)))
    core.handle(c.HeartbeatDone(0.0, True))
    out = core.handle(c.Uploaded(0.1, "b000000000001", False, retryable=False,
                                 error="HTTP 422: flows[0].dst_ip"))
    assert core.status()["rejected_batches"] == 1 and core.status()["spooled_batches"] == 0
    assert only(out, c.Heartbeat).payload["errors"][0]["kind"] == "upload"


def test_spool_evictions_are_counted_and_reported() -> None:
    core = paired_core()
    core.handle(c.Spooled(101.0, "b000000000001", True))
    core.handle(c.Uploaded(101.0, "b000000000001", False, error="down"))
    core.handle(c.Spooled(101.5, "b000000000002", True, evicted=("b000000000001",),
                          dropped_flows=12))
    assert core.s.queue == ["b000000000002"]
    core.s.next_heartbeat = 101.5
    hb = only(core.handle(c.Tick(101.6)), c.Heartbeat).payload
    assert hb["errors"][-1]["kind"] == "spool_dropped"
    assert "12 flow summaries in 1 batches" in hb["errors"][-1]["message"]


def test_tamper_is_restored_and_reported_at_once() -> None:
    core = paired_core()
    core.handle(c.PolicyFetched(101.0, "3.1", doc("full")))
    core.handle(c.Applied(101.1, "3.1", True, "full"))
    core.handle(c.HeartbeatDone(101.2, True))
    out = core.handle(c.Tick(103.2))
    assert "CheckTamper" in kinds(out)
    out = core.handle(c.TamperChecked(103.3, True, "table inet bulkhead was removed"))
    apply = only(out, c.Apply)
    assert (apply.version, apply.reason) == ("3.1", "tamper")
    out = core.handle(c.Applied(103.4, "3.1", True, "full"))
    report = only(out, c.Heartbeat).payload["tamper"]
    assert report == [{"what": "ruleset", "detail": "table inet bulkhead was removed",
                       "restored": True, "at": "1970-01-01T00:01:43.300000+00:00"}]
    core.handle(c.HeartbeatDone(103.5, True))
    core.s.next_heartbeat = 103.6
    assert only(core.handle(c.Tick(103.6)), c.Heartbeat).payload["tamper"] == []  # delivered


def test_no_tamper_check_before_anything_is_applied() -> None:
    core = paired_core()
    assert "CheckTamper" not in kinds(core.handle(c.Tick(110.0)))


def test_inventory_is_sent_only_when_it_changed() -> None:
    core = paired_core()
    core.s.next_inventory = 100.0
    assert "CollectInventory" in kinds(core.handle(c.Tick(100.5)))
    assert "SendInventory" not in kinds(core.handle(c.InventoryCollected(100.6, "fp")))
    core.s.next_inventory = 100.6
    core.handle(c.Tick(100.7))
    assert only(core.handle(c.InventoryCollected(100.8, "fp2")), c.SendInventory).fingerprint \
        == "fp2"


def test_unpair_from_the_heartbeat_ends_the_agent() -> None:
    core = paired_core()
    out = core.handle(c.HeartbeatDone(105.0, True, unpair="keep"))
    assert kinds(out) == ["Unpair", "Sleep"] and only(out, c.Unpair).final_state == "keep"
    assert core.done and core.status()["unpaired"] == "keep"


def test_a_refused_poll_asks_the_heartbeat_and_401_there_pairs_again() -> None:
    core = paired_core()
    core.handle(c.PolicyFetched(101.0, "3.1", doc()))
    out = core.handle(c.PolicyFetched(102.0, None, error="HTTP 403", unauthorized=True))
    assert "Heartbeat" in kinds(out) and "Activate" not in kinds(out)
    out = core.handle(c.HeartbeatDone(102.1, False, unauthorized=True, error="HTTP 401"))
    assert "Activate" in kinds(out)
    out = core.handle(c.Activated(102.5, True))
    assert {"FetchPolicy", "Heartbeat"} <= set(kinds(out))


def test_restart_reapplies_the_last_good_policy() -> None:
    core = c.AgentCore(CFG)
    out = core.handle(c.Started(0.0, paired=True, next_seq=0, last_good=("3.1", doc("full"))))
    apply = only(out, c.Apply)
    assert (apply.version, apply.reason) == ("3.1", "restore")
    assert only(out, c.FetchPolicy).known == "3.1"


def test_events_before_started_are_misuse() -> None:
    with pytest.raises(ValueError, match="before Started"):
        c.AgentCore(CFG).handle(c.Tick(0.0))


def test_sleep_is_the_next_deadline_and_windows_stay_on_their_grid() -> None:
    core = paired_core(100.0)
    core.handle(c.PolicyFetched(100.0, "1.1", doc()))  # poll outstanding after this
    out = core.handle(c.Tick(103.7))  # late tick: one close, next window at 104
    assert kinds(out).count("CloseWindow") == 1
    core.handle(c.WindowClosed(103.7, ()))
    assert core.s.next_window == 104.0
    assert only(core.handle(c.Tick(103.8)), c.Sleep).until == 104.0


def test_other_firewall_managers_are_reported_in_every_heartbeat() -> None:
    core = paired_core()
    out = core.handle(c.InventoryCollected(101.0, "fp", ("docker: table ip filter: DOCKER",)))
    hb = only(out, c.Heartbeat).payload  # at once, then with every heartbeat
    assert hb["errors"] == [{"kind": "firewall_manager", "version": None,
                             "message": "docker: table ip filter: DOCKER"}]
    assert core.status()["warnings"] == ["docker: table ip filter: DOCKER"]
    core.handle(c.HeartbeatDone(101.1, True))
    out = core.handle(c.InventoryCollected(102.0, "fp", ()))
    assert only(out, c.Heartbeat).payload["errors"] == []


def test_server_heartbeat_interval_is_followed_unless_configured() -> None:
    # the server marks an agent offline after ~3 of its intervals: an agent that keeps a
    # longer default would flap offline
    follow = c.AgentCore(c.CoreConfig(heartbeat_s=300, flow_window_s=600,
                                      server_heartbeat=True))
    follow.handle(c.Started(0.0, paired=False, next_seq=0))
    follow.handle(c.Activated(1.0, ok=True, heartbeat_s=30.0))
    follow.handle(c.HeartbeatDone(2.0, True))
    out = follow.handle(c.InventoryCollected(2.0, "fp"))
    assert follow.s.next_heartbeat == 32.0 and only(out, c.Sleep).until <= 32.0
    follow.handle(c.HeartbeatDone(40.0, True, heartbeat_s=20.0))  # changed on the server
    assert follow.s.next_heartbeat == 60.0
    fixed = c.AgentCore(c.CoreConfig(heartbeat_s=300, flow_window_s=600))
    fixed.handle(c.Started(0.0, paired=False, next_seq=0))
    fixed.handle(c.Activated(1.0, ok=True, heartbeat_s=30.0))
    fixed.handle(c.HeartbeatDone(2.0, True, heartbeat_s=30.0))
    assert fixed.s.next_heartbeat == 302.0
