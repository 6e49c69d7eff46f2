// DOM helpers: every string becomes a text node (never HTML), so names, descriptions, errors and dataset text
// that came from a user can never run or add elements. No innerHTML anywhere in the console.

export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on") && typeof v === "function") el.addEventListener(k.slice(2), v);
    else if (k === "value") el.value = v;
    else if (k === "checked") el.checked = !!v;
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  append(el, children);
  return el;
}

export function append(el, children) {
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

// clear(el).append(...) puts the new children in through append() above (null skipped, strings as text)
export function clear(el) { el.replaceChildren(); return { el, append: (...children) => append(el, children) }; }

export function link(href, text) { return h("a", { href }, text); }

const TONE = { ready: "ok", READY: "ok", completed: "ok", improved: "ok", passed: "ok", running: "run",
  pending: "run", PENDING: "run", exporting: "run", created: "run", CREATED: "run", failed: "bad", FAILED: "bad",
  worse: "bad", cancelled: "warn", DELETING: "warn", inconclusive: "warn", unchanged: "warn" };

export function badge(text) { return h("span", { class: `badge ${TONE[text] || ""}`, "data-status": text }, text); }

export function progressBar(progress, wide = false) {
  const pct = progress && progress.percent != null ? progress.percent : 0;
  const bar = h("progress", { max: "100", value: String(pct), "aria-label": `progress ${pct}%` });
  const text = progress && progress.total_steps ? ` step ${progress.step}/${progress.total_steps} (${pct}%)` : ` ${pct}%`;
  return h("span", { class: wide ? "progress-wide" : "" }, bar, h("span", { class: "muted" }, text));
}

// A table: `columns` [{label, cell(row) -> node|string, num}], rows -> one <tr> each; collapses on a narrow window.
export function table(columns, rows, caption) {
  const head = h("tr", {}, columns.map((c) => h("th", { scope: "col", class: c.num ? "num" : null }, c.label)));
  const body = rows.map((r) => h("tr", {}, columns.map((c) => h("td", { class: c.num ? "num" : null,
    "data-label": c.label }, c.cell(r)))));
  return h("div", { class: "scroll" }, h("table", { class: "collapse" }, caption ? h("caption", { class: "hint" }, caption) : null,
    h("thead", {}, head), h("tbody", {}, body.length ? body : [h("tr", {}, h("td", { colspan: columns.length, class: "muted" }, "none yet"))])));
}

// Pager for a /v2 page answer: Previous / Next buttons calling go(page).
export function pager(pagination, go) {
  const { page, total_pages: pages, total_results: total } = pagination;
  return h("div", { class: "pager", role: "navigation", "aria-label": "pages" },
    h("button", { type: "button", disabled: page <= 1, onclick: () => go(page - 1) }, "Previous"),
    h("span", { class: "muted" }, `page ${page} of ${pages} (${total} in all)`),
    h("button", { type: "button", disabled: page >= pages, onclick: () => go(page + 1) }, "Next"));
}

export function facts(pairs) {
  return h("dl", { class: "facts" }, pairs.filter((p) => p).map(([k, v]) => [h("dt", {}, k), h("dd", {}, v ?? "—")]));
}

export function field(label, input, hint) {
  const id = input.id || `f-${Math.random().toString(36).slice(2, 9)}`;
  input.id = id;
  return h("div", { class: "row" }, h("label", { for: id }, label), h("div", {}, input, hint ? h("div", { class: "hint" }, hint) : null));
}

export function errorBox(err) {
  return h("div", { class: "error", role: "alert" }, err && err.message ? err.message : String(err));
}

export const fmt = {
  time: (iso) => (iso ? new Date(iso).toLocaleString() : "—"),
  num: (x, d = 4) => (x === null || x === undefined ? "—" : Number(x).toFixed(d)),
  int: (x) => (x === null || x === undefined ? "—" : Number(x).toLocaleString("en-US")),
  signed: (x, d = 4) => (x === null || x === undefined ? "—" : (x >= 0 ? "+" : "") + Number(x).toFixed(d)),
  bytes: (n) => (n == null ? "—" : n < 1024 ? `${n} B` : n < 2 ** 20 ? `${(n / 1024).toFixed(1)} KiB` : `${(n / 2 ** 20).toFixed(2)} MiB`),
  seconds: (s) => (s == null ? "?" : s < 60 ? `${Math.round(s)}s` : `${Math.floor(s / 60)}m${String(Math.round(s % 60)).padStart(2, "0")}s`),
};

// "+0.016 (95% CI 0.000 to +0.036, 100 queries)": a figure travels with its interval (rayembed/stats.py's wording)
export function signed3(x) {
  const t = (x >= 0 ? "+" : "") + Number(x).toFixed(3);
  return Number(t) === 0 ? t.replace(/^[+-]/, "") : t;
}

export function intervalText(iv, fallbackDelta) {
  if (!iv) return fallbackDelta == null ? "—" : `${signed3(fallbackDelta)}, no interval`;
  const pct = `${+(100 * (iv.confidence || 0.95)).toFixed(6)}%`;
  return `${signed3(iv.delta)} (${pct} CI ${signed3(iv.low)} to ${signed3(iv.high)}, ${iv.queries} queries)`;
}
