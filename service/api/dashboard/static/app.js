// The dashboard: the public API with the user's key (kept for this tab only, in
// sessionStorage). Every value reaches the page through textContent or attributes set by the
// DOM API, never through HTML strings, so nothing a user uploaded or named can run here.

const KEY = "apoptosis-key";
const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const main = document.getElementById("main");
const status = document.getElementById("status");
let streams = []; // the event streams of the current view, closed when it changes

// --- the API -----------------------------------------------------------------------------

async function api(path, options = {}) {
  const headers = { Authorization: `Bearer ${sessionStorage.getItem(KEY)}`, ...(options.headers || {}) };
  const response = await fetch(path, { ...options, headers });
  if (response.status === 401) {
    logout("That API key was not accepted.");
    throw new Error("unauthorized");
  }
  if (!response.ok) {
    let detail = response.statusText;
    try { const problem = await response.json(); detail = `${problem.code}: ${problem.detail}`; } catch { /* not JSON */ }
    throw new Error(detail);
  }
  return response;
}

const json = async (path, options) => (await api(path, options)).json();

// A job's Server-Sent Events. EventSource cannot send an Authorization header, so the stream
// is read with fetch and split into events here (the SSE framing: blank-line separated
// blocks of `field: value` lines).
function follow(jobId, onEvent) {
  const controller = new AbortController();
  streams.push(controller);
  (async () => {
    const response = await api(`/v1/jobs/${encodeURIComponent(jobId)}/events`, { signal: controller.signal });
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value.replace(/\r\n?/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        let kind = "message"; const data = [];
        for (const line of block.split("\n")) {
          const colon = line.indexOf(":");
          if (colon <= 0) continue; // comments (keep-alive pings) and blank fields
          const field = line.slice(0, colon); const text = line.slice(colon + 1).replace(/^ /, "");
          if (field === "event") kind = text;
          if (field === "data") data.push(text);
        }
        if (data.length) onEvent(kind, JSON.parse(data.join("\n")));
      }
    }
  })().catch((error) => { if (error.name !== "AbortError") say(`Live updates stopped: ${error.message}`); });
}

// --- building the page -------------------------------------------------------------------

function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (value !== false && value !== null && value !== undefined) node.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children.flat()) node.append(child instanceof Node ? child : String(child ?? ""));
  return node;
}

function say(message) { status.textContent = message; }

function table(headings, rows) {
  return el("table", {}, el("thead", {}, el("tr", {}, headings.map((h) => el("th", { scope: "col" }, h)))),
    el("tbody", {}, rows.map((cells) => el("tr", {}, cells.map((c) => (c instanceof Node && c.tagName === "TD" ? c : el("td", {}, c)))))));
}

const number = (value, digits = 4) => el("td", { class: "number" }, typeof value === "number" ? Number(value.toPrecision(digits)).toLocaleString("en") : "");

function field(label, input) {
  const id = `f-${label.replace(/\W+/g, "-").toLowerCase()}`;
  input.id = id;
  return [el("label", { for: id }, label), input];
}

function progressBar(job) {
  const percent = job.state === "succeeded" ? 100 : Number(job.progress?.percent || 0);
  return el("progress", { max: 100, value: percent, "aria-label": `job ${job.id} progress`, "data-job": job.id }, `${percent}%`);
}

function show(...nodes) {
  streams.forEach((controller) => controller.abort());
  streams = [];
  say("");
  main.replaceChildren(...nodes);
  main.focus();
}

// --- views -------------------------------------------------------------------------------

function loginView() {
  document.getElementById("nav").hidden = true;
  const key = el("input", { type: "password", autocomplete: "off", required: true });
  show(el("h1", {}, "Log in"),
    el("form", { onsubmit: (event) => { event.preventDefault(); sessionStorage.setItem(KEY, key.value.trim()); route(); } },
      field("API key", key), el("button", { type: "submit" }, "Log in")));
}

// "macs 0.5", a family's "macs 0.7 → 0.4", "latency_ms 20 at batch 8" (as the CLI says it)
function targetWords(spec) {
  const targets = spec?.targets || (spec?.target ? [spec.target] : []);
  if (!targets.length) return "";
  const last = targets[targets.length - 1];
  const metric = ["macs", "params", "sparsity", "latency_ms"].find((m) => last[m] != null);
  const batch = last.batch > 1 ? ` at batch ${last.batch}` : "";
  return `${metric} ${targets.map((t) => t[metric]).join(" → ")}${batch}`;
}

async function jobsView() {
  const page = await json("/v1/jobs?limit=50");
  const rows = page.items.map((job) => [
    el("td", {}, el("a", { href: `#/jobs/${job.id}` }, job.id)),
    el("td", { class: `state-${job.state}`, "data-state": job.id }, job.state),
    el("td", {}, progressBar(job)),
    targetWords(job.spec),
    job.created_at,
  ]);
  show(el("h1", {}, "Jobs"), page.items.length ? table(["job", "state", "progress", "target", "created"], rows)
    : el("p", {}, "No jobs yet: ", el("a", { href: "#/upload" }, "upload a model"), " and start one."));
  for (const job of page.items.filter((j) => !TERMINAL.has(j.state))) {
    follow(job.id, (kind, data) => {
      const bar = main.querySelector(`progress[data-job="${CSS.escape(job.id)}"]`);
      const cell = main.querySelector(`[data-state="${CSS.escape(job.id)}"]`);
      if (kind === "progress" && bar) bar.value = data.percent ?? bar.value;
      if (kind === "state" && cell) {
        cell.textContent = data.state; cell.className = `state-${data.state}`;
        if (data.state === "succeeded" && bar) bar.value = 100;
      }
    });
  }
}

async function jobView(jobId) {
  const job = await json(`/v1/jobs/${encodeURIComponent(jobId)}`);
  const state = el("span", { class: `state-${job.state}`, id: "job-state" }, job.state);
  const bar = progressBar(job);
  const stage = el("span", { id: "job-stage" }, job.progress?.stage || "");
  const details = el("div", { id: "job-details" });
  const cancel = el("button", { type: "button", onclick: async () => {
    try { await api(`/v1/jobs/${encodeURIComponent(job.id)}/cancel`, { method: "POST" }); say("Cancel requested."); } catch (error) { say(error.message); }
  } }, "Cancel job");
  cancel.hidden = TERMINAL.has(job.state);
  show(el("h1", {}, `Job ${job.id}`), el("p", {}, "State: ", state, " ", bar, " ", stage, " ", cancel), details);
  const fill = async () => details.replaceChildren(...(await jobDetails(job.id)));
  await fill();
  if (TERMINAL.has(job.state)) return;
  follow(job.id, (kind, data) => {
    if (kind === "progress") {
      bar.value = data.percent ?? bar.value;
      // a search names its candidate: "searching 2/4"
      stage.textContent = (data.stage || "") + (data.candidate ? ` ${data.candidate}/${data.candidates}` : "");
    }
    if (kind === "state") {
      state.textContent = data.state; state.className = `state-${data.state}`;
      if (TERMINAL.has(data.state)) {
        cancel.hidden = true;
        if (data.state === "succeeded") { bar.value = 100; stage.textContent = "done"; }
        fill();
      }
    }
  });
}

// What people ask first of a job: its target and how it prunes; the rest is in the JSON
function specSummary(spec) {
  const rows = [
    ["target", targetWords(spec)],
    ["method", spec.method],
    ["granularity", spec.granularity],
    ["steps", spec.schedule?.steps],
    ["loss", spec.loss],
    ["outputs", (spec.outputs || []).join(", ")],
    ["fine-tuning", spec.finetune?.epochs ? `${spec.finetune.epochs} epochs` : "none"],
  ].filter(([, value]) => value !== undefined && value !== null && value !== "");
  return el("dl", { class: "spec" }, rows.flatMap(([name, value]) => [el("dt", {}, name), el("dd", {}, String(value))]));
}

async function jobDetails(jobId) {
  const job = await json(`/v1/jobs/${encodeURIComponent(jobId)}`);
  const parts = [el("h2", {}, "Spec"), specSummary(job.spec),
    el("details", {}, el("summary", {}, "Spec as JSON"), el("pre", {}, JSON.stringify(job.spec, null, 2)))];
  if (job.error) parts.push(el("h2", {}, "Error"), el("p", {}, `${job.error.code}: ${job.error.message}`));
  const result = job.result;
  if (!result) return parts;
  const stages = ["before", "after_pruning", "after_finetune"];
  const metrics = ["loss", "accuracy", "latency_ms"].filter((m) => result.before && m in result.before);
  parts.push(el("h2", {}, "Before and after"), table(["", "before", "after pruning", "after fine-tuning"], [
    ["MACs", number(result.macs_before, 12), number(result.macs_after, 12), ""],
    ["params", number(result.params_before, 12), number(result.params_after, 12), ""],
    ...metrics.map((m) => [m, ...stages.map((s) => number(result[s]?.[m]))]),
  ]));
  if (result.steps?.length) {
    parts.push(el("h2", {}, "Pruning steps"), table(["step", "MACs", "params", "loss"],
      result.steps.map((s) => [number(s.step), number(s.macs, 12), number(s.params, 12), number(s.loss)])));
  }
  const widths = Object.entries(result.widths || {});
  if (widths.length) parts.push(el("h2", {}, "Widths per layer"), table(["layer", "width"], widths.map(([k, v]) => [k, number(v)])));
  const artifacts = await json(`/v1/jobs/${encodeURIComponent(jobId)}/artifacts`);
  parts.push(el("h2", {}, "Artifacts"), table(["file", "format", "bytes", ""], artifacts.map((a) => [
    a.filename, a.format, number(a.size, 15),
    el("td", {}, el("button", { type: "button", onclick: () => download(a) }, `Download ${a.filename}`)),
  ])));
  const report = await (await api(`/v1/jobs/${encodeURIComponent(jobId)}/report?format=html`)).text();
  parts.push(el("h2", {}, "Report"), el("iframe", { class: "report", title: "job report", sandbox: "", srcdoc: report }));
  return parts;
}

async function download(artifact) {
  try {
    const blob = await (await api(`/v1/artifacts/${encodeURIComponent(artifact.id)}/content`)).blob();
    const link = el("a", { href: URL.createObjectURL(blob), download: artifact.filename });
    document.body.append(link); link.click(); link.remove();
    setTimeout(() => URL.revokeObjectURL(link.href), 10_000);
  } catch (error) { say(error.message); }
}

function guessFormat(name, kind) {
  const lower = name.toLowerCase();
  if (kind === "model") return /\.(pt|pth|pkl)$/.test(lower) ? "torch_pickle" : "hf";
  if (lower.endsWith(".jsonl")) return "jsonl";
  if (lower.endsWith(".zip")) return "imagefolder";
  return "tensors";
}

function uploadForm(kind, formats) {
  const file = el("input", { type: "file", required: true });
  const format = el("select", {}, el("option", { value: "" }, "from the file name"), formats.map((f) => el("option", { value: f }, f)));
  const name = el("input", { type: "text", maxlength: 200 });
  const submit = async (event) => {
    event.preventDefault();
    const chosen = file.files[0];
    const body = new FormData();
    body.append("format", format.value || guessFormat(chosen.name, kind));
    if (name.value) body.append("name", name.value);
    body.append("file", chosen);
    say(`Uploading ${chosen.name}…`);
    try {
      let row = await json(`/v1/${kind}s`, { method: "POST", body });
      while (row.state === "validating") { // a model is checked by a worker before jobs may use it
        say(`${chosen.name} uploaded; validating…`);
        await new Promise((resolve) => setTimeout(resolve, 500));
        row = await json(`/v1/models/${row.id}`);
      }
      say(row.state === "rejected" ? `${chosen.name} was rejected: ${row.rejection_reason}` : `${chosen.name} is ${row.state || "stored"} (${row.id}).`);
    } catch (error) { say(`${chosen.name}: ${error.message}`); }
  };
  return el("form", { onsubmit: submit, "aria-label": `upload a ${kind}` },
    field(`${kind === "model" ? "Model" : "Dataset"} file`, file), field(`${kind === "model" ? "Model" : "Dataset"} format`, format),
    field(`${kind === "model" ? "Model" : "Dataset"} name`, name), el("button", { type: "submit" }, `Upload ${kind}`));
}

function uploadView() {
  show(el("h1", {}, "Upload"), el("h2", {}, "Model"), uploadForm("model", ["hf", "torch_pickle"]),
    el("h2", {}, "Dataset"), uploadForm("dataset", ["tensors", "jsonl", "imagefolder"]));
}

async function newJobView() {
  const [models, datasets, openapi] = await Promise.all([json("/v1/models?limit=200"), json("/v1/datasets?limit=200"), json("/openapi.json")]);
  // the scorers this service knows, plugins' included: the API document lists them
  const methods = openapi.components.schemas.JobSpec.properties.method.enum;
  const options = (rows) => rows.map((r) => el("option", { value: r.id }, `${r.name} (${r.id.slice(0, 8)})`));
  const model = el("select", { required: true }, options(models.items.filter((m) => m.state === "ready")));
  const dataset = el("select", { required: true }, options(datasets.items));
  const method = el("select", {}, methods.map((m) => el("option", { value: m }, m)));
  const metric = el("select", {}, ["macs", "params", "sparsity"].map((m) => el("option", { value: m }, m)));
  const value = el("input", { type: "number", min: 0.01, max: 0.99, step: 0.01, value: 0.5, required: true });
  const granularity = el("select", {}, ["channel", "layer", "unstructured", "2:4"].map((g) => el("option", { value: g }, g)));
  const steps = el("input", { type: "number", min: 1, max: 500, value: 10, required: true });
  const batches = el("input", { type: "number", min: 1, max: 10000, value: 8, required: true });
  const batchSize = el("input", { type: "number", min: 1, max: 4096, value: 32, required: true });
  const epochs = el("input", { type: "number", min: 0, max: 100, value: 0 });
  const outputs = ["hf", "safetensors", "onnx", "pt2"].map((f) => el("input", { type: "checkbox", value: f, checked: f === "hf" }));
  const submit = async (event) => {
    event.preventDefault();
    const spec = {
      model_id: model.value, dataset_id: dataset.value, method: method.value, granularity: granularity.value,
      target: { [metric.value]: Number(value.value) }, schedule: { steps: Number(steps.value) },
      calibration: { batches: Number(batches.value), batch_size: Number(batchSize.value) },
      outputs: outputs.filter((o) => o.checked).map((o) => o.value),
    };
    if (Number(epochs.value) > 0) spec.finetune = { epochs: Number(epochs.value) };
    try {
      const job = await json("/v1/jobs", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(spec) });
      location.hash = `#/jobs/${job.id}`;
    } catch (error) { say(error.message); }
  };
  show(el("h1", {}, "New job"), el("form", { onsubmit: submit, "aria-label": "new job" },
    field("Model", model), field("Dataset", dataset), field("Method", method), field("Granularity", granularity),
    field("Target metric", metric), field("Target fraction kept", value), field("Steps", steps),
    field("Calibration batches", batches), field("Batch size", batchSize), field("Fine-tuning epochs", epochs),
    el("fieldset", {}, el("legend", {}, "Outputs"), outputs.map((o) => { o.id = `out-${o.value}`; return el("label", { for: o.id }, o, ` ${o.value} `); })),
    el("button", { type: "submit" }, "Start job")));
}

// --- routing -----------------------------------------------------------------------------

function logout(message = "") {
  sessionStorage.removeItem(KEY);
  loginView();
  say(message);
}

async function route() {
  if (!sessionStorage.getItem(KEY)) return loginView();
  document.getElementById("nav").hidden = false;
  const [, view, id] = location.hash.split("/");
  try {
    if (view === "jobs" && id) await jobView(decodeURIComponent(id));
    else if (view === "upload") uploadView();
    else if (view === "new-job") await newJobView();
    else await jobsView();
  } catch (error) { if (error.message !== "unauthorized") say(error.message); }
}

document.getElementById("logout").addEventListener("click", () => logout());
window.addEventListener("hashchange", route);
route();
