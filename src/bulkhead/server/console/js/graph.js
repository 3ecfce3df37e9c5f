// Canvas renderer of the dependency map: clustered layout, batched drawing (one path per colour
// and width), pan/zoom, and hit testing of nodes and edges. No DOM per node or edge, so 2,000
// nodes and 20,000 edges stay interactive.
const COLORS = { allowed: "#1a9850", potentially_blocked: "#e08a00", blocked: "#d7301f", unknown: "#8a8f99" };
const CLASSES = Object.keys(COLORS);
const GOLDEN = Math.PI * (3 - Math.sqrt(5));

export class Graph {
  constructor(canvas, { onSelect, onOpen } = {}) {
    this.canvas = canvas;
    this.ctx = canvas.getContext("2d");
    this.onSelect = onSelect || (() => {});
    this.onOpen = onOpen || (() => {});
    this.nodes = [];
    this.edges = [];
    this.view = { k: 1, x: 0, y: 0 };
    this.selected = null; // {type, index}
    this.lastDrawMs = 0;
    this.frames = 0;
    this._pending = false;
    this._bind();
    this._resize = new ResizeObserver(() => this.resize());
    this._resize.observe(canvas);
  }

  destroy() { this._resize.disconnect(); }

  // nodes: [{id, label, cluster, weight, kind}], edges: [{s, t, cls, weight}] (s, t: node indices)
  setData(nodes, edges, { keepView = false } = {}) {
    this.nodes = nodes;
    this.edges = edges;
    this.selected = null;
    this.layout();
    if (!keepView) this.fit();
    this.request();
  }

  layout() {
    const clusters = new Map();
    for (const [i, n] of this.nodes.entries()) {
      if (!clusters.has(n.cluster)) clusters.set(n.cluster, []);
      clusters.get(n.cluster).push(i);
    }
    const step = 26;
    const groups = [...clusters.entries()].map(([id, members]) => {
      members.sort((a, b) => (this.nodes[b].weight - this.nodes[a].weight) || (this.nodes[a].id < this.nodes[b].id ? -1 : 1));
      const r = members.length === 1 ? 0 : step * Math.sqrt(members.length) * 0.9;
      return { id, members, r: r + 30 };
    });
    groups.sort((a, b) => b.members.length - a.members.length || (a.id < b.id ? -1 : 1));
    const place = (g, cx, cy) => {
      g.cx = cx; g.cy = cy;
      g.members.forEach((ni, k) => {
        const rr = g.members.length === 1 ? 0 : step * Math.sqrt(k + 0.5) * 0.9;
        const a = k * GOLDEN;
        const n = this.nodes[ni];
        n.x = cx + rr * Math.cos(a);
        n.y = cy + rr * Math.sin(a);
        n.r = Math.min(16, 5 + Math.log2(1 + (n.weight || 0)) * 0.6);
      });
    };
    if (groups.length <= 40) {
      // clusters on a circle: no three centres in a line, so edges do not run through nodes
      const circ = groups.reduce((s, g) => s + 2 * g.r + 40, 0);
      const R = groups.length === 1 ? 0 : Math.max(120, circ / (2 * Math.PI));
      let angle = -Math.PI / 2;
      for (const g of groups) {
        const share = ((2 * g.r + 40) / circ) * 2 * Math.PI;
        angle += share / 2;
        place(g, R * Math.cos(angle), R * Math.sin(angle));
        angle += share / 2;
      }
    } else {
      // shelf packing, rows about as wide as the total is tall
      const area = groups.reduce((s, g) => s + (2 * g.r + 30) ** 2, 0);
      const width = Math.sqrt(area) * 1.3;
      let x = 0, y = 0, rowH = 0;
      for (const g of groups) {
        const d = 2 * g.r + 30;
        if (x + d > width && x > 0) { x = 0; y += rowH; rowH = 0; }
        place(g, x + d / 2, y + d / 2);
        x += d;
        rowH = Math.max(rowH, d);
      }
    }
    this.clusters = groups;
    this._geometry();
  }

  // per-edge endpoints, shifted sideways so that A→B and B→A stay apart
  _geometry() {
    const m = this.edges.length;
    this.geo = new Float32Array(m * 4);
    for (let i = 0; i < m; i++) {
      const e = this.edges[i];
      const a = this.nodes[e.s], b = this.nodes[e.t];
      let x1 = a.x, y1 = a.y, x2 = b.x, y2 = b.y;
      if (e.s !== e.t) {
        const dx = x2 - x1, dy = y2 - y1;
        const len = Math.hypot(dx, dy) || 1;
        const ox = (-dy / len) * 2.5, oy = (dx / len) * 2.5;
        x1 += ox; y1 += oy; x2 += ox; y2 += oy;
      }
      const o = i * 4;
      this.geo[o] = x1; this.geo[o + 1] = y1; this.geo[o + 2] = x2; this.geo[o + 3] = y2;
    }
  }

  resize() {
    const dpr = window.devicePixelRatio || 1;
    const w = this.canvas.clientWidth, hgt = this.canvas.clientHeight;
    if (!w || !hgt) return;
    this.canvas.width = Math.round(w * dpr);
    this.canvas.height = Math.round(hgt * dpr);
    this.dpr = dpr;
    this.request();
  }

  fit() {
    const w = this.canvas.clientWidth || 800, hgt = this.canvas.clientHeight || 500;
    if (!this.nodes.length) { this.view = { k: 1, x: w / 2, y: hgt / 2 }; return; }
    let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
    for (const n of this.nodes) {
      x0 = Math.min(x0, n.x - 40); y0 = Math.min(y0, n.y - 30);
      x1 = Math.max(x1, n.x + 40); y1 = Math.max(y1, n.y + 30);
    }
    const k = Math.min(2, w / (x1 - x0), hgt / (y1 - y0));
    this.view = { k, x: w / 2 - k * (x0 + x1) / 2, y: hgt / 2 - k * (y0 + y1) / 2 };
  }

  toScreen(x, y) { return [x * this.view.k + this.view.x, y * this.view.k + this.view.y]; }
  toWorld(px, py) { return [(px - this.view.x) / this.view.k, (py - this.view.y) / this.view.k]; }

  // quick: while panning/zooming a large map, transform the last full frame (one bitmap
  // copy) and draw the full map once the interaction pauses
  request(quick = false) {
    this._quick = quick && this.edges.length > 3000 && this._cache && this._pending !== "full";
    if (!quick && this._pending === "quick") this._pending = "full";
    if (this._pending) return;
    this._pending = this._quick ? "quick" : "full";
    requestAnimationFrame(() => {
      const q = this._pending === "quick";
      this._pending = false;
      if (q) this._drawQuick(); else this.draw();
    });
    clearTimeout(this._idle);
    if (this._quick) this._idle = setTimeout(() => this.request(false), 150);
  }

  _drawQuick() {
    const t0 = performance.now();
    const c = this._cache;
    const dpr = this.dpr || 1;
    const s = this.view.k / c.view.k;
    const ctx = this.ctx;
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.clearRect(0, 0, this.canvas.width, this.canvas.height);
    ctx.drawImage(c.canvas, (this.view.x - c.view.x * s) * dpr, (this.view.y - c.view.y * s) * dpr,
      c.canvas.width * s, c.canvas.height * s);
    this.frames++;
    this.lastDrawMs = performance.now() - t0;
  }

  _keep() {
    if (this.edges.length <= 3000) { this._cache = null; return; }
    const c = this._cache && this._cache.canvas.width === this.canvas.width && this._cache.canvas.height === this.canvas.height
      ? this._cache.canvas : Object.assign(document.createElement("canvas"), { width: this.canvas.width, height: this.canvas.height });
    const cctx = c.getContext("2d");
    cctx.clearRect(0, 0, c.width, c.height);
    cctx.drawImage(this.canvas, 0, 0);
    this._cache = { canvas: c, view: { ...this.view } };
  }

  draw() {
    const t0 = performance.now();
    const { ctx } = this;
    const dpr = this.dpr || window.devicePixelRatio || 1;
    const { k, x, y } = this.view;
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.clearRect(0, 0, this.canvas.width, this.canvas.height);
    ctx.setTransform(dpr * k, 0, 0, dpr * k, dpr * x, dpr * y);
    const many = this.edges.length > 3000;
    // cluster outlines
    ctx.lineWidth = 1 / k;
    ctx.strokeStyle = "#e3e6ec";
    for (const g of this.clusters || []) {
      if (g.members.length < 2) continue;
      ctx.beginPath();
      ctx.arc(g.cx, g.cy, g.r - 8, 0, 2 * Math.PI);
      ctx.stroke();
    }
    // edges: one path per (class, width bucket)
    const buckets = new Map();
    for (let i = 0; i < this.edges.length; i++) {
      const e = this.edges[i];
      const w = e.weight > 1000 ? 3 : e.weight > 50 ? 2 : 1;
      const key = `${e.cls}|${w}`;
      if (!buckets.has(key)) buckets.set(key, []);
      buckets.get(key).push(i);
    }
    ctx.globalAlpha = many ? 0.45 : 0.85;
    for (const [key, list] of buckets) {
      const [cls, w] = key.split("|");
      ctx.strokeStyle = COLORS[cls] || COLORS.unknown;
      ctx.lineWidth = (Number(w) * (many ? 0.6 : 1.2)) / Math.sqrt(k);
      ctx.beginPath();
      for (const i of list) this._path(i);
      ctx.stroke();
      if (!many) {
        ctx.fillStyle = ctx.strokeStyle;
        ctx.beginPath();
        for (const i of list) this._arrow(i);
        ctx.fill();
      }
    }
    ctx.globalAlpha = 1;
    if (this.selected && this.selected.type === "edge") {
      ctx.strokeStyle = "#111";
      ctx.lineWidth = 3.5 / Math.sqrt(k);
      ctx.beginPath();
      this._path(this.selected.index);
      ctx.stroke();
    }
    // nodes
    const kinds = { group: "#3b4a6b", workload: "#2f5bea", process: "#7048e8", external: "#8a8f99" };
    for (const kind of Object.keys(kinds)) {
      ctx.fillStyle = kinds[kind];
      ctx.beginPath();
      for (const n of this.nodes) {
        if (n.kind !== kind) continue;
        ctx.moveTo(n.x + n.r, n.y);
        ctx.arc(n.x, n.y, n.r, 0, 2 * Math.PI);
      }
      ctx.fill();
    }
    if (this.selected && this.selected.type === "node") {
      const n = this.nodes[this.selected.index];
      ctx.strokeStyle = "#111";
      ctx.lineWidth = 2.5 / k;
      ctx.beginPath();
      ctx.arc(n.x, n.y, n.r + 3 / k, 0, 2 * Math.PI);
      ctx.stroke();
    }
    // labels when legible
    if (this.nodes.length <= 400 || k > 1.2) {
      ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
      ctx.font = "12px system-ui, sans-serif";
      ctx.textAlign = "center";
      ctx.fillStyle = "#1d2330";
      const w = this.canvas.clientWidth, hgt = this.canvas.clientHeight;
      let drawn = 0;
      for (const n of this.nodes) {
        const [sx, sy] = this.toScreen(n.x, n.y);
        if (sx < -50 || sy < -20 || sx > w + 50 || sy > hgt + 20) continue;
        ctx.fillText(n.label, sx, sy + n.r * k + 13);
        if (++drawn > 600) break;
      }
    }
    this.frames++;
    this.lastDrawMs = performance.now() - t0;
    this._keep();
  }

  _path(i) {
    const g = this.geo, o = i * 4;
    const e = this.edges[i];
    if (e.s === e.t) { // a loop above the node
      const n = this.nodes[e.s];
      this.ctx.moveTo(n.x + n.r + 9, n.y - n.r);
      this.ctx.arc(n.x, n.y - n.r - 6, 9, 0, 2 * Math.PI);
      return;
    }
    this.ctx.moveTo(g[o], g[o + 1]);
    this.ctx.lineTo(g[o + 2], g[o + 3]);
  }

  _arrow(i) {
    const e = this.edges[i];
    if (e.s === e.t) return;
    const g = this.geo, o = i * 4;
    const dx = g[o + 2] - g[o], dy = g[o + 3] - g[o + 1];
    const len = Math.hypot(dx, dy) || 1;
    const ux = dx / len, uy = dy / len;
    const r = this.nodes[e.t].r + 2;
    const tx = g[o + 2] - ux * r, ty = g[o + 3] - uy * r;
    const s = 7 / Math.sqrt(this.view.k);
    this.ctx.moveTo(tx, ty);
    this.ctx.lineTo(tx - ux * s - uy * s * 0.5, ty - uy * s + ux * s * 0.5);
    this.ctx.lineTo(tx - ux * s + uy * s * 0.5, ty - uy * s - ux * s * 0.5);
    this.ctx.closePath();
  }

  // {type: "node"|"edge", index} under a canvas point (CSS pixels), or null
  hitTest(px, py) {
    const [wx, wy] = this.toWorld(px, py);
    const slop = 6 / this.view.k;
    let best = null, bestD = Infinity;
    for (let i = 0; i < this.nodes.length; i++) {
      const n = this.nodes[i];
      const d = Math.hypot(n.x - wx, n.y - wy) - n.r;
      if (d < slop && d < bestD) { best = { type: "node", index: i }; bestD = d; }
    }
    if (best) return best;
    const g = this.geo;
    for (let i = 0; i < this.edges.length; i++) {
      const e = this.edges[i];
      let d;
      if (e.s === e.t) {
        const n = this.nodes[e.s];
        d = Math.abs(Math.hypot(wx - n.x, wy - (n.y - n.r - 6)) - 9);
      } else {
        const o = i * 4;
        d = segDist(wx, wy, g[o], g[o + 1], g[o + 2], g[o + 3]);
      }
      if (d < slop && d < bestD) { best = { type: "edge", index: i }; bestD = d; }
    }
    return best;
  }

  select(sel) {
    this.selected = sel;
    this.request();
  }

  // a screen point on edge i (for tests and the benchmark): 60% of the way along
  edgePoint(i) {
    const e = this.edges[i];
    if (e.s === e.t) {
      const n = this.nodes[e.s];
      return this.toScreen(n.x, n.y - n.r - 15);
    }
    const o = i * 4, g = this.geo;
    return this.toScreen(g[o] + 0.6 * (g[o + 2] - g[o]), g[o + 1] + 0.6 * (g[o + 3] - g[o + 1]));
  }

  nodePoint(i) { const n = this.nodes[i]; return this.toScreen(n.x, n.y); }

  zoomAt(px, py, factor) {
    const k = Math.max(0.02, Math.min(40, this.view.k * factor));
    const [wx, wy] = this.toWorld(px, py);
    this.view = { k, x: px - wx * k, y: py - wy * k };
    this.request(true);
  }

  panBy(dx, dy) { this.view.x += dx; this.view.y += dy; this.request(true); }

  _bind() {
    const c = this.canvas;
    let drag = null;
    c.addEventListener("pointerdown", (e) => {
      drag = { x: e.offsetX, y: e.offsetY, moved: false };
      c.setPointerCapture(e.pointerId);
    });
    c.addEventListener("pointermove", (e) => {
      if (!drag) return;
      const dx = e.offsetX - drag.x, dy = e.offsetY - drag.y;
      if (!drag.moved && Math.hypot(dx, dy) < 3) return;
      drag.moved = true;
      c.classList.add("dragging");
      this.panBy(dx, dy);
      drag.x = e.offsetX; drag.y = e.offsetY;
    });
    c.addEventListener("pointerup", (e) => {
      c.classList.remove("dragging");
      const wasDrag = drag && drag.moved;
      drag = null;
      if (wasDrag) return;
      const hit = this.hitTest(e.offsetX, e.offsetY);
      this.select(hit);
      this.onSelect(hit);
    });
    c.addEventListener("dblclick", (e) => {
      const hit = this.hitTest(e.offsetX, e.offsetY);
      if (hit && hit.type === "node") this.onOpen(hit);
    });
    c.addEventListener("wheel", (e) => {
      e.preventDefault();
      this.zoomAt(e.offsetX, e.offsetY, Math.exp(-e.deltaY * 0.0015));
    }, { passive: false });
  }
}

function segDist(px, py, x1, y1, x2, y2) {
  const dx = x2 - x1, dy = y2 - y1;
  const l2 = dx * dx + dy * dy;
  let t = l2 ? ((px - x1) * dx + (py - y1) * dy) / l2 : 0;
  t = Math.max(0, Math.min(1, t));
  return Math.hypot(px - (x1 + t * dx), py - (y1 + t * dy));
}

export { CLASSES, COLORS };
