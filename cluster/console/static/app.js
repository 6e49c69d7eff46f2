// The console's shell: sign-in with an API key, the workspace picker, and a hash router (#/jobs/ID) over the pages.
import { ApiError, get, session, whenUnauthorized } from "./api.js";
import { clear, errorBox, h } from "./dom.js";
import * as overview from "./pages/overview.js";
import * as models from "./pages/models.js";
import * as datasets from "./pages/datasets.js";
import * as jobs from "./pages/jobs.js";
import * as sweeps from "./pages/sweeps.js";
import * as deployments from "./pages/deployments.js";

const main = document.getElementById("main");
const ROUTES = [
  [/^\/?$/, overview.render, "#/"],
  [/^\/models$/, models.list, "#/models"], [/^\/models\/([^/]+)$/, models.detail, "#/models"],
  [/^\/datasets$/, datasets.list, "#/datasets"], [/^\/datasets\/([^/]+)$/, datasets.detail, "#/datasets"],
  [/^\/jobs$/, jobs.list, "#/jobs"], [/^\/jobs\/new$/, jobs.form, "#/jobs"], [/^\/jobs\/([^/]+)$/, jobs.detail, "#/jobs"],
  [/^\/sweeps$/, sweeps.list, "#/sweeps"], [/^\/sweeps\/([^/]+)$/, sweeps.detail, "#/sweeps"],
  [/^\/deployments$/, deployments.list, "#/deployments"], [/^\/deployments\/([^/]+)$/, deployments.detail, "#/deployments"],
];
let timers = [];
let generation = 0;

function stopTimers() { timers.forEach(clearInterval); timers = []; }

// what a page gets: polling that stops when the user leaves, navigation, the query string
function context(gen, query) {
  return {
    query,
    every(ms, fn) {
      const t = setInterval(async () => {
        if (gen !== generation) return clearInterval(t);
        try { await fn(); } catch (err) { if (!(err instanceof ApiError && err.status === 401)) console.warn(err); }
      }, ms);
      timers.push(t);
    },
    stop() { stopTimers(); },
    current: () => gen === generation,
    go: (hash) => { location.hash = hash; },
  };
}

// While a page renders, main is aria-busy (screen readers wait; so can a test).
async function route() {
  stopTimers();
  const gen = ++generation;
  main.setAttribute("aria-busy", "true");
  try {
    await renderRoute(gen);
  } finally {
    if (gen === generation) main.removeAttribute("aria-busy");
  }
}

async function renderRoute(gen) {
  const [path, q] = (location.hash.replace(/^#/, "") || "/").split("?");
  const query = new URLSearchParams(q || "");
  for (const a of document.querySelectorAll("#nav a")) a.removeAttribute("aria-current");
  for (const [re, render, nav] of ROUTES) {
    const m = path.match(re);
    if (!m) continue;
    const active = document.querySelector(`#nav a[href="${nav}"]`);
    if (active) active.setAttribute("aria-current", "page");
    clear(main);
    try {
      await render(main, m.slice(1).map(decodeURIComponent), context(gen, query));
    } catch (err) {
      if (err instanceof ApiError && err.status === 401) return;
      if (gen === generation) main.append(errorBox(err));
    }
    document.title = `${(main.querySelector("h1") || {}).textContent || "rayembed"} · rayembed console`;
    return;
  }
  clear(main).append(h("h1", {}, "Not found"), h("p", {}, "No such page: ", h("a", { href: "#/" }, "go to the overview")));
}

function signIn(message) {
  stopTimers();
  generation++;
  main.removeAttribute("aria-busy");
  document.getElementById("nav").hidden = true;
  document.getElementById("who").hidden = true;
  const input = h("input", { type: "password", id: "api-key", name: "api-key", autocomplete: "off", required: true,
    placeholder: "rek_…", "aria-describedby": "key-hint" });
  const status = h("div", { id: "login-status", "aria-live": "polite" }, message ? errorBox(message) : null);
  const form = h("form", { class: "card login stack", id: "login", "aria-labelledby": "login-title" },
    h("h1", { id: "login-title" }, "Sign in"),
    h("p", { id: "key-hint", class: "hint" }, "This API needs a key. The operator makes one with ",
      h("code", {}, "rayembed keys create --for WORKSPACE"), ". It stays in this tab only (sessionStorage)."),
    h("label", { for: "api-key" }, "API key"), input, status,
    h("button", { type: "submit", class: "primary" }, "Sign in"));
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    session.setKey(input.value.trim());
    clear(status).append(h("span", { class: "muted" }, "checking…"));
    try {
      await start(true);
    } catch (err) {
      session.setKey(null);
      clear(status).append(errorBox(`The key was refused: ${err.message}`));
      input.select();
    }
  });
  clear(main).append(form);
  input.focus();
}

async function start(fromLogin = false) {
  let listed;
  try {
    listed = await get("/v2/workspaces?page_size=1000&sort=name", { silent401: true });
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) {
      if (fromLogin) throw err;
      return signIn(session.key() ? "Your key was refused; enter it again." : null);
    }
    throw err;
  }
  const names = listed.data.map((w) => w.name);
  if (!names.includes(session.workspace()) && names.length) session.setWorkspace(names.includes("default") ? "default" : names[0]);
  const select = document.getElementById("workspace");
  clear(select).append(...names.map((n) => h("option", { value: n }, n)));
  select.value = session.workspace();
  document.getElementById("nav").hidden = false;
  document.getElementById("who").hidden = false;
  // the skip link moves focus to the page's content (its #main would be a route for the hash router)
document.querySelector(".skip").addEventListener("click", (ev) => { ev.preventDefault(); main.focus(); });
document.getElementById("logout").hidden = !session.key();
  // replaceState fires no hashchange: one render, not two racing over main
  if (fromLogin && !location.hash) history.replaceState(null, "", "#/");
  await route();
  if (fromLogin) main.focus();
}

whenUnauthorized(() => { session.setKey(null); signIn("The API refused the key (revoked or mistyped); sign in again."); });
document.getElementById("workspace").addEventListener("change", (ev) => { session.setWorkspace(ev.target.value);
  if (location.hash === "#/") route(); else location.hash = "#/";  // a new hash routes through hashchange
});
document.getElementById("logout").addEventListener("click", () => { session.setKey(null); signIn(); });
// Focus moves to the new page once it has rendered, unless the user is already typing in it: stealing focus then
// would drop their keystrokes (a form's fields exist before its page's data arrives).
window.addEventListener("hashchange", () => {
  if (!document.getElementById("nav").hidden) route().then(() => { if (!main.contains(document.activeElement)) main.focus(); });
});
start().catch((err) => clear(main).append(errorBox(err)));
