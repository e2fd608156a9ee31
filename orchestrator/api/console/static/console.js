// The Concilium console: a client of the public API and nothing else. It asks through POST /v1/query with
// stream: true, explains the answer from its routing trace, and polls /v1/experts, /readyz and /metrics.
// Plain JavaScript with no build step and nothing from the network: the machines that serve it may be offline.
"use strict";

const KEY = "concilium-api-key";
const POLL_MS = 2000;
const HISTORY = 150; // latency samples kept for the chart: 5 minutes at one per 2 s
const ANSWERING = ["/v1/query", "/v1/chat/completions", "/v1/completions"];

const $ = (id) => document.getElementById(id);
const state = { locked: false, latency: [], last: null };

class Locked extends Error {}

function el(tag, text, attrs = {}) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
  return node;
}

function row(cells) {
  const tr = el("tr");
  for (const cell of cells) {
    const td = el("td");
    if (cell instanceof Node) td.append(cell);
    else td.textContent = cell === undefined || cell === null ? "" : String(cell);
    tr.append(td);
  }
  return tr;
}

function notice(message) {
  $("notice").textContent = message || "";
}

function headers(extra = {}) {
  const key = sessionStorage.getItem(KEY);
  return key ? { ...extra, authorization: `Bearer ${key}` } : extra;
}

async function errorOf(response) {
  try {
    const body = await response.json();
    return body.error ? `${response.status} ${body.error.type}: ${body.error.message}` : `${response.status}`;
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}

// Every guarded call goes through here: a 401 or 403 locks the page until a key that works is entered.
async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: headers(options.headers) });
  if (response.status === 401 || response.status === 403) {
    lock(await errorOf(response));
    throw new Locked(path);
  }
  return response;
}

function lock(message) {
  state.locked = true;
  $("key-form").hidden = false;
  $("ask-button").disabled = true;
  $("key-state").textContent = sessionStorage.getItem(KEY) ? "the key was refused" : "";
  notice(`This server needs an API key: ${message}`);
}

function unlock() {
  state.locked = false;
  $("ask-button").disabled = false;
  $("key-state").textContent = sessionStorage.getItem(KEY) ? "using your key" : "";
  $("key-form").hidden = !sessionStorage.getItem(KEY);
  notice("");
}

async function connect() {
  try {
    const models = await (await api("/v1/models")).json();
    unlock();
    const routers = models.data.map((m) => m.id).filter((id) => id.startsWith("concilium/"));
    const select = $("router");
    select.replaceChildren(el("option", "default", { value: "" }));
    for (const id of routers) select.append(el("option", id.slice("concilium/".length)));
    await refreshFleet(true);
  } catch (error) {
    if (!(error instanceof Locked)) notice(`Cannot reach the API: ${error.message}`);
  }
}

// ---- ask ------------------------------------------------------------------------------------------------

async function* sseEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
      if (data === "[DONE]") return;
      if (data) yield JSON.parse(data);
    }
  }
}

function askBody() {
  const body = { query: $("query").value, stream: true };
  const tokens = Number($("max-tokens").value);
  if (tokens > 0) body.max_tokens = tokens;
  if ($("router").value) body.router = $("router").value;
  if ($("k").value) body.k = Number($("k").value);
  if ($("aggregation").value) body.aggregation = $("aggregation").value;
  const ticked = [...document.querySelectorAll("#experts input:checked")].map((box) => box.value);
  if (ticked.length) body.experts = ticked;
  return body;
}

function clearAnswer() {
  for (const id of ["plan", "answer", "answer-status", "skills", "aggregator", "trace"]) $(id).textContent = "";
  $("routing").textContent = "routing…";
  for (const id of ["scores", "expert-answers"]) $(id).tBodies[0].replaceChildren();
  $("degraded").replaceChildren();
}

async function ask(event) {
  event.preventDefault();
  if (state.locked) return;
  clearAnswer();
  $("ask-button").disabled = true;
  const started = performance.now();
  try {
    const response = await api("/v1/query", {
      method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(askBody()),
    });
    if (!response.ok) {
      $("routing").textContent = "";
      $("answer-status").textContent = await errorOf(response);
      return;
    }
    for await (const message of sseEvents(response)) {
      if (message.plan) showPlan(message.plan);
      else if (message.delta !== undefined) $("answer").textContent += message.delta;
      else if (message.error) $("answer-status").textContent = `${message.error.type}: ${message.error.message}`;
      else if (message.answer !== undefined) {
        showWhy(message, performance.now() - started, response.headers.get("x-concilium-trace-id"));
      }
    }
  } catch (error) {
    if (!(error instanceof Locked)) $("answer-status").textContent = `failed: ${error.message}`;
  } finally {
    $("ask-button").disabled = state.locked;
  }
}

function showPlan(plan) {
  const who = plan.streams ? `${plan.streams} is writing the answer` : "the answer comes when it is complete";
  $("plan").textContent = `${plan.router} recruited ${plan.experts.join(", ")}: ${who} (${plan.why})`;
}

// ---- why ------------------------------------------------------------------------------------------------

function showWhy(r, elapsedMs, traceId) {
  const routing = r.routing;
  const trace = routing.trace || {};
  $("answer").textContent = r.answer;
  const parts = [`router ${routing.router}`, `mode ${routing.mode}`];
  if (trace.policy) parts.push(`policy ${trace.policy.name}, k ${trace.policy.k}`);
  if (trace.selected) parts.push(`selected: ${JSON.stringify(trace.selected)}`);
  if (trace.budget) parts.push(`budget ${JSON.stringify(trace.budget)}`);
  if (trace.rounds) parts.push(`rounds ${trace.rounds.map((x) => x.join("+")).join(" then ")}`);
  if (routing.fallback) parts.push(`fallback: ${routing.fallback}`);
  $("routing").textContent = parts.join(" · ");
  showScores(routing);
  showSkills(trace, routing.skills);
  $("aggregator").textContent = r.aggregator
    ? `aggregation ${r.aggregation} by ${r.aggregator} (chosen: ${trace.aggregator_choice || "by score"})`
    : `aggregation ${r.aggregation}, no aggregator call: ${r.aggregation_skipped}`;
  const body = $("expert-answers").tBodies[0];
  for (const a of r.answers) {
    const cost = (r.cost_by_expert || {})[a.expert];
    body.append(row([a.expert, el("div", a.text, { class: "answer-text" }), `${a.prompt_tokens} / ${a.completion_tokens}`,
      a.seconds.toFixed(2), cost === undefined ? "" : cost.toFixed(6)]));
  }
  for (const note of r.degraded) $("degraded").append(el("li", note));
  $("trace").textContent = JSON.stringify(trace, null, 2);
  const hit = r.cache || {};
  const similar = hit.similarity ? `, similarity ${hit.similarity}` : "";
  const cached = r.cached ? ` · from the ${hit.hit || ""} cache (of ${hit.of || r.id}${similar})` : "";
  const traced = traceId ? ` · trace ${traceId}` : "";
  $("answer-status").textContent = `$${r.cost_usd.toFixed(6)} · ${(elapsedMs / 1000).toFixed(2)} s · ` +
    `${r.total_usage.total_tokens} tokens${cached}${traced}`;
}

function showScores(routing) {
  const body = $("scores").tBodies[0];
  const scores = Object.entries(routing.scores).sort((a, b) => b[1] - a[1]);
  const top = Math.max(...scores.map(([, s]) => Math.abs(s)), 1e-9);
  for (const [expert, score] of scores) {
    const bar = el("span", "", { class: "bar", style: `width:${Math.round((60 * Math.abs(score)) / top)}px` });
    const cell = el("span");
    cell.append(bar, score.toFixed(3));
    const times = routing.experts.filter((e) => e === expert).length;
    body.append(row([expert, cell, times ? (times > 1 ? `yes ×${times}` : "yes") : ""]));
  }
  if (!scores.length) {
    for (const expert of routing.experts) body.append(row([expert, "", "yes"]));
  }
}

function showSkills(trace, skills) {
  const box = $("skills");
  if (trace.mapped) {
    box.append(el("div", "skills matched (keyword → profile skill, similarity):"));
    const list = el("ul");
    for (const [keyword, matches] of Object.entries(trace.mapped)) {
      list.append(el("li", `${keyword} → ${matches.map(([skill, sim]) => `${skill} (${sim})`).join(", ")}`));
    }
    box.append(list);
  } else if (skills && skills.length) {
    box.append(el("div", `skills: ${skills.join(", ")}`));
  } else if (trace.cluster !== undefined || trace.category !== undefined) {
    box.append(el("div", trace.cluster !== undefined ? `query cluster ${trace.cluster}` : `category ${trace.category}`));
  }
}

// ---- fleet and numbers ----------------------------------------------------------------------------------

async function refreshFleet(fillExperts = false) {
  if (state.locked) return;
  let experts;
  try {
    experts = await (await api("/v1/experts")).json();
  } catch (error) {
    if (!(error instanceof Locked)) $("store-state").textContent = `experts: ${error.message}`;
    return;
  }
  const body = $("fleet-table").tBodies[0];
  body.replaceChildren(...experts.map((e) => row([e.name, e.state, e.device, `${(e.memory_bytes / 2 ** 20).toFixed(0)} MiB`,
    e.node_id ? e.node_id.slice(0, 8) : "", e.in_flight, e.load_s === null ? "" : e.load_s.toFixed(1), e.error || ""])));
  if (fillExperts) {
    $("experts").replaceChildren(el("legend", "experts (none ticked: the router chooses)"));
    for (const e of experts) {
      const label = el("label");
      label.append(el("input", null, { type: "checkbox", value: e.name }), ` ${e.name}`);
      $("experts").append(label);
    }
  }
}

async function refreshReady() {
  const badge = $("ready");
  try {
    const response = await fetch("/readyz");
    const ready = await response.json();
    badge.textContent = ready.ready ? "ready" : "not ready";
    badge.className = `badge ${ready.ready ? "ok" : "bad"}`;
    const up = Object.entries(ready.experts).filter(([, ok]) => ok).length;
    $("store-state").textContent =
      `store: ${ready.store} (${ready.store_ok ? "up" : "down"}) · experts ready: ${up} of ${Object.keys(ready.experts).length}`;
  } catch {
    badge.textContent = "unreachable";
    badge.className = "badge bad";
  }
}

function parseMetrics(text) {
  const samples = [];
  for (const line of text.split("\n")) {
    const m = line.match(/^([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)/);
    if (!m || line.startsWith("#")) continue;
    const labels = {};
    for (const p of (m[2] || "").matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) labels[p[1]] = p[2];
    samples.push({ name: m[1], labels, value: Number(m[3]) });
  }
  return samples;
}

function total(samples, name, keep = () => true) {
  return samples.filter((s) => s.name === name && keep(s.labels)).reduce((sum, s) => sum + s.value, 0);
}

// A quantile of the answering endpoints' latency histogram: the upper bound of the bucket it falls in.
function quantile(samples, q) {
  const buckets = new Map();
  for (const s of samples) {
    if (s.name !== "concilium_request_seconds_bucket" || !ANSWERING.includes(s.labels.endpoint)) continue;
    buckets.set(s.labels.le, (buckets.get(s.labels.le) || 0) + s.value);
  }
  const sorted = [...buckets.entries()].map(([le, n]) => [Number(le), n]).sort((a, b) => a[0] - b[0]);
  const count = sorted.length ? sorted[sorted.length - 1][1] : 0;
  if (!count) return null;
  const hit = sorted.find(([, n]) => n >= q * count);
  return hit[0];
}

async function refreshNumbers() {
  let samples;
  try {
    const response = await fetch("/metrics", { headers: headers() });
    if (!response.ok) throw new Error(await errorOf(response));
    samples = parseMetrics(await response.text());
  } catch (error) {
    $("figures").replaceChildren(el("dt", "metrics"), el("dd", error.message));
    return;
  }
  const answering = (labels) => ANSWERING.includes(labels.endpoint);
  const ms = (s) => (s === null ? "–" : Number.isFinite(s) ? `≤ ${(s * 1000).toFixed(0)} ms` : "> the largest bucket");
  const windows = total(samples, "concilium_windows_total");
  const figures = [
    ["requests", total(samples, "concilium_requests_total")],
    ["latency p50", ms(quantile(samples, 0.5))],
    ["latency p95", ms(quantile(samples, 0.95))],
    ["loads per window", windows ? (total(samples, "concilium_model_loads_total") / windows).toFixed(2) : "–"],
    ["cache hits", `${total(samples, "concilium_cache_total", (l) => l.result === "hit")} of ${total(samples, "concilium_cache_total")}`],
    ["consensus skips", total(samples, "concilium_consensus_skips_total")],
    ["tokens generated", total(samples, "concilium_generated_tokens_total")],
  ];
  $("figures").replaceChildren(...figures.flatMap(([name, value]) => [el("dt", name), el("dd", value)]));
  const now = {
    sum: total(samples, "concilium_request_seconds_sum", answering),
    count: total(samples, "concilium_request_seconds_count", answering),
  };
  if (state.last) {
    const n = now.count - state.last.count;
    state.latency.push(n > 0 ? (now.sum - state.last.sum) / n : null);
    state.latency = state.latency.slice(-HISTORY);
  }
  state.last = now;
  drawChart();
}

function drawChart() {
  const svg = $("latency-chart");
  const values = state.latency;
  const top = Math.max(...values.filter((v) => v !== null), 0.001);
  const points = values
    .map((v, i) => (v === null ? null : `${(400 * i) / (HISTORY - 1)},${115 - (100 * v) / top}`))
    .filter((p) => p !== null);
  const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
  line.setAttribute("points", points.join(" "));
  const label = document.createElementNS("http://www.w3.org/2000/svg", "text");
  label.setAttribute("x", "4");
  label.setAttribute("y", "11");
  label.textContent = `max ${(top * 1000).toFixed(0)} ms`;
  svg.replaceChildren(line, label);
}

async function poll() {
  await Promise.all([refreshReady(), refreshFleet(), refreshNumbers()]);
}

// ---- keys and reload ------------------------------------------------------------------------------------

async function saveKey(event) {
  event.preventDefault();
  const key = $("api-key").value.trim();
  if (key) sessionStorage.setItem(KEY, key);
  else sessionStorage.removeItem(KEY);
  $("api-key").value = "";
  await connect();
}

async function reload() {
  const response = await fetch("/v1/admin/reload", { method: "POST", headers: headers() });
  if (response.ok) {
    const r = await response.json();
    notice(`Reloaded: added [${r.added}], removed [${r.removed}], changed [${r.changed}]; routers [${r.routers}]`);
    await refreshFleet(true);
  } else {
    notice(response.status === 401 || response.status === 403
      ? `Reload needs an admin key: ${await errorOf(response)}` : `Reload refused: ${await errorOf(response)}`);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("ask-form").addEventListener("submit", ask);
  $("key-form").addEventListener("submit", saveKey);
  $("reload").addEventListener("click", reload);
  connect().then(poll);
  setInterval(poll, POLL_MS);
});
