// Workloads and labels: list and search, edit labels, set enforcement (single and bulk).
import { api } from "./api.js";
import { h, clear, table, fmt, select, field, errorText, notice } from "./ui.js";

const STATES = ["idle", "visibility", "selective", "full"];

export async function mount(root) {
  const search = h("input", { id: "wl-search", placeholder: "name or hostname", size: 18 });
  const labelQ = h("input", { id: "wl-label", placeholder: "app=shop", size: 14 });
  const go = h("button", { type: "submit", class: "primary" }, "Search");
  const bulkSel = select(STATES, "full", { id: "wl-bulk-state" });
  const bulkBtn = h("button", { type: "button", id: "wl-bulk-apply" }, "Set enforcement on selected");
  const msg = h("div", { id: "wl-msg" });
  const list = h("div", { id: "wl-list" });
  const editor = h("div", { id: "wl-editor" });
  const labelsBox = h("div", { class: "panel", id: "labels" });
  const form = h("form", { class: "toolbar" }, field("Search", search), field("Label", labelQ), go,
    h("span", { class: "muted" }, " Bulk: "), bulkSel, bulkBtn);
  clear(root, h("h1", null, "Workloads and labels"), form, msg,
    h("div", { class: "split" }, h("div", null, list), h("div", null, editor, labelsBox)));
  const say = (t, kind = "ok") => { clear(msg); notice(msg, t, kind); };
  let keys = [];
  let offset = 0;

  async function load() {
    const query = { limit: 100, offset };
    if (search.value.trim()) query.name = search.value.trim();
    if (labelQ.value.trim()) query.label = labelQ.value.trim().split(/\s+/);
    try {
      const page = await api.get("/workloads", { query });
      clear(list, h("p", { class: "stat", id: "wl-count" }, `${fmt.num(page.total)} workloads`),
        table([
          { key: "sel", title: "", sort: false, render: (w) => h("input", { type: "checkbox", class: "wl-check", value: w.name,
            onclick: (e) => e.stopPropagation() }) },
          { key: "name", title: "Name" }, { key: "ips", title: "Addresses", render: (w) => w.ips.join(" ") },
          { key: "labels", title: "Labels", render: (w) => Object.entries(w.labels).map(([k, v]) => h("span", { class: "chip" }, `${k}=${v}`)) },
          { key: "managed", title: "Managed", render: (w) => (w.managed ? "yes" : "no") },
          { key: "enforcement", title: "Enforcement", render: (w) => {
            const s = select(STATES, w.enforcement, { "data-enforcement": w.name, "aria-label": `enforcement of ${w.name}` });
            s.addEventListener("click", (e) => e.stopPropagation());
            s.addEventListener("change", () => setEnforcement([w.name], s.value));
            return s;
          } },
        ], page.items, { sortable: true, onRow: (w) => edit(w), rowAttrs: (w) => ({ "data-workload": w.name }) }),
        h("div", { class: "toolbar" },
          h("button", { type: "button", disabled: offset === 0, onclick: () => { offset = Math.max(0, offset - 100); load(); } }, "Previous"),
          h("button", { type: "button", disabled: offset + 100 >= page.total, onclick: () => { offset += 100; load(); } }, "Next")));
    } catch (ex) { clear(list, h("p", { class: "notice error", role: "alert" }, errorText(ex))); }
  }

  async function setEnforcement(names, state) {
    try {
      const r = await api.post("/workloads/enforcement", { enforcement: state, names });
      say(`Enforcement ${state} set on ${names.length} workload(s).` + (r && r.changed != null ? ` ${r.changed} changed.` : ""));
      await load();
    } catch (ex) { say(errorText(ex), "error"); }
  }

  function edit(w) {
    const inputs = keys.map((k) => h("input", { "data-label-key": k, value: w.labels[k] || "", size: 12 }));
    const save = h("button", { type: "submit", class: "primary", id: "wl-save" }, "Save labels");
    const f = h("form", { class: "panel" }, h("h2", null, `Labels of ${w.name}`),
      keys.map((k, i) => field(k, inputs[i])), h("div", null, save));
    f.addEventListener("submit", async (e) => {
      e.preventDefault();
      const labels = {};
      keys.forEach((k, i) => {
        const v = inputs[i].value.trim();
        if (v !== (w.labels[k] || "")) labels[k] = v || null;
      });
      try {
        await api.patch(`/workloads/${encodeURIComponent(w.name)}`, { labels }, { headers: { "If-Match": `"${w.revision}"` } });
        say(`Labels of ${w.name} saved.`);
        clear(editor);
        await Promise.all([load(), loadLabels()]);
      } catch (ex) { say(errorText(ex), "error"); }
    });
    clear(editor, f);
  }

  async function loadLabels() {
    try {
      const labels = await api.get("/labels");
      clear(labelsBox, h("h2", null, "Labels"), table([{ key: "key", title: "Key" }, { key: "value", title: "Value" },
        { key: "workloads", title: "Workloads" }], labels, { sortable: true,
        onRow: (l) => { labelQ.value = `${l.key}=${l.value}`; offset = 0; load(); } }));
    } catch (ex) { clear(labelsBox, h("p", { class: "notice error" }, errorText(ex))); }
  }

  form.addEventListener("submit", (e) => { e.preventDefault(); offset = 0; load(); });
  bulkBtn.addEventListener("click", () => {
    const names = [...list.querySelectorAll("input.wl-check:checked")].map((c) => c.value);
    if (!names.length) return say("Select workloads first.", "error");
    setEnforcement(names, bulkSel.value);
  });
  keys = (await api.get("/label-keys")).map((k) => k.name);
  await Promise.all([load(), loadLabels()]);
}
