// Policy page: rulesets and rules of the draft (changes since the active version highlighted),
// a rule editor with label pickers, what-if impact of the draft, provision, versions, diff, revert.
import { api } from "./api.js";
import { actorText, ruleText } from "./policyobjects.js";
import { h, clear, table, fmt, select, field, errorText, pre, notice } from "./ui.js";

async function activeRulesets() {
  const page = await api.get("/policy/versions", { query: { limit: 1 } });
  if (!page.items.length) return { id: null, rulesets: [] };
  const v = await api.get(`/policy/versions/${page.items[0].id}`);
  return { id: v.id, rulesets: (v.objects || {}).rulesets || [] };
}

function ruleKey(rs, r, i) { return r.id || `${rs}/${i}`; }

// An actor picker: kind + value(s); labels get one select per label key.
function actorPicker(ctx, prefix) {
  const kind = select([["labels", "labels"], ["all_workloads", "all workloads"], ["ip_list", "IP list"],
    ["workload", "workload"]], "labels", { "data-role": `${prefix}-kind` });
  const box = h("span", { class: "actor-value" });
  const wrap = h("div", { class: "actor-picker", "data-picker": prefix }, kind, box);
  const draw = () => {
    if (kind.value === "labels") {
      clear(box, ctx.keys.map((k) => field(k, select([["", "any"], ...ctx.values(k)], "",
        { "data-key": k, name: `${prefix}-${k}` }))));
    } else if (kind.value === "ip_list") {
      clear(box, select(ctx.ipLists, ctx.ipLists[0], { "data-role": `${prefix}-iplist` }));
    } else if (kind.value === "workload") {
      clear(box, h("input", { "data-role": `${prefix}-workload`, placeholder: "workload name" }));
    } else clear(box);
  };
  kind.addEventListener("change", draw);
  draw();
  return {
    el: wrap,
    value() {
      if (kind.value === "all_workloads") return { all_workloads: true };
      if (kind.value === "ip_list") return { ip_list: box.querySelector("select").value };
      if (kind.value === "workload") return { workload: box.querySelector("input").value.trim() };
      const labels = {};
      box.querySelectorAll("select[data-key]").forEach((s) => { if (s.value) labels[s.dataset.key] = s.value; });
      return { labels };
    },
  };
}

export async function mount(root) {
  const msg = h("div", { id: "policy-msg" });
  const rulesetsBox = h("div", { id: "rulesets" });
  const editor = h("div", { class: "panel", id: "rule-editor" });
  const impact = h("div", { class: "panel", id: "impact" });
  const versions = h("div", { class: "panel", id: "versions" });
  const generateBox = h("div", { id: "generate" });
  clear(root, h("h1", null, "Policy"), msg,
    h("div", { class: "split" },
      h("div", null, h("h2", null, "Draft rulesets"), rulesetsBox),
      h("div", null, editor, impact, generateBox, versions)));

  const say = (text, kind = "ok") => { clear(msg); notice(msg, text, kind); };
  let draftRev = null;
  const ctx = { keys: [], labels: [], ipLists: [], services: [], rulesets: [], values: (k) =>
    ctx.labels.filter((l) => l.key === k).map((l) => l.value) };

  async function loadAll() {
    const [rulesets, changes, active, keys, labels, ipLists, services] = await Promise.all([
      api.get("/rulesets"), api.get("/policy/draft/changes"), activeRulesets(),
      api.get("/label-keys"), api.get("/labels"), api.get("/ip-lists"), api.get("/services")]);
    draftRev = changes.draft_revision;
    Object.assign(ctx, { keys: keys.map((k) => k.name), labels, ipLists: ipLists.map((x) => x.name),
      services: services.map((s) => s.name), rulesets });
    renderRulesets(rulesets, changes, active);
    renderEditor();
  }

  function renderRulesets(rulesets, changes, active) {
    const changed = (kind) => new Set(changes[kind].filter((c) => c.kind === "ruleset").map((c) => c.name));
    const added = changed("added"), modified = changed("modified"), deleted = changed("deleted");
    const before = new Map(active.rulesets.map((rs) => [rs.name, rs]));
    const parts = rulesets.map((rs) => {
      const old = before.get(rs.name);
      const oldRules = new Map((old ? old.rules || [] : []).map((r, i) => [ruleKey(rs.name, r, i), JSON.stringify(r)]));
      const rows = (rs.rules || []).map((r, i) => {
        const id = ruleKey(rs.name, r, i);
        const state = !old ? "added" : !oldRules.has(id) ? "added" : oldRules.get(id) !== JSON.stringify(r) ? "modified" : "";
        oldRules.delete(id);
        return { id, r, state, ruleset: rs.name };
      });
      for (const [id, body] of oldRules) rows.push({ id, r: JSON.parse(body), state: "deleted", ruleset: rs.name });
      const badge = added.has(rs.name) ? "added" : modified.has(rs.name) ? "modified" : "";
      return h("div", { class: "panel", "data-ruleset": rs.name },
        h("h3", null, rs.name, badge ? h("span", { class: `badge ${badge}` }, badge) : null),
        h("p", { class: "muted" }, "scopes: ", (rs.scopes || []).length
          ? rs.scopes.map((s) => Object.entries(s).map(([k, v]) => `${k}=${typeof v === "object" ? JSON.stringify(v) : v}`).join(",")).join(" | ")
          : "global"),
        table([
          { key: "id", title: "Rule" },
          { key: "action", title: "Action", render: (x) => x.r.action },
          { key: "c", title: "Consumers", render: (x) => (x.r.consumers || []).map(actorText).join(" | ") },
          { key: "p", title: "Providers", render: (x) => (x.r.providers || []).map(actorText).join(" | ") },
          { key: "s", title: "Services", render: (x) => (x.r.services || []).map((s) => (typeof s === "string" ? s : JSON.stringify(s))).join(", ") },
          { key: "x", title: "", render: (x) => x.state === "deleted" ? h("span", { class: "badge deleted" }, "deleted")
            : h("button", { type: "button", class: "danger", title: "Delete this rule from the draft",
              "data-delete-rule": x.id, onclick: (ev) => { ev.stopPropagation(); deleteRule(x); } }, "Delete") },
        ], rows, { rowAttrs: (x) => ({ class: x.state ? `change-${x.state}` : null, "data-rule": x.id }) }));
    });
    const gone = [...deleted].map((name) => h("p", { class: "change-deleted" }, `ruleset ${name} (deleted in the draft)`));
    const other = [...changes.added, ...changes.modified, ...changes.deleted].filter((c) => c.kind !== "ruleset");
    clear(rulesetsBox, parts, gone,
      other.length ? h("div", { class: "panel" }, h("h3", null, "Other draft changes"),
        h("ul", { class: "plain" }, other.map((c) => h("li", null, `${c.kind} ${c.name}`)))) : null,
      h("p", { class: "stat", id: "draft-state" }, `draft revision ${draftRev}; based on version ${changes.base_version ?? "none"}; ` +
        `${changes.added.length} added, ${changes.modified.length} modified, ${changes.deleted.length} deleted`));
  }

  async function deleteRule(x) {
    try {
      await api.del(`/rulesets/${encodeURIComponent(x.ruleset)}/rules/${encodeURIComponent(x.id)}`);
      say(`Rule ${x.id} deleted from the draft.`);
      await loadAll();
    } catch (ex) { say(errorText(ex), "error"); }
  }

  function renderEditor() {
    const rsSel = select(ctx.rulesets.map((r) => r.name), ctx.rulesets.length ? ctx.rulesets[0].name : "", { id: "rule-ruleset" });
    const idIn = h("input", { id: "rule-id", placeholder: "e.g. web-ssh", size: 14 });
    const action = select(["allow", "deny", "override_deny"], "allow", { id: "rule-action" });
    const consumers = actorPicker(ctx, "consumer");
    const providers = actorPicker(ctx, "provider");
    const svc = h("select", { id: "rule-services", multiple: true, size: Math.min(6, ctx.services.length + 1) },
      [h("option", { value: "any" }, "any"), ...ctx.services.map((s) => h("option", { value: s }, s))]);
    const save = h("button", { type: "submit", class: "primary", id: "rule-save" }, "Add rule to draft");
    const form = h("form", { id: "rule-form" },
      h("h2", null, "New rule"),
      field("Ruleset", rsSel), field("Rule id", idIn), field("Action", action),
      h("h3", null, "Consumers (source)"), consumers.el,
      h("h3", null, "Providers (destination)"), providers.el,
      field("Services", svc), h("div", null, save));
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const services = [...svc.selectedOptions].map((o) => o.value);
      const body = { action: action.value, consumers: [consumers.value()], providers: [providers.value()],
        services: services.length ? services : ["any"] };
      if (idIn.value.trim()) body.id = idIn.value.trim();
      try {
        await api.post(`/rulesets/${encodeURIComponent(rsSel.value)}/rules`, body);
        say(`Rule ${body.id || ""} added to ruleset ${rsSel.value}: ${ruleText(body)}`);
        await loadAll();
      } catch (ex) { say(errorText(ex), "error"); }
    });
    const rsName = h("input", { id: "ruleset-name", placeholder: "name", size: 12 });
    const rsScope = h("input", { id: "ruleset-scope", placeholder: "app=shop env=prod (empty: global)", size: 24 });
    const rsForm = h("form", { id: "ruleset-form" }, h("h3", null, "New ruleset"), field("Name", rsName), field("Scope", rsScope),
      h("button", { type: "submit" }, "Create ruleset"));
    rsForm.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const scope = {};
      for (const tok of rsScope.value.split(/\s+/).filter(Boolean)) { const [k, v] = tok.split("="); scope[k] = v; }
      try {
        await api.post("/rulesets", { name: rsName.value.trim(), scopes: Object.keys(scope).length ? [scope] : [], rules: [] });
        say(`Ruleset ${rsName.value} created in the draft.`);
        await loadAll();
      } catch (ex) { say(errorText(ex), "error"); }
    });
    clear(editor, form, rsForm);
  }

  function renderImpact() {
    const preview = h("button", { type: "button", id: "impact-preview" }, "Preview impact of the draft");
    const out = h("div", { id: "impact-result" });
    const note = h("input", { id: "provision-note", placeholder: "what changes and why", size: 30 });
    const prov = h("button", { type: "button", class: "primary", id: "provision" }, "Provision");
    preview.addEventListener("click", async () => {
      clear(out, h("p", { class: "muted" }, "evaluating recorded traffic…"));
      try {
        const [draft, active] = await Promise.all([
          api.post("/traffic/what-if", { policy: "draft", limit: 1, summary: true }),
          api.post("/traffic/what-if", { policy: "active", limit: 1, summary: true })]);
        clear(out, impactView(active.summary, draft.summary));
      } catch (ex) { clear(out, h("p", { class: "notice error", role: "alert" }, errorText(ex))); }
    });
    prov.addEventListener("click", async () => {
      try {
        const v = await api.post("/policy/provision", { note: note.value, draft_revision: draftRev });
        say(`Provisioned version ${v.id}` + (v.warnings && v.warnings.length ? ` (${v.warnings.length} lint warnings)` : "") + ".");
        note.value = "";
        await Promise.all([loadAll(), loadVersions()]);
      } catch (ex) { say(errorText(ex), "error"); }
    });
    clear(impact, h("h2", null, "Impact and provisioning"), preview, out,
      h("div", { class: "toolbar" }, field("Note", note), prov));
  }

  function impactView(active, draft) {
    const classes = (s) => {
      const out = { allowed: 0, potentially_blocked: 0, blocked: 0, unknown: 0 };
      for (const [d, v] of Object.entries(s.decisions)) {
        const c = d.startsWith("allowed") ? "allowed" : d.startsWith("potentially") ? "potentially_blocked" : d.startsWith("blocked") ? "blocked" : "unknown";
        out[c] += v.connections;
      }
      return out;
    };
    const a = classes(active), d = classes(draft);
    const rows = Object.keys(a).map((c) => ({ c, a: a[c], d: d[c], delta: d[c] - a[c] }));
    const activeRules = new Map(active.rules.map((r) => [r.rule, r.connections]));
    const ruleRows = draft.rules.map((r) => ({ rule: r.rule, d: r.connections, a: activeRules.get(r.rule) || 0 }))
      .filter((r) => r.a !== r.d);
    return h("div", null,
      h("p", { class: "stat" }, `${fmt.num(draft.flows)} recorded flow records, ${fmt.num(draft.connections)} connections`),
      table([{ key: "c", title: "Decision", render: (r) => h("span", { class: `dec ${r.c}` }, r.c.replace("_", " ")) },
        { key: "a", title: "Active", render: (r) => fmt.num(r.a) }, { key: "d", title: "Draft", render: (r) => fmt.num(r.d) },
        { key: "delta", title: "Change", render: (r) => (r.delta > 0 ? "+" : "") + fmt.num(r.delta) }], rows,
      { rowAttrs: (r) => ({ "data-impact": r.c, "data-delta": r.delta }) }),
      h("h3", null, "Rules whose matches change"),
      ruleRows.length ? table([{ key: "rule", title: "Rule" }, { key: "a", title: "Active conns" }, { key: "d", title: "Draft conns" }],
        ruleRows, { rowAttrs: (r) => ({ "data-impact-rule": r.rule }) }) : h("p", { class: "muted" }, "none"),
      h("h3", null, "Draft vs reported by agents"),
      draft.changes.length ? h("ul", { class: "plain" }, draft.changes.map((c) =>
        h("li", null, `${c.from} → ${c.to}: ${fmt.num(c.connections)} connections`))) : h("p", { class: "muted" }, "no change"));
  }

  async function loadVersions() {
    try {
      const page = await api.get("/policy/versions", { query: { limit: 20 } });
      const diffBox = h("div", { id: "diff" });
      clear(versions, h("h2", null, "Versions"),
        table([{ key: "id", title: "#" }, { key: "created_at", title: "When", render: (v) => fmt.time(v.created_at) },
          { key: "author", title: "Author" }, { key: "note", title: "Note" },
          { key: "x", title: "", render: (v) => h("span", null,
            h("button", { type: "button", "data-diff": v.id, onclick: () => showDiff(String(v.id), "draft", diffBox) }, "Diff → draft"),
            v.id > 1 ? h("button", { type: "button", "data-diff-prev": v.id, onclick: () => showDiff(String(v.id - 1), String(v.id), diffBox) }, "Changes") : null,
            h("button", { type: "button", "data-revert": v.id, onclick: () => revert(v.id) }, "Revert draft")) }],
        page.items, { rowAttrs: (v) => ({ "data-version": v.id }), empty: "nothing provisioned yet" }), diffBox);
    } catch (ex) { clear(versions, h("p", { class: "notice error" }, errorText(ex))); }
  }

  async function showDiff(from, to, box) {
    clear(box, h("p", { class: "muted" }, "computing…"));
    try {
      const d = await api.get("/policy/diff", { query: { from, to } });
      const ch = d.changes;
      clear(box, h("h3", null, `Diff ${from} → ${to}`),
        h("ul", { class: "plain" },
          ch.added.map((c) => h("li", { class: "change-added" }, `+ ${c.kind} ${c.name}`)),
          ch.modified.map((c) => h("li", { class: "change-modified" }, `~ ${c.kind} ${c.name}`)),
          ch.deleted.map((c) => h("li", { class: "change-deleted" }, `- ${c.kind} ${c.name}`))),
        h("details", null, h("summary", null, "Semantic diff"), pre(d.semantic)));
    } catch (ex) { clear(box, h("p", { class: "notice error" }, errorText(ex))); }
  }

  async function revert(id) {
    try {
      await api.post("/policy/revert", { version: id, draft_revision: draftRev });
      say(`Draft reverted to version ${id} (not provisioned).`);
      await loadAll();
    } catch (ex) { say(errorText(ex), "error"); }
  }

  async function renderGenerate() {
    // rule generation from recorded traffic, when this server offers it
    try {
      const spec = await fetch("/api/v1/openapi.json").then((r) => r.json());
      if (!spec.paths["/api/v1/generate"]) return;
    } catch { return; }
    const gran = select([["", "recommended curve"], "env", "app", "tier", "service", "process"], "", { id: "gen-granularity" });
    const scope = h("input", { id: "gen-scope", placeholder: "app=shop env=prod", size: 16 });
    const since = h("input", { id: "gen-since", placeholder: "-30d (default: all)", size: 12 });
    const run = h("button", { type: "button", id: "generate-run" }, "Generate");
    const out = h("div", { id: "generate-result" });
    run.addEventListener("click", async () => {
      const body = { policy: "draft" };
      if (gran.value) body.granularity = gran.value;
      if (since.value.trim()) body.since = since.value.trim();
      const sc = {};
      for (const tok of scope.value.split(/\s+/).filter(Boolean)) { const [k, v] = tok.split("="); sc[k] = v; }
      body.scope = sc;
      clear(out, h("p", { class: "muted" }, "generating from recorded flows…"));
      try { showCandidates(await api.post("/generate", body), out); }
      catch (ex) { clear(out, h("p", { class: "notice error", role: "alert" }, errorText(ex))); }
    });
    clear(generateBox, h("div", { class: "panel" }, h("h2", null, "Generate rules from traffic"),
      h("div", { class: "toolbar" }, field("Granularity", gran), field("Scope", scope), field("Since", since), run), out));
  }

  function showCandidates(res, out) {
    let chosen = res.candidates.find((c) => c.name === res.recommended) || res.candidates[0];
    const detail = h("div", { id: "generate-candidate" });
    const add = h("button", { type: "button", class: "primary", id: "generate-apply" }, "Add to draft");
    const pct = (x) => (x == null ? "" : `${(100 * x).toFixed(0)}%`);
    const drawDetail = () => {
      if (!chosen) { clear(detail, h("p", { class: "muted" }, "nothing to generate: recorded traffic is already allowed")); add.disabled = true; return; }
      const ev = chosen.report.evidence || {};
      clear(detail, h("h3", null, `Candidate ${chosen.name}`),
        h("ul", { class: "plain" }, chosen.rulesets.flatMap((rs) => (rs.rules || []).map((r) =>
          h("li", { "data-generated-rule": r.id }, h("strong", null, r.id), ` (${rs.name}) ${ruleText(r)}`,
            ev[r.id] ? h("span", { class: "muted" }, ` — ${ev[r.id].flows} flows, confidence ${ev[r.id].confidence}`) : null)))),
        h("p", { class: "stat" }, `${chosen.ip_lists.length} IP lists, ${chosen.services.length} services, ${chosen.tests.length} tests`));
    };
    add.addEventListener("click", async () => {
      try {
        const r = await api.post("/generate/apply", { rulesets: chosen.rulesets, ip_lists: chosen.ip_lists,
          services: chosen.services, tests: chosen.tests });
        say(`Candidate ${chosen.name} added to the draft: rulesets ${r.created.rulesets.join(", ") || "none"}, ${r.tests_added} tests.`);
        await loadAll();
      } catch (ex) { say(errorText(ex), "error"); }
    });
    const rows = res.candidates.map((c) => ({ ...c, rules: c.report.rules, cov: pct(c.report.coverage_test ?? c.report.coverage_train),
      over: pct(c.report.over_permission) }));
    clear(out,
      h("p", { class: "stat" }, `${fmt.num(res.flows.in_scope)} flows in scope, ${fmt.num(res.flows.noise)} noise, ` +
        `${fmt.num(res.flows.already_allowed)} already allowed`),
      table([{ key: "name", title: "Candidate", render: (c) => [c.name, c.name === res.recommended ? h("span", { class: "badge added" }, "recommended") : null] },
        { key: "granularity", title: "Granularity" }, { key: "rules", title: "Rules" },
        { key: "cov", title: "Coverage" }, { key: "over", title: "Over-permission" }], rows,
      { onRow: (c, tr) => { chosen = res.candidates.find((x) => x.name === c.name); tr.parentNode.querySelectorAll("tr").forEach((x) => x.classList.remove("selected")); tr.classList.add("selected"); drawDetail(); },
        rowAttrs: (c) => ({ "data-candidate": c.name, class: chosen && c.name === chosen.name ? "selected" : null }),
        empty: "no candidate" }),
      detail, add,
      (res.label_suggestions || []).length ? h("details", null, h("summary", null, "Label suggestions"),
        h("ul", { class: "plain" }, res.label_suggestions.map((l) => h("li", null,
          `${l.workload}: ${l.key}=${l.value} (confidence ${l.confidence}, like ${(l.like || []).join(", ")})`)))) : null);
    drawDetail();
  }

  renderImpact();
  await Promise.all([loadAll(), loadVersions(), renderGenerate()]);
}
