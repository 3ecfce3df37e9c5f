// Small DOM helpers: element builder, tables, notices, formatting.
export function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on") && typeof v === "function") el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else if (k === "dataset") Object.assign(el.dataset, v);
    else if (k === "value") el.value = v;
    else if (k === "checked") el.checked = !!v;
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat(Infinity)) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

export function clear(el, ...children) {
  el.replaceChildren(...children.flat(Infinity).filter((c) => c != null && c !== false));
  return el;
}

export function notice(container, message, kind = "error") {
  const n = h("div", { class: `notice ${kind}`, role: kind === "error" ? "alert" : "status" }, message);
  container.prepend(n);
  if (kind !== "error") setTimeout(() => n.remove(), 6000);
  return n;
}

export function errorText(err) {
  return err && typeof err.describe === "function" ? err.describe() : String(err && err.message || err);
}

export const fmt = {
  num: (n) => (n == null ? "" : Number(n).toLocaleString("en")),
  time: (t) => (t == null ? "" : typeof t === "number" ? new Date(t * 1000).toISOString().replace(".000Z", "Z")
    : String(t).replace(/\.\d+(Z|[+-]\d\d:\d\d)$/, "$1")),
  proto: (p) => ({ 6: "tcp", 17: "udp", 1: "icmp", 58: "icmpv6" }[p] || String(p)),
  labels: (obj) => Object.entries(obj || {}).map(([k, v]) => `${k}=${v}`).join(" "),
};

export function service(proto, port) {
  const p = fmt.proto(proto);
  return port == null || port < 0 ? p : `${p}/${port}`;
}

// The decision classes the map and tables colour by.
export function decisionClass(d) {
  if (!d) return "unknown";
  if (d.startsWith("allowed")) return "allowed";
  if (d.startsWith("potentially")) return "potentially_blocked";
  if (d.startsWith("blocked")) return "blocked";
  return "unknown";
}

// columns: [{key, title, render?(row), sort?: bool}]
export function table(columns, rows, { onRow, rowAttrs, sortable, empty } = {}) {
  let sortKey = null;
  let dir = 1;
  const tbody = h("tbody");
  const head = h("tr", null, columns.map((c) => {
    const th = h("th", { scope: "col" }, c.title);
    if (sortable && c.sort !== false) {
      th.classList.add("sortable");
      th.addEventListener("click", () => {
        dir = sortKey === c.key ? -dir : 1;
        sortKey = c.key;
        head.querySelectorAll("th").forEach((x) => x.removeAttribute("aria-sort"));
        th.setAttribute("aria-sort", dir > 0 ? "ascending" : "descending");
        fill();
      });
    }
    return th;
  }));
  function fill() {
    let data = rows;
    if (sortKey) {
      const val = (r) => r[sortKey];
      data = [...rows].sort((a, b) => {
        const x = val(a), y = val(b);
        if (typeof x === "number" && typeof y === "number") return (x - y) * dir;
        return String(x ?? "").localeCompare(String(y ?? "")) * dir;
      });
    }
    clear(tbody, data.length ? data.map((r) => {
      const tr = h("tr", rowAttrs ? rowAttrs(r) : null,
        columns.map((c) => h("td", null, c.render ? c.render(r) : r[c.key])));
      if (onRow) { tr.classList.add("clickable"); tr.addEventListener("click", (e) => onRow(r, tr, e)); }
      return tr;
    }) : h("tr", null, h("td", { colspan: columns.length, class: "empty" }, empty || "nothing here")));
  }
  fill();
  return h("table", { class: "grid" }, h("thead", null, head), tbody);
}

export function pre(obj) {
  return h("pre", { class: "json" }, typeof obj === "string" ? obj : JSON.stringify(obj, null, 2));
}

export function field(label, input) {
  return h("label", { class: "field" }, h("span", null, label), input);
}

export function select(options, value, attrs) {
  return h("select", attrs || null, options.map((o) => {
    const [v, text] = Array.isArray(o) ? o : [o, o];
    return h("option", { value: v, selected: v === value ? true : undefined }, text);
  }));
}
