// Deployments: create, repoint and undeploy; a deployment's status history, generations, replicas and verification;
// a try-it box, a side-by-side search against another deployment, and snippets to copy for each route.
import { del, get, page, patch, post, request, session, ws } from "../api.js";
import { badge, clear, errorBox, facts, field, fmt, h, link, pager, table } from "../dom.js";

const providerPath = (dep) => ws(`/inference/gateway/provider/${encodeURIComponent(dep)}/-/v1/embeddings`);

export async function list(main, _p, ctx) {
  main.append(h("h1", {}, "Deployments"));
  const box = h("div", { id: "deployments" });
  let current = 1;
  const show = async (n = current) => {
    current = n;
    const r = await page(ws("/deployments"), { page: n });
    clear(box).append(table([
      { label: "deployment", cell: (d) => link(`#/deployments/${encodeURIComponent(d.name)}`, d.name) },
      { label: "model", cell: (d) => link(`#/models/${encodeURIComponent(d.model)}`, d.model) },
      { label: "state", cell: (d) => badge(d.status) },
      { label: "generation", num: true, cell: (d) => d.generation },
      { label: "moving to", cell: (d) => d.pending_model || "—" },
      { label: "verified", cell: (d) => (d.verification ? badge(d.verification.passed ? "passed" : "failed") : "—") },
      { label: "updated", cell: (d) => fmt.time(d.updated_at) }], r.data), pager(r.pagination, show));
  };
  const models = (await get(ws("/models?page_size=1000&status=ready&sort=name"))).data;
  const name = h("input", { type: "text", id: "dep-name", required: true, pattern: "[a-z0-9][a-z0-9-]{1,62}", autocomplete: "off" });
  const model = h("select", { id: "dep-model", required: true }, models.map((m) => h("option", { value: m.name }, m.name)));
  if (ctx.query.get("model")) { model.value = ctx.query.get("model"); name.value = ctx.query.get("model"); }
  const replicas = h("input", { type: "number", id: "dep-replicas", min: "1", step: "1", value: "1" });
  const cpus = h("input", { type: "number", id: "dep-cpus", min: "0", step: "any", value: "1" });
  const gpus = h("input", { type: "number", id: "dep-gpus", min: "0", step: "any", value: "0" });
  const dims = h("input", { type: "number", id: "dep-dims", min: "1", step: "1", placeholder: "full size" });
  const worse = h("input", { type: "checkbox", id: "dep-allow-worse" });
  const status = h("div", { id: "dep-status", "aria-live": "polite" });
  const form = h("form", { class: "stack card", id: "new-deployment" }, h("h2", {}, "Deploy a model"),
    field("Name", name), field("Model", model), field("Replicas", replicas), field("CPUs per replica", cpus), field("GPUs per replica", gpus),
    field("Default dimensions", dims, "a Matryoshka size for requests that name none (the report card suggests one)"),
    h("label", { for: "dep-allow-worse" }, worse, " deploy even if its job found it worse than its base"),
    h("div", {}, h("button", { type: "submit", class: "primary" }, "Deploy")), status);
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    clear(status);
    const body = { name: name.value.trim(), model: model.value, num_replicas: Number(replicas.value), num_cpus: Number(cpus.value),
      num_gpus: Number(gpus.value), allow_worse: worse.checked };
    if (dims.value) body.default_dimensions = Number(dims.value);
    try { const d = await post(ws("/deployments"), body); ctx.go(`#/deployments/${encodeURIComponent(d.name)}`); } catch (err) { status.append(errorBox(err)); }
  });
  main.append(box, form);
  await show(1);
  ctx.every(3000, () => show());
}

function snippets(dep, model) {
  const base = location.origin;
  const url = `${base}${providerPath(dep.name)}`;
  const w = session.workspace();
  const body = JSON.stringify({ input: ["how do I compress files"], input_type: "query" });
  const curl = `curl -s ${url} \\\n  -H "Authorization: Bearer $RAYEMBED_API_KEY" -H "Content-Type: application/json" \\\n  -d '${body}'`;
  const openai = `import os\nfrom openai import OpenAI\n\nclient = OpenAI(base_url="${base}/v2/workspaces/${w}/inference/gateway/provider/${dep.name}/-/v1",\n                api_key=os.environ["RAYEMBED_API_KEY"])\nout = client.embeddings.create(model="${model}", input=["how do I compress files"],\n                               extra_body={"input_type": "query"})\nprint(len(out.data[0].embedding))`;
  const client = `from cluster.client import Client  # pip install rayembed; RAYEMBED_API_KEY is read from the environment\n\nc = Client(base_url="${base}", workspace="${w}")\nout = c.inference.gateway.provider.post("v1/embeddings", "${dep.name}",\n                                        {"input": ["how do I compress files"], "input_type": "query"})\nprint(len(out["data"][0]["embedding"]))`;
  const model_route = `curl -s ${base}/v2/workspaces/${w}/inference/gateway/model/${model}/-/v1/embeddings \\\n  -H "Authorization: Bearer $RAYEMBED_API_KEY" -H "Content-Type: application/json" -d '${body}'`;
  const block = (title, text, id) => {
    const pre = h("pre", { id, tabindex: "0" }, text);
    return h("div", {}, h("h3", {}, title), pre, h("button", { type: "button", onclick: () => navigator.clipboard && navigator.clipboard.writeText(text) }, `Copy ${title}`));
  };
  return h("section", { class: "card", id: "snippets" }, h("h2", {}, "Use it"),
    h("p", { class: "hint" }, "The key is never shown here: export RAYEMBED_API_KEY first."),
    block("curl (this deployment)", curl, "snippet-curl"), block("curl (by model name)", model_route, "snippet-model"),
    block("openai SDK", openai, "snippet-openai"), block("Python client", client, "snippet-client"));
}

function tryIt(dep, model) {
  const text = h("textarea", { id: "try-text" }, "how do I compress files");
  const type = h("select", { id: "try-type" }, h("option", { value: "query" }, "query"), h("option", { value: "passage" }, "passage"));
  const sizes = [...new Set([...(model.matryoshka_dims || []), model.embedding_dim].filter(Boolean))].sort((a, b) => a - b);
  const dims = h("select", { id: "try-dims" }, h("option", { value: "" }, "default"), sizes.map((s) => h("option", { value: String(s) }, String(s))));
  const out = h("div", { id: "try-out", "aria-live": "polite" });
  const form = h("form", { class: "stack", id: "try-form" }, field("Text", text), field("input_type", type), field("Dimensions", dims),
    h("div", {}, h("button", { type: "submit", class: "primary" }, "Embed")), out);
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    clear(out);
    const body = { model: dep.model, input: text.value, input_type: type.value };
    if (dims.value) body.dimensions = Number(dims.value);
    const t0 = performance.now();
    try {
      const r = await request("POST", providerPath(dep.name), body);
      const ms = performance.now() - t0;
      const v = r.data[0].embedding;
      const norm = Math.sqrt(v.reduce((a, x) => a + x * x, 0));
      out.append(facts([["dimensions", h("span", { id: "try-dimensions" }, String(v.length))], ["norm", h("span", { id: "try-norm" }, norm.toFixed(6))],
        ["tokens", h("span", { id: "try-tokens" }, String(r.usage.prompt_tokens))], ["latency", h("span", { id: "try-latency" }, `${ms.toFixed(1)} ms`)],
        ["vector head", h("span", { class: "vector", id: "try-head" }, `[${v.slice(0, 8).map((x) => x.toFixed(4)).join(", ")}${v.length > 8 ? ", …" : ""}]`)]]));
    } catch (err) { out.append(errorBox(err)); }
  });
  return h("section", { class: "card", id: "try-it" }, h("h2", {}, "Try it"), form);
}

function sideBySide(dep, others) {
  const query = h("input", { type: "text", id: "search-query", required: true, autocomplete: "off", placeholder: "a query, such as one of the evaluation set's" });
  const base = others.find((o) => o.base) || others[0];
  const other = h("select", { id: "search-compare" }, h("option", { value: "" }, "(none)"), others.map((o) => h("option", { value: o.name }, `${o.name} (${o.model})`)));
  if (base) other.value = base.name;
  const out = h("div", { id: "search-out", "aria-live": "polite" });
  const examples = h("div", { class: "actions", id: "search-examples" });
  const run = async () => {
    clear(out).append(h("p", { class: "muted" }, "searching (the first search embeds the corpus through each deployment)…"));
    try {
      const r = await post(ws(`/deployments/${encodeURIComponent(dep.name)}/search`), { query: query.value, compare_with: other.value || null, k: 5 });
      clear(out).append(h("p", { class: "hint" }, `${r.dataset}: ${r.documents} documents` + (r.judged ? "; ✓ marks a document judged relevant to this query" : "")),
        h("div", { class: "two" }, r.results.map((side) => h("section", { class: "hits", "data-deployment": side.deployment },
          h("h3", {}, `${side.deployment} (${side.model})`), h("ol", {}, side.hits.map((hit) => h("li", { "data-doc": hit.id },
            h("span", { class: "score" }, hit.score.toFixed(3)), hit.relevant ? h("span", { class: "rel", title: "judged relevant" }, "✓") : null,
            h("span", { class: "doc-text" }, hit.text)))), h("p", { class: "hint" }, `${side.seconds} s`)))));
      clear(examples).append(h("span", { class: "hint" }, "Queries from the evaluation set:"), r.examples.map((q) =>
        h("button", { type: "button", onclick: () => { query.value = q; run(); } }, q.length > 48 ? `${q.slice(0, 48)}…` : q)));
    } catch (err) { clear(out).append(errorBox(err)); }
  };
  const form = h("form", { class: "inline", id: "search-form" }, h("div", { class: "field" }, h("label", { for: "search-query" }, "Query"), query),
    h("div", { class: "field" }, h("label", { for: "search-compare" }, "Compare with"), other), h("button", { type: "submit", class: "primary" }, "Search"));
  form.addEventListener("submit", (ev) => { ev.preventDefault(); run(); });
  return h("section", { class: "card", id: "side-by-side" }, h("h2", {}, "Side-by-side search"),
    h("p", { class: "hint" }, "One query against this model's evaluation corpus: the top 5 from this deployment next to another's (the base model's, to see what fine-tuning bought)."),
    form, examples, out);
}

export async function detail(main, [name], ctx) {
  const head = h("div", { id: "dep-head" });
  const info = h("div", { class: "two" });
  const hist = h("section", { class: "card", id: "dep-history" });
  const tools = h("div", { id: "dep-tools" });
  main.append(h("h1", {}, `Deployment ${name}`), head, info, hist, tools);
  const models = (await get(ws("/models?page_size=1000&status=ready&sort=name"))).data;
  let shownReady = null, shownAt = null;
  const refresh = async () => {
    const d = await get(ws(`/deployments/${encodeURIComponent(name)}`));
    if (d.updated_at === shownAt) return;  // unchanged: leave the controls as the user set them
    shownAt = d.updated_at;
    let cfg = null;
    try { cfg = await get(ws(`/deployment-configs/${encodeURIComponent(d.config)}`)); } catch { /* owned config gone with it */ }
    const repoint = h("select", { id: "repoint-model", "aria-label": "model to serve" }, models.map((m) => h("option", { value: m.name }, m.name)));
    repoint.value = d.model;
    const msg = h("div", { "aria-live": "polite" });
    clear(head).append(h("p", {}, badge(d.status), " serving ", link(`#/models/${encodeURIComponent(d.model)}`, d.model),
      d.pending_model ? ` · moving to ${d.pending_model} (generation ${d.generation + 1})` : ""),
    d.error ? h("div", { class: "error" }, d.error) : null,
    h("div", { class: "actions" }, h("label", { for: "repoint-model" }, "Serve model"), repoint,
      h("button", { type: "button", id: "repoint", onclick: async () => { try { await patch(ws(`/deployments/${encodeURIComponent(name)}`), { model: repoint.value }); await refresh(); } catch (err) { msg.append(errorBox(err)); } } }, "Repoint"),
      h("button", { type: "button", id: "verify", disabled: d.status !== "READY", onclick: async () => { try { await post(ws(`/deployments/${encodeURIComponent(name)}/verify`)); await refresh(); } catch (err) { msg.append(errorBox(err)); } } }, "Verify again"),
      h("button", { type: "button", class: "danger", id: "undeploy", onclick: async () => { if (!confirm(`Undeploy ${name}?`)) return; try { await del(ws(`/deployments/${encodeURIComponent(name)}`)); ctx.go("#/deployments"); } catch (err) { msg.append(errorBox(err)); } } }, "Undeploy")), msg);
    const v = d.verification;
    clear(info).append(
      h("section", { class: "card", id: "generations" }, h("h2", {}, "Generations and replicas"), facts([
        ["generation", String(d.generation)], ["application", d.app], ["starting", d.pending_app ? `${d.pending_app} (${d.pending_model}) since ${fmt.time(d.pending_since)}` : "—"],
        ["retiring", Object.entries(d.retiring || {}).map(([a, t]) => `${a} until ${fmt.time(t)}`).join("; ") || "—"],
        ["config", cfg ? `${d.config} v${d.config_version}` : d.config],
        ["replicas", cfg ? (cfg.autoscaling ? `autoscaling ${cfg.autoscaling.min_replicas}-${cfg.autoscaling.max_replicas}` : String(cfg.num_replicas)) : "—"],
        ["per replica", cfg ? `${cfg.num_cpus} CPU, ${cfg.num_gpus} GPU, precision ${cfg.precision}` : "—"],
        ["default dimensions", cfg && cfg.default_dimensions ? String(cfg.default_dimensions) : "full size"]])),
      h("section", { class: "card", id: "verification" }, h("h2", {}, "Verification"), v ? [h("p", {}, badge(v.passed ? "passed" : "failed"), " ", v.reason), facts([
        ["served nDCG@10", fmt.num(v.ndcg_at_10)], ["job's nDCG@10", fmt.num(v.expected)], ["delta", fmt.signed(v.delta)], ["tolerance", v.tolerance == null ? "—" : String(v.tolerance)],
        ["graph", v.graph], ["queries x documents", `${v.queries} x ${v.documents}`], ["at", v.at ? new Date(v.at * 1000).toLocaleString() : "—"]])] : h("p", { class: "muted" }, "at READY")));
    clear(hist).append(h("h2", {}, "Status history"), table([{ label: "status", cell: (s) => badge(s.status) }, { label: "why", cell: (s) => s.reason },
      { label: "at", cell: (s) => fmt.time(s.at) }], [...d.status_history].reverse()));
    if (d.status === "READY" && shownReady !== d.model) {
      shownReady = d.model;
      const model = await get(ws(`/models/${encodeURIComponent(d.model)}`));
      const all = (await get(ws("/deployments?page_size=1000&status=READY"))).data.filter((o) => o.name !== d.name);
      const byName = Object.fromEntries(models.map((m) => [m.name, m]));
      const others = all.map((o) => ({ name: o.name, model: o.model, base: byName[o.model] && !byName[o.model].source_job }));
      clear(tools).append(tryIt(d, model), model.evaluation ? sideBySide(d, others) : h("p", { class: "muted" }, "Side-by-side search needs a model with an evaluation set: open the tuned model's deployment."), snippets(d, d.model));
    } else if (d.status !== "READY" && !tools.firstChild) {
      tools.append(h("p", { class: "muted" }, "The try-it box and the search open when the deployment is READY."));
    }
  };
  await refresh();
  ctx.every(2000, refresh);
}
