// The console shell: log in, hash routes, one page module per route.
import { api, session, setUnauthorizedHandler } from "./api.js";
import { h, clear, errorText } from "./ui.js";

const PAGES = {
  map: () => import("./map.js"),
  traffic: () => import("./traffic.js"),
  workloads: () => import("./workloads.js"),
  policy: () => import("./policy.js"),
  events: () => import("./events.js"),
  audit: () => import("./events.js"),
};

const page = document.getElementById("page");
const top = document.getElementById("top");
let current = null;
export const state = { me: null };

function route() {
  const [name, ...rest] = (location.hash.replace(/^#\/?/, "") || "map").split("/");
  return { name, rest };
}

function showLogin(message) {
  top.hidden = true;
  const user = h("input", { id: "login-name", name: "username", autocomplete: "username", required: true });
  const pass = h("input", { id: "login-password", name: "password", type: "password",
    autocomplete: "current-password", required: true });
  const err = h("p", { class: "notice error", role: "alert", hidden: !message }, message || "");
  const form = h("form", { class: "login", id: "login-form" },
    h("h1", null, "Bulkhead"),
    h("label", { class: "field" }, h("span", null, "Name"), user),
    h("label", { class: "field" }, h("span", null, "Password"), pass),
    err,
    h("button", { type: "submit" }, "Log in"));
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    try {
      const r = await api.post("/auth/login", { name: user.value, password: pass.value });
      session.set(r.token);
      await start();
    } catch (ex) {
      err.hidden = false;
      err.textContent = errorText(ex);
    }
  });
  clear(page, form);
  user.focus();
}

async function render() {
  if (!session.token()) return showLogin();
  const { name, rest } = route();
  const load = PAGES[name];
  document.querySelectorAll("#nav a").forEach((a) =>
    a.classList.toggle("active", a.getAttribute("href") === `#/${name}`));
  if (!load) { clear(page, h("p", null, `No page "${name}".`)); return; }
  if (current && current.unmount) current.unmount();
  current = null;
  const container = h("section", { class: `page page-${name}`, id: `page-${name}` });
  clear(page, container);
  try {
    const mod = await load();
    current = (await mod.mount(container, { name, rest, state })) || null;
  } catch (ex) {
    clear(container, h("p", { class: "notice error", role: "alert" }, errorText(ex)));
  }
}

async function start() {
  if (!session.token()) return showLogin();
  try {
    state.me = await api.get("/auth/me");
  } catch (ex) {
    session.clear();
    return showLogin(ex.status === 401 ? "Session expired; log in again." : errorText(ex));
  }
  top.hidden = false;
  document.getElementById("who").textContent = `${state.me.name} (${state.me.role})`;
  // pages this user may read; the API still decides every request
  const perms = new Set(state.me.permissions || []);
  const needs = { map: "traffic:read", traffic: "traffic:read", workloads: "inventory:read",
    policy: "policy:read", events: "events:read", audit: "audit:read" };
  document.querySelectorAll("#nav a").forEach((a) => {
    const page = a.getAttribute("href").slice(2);
    a.hidden = !perms.has(needs[page]);
  });
  await render();
}

setUnauthorizedHandler(() => showLogin("Session expired; log in again."));
document.getElementById("logout").addEventListener("click", async () => {
  try { await api.post("/auth/logout"); } catch { /* the session ends here anyway */ }
  session.clear();
  showLogin();
});
window.addEventListener("hashchange", () => { if (session.token()) render(); });
start();
