// Rule bodies of a policy ("draft", "active" or a version), to show the rules that decide a flow.
import { api } from "./api.js";

const cache = new Map();

export async function rulesOf(ref) {
  if (ref !== "draft" && cache.has(ref)) return cache.get(ref);
  let rulesets = [];
  if (ref === "draft") {
    rulesets = await api.get("/rulesets");
  } else {
    let id = ref;
    if (ref === "active") {
      const page = await api.get("/policy/versions", { query: { limit: 1 } });
      id = page.items.length ? page.items[0].id : null;
    }
    if (id != null) rulesets = ((await api.get(`/policy/versions/${id}`)).objects || {}).rulesets || [];
  }
  const byId = new Map();
  for (const rs of rulesets) {
    (rs.rules || []).forEach((r, i) => byId.set(r.id || `${rs.name}/${i}`, { ruleset: rs.name, rule: r }));
  }
  if (ref !== "draft" && ref !== "active") cache.set(ref, byId);
  return byId;
}

export function actorText(a) {
  if (a.all_workloads) return "all workloads";
  if (a.labels) return Object.entries(a.labels).map(([k, v]) => `${k}=${v}`).join(",");
  if (a.ip_list) return `ip_list:${a.ip_list}`;
  if (a.workload) return `workload:${a.workload}`;
  if (a.group) return `group:${a.group}`;
  if (a.label_group) return `label_group:${a.label_group}`;
  if (a.user_group) return `user_group:${a.user_group}`;
  return JSON.stringify(a);
}

export function ruleText(rule) {
  const side = (list) => (list || []).map(actorText).join(" | ") || "—";
  const svc = (rule.services || []).map((s) => (typeof s === "string" ? s : JSON.stringify(s))).join(", ");
  return `${rule.action}: ${side(rule.consumers)} → ${side(rule.providers)} on ${svc}`;
}
