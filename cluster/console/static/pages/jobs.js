// Jobs: the list with live progress; a job's page with its live loss curve, validation, status history, log tail,
// cancel and resume; and the new-job form with the model card's conservative defaults and its dataset-size advice.
import { del, get, page, post, ws } from "../api.js";
import { badge, clear, errorBox, facts, field, fmt, h, link, pager, progressBar, table } from "../dom.js";
import { legend, lineChart } from "../chart.js";

export const DONE = ["completed", "failed", "cancelled"];
export const jobHref = (j) => `#/${j.kind === "sweep" ? "sweeps" : "jobs"}/${encodeURIComponent(j.name)}`;

export async function list(main, _p, ctx) {
  main.append(h("h1", {}, "Jobs"), h("p", {}, link("#/jobs/new", "New job")));
  const box = h("div", { id: "jobs" });
  main.append(box);
  let current = 1;
  const show = async (n = current) => {
    current = n;
    const r = await page(ws("/customization/jobs"), { page: n });
    clear(box).append(table([
      { label: "job", cell: (j) => link(jobHref(j), j.name) },
      { label: "kind", cell: (j) => j.kind },
      { label: "creates", cell: (j) => (j.status === "completed" ? link(`#/models/${encodeURIComponent(j.output_model)}`, j.output_model) : j.output_model) },
      { label: "status", cell: (j) => badge(j.status) },
      { label: "progress", cell: (j) => progressBar(j.progress) },
      { label: "loss", num: true, cell: (j) => fmt.num(j.progress.loss) },
      { label: "created", cell: (j) => fmt.time(j.created_at) }], r.data), pager(r.pagination, show));
    return r.data.some((j) => !DONE.includes(j.status));
  };
  await show(1);
  ctx.every(2000, () => show());
}

function lossChart(points, validation) {
  const series = [{ name: "training loss", points: points.filter((p) => p.loss != null).map((p) => [p.step, p.loss]) }];
  const val = validation.filter((v) => v.metrics.val_loss != null).map((v) => [v.step, v.metrics.val_loss]);
  if (val.length) series.push({ name: "validation loss", points: val });
  return [legend(series.map((s) => s.name)), lineChart(series, { title: "loss by step", xLabel: "step", yLabel: "loss", id: "loss-chart", empty: "waiting for the first steps" })];
}

export async function detail(main, [id], ctx) {
  const title = h("h1", {}, `Job ${id}`);
  const head = h("div", { id: "job-head" });
  const prog = h("section", { class: "card progress-wide", id: "job-progress", "aria-labelledby": "p-h" });
  const chart = h("section", { class: "card", id: "job-chart", "aria-labelledby": "c-h" });
  const val = h("section", { class: "card", id: "validation" });
  const history = h("section", { class: "card", id: "status-history" });
  const logs = h("pre", { id: "log-tail", tabindex: "0", "aria-label": "the job's log, last lines" });
  const spec = h("details", { class: "card" });
  main.append(title, head, prog, chart, h("div", { class: "two" }, val, history),
    h("section", { class: "card" }, h("h2", {}, "Log (last 40 lines)"), logs), spec);
  let job;

  async function refresh() {
    job = await get(ws(`/customization/jobs/${encodeURIComponent(id)}`));
    const m = await get(ws(`/customization/jobs/${encodeURIComponent(id)}/metrics?page_size=1000`));
    const actions = h("div", { class: "actions" });
    if (!DONE.includes(job.status)) actions.append(h("button", { type: "button", class: "danger", id: "cancel", onclick: cancel }, "Cancel"));
    if (["failed", "cancelled"].includes(job.status) && job.kind === "training") actions.append(h("button", { type: "button", id: "resume", onclick: resume }, "Resume from the last checkpoint"));
    if (DONE.includes(job.status)) actions.append(h("button", { type: "button", class: "danger", id: "delete-job", onclick: remove }, "Delete"));
    clear(head).append(h("p", {}, badge(job.status), ` ${job.kind} job → model `,
      job.status === "completed" ? link(`#/models/${encodeURIComponent(job.output_model)}`, job.output_model) : job.output_model),
    job.error ? h("div", { class: "error", id: "job-error" }, job.error) : null,
    (job.warnings || []).map((w) => h("p", { class: "notice" }, w)), actions);
    clear(prog).append(h("h2", { id: "p-h" }, "Progress"), progressBar(job.progress, true), facts([
      ["loss", fmt.num(job.progress.loss)], ["examples/s", fmt.num(job.progress.examples_per_s, 1)],
      ["ETA", fmt.seconds(job.progress.eta_seconds)], ["started", fmt.time(job.started_at)], ["finished", fmt.time(job.finished_at)]]));
    const last = m.data[m.data.length - 1];
    clear(chart).append(h("h2", { id: "c-h" }, "Loss curve"), ...lossChart(m.data, m.validation),
      h("p", { class: "hint", id: "metrics-summary" }, `${m.pagination.total_results} points` + (m.stride > 1 ? ` (each of ${m.stride} steps)` : "") +
        (last ? `; step ${last.step}: loss ${fmt.num(last.loss)}, lr ${last.lr == null ? "—" : last.lr.toExponential(2)}, ${fmt.num(last.examples_per_s, 1)} examples/s` : "")));
    const keys = [...new Set(m.validation.flatMap((v) => Object.keys(v.metrics)))];
    clear(val).append(h("h2", {}, "Validation"), m.validation.length ? table([{ label: "step", num: true, cell: (v) => v.step },
      ...keys.map((k) => ({ label: k, num: true, cell: (v) => fmt.num(v.metrics[k]) }))], m.validation)
      : h("p", { class: "muted" }, "after training: validation loss and retrieval metrics on the held-out split"));
    clear(history).append(h("h2", {}, "Status history"), table([{ label: "status", cell: (s) => badge(s.status) },
      { label: "why", cell: (s) => s.reason }, { label: "at", cell: (s) => fmt.time(s.at) }], job.status_history));
    if (!spec.firstChild) spec.append(h("summary", {}, "Config as submitted"), h("pre", {}, JSON.stringify(job.spec, null, 2)));
    try {
      const text = await get(ws(`/customization/jobs/${encodeURIComponent(id)}/logs`), { raw: true });
      // Ray colours its log lines (ANSI escapes): shown as plain text
      logs.textContent = text.replace(/\x1b\[[0-9;]*m/g, "").trimEnd().split("\n").slice(-40).join("\n") || "(no output yet)";
    } catch (err) { logs.textContent = `(logs not available: ${err.message})`; }
    return DONE.includes(job.status);
  }
  async function cancel() {
    if (!confirm(`Cancel job ${id}? Its checkpoints stay; it can be resumed.`)) return;
    try { await post(ws(`/customization/jobs/${encodeURIComponent(id)}/cancel`)); } catch (err) { head.append(errorBox(err)); }
    await refresh();
  }
  async function remove() {  // refused (409, shown) while the model the job made exists: its files are in the job's folder
    if (!confirm(`Delete job ${id} and its folder (checkpoints, output)?`)) return;
    try { await del(ws(`/customization/jobs/${encodeURIComponent(id)}`)); ctx.go("#/jobs"); } catch (err) { head.append(errorBox(err)); }
  }
  async function resume() {
    try { await post(ws(`/customization/jobs/${encodeURIComponent(id)}/resume`)); } catch (err) { head.append(errorBox(err)); }
    await refresh();
  }
  await refresh();
  ctx.every(1500, async () => { if (job && DONE.includes(job.status) && job.progress.percent >= 100) return; await refresh(); });
}

const DEFAULTS = { lr: "5e-6", wd: "0.01", epochs: "1" };  // the model card's conservative defaults (DESIGN.md)

export async function form(main, _p, ctx) {
  main.append(h("h1", {}, "New job"));
  const [models, datasets] = await Promise.all([get(ws("/models?page_size=1000&status=ready")), get(ws("/datasets?page_size=1000&sort=name"))]);
  const model = h("input", { type: "text", id: "job-model", required: true, list: "model-list", autocomplete: "off" });
  const modelList = h("datalist", { id: "model-list" }, models.data.map((m) => h("option", { value: m.name }, `${m.name} (${m.base_model})`)));
  const dataset = h("select", { id: "job-dataset", required: true }, datasets.data.map((d) => h("option", { value: d.name }, d.name)));
  if (ctx.query.get("dataset")) dataset.value = ctx.query.get("dataset");
  const output = h("input", { type: "text", id: "job-output", required: true, pattern: "[a-z0-9][a-z0-9-]{1,62}", autocomplete: "off" });
  const sft = h("input", { type: "radio", name: "ft", id: "ft-full", value: "all_weights", checked: true });
  const lora = h("input", { type: "radio", name: "ft", id: "ft-lora", value: "lora_merged" });
  const rank = h("input", { type: "number", id: "lora-rank", min: "1", value: "16" });
  const alpha = h("input", { type: "number", id: "lora-alpha", min: "1", value: "32" });
  const loraBox = h("fieldset", { id: "lora-settings", disabled: true }, h("legend", {}, "LoRA (merged into the weights for export)"), field("rank", rank), field("alpha", alpha));
  for (const r of [sft, lora]) r.addEventListener("change", () => { loraBox.disabled = !lora.checked; });
  const num = (id, value, step = "any") => h("input", { type: "number", id, value, step, min: "0" });
  const lr = num("job-lr", DEFAULTS.lr), wd = num("job-wd", DEFAULTS.wd), epochs = num("job-epochs", DEFAULTS.epochs, "1");
  const steps = h("input", { type: "number", id: "job-steps", min: "1", step: "1", placeholder: "all epochs" });
  const batch = h("input", { type: "number", id: "job-batch", min: "1", step: "1", value: "32" });
  const seq = h("input", { type: "number", id: "job-seq", min: "8", step: "1", placeholder: "the model's maximum" });
  const dims = h("input", { type: "text", id: "job-dims", placeholder: "e.g. 384, 768, 2048", autocomplete: "off" });
  const every = h("input", { type: "number", id: "job-log-every", min: "1", step: "1", value: "10" });
  const sweep = h("input", { type: "checkbox", id: "job-sweep" });
  const advice = h("p", { class: "notice", id: "size-advice", "aria-live": "polite" });
  const status = h("div", { id: "job-status", "aria-live": "polite" });
  const showAdvice = () => {
    const d = datasets.data.find((x) => x.name === dataset.value);
    const n = d && d.files["training.jsonl"] ? d.files["training.jsonl"].records : null;
    advice.textContent = "The model card's advice: 5,000-10,000 training examples, 1 epoch at learning rate 5e-6 and weight decay 0.01. " +
      (n == null ? "This dataset has no training.jsonl yet." : n < 5000 ? `This dataset has ${n.toLocaleString("en-US")}: fewer than advised, so expect a small or inconclusive gain.`
        : n > 10000 ? `This dataset has ${n.toLocaleString("en-US")}: more than needed; a sample of 10,000 trains as well in less time.` : `This dataset has ${n.toLocaleString("en-US")}: within the advice.`);
  };
  dataset.addEventListener("change", showAdvice);
  showAdvice();
  const f = h("form", { class: "stack card", id: "new-job" },
    field("Base model", model, "a model in this workspace, or a base model the operator allowed"), modelList,
    field("Dataset", dataset), advice, field("Output model", output, "the model the job creates when it succeeds"),
    h("fieldset", {}, h("legend", {}, "Fine-tuning"), h("label", { for: "ft-full" }, sft, " full SFT (all weights)"), " ",
      h("label", { for: "ft-lora" }, lora, " LoRA, merged")), loraBox,
    field("Learning rate", lr, "the card's default 5e-6"), field("Weight decay", wd, "the card's default 0.01"), field("Epochs", epochs, "the card's default 1"),
    h("details", {}, h("summary", {}, "More settings"), field("Max steps", steps, "instead of epochs (leave empty to train the epochs)"),
      field("Batch size", batch, "queries per optimizer step"), field("Max sequence length", seq), field("Matryoshka sizes", dims, "train several sizes at once; empty: full size only"),
      field("Log every N steps", every), h("label", { for: "job-sweep" }, sweep, " sweep the learning rate around it (5e-6, 1e-5, 2e-5; the winner becomes the model)")),
    h("div", {}, h("button", { type: "submit", class: "primary" }, "Start job")), status);
  f.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    clear(status);
    const cfg = { model: model.value.trim(), dataset: { name: dataset.value },
      training: { finetuning_type: lora.checked ? "lora_merged" : "all_weights" },
      optimizer: { learning_rate: Number(lr.value), weight_decay: Number(wd.value) },
      schedule: steps.value ? { max_steps: Number(steps.value) } : { epochs: Number(epochs.value) }, batch: { global_batch_size: Number(batch.value) }, output: { log_every_steps: Number(every.value) } };
    if (lora.checked) cfg.training.lora = { rank: Number(rank.value), alpha: Number(alpha.value) };
    if (seq.value) cfg.training.max_seq_length = Number(seq.value);
    if (dims.value.trim()) cfg.loss = { matryoshka_dims: dims.value.split(/[\s,]+/).filter(Boolean).map(Number) };
    const body = sweep.checked ? { output_model: output.value.trim(), sweep: { job: cfg } } : { output_model: output.value.trim(), config: cfg };
    try {
      const job = await post(ws("/customization/jobs"), body);
      ctx.go(`${sweep.checked ? "#/sweeps/" : "#/jobs/"}${encodeURIComponent(job.name)}`);
    } catch (err) { status.append(errorBox(err)); }
  });
  main.append(f);
}
