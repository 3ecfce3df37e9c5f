// Client of the public API (/api/v1): bearer token from sessionStorage, problem+json errors.
const BASE = "/api/v1";
const KEY = "bulkhead.token";

export class ApiError extends Error {
  constructor(status, problem) {
    const detail = (problem && (problem.detail || problem.title)) || `HTTP ${status}`;
    super(detail);
    this.status = status;
    this.problem = problem || {};
  }
  // "detail — path: message; path: message"
  describe() {
    const errs = (this.problem.errors || []).map((e) => (e.path ? `${e.path}: ` : "") + e.message);
    return errs.length ? `${this.message} — ${errs.join("; ")}` : this.message;
  }
}

export const session = {
  token: () => sessionStorage.getItem(KEY),
  set: (t) => sessionStorage.setItem(KEY, t),
  clear: () => sessionStorage.removeItem(KEY),
};

let onUnauthorized = () => {};
export function setUnauthorizedHandler(fn) { onUnauthorized = fn; }

export function url(path, query) {
  const u = new URL(BASE + path, location.origin);
  for (const [k, v] of Object.entries(query || {})) {
    if (v === undefined || v === null || v === "") continue;
    for (const item of Array.isArray(v) ? v : [v]) u.searchParams.append(k, String(item));
  }
  return u.pathname + u.search;
}

// Query pairs ([[k, v], ...]) keep repeated keys and their order.
export function urlPairs(path, pairs) {
  const u = new URL(BASE + path, location.origin);
  for (const [k, v] of pairs) if (v !== "" && v != null) u.searchParams.append(k, v);
  return u.pathname + u.search;
}

export async function request(method, path, { query, body, headers, raw, pairs } = {}) {
  const h = { Accept: "application/json", ...(headers || {}) };
  const t = session.token();
  if (t) h.Authorization = `Bearer ${t}`;
  let payload;
  if (body !== undefined) {
    if (typeof body === "string") payload = body;
    else { payload = JSON.stringify(body); h["Content-Type"] = "application/json"; }
  }
  const target = pairs ? urlPairs(path, pairs) : url(path, query);
  const resp = await fetch(target, { method, headers: h, body: payload });
  if (resp.status === 401 && !path.startsWith("/auth/login")) {
    session.clear();
    onUnauthorized();
  }
  if (!resp.ok) {
    let problem = null;
    try { problem = await resp.json(); } catch { /* not JSON */ }
    throw new ApiError(resp.status, problem);
  }
  if (raw) return resp;
  if (resp.status === 204) return null;
  const type = resp.headers.get("content-type") || "";
  const data = type.includes("json") ? await resp.json() : await resp.text();
  const etag = resp.headers.get("etag");
  if (etag && data && typeof data === "object") Object.defineProperty(data, "_etag", { value: etag });
  return data;
}

export const api = {
  get: (p, o) => request("GET", p, o),
  post: (p, body, o) => request("POST", p, { ...(o || {}), body }),
  put: (p, body, o) => request("PUT", p, { ...(o || {}), body }),
  patch: (p, body, o) => request("PATCH", p, { ...(o || {}), body }),
  del: (p, o) => request("DELETE", p, o),
};

// Download an authenticated response (e.g. CSV export) as a file.
export async function download(path, pairs, filename) {
  const resp = await request("GET", path, { pairs, raw: true, headers: { Accept: "text/csv" } });
  const blob = await resp.blob();
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob);
  a.download = filename;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(a.href), 10000);
  return blob;
}
