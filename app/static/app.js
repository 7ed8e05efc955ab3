// The query page: choose or drop an image, POST it to /v1/search, show the results as a grid.
// Plain browser JavaScript: no build step, no CDN, nothing fetched but this service's own API.
"use strict";

const $ = (id) => document.getElementById(id);
const keyInput = $("api-key");
keyInput.value = localStorage.getItem("retrieval-api-key") || "";
keyInput.addEventListener("change", () => localStorage.setItem("retrieval-api-key", keyInput.value));

function authHeaders() {
  return keyInput.value ? { "X-API-Key": keyInput.value } : {};
}

function say(text, isError = false) {
  $("message").textContent = text;
  $("message").classList.toggle("error", isError);
}

// The largest k the server takes (RETRIEVAL_MAX_K, from /readyz): the "Results" field never asks for more.
let maxK = null;

function followMaxK(limit) {
  if (!Number.isInteger(limit) || limit < 1) return;
  maxK = limit;
  const input = $("k");
  input.max = String(limit);
  if (Number(input.value) > limit) input.value = String(limit);
}

// The k a new search asks for: the "Results" field (12 when empty), within 1..maxK (the field then shows it).
function wantedK() {
  const asked = Math.max(1, Math.floor(Number($("k").value)) || 12);
  if (maxK === null || asked <= maxK) return asked;
  $("k").value = String(maxK);
  return maxK;
}

// The k of that search's page at `offset`: pages stop at maxK, so the last one asks only for what is left.
function kAt(k, offset) {
  return String(maxK === null ? k : Math.max(1, Math.min(k, maxK - offset)));
}

async function checkReady() {
  try {
    const res = await fetch("/readyz");
    const body = await res.json();
    const d = body.detail || {};
    followMaxK(d.max_k);
    $("status").textContent = res.ok
      ? `model ${d.model_version} · index ${d.index_version} · ${d.vectors} images`
      : `not ready: ${d.index || d.database || body.status}`;
  } catch (err) {
    $("status").textContent = "service unreachable";
  }
}

async function thumbnail(img, url) {
  // With an API key the thumbnail must be fetched with the header; without one a plain src is enough.
  if (!keyInput.value) { img.src = url; return; }
  const res = await fetch(url, { headers: authHeaders() });
  if (res.ok) img.src = URL.createObjectURL(await res.blob());
}

function render(results, { append = false, firstRank = 1 } = {}) {
  const grid = $("results");
  if (!append) grid.replaceChildren();
  results.forEach((hit, i) => {
    const li = document.createElement("li");
    li.dataset.id = hit.id;
    const img = document.createElement("img");
    img.alt = hit.label || `image ${hit.id}`;
    img.loading = "lazy";
    thumbnail(img, hit.thumbnail_url);
    const caption = document.createElement("div");
    caption.className = "caption";
    const label = document.createElement("span");
    label.className = "label";
    label.textContent = hit.label || "—";
    label.title = hit.label || "";  // long labels are ellipsized; the full one shows on hover
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = hit.score.toFixed(3);
    const rank = document.createElement("span");
    rank.className = "rank";
    rank.textContent = `#${firstRank + i}`;
    caption.append(rank, label, score);
    li.append(img, caption);
    searchTools.decorateCard(li, hit);
    grid.append(li);
  });
}

async function query(file) {
  const preview = $("preview");
  // A HEIC photo, for one, is searched by the server but shown by few browsers: say so instead of a blank box.
  preview.onerror = () => {
    preview.hidden = true;
    $("drop-text").textContent = `${file.name}: this browser cannot show it; it was searched all the same`;
    $("drop-text").hidden = false;
  };
  preview.src = URL.createObjectURL(file);
  preview.hidden = false;
  $("drop-text").hidden = true;
  const form = new FormData();
  form.append("file", file);
  form.append("k", String(wantedK()));
  if ($("label").value) form.append("label", $("label").value);
  if ($("min-score").value) form.append("min_score", $("min-score").value);
  searchTools.addOptions(form, file);
  if (explainRequested()) form.append("explain", "true");  // explain.js
  say("searching…");
  try {
    const res = await fetch("/v1/search", { method: "POST", body: form, headers: authHeaders() });
    const body = await res.json();
    if (!res.ok) {
      render([]);
      say(`${res.status}: ${body.message || body.error}`, true);
      return;
    }
    render(body.results);
    searchTools.afterSearch(body);
    showExplanations(body.explain);  // explain.js
    say(`${body.results.length} results in ${body.timings.total_ms.toFixed(0)} ms (model ${body.model_version})`);
  } catch (err) {
    say(`request failed: ${err}`, true);
  }
}

$("file").addEventListener("change", (e) => { if (e.target.files[0]) query(e.target.files[0]); });
const drop = $("drop");
["dragenter", "dragover"].forEach((t) => drop.addEventListener(t, (e) => { e.preventDefault(); drop.classList.add("over"); }));
["dragleave", "drop"].forEach((t) => drop.addEventListener(t, (e) => { e.preventDefault(); drop.classList.remove("over"); }));
drop.addEventListener("drop", (e) => { const f = e.dataTransfer.files[0]; if (f) query(f); });
$("options").addEventListener("submit", (e) => e.preventDefault());
checkReady();
