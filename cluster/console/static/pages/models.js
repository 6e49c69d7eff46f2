// Models: the table (status, base, parameters, sizes, verdict with its interval) and a model's page: its report
// card, the evaluation table, where its files are, and where it came from and where it runs.
import { get, page, ws } from "../api.js";
import { badge, clear, facts, fmt, h, intervalText, link, pager, table } from "../dom.js";
import { legend, lineChart } from "../chart.js";

const sizes = (m) => (m.embedding_dim ? [...new Set([...(m.matryoshka_dims || []), m.embedding_dim])].sort((a, b) => a - b).join(", ") : "—");
const params = (n) => (n == null ? "—" : n >= 1e9 ? `${(n / 1e9).toFixed(2)}B` : n >= 1e6 ? `${(n / 1e6).toFixed(1)}M` : `${(n / 1e3).toFixed(1)}k`);

export function verdict(ev) {
  if (!ev) return h("span", { class: "muted" }, "no evaluation (base)");
  return h("span", {}, badge(ev.verdict), " ", h("span", { class: "muted" }, intervalText(ev.interval, ev.delta_ndcg_at_10)));
}

export async function list(main, _p, ctx) {
  main.append(h("h1", {}, "Models"), h("p", { class: "hint" }, "Base models and the models jobs made, with the verdict of each against its base (a paired bootstrap of the per-query delta nDCG@10)."));
  const box = h("div", { id: "models" });
  main.append(box);
  const show = async (n) => {
    const r = await page(ws("/models"), { page: n });
    clear(box).append(table([
      { label: "model", cell: (m) => link(`#/models/${encodeURIComponent(m.name)}`, m.name) },
      { label: "status", cell: (m) => badge(m.status) },
      { label: "base", cell: (m) => m.base_model },
      { label: "parameters", num: true, cell: (m) => params(m.parameter_count) },
      { label: "sizes", cell: sizes },
      { label: "verdict (nDCG@10, tuned - base)", cell: (m) => verdict(m.evaluation) },
      { label: "created", cell: (m) => fmt.time(m.created_at) }], r.data), pager(r.pagination, show));
  };
  await show(1);
}

function evaluationTable(ev) {
  const keys = [...new Set([...Object.keys(ev.base || {}), ...Object.keys(ev.tuned || {})])];
  return table([
    { label: "metric", cell: (k) => k },
    { label: "base", num: true, cell: (k) => fmt.num(ev.base[k]) },
    { label: "tuned", num: true, cell: (k) => fmt.num(ev.tuned[k]) },
    { label: "tuned - base", num: true, cell: (k) => fmt.signed(ev.tuned[k] - ev.base[k]) }], keys,
  `${ev.dataset}: ${ev.queries} queries, ${ev.documents} documents`);
}

function reportCard(card) {
  const rows = [...card.rows].sort((a, b) => a.dims - b.dims || card.precisions.indexOf(a.precision) - card.precisions.indexOf(b.precision));
  const pick = (s, what) => (s ? h("li", {}, `${what}: ${s.dims} dimensions, ${s.precision}, ${fmt.int(s.bytes_per_vector)} bytes a vector, nDCG@10 ${fmt.num(s["ndcg@10"])} (best ${fmt.num(s["best_ndcg@10"])})`) : null);
  const sg = card.suggested || {};
  const sug = sg.dimensions || sg.storage ? h("div", { class: "notice", id: "suggested" },
    `Suggested (the ${sg.side || "tuned"} model, within ${sg.tolerance ?? "?"} of its best nDCG@10):`,
    h("ul", {}, pick(sg.dimensions, "smallest size"), pick(sg.storage, "cheapest storage"))) : null;
  const series = card.precisions.map((p) => ({ name: p, points: rows.filter((r) => r.precision === p && r.tuned).map((r) => [r.dims, r.tuned["ndcg@10"]]) }));
  return h("section", { class: "card", id: "report-card", "aria-labelledby": "card-h" },
    h("h2", { id: "card-h" }, "Report card"),
    h("p", { class: "hint" }, `Every size x every way of storing the vectors, on ${card.documents} documents and ${card.queries} queries: what each costs and what it keeps.`),
    sug, legend(card.precisions), lineChart(series, { title: "tuned nDCG@10 by size", xLabel: "dimensions", yLabel: "nDCG@10", logX: card.sizes.length > 1, xTicks: card.sizes, id: "card-chart" }),
    h("details", {}, h("summary", {}, "How each precision is scored"), h("ul", {}, Object.entries(card.methods || {}).map(([k, v]) => h("li", {}, h("strong", {}, k), `: ${v}`)))),
    table([
      { label: "dims", num: true, cell: (r) => r.dims },
      { label: "precision", cell: (r) => r.precision },
      { label: "bytes/vector", num: true, cell: (r) => fmt.int(r.bytes_per_vector) },
      { label: "MB per 1M docs", num: true, cell: (r) => fmt.num(r.mb_per_million_docs, 1) },
      { label: "base nDCG@10", num: true, cell: (r) => fmt.num(r.base && r.base["ndcg@10"]) },
      { label: "tuned nDCG@10", num: true, cell: (r) => fmt.num(r.tuned && r.tuned["ndcg@10"]) },
      { label: "tuned vs base", cell: (r) => (r.delta ? intervalText(r.delta) : "—") }], rows));
}

export async function detail(main, [name]) {
  const [m, all] = await Promise.all([get(ws(`/models/${encodeURIComponent(name)}`)), get(ws("/deployments?page_size=1000"))]);
  const deps = all.data.filter((d) => d.model === m.name || d.pending_model === m.name);
  main.append(h("h1", {}, `Model ${m.name}`), h("p", {}, badge(m.status), " ", m.description || ""));
  if (m.error) main.append(h("div", { class: "error" }, m.error));
  main.append(h("section", { class: "card", "aria-labelledby": "lin-h" }, h("h2", { id: "lin-h" }, "Lineage"),
    h("div", { class: "lineage", id: "lineage" },
      m.source_job ? link(`#/jobs/${encodeURIComponent(m.source_job)}`, `job ${m.source_job}`) : h("span", { class: "muted" }, `base ${m.base_model}`),
      h("span", { class: "arrow" }, "→"), h("strong", {}, `model ${m.name}`), h("span", { class: "arrow" }, "→"),
      deps.length ? deps.map((d) => [link(`#/deployments/${encodeURIComponent(d.name)}`, `deployment ${d.name}`), " ", badge(d.status), " "])
        : link(`#/deployments?model=${encodeURIComponent(m.name)}`, "not deployed: deploy it"))));
  main.append(h("section", { class: "card", "aria-labelledby": "facts-h" }, h("h2", { id: "facts-h" }, "Model"), facts([
    ["base model", m.base_model], ["parameters", fmt.int(m.parameter_count)], ["embedding size", m.embedding_dim],
    ["Matryoshka sizes", (m.matryoshka_dims || []).join(", ") || "full size only"], ["max sequence", m.max_seq_length],
    ["precision", m.precision], ["prefixes", Object.entries(m.prefixes || {}).map(([k, v]) => `${k}: "${v}"`).join(", ") || "none"],
    ["artifact URI", m.artifact ? h("code", { id: "artifact-uri" }, m.artifact.uri) : "—"],
    ["artifact digest (sha256)", m.artifact && m.artifact.sha256 ? h("code", { id: "artifact-digest" }, m.artifact.sha256) : "—"],
    ["merged weights", m.artifact && m.artifact.hf_uri ? h("code", {}, m.artifact.hf_uri) : "—"],
    ["created", fmt.time(m.created_at)]])));
  const ev = m.evaluation;
  if (!ev) {
    main.append(h("p", { class: "muted" }, "No evaluation: a base model, or an artifact registered without its job's eval.json."));
    return;
  }
  main.append(h("section", { class: "card", id: "evaluation", "aria-labelledby": "ev-h" }, h("h2", { id: "ev-h" }, "Evaluation"),
    h("p", { id: "verdict" }, "Verdict: ", verdict(ev)),
    ev.interval ? h("p", { class: "hint" }, `${ev.interval.better} queries better, ${ev.interval.worse} worse, ${ev.interval.unchanged} unchanged (paired bootstrap, ${ev.interval.resamples} resamples)`) : null,
    ev.warning ? h("p", { class: "notice" }, ev.warning) : null, ev.note ? h("p", { class: "hint" }, ev.note) : null,
    ev.regression ? h("p", {}, `Regression set ${ev.regression.dataset}: `, badge(ev.regression.outcome), " ", intervalText(ev.regression.interval)) : null,
    evaluationTable(ev)));
  if (ev.card) main.append(reportCard(ev.card));
}
