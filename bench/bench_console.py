"""The console's dependency map at scale, in headless Chromium.

    python bench/bench_console.py [--workloads 2000] [--edges 20000] [--rounds 20]

Seeds a real server (uvicorn in a thread, temporary SQLite + DuckDB) with a synthetic estate of
`--workloads` workloads (bench/synth.py, imported and provisioned through the API) and recorded
flows making exactly `--edges` distinct workload-to-workload edges, then measures:

- `GET /api/v1/console/map` (server: aggregate, evaluate under the active policy, fold);
- map load + render in the browser (login done; navigation to the first drawn frame), grouped
  by app+env (the default) and by workload (every node and edge on the canvas);
- interaction at workload level: a pan or zoom step (while moving, the last full frame is
  transformed; the full map is redrawn 150 ms after the movement pauses) and a full redraw,
  each from the change to the next composited frame; a click on an edge
  to its details panel (hit test over every edge + details rendered), expanding a group.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from tests.browser.conftest import ARGS, CHROMIUM  # noqa: E402
from tests.browser.harness import Live, flow_table, serve  # noqa: E402

from bulkhead.domain.model import Policy  # noqa: E402
from bulkhead.policy.fileformat import policy_to_data  # noqa: E402
from synth import make_policy  # noqa: E402

TIER_PORTS = [443, 8080, 5432, 6379, 5672, 22, 9100]


def edges_for(policy: Policy, n_edges: int, seed: int = 0) -> tuple[list[str], list[str],
                                                                     np.ndarray]:
    """`n_edges` distinct (src, dst) workload pairs, ~70% inside an app, with a port each."""
    rng = random.Random(seed)
    ws = list(policy.workloads)
    by_app: dict[str, list[Any]] = {}
    for w in ws:
        by_app.setdefault(w.label("app") or "", []).append(w)
    seen: set[tuple[str, str]] = set()
    src: list[str] = []
    dst: list[str] = []
    ports: list[int] = []
    while len(seen) < n_edges:
        a = rng.choice(ws)
        pool = by_app[a.label("app") or ""] if rng.random() < 0.7 else ws
        b = rng.choice(pool)
        if a.name == b.name or (a.name, b.name) in seen:
            continue
        seen.add((a.name, b.name))
        src.append(a.ips[0])
        dst.append(b.ips[0])
        ports.append(rng.choice(TIER_PORTS))
    return src, dst, np.array(ports, np.int32)


def seed(live: Live, n_workloads: int, n_edges: int) -> dict[str, float]:
    t0 = time.perf_counter()
    policy = make_policy(n_workloads, max(50, n_workloads // 10))
    data = policy_to_data(policy)
    data.pop("tests", None)
    with live.client() as c:
        r = c.post("/policy/import", json=data)
        r.raise_for_status()
        t1 = time.perf_counter()
        r = c.post("/policy/provision", json={"note": "bench"})
        r.raise_for_status()
    t2 = time.perf_counter()
    src, dst, port = edges_for(policy, n_edges)
    n = len(src)
    table = flow_table(policy, src, dst, np.full(n, 6, np.int16), port,
                       count=np.random.default_rng(1).integers(1, 500, n))
    live.app.state.flows.append(table, batch_id="bench-console")
    return {"import": t1 - t0, "provision": t2 - t1, "flows": time.perf_counter() - t2}


def api_map(live: Live, rounds: int) -> list[float]:
    times = []
    with live.client() as c:
        for _ in range(rounds):
            t = time.perf_counter()
            r = c.get("/console/map")
            r.raise_for_status()
            times.append(time.perf_counter() - t)
        body = r.json()
    print(f"  map document: {len(body['edges']['src']):,} edges, "
          f"{len(body['workloads']):,} workloads, {len(r.content) / 1e6:.1f} MB")
    return times


FRAME_JS = """async ([kind, n]) => {
  const g = window.bulkheadMap.graph;
  const c = g.canvas, w = c.clientWidth, h = c.clientHeight;
  const out = [];
  const frame = () => new Promise((r) => requestAnimationFrame(() => r()));
  await frame();
  for (let i = 0; i < n; i++) {
    const t = performance.now();
    if (kind === "zoom") g.zoomAt(w / 2, h / 2, i % 2 ? 1 / 1.25 : 1.25);
    else if (kind === "pan") g.panBy(i % 2 ? -40 : 40, 0);
    else { g.view.x += i % 2 ? -40 : 40; g.request(false); }  // full redraw
    await frame();
    await frame();  // the frame after the draw: the redraw has been composited
    out.push(performance.now() - t);
  }
  return {times: out, draw: g.lastDrawMs};
}"""


def ms(values: list[float], scale: float = 1000.0) -> str:
    v = sorted(x * scale for x in values)
    p95 = v[min(len(v) - 1, round(0.95 * (len(v) - 1)))]
    return f"median {statistics.median(v):.0f} ms, p95 {p95:.0f} ms (n={len(v)})"


def browse(live: Live, rounds: int, screenshot: Path | None = None) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        page = b.new_page(viewport={"width": 1400, "height": 900})
        page.set_default_timeout(120_000)
        page.goto(live.url + "/")
        page.fill("#login-name", live.user)
        page.fill("#login-password", live.password)
        page.click("#login-form button[type=submit]")
        page.wait_for_selector("#map-stat[data-edges]")

        loads: dict[str, list[float]] = {"app + env": [], "workload": []}
        inner: dict[str, list[float]] = {"app + env": [], "workload": []}
        for _ in range(max(3, rounds // 4)):
            for level, value in (("app + env", "1"), ("workload", "3")):
                page.evaluate(f"document.getElementById('map-level').value = '{value}'")
                t = time.perf_counter()
                page.evaluate("window.bulkheadMap.reload()")
                page.wait_for_selector("#map-stat[data-edges]")
                page.evaluate("new Promise((r) => requestAnimationFrame(() => r()))")
                loads[level].append(time.perf_counter() - t)
                inner[level].append(page.evaluate("window.bulkheadMap.loadMs.total") / 1000)
        b_ = page.evaluate("window.bulkheadMap.build")
        print(f"  in-page build at workload level: aggregate {b_['aggregate']:.0f} ms, "
              f"layout + draw {b_['layoutDraw']:.0f} ms, edge table {b_['table']:.0f} ms")
        stats = page.evaluate("window.bulkheadMap.stats()")
        if screenshot is not None:
            page.screenshot(path=str(screenshot))
        print(f"  workload level on the canvas: {stats['nodes']:,} nodes, "
              f"{stats['edges']:,} edges")
        for level in loads:
            print(f"  map load + render ({level}): {ms(loads[level])}; in page (fetch + "
                  f"aggregate + layout + draw): {ms(inner[level])}")

        for kind in ("pan", "zoom", "full redraw"):
            res = page.evaluate(FRAME_JS, [kind, rounds])
            page.wait_for_timeout(300)  # let the deferred full redraw of quick steps pass
            print(f"  {kind} step to composited frame: {ms(res['times'], 1)}; "
                  f"last draw call {res['draw']:.0f} ms")

        box = page.locator("#map-canvas").bounding_box()
        assert box is not None
        clicks = []
        n_edges = stats["edges"]
        rng = random.Random(3)
        for _ in range(rounds):
            i = rng.randrange(min(n_edges, 2000))
            x, y = page.evaluate(f"window.bulkheadMap.edgePoint({i})")
            if not (0 < x < box["width"] and 0 < y < box["height"]):
                continue
            page.evaluate("document.getElementById('map-detail').replaceChildren()")
            t = time.perf_counter()
            page.mouse.click(box["x"] + x, box["y"] + y)
            page.wait_for_selector("#map-detail h2")
            clicks.append(time.perf_counter() - t)
        print(f"  click on an edge to its details: {ms(clicks)}")

        hit = page.evaluate("""() => {
          const g = window.bulkheadMap.graph, t = performance.now();
          for (let i = 0; i < 50; i++) g.hitTest(100 + i * 7, 200 + i * 3);
          return (performance.now() - t) / 50;
        }""")
        print(f"  hit test over every node and edge: {hit:.1f} ms")

        page.evaluate("document.getElementById('map-level').value = '1'")
        page.evaluate("window.bulkheadMap.reload()")
        page.wait_for_selector("#map-stat[data-edges]")
        i = page.evaluate("window.bulkheadMap.nodeIndex(window.bulkheadMap.graph.nodes"
                          ".find((n) => n.kind === 'group').label)")
        x, y = page.evaluate(f"window.bulkheadMap.nodePoint({i})")
        page.mouse.click(box["x"] + x, box["y"] + y)
        page.wait_for_selector("#node-expand")
        before = page.evaluate("window.bulkheadMap.stats().nodes")
        t = time.perf_counter()
        page.click("#node-expand")
        while page.evaluate("window.bulkheadMap.stats().nodes") == before:
            time.sleep(0.005)
        b_ = page.evaluate("window.bulkheadMap.build")
        print(f"  expand a group: {(time.perf_counter() - t) * 1000:.0f} ms (in page: "
              f"aggregate {b_['aggregate']:.0f} ms, layout + draw {b_['layoutDraw']:.0f} ms, "
              f"edge table {b_['table']:.0f} ms)")
        b.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", type=int, default=2000)
    ap.add_argument("--edges", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--screenshot", type=Path, help="save the workload-level map here (PNG)")
    args = ap.parse_args()
    if not CHROMIUM.exists():
        sys.exit(f"{CHROMIUM} is not installed")
    with tempfile.TemporaryDirectory() as tmp, serve(Path(tmp)) as live:
        print(f"console map: {args.workloads:,} workloads, {args.edges:,} edges")
        s = seed(live, args.workloads, args.edges)
        print(f"  seeding: import {s['import']:.1f} s, provision {s['provision']:.1f} s, "
              f"flows {s['flows']:.1f} s")
        print(f"  GET /api/v1/console/map: {ms(api_map(live, max(3, args.rounds // 4)))}")
        browse(live, args.rounds, args.screenshot)


if __name__ == "__main__":
    main()
