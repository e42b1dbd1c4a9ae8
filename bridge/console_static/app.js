/* webhook-bridge operator console (SPEC §9). Plain DOM, no dependencies, no build step.
   The admin token lives in sessionStorage only and travels as an Authorization header;
   every text from the gateway is set with textContent, never parsed as HTML. */
"use strict";

const API = "/api/v1";
const POLL_MS = 2000;
const KEY = "webhook-bridge.token";
const SVG = "http://www.w3.org/2000/svg";
const $ = (id) => document.getElementById(id);
let meta = null;
let current = null; // {refresh(), name} of the view on screen
let polling = false;

// -- small helpers ----------------------------------------------------------------------

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "text") el.textContent = v;
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c !== null && c !== undefined && c !== false) el.append(c.nodeType ? c : String(c));
  }
  return el;
}

function s(tag, attrs, ...children) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, v);
  for (const c of children) el.append(c);
  return el;
}

function when(ms) {
  if (!ms) return "never";
  const d = new Date(ms);
  return d.toISOString().replace("T", " ").replace(/\.\d+Z$/, "Z");
}

function ago(ms) {
  if (!ms) return "never";
  const sec = Math.max(0, Math.round((Date.now() - ms) / 1000));
  if (sec < 60) return sec + " s ago";
  if (sec < 3600) return Math.round(sec / 60) + " min ago";
  if (sec < 86400) return Math.round(sec / 3600) + " h ago";
  return Math.round(sec / 86400) + " d ago";
}

function say(text) { $("status").textContent = text; }

function stateBadge(state) {
  const label = { ENABLED: "enabled", DISABLED: "disabled",
                  DISABLED_DUE_TO_ERRORS: "disabled after errors" }[state] || state;
  return h("span", { class: "badge " + String(state).toLowerCase(), text: label });
}

// -- the API ------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, body) {
    super((body && (body.error || (body.errors || []).join("; "))) || "HTTP " + status);
    this.status = status;
    this.body = body || {};
  }
}

async function api(method, path, body) {
  const token = sessionStorage.getItem(KEY);
  if (!token) { signOut(); throw new ApiError(401, { error: "signed out" }); }
  const init = { method, cache: "no-store", credentials: "omit", redirect: "error",
                 referrerPolicy: "no-referrer",
                 headers: { Authorization: "Bearer " + token } };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  const data = response.status === 204 ? null : await response.json().catch(() => null);
  if (response.status === 401) {
    signOut("The token was refused: sign in again.");
    throw new ApiError(401, data);
  }
  if (!response.ok) throw new ApiError(response.status, data);
  return data;
}

// -- sign in and routing ---------------------------------------------------------------

function signOut(message) {
  sessionStorage.removeItem(KEY);
  current = null;
  $("view").hidden = true;
  $("view").replaceChildren();
  $("nav").hidden = true;
  $("signin").hidden = false;
  $("signin-error").textContent = message || "";
  $("token").value = "";
  $("token").focus();
}

async function signIn(event) {
  event.preventDefault();
  const token = $("token").value.trim();
  if (!token) return;
  sessionStorage.setItem(KEY, token);
  try {
    meta = await api("GET", API + "/console");
  } catch (e) {
    if (e.status !== 401) signOut(e.message);
    else $("signin-error").textContent = "Wrong token: nothing is shown without the admin token.";
    return;
  }
  $("token").value = "";
  $("version").textContent = meta.version;
  $("signin").hidden = true;
  $("nav").hidden = false;
  $("view").hidden = false;
  route();
}

async function route() {
  if (!sessionStorage.getItem(KEY) || !meta) return;
  const hash = decodeURIComponent(location.hash.slice(1) || "/");
  const parts = hash.split("/").filter(Boolean);
  let view;
  if (parts[0] === "new") view = formView(null);
  else if (parts[0] === "edit" && parts[1]) view = formView(parts[1]);
  else if (parts[0] === "webhook" && parts[1]) view = detailView(parts[1]);
  else view = listView();
  current = view;
  $("view").replaceChildren(view.root);
  await view.refresh().catch(showFailure);
  const heading = view.root.querySelector("h1");
  if (heading) { heading.tabIndex = -1; heading.focus(); }
}

function showFailure(e) {
  if (e.status === 401) return;
  const box = $("view").querySelector(".page-error");
  if (box) box.textContent = e.message;
}

async function poll() {
  if (polling || !current || document.hidden || !current.live) return;
  polling = true;
  try { await current.refresh(); } catch (e) { showFailure(e); } finally { polling = false; }
}

// -- the webhooks list ---------------------------------------------------------------------

const COLUMNS = [
  ["name", "Name"], ["description", "Description"], ["status", "State"],
  ["queued", "Queued"], ["inFlight", "In flight"], ["delivered", "Delivered"],
  ["failed", "Failed"], ["dead", "Dead"], ["attemptCount", "Attempts"],
  ["consecutiveFailures", "Consecutive failures"], ["lastTriggeredTs", "Last triggered"],
  ["lastError", "Last error"],
];

function listView() {
  const body = h("tbody");
  const empty = h("p", { class: "muted", hidden: true,
                         text: "No webhooks yet. Create one with New webhook." });
  const root = h("section", { "aria-labelledby": "list-title" },
    h("div", { class: "bar" }, h("h1", { id: "list-title", text: "Webhooks" }),
      h("a", { class: "button primary", href: "#/new", text: "New webhook" })),
    h("p", { class: "page-error err", role: "alert" }),
    h("div", { class: "table-wrap" },
      h("table", { class: "list", id: "webhooks" },
        h("caption", { class: "sr-only", text: "Webhooks, updated every 2 seconds" }),
        h("thead", {}, h("tr", {}, COLUMNS.map(([, t]) => h("th", { scope: "col", text: t })))),
        body)),
    empty);
  const rows = new Map();
  async function refresh() {
    const data = await api("GET", API + "/webhooks");
    const names = data.webhooks.map((w) => w.name);
    if (names.join("\n") !== [...rows.keys()].join("\n")) {
      rows.clear();
      body.replaceChildren(...data.webhooks.map((w) => {
        const cells = {};
        const tr = h("tr", { "data-name": w.name }, COLUMNS.map(([key, title]) => {
          cells[key] = h("td", { "data-label": title, class: "c-" + key });
          return cells[key];
        }));
        rows.set(w.name, cells);
        return tr;
      }));
    }
    for (const w of data.webhooks) fillRow(rows.get(w.name), w);
    empty.hidden = data.webhooks.length > 0;
  }
  return { root, refresh, live: true };
}

function fillRow(cells, w) {
  if (!cells.name.firstChild) {
    cells.name.append(h("a", { href: "#/webhook/" + encodeURIComponent(w.name), text: w.name }));
  }
  setText(cells.description, w.description || "");
  if (cells.status.dataset.state !== w.status) {
    cells.status.dataset.state = w.status;
    cells.status.replaceChildren(stateBadge(w.status));
  }
  for (const key of ["queued", "inFlight", "delivered", "failed", "dead", "attemptCount",
                     "consecutiveFailures"]) setText(cells[key], String(w[key] ?? 0));
  setText(cells.lastTriggeredTs, ago(w.lastTriggeredTs));
  cells.lastTriggeredTs.title = when(w.lastTriggeredTs);
  setText(cells.lastError, w.lastError || "-");
}

function setText(el, text) { if (el.textContent !== text) el.textContent = text; }

// -- one webhook: state, actions, picture, attempts, dead letters -----------------------

function detailView(name) {
  const path = API + "/webhooks/" + encodeURIComponent(name);
  const title = h("h1", { id: "detail-title", text: name });
  const badge = h("span");
  const reason = h("p", { class: "reason", hidden: true });
  const counters = h("dl", { class: "counters" });
  const actions = h("div", { class: "actions" });
  const secretBox = h("div", { class: "secret", hidden: true, role: "region",
                               "aria-label": "New signing secret" });
  const message = h("p", { class: "page-error err", role: "alert" });
  const charts = h("div", { class: "charts" });
  const attemptsBody = h("tbody");
  const deadBody = h("tbody");
  const deadInfo = h("p", { class: "muted", id: "dead-info" });
  const inspect = h("div", { class: "inspect", hidden: true });
  const root = h("section", { "aria-labelledby": "detail-title" },
    h("p", {}, h("a", { href: "#/", text: "← All webhooks" })),
    h("div", { class: "bar start" }, title, badge), reason, message, actions, secretBox, counters,
    h("h2", { text: "Last hour" }), charts,
    h("h2", { text: "Recent attempts" }),
    h("div", { class: "table-wrap" }, h("table", { id: "attempts" },
      h("thead", {}, h("tr", {}, ["Time", "Event id", "Outcome", "Status", "Latency",
                                   "Response"].map((t) => h("th", { scope: "col", text: t })))),
      attemptsBody)),
    h("h2", { text: "Dead letters" }), deadInfo,
    h("div", { class: "actions" },
      h("button", { type: "button", id: "replay-all", onclick: () => replay(null),
                    text: "Replay all" }),
      h("button", { type: "button", id: "purge-all", class: "danger", onclick: purgeAll,
                    text: "Purge all" })),
    h("div", { class: "table-wrap", id: "dead-wrap" }, h("table", { id: "dead" },
      h("thead", {}, h("tr", {}, ["Id", "Event id", "Died", "Attempts", "Status", "Reason",
                                   ""].map((t) => h("th", { scope: "col", text: t })))),
      deadBody)),
    inspect);
  let shown = null;
  let deleteArmed = false;
  let gone = false;

  async function act(label, fn) {
    message.textContent = "";
    try { await fn(); say(label); await refresh(); } catch (e) { message.textContent = e.message; }
  }
  function button(id, text, fn, cls) {
    return h("button", { type: "button", id, class: cls, onclick: () => act(text, fn), text });
  }
  function renderActions(w) {
    const key = [w.status, w.source, !!w.signing, deleteArmed].join("|");
    if (actions.dataset.key === key) return;
    actions.dataset.key = key;
    const list = [h("a", { class: "button", id: "edit", href: "#/edit/" + encodeURIComponent(name),
                           text: w.source === "api" ? "Edit" : "View settings" })];
    if (w.status === "ENABLED") {
      list.push(button("disable", "Disable", () => api("POST", path + "/disable")));
    } else {
      list.push(button("enable", w.status === "DISABLED_DUE_TO_ERRORS" ? "Re-enable" : "Enable",
                       () => api("POST", path + "/enable"), "primary"));
    }
    if (w.signing) list.push(button("rotate", "Rotate signing secret", rotate));
    if (w.source === "api") {
      list.push(deleteArmed
        ? h("button", { type: "button", id: "delete-confirm", class: "danger",
                        text: "Really delete " + name + "?", onclick: remove })
        : h("button", { type: "button", id: "delete", class: "danger", text: "Delete",
                        onclick: () => { deleteArmed = true; renderActions(shown);
                                         $("delete-confirm").focus(); } }));
    }
    actions.replaceChildren(...list);
  }
  async function remove() {
    gone = true; // no refresh of a webhook that is being deleted
    try {
      await (running || Promise.resolve()).catch(() => null);
      await api("DELETE", path);
      say("Deleted " + name);
      location.hash = "#/";
    } catch (e) {
      gone = false;
      message.textContent = e.message;
    }
  }
  async function rotate() {
    const data = await api("POST", path + "/rotate-secret");
    secretBox.replaceChildren(
      h("p", { text: "New signing secret (shown once; copy it to the receiver now):" }),
      h("code", { id: "new-secret", text: data.secret }),
      h("p", { class: "muted", text: data.note }),
      h("button", { type: "button", text: "I have copied it",
                    onclick: () => { secretBox.replaceChildren(); secretBox.hidden = true; } }));
    secretBox.hidden = false;
  }
  async function replay(id) {
    await act("Replayed", () => api("POST", path + "/dead/replay", id === null ? {} : { ids: [id] }));
  }
  async function purgeAll() {
    await act("Purged", () => api("DELETE", path + "/dead"));
  }
  async function show(id) {
    const d = await api("GET", path + "/dead/" + id);
    let event = d.event;
    try { event = JSON.stringify(JSON.parse(d.event), null, 2); } catch (e) { /* as stored */ }
    inspect.replaceChildren(
      h("h3", { id: "inspect-title", tabindex: "-1", text: "Dead letter " + d.id }),
      h("p", { text: "Reason: " + d.reason }),
      h("h4", { text: "Response excerpt (secrets redacted)" }),
      h("pre", { id: "dead-response", text: d.response || "(none)" }),
      h("h4", { text: "Event" }), h("pre", { text: event || "" }),
      h("button", { type: "button", text: "Replay this one", onclick: () => replay(d.id) }));
    inspect.hidden = false;
    $("inspect-title").focus();
  }

  let running = null;
  function refresh() {
    running = gone ? Promise.resolve() : load();
    return running;
  }
  async function load() {
    const [w, activity, dead] = await Promise.all([
      api("GET", path), api("GET", path + "/activity"), api("GET", path + "/dead")]);
    shown = w;
    badge.replaceChildren(stateBadge(w.status));
    reason.hidden = w.status === "ENABLED" || !w.lastError;
    setText(reason, w.status === "DISABLED_DUE_TO_ERRORS"
      ? "Disabled after errors: " + (w.lastError || "") : "Last error: " + (w.lastError || ""));
    renderActions(w);
    counters.replaceChildren(...[
      ["Queued", w.queued], ["In flight", w.inFlight], ["Delivered", w.delivered],
      ["Failed", w.failed], ["Dead", w.dead], ["Attempts", w.attemptCount],
      ["Consecutive failures", w.consecutiveFailures + " / " + w.failureLimit],
      ["Last triggered", ago(w.lastTriggeredTs)]].map(([k, v]) =>
      h("div", { "data-counter": k }, h("dt", { text: k }), h("dd", { text: String(v ?? 0) }))));
    charts.replaceChildren(deliveriesChart(activity.series), queueChart(activity.series));
    attemptsBody.replaceChildren(...activity.attempts.map((a) => h("tr", {},
      h("td", { "data-label": "Time", text: when(a.at) }),
      h("td", { "data-label": "Event id", class: "mono", text: a.eventId }),
      h("td", { "data-label": "Outcome" }, h("span", { class: "outcome " + a.outcome, text: a.outcome })),
      h("td", { "data-label": "Status", text: a.status === null ? "-" : String(a.status) }),
      h("td", { "data-label": "Latency", text: a.latencyMs + " ms" }),
      h("td", { "data-label": "Response", class: "excerpt",
                text: a.excerpt || a.cause || "" }))));
    if (!activity.attempts.length) {
      attemptsBody.append(h("tr", {}, h("td", { colspan: "6", class: "muted",
        text: "No attempts since the daemon started (the last " + activity.kept + " are kept)." })));
    }
    deadInfo.textContent = dead.total === 0 ? "No dead letters."
      : dead.total + " dead letter" + (dead.total === 1 ? "" : "s") +
        (dead.total > dead.deadLetters.length ? " (newest " + dead.deadLetters.length + " shown)" : "");
    const key = JSON.stringify(dead.deadLetters.map((d) => d.id));
    if (deadBody.dataset.key !== key) {
      deadBody.dataset.key = key;
      deadBody.replaceChildren(...dead.deadLetters.map((d) => h("tr", { "data-id": d.id },
        h("td", { "data-label": "Id", text: String(d.id) }),
        h("td", { "data-label": "Event id", class: "mono", text: d.eventId }),
        h("td", { "data-label": "Died", text: when(d.died) }),
        h("td", { "data-label": "Attempts", text: String(d.attempts) }),
        h("td", { "data-label": "Status", text: d.lastStatus === null ? "-" : String(d.lastStatus) }),
        h("td", { "data-label": "Reason", class: "excerpt", text: d.reason }),
        h("td", {},
          h("button", { type: "button", class: "small", "aria-label": "Inspect dead letter " + d.id,
                        text: "Inspect", onclick: () => show(d.id).catch(showFailure) }),
          h("button", { type: "button", class: "small", "aria-label": "Replay dead letter " + d.id,
                        text: "Replay", onclick: () => replay(d.id) })))));
    }
    $("replay-all").disabled = $("purge-all").disabled = dead.total === 0;
    $("dead-wrap").hidden = dead.total === 0;
  }
  return { root, refresh, live: true };
}

// -- the pictures (inline SVG, drawn here) ----------------------------------------------

const W = 600, H = 150, PAD = 28;

function frame(label, max, series) {
  const svg = s("svg", { viewBox: `0 0 ${W} ${H + 20}`, role: "img", class: "chart",
                         "aria-label": label });
  svg.append(s("title", {}, label));
  for (const f of [0, 0.5, 1]) {
    const y = PAD / 2 + (1 - f) * (H - PAD);
    svg.append(s("line", { x1: PAD, x2: W, y1: y, y2: y, class: "grid" }));
    svg.append(s("text", { x: PAD - 4, y: y + 4, class: "axis", "text-anchor": "end" },
                 String(Math.round(max * f))));
  }
  svg.append(s("text", { x: PAD, y: H + 12, class: "axis" }, "-60 min"));
  svg.append(s("text", { x: W, y: H + 12, class: "axis", "text-anchor": "end" }, "now"));
  return { svg, x: (i) => PAD + (i * (W - PAD)) / series.length,
           y: (v) => PAD / 2 + (1 - v / max) * (H - PAD), bar: (W - PAD) / series.length };
}

function figure(caption, svg, legend) {
  return h("figure", {}, svg, h("figcaption", {}, caption, " ",
    legend.map(([cls, text]) => h("span", { class: "key " + cls, text }))));
}

function deliveriesChart(series) {
  const max = Math.max(1, ...series.map((p) => p.delivered + p.failed + p.retried));
  const total = series.reduce((n, p) => n + p.delivered, 0);
  const f = frame("Deliveries per minute over the last hour: " + total + " delivered", max, series);
  series.forEach((p, i) => {
    let base = 0;
    for (const kind of ["delivered", "retried", "failed"]) {
      if (!p[kind]) continue;
      const top = f.y(base + p[kind]);
      f.svg.append(s("rect", { x: f.x(i) + 1, y: top, width: Math.max(1, f.bar - 2),
                               height: f.y(base) - top, class: "bar-" + kind },
                     s("title", {}, `${new Date(p.t).toISOString().slice(11, 16)}Z ${kind}: ${p[kind]}`)));
      base += p[kind];
    }
  });
  f.svg.id = "chart-deliveries";
  return figure("Deliveries per minute.", f.svg,
                [["delivered", "delivered"], ["retried", "retried"], ["failed", "failed"]]);
}

function queueChart(series) {
  const max = Math.max(1, ...series.map((p) => p.queued || 0));
  const f = frame("Queue depth over the last hour", max, series);
  const points = series.map((p, i) => p.queued === null ? null
    : `${(f.x(i) + f.bar / 2).toFixed(1)},${f.y(p.queued).toFixed(1)}`).filter(Boolean);
  if (points.length) f.svg.append(s("polyline", { points: points.join(" "), class: "line" }));
  f.svg.id = "chart-queue";
  return figure("Queue depth (sampled every 10 s).", f.svg, [["queued", "queued"]]);
}

// -- create and edit ----------------------------------------------------------------------

// Every key of SPEC §2's webhook, as [key path, label, kind, options]. Kinds: text, number,
// select, check, list (comma separated), area, json, lines (Name: value per line), secret.
const SECTIONS = [
  ["General", [["name", "Name (a-z, 0-9, _ and -)", "text"], ["description", "Description", "text"],
               ["enabled", "Enabled in the configuration", "check"]]],
  ["Which events", [["sources", "Sources", "sources"], ["events", "Event types", "events"],
                    ["channel", "Channel (payload.webhook_channel)", "text"],
                    ["fleets", "Fleets (labels.fleet, comma separated)", "list"],
                    ["tags", "Tags (labels.tag, comma separated)", "list"],
                    ["filter", "Filter (JMESPath over the event)", "text"]]],
  ["The request", [["url", "URL", "text"], ["method", "Method", "select", ["POST", "PUT", "PATCH"]],
                   ["content_type", "Content type", "select", ["json", "form", "text"]],
                   ["payload_only", "Body is the payload only", "check"],
                   ["envelope", "Envelope", "select", ["event", "payload", "iottly", "zerynth"]],
                   ["body", "Body template (JSON or text; overrides the envelope)", "json"],
                   ["headers", "Headers (one 'Name: value' per line)", "lines"],
                   ["allow_insecure_http", "Allow http:// (no TLS)", "check"],
                   ["proxy", "Proxy (URL, or none; empty: from the environment)", "text"]]],
  ["Authentication", [["auth.type", "Kind", "select", ["none", "basic", "bearer", "header", "oauth2"]],
                      ["auth.username", "Username", "text", null, "basic"],
                      ["auth.password", "Password", "secret", null, "basic"],
                      ["auth.token", "Token", "secret", null, "bearer"],
                      ["auth.name", "Header name", "text", null, "header"],
                      ["auth.value", "Header value", "secret", null, "header"],
                      ["auth.token_url", "Token URL", "text", null, "oauth2"],
                      ["auth.client_id", "Client id", "text", null, "oauth2"],
                      ["auth.client_secret", "Client secret", "secret", null, "oauth2"],
                      ["auth.scope", "Scope", "text", null, "oauth2"]]],
  ["Signing", [["signing.scheme", "Scheme", "select", ["", "standard-webhooks", "hmac-sha256"]],
               ["signing.secret", "Secret (empty: generated and kept by the gateway)", "secret", null, "signed"],
               ["signing.header", "Header (hmac-sha256)", "text", null, "signed"]]],
  ["Batching", [["batch.max_events", "Max events per request (empty: no batching)", "number"],
                ["batch.max_wait", "Max wait (e.g. 2s)", "text"]]],
  ["TLS", [["tls.ca_file", "CA file (path on the gateway)", "text"],
           ["tls.cert_file", "Client certificate file", "text"],
           ["tls.key_file", "Client key file", "text"],
           ["tls.verify", "Verify the server certificate", "check", null, null, true]]],
  ["Delivery policy", [["timeout", "Timeout (e.g. 10s)", "text"], ["concurrency", "Concurrency", "number"],
                       ["rate_limit", "Rate limit (e.g. 20/s)", "text"],
                       ["ordered", "Ordered per device", "check"],
                       ["retry.initial", "Retry: first wait", "text"], ["retry.max", "Retry: longest wait", "text"],
                       ["retry.max_age", "Retry: give up after", "text"],
                       ["failure_limit", "Failure limit (0: never disable)", "number"]]],
];
const PLACEHOLDER = { timeout: "10s", concurrency: "4", "retry.initial": "1s", "retry.max": "5m",
                      "retry.max_age": "7d", failure_limit: "10", url: "https://api.example.com/ingest/{device_id}",
                      "auth.name": "X-AUTH-TOKEN", "signing.header": "Biotz-IoT-Signature",
                      "batch.max_wait": "2s", rate_limit: "none" };

function fieldId(key) { return "f-" + key.replace(/[._]/g, "-"); }

function formView(name) {
  const fields = {};
  const errors = {};
  const general = h("div", { class: "err", role: "alert", id: "form-errors" });
  const result = h("div", { class: "test-result", id: "test-result", "aria-live": "polite" });
  const form = h("form", { class: "webhook-form", novalidate: true, onsubmit: save });
  for (const [title, items] of SECTIONS) {
    const fs = h("fieldset", {}, h("legend", { text: title }));
    for (const item of items) fs.append(makeField(item, fields, errors));
    form.append(fs);
  }
  const readOnly = h("p", { class: "muted", hidden: true });
  form.append(general, readOnly, h("div", { class: "actions" },
    h("button", { type: "submit", class: "primary", id: "save", text: name ? "Save changes" : "Create webhook" }),
    h("button", { type: "button", id: "test-send", text: "Send test event", onclick: testSend }),
    h("button", { type: "button", id: "check", text: "Check", onclick: () => validate(true) }),
    h("a", { class: "button", href: name ? "#/webhook/" + encodeURIComponent(name) : "#/", text: "Cancel" })),
    result);
  const root = h("section", { "aria-labelledby": "form-title" },
    h("h1", { id: "form-title", text: name ? "Edit " + name : "New webhook" }),
    h("p", { class: "page-error err", role: "alert" }), form);
  fields["auth.type"].addEventListener("change", toggle);
  fields["signing.scheme"].addEventListener("change", toggle);

  function toggle() {
    const auth = fields["auth.type"].value;
    const signed = fields["signing.scheme"].value !== "";
    for (const el of form.querySelectorAll("[data-when]")) {
      const w = el.dataset.when;
      el.hidden = w === "signed" ? !signed : w !== auth;
    }
  }

  function collect() {
    const out = {};
    for (const [key, el] of Object.entries(fields)) {
      if (el.closest("[hidden]")) continue;
      const value = readField(el);
      if (value === undefined) continue;
      const path = key.split(".");
      let target = out;
      for (const part of path.slice(0, -1)) target = target[part] = target[part] || {};
      target[path[path.length - 1]] = value;
    }
    if (out.auth && out.auth.type === "none") delete out.auth;
    if (out.signing && !out.signing.scheme) delete out.signing;
    if (out.tls && out.tls.verify === true && Object.keys(out.tls).length === 1) delete out.tls;
    return out;
  }

  function clearErrors() {
    general.replaceChildren();
    for (const [key, p] of Object.entries(errors)) {
      p.textContent = "";
      fields[key].removeAttribute("aria-invalid");
    }
  }

  function showErrors(list) {
    clearErrors();
    let first = null;
    for (const problem of list) {
      const text = problem.replace(/^api:[^:]*: /, "");
      const key = fieldFor(text.split(": ")[0]);
      if (key) {
        const p = errors[key];
        p.textContent = (p.textContent ? p.textContent + " " : "") + text;
        fields[key].setAttribute("aria-invalid", "true");
        if (!first) first = fields[key];
      } else {
        general.append(h("p", { text: problem }));
      }
    }
    if (first) first.focus();
    else if (general.firstChild) { general.tabIndex = -1; general.focus(); }
  }

  function fieldFor(path) {
    let p = path.replace(/\[\d+\]/g, "");
    while (p) {
      if (fields[p] && !fields[p].closest("[hidden]")) return p;
      if (fields[p + ".type"]) return p + ".type";
      if (fields[p + ".scheme"]) return p + ".scheme";
      if (fields[p + ".max_events"]) return p + ".max_events";
      if (fields[p + ".ca_file"]) return p + ".ca_file";
      if (fields[p + ".initial"]) return p + ".initial";
      const cut = p.lastIndexOf(".");
      if (cut < 0) break;
      p = p.slice(0, cut);
    }
    return null;
  }

  async function validate(announce) {
    let data;
    try { data = collect(); } catch (e) { showErrors([e.message]); return null; }
    const answer = await api("POST", API + "/console/check", data);
    if (answer.errors.length) { showErrors(answer.errors); return null; }
    clearErrors();
    if (announce) { general.replaceChildren(h("p", { class: "ok", text: "No problems found." })); }
    return data;
  }

  async function save(event) {
    event.preventDefault();
    try {
      const data = await validate(false);
      if (!data) return;
      const saved = name ? await api("PUT", API + "/webhooks/" + encodeURIComponent(name), data)
                         : await api("POST", API + "/webhooks", data);
      say("Saved " + saved.name);
      location.hash = "#/webhook/" + encodeURIComponent(saved.name);
    } catch (e) {
      showErrors(e.body.errors || [e.message]);
    }
  }

  async function testSend() {
    result.replaceChildren(h("p", { class: "muted", text: "Sending a test event…" }));
    try {
      const data = await validate(false);
      if (!data) { result.replaceChildren(); return; }
      const answer = await api("POST", API + "/test", { webhook: data });
      result.replaceChildren(testResult(answer));
    } catch (e) {
      result.replaceChildren();
      showErrors(e.body.errors || [e.message]);
    }
  }

  async function refresh() {
    toggle();
    if (!name) return;
    const w = await api("GET", API + "/webhooks/" + encodeURIComponent(name));
    fill(fields, w);
    fields.name.readOnly = true;
    toggle();
    if (w.source !== "api") {
      readOnly.hidden = false;
      readOnly.textContent = "This webhook is defined in a configuration file written by an operator: " +
        "edit that file (the console changes only the webhooks it created). You can still send a test event.";
      $("save").disabled = true;
    }
  }
  return { root, refresh, live: false };
}

function makeField([key, label, kind, options, showWhen, initial], fields, errors) {
  const id = fieldId(key);
  const err = h("p", { class: "err field-err", id: id + "-err" });
  errors[key] = err;
  let input;
  if (kind === "check") {
    input = h("input", { type: "checkbox", id, checked: initial === true || key === "enabled" });
    input.dataset.kind = "check";
    fields[key] = input;
    return h("div", { class: "field check", "data-when": showWhen },
      input, h("label", { for: id, text: label }), err);
  }
  if (kind === "select") {
    input = h("select", { id }, options.map((o) => h("option", { value: o, text: o || "none" })));
  } else if (kind === "sources" || kind === "events") {
    const values = kind === "sources" ? meta.sources : meta.eventTypes;
    input = h("input", { id, type: "text", autocomplete: "off", "aria-describedby": id + "-err",
                         placeholder: kind === "sources" ? "every source" : "every type but invalid" });
    input.dataset.kind = "list";
    const boxes = values.map((v, i) => {
      const box = h("input", { type: "checkbox", id: id + "-" + i, value: v });
      box.addEventListener("change", () => syncList(input, box));
      return h("span", { class: "choice" }, box, h("label", { for: id + "-" + i, text: v }));
    });
    fields[key] = input;
    input.addEventListener("input", () => syncBoxes(input));
    return h("div", { class: "field" },
      h("label", { for: id, text: label + (kind === "events"
        ? " (comma separated; globs such as device.* allowed)" : " (comma separated)") }),
      h("div", { class: "choices", role: "group", "aria-label": label }, boxes), input, err);
  } else if (kind === "area" || kind === "json" || kind === "lines") {
    input = h("textarea", { id, rows: kind === "json" ? "4" : "3", spellcheck: "false" });
  } else {
    input = h("input", { id, type: kind === "secret" ? "password" : kind === "number" ? "number" : "text",
                         autocomplete: kind === "secret" ? "new-password" : "off",
                         placeholder: PLACEHOLDER[key] || null });
  }
  input.dataset.kind = kind === "sources" || kind === "events" ? "list" : kind;
  input.setAttribute("aria-describedby", id + "-err");
  fields[key] = input;
  return h("div", { class: "field", "data-when": showWhen }, h("label", { for: id, text: label }), input, err);
}

function splitList(text) { return text.split(",").map((x) => x.trim()).filter(Boolean); }

function syncList(input, box) {
  const list = splitList(input.value).filter((v) => v !== box.value);
  if (box.checked) list.push(box.value);
  input.value = list.join(", ");
}

function syncBoxes(input) {
  const list = splitList(input.value);
  for (const box of input.parentElement.querySelectorAll(".choice input")) {
    box.checked = list.includes(box.value);
  }
}

function readField(el) {
  const kind = el.dataset.kind;
  if (kind === "check") {
    if (el.id === "f-enabled") return el.checked ? undefined : false;
    if (el.id === "f-tls-verify") return el.checked;
    return el.checked || undefined;
  }
  const text = el.value.trim();
  if (text === "") return undefined;
  if (kind === "list") return splitList(text);
  if (kind === "number") return Number(text);
  if (kind === "json") {
    try { return JSON.parse(text); } catch (e) { return text; }
  }
  if (kind === "lines") {
    const headers = {};
    for (const line of text.split("\n").map((l) => l.trim()).filter(Boolean)) {
      const cut = line.indexOf(":");
      if (cut < 1) throw new Error("headers: write each header as 'Name: value' (" + line + ")");
      headers[line.slice(0, cut).trim()] = line.slice(cut + 1).trim();
    }
    return headers;
  }
  if (el.tagName === "SELECT" && text === "" ) return undefined;
  return el.value;
}

function fill(fields, w) {
  for (const [key, el] of Object.entries(fields)) {
    let value = w;
    for (const part of key.split(".")) value = value === undefined || value === null ? undefined : value[part];
    const kind = el.dataset.kind;
    if (kind === "check") {
      el.checked = value === undefined ? el.checked : !!value;
    } else if (value === undefined || value === null) {
      el.value = "";
    } else if (kind === "list") {
      el.value = value.join(", ");
      syncBoxes(el);
    } else if (kind === "lines") {
      el.value = Object.entries(value).map(([k, v]) => k + ": " + v).join("\n");
    } else if (kind === "json") {
      el.value = typeof value === "string" ? value : JSON.stringify(value, null, 2);
    } else {
      el.value = String(value);
    }
  }
  if (w.auth === undefined) fields["auth.type"].value = "none";
  if (w.signing === undefined) fields["signing.scheme"].value = "";
}

function testResult(answer) {
  const req = answer.request;
  const res = answer.response;
  const lines = (headers) => Object.entries(headers).map(([k, v]) => k + ": " + v).join("\n");
  return h("div", { class: "card" },
    h("h2", { id: "test-title", text: "Test result: " + answer.result + (res ? " (HTTP " + res.status + ", " : " (") +
                                      answer.elapsedMs + " ms)" }),
    answer.cause ? h("p", { class: answer.delivered ? "muted" : "err", text: answer.cause }) : null,
    answer.route ? h("p", { class: "muted", text: "(" + answer.route + ")" }) : null,
    h("h3", { text: "Request (credentials masked)" }),
    h("pre", { id: "test-request", text: req.method + " " + req.url + "\n" + lines(req.headers) + "\n\n" + req.body }),
    h("h3", { text: "Response" }),
    h("pre", { id: "test-response", text: res ? "HTTP " + res.status + "\n" + lines(res.headers) + "\n\n" + res.body
                                              : "no response" }));
}

// -- start ----------------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  $("signin-form").addEventListener("submit", signIn);
  $("signout").addEventListener("click", () => signOut("Signed out."));
  window.addEventListener("hashchange", route);
  setInterval(poll, POLL_MS);
  if (sessionStorage.getItem(KEY)) {
    api("GET", API + "/console").then((m) => {
      meta = m;
      $("version").textContent = m.version;
      $("signin").hidden = true;
      $("nav").hidden = false;
      $("view").hidden = false;
      route();
    }).catch(() => {});
  } else {
    $("token").focus();
  }
});
