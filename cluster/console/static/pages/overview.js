// Overview: what a team opens in the morning: counts, running jobs with their progress, deployments and their
// state, and whether the cluster answers.
import { count, get, page, ws } from "../api.js";
import { badge, clear, fmt, h, link, progressBar, table } from "../dom.js";

async function health() {
  const probe = async (path) => {
    try { const r = await fetch(path); return r.ok ? "ok" : `HTTP ${r.status}`; } catch (err) { return "unreachable"; }
  };
  return { live: await probe("/v1/health/live"), ready: await probe("/v1/health/ready") };
}

export async function render(main, _params, ctx) {
  main.append(h("h1", {}, "Overview"));
  const stats = h("div", { class: "grid", id: "counts" });
  const running = h("section", { class: "card", "aria-labelledby": "running-h" });
  const deps = h("section", { class: "card", "aria-labelledby": "deps-h" });
  const cluster = h("section", { class: "card", "aria-labelledby": "health-h", id: "health" });
  main.append(stats, h("div", { class: "two" }, running, cluster), deps);

  async function refresh() {
    const [models, datasets, jobsAll, active, depsAll, ready, pending] = await Promise.all([
      count(ws("/models")), count(ws("/datasets")), count(ws("/customization/jobs")),
      count(ws("/customization/jobs"), { status: "running" }), count(ws("/deployments")),
      count(ws("/deployments"), { status: "READY" }), count(ws("/customization/jobs"), { status: "pending" })]);
    const tile = (n, label, href) => h("a", { class: "card", href, "data-count": label }, h("div", { class: "stat" }, fmt.int(n)),
      h("div", { class: "stat-label" }, label));
    clear(stats).append(tile(models, "models", "#/models"), tile(datasets, "datasets", "#/datasets"),
      tile(jobsAll, "jobs", "#/jobs"), tile(active + pending, "jobs running or pending", "#/jobs"),
      tile(ready, `of ${depsAll} deployments READY`, "#/deployments"));
    const runs = await get(ws("/customization/jobs?status=running&page_size=10"));
    clear(running).append(h("h2", { id: "running-h" }, "Running jobs"), table([
      { label: "job", cell: (j) => link(`#/${j.kind === "sweep" ? "sweeps" : "jobs"}/${encodeURIComponent(j.name)}`, j.name) },
      { label: "creates", cell: (j) => j.output_model },
      { label: "progress", cell: (j) => progressBar(j.progress) },
      { label: "loss", num: true, cell: (j) => fmt.num(j.progress.loss) },
      { label: "ETA", cell: (j) => fmt.seconds(j.progress.eta_seconds) }], runs.data),
    h("p", {}, link("#/jobs/new", "Start a job")));
    const d = await page(ws("/deployments"), { page_size: 10 });
    clear(deps).append(h("h2", { id: "deps-h" }, "Deployments"), table([
      { label: "deployment", cell: (x) => link(`#/deployments/${encodeURIComponent(x.name)}`, x.name) },
      { label: "model", cell: (x) => link(`#/models/${encodeURIComponent(x.model)}`, x.model) },
      { label: "state", cell: (x) => badge(x.status) },
      { label: "generation", num: true, cell: (x) => x.generation },
      { label: "verified", cell: (x) => (x.verification ? badge(x.verification.passed ? "passed" : "failed") : "—") }], d.data));
    const hh = await health();
    clear(cluster).append(h("h2", { id: "health-h" }, "Cluster health"), h("dl", { class: "facts" },
      h("dt", {}, "API live"), h("dd", {}, badge(hh.live === "ok" ? "passed" : "failed"), ` ${hh.live}`),
      h("dt", {}, "API ready (control plane)"), h("dd", {}, badge(hh.ready === "ok" ? "passed" : "failed"), ` ${hh.ready}`),
      h("dt", {}, "Ray dashboard"), h("dd", {}, "on the head, loopback only (", h("code", {}, "rayembed status"), ")")));
  }
  await refresh();
  ctx.every(3000, refresh);
}
