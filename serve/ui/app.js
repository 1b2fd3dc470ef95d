// The search page: plain ES2020 with no build step and nothing fetched from outside this
// server, so the page works on an air-gapped machine exactly as the API does.
"use strict";

const $ = (id) => document.querySelector(`[data-testid="${id}"]`);
const MAX_RECORDING_MS = 30_000; // a spoken query is a few words; Whisper hears 30 s at a time
const AUDIO_NAME = /\.(wav|flac|mp3|ogg|oga|opus|m4a|webm|aac|aiff?|amr)$/i;

let catalog = null; // GET catalog: the vectors, which queries each takes, the item count
let last = null; // the last query, re-run when an option changes so filters feel live
let searches = 0; // answers can arrive out of order: only the newest one is drawn

function el(tag, { dataset, ...props } = {}, ...children) {
  const node = Object.assign(document.createElement(tag), props);
  Object.assign(node.dataset, dataset); // dataset is read-only as a property, so it is filled in
  node.append(...children);
  return node;
}

// A server with API keys wants `Authorization: Bearer KEY`; the key typed at the top is kept
// in this browser only (localStorage), never in a URL.
const KEY_STORE = "mmembed-api-key";

// Every call is relative to <base>; a 4xx/5xx answer throws the server's own message.
async function api(path, body) {
  const headers = body === undefined ? {} : { "content-type": "application/json" };
  const key = localStorage.getItem(KEY_STORE);
  if (key) headers.authorization = `Bearer ${key}`;
  const init = body === undefined ? { headers } : { method: "POST", headers, body: JSON.stringify(body) };
  const response = await fetch(path, init);
  const data = await response.json().catch(() => null);
  if (!response.ok) {
    const error = data && data.error;
    const hint = response.status === 401 ? " Enter an API key at the top of the page." : "";
    throw new Error(error ? `${error.message} (${error.code}).${hint}` : `HTTP ${response.status} ${response.statusText}`);
  }
  return data;
}

function setupKey() {
  const input = $("api-key");
  input.value = localStorage.getItem(KEY_STORE) || "";
  input.addEventListener("change", () => {
    const key = input.value.trim();
    if (key) localStorage.setItem(KEY_STORE, key);
    else localStorage.removeItem(KEY_STORE);
    loadCatalog().then(clearError, (error) => showError(`Cannot read the catalogue: ${error.message}`));
  });
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
}

const clearError = () => { $("error").hidden = true; };

// Local objects come as root paths ("/objects/…"): read them against <base> so the page also
// works when the app is mounted under a prefix. S3 URLs are absolute and pass through.
const objectUrl = (url) => (url && url.startsWith("/") && !url.startsWith("//") ? url.slice(1) : url);

async function loadCatalog() {
  catalog = await api("catalog");
  $("item-count").textContent = `${catalog.count} items`;
  if (catalog.dashboard_url) $("dashboard-link").href = catalog.dashboard_url;
  const select = $("vector-select");
  if (!select.options.length) {
    select.add(new Option("every vector that fits the query (fused)", FUSED));
    for (const [name, info] of Object.entries(catalog.vectors)) select.add(new Option(`${name} (${info.dim}-d)`, name));
    select.value = FUSED;
    applyVector();
  }
}

// The first choice searches every vector the query can reach (the picture, its caption, speech)
// and merges their rankings on the server, which says where each hit ranked in each.
const FUSED = "";
function queries() {
  if (!catalog) return [];
  const chosen = $("vector-select").value;
  if (chosen !== FUSED) return catalog.vectors[chosen].queries;
  return [...new Set(Object.values(catalog.vectors).flatMap((info) => info.queries))];
}
const takes = (kind) => queries().includes(kind) || (kind === "audio" && queries().includes("audio:transcript"));

// Offer only the queries the chosen vector answers, so no click ends in a routing error.
function applyVector() {
  const q = queries();
  $("search-input").disabled = $("search-button").disabled = !takes("text");
  $("image-input").disabled = !takes("image");
  $("audio-input").disabled = $("record-button").disabled = !takes("audio");
  const transcript = q.includes("audio:transcript");
  $("route-label").hidden = !transcript;
  // A vector that speech reaches only through its transcript keeps the box ticked.
  if (transcript && !q.includes("audio")) $("route-toggle").checked = true;
  $("route-toggle").disabled = !(transcript && q.includes("audio"));
  const names = q.map((x) => (x === "audio:transcript" ? "speech via its transcript" : x));
  $("vector-hint").textContent = $("vector-select").value === FUSED
    ? `Searches every vector that takes the query (${names.join(", ")}) and merges their rankings.`
    : `This vector takes ${names.join(", ")} queries.`;
}

function filters() {
  const filter = {};
  if ($("kind-filter").value) filter.kind = $("kind-filter").value;
  if ($("collection-filter").value) filter["meta.collection"] = $("collection-filter").value;
  const field = $("filter-field").value.trim();
  const value = $("filter-value").value.trim();
  if (field && value) {
    // JSON where it parses, so 3, true and ["a", "b"] (any of) keep their types; else a string.
    try { filter[field] = JSON.parse(value); } catch { filter[field] = value; }
  }
  return Object.keys(filter).length ? filter : undefined;
}

// Everything a search sends besides the query itself.
function options(audio) {
  const top = Math.min(Math.max(Number($("top-k").value) || 12, 1), 1000);
  const route = audio ? ($("route-toggle").checked ? "transcript" : "direct") : undefined;
  const vector = $("vector-select").value;
  return { ...(vector === FUSED ? { fuse: true } : { vector }), route, top_k: top, filter: filters() };
}

async function search(query, label) {
  const chosen = options("audio" in query);
  last = { query, label, options: JSON.stringify(chosen) };
  const body = { ...query, ...chosen };
  const mine = ++searches;
  $("results").setAttribute("aria-busy", "true");
  const started = performance.now();
  try {
    const answer = await api("search", body);
    if (mine === searches) render(answer, label, performance.now() - started);
  } catch (error) {
    if (mine === searches) showError(error.message);
  } finally {
    if (mine === searches) $("results").setAttribute("aria-busy", "false");
  }
}

function render(answer, label, roundTrip) {
  clearError();
  const via = answer.query.modality === "audio" ? `, ${answer.route}` : "";
  const searched = answer.vectors
    ? `${answer.vectors.length} vectors fused (${answer.fusion}${via})`
    : `${answer.vector} (via ${answer.model}${via})`;
  $("query-info").textContent = `${label} → ${searched}: ${answer.hits.length} hits`;
  const heard = answer.query.transcript;
  $("transcript").hidden = heard === undefined;
  $("transcript").textContent = heard === undefined ? "" : `Heard: “${heard}”`;
  $("latency").textContent = `${answer.took_ms} ms on the server · ${Math.round(roundTrip)} ms round trip`;
  const cards = answer.hits.map(card);
  if (!cards.length) cards.push(el("li", { className: "empty", textContent: "No hits: loosen the filters or try another vector." }));
  $("results").replaceChildren(...cards);
}

function card(hit) {
  const p = hit.payload;
  const url = objectUrl(hit.url);
  const media = p.kind === "audio"
    ? el("div", { className: "sound" }, el("audio", { controls: true, preload: "none", src: url }))
    : el("img", { src: url, alt: p.caption || p.filename || "result", loading: "lazy" });
  const meta = el("dl", { dataset: { testid: "result-meta" } });
  for (const [key, value] of Object.entries(p.meta || {})) {
    meta.append(el("dt", { textContent: key }), el("dd", { textContent: typeof value === "object" ? JSON.stringify(value) : value }));
  }
  if (p.size) meta.append(el("dt", { textContent: "size" }), el("dd", { textContent: `${(p.size / 1024).toFixed(1)} KiB` }));
  const more = el("button", { type: "button", textContent: "More like this", dataset: { testid: "more-like-this" } });
  more.addEventListener("click", () => search({ item_id: hit.id }, `more like ${p.filename || hit.id}`));
  return el("li", { className: "card", dataset: { testid: "result", id: hit.id } },
    media,
    el("div", { className: "body" },
      el("p", { className: "head" },
        el("span", { className: "name", textContent: p.filename || hit.id, title: p.filename || "", dataset: { testid: "result-filename" } }),
        el("span", { className: "score", textContent: hit.score.toFixed(3), title: "similarity", dataset: { testid: "result-score" } })),
      el("p", { className: "caption", textContent: p.caption || p.transcript || "", dataset: { testid: "result-caption" } }),
      why(hit), meta, more));
}

// Why a fused hit came up: its rank in each vector's own list (the model and what it read).
function why(hit) {
  const ranks = Object.entries(hit.matched || {}).sort((a, b) => a[1] - b[1]);
  const line = el("p", { className: "why", dataset: { testid: "result-why" } });
  line.hidden = !ranks.length;
  line.append(...ranks.map(([vector, rank]) => el("span", { textContent: `#${rank} ${vector}`, title: `rank ${rank} by ${vector}` })));
  return line;
}

// The API takes media inline as data URIs and reads only image/* and audio/* ones: a file the
// browser types wrongly (or not at all) is labelled with the kind asked for, and the server
// judges its bytes. Parameters go too (MediaRecorder says "audio/webm;codecs=opus").
function dataUri(blob, kind) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => {
      const type = blob.type.split(";")[0];
      const base64 = reader.result.slice(reader.result.indexOf(",") + 1);
      resolve(`data:${type.startsWith(`${kind}/`) ? type : `${kind}/octet-stream`};base64,${base64}`);
    };
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(blob);
  });
}

async function searchFile(file, kind) {
  kind = kind || (file.type.startsWith("audio/") || AUDIO_NAME.test(file.name) ? "audio" : "image");
  if (!takes(kind)) {
    const chosen = $("vector-select").value;
    return showError(chosen === FUSED ? `No vector takes ${kind} queries.` : `${chosen} takes no ${kind} queries: choose another vector.`);
  }
  let uri;
  try {
    uri = await dataUri(file, kind);
  } catch (error) {
    return showError(`Cannot read ${file.name}: ${error.message}`);
  }
  return search({ [kind]: uri }, `${kind} ${file.name}`);
}

let recorder = null;
async function toggleRecording() {
  if (recorder) {
    if (recorder.state === "recording") recorder.stop();
    return;
  }
  // Browsers give the microphone only to secure pages: https, or http on localhost.
  if (!navigator.mediaDevices || !window.MediaRecorder) {
    return showError("Recording needs MediaRecorder and a secure page (https or localhost); upload a file instead.");
  }
  let stream;
  try {
    stream = await navigator.mediaDevices.getUserMedia({ audio: true });
  } catch (error) {
    return showError(`Microphone: ${error.message}`);
  }
  const chunks = [];
  const button = $("record-button");
  const started = Date.now();
  const tick = setInterval(() => {
    const s = Math.floor((Date.now() - started) / 1000);
    button.textContent = `■ Stop 0:${String(s).padStart(2, "0")}`;
    if (Date.now() - started > MAX_RECORDING_MS && recorder.state === "recording") recorder.stop();
  }, 250);
  recorder = new MediaRecorder(stream);
  recorder.ondataavailable = (e) => chunks.push(e.data);
  recorder.onstop = () => {
    clearInterval(tick);
    stream.getTracks().forEach((t) => t.stop()); // frees the microphone and its "recording" light
    const blob = new Blob(chunks, { type: recorder.mimeType });
    recorder = null;
    button.textContent = "● Record";
    button.setAttribute("aria-pressed", "false");
    searchFile(new File([blob], "your recording", { type: blob.type }), "audio");
  };
  recorder.start();
  button.textContent = "■ Stop 0:00";
  button.setAttribute("aria-pressed", "true");
}

function showJob(job) {
  const share = job.status === "done" ? 1 : job.progress || 0;
  $("ingest-progress").value = share;
  const items = Object.entries(job.items || {}).map(([state, n]) => `${n} ${state}`);
  const counts = Object.entries(job.counts || {}).filter(([, n]) => typeof n === "number").map(([k, n]) => `${k} ${n}`);
  // Floor, so 99.6% never reads "100%" before the job is done.
  const parts = [`${Math.floor(share * 100)}%`, job.status, items.join(", "), counts.join(", "), job.error];
  $("ingest-status").textContent = parts.filter(Boolean).join(" · ");
}

// Jobs run in the server's background and the API offers polling only; twice a second is plenty.
async function ingest(source) {
  showJob({ status: "starting" });
  let job = await api("ingest", { source });
  while (!["done", "failed"].includes(job.status)) {
    if (job.status) await new Promise((resolve) => setTimeout(resolve, 500));
    job = await api(`jobs/${encodeURIComponent(job.id)}`);
    showJob(job);
  }
  if (job.status === "failed") showError(`Ingest failed: ${job.error}`);
  await loadCatalog(); // the item count grows
}

function wire() {
  $("search-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = $("search-input").value.trim();
    if (text) search({ text }, `“${text}”`);
  });
  for (const kind of ["image", "audio"]) {
    $(`${kind}-input`).addEventListener("change", (e) => {
      if (e.target.files[0]) searchFile(e.target.files[0], kind);
      e.target.value = ""; // so choosing the same file again searches again
    });
  }
  const drop = $("drop-zone");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    if (e.dataTransfer.files[0]) searchFile(e.dataTransfer.files[0]);
  });
  // A file dropped beside the zone would otherwise make the browser leave the page to show it.
  for (const type of ["dragover", "drop"]) window.addEventListener(type, (e) => e.preventDefault());
  $("record-button").addEventListener("click", toggleRecording);
  for (const id of ["vector-select", "route-toggle", "kind-filter", "collection-filter", "filter-field", "filter-value", "top-k"]) {
    $(id).addEventListener("change", () => {
      if (id === "vector-select") applyVector();
      if (!last || JSON.stringify(options("audio" in last.query)) === last.options) return; // nothing changed
      const kind = ["text", "image", "audio"].find((k) => k in last.query);
      if (!kind || takes(kind)) search(last.query, last.label);
    });
  }
  $("ingest-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    $("ingest-start").disabled = true;
    try {
      await ingest($("ingest-source").value.trim());
    } catch (error) {
      showError(error.message);
      $("ingest-status").textContent = `failed: ${error.message}`;
    } finally {
      $("ingest-start").disabled = false;
    }
  });
}

wire();
setupKey();
loadCatalog().catch((error) => showError(`Cannot read the catalogue: ${error.message}`));
