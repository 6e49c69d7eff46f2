// Sweeps: learning-rate sweeps (jobs of kind sweep): the trial table, the score by learning rate, and the winner.
import { get, page, ws } from "../api.js";
import { badge, clear, facts, fmt, h, intervalText, link, pager, progressBar, table } from "../dom.js";
import { lineChart } from "../chart.js";
import { DONE } from "./jobs.js";

export async function list(main, _p, ctx) {
  main.append(h("h1", {}, "Sweeps"), h("p", { class: "hint" }, "A sweep trains the same job at several learning rates around the card's 5e-6, scores each on the validation split, and promotes the winner to a model. Start one from ",
    link("#/jobs/new", "the new-job form"), " (More settings)."));
  const box = h("div", { id: "sweeps" });
  main.append(box);
  const show = async (n) => {
    const r = await page(ws("/customization/jobs"), { page: n, kind: "sweep" });
    const sweeps = r.data;
    clear(box).append(table([
      { label: "sweep", cell: (j) => link(`#/sweeps/${encodeURIComponent(j.name)}`, j.name) },
      { label: "status", cell: (j) => badge(j.status) },
      { label: "learning rates", cell: (j) => ((j.spec.search || {}).learning_rates || []).join(", ") },
      { label: "winner", cell: (j) => ((j.result || {}).trials || {}).best ? String(j.result.trials.best.lr) : "—" },
      { label: "creates", cell: (j) => j.output_model },
      { label: "created", cell: (j) => fmt.time(j.created_at) }], sweeps), pager(r.pagination, show));
  };
  await show(1);
}

export async function detail(main, [id], ctx) {
  const box = h("div", {});
  main.append(h("h1", {}, `Sweep ${id}`), box);
  const refresh = async () => {
    const j = await get(ws(`/customization/jobs/${encodeURIComponent(id)}`));
    const summary = (j.result || {}).trials || {};
    const trials = summary.trials || [];
    const best = summary.best;
    const ok = trials.filter((t) => t.status === "ok" && t.ndcg != null).sort((a, b) => a.lr - b.lr);
    clear(box).append(h("p", {}, badge(j.status), " → model ",
      j.status === "completed" ? link(`#/models/${encodeURIComponent(j.output_model)}`, j.output_model) : j.output_model, " · ", link(`#/jobs/${encodeURIComponent(id)}`, "job page (log, status history)")),
    j.error ? h("div", { class: "error" }, j.error) : null,
    DONE.includes(j.status) ? null : h("section", { class: "card progress-wide" }, h("h2", {}, "Progress"), progressBar(j.progress, true)),
    h("section", { class: "card", id: "winner" }, h("h2", {}, "Winner"), best ? facts([
      ["learning rate", String(best.lr)], ["validation nDCG@10", fmt.num(best.ndcg)],
      j.result && j.result.eval && j.result.eval.verdict ? ["against the base", `${j.result.eval.verdict.outcome}, ${intervalText(j.result.eval.verdict.interval, j.result.eval.verdict["delta_ndcg@10"])}`] : null])
      : h("p", { class: "muted" }, DONE.includes(j.status) ? "no trial succeeded" : "when the trials finish")),
    h("section", { class: "card" }, h("h2", {}, "Validation nDCG@10 by learning rate"),
      lineChart([{ name: "trials", points: ok.map((t) => [t.lr, t.ndcg]) }], { title: "nDCG@10 by learning rate", xLabel: "learning rate (log)", yLabel: "nDCG@10", logX: true, xTicks: ok.length ? ok.map((t) => t.lr) : null, best: best && best.ndcg != null ? [best.lr, best.ndcg] : null, id: "sweep-chart" })),
    h("section", { class: "card" }, h("h2", {}, "Trials"), table([
      { label: "learning rate", num: true, cell: (t) => String(t.lr) }, { label: "status", cell: (t) => badge(t.status === "ok" ? "completed" : t.status) },
      { label: "nDCG@10", num: true, cell: (t) => fmt.num(t.ndcg) }, { label: "Recall@10", num: true, cell: (t) => fmt.num(t.recall) },
      { label: "loss", num: true, cell: (t) => fmt.num(t.loss) }, { label: "val loss", num: true, cell: (t) => fmt.num(t.val_loss) },
      { label: "seconds", num: true, cell: (t) => fmt.num(t.seconds, 0) }, { label: "extension", cell: (t) => (t.extension ? "yes" : "") },
      { label: "", cell: (t) => (best && t.lr === best.lr ? "★ winner" : t.error || "") }], trials)));
    return DONE.includes(j.status);
  };
  await refresh();
  ctx.every(3000, refresh);
}
