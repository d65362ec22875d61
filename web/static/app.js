// The page: plain JavaScript over the JSON API of web/server.py (documented in README.md).
"use strict";

const $ = (selector) => document.querySelector(selector);
const TOKEN_KEY = "imagerec.operatorToken";
const state = { photo: null, modes: [], limits: null, classes: [], zip: null, job: null, poll: null, pendingAction: null };

function show(element, text) {
  element.textContent = text || "";
  element.hidden = !text;
}

function errorText(body, fallback) {
  if (!body || !body.error) return fallback || t("err_network");
  const key = "err_" + body.error;
  if (body.error === "refused") return t("err_refused", { detail: body.detail || body.message });
  return STRINGS.en[key] ? t(key) : (body.message || body.error) + (body.detail ? ` (${body.detail})` : "");
}

async function api(path, options) {
  let response;
  try {
    response = await fetch(path, options);
  } catch (e) {
    return { ok: false, status: 0, body: { error: "network" } };
  }
  let body = null;
  try { body = await response.json(); } catch (e) { body = null; }
  return { ok: response.ok, status: response.status, body };
}

// -- tabs (arrow keys move between them, as WAI-ARIA tabs do) ----------------------------------
const TABS = ["recognise", "teach", "modes"];
function selectTab(name, focus) {
  for (const tab of TABS) {
    const selected = tab === name;
    const button = $("#tab-" + tab);
    button.setAttribute("aria-selected", String(selected));
    button.tabIndex = selected ? 0 : -1;
    $("#panel-" + tab).hidden = !selected;
    if (selected && focus) button.focus();
  }
  const needsToken = name !== "recognise";
  const form = $("#token-form");
  if (needsToken && !operatorToken()) {
    $("#panel-" + name).before(form);
    form.hidden = false;
  } else {
    form.hidden = true;
  }
  if (name === "modes") loadModes();
  if (name === "teach") loadJobs();
}

function setUpTabs() {
  for (const tab of TABS) {
    const button = $("#tab-" + tab);
    button.addEventListener("click", () => selectTab(tab));
    button.addEventListener("keydown", (event) => {
      const index = TABS.indexOf(tab);
      if (event.key === "ArrowRight") selectTab(TABS[(index + 1) % TABS.length], true);
      else if (event.key === "ArrowLeft") selectTab(TABS[(index + TABS.length - 1) % TABS.length], true);
      else return;
      event.preventDefault();
    });
  }
}

// -- operator token (kept for this browser tab only) --------------------------------------------
function operatorToken() { return sessionStorage.getItem(TOKEN_KEY); }

function askForToken(message) {
  const form = $("#token-form");
  const panel = document.querySelector("[role=tabpanel]:not([hidden])");
  if (panel) panel.before(form);
  form.hidden = false;
  show($("#token-error"), message || t("token_needed"));
  $("#token").focus();
}

async function operator(path, options) {
  const token = operatorToken();
  if (!token) {
    askForToken();
    return { ok: false, status: 401, body: { error: "token_missing" } };
  }
  const headers = Object.assign({ "X-Operator-Token": token }, (options && options.headers) || {});
  const result = await api(path, Object.assign({}, options, { headers }));
  if (result.status === 401 || result.status === 403) {
    sessionStorage.removeItem(TOKEN_KEY);
    askForToken(errorText(result.body));
  }
  return result;
}

function setUpToken() {
  $("#token-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const token = $("#token").value.trim();
    const result = await api("/api/operator", { method: "POST", headers: { "X-Operator-Token": token } });
    if (!result.ok) {
      show($("#token-error"), errorText(result.body));
      return;
    }
    sessionStorage.setItem(TOKEN_KEY, token);
    $("#token").value = "";
    $("#token-form").hidden = true;
    show($("#token-error"), "");
    const current = TABS.find((tab) => $("#tab-" + tab).getAttribute("aria-selected") === "true");
    selectTab(current);
  });
}

// -- recognise ------------------------------------------------------------------------------
function modeLabel(mode) {
  const kind = mode.kind === "imagenet" ? t("imagenet") + ", " : "";
  return `${mode.name} (${kind}${t("classes_n", { n: mode.num_classes ?? mode.classes.length })}) · ${t("version", { v: mode.default })}`;
}

async function loadModes() {
  const result = await api("/api/modes");
  if (!result.ok) {
    show($("#error"), errorText(result.body));
    show($("#modes-error"), errorText(result.body));
    return;
  }
  state.modes = result.body.modes;
  const select = $("#mode");
  const previous = select.value;
  select.replaceChildren(...state.modes.map((mode) => {
    const option = document.createElement("option");
    option.value = mode.name;
    option.textContent = modeLabel(mode);
    return option;
  }));
  if (state.modes.some((m) => m.name === previous)) select.value = previous;
  describeMode();
  renderModes();
}

function describeMode() {
  const mode = state.modes.find((m) => m.name === $("#mode").value);
  if (!mode) { show($("#mode-info"), ""); return; }
  const names = mode.classes.slice(0, 12).join(", ") + (mode.classes.length > 12 ? ", …" : "");
  show($("#mode-info"), names);
}

function choosePhoto(file) {
  if (!file) return;
  state.photo = file;
  const preview = $("#preview");
  if (preview.src) URL.revokeObjectURL(preview.src);
  preview.src = URL.createObjectURL(file);  // Chromium applies EXIF orientation (image-orientation: from-image)
  preview.alt = file.name || "photo";
  preview.hidden = false;
  recognise();
}

async function recognise() {
  if (!state.photo) return;
  const mode = $("#mode").value;
  show($("#error"), "");
  $("#results").replaceChildren();
  show($("#answer-meta"), t("working"));
  const form = new FormData();
  form.append("photo", state.photo, state.photo.name || "photo");
  const result = await api("/api/recognise?mode=" + encodeURIComponent(mode), { method: "POST", body: form });
  if (mode !== $("#mode").value) return;  // the mode changed meanwhile: a newer answer follows
  if (!result.ok) {
    show($("#answer-meta"), "");
    show($("#error"), errorText(result.body));
    return;
  }
  const rows = result.body.top.map((entry) => {
    const percent = (entry.probability * 100).toFixed(1) + "%";
    const item = document.createElement("li");
    item.className = "result";
    item.dataset.label = entry.label;
    item.dataset.probability = String(entry.probability);
    item.innerHTML = '<span class="label"></span><span class="bar" role="meter" aria-valuemin="0" aria-valuemax="100"><span class="fill"></span></span><span class="pct"></span>';
    item.querySelector(".label").textContent = entry.label;
    item.querySelector(".pct").textContent = percent;
    const bar = item.querySelector(".bar");
    bar.setAttribute("aria-valuenow", (entry.probability * 100).toFixed(1));
    bar.setAttribute("aria-label", entry.label);
    item.querySelector(".fill").style.width = percent;
    return item;
  });
  $("#results").replaceChildren(...rows);
  show($("#answer-meta"), t("answered", { v: result.body.version, ms: Math.round(result.body.ms) }));
}

function setUpRecognise() {
  $("#photo").addEventListener("change", (e) => choosePhoto(e.target.files[0]));
  $("#camera").addEventListener("change", (e) => choosePhoto(e.target.files[0]));
  $("#mode").addEventListener("change", () => { describeMode(); recognise(); });
  const drop = $("#drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    choosePhoto(e.dataTransfer.files[0]);
  });
  document.addEventListener("paste", (e) => {
    if ($("#panel-recognise").hidden) return;
    const file = [...(e.clipboardData ? e.clipboardData.files : [])][0];
    if (file) choosePhoto(file);
  });
}

// -- teach ----------------------------------------------------------------------------------
function addClass(name) {
  const entry = { name: name || "", files: [] };
  state.classes.push(entry);
  renderClasses();
  return entry;
}

function renderClasses() {
  const container = $("#classes");
  container.replaceChildren(...state.classes.map((entry, index) => {
    const card = document.createElement("fieldset");
    card.className = "class-card";
    card.innerHTML = `<legend></legend>
      <div class="row"><label></label><input class="class-name" required maxlength="64"></div>
      <div class="row"><input type="file" class="visually-hidden class-photos" multiple accept="image/*"><label class="button"></label>
      <span class="count hint"></span><button type="button" class="remove"></button></div>
      <div class="thumbs"></div>`;
    const nameId = `class-name-${index}`, photosId = `class-photos-${index}`;
    card.querySelector("legend").textContent = `${t("class")} ${index + 1}`;
    const labels = card.querySelectorAll("label");
    labels[0].textContent = t("class_name"); labels[0].htmlFor = nameId;
    labels[1].textContent = t("class_photos"); labels[1].htmlFor = photosId;
    const input = card.querySelector(".class-name");
    input.id = nameId; input.value = entry.name;
    input.addEventListener("input", () => { entry.name = input.value; });
    const photos = card.querySelector(".class-photos");
    photos.id = photosId;
    photos.addEventListener("change", () => { entry.files.push(...photos.files); renderClasses(); });
    card.addEventListener("dragover", (e) => e.preventDefault());
    card.addEventListener("drop", (e) => {
      e.preventDefault();
      entry.files.push(...[...e.dataTransfer.files].filter((f) => f.type.startsWith("image/")));
      renderClasses();
    });
    card.querySelector(".count").textContent = t("photos_n", { n: entry.files.length });
    const remove = card.querySelector(".remove");
    remove.textContent = t("remove");
    remove.addEventListener("click", () => { state.classes.splice(index, 1); renderClasses(); });
    card.querySelector(".thumbs").replaceChildren(...entry.files.slice(0, 12).map((file) => {
      const img = document.createElement("img");
      img.src = URL.createObjectURL(file);
      img.alt = file.name;
      img.onload = () => URL.revokeObjectURL(img.src);
      return img;
    }));
    return card;
  }));
  const few = state.classes.filter((c) => c.files.length > 0 && c.files.length < 5)
    .map((c) => `${c.name || "?"} (${c.files.length})`);
  show($("#teach-warning"), few.length ? t("few_photos", { list: few.join(", ") }) : "");
}

// The backbones a new mode may be trained on (GET /api/status), the default first.
function renderBackboneChoices(choices) {
  $("#teach-backbone").hidden = choices.length < 2;  // one backbone: nothing to choose
  $("#backbone-choices").replaceChildren(...choices.map((choice, index) => {
    const row = document.createElement("div");
    row.className = "choice";
    const input = document.createElement("input");
    input.type = "radio";
    input.name = "backbone";
    input.value = choice.name;
    input.id = `backbone-${index}`;
    input.checked = index === 0;
    const label = document.createElement("label");
    label.htmlFor = input.id;
    label.textContent = t("backbone_" + choice.role, { name: choice.name });
    row.append(input, label);
    const hintKey = "hint_backbone_" + choice.role;  // what the choice costs, where the server measured it
    if (STRINGS.en[hintKey] && choice.cost) {
      const hint = document.createElement("p");
      hint.className = "hint";
      hint.id = `backbone-hint-${index}`;
      hint.textContent = t(hintKey, choice.cost);
      input.setAttribute("aria-describedby", hint.id);
      row.append(hint);
    }
    return row;
  }));
}

async function train(event) {
  event.preventDefault();
  show($("#teach-error"), "");
  const withPhotos = state.classes.filter((c) => c.files.length);
  if (!state.zip && withPhotos.length < 2) {
    show($("#teach-error"), t("need_classes"));
    return;
  }
  const form = new FormData();
  const backbone = document.querySelector("input[name=backbone]:checked");
  // First: the server refuses a backbone it does not offer before any photo is uploaded.
  if (backbone) form.append("backbone", backbone.value);
  form.append("name", $("#teach-name").value.trim());
  withPhotos.forEach((entry, index) => {
    form.append(`class-${index}`, entry.name.trim());
    for (const file of entry.files) form.append(`photos-${index}`, file, file.name);
  });
  if (state.zip) form.append("zip", state.zip, state.zip.name);
  $("#train").disabled = true;
  const result = await operator("/api/jobs", { method: "POST", body: form });
  $("#train").disabled = false;
  if (!result.ok) {
    show($("#teach-error"), errorText(result.body, result.body && result.body.message));
    return;
  }
  showJob(result.body);
  loadJobs();
}

async function loadJobs() {
  if (!operatorToken()) return;
  const result = await operator("/api/jobs");
  if (!result.ok) return;
  const list = $("#jobs");
  list.replaceChildren(...result.body.jobs.map((job) => {
    const item = document.createElement("li");
    const button = document.createElement("button");
    button.type = "button";
    button.className = "link job-link";
    button.dataset.job = job.id;
    button.textContent = `${job.name} v${job.version} (${job.backbone}): ${statusText(job)}`;
    button.addEventListener("click", () => showJob(job));
    item.append(button);
    return item;
  }));
  if (!state.job && result.body.jobs.length) showJob(result.body.jobs[0]);
}

function statusText(job) {
  let text = t("st_" + job.status, { p: job.queue_position || "?" });
  if (job.status === "running" && job.progress) {
    const p = job.progress;
    text += ": " + t("stage_" + p.stage, { i: p.done, n: p.total });
  }
  return text;
}

function showJob(job) {
  state.job = job;
  $("#job").hidden = false;
  $("#job").dataset.status = job.status;
  $("#job-title").textContent = `${job.name} v${job.version}`;
  show($("#job-backbone"), job.backbone ? t("trained_on", { name: job.backbone }) : "");
  $("#job-status").textContent = statusText(job);
  const progress = $("#job-progress");
  const p = job.progress;
  if (job.status === "running" && p && p.stage === "features" && p.total) {
    progress.max = p.total; progress.value = p.done;
  } else {
    progress.max = 1;
    progress.value = ["trained", "deploying", "deployed", "deploy_failed"].includes(job.status) ? 1 : 0;
  }
  const message = job.error || job.deploy_error || "";
  show($("#job-error"), job.status === "deploy_failed" || job.status === "failed" || job.status === "interrupted" ? message : "");
  $("#deploy").hidden = !["trained", "deploy_failed"].includes(job.status);
  renderEvaluation(job);
  clearTimeout(state.poll);
  if (["queued", "running", "deploying"].includes(job.status)) {
    state.poll = setTimeout(async () => {
      const result = await operator("/api/jobs/" + job.id);
      if (result.ok && state.job && state.job.id === job.id) {
        showJob(result.body);
        if (!["queued", "running", "deploying"].includes(result.body.status)) loadJobs();
      }
    }, 700);
  }
}

const pct = (x) => (x === null || x === undefined ? "–" : (x * 100).toFixed(0) + "%");

function renderEvaluation(job) {
  const evaluation = job.evaluation;
  $("#evaluation").hidden = !evaluation;
  if (!evaluation) return;
  $("#eval-accuracy").textContent = t("accuracy", { a: pct(evaluation.accuracy), n: evaluation.images });
  $("#eval-classes tbody").replaceChildren(...evaluation.classes.map((name) => {
    const row = document.createElement("tr");
    const scores = evaluation.per_class[name];
    for (const value of [name, pct(scores.precision), pct(scores.recall), scores.support]) {
      const cell = document.createElement("td");
      cell.textContent = value;
      row.append(cell);
    }
    return row;
  }));
  const table = $("#confusion");
  const head = document.createElement("tr");
  head.append(document.createElement("th"), ...evaluation.classes.map((name) => {
    const th = document.createElement("th"); th.textContent = name; th.scope = "col"; return th;
  }));
  table.replaceChildren(head, ...evaluation.confusion.map((counts, row) => {
    const tr = document.createElement("tr");
    const th = document.createElement("th"); th.textContent = evaluation.classes[row]; th.scope = "row";
    tr.append(th);
    const total = counts.reduce((a, b) => a + b, 0) || 1;
    counts.forEach((count, col) => {
      const td = document.createElement("td");
      td.textContent = count;
      const share = count / total;
      td.style.background = row === col ? `rgba(37, 99, 235, ${share})` : `rgba(220, 38, 38, ${share})`;
      if (share > 0.6) td.style.color = "white";
      tr.append(td);
    });
    return tr;
  }));
  const wrong = $("#wrong");
  if (!evaluation.wrong.length) {
    const note = document.createElement("p"); note.className = "hint"; note.textContent = t("none_wrong");
    wrong.replaceChildren(note);
    return;
  }
  if (wrong.dataset.job === job.id) return;  // already drawn
  wrong.dataset.job = job.id;
  wrong.replaceChildren(...evaluation.wrong.map((item) => {
    const figure = document.createElement("figure");
    const img = document.createElement("img");
    img.alt = item.true;
    const caption = document.createElement("figcaption");
    caption.textContent = t("was", { t: item.true, p: item.predicted, pct: pct(item.probability) });
    figure.append(img, caption);
    // Teaching photos need the token: fetched with it, shown from a blob.
    fetch(`/api/jobs/${job.id}/photo?file=${encodeURIComponent(item.file)}`, { headers: { "X-Operator-Token": operatorToken() } })
      .then((r) => (r.ok ? r.blob() : null)).then((blob) => { if (blob) img.src = URL.createObjectURL(blob); });
    return figure;
  }));
}

async function deployJob() {
  const job = state.job;
  if (!job) return;
  $("#deploy").disabled = true;
  showJob(Object.assign({}, job, { status: "deploying" }));
  const result = await operator(`/api/jobs/${job.id}/deploy`, { method: "POST" });
  $("#deploy").disabled = false;
  const fresh = await operator("/api/jobs/" + job.id);
  if (fresh.ok) showJob(fresh.body);
  if (!result.ok) show($("#job-error"), errorText(result.body));
  loadJobs();
  loadModes();
}

function setUpTeach() {
  $("#add-class").addEventListener("click", () => {
    addClass("");
    const inputs = document.querySelectorAll(".class-name");
    inputs[inputs.length - 1].focus();
  });
  $("#teach-zip").addEventListener("change", (e) => {
    state.zip = e.target.files[0] || null;
    $("#zip-name").textContent = state.zip ? state.zip.name : "";
  });
  $("#teach-form").addEventListener("submit", train);
  $("#deploy").addEventListener("click", deployJob);
  addClass("");
  addClass("");
}

// -- modes ----------------------------------------------------------------------------------
function button(text, handler, className) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = text;
  if (className) b.className = className;
  b.addEventListener("click", handler);
  return b;
}

async function modeAction(path, body, what) {
  show($("#modes-error"), "");
  show($("#modes-done"), "");
  const result = await operator(path, {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body || {}),
  });
  await loadModes();  // the table shows the new state before the confirmation does
  if (!result.ok) {
    show($("#modes-error"), errorText(result.body));
  } else {
    show($("#modes-done"), t("done_ok", { what }));
  }
}

function renderModes() {
  const container = $("#modes");
  if (!state.modes.length) {
    container.textContent = t("no_modes");
    return;
  }
  container.replaceChildren(...state.modes.map((mode) => {
    const card = document.createElement("article");
    card.className = "card mode";
    card.dataset.mode = mode.name;
    const title = document.createElement("h3");
    title.textContent = modeLabel(mode);
    const table = document.createElement("table");
    table.innerHTML = `<thead><tr><th>${t("version", { v: "" }).trim()}</th><th>${t("acc")}</th><th>${t("trained")}</th><th>${t("workers")}</th></tr></thead>`;
    const body = document.createElement("tbody");
    for (const version of mode.versions) {
      const row = document.createElement("tr");
      row.dataset.version = version.version;
      if (version.default) row.className = "default";
      const cells = [
        version.version + (version.default ? ` (${t("default")})` : ""),
        pct(version.accuracy),
        (version.trained_at || "").replace("T", " ").slice(0, 16),
        `${version.workers.filter((w) => w.status === "READY").length}/${version.workers.length}`,
      ];
      for (const value of cells) {
        const td = document.createElement("td"); td.textContent = value; row.append(td);
      }
      if (version.backbone) {  // under the version: versions of one mode may differ (fast, accurate)
        const backbone = document.createElement("span");
        backbone.className = "hint backbone";
        backbone.textContent = version.backbone;
        row.firstChild.append(document.createElement("br"), backbone);
      }
      // Actions on a row of their own: the table stays within a phone's width.
      const actionsRow = document.createElement("tr");
      actionsRow.className = "actions-row";
      actionsRow.dataset.version = version.version;
      const actions = document.createElement("td");
      actions.colSpan = 4;
      actions.className = "actions";
      if (!version.default) {
        actions.append(button(t("make_default"), () => modeAction(`/api/modes/${mode.name}/default`, { version: version.version }, `${mode.name} → v${version.version}`), "make-default"));
        actions.append(button(t("retire"), () => {
          if (confirm(t("confirm_retire", { name: mode.name, v: version.version }))) {
            modeAction(`/api/modes/${mode.name}/retire`, { version: version.version }, `${mode.name} v${version.version}`);
          }
        }, "retire"));
      }
      const workers = document.createElement("input");
      workers.type = "number"; workers.min = "1"; workers.max = "4"; workers.value = String(version.workers.length || 1);
      workers.className = "workers";
      workers.setAttribute("aria-label", `${t("workers")} ${mode.name} v${version.version}`);
      actions.append(workers, button(t("scale"), () => modeAction(`/api/modes/${mode.name}/scale`, { version: version.version, workers: Number(workers.value) }, `${mode.name} v${version.version}: ${workers.value} ${t("workers")}`), "scale"));
      actionsRow.append(actions);
      body.append(row, actionsRow);
    }
    table.append(body);
    card.append(title, table);
    if (mode.versions.length > 1) {
      card.append(button(t("rollback"), () => modeAction(`/api/modes/${mode.name}/rollback`, {}, `${mode.name} ${t("rollback")}`), "rollback"));
    }
    return card;
  }));
}

// -- start ----------------------------------------------------------------------------------
async function start() {
  translatePage();
  setUpTabs();
  setUpToken();
  setUpRecognise();
  setUpTeach();
  const status = await api("/api/status");
  if (status.ok) {
    state.limits = status.body.limits;
    renderBackboneChoices(status.body.training_backbones || []);
    if (status.body.notice) show($("#notice"), status.body.notice);
    const l = state.limits;
    $("#teach-limits").textContent = t("limits", {
      photo: Math.round(l.photo_bytes / 2 ** 20), set: Math.round(l.set_bytes / 2 ** 20), files: l.set_files, min: l.min_photos_per_class,
    });
  }
  await loadModes();
  document.body.dataset.ready = "true";
}

document.addEventListener("DOMContentLoaded", start);
