// Training from the page: a folder (packed here as a tar) or an archive goes to POST /training/jobs with an
// upload progress bar; the job's events (GET .../events, read as a stream: EventSource cannot send the key)
// move the training bar and draw loss and validation accuracy per epoch; cancel; try the new domain.
"use strict";

let trainJob = null;       // the job being watched
let trainReader = null;    // its event stream, cancelled when another job starts
const epochs = [];         // [{epoch, loss, val_top1}] of the watched job

// A POSIX tar (ustar) of the chosen folder's files, uncompressed: the service reads it as `--data` reads a folder.
async function tarOf(files) {
  const parts = [];
  const encoder = new TextEncoder();
  const field = (header, offset, length, text) => header.set(encoder.encode(text).subarray(0, length), offset);
  const octal = (n, width) => n.toString(8).padStart(width - 1, "0") + "\0";
  for (const file of files) {
    const path = file.webkitRelativePath || file.name;
    const name = encoder.encode(path);
    if (name.length > 255) throw new Error(`The path ${path} is too long for an archive; shorten it.`);
    const header = new Uint8Array(512);
    let prefix = "", base = path;
    if (name.length > 100) {  // ustar: up to 155 bytes of folders in the prefix field
      const cut = path.lastIndexOf("/", 155);
      prefix = path.slice(0, cut);
      base = path.slice(cut + 1);
    }
    field(header, 0, 100, base);
    field(header, 100, 8, "0000644\0");
    field(header, 108, 8, "0000000\0");
    field(header, 116, 8, "0000000\0");
    field(header, 124, 12, octal(file.size, 12));
    field(header, 136, 12, octal(Math.floor((file.lastModified || Date.now()) / 1000), 12));
    field(header, 148, 8, "        ");  // the checksum counts itself as spaces
    field(header, 156, 1, "0");
    field(header, 257, 8, "ustar\u000000");
    field(header, 345, 155, prefix);
    const sum = header.reduce((a, b) => a + b, 0);
    field(header, 148, 8, sum.toString(8).padStart(6, "0") + "\0 ");
    parts.push(header, new Uint8Array(await file.arrayBuffer()));
    const pad = (512 - (file.size % 512)) % 512;
    if (pad) parts.push(new Uint8Array(pad));
  }
  parts.push(new Uint8Array(1024));
  return new Blob(parts, { type: "application/x-tar" });
}

// POST with an upload progress bar (fetch cannot report upload progress; XMLHttpRequest can).
function postWithProgress(path, form, bar) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", path);
    for (const [name, value] of Object.entries(authHeaders())) xhr.setRequestHeader(name, value);
    xhr.upload.onprogress = (e) => { if (e.lengthComputable) bar.value = e.loaded / e.total; };
    xhr.onerror = () => reject(new Error("The upload failed: the service cannot be reached."));
    xhr.onload = () => {
      let body = null;
      try { body = JSON.parse(xhr.responseText); } catch (_) { /* not JSON */ }
      if (xhr.status >= 200 && xhr.status < 300) { bar.value = 1; resolve(body); return; }
      const detail = body && body.detail !== undefined
        ? (typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail)) : xhr.statusText;
      reject(new Error(`${xhr.status} ${body && body.error ? body.error + ": " : ""}${detail}`));
    };
    xhr.send(form);
  });
}

function drawChart() {
  const canvas = $("train-chart");
  const ctx = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height, pad = 28;
  ctx.clearRect(0, 0, w, h);
  ctx.font = "12px system-ui, sans-serif";
  ctx.fillStyle = "#5b6474";
  ctx.fillText("loss", pad, 14);
  ctx.fillStyle = "#1b8a3a";
  ctx.fillText("validation accuracy", pad + 40, 14);
  canvas.dataset.epochs = String(epochs.length);
  if (!epochs.length) return;
  const total = Math.max(epochs.length, (trainJob && trainJob.recipe.epochs) || 1);
  const maxLoss = Math.max(...epochs.map((e) => e.loss), 1e-6);
  const x = (i) => pad + (i / Math.max(total - 1, 1)) * (w - 2 * pad);
  const series = [
    ["#2456c8", (e) => e.loss / maxLoss],
    ["#1b8a3a", (e) => e.val_top1],
  ];
  for (const [color, value] of series) {
    ctx.strokeStyle = color;
    ctx.fillStyle = color;
    ctx.beginPath();
    epochs.forEach((e, i) => {
      const y = h - pad - value(e) * (h - 2 * pad);
      if (i === 0) ctx.moveTo(x(i), y); else ctx.lineTo(x(i), y);
    });
    ctx.stroke();
    epochs.forEach((e, i) => ctx.fillRect(x(i) - 2, h - pad - value(e) * (h - 2 * pad) - 2, 4, 4));
  }
}

function showJob(job, line) {
  trainJob = job;
  const total = job.recipe.epochs || 1;
  $("train-status").textContent = line || `${job.domain}: ${job.state}, epoch ${job.epochs_done} of ${total}`;
  $("train-cancel").hidden = ["succeeded", "failed", "cancelled"].includes(job.state);
}

function onEvent(kind, data) {
  const bar = $("train-progress");
  const total = trainJob.recipe.epochs || 1;
  const eta = (s) => (s === null || s === undefined ? "" : `, about ${Math.max(0, Math.round(s))} s left`);
  if (kind === "state") {
    trainJob.state = data.state;
    showJob(trainJob);
  } else if (kind === "step") {
    bar.value = (data.epoch - 1 + data.step / data.steps) / total;
    $("train-status").textContent = `${trainJob.domain}: epoch ${data.epoch} of ${total}, step ${data.step} of ${data.steps}, ` +
      `loss ${data.loss.toFixed(3)}, ${Math.round(data.images_per_s)} images/s${eta(data.eta_s)}`;
  } else if (kind === "epoch") {
    bar.value = data.epoch / total;
    epochs.push({ epoch: data.epoch, loss: data.loss, val_top1: data.val_top1 });
    drawChart();
    $("train-status").textContent = `${trainJob.domain}: epoch ${data.epoch} of ${total}, loss ${data.loss.toFixed(3)}, ` +
      `validation accuracy ${percent(data.val_top1)}${eta(data.eta_s)}`;
  } else if (kind === "end") {
    showJob(data, data.state === "succeeded"
      ? `${data.domain} succeeded: version ${data.version ?? "-"}, validation accuracy ${percent(data.accuracy)}`
      : `${data.domain} ${data.state}: ${data.reason || ""}`);
    if (data.state === "succeeded") {
      bar.value = 1;
      $("train-try").hidden = !data.serve;
      loadAdapters().catch(() => {});
    }
  }
}

// Server-sent events read from a fetch stream, so that the key goes in the Authorization header.
async function follow(job) {
  const response = await fetch(job.links.events, { headers: authHeaders() });
  if (!response.ok) throw new Error(`${response.status}: cannot follow the job`);
  trainReader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await trainReader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let kind = null, data = null;
      for (const line of block.split("\n")) {
        if (line.startsWith("event: ")) kind = line.slice(7);
        else if (line.startsWith("data: ")) data = JSON.parse(line.slice(6));
      }
      if (kind && data) onEvent(kind, data);
    }
  }
}

async function train(event) {
  event.preventDefault();
  const box = $("train-error");
  showError(box, "");
  const folder = [...$("train-folder").files];
  const archive = $("train-archive").files[0];
  if (!folder.length && !archive) { showError(box, "Choose a folder of class folders, or an archive."); return; }
  const button = $("train");
  button.disabled = true;
  if (trainReader) trainReader.cancel().catch(() => {});
  epochs.length = 0;
  $("train-job").hidden = false;
  $("train-try").hidden = true;
  $("train-upload").value = 0;
  $("train-progress").value = 0;
  $("train-status").textContent = folder.length ? `Packing ${folder.length} files...` : "Uploading...";
  try {
    const form = new FormData();
    form.append("archive", folder.length ? await tarOf(folder) : archive, folder.length ? "upload.tar" : archive.name);
    form.append("domain", $("train-domain").value.trim());
    form.append("epochs", $("train-epochs").value || "30");
    const job = await postWithProgress("/training/jobs", form, $("train-upload"));
    showJob(job);
    drawChart();
    follow(job).catch((error) => showError(box, error.message));
  } catch (error) {
    $("train-job").hidden = true;
    showError(box, error.message);
  } finally {
    button.disabled = false;
  }
}

async function cancelJob() {
  if (!trainJob) return;
  try {
    showJob(await api(trainJob.links.cancel, { method: "POST" }));
  } catch (error) {
    showError($("train-error"), error.message);
  }
}

async function tryDomain() {
  await loadAdapters().catch(() => {});
  $("domain").value = trainJob.domain;
  $("try-title").scrollIntoView();
  $("image").focus();
}

document.addEventListener("DOMContentLoaded", () => {
  $("train-form").addEventListener("submit", train);
  $("train-cancel").addEventListener("click", cancelJob);
  $("train-try").addEventListener("click", tryDomain);
});
