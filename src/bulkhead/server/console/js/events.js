// Events and the audit log: newest first, filtered, paged.
import { api } from "./api.js";
import { h, clear, table, fmt, field, errorText, pre } from "./ui.js";

export async function mount(root, { name }) {
  const audit = name === "audit";
  const filters = audit ? ["actor", "action", "target"] : ["kind", "severity", "subject"];
  const inputs = Object.fromEntries(filters.map((f) => [f, h("input", { id: `${name}-${f}`, size: 14,
    placeholder: f === "severity" ? "info, warning…" : "exact, or prefix*" })]));
  const out = h("div", { id: `${name}-list` });
  const detail = h("div", { id: `${name}-detail` });
  const form = h("form", { class: "toolbar" }, filters.map((f) => field(f, inputs[f])),
    h("button", { type: "submit", class: "primary" }, "Filter"));
  clear(root, h("h1", null, audit ? "Audit log" : "Events"), form, h("div", { class: "split" }, out, detail));
  let offset = 0;
  async function load() {
    const query = { limit: 50, offset };
    for (const f of filters) if (inputs[f].value.trim()) query[f] = inputs[f].value.trim();
    try {
      const page = await api.get(audit ? "/audit" : "/events", { query });
      const cols = audit
        ? [{ key: "at", title: "When", render: (r) => fmt.time(r.at) }, { key: "actor", title: "Actor" },
          { key: "action", title: "Action" }, { key: "target", title: "Target" }, { key: "note", title: "Note" }]
        : [{ key: "at", title: "When", render: (r) => fmt.time(r.at) }, { key: "kind", title: "Kind" },
          { key: "severity", title: "Severity" }, { key: "subject", title: "Subject" }];
      clear(out, h("p", { class: "stat", id: `${name}-count` }, `${fmt.num(page.total)} ${page.total === 1 ? "entry" : "entries"}`),
        table(cols, page.items, { sortable: true, onRow: (r) => clear(detail, h("div", { class: "panel" },
          h("h2", null, audit ? `${r.action} ${r.target}` : `${r.kind}`),
          audit ? [h("h3", null, "Before"), pre(r.before), h("h3", null, "After"), pre(r.after)] : pre(r.data))),
        rowAttrs: () => ({ class: `${name}-row` }) }),
        h("div", { class: "toolbar" },
          h("button", { type: "button", disabled: offset === 0, onclick: () => { offset = Math.max(0, offset - 50); load(); } }, "Newer"),
          h("button", { type: "button", disabled: offset + 50 >= page.total, onclick: () => { offset += 50; load(); } }, "Older")));
    } catch (ex) { clear(out, h("p", { class: "notice error", role: "alert" }, errorText(ex))); }
  }
  form.addEventListener("submit", (e) => { e.preventDefault(); offset = 0; load(); });
  await load();
}
