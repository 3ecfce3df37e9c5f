// Traffic explorer: filter, group, sort and page through recorded flows; export as CSV.
import { api, download } from "./api.js";
import { h, clear, table, fmt, service, select, field, errorText, decisionClass } from "./ui.js";

const GROUPS = ["src_workload", "dst_workload", "dst_port", "proto", "process", "decision", "rule",
  "src.app", "dst.app", "src.env", "dst.env", "src.role", "dst.role", "src_ip", "dst_ip"];
const ORDERS = ["connections", "flows", "bytes", "sources", "first_seen", "last_seen"];

export async function mount(root) {
  const filterIn = h("input", { id: "traffic-filter", size: 48,
    placeholder: "src.app=shop port=443 decision=blocked_no_rule from=-24h" });
  const groupBox = h("div", { class: "toolbar", id: "traffic-group" }, GROUPS.map((g) =>
    h("label", { class: "chip" }, h("input", { type: "checkbox", value: g }), " ", g)));
  const orderSel = select(ORDERS, "connections", { id: "traffic-order" });
  const newest = h("input", { type: "checkbox", id: "traffic-newest" });
  const run = h("button", { type: "submit", class: "primary", id: "traffic-run" }, "Search");
  const exp = h("button", { type: "button", id: "traffic-export" }, "Export CSV");
  const out = h("div", { id: "traffic-result" });
  const more = h("button", { type: "button", id: "traffic-more", hidden: true }, "Next page");
  const form = h("form", { class: "panel" },
    h("div", { class: "toolbar" }, field("Filters (KEY=VALUE, space separated)", filterIn),
      field("Order groups by", orderSel), h("label", null, newest, " newest first"), run, exp),
    h("div", { class: "muted" }, "Group by:"), groupBox);
  clear(root, h("h1", null, "Traffic explorer"), form, out, more);

  let cursor = null;
  let items = [];
  const pairs = () => {
    const p = [];
    for (const tok of filterIn.value.split(/\s+/).filter(Boolean)) {
      const i = tok.indexOf("=");
      if (i > 0) p.push([tok.slice(0, i), tok.slice(i + 1)]);
      else p.push([tok, ""]);
    }
    const groups = [...groupBox.querySelectorAll("input:checked")].map((c) => c.value);
    if (groups.length) { p.push(["group_by", groups.join(",")]); p.push(["order_by", orderSel.value]); }
    return { p, groups };
  };

  async function search(next) {
    const { p, groups } = pairs();
    const q = [...p, ["limit", "200"]];
    if (!groups.length && newest.checked) q.push(["order", "desc"]);
    if (next && cursor) q.push(["cursor", cursor]);
    try {
      const res = await api.get("/traffic", { pairs: q });
      items = next ? items.concat(res.items) : res.items;
      cursor = res.next_cursor;
      more.hidden = !cursor;
      const cols = groups.length
        ? [...res.group_by.flatMap((g) => (g === "port" ? ["proto", "dst_port"] : [g])).map((g) => ({ key: g, title: g })),
          ...["flows", "connections", "bytes", "sources"].map((k) => ({ key: k, title: k, render: (r) => fmt.num(r[k]) }))]
        : [{ key: "ts", title: "Time", render: (r) => fmt.time(r.ts) }, { key: "src_workload", title: "Source", render: (r) => r.src_workload || r.src_ip },
          { key: "dst_workload", title: "Destination", render: (r) => r.dst_workload || r.dst_ip },
          { key: "dst_port", title: "Service", render: (r) => service(r.proto, r.dst_port) },
          { key: "process", title: "Process" }, { key: "user", title: "User" },
          { key: "connections", title: "Conns" }, { key: "bytes", title: "Bytes", render: (r) => fmt.num(r.bytes) },
          { key: "decision", title: "Decision", render: (r) => h("span", { class: `dec ${decisionClass(r.decision)}` }, r.decision) },
          { key: "rule", title: "Rule" }];
      clear(out, h("p", { class: "stat", id: "traffic-count" }, `${fmt.num(items.length)} ${groups.length ? "groups" : "flows"}` +
        (cursor ? " (more available)" : "")), table(cols, items, { sortable: true, rowAttrs: () => ({ class: "traffic-row" }) }));
    } catch (ex) {
      clear(out, h("p", { class: "notice error", role: "alert" }, errorText(ex)));
    }
  }
  form.addEventListener("submit", (e) => { e.preventDefault(); search(false); });
  more.addEventListener("click", () => search(true));
  exp.addEventListener("click", async () => {
    const { p, groups } = pairs();
    try { await download("/traffic/export.csv", p, groups.length ? "traffic-groups.csv" : "traffic.csv"); }
    catch (ex) { clear(out, h("p", { class: "notice error", role: "alert" }, errorText(ex))); }
  });
  await search(false);
}
