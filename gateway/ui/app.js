// atelier's pages: plain DOM over the gateway's JSON API, same origin. The API key (when the
// gateway asks for one) lives in this tab's sessionStorage and goes out as a Bearer header;
// images are fetched with it and shown from blob URLs, job progress is read from the job's
// Server-Sent Events stream through fetch (EventSource cannot send headers).

const KEY = "atelier.key";
const TERMINAL = ["succeeded", "failed", "cancelled"];

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

/** An element: `h("p", {class: "x"}, "text", child)`; strings become text nodes. */
function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === false || v === null || v === undefined) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "text") el.textContent = v;
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c !== null && c !== undefined) el.append(c instanceof Node ? c : String(c));
  }
  return el;
}

async function api(path, opts = {}) {
  const headers = new Headers(opts.headers || {});
  const key = sessionStorage.getItem(KEY);
  if (key) headers.set("Authorization", `Bearer ${key}`);
  const init = { ...opts, headers };
  if (opts.json !== undefined) {
    headers.set("Content-Type", "application/json");
    init.body = JSON.stringify(opts.json);
    delete init.json;
  }
  const r = await fetch(path, init);
  if (r.ok) return r;
  let body = null;
  try {
    body = await r.json();
  } catch (_) {
    // Not JSON: the status says it.
  }
  const err = new ApiError(r.status, body?.error?.code, body?.error?.message || r.statusText);
  if (r.status === 401) openKeyDialog("This gateway needs an API key: " + err.message);
  throw err;
}

const json = async (path, opts) => (await api(path, opts)).json();

function banner(message) {
  const b = document.getElementById("banner");
  b.textContent = message || "";
  b.hidden = !message;
}

/** An artifact as a blob URL (fetched with the key). */
async function artifactUrl(key) {
  const r = await api("/v1/artifacts/" + key.split("/").map(encodeURIComponent).join("/"));
  return URL.createObjectURL(await r.blob());
}

/** Shows an API error beside the form field it names, else in the banner. */
function showError(form, err) {
  form.querySelectorAll(".error").forEach((e) => e.remove());
  const msg = err instanceof ApiError ? `${err.message} (${err.code || err.status})` : String(err);
  const named = [...form.querySelectorAll("[name]")].find((f) =>
    new RegExp(`(^|[^a-z_])${f.name}([^a-z_]|$)`).test(err.message || ""));
  if (named) {
    const e = h("p", { class: "error", role: "alert", id: `${named.id}-error` }, msg);
    named.setAttribute("aria-describedby", e.id);
    named.closest(".field, fieldset")?.append(e);
    named.focus();
  } else {
    banner(msg);
  }
}

// The key dialog.
function openKeyDialog(why) {
  const d = document.getElementById("key-dialog");
  if (why) banner(why);
  if (!d.open) d.showModal();
}

function setupKey() {
  const d = document.getElementById("key-dialog");
  document.getElementById("key-button").addEventListener("click", () => openKeyDialog());
  d.addEventListener("close", () => {
    const input = document.getElementById("key-input");
    if (d.returnValue === "save" && input.value.trim()) sessionStorage.setItem(KEY, input.value.trim());
    if (d.returnValue === "clear") sessionStorage.removeItem(KEY);
    input.value = "";
    banner("");
    route();
  });
}

// Job events: the record each time it changes, until it ends.
async function follow(id, onRecord, signal) {
  const r = await api(`/v1/jobs/${id}/events`, { headers: { Accept: "text/event-stream" }, signal });
  const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += value;
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const block = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      const event = /^event: (.*)$/m.exec(block)?.[1];
      const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
      if (event === "job" && data) {
        const rec = JSON.parse(data);
        onRecord(rec);
        if (TERMINAL.includes(rec.state)) return;
      } else if (event === "error") {
        throw new Error(data);
      }
    }
  }
}

// Generate.
const GEN_FIELDS = [
  ["steps", "Steps", "number", 20, { min: 1, max: 150 }],
  ["cfg_scale", "CFG scale", "number", 7, { min: 0, max: 30, step: 0.5 }],
  ["seed", "Seed (-1: random)", "number", -1, { min: -1, step: 1 }],
  ["width", "Width", "number", 512, { min: 8, max: 4096 }],
  ["height", "Height", "number", 512, { min: 8, max: 4096 }],
  ["batch_size", "Batch", "number", 1, { min: 1, max: 8 }],
];

function field(name, label, input) {
  input.id = `f-${name}`;
  input.name = name;
  return h("div", { class: "field" }, h("label", { for: input.id }, label), input);
}

async function generatePage(main) {
  const [models, samplers, loras] = await Promise.all([
    json("/sdapi/v1/sd-models"),
    json("/sdapi/v1/samplers"),
    json("/sdapi/v1/loras").catch(() => []),
  ]);
  const form = h("form", { "aria-label": "Generate" });
  form.append(
    field("prompt", "Prompt", h("textarea", { required: true })),
    field("negative_prompt", "Negative prompt", h("textarea")),
    field("model", "Model", h("select", {}, models.map((m) => h("option", { value: m.model_name }, m.title)))),
    field("sampler", "Sampler", h("select", {}, samplers.map((s) => h("option", { value: s.name }, s.name)))),
    h("div", { class: "grid" }, GEN_FIELDS.map(([n, l, t, v, a]) => field(n, l, h("input", { type: t, value: v, ...a })))),
  );
  if (loras.length) {
    form.append(h("fieldset", {}, h("legend", {}, "LoRAs"), loras.map((l, i) => h("div", { class: "lora" },
      h("label", {}, h("input", { type: "checkbox", name: `lora-${i}`, "data-lora": l.name }), l.alias || l.name),
      h("input", { type: "number", value: 1, step: 0.05, "aria-label": `${l.name} weight`, "data-weight": l.name }),
    ))));
  }
  const submit = h("button", { type: "submit" }, "Generate");
  const cancel = h("button", { type: "button", class: "secondary", disabled: true }, "Cancel");
  form.append(h("div", { class: "row" }, submit, cancel));

  const status = h("p", { class: "muted", "aria-live": "polite", id: "gen-status" });
  const bar = h("progress", { max: 1, value: 0, "aria-label": "Progress", hidden: true });
  const preview = h("img", { class: "preview", alt: "Live preview", hidden: true });
  const results = h("div", { class: "results", id: "results" });
  main.append(h("h1", {}, "Generate"), h("div", { class: "split" }, form, h("section", { "aria-label": "Result" }, status, bar, preview, results)));

  let running = null;
  const spec = () => {
    const v = (n) => form.elements[n].value;
    let prompt = v("prompt");
    form.querySelectorAll("[data-lora]").forEach((c) => {
      if (c.checked) prompt += ` <lora:${c.dataset.lora}:${form.querySelector(`[data-weight="${c.dataset.lora}"]`).value}>`;
    });
    const seed = Number(v("seed"));
    return {
      model: v("model"), prompt, negative_prompt: v("negative_prompt"), sampler: v("sampler"),
      steps: Number(v("steps")), cfg_scale: Number(v("cfg_scale")), seed: seed < 0 ? undefined : seed,
      width: Number(v("width")), height: Number(v("height")), batch_size: Number(v("batch_size")),
      preview_every: 2,
    };
  };
  const reuse = (s, seed) => {
    const lora = /\s*<lora:([^:>]+):([^>]+)>/g;
    form.elements.prompt.value = s.prompt.replace(lora, "");
    form.querySelectorAll("[data-lora]").forEach((c) => { c.checked = false; });
    for (const [, name, w] of s.prompt.matchAll(lora)) {
      const c = form.querySelector(`[data-lora="${name}"]`);
      if (c) { c.checked = true; form.querySelector(`[data-weight="${name}"]`).value = w; }
    }
    for (const n of ["negative_prompt", "model", "sampler", "steps", "cfg_scale", "width", "height", "batch_size"]) {
      form.elements[n].value = s[n];
    }
    form.elements.seed.value = seed;
    form.elements.prompt.focus();
  };
  const show = async (rec) => {
    const p = rec.progress;
    const place = rec.queue ? ` — ${rec.queue.position} ahead${rec.queue.eta_s != null ? `, about ${Math.ceil(rec.queue.eta_s)} s` : ""}` : "";
    status.textContent = `${rec.state}${place}${p?.message ? ` — ${p.message}` : ""}`;
    bar.hidden = false;
    bar.value = rec.state === "succeeded" ? 1 : p?.fraction ?? 0;
    if (p?.preview && rec.state === "running") {
      preview.src = await artifactUrl(p.preview);
      preview.hidden = false;
    }
    if (rec.state === "failed") status.textContent = `failed: ${rec.error?.message} (${rec.error?.code})`;
    if (rec.state !== "succeeded" || rec.output?.kind !== "images") return;
    preview.hidden = true;
    results.replaceChildren();
    for (const img of rec.output.images) {
      const url = await artifactUrl(img.image.key);
      const again = h("button", { type: "button", class: "secondary", onclick: () => reuse(rec.spec, img.seed) }, "Reuse these settings");
      const pic = h("img", { src: url, alt: `Generated image, seed ${img.seed}` });
      pic.addEventListener("load", () => pic.classList.toggle("small", pic.naturalWidth < 192));
      results.append(h("figure", {}, pic,
        h("figcaption", {}, `seed ${img.seed}\n${rec.output.parameters}`), again));
    }
  };
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    banner("");
    form.querySelectorAll(".error").forEach((x) => x.remove());
    submit.disabled = true;
    try {
      const rec = await json("/v1/txt2img", { method: "POST", json: spec() });
      running = { id: rec.id, abort: new AbortController() };
      cancel.disabled = false;
      results.replaceChildren();
      await show(rec);
      await follow(rec.id, show, running.abort.signal);
    } catch (err) {
      if (err.name !== "AbortError") showError(form, err);
    } finally {
      submit.disabled = false;
      cancel.disabled = true;
      running = null;
    }
  });
  cancel.addEventListener("click", async () => {
    if (!running) return;
    try {
      await api(`/v1/jobs/${running.id}`, { method: "DELETE" });
    } catch (err) {
      banner(err.message);
    }
  });
}

// Jobs.
async function jobsPage(main) {
  const form = h("form", { class: "row", "aria-label": "Filter jobs" },
    field("kind", "Kind", h("input", { placeholder: "txt2img, train, …" })),
    field("state", "State", h("select", {}, ["", "queued", "running", "succeeded", "failed", "cancelled"].map((s) => h("option", { value: s }, s || "any")))),
    h("div", { class: "field" }, h("button", { type: "submit" }, "Show")));
  const body = h("tbody");
  const more = h("button", { type: "button", class: "secondary", hidden: true }, "More");
  main.append(h("h1", {}, "Jobs"), form,
    h("table", {}, h("thead", {}, h("tr", {}, ["Job", "Kind", "State", "Progress", "Owner", "Submitted", ""].map((c, i) => h("th", { class: i === 4 || i === 5 ? "wide" : false, scope: "col" }, c)))), body),
    more);
  let cursor = null;
  const load = async (append) => {
    const q = new URLSearchParams({ limit: "50" });
    if (form.elements.kind.value) q.set("kind", form.elements.kind.value.trim());
    if (form.elements.state.value) q.set("state", form.elements.state.value);
    if (append && cursor) q.set("cursor", cursor);
    const page = await json(`/v1/jobs?${q}`);
    if (!append) body.replaceChildren();
    for (const j of page.jobs) body.append(jobRow(j));
    cursor = page.next_cursor;
    more.hidden = !cursor;
  };
  form.addEventListener("submit", (e) => { e.preventDefault(); load(false).catch((err) => showError(form, err)); });
  more.addEventListener("click", () => load(true).catch((err) => banner(err.message)));
  await load(false);
  const timer = setInterval(() => {
    if (!main.isConnected) return clearInterval(timer);
    if (!cursor) load(false).catch(() => {});
  }, 3000);
}

function jobRow(j) {
  const p = j.progress;
  const progress = j.state === "failed" ? `${j.error?.code}: ${j.error?.message}`
    : j.state === "running" ? `${Math.round((p?.fraction ?? 0) * 100)} %${p?.message ? ` — ${p.message}` : ""}`
    : j.state === "queued" ? "waiting" : "";
  const cancel = TERMINAL.includes(j.state) ? "" : h("button", {
    type: "button", class: "secondary", "aria-label": `Cancel job ${j.id}`,
    onclick: async (e) => {
      e.target.disabled = true;
      try { await api(`/v1/jobs/${j.id}`, { method: "DELETE" }); } catch (err) { banner(err.message); }
    },
  }, "Cancel");
  return h("tr", { "data-job": j.id },
    h("td", { class: "mono" }, j.id), h("td", {}, j.kind),
    h("td", { class: `state-${j.state}` }, j.state), h("td", {}, progress),
    h("td", { class: "wide" }, j.submitted_by || ""), h("td", { class: "wide" }, new Date(j.created_at).toLocaleString()),
    h("td", {}, cancel));
}

// Datasets.
async function datasetsPage(main) {
  const list = await json("/v1/datasets");
  main.append(h("h1", {}, "Datasets"));
  if (!list.length) {
    main.append(h("p", { class: "muted" }, "No datasets yet: announce images (POST /v1/images) and filter them."));
    return;
  }
  const rows = list.map((d) => {
    const m = d.latest;
    const c = m.counts || {};
    return h("tr", {},
      h("td", {}, d.dataset), h("td", {}, d.versions.join(", ")),
      h("td", {}, `v${m.version}${m.parent ? ` ← v${m.parent}` : ""}`),
      h("td", {}, `${c.rows ?? "?"} rows, ${c.accepted ?? "?"} kept, ${c.flagged ?? 0} flagged, ${c.rejected ?? 0} dropped`),
      h("td", { class: "wide" }, new Date(m.created_at).toLocaleString()));
  });
  main.append(h("table", {}, h("thead", {}, h("tr", {}, ["Dataset", "Versions", "Latest (lineage)", "Counts", "Written"].map((c, i) => h("th", { scope: "col", class: i === 4 ? "wide" : false }, c)))), h("tbody", {}, rows)));
}

const PAGES = { generate: generatePage, jobs: jobsPage, datasets: datasetsPage };

async function route() {
  const name = (location.hash.replace(/^#\//, "") || "generate").split("/")[0];
  const page = PAGES[name] ? name : "generate";
  document.querySelectorAll("nav a").forEach((a) => {
    if (a.dataset.page === page) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  });
  const main = document.getElementById("page");
  main.replaceChildren();
  document.title = `atelier — ${page}`;
  try {
    await PAGES[page](main);
  } catch (err) {
    banner(err.message);
  }
  main.focus();
}

setupKey();
window.addEventListener("hashchange", route);
route();
