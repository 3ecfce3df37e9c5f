// Map page: the application dependency map from recorded flows, decided under the active policy
// or the draft; nodes grouped by label and expandable down to workload and process.
import { api } from "./api.js";
import { Graph } from "./graph.js";
import { rulesOf, ruleText } from "./policyobjects.js";
import { h, clear, table, fmt, service, select, field, errorText, decisionClass } from "./ui.js";

// app → app+env → app+env+role → workload → process
const CHAIN = [["app"], ["app", "env"], ["app", "env", "role"], "workload", "process"];
const BASES = [["1", "app + env"], ["0", "app"], ["2", "app + env + role"], ["3", "workload"]];
const RANGES = [["", "all recorded"], ["-1h", "last hour"], ["-24h", "last 24 hours"],
  ["-7d", "last 7 days"], ["-30d", "last 30 days"], ["custom", "custom…"]];

export function labelId(keys, labels) {
  return "g:" + keys.map((k) => `${k}=${(labels && labels[k]) ?? "(none)"}`).join(",");
}

// The node id of one edge end at chain level i.
function idAt(i, end, proc, isDst, data) {
  const level = CHAIN[i];
  if (end.startsWith("ip:")) return Array.isArray(level) ? "g:(external)" : end;
  if (Array.isArray(level)) return labelId(level, (data.workloads[end] || {}).labels);
  if (level === "workload") return `w:${end}`;
  return isDst ? `p:${end}|${proc || "(no process)"}` : `p:${end}|(clients)`;
}

function nodeLabel(id) {
  if (id === "g:(external)") return "external";
  if (id.startsWith("g:")) return id.slice(2).split(",").map((p) => p.split("=")[1]).join(" · ");
  if (id.startsWith("w:")) return id.slice(2);
  if (id.startsWith("p:")) { const [w, p] = id.slice(2).split("|"); return `${w} · ${p}`; }
  return id.slice(3);
}

function nodeKind(id) {
  if (id.startsWith("ip:") || id === "g:(external)") return "external";
  return { g: "group", w: "workload", p: "process" }[id[0]];
}

// Fold workload-level edges into the visible graph (base level + expanded nodes).
export function aggregate(data, base, expanded) {
  const e = data.edges;
  const n = e.src.length;
  const nodes = new Map();
  const edges = new Map();
  const last = CHAIN.length - 1;
  // one node id per distinct end (and serving process): ~2,000 lookups, not 40,000
  const memo = new Map();
  const endNode = (end, proc, isDst) => {
    const ck = isDst ? `${end}\u0000${proc ?? ""}` : end;
    const known = memo.get(ck);
    if (known !== undefined) return known;
    let i = base;
    let id = idAt(i, end, proc, isDst, data);
    // laid out near the rest of its app + env (or its app, when grouping by app)
    const cluster = idAt(Math.min(base, 1), end, proc, isDst, data);
    let parent = null;
    while (i < last && expanded.has(id) && !id.startsWith("ip:")) {
      parent = id;
      i += 1;
      id = idAt(i, end, proc, isDst, data);
    }
    let node = nodes.get(id);
    if (!node) {
      node = { id, label: nodeLabel(id), cluster, parent, level: i, kind: nodeKind(id),
        weight: 0, members: new Set(), ips: new Set(), expandable: i < last && !id.startsWith("ip:") && !id.startsWith("p:") };
      nodes.set(id, node);
    }
    if (end.startsWith("ip:")) node.ips.add(end.slice(3)); else node.members.add(end);
    const entry = { id, node };
    memo.set(ck, entry);
    return entry;
  };
  const svcNames = new Map();
  const CLS = ["allowed", "potentially_blocked", "blocked", "unknown"];
  for (let r = 0; r < n; r++) {
    const a = endNode(e.src[r], e.process[r], false);
    const b = endNode(e.dst[r], e.process[r], true);
    const key = `${a.id}\u2192${b.id}`;
    let edge = edges.get(key);
    if (!edge) {
      edge = { key, sId: a.id, tId: b.id, rows: [], connections: 0, flows: 0,
        allowed: 0, potentially_blocked: 0, blocked: 0, unknown: 0, services: new Set() };
      edges.set(key, edge);
    }
    const conns = e.connections[r];
    edge.rows.push(r);
    edge.connections += conns;
    edge.flows += e.flows[r];
    for (const c of CLS) edge[c] += e[c][r];
    const sk = e.proto[r] * 100000 + e.port[r];
    let sname = svcNames.get(sk);
    if (sname === undefined) { sname = service(e.proto[r], e.port[r]); svcNames.set(sk, sname); }
    edge.services.add(sname);
    a.node.weight += conns;
    b.node.weight += conns;
  }
  const nodeList = [...nodes.values()];
  const index = new Map(nodeList.map((x, i) => [x.id, i]));
  const edgeList = [...edges.values()].sort((a, b) => b.connections - a.connections || (a.key < b.key ? -1 : 1));
  for (const edge of edgeList) {
    edge.s = index.get(edge.sId);
    edge.t = index.get(edge.tId);
    edge.cls = edge.blocked ? "blocked" : edge.potentially_blocked ? "potentially_blocked"
      : edge.allowed ? "allowed" : "unknown";
    edge.weight = edge.connections;
  }
  return { nodes: nodeList, edges: edgeList };
}

export async function mount(root) {
  const policySel = select([["active", "active policy"], ["draft", "draft"]], "active", { id: "map-policy" });
  const baseSel = select(BASES, "1", { id: "map-level" });
  const rangeSel = select(RANGES, "", { id: "map-range" });
  const fromIn = h("input", { type: "datetime-local", id: "map-from", hidden: true });
  const toIn = h("input", { type: "datetime-local", id: "map-to", hidden: true });
  const labelIn = h("input", { id: "map-labels", placeholder: "app=shop env=prod", size: 22 });
  const refresh = h("button", { type: "button", class: "primary", id: "map-refresh" }, "Refresh");
  const fitBtn = h("button", { type: "button", id: "map-fit" }, "Fit");
  const stat = h("span", { class: "stat", id: "map-stat" });
  const canvas = h("canvas", { id: "map-canvas", "aria-label": "Dependency map" });
  const side = h("div", { class: "side panel", id: "map-detail" },
    h("p", { class: "muted" }, "Click an edge for its flows and the rules that decide them; click a group to expand it."));
  const edgeList = h("div", { id: "map-edges" });
  const msg = h("div");
  const legend = h("div", { class: "legend" }, ["allowed", "potentially_blocked", "blocked", "unknown"].map(
    (c) => h("span", null, h("i", { class: c }), c.replace("_", " "))));
  clear(root,
    h("h1", null, "Application dependency map"),
    h("div", { class: "toolbar" },
      field("Decided by", policySel), field("Group by", baseSel), field("Time range", rangeSel),
      field("From", fromIn), field("To", toIn), field("Label filter", labelIn), refresh, fitBtn, legend),
    msg,
    h("div", { class: "split" },
      h("div", null, h("div", { class: "map-wrap" }, canvas), stat, h("h2", null, "Edges"), edgeList),
      side));

  const expanded = new Set();
  let data = null;
  let view = null;
  const graph = new Graph(canvas, {
    onSelect: (hit) => showHit(hit),
    onOpen: (hit) => toggle(view.nodes[hit.index]),
  });

  function query() {
    const pairs = [["policy", policySel.value]];
    if (rangeSel.value === "custom") {
      if (fromIn.value) pairs.push(["from", new Date(fromIn.value).toISOString()]);
      if (toIn.value) pairs.push(["to", new Date(toIn.value).toISOString()]);
    } else if (rangeSel.value) pairs.push(["from", rangeSel.value]);
    for (const tok of labelIn.value.split(/\s+/).filter(Boolean)) pairs.push(["label", tok]);
    return pairs;
  }

  async function load() {
    clear(msg);
    stat.textContent = "loading…";
    delete stat.dataset.edges;
    delete stat.dataset.nodes;
    const t0 = performance.now();
    try {
      data = await api.get("/console/map", { pairs: query() });
    } catch (ex) {
      clear(msg, h("p", { class: "notice error", role: "alert" }, errorText(ex)));
      stat.textContent = "";
      return;
    }
    const t1 = performance.now();
    rebuild(false);
    window.bulkheadMap.loadMs = { fetch: t1 - t0, total: performance.now() - t0 };
  }

  function rebuild(keepView) {
    const t0 = performance.now();
    view = aggregate(data, Number(baseSel.value), expanded);
    const t1 = performance.now();
    graph.setData(view.nodes, view.edges, { keepView });
    graph.draw();
    const t2 = performance.now();
    stat.textContent = `${fmt.num(view.nodes.length)} nodes, ${fmt.num(view.edges.length)} edges ` +
      `(${fmt.num(data.edges.src.length)} workload edges) decided by ${data.policy}` +
      (data.truncated ? " — truncated to the heaviest edges" : "");
    stat.dataset.nodes = view.nodes.length;
    stat.dataset.edges = view.edges.length;
    renderEdgeTable();
    window.bulkheadMap.build = { aggregate: t1 - t0, layoutDraw: t2 - t1, table: performance.now() - t2 };
    window.bulkheadMap.ready = true;
  }

  function renderEdgeTable() {
    const rows = view.edges.slice(0, 300).map((e, i) => ({ ...e, i, from: view.nodes[e.s].label, to: view.nodes[e.t].label }));
    clear(edgeList, table([
      { key: "from", title: "From" }, { key: "to", title: "To" },
      { key: "svc", title: "Services", render: (r) => [...r.services].slice(0, 6).join(", ") + (r.services.size > 6 ? " …" : "") },
      { key: "connections", title: "Connections", render: (r) => fmt.num(r.connections) },
      { key: "cls", title: "Decision", render: (r) => h("span", { class: `dec ${r.cls}` }, r.cls.replace("_", " ")) },
    ], rows, {
      sortable: true,
      rowAttrs: (r) => ({ "data-edge": `${r.from}→${r.to}`, "data-decision": r.cls, class: "edge-row" }),
      onRow: (r) => { graph.select({ type: "edge", index: r.i }); showHit({ type: "edge", index: r.i }); },
      empty: "no recorded flows match",
    }), view.edges.length > 300 ? h("p", { class: "muted" }, `${fmt.num(view.edges.length - 300)} more edges (see the map)`) : null);
  }

  function toggle(node) {
    if (!node) return;
    if (node.expandable) expanded.add(node.id);
    rebuild(true);
  }

  function collapse(node) {
    if (node.parent) expanded.delete(node.parent);
    rebuild(true);
  }

  function endFilter(node, side) {
    const f = {};
    if (node.members.size) f[side] = [...node.members];
    if (node.ips.size) f[`${side}_ip`] = [...node.ips];
    return f;
  }

  async function showHit(hit) {
    if (!hit) return;
    if (hit.type === "node") {
      const node = view.nodes[hit.index];
      clear(side,
        h("h2", null, node.label),
        h("p", { class: "muted" }, `${node.kind}, ${fmt.num(node.weight)} connections`),
        node.expandable ? h("button", { type: "button", id: "node-expand", onclick: () => toggle(node) }, "Expand") : null,
        node.parent ? h("button", { type: "button", id: "node-collapse", onclick: () => collapse(node) }, "Collapse") : null,
        node.members.size ? h("h3", null, "Workloads") : null,
        h("ul", { class: "plain" }, [...node.members].slice(0, 100).map((w) =>
          h("li", null, w, " ", h("span", { class: "muted" }, fmt.labels((data.workloads[w] || {}).labels))))),
        node.ips.size ? h("p", null, "Addresses: ", [...node.ips].slice(0, 50).join(", ")) : null);
      return;
    }
    const edge = view.edges[hit.index];
    const src = view.nodes[edge.s], dst = view.nodes[edge.t];
    const e = data.edges;
    const rows = edge.rows.map((r) => ({
      svc: service(e.proto[r], e.port[r]), process: e.process[r] || "", src: e.src[r].replace(/^ip:/, ""),
      dst: e.dst[r].replace(/^ip:/, ""), connections: e.connections[r],
      cls: e.blocked[r] ? "blocked" : e.potentially_blocked[r] ? "potentially_blocked" : e.allowed[r] ? "allowed" : "unknown",
      rules: e.rules[r],
    }));
    const ruleBox = h("div", { id: "edge-rules" }, h("p", { class: "muted" }, "loading rules…"));
    const flowBox = h("div", { id: "edge-flows" }, h("p", { class: "muted" }, "loading flows…"));
    clear(side,
      h("h2", { id: "edge-title" }, `${src.label} → ${dst.label}`),
      h("p", null, h("span", { class: `dec ${edge.cls}` }, edge.cls.replace("_", " ")), " ",
        `${fmt.num(edge.connections)} connections in ${fmt.num(edge.flows)} flow records; decided by ${data.policy}`),
      h("p", { class: "stat" }, ["allowed", "potentially_blocked", "blocked", "unknown"].filter((c) => edge[c])
        .map((c) => `${c.replace("_", " ")}: ${fmt.num(edge[c])}`).join(" · ")),
      h("h3", null, "Services"),
      table([{ key: "src", title: "From" }, { key: "dst", title: "To" }, { key: "svc", title: "Service" },
        { key: "process", title: "Process" }, { key: "connections", title: "Conns", render: (r) => fmt.num(r.connections) },
        { key: "cls", title: "Decision", render: (r) => h("span", { class: `dec ${r.cls}` }, r.cls.replace("_", " ")) }],
      rows.slice(0, 200), { sortable: true }),
      h("h3", null, "Rules deciding them"), ruleBox,
      h("h3", null, "Flows"), flowBox);
    const ids = [...new Set(rows.flatMap((r) => r.rules))].sort();
    rulesOf(data.policy).then((byId) => {
      clear(ruleBox, ids.length ? h("ul", { class: "plain" }, ids.map((id) => {
        const found = byId.get(id);
        return h("li", { "data-rule": id }, h("strong", null, id), found ? ` (${found.ruleset}) ${ruleText(found.rule)}` : "");
      })) : h("p", { class: "muted" }, "no rule matches: the default decision applies"));
    }).catch((ex) => clear(ruleBox, h("p", { class: "notice error" }, errorText(ex))));
    const filters = { ...endFilter(src, "src"), ...endFilter(dst, "dst") };
    for (const [k, v] of query()) if (k === "from" || k === "to") filters[k] = v;
    try {
      const res = await api.post("/traffic/what-if", { policy: data.policy, filters, limit: 50, summary: false });
      clear(flowBox, table([
        { key: "ts", title: "Time", render: (r) => fmt.time(r.ts) }, { key: "src_ip", title: "Source" }, { key: "dst_ip", title: "Destination" },
        { key: "svc", title: "Service", render: (r) => service(r.proto, r.dst_port) },
        { key: "process", title: "Process" }, { key: "connections", title: "Conns" },
        { key: "decision", title: "Decision", render: (r) => h("span", { class: `dec ${decisionClass(r.decision)}` }, r.decision) },
        { key: "rules", title: "Rules", render: (r) => (r.rules || []).join(", ") }], res.items, { sortable: true }),
      res.next_cursor ? h("p", { class: "muted" }, "first 50 flows; see Traffic for all") : null);
    } catch (ex) {
      clear(flowBox, h("p", { class: "notice error" }, errorText(ex)));
    }
  }

  window.bulkheadMap = {
    ready: false, graph, loadMs: null,
    edgeIndex: (label) => view.edges.findIndex((e) => `${view.nodes[e.s].label}→${view.nodes[e.t].label}` === label),
    edgePoint: (i) => graph.edgePoint(i),
    nodeIndex: (label) => view.nodes.findIndex((n) => n.label === label),
    nodePoint: (i) => graph.nodePoint(i),
    stats: () => ({ nodes: view.nodes.length, edges: view.edges.length, drawMs: graph.lastDrawMs, frames: graph.frames }),
    reload: load,
  };
  rangeSel.addEventListener("change", () => {
    fromIn.hidden = toIn.hidden = rangeSel.value !== "custom";
    if (rangeSel.value !== "custom") load();
  });
  for (const el of [policySel]) el.addEventListener("change", load);
  baseSel.addEventListener("change", () => { expanded.clear(); rebuild(false); });
  labelIn.addEventListener("keydown", (ev) => { if (ev.key === "Enter") load(); });
  refresh.addEventListener("click", load);
  fitBtn.addEventListener("click", () => { graph.fit(); graph.request(); });
  await load();
  return { unmount: () => graph.destroy() };
}
