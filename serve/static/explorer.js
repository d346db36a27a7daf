// The explorer: Datasets (the scDrugMap catalog), Models (registry model cards) and Results (a run's
// leaderboard and breakdowns) tabs, from /v1/explorer/*. Loaded after app.js, whose helpers ($, headers, el)
// it uses; it joins app.js's TABS so a new API key reloads its data too. Plain JS, inline SVG, no CDN.
"use strict";
(() => {
  const state = { datasets: [], subgroups: [], models: [], runs: [], run: null };
  const fmt = (v, d = 3) => (v == null || Number.isNaN(v) ? "–" : Number(v).toFixed(d));
  const int = (v) => (v == null ? "–" : Number(v).toLocaleString("en-US"));

  async function getJson(path) {
    const r = await fetch(path, { headers: headers() });
    const body = await r.json().catch(() => ({}));
    if (!r.ok) throw new Error(`${r.status}: ${body.detail || "request failed"}`);
    return body;
  }

  function status(id, text, isError) {
    $(id).textContent = text;
    $(id).className = isError ? "error" : "";
  }

  function cell(tr, text, cls) {
    const td = document.createElement("td");
    td.textContent = text == null ? "–" : text;
    if (cls) td.className = cls;
    tr.appendChild(td);
    return td;
  }

  function fillSelect(sel, values, keepFirst) {
    const first = keepFirst ? sel.options[0] : null;
    sel.replaceChildren(...(first ? [first] : []));
    for (const v of values) {
      const opt = document.createElement("option");
      opt.value = typeof v === "object" ? v.value : v;
      opt.textContent = typeof v === "object" ? v.label : v;
      sel.appendChild(opt);
    }
  }

  // ------------------------------------------------------------------------------------- tabs
  function showTab(name) {
    for (const sec of document.querySelectorAll("section.tab")) sec.hidden = sec.id !== `tab-${name}`;
    for (const b of document.querySelectorAll("#tabs button")) {
      b.setAttribute("aria-selected", String(b.dataset.tab === name));
    }
    if (location.hash !== `#${name}`) history.replaceState(null, "", `#${name}`);
  }

  // --------------------------------------------------------------------------------- datasets
  function datasetRows() {
    const c = $("ds-collection").value, ct = $("ds-cancer-type").value, ti = $("ds-tissue").value;
    const th = $("ds-therapy").value, q = $("ds-search").value.trim().toLowerCase();
    return state.datasets.filter((d) => (!c || d.collection === c) && (!ct || d.cancer_type === ct)
      && (!ti || d.tissue === ti) && (!th || d.therapy === th)
      && (!q || [d.id, d.geo, d.subgroup, d.regimen, d.cancer_subtype].some((x) => x && x.toLowerCase().includes(q))));
  }

  function drawDatasets() {
    const rows = datasetRows();
    const body = $("datasets-table").querySelector("tbody");
    body.replaceChildren();
    for (const d of rows) {
      const tr = document.createElement("tr");
      tr.dataset.id = d.id;
      for (const v of [d.id, d.geo, d.subgroup, d.cancer_type, d.tissue, d.therapy, d.regimen, d.n_samples]) cell(tr, v);
      cell(tr, d.cells == null ? "shared" : int(d.cells), "num");
      tr.addEventListener("click", () => showDataset(d.id));
      body.appendChild(tr);
    }
    const known = rows.filter((d) => d.cells != null).reduce((a, d) => a + d.cells, 0);
    $("datasets-count").textContent = `${rows.length} of ${state.datasets.length} datasets; ` +
      `${int(known)} cells in the ${rows.filter((d) => d.cells != null).length} whose cells are published per dataset`;
    drawSubgroups();
  }

  async function showDataset(id) {
    try {
      const d = await getJson(`/v1/explorer/datasets/${encodeURIComponent(id)}`);
      const sub = d.subgroup && d.subgroup !== d.geo ? ` / ${d.subgroup}` : "";
      $("dataset-detail-title").textContent = `${d.id}: ${d.geo}${sub}`;
      const dl = $("dataset-detail-fields");
      dl.replaceChildren();
      for (const k of ["collection", "source", "tissue", "cancer_type", "cancer_subtype", "therapy", "regimen",
        "sample_size", "n_samples", "cells", "cells_note", "pmid", "raw_data_id", "protocol", "date", "description"]) {
        const dt = document.createElement("dt"), dd = document.createElement("dd");
        dt.textContent = k.replace("_", " ");
        dd.textContent = d[k] == null || d[k] === "" ? "–" : (k === "cells" ? int(d[k]) : d[k]);
        dd.dataset.field = k;
        dl.append(dt, dd);
      }
      $("dataset-detail").hidden = false;
    } catch (err) { status("datasets-status", `could not load ${id} (${err.message})`, true); }
  }

  // Cells per subgroup as horizontal bars split into sensitive (blue) and resistant (red).
  function drawSubgroups() {
    const kind = $("sg-kind").value, coll = $("ds-collection").value;
    const groups = state.subgroups.filter((g) => g.kind === kind && (!coll || g.collection === coll));
    const W = 760, rowH = 18, L = 300, R = 90, H = groups.length * rowH + 24;
    const svg = el("svg", { width: W, height: H, id: "subgroups-svg" });
    const max = Math.max(1, ...groups.map((g) => g.cells));
    groups.forEach((g, i) => {
      const y = 4 + i * rowH, ws = (W - L - R) * g.sensitive / max, wr = (W - L - R) * g.resistant / max;
      const label = el("text", { x: L - 6, y: y + 12, "text-anchor": "end", "font-size": 11 }, svg);
      label.textContent = `${g.value} (${g.collection})`.slice(0, 48);
      const group = el("g", { class: "subgroup", "data-value": g.value, "data-cells": g.cells }, svg);
      el("title", {}, group).textContent = `${g.value}: ${int(g.cells)} cells, ${int(g.sensitive)} sensitive, ` +
        `${int(g.resistant)} resistant; ${g.datasets.join(", ")}`;
      el("rect", { x: L, y, width: ws, height: rowH - 4, class: "sensitive" }, group);
      el("rect", { x: L + ws, y, width: wr, height: rowH - 4, class: "resistant" }, group);
      el("text", { x: L + ws + wr + 4, y: y + 12, "font-size": 11 }, svg).textContent = int(g.cells);
    });
    $("subgroups").replaceChildren(svg);
  }

  async function loadDatasets() {
    try {
      const body = await getJson("/v1/explorer/datasets");
      state.datasets = body.datasets;
      state.subgroups = body.subgroups;
      const uniq = (k) => [...new Set(state.datasets.map((d) => d[k]).filter(Boolean))].sort();
      fillSelect($("ds-cancer-type"), uniq("cancer_type"), true);
      fillSelect($("ds-tissue"), uniq("tissue"), true);
      fillSelect($("ds-therapy"), uniq("therapy"), true);
      status("datasets-status", "", false);
      drawDatasets();
    } catch (err) { status("datasets-status", `could not load the catalog (${err.message})`, true); }
  }

  // ----------------------------------------------------------------------------------- models
  function scoreRow(table, metric, s, cv) {
    const tr = document.createElement("tr");
    tr.dataset.metric = metric;
    cell(tr, metric);
    cell(tr, fmt(s && s.value), "num value");
    cell(tr, s && s.ci_low != null ? `${fmt(s.ci_low)}–${fmt(s.ci_high)}` : "–", "num ci");
    cell(tr, cv ? `${fmt(cv.mean)} ± ${fmt(cv.std)} (${cv.n_folds} folds)` : "–", "num cv");
    table.appendChild(tr);
  }

  function drawModels() {
    const box = $("model-cards");
    box.replaceChildren();
    for (const m of state.models) {
      const card = document.createElement("article");
      card.className = "card";
      card.dataset.ref = m.ref;
      const h = document.createElement("h3");
      h.textContent = m.ref;
      card.appendChild(h);
      if (m.random_weights) {
        const w = document.createElement("p");
        w.className = "warning random-weights";
        w.textContent = "RANDOM WEIGHTS (not pretrained): its scores and predictions mean nothing.";
        card.appendChild(w);
      }
      const td = m.training_data || {};
      const facts = [["base model", m.base_model], ["head", m.head], ["strategy", m.strategy],
        ["trained on", td.data ? `${td.data}${td.n_cells ? ` (${int(td.n_cells)} cells)` : ""}` : null],
        ["train / val / test cells", td.n_train != null ? `${int(td.n_train)} / ${int(td.n_val)} / ${int(td.n_test)}` : null],
        ["held-out dataset", td.test_dataset], ["from", m.source.unit_id ? `${m.source.run_name || "run"}: ` +
          `${m.source.unit_id} ${m.source.fold_name || ""}` : null], ["fold chosen by", m.selected_by]];
      const dl = document.createElement("dl");
      for (const [k, v] of facts) {
        if (v == null) continue;
        const dt = document.createElement("dt"), dd = document.createElement("dd");
        dt.textContent = k;
        dd.textContent = v;
        dd.dataset.field = k;
        dl.append(dt, dd);
      }
      card.appendChild(dl);
      const table = document.createElement("table");
      table.className = "grid scores";
      const head = document.createElement("tr");
      for (const t of ["metric", "registered fold", "95% CI", "unit mean ± sd"]) {
        const th = document.createElement("th");
        th.textContent = t;
        head.appendChild(th);
      }
      table.appendChild(head);
      const metrics = Object.keys(m.scores).length ? Object.keys(m.scores) : Object.keys(m.cv_metrics);
      for (const k of metrics) scoreRow(table, k, m.scores[k], m.cv_metrics[k]);
      card.appendChild(table);
      if (m.run_id) {
        const b = document.createElement("button");
        b.type = "button";
        b.className = "open-run";
        b.textContent = "its run's results";
        b.addEventListener("click", () => { showTab("results"); selectRun(m.run_id); });
        card.appendChild(b);
      }
      box.appendChild(card);
    }
  }

  async function loadModels() {
    try {
      state.models = (await getJson("/v1/explorer/models")).models;
      status("models-status", state.models.length ? `${state.models.length} model(s)` : "the registry holds no models",
        !state.models.length);
      drawModels();
    } catch (err) { status("models-status", `could not list models (${err.message})`, true); }
  }

  // ---------------------------------------------------------------------------------- results
  function pm(row, m) { return row[`${m}_mean`] == null ? "–" : `${fmt(row[`${m}_mean`])} ± ${fmt(row[`${m}_std`] || 0)}`; }

  function drawBreakdown() {
    const body = $("breakdown").querySelector("tbody");
    body.replaceChildren();
    const rows = (state.run && state.run.breakdowns[$("breakdown-key").value]) || [];
    for (const r of rows) {
      const tr = document.createElement("tr");
      for (const v of [r.group_value, r.model, r.strategy, r.scheme]) cell(tr, v);
      cell(tr, fmt(r.f1), "num");
      cell(tr, fmt(r.auroc), "num");
      cell(tr, int(r.n_cells), "num");
      cell(tr, r.n_folds, "num");
      body.appendChild(tr);
    }
  }

  async function selectRun(id) {
    if (!id) return;
    $("run").value = id;
    try {
      const run = state.run = await getJson(`/v1/explorer/runs/${encodeURIComponent(id)}`);
      status("results-status", `${run.name}: ${run.n_units} units, ${run.n_folds} folds`, false);
      $("run-random").hidden = !run.random_weights.length;
      $("run-random").textContent = `RANDOM WEIGHTS (not pretrained) for ${run.random_weights.join(", ")}: ` +
        "their scores mean nothing";
      const body = $("leaderboard").querySelector("tbody");
      body.replaceChildren();
      for (const r of run.leaderboard) {
        const tr = document.createElement("tr");
        tr.dataset.unit = r.unit_id;
        for (const v of [r.model, r.head, r.strategy, r.scheme, r.split, r.few_shot_k, r.n_folds]) cell(tr, v);
        for (const m of ["auroc", "f1", "auprc"]) cell(tr, pm(r, m), `num ${m}`);
        body.appendChild(tr);
      }
      const keys = Object.keys(run.breakdowns);
      fillSelect($("breakdown-key"), keys.map((k) => ({ value: k, label: k.replace("_", " ") })), false);
      drawBreakdown();
    } catch (err) { status("results-status", `could not load run ${id} (${err.message})`, true); }
  }

  async function loadRuns() {
    try {
      state.runs = (await getJson("/v1/explorer/runs")).runs;
      fillSelect($("run"), state.runs.map((r) => ({ value: r.id, label: `${r.name} (${r.dir}, ${r.n_units} units)` })),
        false);
      if (!state.runs.length) {
        status("results-status", "no runs: the server shows its registry models' runs and those under " +
          "$SCDRUGMAP_RAY_RUNS", true);
        return;
      }
      await selectRun(state.run && state.runs.some((r) => r.id === state.run.id) ? state.run.id : state.runs[0].id);
    } catch (err) { status("results-status", `could not list runs (${err.message})`, true); }
  }

  // ---------------------------------------------------------------------------------- start-up
  const tab = {
    init() {
      for (const b of document.querySelectorAll("#tabs button")) b.addEventListener("click", () => showTab(b.dataset.tab));
      for (const id of ["ds-collection", "ds-cancer-type", "ds-tissue", "ds-therapy", "ds-search"]) {
        for (const ev of ["input", "change"]) $(id).addEventListener(ev, drawDatasets);
      }
      $("dataset-filters").addEventListener("submit", (ev) => ev.preventDefault());
      $("sg-kind").addEventListener("change", drawSubgroups);
      $("run").addEventListener("change", () => selectRun($("run").value));
      $("breakdown-key").addEventListener("change", drawBreakdown);
      const wanted = location.hash.slice(1);
      // Predict stays the page's first view (what it was before the explorer); #datasets etc. open a tab
      showTab(["datasets", "models", "results", "predict"].includes(wanted) ? wanted : "predict");
    },
    onKey() { loadDatasets(); loadModels(); loadRuns(); },
  };
  TABS.push(tab);  // app.js has already started its tabs: start this one now
  tab.init();
  tab.onKey();
})();
