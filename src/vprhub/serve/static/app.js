// The vprhub page: one photo in, the service's matches out. No libraries, no requests beyond this server.
"use strict";

const $ = (id) => document.getElementById(id);
const keyInput = $("api-key");

function headers() {
  const key = keyInput.value || localStorage.getItem("vprhub-api-key") || "";
  return key ? { "X-API-Key": key } : {};
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

async function detail(response) {
  try { return (await response.json()).detail; } catch { return response.statusText; }
}

async function loadInfo() {
  const response = await fetch("/info", { headers: headers() });
  if (response.status === 401) {
    $("key-box").hidden = false;
    $("info").textContent = "this service needs an API key";
    return;
  }
  const info = await response.json();
  $("info").textContent = `${info.model.model_type} · ${info.map_size} places · ${info.descriptor_dim}-d · ` +
    `${info.backend.name} ${info.backend.structure ?? ""} · v${info.version}`;
  $("top-k").value = info.top_k;
  $("top-k").max = info.map_size;
}

async function thumbnail(img, url) {
  const response = await fetch(url, { headers: headers() });
  if (response.ok) img.src = URL.createObjectURL(await response.blob());
}

function metadataText(metadata) {
  return Object.entries(metadata).filter(([k]) => k !== "path")
    .map(([k, v]) => `${k}: ${JSON.stringify(v)}`).join(", ") || (metadata.path ?? "").split("/").pop();
}

function showHits(hits) {
  const list = $("results");
  list.replaceChildren();
  hits.forEach((hit, rank) => {
    const item = document.createElement("li");
    item.className = "hit";
    item.dataset.id = hit.id;
    item.dataset.score = hit.score;
    const img = document.createElement("img");
    img.className = "thumb";
    img.alt = `place ${hit.id}`;
    if (hit.image_url) thumbnail(img, hit.image_url);
    const rerank = hit.rerank_score !== undefined ? ` · ${hit.rerank_score} matches` : "";
    item.append(img);
    item.insertAdjacentHTML("beforeend",
      `<div><span class="rank">#${rank + 1}</span> id <span class="id"></span> · score <span class="score"></span>${rerank}</div>` +
      `<div class="meta"></div>`);
    item.querySelector(".id").textContent = hit.id;
    item.querySelector(".score").textContent = hit.score.toFixed(4);
    item.querySelector(".meta").textContent = metadataText(hit.metadata);
    list.append(item);
  });
  drawScatter(hits);
}

function drawScatter(hits) {
  const svg = $("scatter");
  svg.replaceChildren();
  const placed = hits.map((hit, rank) => ({ rank, p: hit.position })).filter((h) => h.p);
  if (!placed.length) {
    $("scatter-note").textContent = "the map records no positions";
    return;
  }
  const xs = placed.map((h) => h.p.x), ys = placed.map((h) => h.p.y);
  const span = Math.max(Math.max(...xs) - Math.min(...xs), Math.max(...ys) - Math.min(...ys), 1e-9);
  const unit = placed[0].p.frame === "utm" ? " m" : "°";
  $("scatter-note").textContent =
    `positions of ${placed.length} matches (${placed[0].p.frame}, north up, ${+span.toPrecision(3)}${unit} across); #1 in red`;
  const cx = (Math.max(...xs) + Math.min(...xs)) / 2, cy = (Math.max(...ys) + Math.min(...ys)) / 2;
  const scale = 160 / span;  // equal scale on both axes, north up
  const ns = "http://www.w3.org/2000/svg";
  for (const h of placed.slice().reverse()) {
    const dot = document.createElementNS(ns, "circle");
    dot.setAttribute("cx", 120 + (h.p.x - cx) * scale);
    dot.setAttribute("cy", 120 - (h.p.y - cy) * scale);
    dot.setAttribute("r", h.rank === 0 ? 7 : 5);
    dot.setAttribute("fill", h.rank === 0 ? "#d93025" : "#2a7de1");
    dot.setAttribute("class", "position");
    const label = document.createElementNS(ns, "text");
    label.setAttribute("x", 120 + (h.p.x - cx) * scale + 8);
    label.setAttribute("y", 120 - (h.p.y - cy) * scale + 4);
    label.setAttribute("font-size", "11");
    label.textContent = `#${h.rank + 1}`;
    svg.append(dot, label);
  }
}

async function search(file) {
  $("query").src = URL.createObjectURL(file);
  $("query").hidden = false;
  $("drop-text").hidden = true;
  setStatus("searching…");
  document.body.dataset.state = "searching";
  $("results").replaceChildren();
  const form = new FormData();
  form.append("images", file, file.name);
  const response = await fetch(`/search?top_k=${encodeURIComponent($("top-k").value)}`,
    { method: "POST", body: form, headers: headers() });
  if (!response.ok) {
    setStatus(`error ${response.status}: ${await detail(response)}`, true);
    document.body.dataset.state = "error";
    return;
  }
  const hits = (await response.json()).results[0].hits;
  showHits(hits);
  setStatus(`${hits.length} matches`);
  document.body.dataset.state = "done";
}

$("file").addEventListener("change", () => { if ($("file").files.length) search($("file").files[0]); });
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  if (e.dataTransfer.files.length) search(e.dataTransfer.files[0]);
});
keyInput.addEventListener("change", () => { localStorage.setItem("vprhub-api-key", keyInput.value); loadInfo(); });
loadInfo();
