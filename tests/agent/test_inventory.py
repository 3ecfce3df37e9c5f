"""Inventory: the exact shape the server accepts, fingerprints, and a real namespace."""

from __future__ import annotations

import json
from typing import Any

import pytest

from bulkhead.agent.inventory import (
    InventoryError,
    build,
    collect,
    fingerprint,
    interfaces_from_ip_json,
)
from bulkhead.agent.procs import ListeningSocket, ProcessInfo
from bulkhead.server.schemas.agents import InventoryIn
from tests.agent._sensors import B4, B6, two_hosts

IP_JSON = json.loads("""[
 {"ifindex":1,"ifname":"lo","link_type":"loopback","address":"00:00:00:00:00:00",
  "addr_info":[{"family":"inet","local":"127.0.0.1","prefixlen":8}]},
 {"ifindex":4,"ifname":"eth0","link_type":"ether","address":"02:fc:00:00:00:01",
  "addr_info":[{"family":"inet","local":"192.0.2.2","prefixlen":24},
               {"family":"inet6","local":"fd00::2","prefixlen":64},
               {"family":"inet6","local":"fe80::fc:ff:fe00:1","prefixlen":64}]},
 {"ifindex":5,"ifname":"wg0","link_type":"none","addr_info":[{"local":"10.8.0.1"}]},
 {"ifindex":2,"ifname":"ifb0","link_type":"ether","address":"b2:5d:22:91:f4:9d","addr_info":[]}
]""")

NGINX = ProcessInfo(40, "nginx", "nginx -g daemon off;", "nginx.service",
                    "/system.slice/nginx.service")


def test_interfaces_from_ip_json() -> None:
    assert interfaces_from_ip_json(IP_JSON) == [
        {"name": "eth0", "mac": "02:fc:00:00:00:01",
         "addresses": ["192.0.2.2", "fd00::2", "fe80::fc:ff:fe00:1"]},
        {"name": "ifb0", "mac": "b2:5d:22:91:f4:9d", "addresses": []},
        {"name": "wg0", "mac": None, "addresses": ["10.8.0.1"]},
    ]
    with pytest.raises(InventoryError, match="expected a JSON list"):
        interfaces_from_ip_json({"ifname": "eth0"})
    with pytest.raises(InventoryError, match="link #1 has no ifname"):
        interfaces_from_ip_json([{"ifname": "eth0"}, {"mtu": 1500}])


def test_build_is_the_server_shape_sorted_and_deduplicated() -> None:
    listening = [
        ListeningSocket("tcp", "::", 443, NGINX),
        ListeningSocket("tcp", "0.0.0.0", 80, None),
        ListeningSocket("tcp", "0.0.0.0", 80, NGINX),  # same socket seen with its process
        ListeningSocket("udp", "127.0.0.1", 53, None),
    ]
    inv = build("web-1", interfaces_from_ip_json(IP_JSON), listening)
    assert inv["listening"] == [
        {"proto": "tcp", "port": 80, "addr": "0.0.0.0", "process": "nginx",
         "cmdline": "nginx -g daemon off;", "unit": "nginx.service"},
        {"proto": "tcp", "port": 443, "addr": "::", "process": "nginx",
         "cmdline": "nginx -g daemon off;", "unit": "nginx.service"},
        {"proto": "udp", "port": 53, "addr": "127.0.0.1", "process": None, "cmdline": None,
         "unit": None},
    ]
    parsed = InventoryIn.model_validate(inv)  # extra="forbid": no stray keys either
    assert parsed.model_dump() == inv


def test_fingerprint_is_stable_and_order_free() -> None:
    inv: dict[str, Any] = build("web-1", interfaces_from_ip_json(IP_JSON),
                                [ListeningSocket("tcp", "::", 443, NGINX)])
    again = json.loads(json.dumps(inv))
    again["interfaces"].reverse()
    again["interfaces"][0]["addresses"].reverse()
    assert fingerprint(again) == fingerprint(inv)
    assert len(fingerprint(inv)) == 64
    again["listening"][0]["port"] = 8443
    assert fingerprint(again) != fingerprint(inv)


@pytest.mark.privileged
def test_collect_in_a_namespace() -> None:
    with two_hosts(rules=False) as lab:
        lab.serve("b", tcp=[8080], udp=[5353])
        inv = collect("host-b", netns=lab.netns_path("b"))
        InventoryIn.model_validate(inv)
        assert inv["hostname"] == "host-b" and inv["os"] == "linux"
        (eth0,) = inv["interfaces"]  # lo skipped
        assert eth0["name"] == "eth0" and len(eth0["mac"]) == 17
        assert {B4, B6} <= set(eth0["addresses"])
        rows = {(r["proto"], r["port"]): r for r in inv["listening"]}
        assert set(rows) == {("tcp", 8080), ("udp", 5353)}
        assert rows[("tcp", 8080)]["addr"] == "::"
        assert "responder.py" in rows[("tcp", 8080)]["cmdline"]
        assert rows[("udp", 5353)]["process"] == rows[("tcp", 8080)]["process"]
        assert fingerprint(collect("host-b", netns=lab.netns_path("b"))) == fingerprint(inv)
