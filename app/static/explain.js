// "Why did this match": heatmap overlays on the query and each result (the `explain` object of POST /v1/search,
// docs/api.md). Kept apart from app.js: app.js only asks explainRequested() before a search and hands the
// response to showExplanations(); everything else about heatmaps lives here.
"use strict";

const explainState = { body: null, view: "similarity" };

function explainRequested() {
  const box = document.getElementById("explain");
  return Boolean(box && box.checked);
}

// Where the model's crop [x0, y0, x1, y1] (fractions of the image) lands in an <img> box, for object-fit
// "cover" (result thumbnails) or "contain" (the query preview).
function cropRect(img, crop, fit) {
  const boxW = img.clientWidth, boxH = img.clientHeight;
  const nw = img.naturalWidth || boxW, nh = img.naturalHeight || boxH;
  const scale = fit === "cover" ? Math.max(boxW / nw, boxH / nh) : Math.min(boxW / nw, boxH / nh);
  const offX = (boxW - nw * scale) / 2, offY = (boxH - nh * scale) / 2;
  return {
    x: img.offsetLeft + offX + crop[0] * nw * scale, y: img.offsetTop + offY + crop[1] * nh * scale,
    w: (crop[2] - crop[0]) * nw * scale, h: (crop[3] - crop[1]) * nh * scale,
  };
}

// A [h][w] grid drawn as a translucent warm overlay, stretched smoothly over the crop; each map scaled to its own
// range (the page shows where, not how much).
function drawHeat(canvas, grid) {
  const h = grid.length, w = grid[0].length;
  const values = grid.flat();
  const lo = Math.min(...values), hi = Math.max(...values);
  const small = document.createElement("canvas");
  small.width = w; small.height = h;
  const ctx = small.getContext("2d");
  const pixels = ctx.createImageData(w, h);
  values.forEach((v, i) => {
    const t = hi > lo ? (v - lo) / (hi - lo) : 0;
    pixels.data.set([255, Math.round(220 * (1 - t)), 0, Math.round(150 * t)], i * 4);
  });
  ctx.putImageData(pixels, 0, 0);
  const out = canvas.getContext("2d");
  out.clearRect(0, 0, canvas.width, canvas.height);
  out.imageSmoothingEnabled = true;
  out.drawImage(small, 0, 0, canvas.width, canvas.height);
}

function overlay(img, crop, grid, fit) {
  const holder = img.parentElement;
  let canvas = holder.querySelector("canvas.heat");
  if (!canvas) {
    canvas = document.createElement("canvas");
    canvas.className = "heat";
    holder.classList.add("has-heat");
    holder.append(canvas);
  }
  const place = () => {
    const r = cropRect(img, crop, fit);
    Object.assign(canvas.style, { left: `${r.x}px`, top: `${r.y}px`, width: `${r.w}px`, height: `${r.h}px` });
    canvas.width = Math.max(1, Math.round(r.w)); canvas.height = Math.max(1, Math.round(r.h));
    drawHeat(canvas, grid);
  };
  if (img.complete && img.naturalWidth) place(); else img.addEventListener("load", place, { once: true });
  canvas.hidden = false;
}

function clearExplanations() {
  document.querySelectorAll("canvas.heat").forEach((c) => c.remove());
  explainState.body = null;
  const view = document.getElementById("explain-view");
  if (view) view.parentElement.hidden = true;
}

// Masks (ABE learners, OSME parts) when the model has them; otherwise the similarity heatmaps.
function mapFor(image, heatmap) {
  const m = explainState.view.startsWith("mask") ? Number(explainState.view.slice(4)) : -1;
  return m >= 0 && image.masks ? image.masks[m] : heatmap;
}

function showQueryAgainst(resultExplanation) {
  const body = explainState.body;
  const preview = document.getElementById("preview");
  if (!body || !resultExplanation || !explainRequested()) return;
  overlay(preview, body.query.crop, mapFor(body.query, resultExplanation.query_heatmap), "contain");
}

function showExplanations(explain) {
  clearExplanations();
  if (!explain || !explainRequested()) return;
  explainState.body = explain;
  const byId = new Map(explain.results.map((r) => [String(r.id), r]));
  document.querySelectorAll("#results li").forEach((li) => {
    const result = byId.get(li.dataset.id);
    if (!result) return;
    overlay(li.querySelector("img"), result.result.crop, mapFor(result.result, result.result.heatmap), "cover");
    // The query's map depends on the result: show it against the one under the pointer (the first by default).
    li.addEventListener("mouseenter", () => showQueryAgainst(result));
  });
  showQueryAgainst(explain.results[0]);
  const view = document.getElementById("explain-view");
  const masks = explain.query.masks;
  if (view && masks) {
    view.replaceChildren(new Option("similarity", "similarity"),
      ...masks.map((_, m) => new Option(`attention mask ${m + 1}`, `mask${m}`)));
    view.value = explainState.view.startsWith("mask") && Number(explainState.view.slice(4)) < masks.length
      ? explainState.view : "similarity";
    view.parentElement.hidden = false;
  }
}

function installExplainControls() {
  const box = document.getElementById("explain");
  const view = document.getElementById("explain-view");
  if (box) {
    box.addEventListener("change", () => {
      document.querySelectorAll("canvas.heat").forEach((c) => { c.hidden = !box.checked; });
    });
  }
  if (view) {
    view.addEventListener("change", () => {
      explainState.view = view.value;
      const body = explainState.body;
      if (body) { showExplanations(body); }
    });
  }
}

installExplainControls();
