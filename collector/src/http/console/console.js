// The flowattr console: one page over the control plane's JSON. No library: the map's layout
// is layered (clients left of their servers), which reads well for service graphs and lays
// out 500 services in milliseconds.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const state = { map: null, metricsHistory: [], historyLoaded: false, healthTimer: null };
// What the browser test and the load measurement read.
window.flowattrConsole = state;

function token() {
  return sessionStorage.getItem("flowattr-token") || "";
}

async function api(path) {
  const headers = token() ? { Authorization: "Bearer " + token() } : {};
  const response = await fetch(path, { headers });
  const text = await response.text();
  if (!response.ok) {
    let message = text;
    try { message = JSON.parse(text).error || text; } catch (_) { /* plain text */ }
    throw new Error(`${path.split("?")[0]}: ${response.status} ${message}`);
  }
  return text;
}

// Nanosecond times exceed what a JavaScript number holds exactly: fields named `*_ns` are
// read as BigInt from their source text.
function parseJson(text) {
  return JSON.parse(text, (key, value, context) =>
    key.endsWith("_ns") && context && typeof value === "number" ? BigInt(context.source) : value);
}

function element(tag, attributes = {}, text) {
  const node = tag.startsWith("svg:")
    ? document.createElementNS(SVG, tag.slice(4))
    : document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

function setStatus(id, message, isError) {
  const status = document.getElementById(id);
  status.textContent = message;
  status.classList.toggle("error", Boolean(isError));
}

function formatBytes(bytes) {
  const units = ["B", "kB", "MB", "GB", "TB"];
  let value = bytes, unit = 0;
  while (value >= 1000 && unit < units.length - 1) { value /= 1000; unit++; }
  return `${value.toFixed(value < 10 && unit ? 1 : 0)} ${units[unit]}`;
}

function formatInstant(nanos) {
  return new Date(Number(BigInt(nanos) / 1000000n)).toISOString();
}

// ---- Service map ----

function nodeKind(name) {
  if (name.startsWith("unattributed:")) return "unattributed";
  if (name === "unknown") return "unknown";
  return "workload";
}

// Layers: a node sits one layer right of its rightmost client, cycles broken where a
// depth-first walk meets a node on its own path.
function layout(names, edges) {
  const servers = new Map(names.map((name) => [name, []]));
  const clients = new Map(names.map((name) => [name, []]));
  for (const edge of edges) {
    if (edge.client === edge.server) continue;
    servers.get(edge.client).push(edge.server);
    clients.get(edge.server).push(edge.client);
  }
  const layer = new Map();
  const onPath = new Set();
  const visit = (name) => {
    if (layer.has(name)) return layer.get(name);
    onPath.add(name);
    let depth = 0;
    for (const client of clients.get(name)) {
      if (!onPath.has(client)) depth = Math.max(depth, visit(client) + 1);
    }
    onPath.delete(name);
    layer.set(name, depth);
    return depth;
  };
  // Iterative deepening would avoid recursion limits; service graphs are shallow.
  for (const name of names) visit(name);
  const columns = [];
  for (const name of names) {
    const column = layer.get(name);
    (columns[column] = columns[column] || []).push(name);
  }
  // Order each column by the mean position of its clients, so edges cross less.
  const row = new Map();
  columns.forEach((column, index) => {
    if (index > 0) {
      const mean = (name) => {
        const rows = clients.get(name).filter((c) => row.has(c)).map((c) => row.get(c));
        return rows.length ? rows.reduce((a, b) => a + b, 0) / rows.length : Infinity;
      };
      const keys = new Map(column.map((name) => [name, mean(name)]));
      column.sort((a, b) => keys.get(a) - keys.get(b) || a.localeCompare(b));
    } else {
      column.sort((a, b) => a.localeCompare(b));
    }
    column.forEach((name, position) => row.set(name, position));
  });
  return { columns, layer, row };
}

function renderMap(graph) {
  const started = performance.now();
  const showUnattributed = document.getElementById("show-unattributed").checked;
  const edges = graph.edges.filter((edge) => showUnattributed || edge.attributed);
  const names = [...new Set(edges.flatMap((edge) => [edge.client, edge.server]))].sort();
  const { columns, layer, row } = layout(names, edges);
  const boxWidth = 190, boxHeight = 22, columnGap = 110, rowGap = 8;
  const x = (name) => 10 + layer.get(name) * (boxWidth + columnGap);
  const y = (name) => 10 + row.get(name) * (boxHeight + rowGap);
  const width = 20 + columns.length * (boxWidth + columnGap);
  const height = 20 + Math.max(1, ...columns.map((c) => c.length)) * (boxHeight + rowGap);
  const svg = element("svg:svg", { width, height, id: "map-svg" });
  const maxConnections = Math.max(1, ...edges.map((edge) => edge.connections));
  // Connections each client made in the window, to say what share went unattributed.
  const clientTotals = new Map();
  const clientUnattributed = new Map();
  for (const edge of edges) {
    clientTotals.set(edge.client, (clientTotals.get(edge.client) || 0) + edge.connections);
    if (nodeKind(edge.server) === "unattributed") {
      clientUnattributed.set(edge.client, (clientUnattributed.get(edge.client) || 0) + edge.connections);
    }
  }
  const edgeGroup = element("svg:g");
  for (const edge of edges) {
    const x1 = x(edge.client) + boxWidth, y1 = y(edge.client) + boxHeight / 2;
    const x2 = x(edge.server), y2 = y(edge.server) + boxHeight / 2;
    const bend = Math.max(40, Math.abs(x2 - x1) / 2);
    const d = x2 > x1
      ? `M${x1},${y1} C${x1 + bend},${y1} ${x2 - bend},${y2} ${x2},${y2}`
      : `M${x1},${y1} C${x1 + 80},${y1 - 60} ${x2 - 80},${y2 - 60} ${x2},${y2}`;
    const share = (clientUnattributed.get(edge.client) || 0) / (clientTotals.get(edge.client) || 1);
    const path = element("svg:path", {
      d,
      class: "edge" + (edge.attributed ? "" : " unattributed"),
      "stroke-width": (1 + 5 * Math.sqrt(edge.connections / maxConnections)).toFixed(2),
      "data-client": edge.client,
      "data-server": edge.server,
      "data-connections": edge.connections,
      "data-bytes": edge.bytes,
      "data-unattributed-share": share.toFixed(4),
    });
    path.appendChild(element("svg:title", {},
      `${edge.client} → ${edge.server}: ${edge.connections} connections, ${formatBytes(edge.bytes)}; ` +
      `${(100 * share).toFixed(1)}% of ${edge.client}'s connections unattributed`));
    path.addEventListener("click", () => showEdge(edge, share, path));
    edgeGroup.appendChild(path);
  }
  const nodeGroup = element("svg:g");
  for (const name of names) {
    const group = element("svg:g", {
      class: "node " + nodeKind(name),
      "data-name": name,
      transform: `translate(${x(name)},${y(name)})`,
    });
    group.appendChild(element("svg:rect", { width: boxWidth, height: boxHeight, rx: 4 }));
    const label = name.length > 28 ? name.slice(0, 27) + "…" : name;
    group.appendChild(element("svg:text", { x: 6, y: 15 }, label));
    group.appendChild(element("svg:title", {}, name));
    nodeGroup.appendChild(group);
  }
  svg.append(edgeGroup, nodeGroup);
  const map = document.getElementById("map");
  map.replaceChildren(svg);
  state.map = { names, edges, renderMs: performance.now() - started };
  document.body.dataset.mapRendered = String(performance.now());
}

function showEdge(edge, share, path) {
  document.querySelectorAll(".edge.selected").forEach((e) => e.classList.remove("selected"));
  path.classList.add("selected");
  const panel = document.getElementById("edge-panel");
  panel.hidden = false;
  panel.replaceChildren(
    element("h2", {}, `${edge.client} → ${edge.server}`),
    element("p", {}, `${edge.connections} connections (${edge.flows} reports), ${formatBytes(edge.bytes)}. ` +
      `${(100 * share).toFixed(1)}% of ${edge.client}'s connections in this window are unattributed.`),
  );
  const samples = edge.samples || [];
  if (!samples.length) {
    panel.appendChild(element("p", { class: "status" }, "no sample connections in this window"));
    return;
  }
  const table = element("table", { id: "edge-samples" });
  table.appendChild(tableRow("th", ["client", "server", "started (UTC)", "bytes", "state"]));
  for (const sample of samples) {
    const row = tableRow("td", [sample.client, sample.server,
      formatInstant(sample.start_ns).slice(11, 23), formatBytes(sample.bytes), sample.state]);
    row.title = `started ${formatInstant(sample.start_ns)}, last seen ${formatInstant(sample.end_ns)}`;
    table.appendChild(row);
  }
  panel.appendChild(table);
}

function tableRow(cell, values, attributes = {}) {
  const tr = element("tr", attributes);
  for (const value of values) tr.appendChild(element(cell, {}, String(value)));
  return tr;
}

async function loadMap() {
  const window_ = document.getElementById("window").value;
  setStatus("map-status", "loading…");
  try {
    const query = window_ ? `?window=${encodeURIComponent(window_)}` : "";
    const region = parseJson(await api("/v1/region/deps" + query));
    const list = document.getElementById("region-nodes");
    list.replaceChildren(...region.nodes.map((node) => {
      const chip = element("span", {
        class: "region-node" + (node.status === "ok" ? "" : " missing"),
        "data-node": node.node,
        "data-status": node.status,
        title: node.error || "",
      }, node.status === "ok" ? node.node : `${node.node}: missing`);
      return chip;
    }));
    renderMap(region);
    const missing = region.nodes.filter((node) => node.status !== "ok").length;
    setStatus("map-status", `${state.map.names.length} services, ${state.map.edges.length} edges` +
      (missing ? `; ${missing} node(s) missing: their connections are not in this map` : ""), missing > 0);
  } catch (error) {
    setStatus("map-status", error.message, true);
  }
}

// ---- Who owned an IP ----

async function lookUp(event) {
  event.preventDefault();
  const ip = document.getElementById("lookup-ip").value.trim();
  const port = document.getElementById("lookup-port").value.trim();
  const at = document.getElementById("lookup-at").value.trim() || String(Date.now() * 1000000);
  const params = new URLSearchParams({ ip });
  if (port) params.set("port", port);
  setStatus("lookup-status", "asking…");
  try {
    const owner = parseJson(await api(`/v1/owner?${params}&at=${encodeURIComponent(at)}`));
    const history = parseJson(await api(`/v1/history?${params}`));
    showLookup(owner, history, at);
    setStatus("lookup-status", "");
  } catch (error) {
    setStatus("lookup-status", error.message, true);
  }
}

function atNanos(at) {
  if (/^\d+$/.test(at)) return BigInt(at);
  return BigInt(Date.parse(at)) * 1000000n;
}

function showLookup(owner, history, at) {
  const answer = document.getElementById("lookup-answer");
  answer.replaceChildren();
  answer.dataset.owner = owner.owner || "";
  answer.dataset.unattributed = owner.unattributed || "";
  if (owner.owner) {
    answer.append("owned by ", element("strong", {}, owner.owner));
    if (owner.owner_platform && owner.owner_platform.namespace) {
      answer.append(` (namespace ${owner.owner_platform.namespace}` +
        (owner.owner_platform.instance ? `, ${owner.owner_platform.instance}` : "") + ")");
    }
  } else {
    answer.append("unattributed: ", element("strong", {}, owner.unattributed || "no answer"));
  }
  const instant = atNanos(at);
  const segments = history.segments;
  const table = document.getElementById("lookup-segments");
  table.replaceChildren(tableRow("th", ["from", "until", "state", "holder", "namespace", "reported by"]));
  for (const segment of segments) {
    const holds = BigInt(segment.start_ns) <= instant && instant < BigInt(segment.end_ns);
    const claimants = segment.claimants || [];
    const notKept = segment.claimants_complete === false ? ["(others not kept)"] : [];
    const holder = segment.state === "contested"
      ? [...claimants.map((claimant) => claimant.workload), ...notKept].join(" and ")
      : segment.holder || "";
    const reported = segment.state === "contested" && claimants.length
      ? claimants.map((claimant) => `${claimant.workload}: ${describeEvidence(claimant.evidence)}`).join("\n")
      : describeEvidence(segment.evidence);
    table.appendChild(tableRow("td", [
      formatInstant(segment.start_ns), formatInstant(segment.end_ns),
      segment.state === "contested" ? "contested: two or more owners reported" : segment.state,
      holder, (segment.holder_platform && segment.holder_platform.namespace) || "",
      reported,
    ], { class: `segment ${segment.state}` + (holds ? " at" : ""), "data-start": segment.start_ns, "data-end": segment.end_ns }));
  }
  if (!segments.length) {
    table.appendChild(tableRow("td", ["no evidence is held for this IP"]));
  }
  timeline(segments, instant, BigInt(history.horizon_ns));
}

// Who reported the evidence that last shaped a segment, and when this node last heard from it.
function describeEvidence(evidence) {
  if (!evidence) return "not kept";
  const heard = `last heard ${formatInstant(evidence.last_heard_ns).slice(0, 19)}Z`;
  return evidence.kind === "exporter"
    ? `exporter ${evidence.exporter} (connection ${evidence.sender}), received by ${evidence.node}; ${heard}`
    : evidence.exporter
      ? `exporter ${evidence.exporter}, over the broadcast from ${evidence.node}; ${heard}`
      : `${evidence.node}, over the broadcast; ${heard}`;
}

function timeline(segments, instant, horizon) {
  const box = document.getElementById("lookup-timeline");
  box.replaceChildren();
  if (!segments.length) return;
  const starts = segments.map((s) => BigInt(s.start_ns));
  const ends = segments.map((s) => BigInt(s.end_ns));
  let low = starts.reduce((a, b) => (b < a ? b : a), instant);
  let high = ends.reduce((a, b) => (b > a ? b : a), instant);
  if (high === low) high = low + 1n;
  const width = 900, span = Number(high - low);
  const place = (t) => 10 + ((width - 20) * Number(t - low)) / span;
  const svg = element("svg:svg", { width, height: 44 });
  const colours = { held: "#54aeff", contested: "#d1242f", unnamed: "#d4a72c" };
  segments.forEach((segment, index) => {
    const x1 = place(starts[index]), x2 = Math.max(place(ends[index]), x1 + 1);
    const rect = element("svg:rect", { x: x1, y: 10, width: x2 - x1, height: 18, fill: colours[segment.state] || "#8c959f" });
    rect.appendChild(element("svg:title", {}, `${segment.state} ${segment.holder || ""}`));
    svg.appendChild(rect);
  });
  if (horizon > low) {
    svg.appendChild(element("svg:rect", { x: 10, y: 30, width: Math.max(0, place(horizon) - 10), height: 3, fill: "#8c959f" }));
  }
  svg.appendChild(element("svg:line", { x1: place(instant), x2: place(instant), y1: 4, y2: 40, stroke: "#1d2329", "stroke-width": 2 }));
  box.appendChild(svg);
}

// ---- Health ----

// Prometheus text to [{name, labels, value}]: the lines this node writes, nothing more.
function parseMetrics(text) {
  const samples = [];
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const match = line.match(/^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)/);
    if (!match) continue;
    const labels = {};
    for (const pair of (match[3] || "").matchAll(/([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g)) {
      labels[pair[1]] = pair[2];
    }
    samples.push({ name: match[1], labels, value: Number(match[4]) });
  }
  return samples;
}

function sum(samples, name, filter = () => true) {
  return samples.filter((s) => s.name === name && filter(s.labels)).reduce((a, s) => a + s.value, 0);
}

// The node's own samples of the last hour, so the trend starts before the page opened.
async function loadHealthHistory() {
  const history = parseJson(await api("/v1/health/history"));
  state.metricsHistory = history.samples.map((sample) => ({
    at: Number(sample.at_ns / 1000000n),
    reasons: Object.fromEntries(sample.flows_unattributed),
  }));
  state.historyLoaded = true;
}

async function pollHealth() {
  try {
    if (!state.historyLoaded) await loadHealthHistory();
    const samples = parseMetrics(await api("/metrics"));
    const now = Date.now();
    const reasons = {};
    // Emitted flows by result: every result but `attributed` is a reason a flow was not named.
    for (const sample of samples.filter((s) => s.name === "flowattr_flows_emitted_total" && s.labels.result !== "attributed")) {
      reasons[sample.labels.result] = (reasons[sample.labels.result] || 0) + sample.value;
    }
    state.metricsHistory.push({ at: now, reasons });
    if (state.metricsHistory.length > 720) state.metricsHistory.shift();
    renderHealth(samples);
    const since = new Date(state.metricsHistory[0].at).toLocaleTimeString();
    setStatus("health-status", `trend since ${since} (the node samples every 10 s and keeps an hour; this page adds a sample every 5 s); last ${new Date(now).toLocaleTimeString()}`);
  } catch (error) {
    setStatus("health-status", error.message, true);
  }
}

function renderHealth(samples) {
  const history = state.metricsHistory;
  const chart = document.getElementById("health-unattributed");
  chart.replaceChildren();
  const reasons = [...new Set(history.flatMap((point) => Object.keys(point.reasons)))].sort();
  const table = element("table");
  table.appendChild(tableRow("th", ["reason", "total", "per second now", "trend"]));
  for (const reason of reasons) {
    const rates = [];
    for (let i = 1; i < history.length; i++) {
      const seconds = (history[i].at - history[i - 1].at) / 1000;
      rates.push(Math.max(0, ((history[i].reasons[reason] || 0) - (history[i - 1].reasons[reason] || 0)) / seconds));
    }
    const tr = tableRow("td", [reason, history[history.length - 1].reasons[reason] || 0,
      rates.length ? rates[rates.length - 1].toFixed(1) : "…", ""], { "data-reason": reason });
    tr.lastChild.appendChild(sparkline(rates));
    table.appendChild(tr);
  }
  if (!reasons.length) table.appendChild(tableRow("td", ["none yet"]));
  chart.appendChild(table);

  const buffered = sum(samples, "flowattr_delay_buffered_bytes");
  const flows = sum(samples, "flowattr_delay_buffered_flows");
  const failing = sum(samples, "flowattr_delay_storage_failing");
  document.getElementById("health-buffer").replaceChildren(
    element("p", { id: "buffer-fill", "data-bytes": buffered },
      `${formatBytes(buffered)} buffered, ${flows} flows waiting for their delay` +
      (failing ? "; storage is failing: the node is not acking" : "")));

  const peers = document.getElementById("health-peers");
  peers.replaceChildren(tableRow("th", ["peer", "silent for", "evidence complete through"]));
  for (const sample of samples.filter((s) => s.name === "flowattr_broadcast_peer_silence_seconds")) {
    const through = samples.find((s) => s.name === "flowattr_broadcast_peer_complete_through_seconds" && s.labels.peer === sample.labels.peer);
    peers.appendChild(tableRow("td", [sample.labels.peer, `${sample.value.toFixed(1)} s`,
      through ? new Date(through.value * 1000).toISOString() : ""]));
  }
  // The lag histogram's mean since the start: what a peer's update took to be applied here.
  const lagSum = sum(samples, "flowattr_broadcast_lag_seconds_sum");
  const lagCount = sum(samples, "flowattr_broadcast_lag_seconds_count");
  if (peers.rows.length === 1) peers.appendChild(tableRow("td", ["no cluster peers (no [cluster] brokers)"]));
  else if (lagCount) peers.appendChild(tableRow("td", ["broadcast lag, mean since start", `${(1000 * lagSum / lagCount).toFixed(0)} ms`, ""]));

  const exporters = document.getElementById("health-exporters");
  exporters.replaceChildren(tableRow("th", ["exporter", "clock offset", "uncertainty", "records refused", "last batch"]));
  for (const sample of samples.filter((s) => s.name === "flowattr_exporter_clock_offset_seconds")) {
    const exporter = sample.labels.exporter;
    const uncertainty = samples.find((s) => s.name === "flowattr_exporter_clock_uncertainty_seconds" && s.labels.exporter === exporter);
    const refused = sum(samples, "flowattr_records_refused_total", (labels) => labels.exporter === exporter);
    const last = samples.find((s) => s.name === "flowattr_exporter_last_batch_timestamp_seconds" && s.labels.exporter === exporter);
    const behind = last ? `${Math.max(0, Date.now() / 1000 - last.value).toFixed(0)} s ago` : "";
    exporters.appendChild(tableRow("td", [exporter, `${(sample.value * 1000).toFixed(2)} ms`,
      uncertainty ? `±${(uncertainty.value * 1000).toFixed(2)} ms` : "", refused, behind], { "data-exporter": exporter }));
  }
  const others = sum(samples, "flowattr_records_refused_total", (labels) => labels.exporter === "other");
  exporters.appendChild(tableRow("td", ["batches refused, all exporters", "", "", sum(samples, "flowattr_batches_refused_total"), ""]));
  exporters.appendChild(tableRow("td", ["frames and connections refused at ingest", "", "", sum(samples, "flowattr_ingest_rejections_total"), ""]));
  if (others) exporters.appendChild(tableRow("td", ["records refused, exporters past the label cap", "", "", others, ""]));
}

function sparkline(values) {
  const width = 160, height = 24;
  const svg = element("svg:svg", { width, height });
  if (values.length < 2) return svg;
  const top = Math.max(1e-9, ...values);
  const points = values.map((v, i) => `${(width * i) / (values.length - 1)},${height - 2 - ((height - 4) * v) / top}`);
  svg.appendChild(element("svg:polyline", { points: points.join(" "), fill: "none", stroke: "#d1242f" }));
  return svg;
}

// ---- Page ----

function show(view) {
  for (const button of document.querySelectorAll("nav button")) {
    button.classList.toggle("active", button.dataset.view === view);
  }
  for (const section of document.querySelectorAll(".view")) {
    section.hidden = section.id !== "view-" + view;
  }
  clearInterval(state.healthTimer);
  if (view === "health") {
    pollHealth();
    state.healthTimer = setInterval(pollHealth, 5000);
  }
  history.replaceState(null, "", "#" + view);
}

document.querySelectorAll("nav button").forEach((button) =>
  button.addEventListener("click", () => show(button.dataset.view)));
document.getElementById("refresh").addEventListener("click", loadMap);
document.getElementById("window").addEventListener("change", loadMap);
document.getElementById("show-unattributed").addEventListener("change", () => state.map && loadMap());
document.getElementById("lookup-form").addEventListener("submit", lookUp);
const tokenInput = document.getElementById("token");
tokenInput.value = token();
tokenInput.addEventListener("change", () => {
  sessionStorage.setItem("flowattr-token", tokenInput.value);
  loadMap();
});
document.getElementById("node").textContent = location.host;
show((location.hash || "#map").slice(1));
loadMap();
