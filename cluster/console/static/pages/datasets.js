// Datasets: the list, a dataset's files and records, and uploads from the browser (validated as a job will read
// them: a bad line comes back with its line number and field).
import { ApiError, get, page, post, upload, ws } from "../api.js";
import { append, clear, errorBox, facts, field, fmt, h, link, pager, table } from "../dom.js";

const FILES = [["training.jsonl", "training examples (JSONL: query, pos_doc, neg_doc)"], ["validation.jsonl", "validation examples (optional)"],
  ["evaluation/corpus.jsonl", "evaluation corpus (BEIR)"], ["evaluation/queries.jsonl", "evaluation queries (BEIR)"],
  ["evaluation/qrels/test.tsv", "evaluation judgments (BEIR qrels)"]];
const slug = (p) => p.replace(/[^a-z0-9]+/g, "-");

function fileInputs() {
  return FILES.map(([path, what]) => [path, h("input", { type: "file", id: `file-${slug(path)}`, name: path, accept: path.endsWith(".tsv") ? ".tsv,text/tab-separated-values" : ".jsonl,.json,application/jsonl" }), what]);
}

// The validator's lines ("training.jsonl:3: field 'neg_doc' must be a list ...") as rows of line, field, problem.
function lineProblems(message) {
  return message.split("\n").map((l) => l.match(/^\s*\S+?:(\d+): (.*)$/)).filter(Boolean)
    .map(([, line, problem]) => ({ line, problem, field: (problem.match(/field '([^']+)'/) || [])[1] }));
}

// Upload each chosen file in order (corpus and queries before the judgments); stop at the first refusal.
async function uploadAll(name, inputs, status) {
  for (const [path, input] of inputs) {
    const file = input.files && input.files[0];
    if (!file) continue;
    status.append(h("div", { class: "muted" }, `uploading ${path} (${fmt.bytes(file.size)})…`));
    try {
      const d = await upload(name, path, file);
      const f = d.files[path];
      status.append(h("div", {}, `${path}: ${fmt.int(f.records)} records stored`));
    } catch (err) {
      const problems = lineProblems(err.message);
      append(status, [h("div", { class: "error", role: "alert", id: "upload-error" }, `${path} was refused: ${err.message}`),
        problems.length ? h("div", { id: "upload-problems" }, table([{ label: "line", num: true, cell: (p) => p.line },
          { label: "field", cell: (p) => p.field || "—" }, { label: "problem", cell: (p) => p.problem }], problems)) : null]);
      return false;
    }
  }
  return true;
}

export async function list(main, _p, ctx) {
  main.append(h("h1", {}, "Datasets"));
  const box = h("div", { id: "datasets" });
  const show = async (n) => {
    const r = await page(ws("/datasets"), { page: n });
    clear(box).append(table([
      { label: "dataset", cell: (d) => link(`#/datasets/${encodeURIComponent(d.name)}`, d.name) },
      { label: "description", cell: (d) => h("span", { class: "description" }, d.description) },
      { label: "files", cell: (d) => Object.keys(d.files).join(", ") || "no files yet" },
      { label: "training examples", num: true, cell: (d) => fmt.int((d.files["training.jsonl"] || {}).records) },
      { label: "created", cell: (d) => fmt.time(d.created_at) }], r.data), pager(r.pagination, show));
  };
  const name = h("input", { type: "text", id: "ds-name", required: true, pattern: "[a-z0-9][a-z0-9-]{1,62}", autocomplete: "off" });
  const description = h("textarea", { id: "ds-description", maxlength: "4096" });
  const inputs = fileInputs();
  const status = h("div", { id: "upload-status", "aria-live": "polite" });
  const form = h("form", { class: "stack card", id: "new-dataset", "aria-labelledby": "nd-h" },
    h("h2", { id: "nd-h" }, "New dataset"),
    field("Name", name, "2-63 lowercase letters, digits and '-'"), field("Description", description),
    inputs.map(([path, input, what]) => field(path, input, what)),
    h("div", {}, h("button", { type: "submit", class: "primary" }, "Create and upload")), status);
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    clear(status);
    try {
      await post(ws("/datasets"), { name: name.value.trim(), description: description.value });
    } catch (err) {
      status.append(errorBox(err));
      return;
    }
    status.append(h("div", {}, "dataset ", link(`#/datasets/${encodeURIComponent(name.value.trim())}`, name.value.trim()), " created"));
    if (await uploadAll(name.value.trim(), inputs, status)) status.append(h("div", { class: "notice", id: "upload-done" }, "all files stored"));
    await show(1);
  });
  main.append(box, form);
  await show(1);
}

export async function detail(main, [name]) {
  const d = await get(ws(`/datasets/${encodeURIComponent(name)}`));
  main.append(h("h1", {}, `Dataset ${d.name}`), h("p", { class: "description", id: "ds-desc" }, d.description || ""));
  const n = (d.files["training.jsonl"] || {}).records;
  main.append(h("section", { class: "card" }, facts([["folder", h("code", {}, d.uri)], ["created", fmt.time(d.created_at)],
    ["use it", link(`#/jobs/new?dataset=${encodeURIComponent(d.name)}`, "start a job on it")],
    n != null ? ["advice", n < 5000 ? `${fmt.int(n)} training examples: the model card suggests 5,000-10,000` : `${fmt.int(n)} training examples`] : null]),
  table([
    { label: "file", cell: ([p]) => p }, { label: "records", num: true, cell: ([, f]) => fmt.int(f.records) },
    { label: "size", num: true, cell: ([, f]) => fmt.bytes(f.bytes) }, { label: "sha256", cell: ([, f]) => h("code", {}, f.sha256.slice(0, 16)) },
    { label: "stored at", cell: ([, f]) => h("code", {}, f.uri) }], Object.entries(d.files))));
  if (Object.keys(d.uploading || {}).length) main.append(h("p", { class: "notice" }, `uploading now: ${Object.keys(d.uploading).join(", ")}`));
  const inputs = fileInputs();
  const status = h("div", { id: "upload-status", "aria-live": "polite" });
  const form = h("form", { class: "stack card", "aria-labelledby": "up-h" }, h("h2", { id: "up-h" }, "Upload files"),
    inputs.map(([path, input, what]) => field(path, input, what)), h("div", {}, h("button", { type: "submit", class: "primary" }, "Upload")), status);
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    clear(status);
    if (await uploadAll(d.name, inputs, status)) status.append(h("div", { class: "notice", id: "upload-done" }, "all files stored"));
  });
  main.append(form);
}
