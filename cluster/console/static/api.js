// The console's only way to the server: the public /v2 API (and the gateway's embeddings routes), with the key the
// user typed, kept in sessionStorage (gone when the tab closes). A 401 asks for the key again.

const KEY = "rayembed.key";
const WS = "rayembed.workspace";
let onUnauthorized = () => {};

export class ApiError extends Error {
  constructor(status, body) {
    const e = (body && body.error) || {};
    super(e.message || `HTTP ${status}`);
    this.status = status; this.param = e.param || null; this.code = e.code || null;
  }
}

export const session = {
  key: () => sessionStorage.getItem(KEY),
  setKey: (k) => (k ? sessionStorage.setItem(KEY, k) : sessionStorage.removeItem(KEY)),
  workspace: () => sessionStorage.getItem(WS) || "default",
  setWorkspace: (w) => sessionStorage.setItem(WS, w),
};

export function whenUnauthorized(fn) { onUnauthorized = fn; }

export async function request(method, path, body, { raw = false, headers = {}, silent401 = false } = {}) {
  const h = { ...headers };
  const key = session.key();
  if (key) h.Authorization = `Bearer ${key}`;
  let payload = body;
  if (body !== undefined && !(body instanceof Blob)) { h["Content-Type"] = "application/json"; payload = JSON.stringify(body); }
  const resp = await fetch(path, { method, headers: h, body: payload, redirect: "follow", credentials: "omit" });
  if (resp.status === 401 && !silent401) onUnauthorized();
  const text = await resp.text();
  if (!resp.ok) {
    let parsed = null;
    try { parsed = JSON.parse(text); } catch { /* not JSON */ }
    throw new ApiError(resp.status, parsed || { error: { message: text.slice(0, 500) || `HTTP ${resp.status}` } });
  }
  if (raw) return text;
  return text ? JSON.parse(text) : null;
}

export const ws = (path = "") => `/v2/workspaces/${encodeURIComponent(session.workspace())}${path}`;
export const get = (path, opts) => request("GET", path, undefined, opts);
export const post = (path, body = {}) => request("POST", path, body);
export const patch = (path, body) => request("PATCH", path, body);
export const del = (path) => request("DELETE", path);
export const qs = (params) => {
  const u = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v !== undefined && v !== null && v !== "") u.set(k, v);
  const s = u.toString();
  return s ? `?${s}` : "";
};
// a list route's page: {data, pagination}
export const page = (path, params = {}) => get(path + qs({ page_size: 20, ...params }));
export const count = async (path, params = {}) => (await get(path + qs({ page_size: 1, ...params }))).pagination.total_results;

// a dataset file goes to the upload ingress (its own Serve application), as the API's 308 says
export const upload = (dataset, file, blob) =>
  request("PUT", `/v2/uploads/workspaces/${encodeURIComponent(session.workspace())}/datasets/${encodeURIComponent(dataset)}/files/${file}`,
    blob, { headers: { "Content-Type": "application/octet-stream" } });
