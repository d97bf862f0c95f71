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
  const mode = h("select", {}, [["txt2img", "text → image"], ["img2img", "image → image"], ["inpaint", "inpaint (paint the mask)"]].map(([v, l]) => h("option", { value: v }, l)));
  const source = sourceImage();
  form.append(
    field("mode", "Mode", mode),
    source.section,
    field("prompt", "Prompt", h("textarea", { required: true })),
    field("negative_prompt", "Negative prompt", h("textarea")),
    field("model", "Model", h("select", {}, models.map((m) => h("option", { value: m.model_name }, m.title)))),
    field("sampler", "Sampler", h("select", {}, samplers.map((s) => h("option", { value: s.name }, s.name)))),
    h("div", { class: "grid" }, GEN_FIELDS.map(([n, l, t, v, a]) => field(n, l, h("input", { type: t, value: v, ...a })))),
  );
  // FLUX and SD 3 (flow matching): Euler, FLUX-dev's embedded guidance, T5's prompt length.
  const flowFields = h("div", { class: "grid", hidden: true, id: "flow-fields" },
    field("guidance", "Guidance (FLUX)", h("input", { type: "number", value: 3.5, min: 0, max: 30, step: 0.5 })),
    field("max_sequence_length", "T5 tokens", h("input", { type: "number", value: 256, min: 1, max: 512 })));
  form.append(flowFields);
  const familyOf = (name) => models.find((m) => m.model_name === name)?.family || "unet";
  const onModel = () => {
    const fam = familyOf(form.elements.model.value);
    const flow = fam === "flux" || fam === "sd3";
    flowFields.hidden = !flow;
    form.elements.guidance.closest(".field").hidden = fam !== "flux";
    if (flow && [...form.elements.sampler.options].some((o) => o.value === "Euler")) form.elements.sampler.value = "Euler";
  };
  form.elements.model.addEventListener("change", onModel);
  onModel();
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
  const showMode = () => source.show(mode.value);
  mode.addEventListener("change", showMode);
  showMode();
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
      ...source.fields(),
      ...(flowFields.hidden ? {} : {
        max_sequence_length: Number(v("max_sequence_length")),
        ...(familyOf(v("model")) === "flux" ? { guidance: Number(v("guidance")) } : {}),
      }),
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
    onModel();
    for (const n of ["guidance", "max_sequence_length"]) if (s[n] != null) form.elements[n].value = s[n];
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
      await source.upload(mode.value);
      const rec = await json(`/v1/${mode.value}`, { method: "POST", json: spec() });
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

/** img2img and inpainting's starting image, and the mask painted over it (white repaints). */
function sourceImage() {
  const file = h("input", { type: "file", accept: "image/*" });
  const strength = h("input", { type: "number", value: 0.75, min: 0, max: 1, step: 0.05 });
  const brush = h("input", { type: "range", min: 2, max: 64, value: 16 });
  const blur = h("input", { type: "number", value: 4, min: 0, max: 64 });
  const base = h("canvas", { class: "base", "aria-hidden": "true" });
  const mask = h("canvas", { class: "mask", role: "img", "aria-label": "Mask: paint over the image with the pointer; white is repainted" });
  const stack = h("div", { class: "paint", hidden: true }, base, mask);
  const whole = h("button", { type: "button", class: "secondary" }, "Mask everything");
  const clear = h("button", { type: "button", class: "secondary" }, "Clear the mask");
  const maskTools = h("div", { class: "row mask-tools" }, field("brush", "Brush", brush), field("mask_blur", "Mask blur", blur), whole, clear);
  const section = h("fieldset", { class: "source" }, h("legend", {}, "Starting image"),
    field("init_image", "Image", file), field("strength", "Denoising strength", strength), stack, maskTools);
  let keys = { init_image: null, mask: null };
  let painting = false;
  const ctx = () => mask.getContext("2d");
  file.addEventListener("change", async () => {
    keys = { init_image: null, mask: null };
    if (!file.files[0]) return;
    const bmp = await createImageBitmap(file.files[0]);
    for (const c of [base, mask]) { c.width = bmp.width; c.height = bmp.height; }
    base.getContext("2d").drawImage(bmp, 0, 0);
    stack.hidden = false;
  });
  const at = (e) => {
    const r = mask.getBoundingClientRect();
    return [((e.clientX - r.left) * mask.width) / r.width, ((e.clientY - r.top) * mask.height) / r.height];
  };
  const dab = (e) => {
    const c = ctx();
    const [x, y] = at(e);
    c.fillStyle = "#fff";
    c.beginPath();
    c.arc(x, y, (Number(brush.value) * mask.width) / mask.getBoundingClientRect().width / 2, 0, 2 * Math.PI);
    c.fill();
    keys.mask = null;
  };
  mask.addEventListener("pointerdown", (e) => { painting = true; mask.setPointerCapture(e.pointerId); dab(e); });
  mask.addEventListener("pointermove", (e) => { if (painting) dab(e); });
  mask.addEventListener("pointerup", () => { painting = false; });
  whole.addEventListener("click", () => { ctx().fillStyle = "#fff"; ctx().fillRect(0, 0, mask.width, mask.height); keys.mask = null; });
  clear.addEventListener("click", () => { ctx().clearRect(0, 0, mask.width, mask.height); keys.mask = null; });
  const put = async (blob) => (await json("/v1/uploads", { method: "POST", body: blob, headers: { "Content-Type": blob.type || "application/octet-stream" } })).artifact.key;
  return {
    section,
    show(m) {
      section.hidden = m === "txt2img";
      maskTools.hidden = m !== "inpaint";
      mask.hidden = m !== "inpaint";
    },
    /** Uploads the image (and for inpainting the mask: white strokes on black) once. */
    async upload(m) {
      this.mode = m;
      if (m === "txt2img") return;
      if (!file.files[0]) throw new ApiError(422, "invalid_job", "init_image: choose a starting image");
      keys.init_image ??= await put(file.files[0]);
      if (m === "inpaint" && !keys.mask) {
        const out = h("canvas", { width: mask.width, height: mask.height });
        const c = out.getContext("2d");
        c.fillStyle = "#000";
        c.fillRect(0, 0, out.width, out.height);
        c.drawImage(mask, 0, 0);
        keys.mask = await put(await new Promise((ok) => out.toBlob(ok, "image/png")));
      }
    },
    fields() {
      if (!this.mode || this.mode === "txt2img") return {};
      const f = { init_image: keys.init_image, strength: Number(strength.value) };
      if (this.mode === "inpaint") Object.assign(f, { mask: keys.mask, mask_blur: Number(blur.value) });
      return f;
    },
  };
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
    // Not while someone is on a row's button (a refresh would take their focus away).
    if (!cursor && !body.contains(document.activeElement)) load(false).catch(() => {});
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
  const progressCell = h("td", {}, progress);
  // A queued job's place: the listing leaves it out (one queue search per job), its record has it.
  if (j.state === "queued") {
    json(`/v1/jobs/${j.id}`).then((r) => {
      if (r.queue) progressCell.textContent = `waiting: ${r.queue.position} ahead${r.queue.eta_s != null ? `, about ${Math.ceil(r.queue.eta_s)} s` : ""}`;
    }).catch(() => {});
  }
  return h("tr", { "data-job": j.id },
    h("td", { class: "mono" }, j.id), h("td", {}, j.kind),
    h("td", { class: `state-${j.state}` }, j.state), progressCell,
    h("td", { class: "wide" }, j.submitted_by || ""), h("td", { class: "wide" }, new Date(j.created_at).toLocaleString()),
    h("td", {}, cancel));
}

// Datasets: the list, then one dataset's versions, gallery and comparison.
async function datasetsPage(main, args) {
  if (args[0]) return datasetPage(main, decodeURIComponent(args[0]), args[1]);
  const list = await json("/v1/datasets");
  main.append(h("h1", {}, "Datasets"));
  if (!list.length) {
    main.append(h("p", { class: "muted" }, "No datasets yet: announce images (POST /v1/images) and filter them."));
    return;
  }
  const rows = list.map((d) => {
    const m = d.latest;
    const c = m.counts;
    return h("tr", {},
      h("td", {}, h("a", { href: `#/datasets/${encodeURIComponent(d.dataset)}` }, d.dataset)),
      h("td", {}, d.versions.join(", ")),
      h("td", {}, `v${m.version}${m.parent ? ` ← v${m.parent}` : ""}`),
      h("td", {}, counts(c)),
      h("td", { class: "wide" }, new Date(m.created_at).toLocaleString()));
  });
  main.append(h("table", {}, h("thead", {}, h("tr", {}, ["Dataset", "Versions", "Latest (lineage)", "Counts", "Written"].map((c, i) => h("th", { scope: "col", class: i === 4 ? "wide" : false }, c)))), h("tbody", {}, rows)));
}

const counts = (c) => `${c.rows} rows: ${c.accepted} kept, ${c.flagged} flagged, ${c.rejected} dropped`;

async function datasetPage(main, name, wanted) {
  const summary = (await json("/v1/datasets")).find((d) => d.dataset === name);
  if (!summary) throw new Error(`no dataset ${name}`);
  const version = wanted || String(summary.latest.version);
  const m = await json(`/v1/datasets/${encodeURIComponent(name)}/versions/${version}`);
  const pick = h("select", { onchange: (e) => { location.hash = `#/datasets/${encodeURIComponent(name)}/${e.target.value}`; } },
    summary.versions.map((v) => h("option", { value: v, selected: String(v) === version }, `v${v}`)));
  const other = h("select", {}, h("option", { value: "" }, "—"), summary.versions.filter((v) => String(v) !== version).map((v) => h("option", { value: v }, `v${v}`)));
  const compared = h("div", { id: "compare" });
  other.addEventListener("change", async () => {
    compared.replaceChildren();
    if (!other.value) return;
    const o = await json(`/v1/datasets/${encodeURIComponent(name)}/versions/${other.value}`);
    compared.append(compareTable(m, o));
    await changedRows(compared, name, m.version, o.version);
  });
  main.append(
    h("h1", {}, name),
    h("div", { class: "row" }, field("version", "Version", pick), field("compare", "Compare with", other)),
    h("p", {}, `v${m.version}${m.parent ? `, made from v${m.parent}` : ""} on ${new Date(m.created_at).toLocaleString()}${m.note ? ` — ${m.note}` : ""}`),
    h("p", { class: "muted" }, `${counts(m.counts)}. Tiers: ${fmtMap(m.counts.tiers)}. Splits: ${fmtMap(m.counts.splits)}. Signals: ${fmtMap(m.counts.signals) || "none"}.`),
    compared,
    indexButton(name, m.version),
  );
  await gallery(main, name, m.version);
}

/** Builds (or refreshes) the version's search index: an index job, followed to its end. */
function indexButton(name, version) {
  const out = h("span", { class: "muted", "aria-live": "polite" });
  const b = h("button", { type: "button", class: "secondary" }, "Index for search");
  b.addEventListener("click", async () => {
    b.disabled = true;
    try {
      const rec = await json(`/v1/datasets/${encodeURIComponent(name)}/index`, { method: "POST", json: { dataset: name, version } });
      await follow(rec.id, (r) => {
        out.textContent = ` ${r.state}${r.progress?.message ? ` — ${r.progress.message}` : ""}`;
        if (r.state === "succeeded") {
          out.replaceChildren(" indexed: ", h("a", { href: `#/search/${encodeURIComponent(name)}` }, "search it"));
        } else if (r.state === "failed") {
          out.textContent = ` failed: ${r.error?.message}`;
        }
      });
    } catch (err) {
      banner(err.message);
    } finally {
      b.disabled = false;
    }
  });
  return h("p", { class: "row" }, b, out);
}

const fmtMap = (o) => Object.entries(o || {}).map(([k, v]) => `${k} ${v}`).join(", ");

function compareTable(a, b) {
  const keys = [["rows", (m) => m.counts.rows], ["kept", (m) => m.counts.accepted], ["flagged", (m) => m.counts.flagged], ["dropped", (m) => m.counts.rejected]];
  for (const group of ["tiers", "splits", "signals"]) {
    const names = new Set([...Object.keys(a.counts[group] || {}), ...Object.keys(b.counts[group] || {})]);
    for (const n of names) keys.push([`${group.replace(/s$/, "")} ${n}`, (m) => (m.counts[group] || {})[n] || 0]);
  }
  return h("table", { "aria-label": `v${a.version} against v${b.version}` },
    h("thead", {}, h("tr", {}, ["", `v${a.version}`, `v${b.version}`, "change"].map((c) => h("th", { scope: "col" }, c)))),
    h("tbody", {}, keys.map(([label, f]) => {
      const d = f(a) - f(b);
      return h("tr", {}, h("th", { scope: "row" }, label), h("td", {}, f(a)), h("td", {}, f(b)), h("td", {}, d > 0 ? `+${d}` : String(d)));
    })));
}

/** The rows that differ between two versions, a page at a time, beside the counts. */
async function changedRows(into, name, version, against) {
  const list = h("div", { class: "gallery", id: "changes" });
  const more = h("button", { type: "button", class: "secondary", hidden: true }, "More changes");
  into.append(h("h2", {}, `Rows that changed from v${against} to v${version}`), list, more);
  let cursor = null;
  const load = async () => {
    const q = new URLSearchParams({ against: String(against), limit: "24" });
    if (cursor) q.set("cursor", cursor);
    const page = await json(`/v1/datasets/${encodeURIComponent(name)}/versions/${version}/changes?${q}`);
    for (const c of page.changes) {
      const r = c.row;
      const what = c.change === "changed"
        ? `changed: ${c.fields.map((f) => `${f} ${JSON.stringify(c.before[f] ?? null)} → ${JSON.stringify(r[f] ?? null)}`).join("; ")}`
        : c.change === "added" ? `added in v${version}` : `only in v${against}`;
      const img = h("img", { alt: r.caption || "image", "data-key": r.image_key, width: 256, height: 256 });
      list.append(h("article", { class: `card change-${c.change}`, "data-image": r.image_id }, img,
        h("p", { class: "caption" }, r.caption || "—"), h("p", { class: "muted" }, what)));
      thumb(img);
    }
    if (!list.children.length) list.append(h("p", { class: "muted" }, "No row differs."));
    cursor = page.next_cursor;
    more.hidden = !cursor;
  };
  more.addEventListener("click", () => load().catch((err) => banner(err.message)));
  await load();
}

async function gallery(main, name, version) {
  const form = h("form", { class: "row", "aria-label": "Filter images" },
    field("split", "Split", h("select", {}, ["", "train", "val", "test"].map((v) => h("option", { value: v }, v || "any")))),
    field("tier", "Tier", h("select", {}, ["", "gold", "silver", "bronze"].map((v) => h("option", { value: v }, v || "any")))),
    field("decision", "Decision", h("select", {}, [["", "any"], ["accept", "kept"], ["flag", "flagged"], ["reject", "dropped"]].map(([v, l]) => h("option", { value: v }, l)))),
    field("q", "Text", h("input", { type: "search", placeholder: "caption, tag or source words" })),
    h("div", { class: "field" }, h("button", { type: "submit" }, "Filter")));
  const grid = h("div", { class: "gallery", id: "gallery" });
  const more = h("button", { type: "button", class: "secondary", hidden: true }, "More");
  const where = h("p", { class: "muted", "aria-live": "polite" });
  main.append(h("h2", {}, "Images"), form, grid, where, more);
  const seen = new IntersectionObserver((entries) => {
    for (const e of entries) {
      if (!e.isIntersecting) continue;
      seen.unobserve(e.target);
      thumb(e.target);
    }
  }, { rootMargin: "400px" });
  let cursor = null;
  const load = async (append) => {
    const q = new URLSearchParams({ limit: "48" });
    for (const n of ["split", "tier", "decision", "q"]) if (form.elements[n].value) q.set(n, form.elements[n].value);
    if (append && cursor != null) q.set("cursor", cursor);
    const page = await json(`/v1/datasets/${encodeURIComponent(name)}/versions/${version}/rows?${q}`);
    if (!append) grid.replaceChildren();
    for (const r of page.rows) {
      const card = rowCard(r, name);
      grid.append(card);
      seen.observe(card.querySelector("img"));
    }
    cursor = page.next_cursor;
    more.hidden = cursor == null;
    const shown = grid.children.length;
    where.textContent = `${shown} image${shown === 1 ? "" : "s"} shown; ${Math.round((100 * page.scanned_to) / Math.max(page.total_bytes, 1))} % of the version read.`;
  };
  form.addEventListener("submit", (e) => { e.preventDefault(); banner(""); load(false).catch((err) => showError(form, err)); });
  more.addEventListener("click", () => load(true).catch((err) => banner(err.message)));
  await load(false);
}

async function thumb(img) {
  try {
    const r = await api("/v1/thumbnails/" + img.dataset.key.split("/").map(encodeURIComponent).join("/"));
    img.src = URL.createObjectURL(await r.blob());
  } catch (err) {
    img.alt = `${img.alt} (no thumbnail: ${err.message})`;
  }
}

const DECISION = { accept: "kept", flag: "flagged", reject: "dropped" };

function rowCard(r, name) {
  const why = r.signals.length ? r.signals.map((s) => `${s.name}: ${s.reason}`).join("\n") : "passed every check";
  return h("article", { class: `card decision-${r.decision}`, "data-image": r.image_id },
    h("img", { alt: r.caption || "image without a caption", "data-key": r.image_key, width: 256, height: 256 }),
    h("p", { class: "caption" }, r.caption || "—"),
    h("p", { class: "muted" }, [DECISION[r.decision], r.tier, r.split, r.source].filter(Boolean).join(" · ")),
    h("a", { href: `#/search/${encodeURIComponent(name)}/${r.image_id}` }, "Similar images"),
    h("details", {}, h("summary", {}, "Why and more"),
      h("p", { class: "muted" }, why),
      h("dl", {}, [["image", r.image_id], ["size", r.width && `${r.width}×${r.height}`], ["words", r.words], ["CLIP score", r.clip_score?.toFixed(1)], ["NSFW", r.nsfw?.toFixed(2)], ["license", r.license], ["tags", r.tags.join(", ")]]
        .filter(([, v]) => v !== undefined && v !== null && v !== "")
        .map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]))));
}

// Search: text or an image against a dataset's index; a dataset made of what a text query found.
const MODES = {
  "text-image": { label: "text → images", space: "clip_image", input: "text" },
  "text-caption": { label: "text → captions", space: "caption", input: "text" },
  "image-image": { label: "image → images", space: "clip_image", input: "image" },
  "image-text": { label: "image → captions", space: "clip_text", input: "image" },
};

async function searchPage(main, args) {
  const datasets = await json("/v1/datasets");
  const [wantDataset, wantImage] = [args[0] && decodeURIComponent(args[0]), args[1]];
  const form = h("form", { "aria-label": "Search" });
  const text = h("input", { type: "search", placeholder: "a red circle on blue" });
  const file = h("input", { type: "file", accept: "image/*" });
  const imageId = h("input", { placeholder: "16-hex id or sha256", value: wantImage || "" });
  const mode = h("select", {}, Object.entries(MODES).map(([v, m]) => h("option", { value: v, selected: wantImage ? v === "image-image" : false }, m.label)));
  form.append(
    h("div", { class: "row" },
      field("dataset", "Dataset", h("select", {}, datasets.map((d) => h("option", { value: d.dataset, selected: d.dataset === wantDataset }, d.dataset)))),
      field("mode", "Search", mode),
      field("k", "Results", h("input", { type: "number", value: 24, min: 1, max: 1000 })),
      field("tier", "Tier", h("select", {}, ["", "gold", "silver", "bronze"].map((v) => h("option", { value: v }, v || "any"))))),
    h("div", { class: "field by-text" }, h("label", { for: "f-text" }, "Text"), Object.assign(text, { id: "f-text", name: "text" })),
    h("div", { class: "row by-image" }, field("image", "Upload an image", file), field("image_id", "or a record of the dataset", imageId)),
    h("button", { type: "submit" }, "Search"));
  const results = h("div", { class: "gallery", id: "search-results" });
  const status = h("p", { class: "muted", "aria-live": "polite" });
  const curate = h("button", { type: "button", class: "secondary", hidden: true }, "Make a dataset from these");
  main.append(h("h1", {}, "Search"), form, status, curate, results);
  if (!datasets.length) status.textContent = "No datasets to search yet.";
  const showInputs = () => {
    const byImage = MODES[mode.value].input === "image";
    form.querySelector(".by-text").hidden = byImage;
    form.querySelector(".by-image").hidden = !byImage;
  };
  mode.addEventListener("change", showInputs);
  showInputs();
  let last = null;
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    banner("");
    form.querySelectorAll(".error").forEach((x) => x.remove());
    const m = MODES[mode.value];
    const q = new URLSearchParams({ dataset: form.elements.dataset.value, space: m.space, k: form.elements.k.value });
    if (form.elements.tier.value) q.set("tier", form.elements.tier.value);
    try {
      let r;
      if (m.input === "text") {
        q.set("text", text.value);
        r = await json(`/v1/search?${q}`);
      } else if (file.files[0]) {
        r = await json(`/v1/search?${q}`, { method: "POST", body: file.files[0] });
      } else {
        q.set("image_id", imageId.value.trim());
        r = await json(`/v1/search?${q}`);
      }
      results.replaceChildren(...r.results.map((hit) => hitCard(hit, r.dataset)));
      results.querySelectorAll("img").forEach((img) => thumb(img));
      status.textContent = `${r.results.length} result${r.results.length === 1 ? "" : "s"} in ${r.dataset} v${r.version} (${r.space}).`;
      last = m.input === "text" && r.results.length ? { dataset: r.dataset, version: r.version, space: r.space, text: text.value, min: r.results[r.results.length - 1].score, n: r.results.length } : null;
      curate.hidden = !last;
    } catch (err) {
      showError(form, err);
    }
  });
  curate.addEventListener("click", async () => {
    if (!last) return;
    curate.disabled = true;
    try {
      const spec = { dataset: last.dataset, version: last.version, queries: [{ text: last.text, space: last.space, min_score: last.min }],
        limit: last.n, note: `search: ${last.text}` };
      const r = await api(`/v1/datasets/${encodeURIComponent(last.dataset)}/curate`, { method: "POST", json: spec });
      let out = await r.json();
      if (r.status === 202) {
        status.textContent = "Curating…";
        let rec = out;
        await follow(out.id, (x) => { rec = x; });
        if (rec.state !== "succeeded") throw new Error(`curation ${rec.state}: ${rec.error?.message}`);
        out = rec.output;
      }
      status.replaceChildren(`Made ${out.dataset} v${out.version} (${out.matched} matched): `,
        h("a", { href: `#/datasets/${encodeURIComponent(out.dataset)}/${out.version}` }, "open it"));
    } catch (err) {
      banner(err.message);
    } finally {
      curate.disabled = false;
    }
  });
  if (wantImage && wantDataset) form.requestSubmit();
}

function hitCard(hit, dataset) {
  return h("article", { class: "card", "data-image": hit.image_id },
    h("img", { alt: hit.caption || "result", "data-key": hit.image_key, width: 256, height: 256 }),
    h("p", { class: "caption" }, hit.caption || "—"),
    h("p", { class: "muted" }, `score ${hit.score.toFixed(3)}${hit.tier ? ` · ${hit.tier}` : ""}${hit.source ? ` · ${hit.source}` : ""}`),
    h("a", { href: `#/search/${encodeURIComponent(dataset)}/${hit.image_id}` }, "Similar images"));
}

// Train: a LoRA (or DreamBooth) run on a dataset version, its loss curve live, samples by step.
async function trainPage(main) {
  const [models, datasets] = await Promise.all([json("/sdapi/v1/sd-models"), json("/v1/datasets")]);
  const form = h("form", { "aria-label": "Train" });
  const dataset = h("select", {}, datasets.map((d) => h("option", { value: d.dataset }, d.dataset)));
  const version = h("select");
  const versions = () => {
    const d = datasets.find((x) => x.dataset === dataset.value);
    version.replaceChildren(...(d ? d.versions.slice().reverse() : []).map((v) => h("option", { value: v }, `v${v}`)));
  };
  dataset.addEventListener("change", versions);
  versions();
  const db = h("input", { type: "checkbox", id: "f-dreambooth" });
  const dbFields = h("div", { class: "grid", hidden: true },
    field("instance_prompt", "Instance prompt", h("input", { placeholder: "a photo of sks dog" })),
    field("class_prompt", "Class prompt", h("input", { placeholder: "a photo of dog" })),
    field("num_class_images", "Class images", h("input", { type: "number", value: 100, min: 1 })));
  db.addEventListener("change", () => { dbFields.hidden = !db.checked; });
  form.append(
    h("div", { class: "grid" },
      field("base_model", "Base model", h("select", {}, models.map((m) => h("option", { value: m.model_name }, m.title)))),
      field("output_name", "LoRA name", h("input", { required: true, placeholder: "my-style" })),
      field("dataset", "Dataset", dataset),
      field("version", "Version", version)),
    h("div", { class: "grid" },
      field("max_train_steps", "Steps", h("input", { type: "number", value: 1600, min: 1 })),
      field("rank", "Rank", h("input", { type: "number", value: 16, min: 1 })),
      field("alpha", "Alpha", h("input", { type: "number", value: 1, min: 0, step: "any" })),
      field("unet_lr", "Learning rate", h("input", { type: "number", value: 0.0001, min: 0, step: "any" })),
      field("resolution", "Resolution", h("input", { type: "number", value: 512, min: 64 })),
      field("batch_size", "Batch", h("input", { type: "number", value: 1, min: 1 })),
      field("sample_every", "Sample every (steps)", h("input", { type: "number", value: 0, min: 0 })),
      field("sample_prompt", "Sample prompt", h("input", { placeholder: "a red square" }))),
    h("div", { class: "field" }, h("label", { class: "inline", for: "f-dreambooth" }, db, " DreamBooth (prior preservation with class images)")),
    dbFields,
    h("div", { class: "row" }, h("button", { type: "submit" }, "Train"), h("button", { type: "button", class: "secondary", disabled: true, id: "train-cancel" }, "Cancel")));
  const status = h("p", { class: "muted", "aria-live": "polite", id: "train-status" });
  const chart = h("div", { id: "loss-chart" });
  const out = h("div", { id: "train-output" });
  main.append(h("h1", {}, "Train"), form, status, chart, out);
  const cancel = form.querySelector("#train-cancel");
  let running = null;
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    banner("");
    form.querySelectorAll(".error").forEach((x) => x.remove());
    const v = (n) => form.elements[n].value;
    const spec = {
      base_model: v("base_model"), output_name: v("output_name").trim(),
      data: { source: "dataset", dataset: v("dataset"), version: Number(v("version")) },
      network: { rank: Number(v("rank")), alpha: Number(v("alpha")) },
      max_train_steps: Number(v("max_train_steps")), unet_lr: Number(v("unet_lr")),
      resolution: Number(v("resolution")), batch_size: Number(v("batch_size")),
      sample_every: Number(v("sample_every")), sample_prompts: v("sample_prompt").trim() ? [v("sample_prompt").trim()] : [],
    };
    if (db.checked) {
      spec.dreambooth = { instance_prompt: v("instance_prompt"), class_prompt: v("class_prompt"), num_class_images: Number(v("num_class_images")) };
    }
    const points = [];
    try {
      const rec = await json(db.checked ? "/v1/train/dreambooth" : "/v1/train/lora", { method: "POST", json: spec });
      running = rec.id;
      cancel.disabled = false;
      out.replaceChildren();
      await follow(rec.id, async (r) => {
        const m = /step (\d+)\/(\d+) loss ([\d.eE+-]+)/.exec(r.progress?.message || "");
        if (m && !points.some((p) => p[0] === Number(m[1]))) {
          points.push([Number(m[1]), Number(m[3])]);
          chart.replaceChildren(lossChart(points, Number(m[2])));
        }
        status.textContent = `${r.state}${r.progress?.message ? ` — ${r.progress.message}` : ""}`;
        if (r.state === "failed") status.textContent = `failed: ${r.error?.message} (${r.error?.code})`;
        if (r.state === "succeeded" && r.output?.kind === "trained") await trained(out, r.output);
      });
    } catch (err) {
      showError(form, err);
    } finally {
      cancel.disabled = true;
      running = null;
    }
  });
  cancel.addEventListener("click", () => running && api(`/v1/jobs/${running}`, { method: "DELETE" }).catch((err) => banner(err.message)));
}

/** The loss by step as an SVG line (no library: the points scaled into a 600×200 box). */
function lossChart(points, total) {
  const NS = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(NS, "svg");
  svg.setAttribute("viewBox", "0 0 600 200");
  svg.setAttribute("role", "img");
  const last = points[points.length - 1];
  svg.setAttribute("aria-label", `Loss by step: ${points.length} steps of ${total}, last loss ${last[1].toFixed(5)}`);
  const losses = points.map((p) => p[1]);
  const [lo, hi] = [Math.min(...losses), Math.max(...losses)];
  const x = (step) => 40 + (550 * step) / Math.max(total, 1);
  const y = (loss) => 180 - (160 * (loss - lo)) / Math.max(hi - lo, 1e-12);
  const line = document.createElementNS(NS, "polyline");
  line.setAttribute("points", points.map(([s, l]) => `${x(s).toFixed(1)},${y(l).toFixed(1)}`).join(" "));
  line.setAttribute("fill", "none");
  line.setAttribute("stroke", "#2b5fd9");
  line.setAttribute("stroke-width", "2");
  const axis = document.createElementNS(NS, "path");
  axis.setAttribute("d", "M40 10 V180 H590");
  axis.setAttribute("stroke", "#9aa0a6");
  axis.setAttribute("fill", "none");
  const label = (text, lx, ly) => {
    const t = document.createElementNS(NS, "text");
    t.setAttribute("x", lx);
    t.setAttribute("y", ly);
    t.setAttribute("font-size", "11");
    t.setAttribute("fill", "#5f6368");
    t.textContent = text;
    return t;
  };
  svg.append(axis, line, label(hi.toPrecision(3), 0, 18), label(lo.toPrecision(3), 0, 182), label(`step ${last[0]} / ${total}`, 480, 196));
  return svg;
}

async function trained(out, t) {
  const lora = await artifactUrl(t.lora.key);
  const samples = h("div", { class: "results" });
  for (const s of t.samples) {
    samples.append(h("figure", {}, h("img", { src: await artifactUrl(s.image), alt: `Sample at step ${s.step}: ${s.prompt}` }),
      h("figcaption", {}, `step ${s.step}: ${s.prompt}`)));
  }
  out.replaceChildren(
    h("p", {}, `${t.output_name}: ${t.steps} steps on ${t.images} images, final loss ${t.final_loss.toFixed(5)}. Use it as `, h("code", {}, `<lora:${t.output_name}:1>`), ". ",
      h("a", { href: lora, download: `${t.output_name}.safetensors`, id: "lora-download" }, "Download the LoRA")),
    h("h2", {}, "Samples"), t.samples.length ? samples : h("p", { class: "muted" }, "No sample prompts were given."));
}

const PAGES = { generate: generatePage, search: searchPage, train: trainPage, jobs: jobsPage, datasets: datasetsPage };

async function route() {
  const [name, ...args] = (location.hash.replace(/^#\//, "") || "generate").split("/");
  const page = PAGES[name] ? name : "generate";
  document.querySelectorAll("nav a").forEach((a) => {
    if (a.dataset.page === page) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  });
  const main = document.getElementById("page");
  main.replaceChildren();
  document.title = `atelier — ${page}`;
  try {
    await PAGES[page](main, args);
  } catch (err) {
    banner(err.message);
  }
  main.focus();
}

setupKey();
window.addEventListener("hashchange", route);
route();
