// The web page: upload an .h5ad, pick a model, show the prediction. Plain JS, inline SVG, no CDN.
// Layout: shared helpers (api, svg, csv) first, then one block per tab (predict), then start-up; a new tab
// adds its own block and registers with TABS.
"use strict";
const $ = (id) => document.getElementById(id);
const SVGNS = "http://www.w3.org/2000/svg";
const KEY_STORE = "scdrugmap-api-key"; // sessionStorage only: the key is gone when the tab closes
let lastResult = null;

// ------------------------------------------------------------------------------------------ api
function apiKey() {
  return $("api-key").value || sessionStorage.getItem(KEY_STORE) || "";
}

function headers() {
  const key = apiKey();
  return key ? { "X-API-Key": key } : {};
}

function rememberKey() {
  if ($("api-key").value) sessionStorage.setItem(KEY_STORE, $("api-key").value);
}

function setStatus(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

async function loadModels() {
  const r = await fetch("/v1/models", { headers: headers() });
  const body = await r.json().catch(() => ({}));
  if (!r.ok) { setStatus(`could not list models (${r.status}): ${body.detail || ""}`, true); return; }
  const sel = $("model");
  sel.innerHTML = "";
  for (const m of body.models) {
    const opt = document.createElement("option");
    opt.value = `${m.name}@${m.version}`;
    const auc = m.metrics && m.metrics.auroc != null ? ` (AUROC ${m.metrics.auroc.toFixed(3)})` : "";
    opt.textContent = `${m.name}@${m.version}: ${m.model} + ${m.head}${auc}`;
    sel.appendChild(opt);
  }
  if (!body.models.length) setStatus("the registry holds no models", true);
}

function el(name, attrs, parent) {
  const e = document.createElementNS(SVGNS, name);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (parent) parent.appendChild(e);
  return e;
}

function drawHistogram(hist) {
  const W = 420, H = 260, L = 40, B = 30, T = 10, R = 10;
  const svg = el("svg", { width: W, height: H, id: "histogram-svg" });
  const max = Math.max(1, ...hist.counts);
  const n = hist.counts.length, bw = (W - L - R) / n;
  hist.counts.forEach((c, i) => {
    const h = (H - B - T) * c / max;
    const lo = hist.edges[i];
    const r = el("rect", { x: L + i * bw + 1, y: H - B - h, width: bw - 2, height: h,
      class: lo >= 0.5 ? "sensitive bar" : "resistant bar", "data-count": c }, svg);
    el("title", {}, r).textContent = `${hist.edges[i]}–${hist.edges[i + 1]}: ${c} cells`;
  });
  el("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, stroke: "#333" }, svg);
  for (const t of [0, 0.5, 1]) {
    const x = L + t * (W - L - R);
    el("text", { x, y: H - B + 16, "text-anchor": "middle", "font-size": 11 }, svg).textContent = t;
  }
  el("text", { x: 4, y: T + 10, "font-size": 11 }, svg).textContent = max;
  $("histogram").replaceChildren(svg);
}

function drawEmbedding(points, cells) {
  const W = 420, H = 320, P = 16;
  const svg = el("svg", { width: W, height: H, id: "embedding-svg" });
  if (!points || !points.length) { $("embedding").replaceChildren(svg); return; }
  const xs = points.map((p) => p[0]), ys = points.map((p) => p[1]);
  const x0 = Math.min(...xs), x1 = Math.max(...xs), y0 = Math.min(...ys), y1 = Math.max(...ys);
  const sx = (v) => P + (W - 2 * P) * (x1 > x0 ? (v - x0) / (x1 - x0) : 0.5);
  const sy = (v) => H - P - (H - 2 * P) * (y1 > y0 ? (v - y0) / (y1 - y0) : 0.5);
  points.forEach((p, i) => {
    const c = el("circle", { cx: sx(p[0]).toFixed(1), cy: sy(p[1]).toFixed(1), r: 2.5,
      class: `point ${cells[i].label}`, "fill-opacity": 0.7 }, svg);
    el("title", {}, c).textContent = `${cells[i].cell_id}: p=${cells[i].p_sensitive}`;
  });
  $("embedding").replaceChildren(svg);
}

const TABLE_ROWS = 500;
function drawTable(cells) {
  const body = $("cells").querySelector("tbody");
  body.replaceChildren();
  for (const c of cells.slice(0, TABLE_ROWS)) {
    const tr = document.createElement("tr");
    for (const v of [c.cell_id, c.p_sensitive.toFixed(4), c.label]) {
      const td = document.createElement("td");
      td.textContent = v;
      tr.appendChild(td);
    }
    body.appendChild(tr);
  }
  $("cells-note").textContent = cells.length > TABLE_ROWS
    ? `showing ${TABLE_ROWS} of ${cells.length} cells; the CSV holds all` : `${cells.length} cells`;
}

function show(res) {
  lastResult = res;
  const s = res.summary;
  $("summary-model").textContent = `${res.model}@${res.version} (${res.base_model}, ${res.kind})`;
  $("summary-n-cells").textContent = s.n_cells;
  $("summary-n-sensitive").textContent = s.n_sensitive;
  $("summary-n-resistant").textContent = s.n_resistant;
  $("summary-fraction").textContent = s.fraction_sensitive.toFixed(3);
  $("summary-mean-p").textContent = s.mean_p_sensitive == null ? "" : s.mean_p_sensitive.toFixed(3);
  $("summary-genes").textContent = `${res.genes_known_to_model} of ${res.genes_in_request}`;
  $("random-warning").hidden = !res.random_weights;
  drawHistogram(s.histogram);
  drawEmbedding(res.embedding_2d, res.cells);
  drawTable(res.cells);
  $("result").hidden = false;
}

// ------------------------------------------------------------------------------------------ csv
// A cell starting with = + - @ (or tab / CR) is a formula to a spreadsheet: prefix it with ' so it stays text.
function csvField(v) {
  let s = String(v);
  if (/^[=+\-@\t\r]/.test(s)) s = "'" + s;
  return /[",\n\r]/.test(s) ? `"${s.replace(/"/g, '""')}"` : s;
}

function csvText(cells) {
  const lines = ["cell_id,p_sensitive,label"];
  for (const c of cells) lines.push([c.cell_id, c.p_sensitive, c.label].map(csvField).join(","));
  return lines.join("\n") + "\n";
}

function downloadCsv() {
  if (!lastResult) return;
  const blob = new Blob([csvText(lastResult.cells)], { type: "text/csv" });
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob);
  a.download = `predictions-${lastResult.model}-${lastResult.version}.csv`;
  document.body.appendChild(a);
  a.click();
  a.remove();
}

async function submit(ev) {
  ev.preventDefault();
  const file = $("file").files[0];
  if (!file) { setStatus("choose an .h5ad file", true); return; }
  rememberKey();
  const form = new FormData();
  form.append("model", $("model").value);
  form.append("file", file);
  form.append("embedding_2d", "true");
  setStatus(`predicting ${file.name} ...`, false);
  $("submit").disabled = true;
  try {
    const r = await fetch("/v1/predict", { method: "POST", body: form, headers: headers() });
    const body = await r.json().catch(() => ({ detail: `HTTP ${r.status}` }));
    if (!r.ok) { setStatus(`error ${r.status}: ${body.detail}`, true); return; }
    show(body);
    setStatus(`done: ${body.summary.n_cells} cells`, false);
  } catch (err) {
    setStatus(`request failed: ${err}`, true);
  } finally {
    $("submit").disabled = false;
  }
}

// ------------------------------------------------------------------------------------------ start-up
// Each tab: { init() wires its elements, onKey() reacts to a new API key }. The explorer adds its own.
const TABS = [{ init() {
  $("predict-form").addEventListener("submit", submit);
  $("download").addEventListener("click", downloadCsv);
}, onKey: loadModels }];

$("api-key").addEventListener("change", () => { rememberKey(); for (const t of TABS) t.onKey(); });
for (const t of TABS) t.init();
for (const t of TABS) t.onKey();
