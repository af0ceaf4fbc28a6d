// The page: classify an image with a domain (or all), list adapters, upload and delete bundles.
"use strict";

const $ = (id) => document.getElementById(id);
let chosenFile = null;

function showError(box, message) {
  box.textContent = message;
  box.hidden = !message;
}

// The key (kept in this tab's session storage) goes with every call: with RA_API_KEYS_FILE the service
// shows and serves only the key's domains; management needs an admin key or RA_ADMIN_TOKEN.
function authHeaders() {
  const token = $("token").value.trim();
  sessionStorage.setItem("ra-token", token);
  return token ? { Authorization: "Bearer " + token } : {};
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: { ...authHeaders(), ...(options.headers || {}) } });
  let body = null;
  try { body = await response.json(); } catch (_) { /* not JSON */ }
  if (!response.ok) {
    const detail = body && body.detail !== undefined
      ? (typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail))
      : response.statusText;
    // A missing or wrong key: say where the page takes one (the server speaks of the Authorization header).
    const hint = response.status === 401 && !/API key field/.test(detail)
      ? " Enter a valid key in the API key field at the top of the page." : "";
    throw new Error(`${response.status} ${body && body.error ? body.error + ": " : ""}${detail}${hint}`);
  }
  return body;
}

function percent(x) { return (x * 100).toFixed(1) + "%"; }
const compact = new Intl.NumberFormat("en-US", { notation: "compact", maximumFractionDigits: 1 });
const known = (x) => x !== null && x !== undefined;  // a domain not loaded yet may not know some

function renderPredictions(title, predictions) {
  const block = document.createElement("div");
  block.className = "result";
  const heading = document.createElement("h3");
  heading.textContent = title;
  block.appendChild(heading);
  for (const p of predictions) {
    const row = document.createElement("div");
    row.className = "bar";
    row.setAttribute("role", "img");
    row.setAttribute("aria-label", `${p.label}: ${percent(p.score)}`);
    const label = document.createElement("span");
    label.className = "label";
    label.textContent = p.label;
    const track = document.createElement("span");
    track.className = "track";
    const fill = document.createElement("span");
    fill.className = "fill";
    fill.style.display = "block";
    fill.style.width = percent(p.score);
    track.appendChild(fill);
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = percent(p.score);
    row.append(label, track, score);
    block.appendChild(row);
  }
  return block;
}

async function loadAdapters() {
  const select = $("domain");
  const previous = select.value;
  const list = await api("/adapters").catch((error) => {  // a key that sees nothing shows nothing
    select.replaceChildren();
    $("adapters").tBodies[0].replaceChildren();
    throw error;
  });
  select.replaceChildren();
  for (const a of list.adapters) select.add(new Option(`${a.domain} (v${a.version})`, a.domain));
  if (list.adapters.length > 1) select.add(new Option("All domains", "__all__"));
  if ([...select.options].some((o) => o.value === previous)) select.value = previous;
  const body = $("adapters").tBodies[0];
  body.replaceChildren();
  for (const a of list.adapters) {
    const row = body.insertRow();
    const cells = [  // [text, class, title]: the class matches the column's header (narrow tables hide some)
      [a.domain, "domain", a.domain],
      ["v" + a.version, "col-version", ""],
      [known(a.num_classes) ? a.num_classes : "-", "num col-classes", ""],
      [known(a.val_top1) ? percent(a.val_top1) : "-", "num", ""],
      [known(a.params) ? compact.format(a.params) : "-", "num col-params",
        known(a.params) ? a.params.toLocaleString("en-US") + " parameters" : ""],
      [known(a.served) ? compact.format(a.served) : "-", "num",
        known(a.served) ? a.served.toLocaleString("en-US") + " requests" : ""],
    ];
    for (const [text, className, title] of cells) {
      const cell = row.insertCell();
      cell.textContent = text;
      if (className) cell.className = className;
      if (title) cell.title = title;
    }
    const action = row.insertCell();
    action.className = "action";
    const remove = document.createElement("button");
    remove.className = "danger";
    remove.type = "button";
    remove.textContent = "Delete";
    remove.setAttribute("aria-label", `Delete ${a.domain}`);
    remove.addEventListener("click", () => deleteAdapter(a.domain));
    action.appendChild(remove);
  }
}

async function deleteAdapter(domain) {
  showError($("admin-error"), "");
  if (!window.confirm(`Delete the domain ${domain}?`)) return;
  try {
    await api(`/adapters/${encodeURIComponent(domain)}`, { method: "DELETE" });
    $("admin-status").textContent = `Deleted ${domain}.`;
    await loadAdapters();
  } catch (error) {
    showError($("admin-error"), error.message);
  }
}

function choose(file) {
  if (!file) return;
  chosenFile = file;
  const preview = $("preview");
  preview.src = URL.createObjectURL(file);
  preview.hidden = false;
  $("drop-hint").textContent = file.name;
}

function setUpDrop() {
  const drop = $("drop");
  $("image").addEventListener("change", (e) => choose(e.target.files[0]));
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    choose(e.dataTransfer.files[0]);
  });
  drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") $("image").click(); });
}

async function classify(event) {
  event.preventDefault();
  showError($("predict-error"), "");
  const results = $("results");
  if (!chosenFile) { showError($("predict-error"), "Choose an image first."); return; }
  const form = new FormData();
  form.append("file", chosenFile);
  form.append("top_k", $("top-k").value || "5");
  const domain = $("domain").value;
  const button = $("classify");
  button.disabled = true;
  try {
    if (domain === "__all__") {
      form.append("domains", "all");
      const answer = await api("/predict", { method: "POST", body: form });
      results.replaceChildren(...answer.results.map((r) => renderPredictions(`${r.domain} (v${r.version})`, r.predictions)));
    } else {
      const answer = await api(`/predict/${encodeURIComponent(domain)}`, { method: "POST", body: form });
      results.replaceChildren(renderPredictions(`${answer.domain} (v${answer.version}), ${answer.timing.total_ms.toFixed(0)} ms`, answer.predictions));
    }
    loadAdapters().catch(() => {});
  } catch (error) {
    results.replaceChildren();
    showError($("predict-error"), error.message);
  } finally {
    button.disabled = false;
  }
}

async function upload(event) {
  event.preventDefault();
  showError($("admin-error"), "");
  $("admin-status").textContent = "";
  const file = $("bundle").files[0];
  if (!file) { showError($("admin-error"), "Choose a bundle file first."); return; }
  const form = new FormData();
  form.append("bundle", file);
  form.append("replace", $("replace").checked ? "true" : "false");
  const button = $("upload");
  button.disabled = true;
  try {
    const info = await api("/adapters", { method: "POST", body: form });
    $("admin-status").textContent = `Registered ${info.domain} version ${info.version} (${info.num_classes} classes).`;
    await loadAdapters();
  } catch (error) {
    showError($("admin-error"), error.message);
  } finally {
    button.disabled = false;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("token").value = sessionStorage.getItem("ra-token") || "";
  setUpDrop();
  $("predict-form").addEventListener("submit", classify);
  $("upload-form").addEventListener("submit", upload);
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    showError($("predict-error"), "");
    loadAdapters().catch((error) => showError($("predict-error"), "Cannot list the adapters: " + error.message));
  });
  loadAdapters().catch((error) => showError($("predict-error"), "Cannot list the adapters: " + error.message));
});
