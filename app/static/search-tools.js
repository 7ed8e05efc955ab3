// Issue 17's search tools on the query page, kept apart from app.js (which calls in through `searchTools`):
// a region box dragged on the query image, the effort and diversity options, "more like this" and
// "near-duplicates" on each result, and "more results" paging through next_offset.
"use strict";

const searchTools = (() => {
  const el = (id) => document.getElementById(id);
  let lastFile = null;      // the query image, re-sent with a box
  let box = null;           // {x0, y0, x1, y1} as fractions of the query image
  let lastRequest = null;   // () => Promise<Response> for the next page, given an offset
  let threshold = null;     // near-duplicate cosine, from /readyz

  function rankingParams() {
    const params = { effort: el("effort").value };
    const diversity = el("diversity").value;
    if (diversity === "label") Object.assign(params, { diversify: "label", per_group: "2" });
    if (diversity === "mmr") params.mmr = "0.5";
    return params;
  }

  // Called by app.js for every upload search: the ranking options and the box, as form fields.
  function addOptions(form, file) {
    if (file !== lastFile) { lastFile = file; box = null; showRegion(file); }
    for (const [key, value] of Object.entries(rankingParams())) form.append(key, value);
    if (box) form.append("box", [box.x0, box.y0, box.x1, box.y1].map((v) => v.toFixed(4)).join(","));
    lastRequest = (offset) => {
      const again = new FormData();
      // Deeper pages get no heatmaps drawn, so they do not ask for them.
      for (const [key, value] of form.entries()) if (!["offset", "explain", "k"].includes(key)) again.append(key, value);
      again.append("k", kAt(Number(form.get("k")), offset));  // app.js: the last page stops at RETRIEVAL_MAX_K
      again.append("offset", String(offset));
      return fetch("/v1/search", { method: "POST", body: again, headers: authHeaders() });
    };
  }

  // -- the region box ----------------------------------------------------------------------------------
  function showRegion(file) {
    el("region-img").src = URL.createObjectURL(file);
    el("region").hidden = false;
    drawBox();
  }

  function drawBox() {
    const rect = el("region-box");
    rect.hidden = !box;
    if (!box) return;
    Object.assign(rect.style, { left: `${box.x0 * 100}%`, top: `${box.y0 * 100}%`,
                                width: `${(box.x1 - box.x0) * 100}%`, height: `${(box.y1 - box.y0) * 100}%` });
  }

  function setUpRegion() {
    const area = el("region-area");
    let start = null;
    const at = (e) => {
      const r = el("region-img").getBoundingClientRect();
      return { x: Math.min(1, Math.max(0, (e.clientX - r.left) / r.width)),
               y: Math.min(1, Math.max(0, (e.clientY - r.top) / r.height)) };
    };
    area.addEventListener("pointerdown", (e) => { e.preventDefault(); start = at(e); area.setPointerCapture(e.pointerId); });
    area.addEventListener("pointermove", (e) => {
      if (!start) return;
      const p = at(e);
      box = { x0: Math.min(start.x, p.x), y0: Math.min(start.y, p.y), x1: Math.max(start.x, p.x), y1: Math.max(start.y, p.y) };
      drawBox();
    });
    area.addEventListener("pointerup", () => {
      if (!start) return;
      start = null;
      if (!box || box.x1 - box.x0 < 0.02 || box.y1 - box.y0 < 0.02) { box = null; drawBox(); return; }
      query(lastFile);  // app.js: search again, now with the box
    });
    el("region-clear").addEventListener("click", () => { box = null; drawBox(); if (lastFile) query(lastFile); });
  }

  // -- actions on a result -----------------------------------------------------------------------------
  async function show(request, what) {
    clearExplanations();  // explain.js: the overlays belong to the upload search being replaced
    say(`${what}…`);
    try {
      const res = await request(0);
      const body = await res.json();
      if (!res.ok) { render([]); say(`${res.status}: ${body.message || body.error}`, true); return; }
      lastRequest = body.next_offset != null ? request : null;
      render(body.results);
      el("more").hidden = body.next_offset == null;
      el("more").dataset.offset = body.next_offset ?? "";
      say(`${what}: ${body.results.length} results`);
    } catch (err) {
      say(`request failed: ${err}`, true);
    }
  }

  function similarRequest(id, extra) {
    const k = wantedK();  // app.js: within the server's RETRIEVAL_MAX_K
    return (offset) => {
      const params = new URLSearchParams({ k: kAt(k, offset), offset: String(offset), ...extra });
      return fetch(`/v1/images/${id}/similar?${params}`, { headers: authHeaders() });
    };
  }

  async function nearDuplicates(id) {
    if (threshold === null) threshold = (await (await fetch("/readyz")).json()).detail.near_duplicate_threshold ?? 0.88;
    show(similarRequest(id, { min_score: String(threshold), effort: "exact" }), `near-duplicates of image ${id}`);
  }

  // Called by app.js for each result card.
  function decorateCard(li, hit) {
    const actions = document.createElement("div");
    actions.className = "actions";
    const more = document.createElement("button");
    more.type = "button";
    more.className = "more-like-this";
    more.textContent = "More like this";
    more.addEventListener("click", () => show(similarRequest(hit.id, rankingParams()), `more like image ${hit.id}`));
    const dupes = document.createElement("button");
    dupes.type = "button";
    dupes.className = "near-duplicates";
    dupes.textContent = "Near-duplicates";
    dupes.addEventListener("click", () => nearDuplicates(hit.id));
    actions.append(more, dupes);
    li.append(actions);
  }

  // Called by app.js after an upload search: show "more results" when the response has a next page.
  function afterSearch(body) {
    el("more").dataset.cursor = "";
    el("more").hidden = body.next_offset == null;
    el("more").dataset.offset = body.next_offset ?? "";
  }

  async function nextPage() {
    if (!lastRequest || el("more").dataset.offset === "") return;
    const res = await lastRequest(Number(el("more").dataset.offset));
    const body = await res.json();
    if (!res.ok) { say(`${res.status}: ${body.message || body.error}`, true); return; }
    const shown = [...el("results").children].length;
    render(body.results, { append: true, firstRank: shown + 1 });
    afterSearch(body);
    say(`${shown + body.results.length} results`);
  }

  // -- every near-duplicate group of the catalogue (GET /v1/duplicates), the suggested keeper first --------
  async function duplicateGroups(cursor = null) {
    clearExplanations();  // explain.js
    say("looking for near-duplicate groups…");
    const params = new URLSearchParams({ limit: "20" });
    if (cursor !== null) params.set("cursor", String(cursor));
    const res = await fetch(`/v1/duplicates?${params}`, { headers: authHeaders() });
    const body = await res.json();
    if (!res.ok) { say(`${res.status}: ${body.message || body.error}`, true); return; }
    if (cursor === null) render([]);
    const shown = el("results").querySelectorAll(".group-head").length;
    body.groups.forEach((group, i) => {
      const head = document.createElement("li");
      head.className = "group-head";
      head.textContent = `Group ${shown + i + 1}: ${group.images.length} images, keep #${group.keeper_id} (largest, then oldest)`;
      el("results").append(head);
      const best = (id) => Math.max(...group.pairs.filter((p) => p.a === id || p.b === id).map((p) => p.score));
      render(group.images.map((img) => ({ ...img, score: best(img.id) })), { append: true });
      [...el("results").querySelectorAll(`li[data-id="${group.keeper_id}"]`)].at(-1)?.classList.add("keeper");
    });
    lastRequest = null;
    el("more").hidden = body.next_cursor == null;
    el("more").dataset.offset = "";
    el("more").dataset.cursor = body.next_cursor ?? "";
    say(`${shown + body.groups.length} near-duplicate groups at threshold ${body.threshold}`);
  }

  function init() {
    setUpRegion();
    el("more").addEventListener("click", () => {
      if (el("more").dataset.cursor) { const c = Number(el("more").dataset.cursor); el("more").dataset.cursor = ""; duplicateGroups(c); }
      else nextPage();
    });
    el("duplicate-groups").addEventListener("click", () => duplicateGroups());
  }

  return { addOptions, decorateCard, afterSearch, init };
})();
searchTools.init();
