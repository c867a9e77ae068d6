// The page: choose an image, a model, a layer, a method and a class; see the map over the
// image. Only those choices call the service; colour map, opacity and threshold are redrawn
// here from the returned maps (render.js).

import { ApiError, call, storeKey, storedKey } from "./api.js";
import {
  decodeLut,
  decodeMap,
  floorMap,
  mapOntoImage,
  notSeenMask,
  paintNotSeen,
  paintOverlay,
  paintScale,
} from "./render.js";

const $ = (id) => document.getElementById(id);

const state = {
  /** Colour tables by name, and method descriptions by name, from /ui/options.json. */
  luts: {},
  methods: {},
  file: null,
  /** The uploaded image as the service decoded it, at the size its overlays have. */
  picture: null,
  /** The class to explain (its index), or null for the most probable one. */
  target: null,
  /** The shown answer: the explain result, its decoded maps, resized maps by threshold. */
  shown: null,
  controller: null,
  /** What to do again once an API key is given. */
  retry: null,
  /** The chosen model's layers (/v1/models/{model}/layers). */
  layers: null,
};

// ------------------------------------------------------------------------- messages

function setStatus(text) {
  $("status").textContent = text;
}

function showError(error) {
  const box = $("error");
  box.replaceChildren();
  const title = document.createElement("strong");
  title.textContent = error instanceof ApiError ? `${error.title}. ` : "Something went wrong. ";
  box.append(title, error instanceof ApiError ? error.message : String(error.message || error));
  box.hidden = false;
  document.body.dataset.state = "error";
  if (error instanceof ApiError && error.needsKey) showKey(true);
}

function clearError() {
  $("error").hidden = true;
  $("error").replaceChildren();
}

function showWarnings(warnings) {
  const box = $("warnings");
  box.replaceChildren(
    ...warnings.map((text) => {
      const line = document.createElement("p");
      line.textContent = text;
      return line;
    }),
  );
  box.hidden = warnings.length === 0;
}

/** Run `action`, showing its failure; remembered so that giving an API key can retry it. */
async function attempt(action) {
  try {
    await action();
    state.retry = null;
    if (storedKey()) showKey(false); // the key worked
  } catch (error) {
    if (error.name === "AbortError") return;
    if (error instanceof ApiError && error.needsKey) state.retry = action;
    if (state.shown) {
      setStatus("Below: the last explanation that succeeded.");
      describeShown(); // the class the panels show, not the one that failed
    } else {
      setStatus("Nothing to show yet.");
      showNothing();
    }
    showError(error);
  }
}

/** No answer on the page: no figures, no predictions, no class from an earlier answer. */
function showNothing() {
  for (const id of ["figures", "display", "outputs"]) $(id).hidden = true;
  $("predictions").replaceChildren();
  $("details").replaceChildren();
  $("timings").replaceChildren();
  $("target-hint").textContent = "Class: the most probable one.";
}

// ------------------------------------------------------------------------- API key

/** The key field when the service asks for a key (`asking`), else a line saying one is used. */
function showKey(asking) {
  $("key-section").hidden = false;
  $("key-form").hidden = !asking;
  $("key-saved").hidden = asking;
  if (asking) $("api-key").focus();
}

$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  storeKey($("api-key").value.trim());
  $("api-key").value = "";
  clearError();
  if (state.retry) attempt(state.retry);
});

$("change-key").addEventListener("click", () => showKey(true));
$("forget-key").addEventListener("click", () => {
  storeKey("");
  $("key-section").hidden = true;
});

// ------------------------------------------------------------------------- choices

function fillSelect(select, items, selected) {
  select.replaceChildren(
    ...items.map(({ value, text, disabled }) => {
      const option = new Option(text, value, false, value === selected);
      option.disabled = Boolean(disabled);
      return option;
    }),
  );
}

async function loadOptions() {
  const options = await call("/ui/options.json");
  for (const [name, hex] of Object.entries(options.colormaps)) state.luts[name] = decodeLut(hex);
  fillSelect(
    $("colormap"),
    Object.keys(options.colormaps).map((name) => ({ value: name, text: name })),
    options.default_colormap,
  );
  fillSelect(
    $("method"),
    options.methods.map((m) => ({ value: m.name, text: m.description.split(":")[0] })),
    options.methods[0].name,
  );
  state.methods = Object.fromEntries(options.methods.map((m) => [m.name, m.description]));
  describeMethod();
  $("alpha").value = String(options.default_alpha);
  showSliderValues();
  paintLegend();
  paintNotSeenSwatch();
}

function describeMethod() {
  $("method-hint").textContent = state.methods[$("method").value] || "";
}

async function loadModels() {
  const { models } = await call("/v1/models");
  const ready = models.filter((m) => m.ready);
  fillSelect(
    $("model"),
    models.map((m) => ({
      value: m.name,
      text: m.ready ? `${m.name} (${m.architecture})` : `${m.name} (${m.state})`,
      disabled: !m.ready,
    })),
    (ready[0] || models[0] || {}).name,
  );
  if (ready.length === 0) {
    setStatus("The models are still loading…");
    setTimeout(() => attempt(loadModels), 2000);
    return;
  }
  await loadLayers();
  setStatus(state.file ? "" : "Choose an image to start.");
  document.body.dataset.state = "ready";
}

async function loadLayers() {
  const model = $("model").value;
  state.layers = null; // never the last model's layers under this model's name
  $("layer").replaceChildren();
  state.layers = await call(`/v1/models/${encodeURIComponent(model)}/layers`);
  showLayers(state.layers.default_layer);
}

/**
 * The layer menu: the model's stages and its default layer (and `selected`, if it is another
 * layer); with "all layers" ticked, those first and then every other layer in forward order,
 * in two groups. `selected` stays chosen.
 */
function showLayers(selected) {
  const list = state.layers;
  if (!list) return;
  const option = (layer) => new Option(
    `${layer.name} · ${layer.grid[0]}×${layer.grid[1]}`
      + (layer.name === list.default_layer ? " (default)" : ""),
    layer.name,
    false,
    layer.name === selected,
  );
  const main = list.layers.filter((l) => l.stage || l.name === list.default_layer);
  const shown = list.layers.filter((l) => main.includes(l) || l.name === selected);
  const all = $("all-layers");
  all.disabled = main.length === list.layers.length;
  if (all.disabled) all.checked = false;
  $("all-layers-count").textContent = String(list.layers.length);
  const group = (label, layers) => {
    const element = document.createElement("optgroup");
    element.label = label;
    element.append(...layers.map(option));
    return element;
  };
  $("layer").replaceChildren(
    ...(all.checked
      ? [group("Stages", main), group("All layers", list.layers.filter((l) => !main.includes(l)))]
      : shown.map(option)),
  );
  $("layer").value = selected;
  if (!$("layer").value) $("layer").value = list.default_layer;
}

// ------------------------------------------------------------------------- explaining

/** Decode a base64 picture of the API into RGBA pixels. */
async function decodePicture(overlay) {
  const bytes = Uint8Array.from(atob(overlay.data), (c) => c.charCodeAt(0));
  const bitmap = await createImageBitmap(new Blob([bytes], { type: overlay.media_type }));
  const canvas = new OffscreenCanvas(bitmap.width, bitmap.height);
  const context = canvas.getContext("2d");
  context.drawImage(bitmap, 0, 0);
  bitmap.close();
  return context.getImageData(0, 0, canvas.width, canvas.height);
}

async function explain() {
  if (!state.file) {
    throw new ApiError("No image yet", "Choose an image first, or drop one on the page.");
  }
  const model = $("model").value;
  if (!model || !$("layer").value) {
    throw new ApiError("No model yet", "Wait until a model is ready, then press Explain.");
  }
  if (state.controller) state.controller.abort(); // the latest choice wins
  const controller = new AbortController();
  state.controller = controller;
  const form = new FormData();
  form.append("image", state.file, state.file.name);
  form.append("layer", $("layer").value);
  form.append("method", $("method").value);
  if (state.target !== null) form.append("target", String(state.target));
  form.append("encoding", "base64");
  // The picture the maps are drawn on: the upload as the service decoded it (any format,
  // orientation applied), sent once per image as an overlay with a transparent heatmap.
  form.append("overlay", state.picture ? "none" : "png");
  form.append("alpha", "0");
  document.body.dataset.state = "busy";
  setStatus("Explaining…");
  const started = performance.now();
  try {
    const answer = await call(`/v1/models/${encodeURIComponent(model)}/explain`, {
      body: form,
      signal: controller.signal,
    });
    const result = answer.results[0];
    const explanation = result.explanations[0];
    const picture = state.picture || (await decodePicture(explanation.overlay));
    if (controller !== state.controller) return; // a newer choice superseded this answer
    state.picture = picture;
    state.shown = {
      answer,
      result,
      explanation,
      heatmap: decodeMap(explanation.heatmap),
      raw: decodeMap(explanation.raw_heatmap),
      resized: new Map(),
      notSeen: notSeenMask(result.input_box, result.original, picture.width, picture.height),
    };
    clearError();
    showWarnings([...answer.warnings, ...explanation.warnings]);
    showAnswer();
    redraw();
    const seconds = ((performance.now() - started) / 1000).toFixed(2);
    const { label } = explanation.target;
    setStatus(`Explained “${label}” at ${explanation.layer} in ${seconds} s.`);
    document.body.dataset.state = "ready";
    const overlay = $("overlay");
    overlay.dataset.explained = String(Number(overlay.dataset.explained || 0) + 1);
  } finally {
    if (controller === state.controller) state.controller = null;
  }
}

/** The class hint of the shown answer. */
function describeShown() {
  const { target } = state.shown.explanation;
  $("target-hint").textContent = `Class: ${target.label} (choose another in the predictions).`;
}

function percent(probability) {
  if (probability > 0 && probability < 0.001) return "< 0.1 %";
  return `${(100 * probability).toFixed(1)} %`;
}

function showAnswer() {
  const { result, explanation } = state.shown;
  const list = $("predictions");
  // The list is rebuilt: keep the keyboard focus on the class it was on.
  const focused = list.contains(document.activeElement)
    ? document.activeElement.dataset.index
    : null;
  list.replaceChildren(
    ...result.predictions.map((p) => {
      const item = document.createElement("li");
      const button = document.createElement("button");
      button.type = "button";
      button.className = "prediction";
      button.dataset.index = String(p.index);
      button.setAttribute("aria-pressed", String(p.index === explanation.target.index));
      const name = document.createElement("span");
      name.className = "label";
      name.textContent = p.label;
      const value = document.createElement("span");
      value.className = "value";
      value.textContent = percent(p.probability);
      const bar = document.createElement("span");
      bar.className = "bar";
      bar.style.setProperty("--p", String(p.probability));
      button.append(name, value, bar);
      button.setAttribute("aria-label", `Explain ${p.label} (${percent(p.probability)})`);
      button.addEventListener("click", () => {
        state.target = p.index;
        attempt(explain);
      });
      item.append(button);
      return item;
    }),
  );
  if (focused !== null) list.querySelector(`[data-index="${focused}"]`)?.focus();
  describeShown();
  const { target } = explanation;
  const caption = `${target.label} · ${explanation.layer} · ${explanation.method}`;
  $("overlay-caption").textContent = caption;
  const [rows, cols] = explanation.heatmap.shape;
  const { min, max } = explanation.raw_range;
  const { width, height, format, mode } = result.original;
  const details = [
    ["Class", `${target.label} (index ${target.index}, ${percent(target.probability)})`],
    ["Layer", `${explanation.layer} (${rows}×${cols} grid)`],
    ["Method", explanation.method],
    ["Map range", `${min.toPrecision(3)} to ${max.toPrecision(3)} (before ReLU)`],
    ["Image", `${width}×${height} ${format} (${mode})`],
  ];
  $("details").replaceChildren(
    ...details.flatMap(([term, text]) => {
      const dt = document.createElement("dt");
      dt.textContent = term;
      const dd = document.createElement("dd");
      dd.textContent = text;
      return [dt, dd];
    }),
  );
  const t = result.timings;
  const stages = [
    ["Decode", `${t.decode_ms.toFixed(1)} ms`],
    ["Preprocess", `${t.preprocess_ms.toFixed(1)} ms`],
    ["Queue", `${t.queue_ms.toFixed(1)} ms`],
    ["Compute", `${t.compute_ms.toFixed(1)} ms`],
    ["Render", `${t.render_ms.toFixed(1)} ms`],
    ["Images in the batch", String(t.batch_size)],
  ];
  $("timings").replaceChildren(
    ...stages.map(([stage, text]) => {
      const row = document.createElement("tr");
      const th = document.createElement("th");
      th.scope = "row";
      th.textContent = stage;
      const td = document.createElement("td");
      td.textContent = text;
      row.append(th, td);
      return row;
    }),
  );
  for (const id of ["figures", "display", "outputs"]) $(id).hidden = false;
}

// ------------------------------------------------------------------------- drawing

function showSliderValues() {
  $("alpha-value").textContent = Number($("alpha").value).toFixed(2);
  const threshold = Number($("threshold").value);
  $("threshold-value").textContent = threshold > 0 ? threshold.toFixed(3) : "off";
}

function paintLegend() {
  const canvas = $("scale");
  const context = canvas.getContext("2d");
  const image = context.createImageData(canvas.width, canvas.height);
  paintScale(image, state.luts[$("colormap").value]);
  context.putImageData(image, 0, 0);
}

function paintNotSeenSwatch() {
  const canvas = $("not-seen-swatch");
  const context = canvas.getContext("2d");
  const image = context.createImageData(canvas.width, canvas.height);
  paintNotSeen(image);
  context.putImageData(image, 0, 0);
}

/** The shown map at the picture's size, for the current threshold (kept per threshold). */
function resizedMap() {
  const { result, heatmap, raw, resized } = state.shown;
  const threshold = Number($("threshold").value);
  if (!resized.has(threshold)) {
    const grid = threshold > 0 ? floorMap(raw, threshold) : heatmap;
    const { width, height } = state.picture;
    const box = result.input_box;
    resized.set(threshold, mapOntoImage(grid, box, result.original, width, height, threshold === 0));
  }
  return resized.get(threshold);
}

function redraw() {
  showSliderValues();
  paintLegend();
  if (!state.shown || !state.picture) return;
  const { width, height, data } = state.picture;
  for (const id of ["original", "overlay"]) {
    $(id).width = width;
    $(id).height = height;
  }
  $("original").getContext("2d").putImageData(state.picture, 0, 0);
  const context = $("overlay").getContext("2d");
  const image = context.createImageData(width, height);
  const alpha = Number($("alpha").value);
  const { notSeen } = state.shown;
  paintOverlay(image, data, resizedMap(), state.luts[$("colormap").value], alpha, notSeen);
  context.putImageData(image, 0, 0);
  $("not-seen").hidden = notSeen === null;
  const overlay = $("overlay");
  overlay.dataset.renders = String(Number(overlay.dataset.renders || 0) + 1);
}

function download() {
  const { explanation } = state.shown;
  const name = [explanation.target.label, explanation.layer, explanation.method]
    .join("-")
    .replace(/[^A-Za-z0-9._-]+/g, "_");
  $("overlay").toBlob((blob) => {
    const link = document.createElement("a");
    link.href = URL.createObjectURL(blob);
    link.download = `gradcam-${name}.png`;
    link.click();
    setTimeout(() => URL.revokeObjectURL(link.href), 10000);
  }, "image/png");
}

// ------------------------------------------------------------------------- wiring

function chooseFile(file) {
  if (!file) return;
  state.file = file;
  state.picture = null;
  state.target = null;
  state.shown = null; // never show the last image's map as if it were this one's
  showNothing();
  $("file-name").textContent = file.name;
  attempt(explain);
}

$("upload").addEventListener("change", () => chooseFile($("upload").files[0]));

const drop = $("drop");
for (const type of ["dragenter", "dragover"]) {
  drop.addEventListener(type, (event) => {
    event.preventDefault();
    drop.classList.add("dragging");
  });
}
drop.addEventListener("dragleave", () => drop.classList.remove("dragging"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("dragging");
  chooseFile(event.dataTransfer.files[0]);
});
// A file dropped beside the drop zone must not replace the page.
for (const type of ["dragover", "drop"]) {
  window.addEventListener(type, (event) => event.preventDefault());
}

$("model").addEventListener("change", () => {
  state.target = null; // class indices belong to a model
  attempt(async () => {
    await loadLayers();
    if (state.file) await explain();
  });
});
$("all-layers").addEventListener("change", () => showLayers($("layer").value));
$("method").addEventListener("change", describeMethod);
for (const id of ["layer", "method"]) {
  $(id).addEventListener("change", () => {
    if (state.file) attempt(explain);
  });
}
$("controls").addEventListener("submit", (event) => {
  event.preventDefault();
  attempt(explain);
});
for (const id of ["alpha", "threshold", "colormap"]) {
  $(id).addEventListener("input", redraw);
}
$("download").addEventListener("click", download);

if (storedKey()) showKey(false);
await attempt(loadOptions);
attempt(loadModels);
