// /docs: the vendored Swagger UI (swagger-ui-dist, cluster/console/static/vendor/swagger-ui) over /openapi.json, with
// this tab's API key (the console's sessionStorage) on every request it makes; no CDN, no inline script.
const KEY = "rayembed.key";

function withKey(req) {
  const key = sessionStorage.getItem(KEY);
  if (key) req.headers.Authorization = `Bearer ${key}`;
  return req;
}

async function spec() {
  const key = sessionStorage.getItem(KEY);
  const resp = await fetch("/openapi.json", { headers: key ? { Authorization: `Bearer ${key}` } : {} });
  if (resp.status === 401) return null;
  if (!resp.ok) throw new Error(`/openapi.json answered HTTP ${resp.status}`);
  return resp.json();
}

function askForKey(message) {
  const box = document.getElementById("docs-login");
  box.hidden = false;
  box.replaceChildren();
  const title = document.createElement("h1"); title.textContent = "API key";
  const label = document.createElement("label"); label.htmlFor = "docs-key"; label.textContent = "This API needs a key to read its reference";
  const input = document.createElement("input"); input.type = "password"; input.id = "docs-key"; input.autocomplete = "off";
  const button = document.createElement("button"); button.type = "submit"; button.textContent = "Show the reference";
  const form = document.createElement("form");
  form.append(label, input, button);
  if (message) { const p = document.createElement("p"); p.className = "docs-error"; p.textContent = message; form.append(p); }
  form.addEventListener("submit", (ev) => { ev.preventDefault(); sessionStorage.setItem(KEY, input.value.trim()); start(); });
  box.append(title, form);
  input.focus();
}

async function start() {
  const doc = await spec();
  if (doc === null) {
    const had = sessionStorage.getItem(KEY);
    sessionStorage.removeItem(KEY);
    return askForKey(had ? "That key was refused." : null);
  }
  document.getElementById("docs-login").hidden = true;
  window.SwaggerUIBundle({ spec: doc, dom_id: "#swagger-ui", deepLinking: true, validatorUrl: null,
    requestInterceptor: withKey, presets: [window.SwaggerUIBundle.presets.apis], layout: "BaseLayout" });
}

start().catch((err) => { document.getElementById("swagger-ui").textContent = String(err); });
