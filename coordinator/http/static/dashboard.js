// The hivefold dashboard: polls the coordinator's JSON API and redraws. No build step, no dependencies
// beyond the vendored uPlot. Names come from volunteers: everything they send is escaped before display.
"use strict";

const STATUS_EVERY_MS = 2000, HISTORY_EVERY_MS = 5000;
const $ = (id) => document.getElementById(id);
const esc = (s) => String(s ?? "").replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
const num = (x, digits = 0) => x == null ? "—" : Number(x).toLocaleString(undefined, {maximumFractionDigits: digits, minimumFractionDigits: digits});
const pct = (x) => x == null ? "—" : `${Math.round(100 * x)}%`;
const si = (x) => x == null ? "—" : x >= 1e9 ? `${(x / 1e9).toFixed(2)} G` : x >= 1e6 ? `${(x / 1e6).toFixed(2)} M` : x >= 1e3 ? `${(x / 1e3).toFixed(1)} k` : `${Math.round(x)}`;

function ago(seconds) {
  seconds = Math.max(0, seconds);
  for (const [unit, size] of [["d", 86400], ["h", 3600], ["m", 60]]) if (seconds >= size) return `${Math.floor(seconds / size)}${unit} ago`;
  return `${Math.floor(seconds)}s ago`;
}

function duration(seconds) {
  if (seconds == null) return "—";
  const h = Math.floor(seconds / 3600), m = Math.floor((seconds % 3600) / 60), s = Math.floor(seconds % 60);
  return h ? `${h}h ${m}m` : m ? `${m}m ${s}s` : `${s}s`;
}

async function getJSON(path) {
  const r = await fetch(path, {cache: "no-store"});
  if (!r.ok) throw new Error(`${path}: HTTP ${r.status}`);
  return r.json();
}

// --- charts ------------------------------------------------------------------------------------

const charts = {};
window.hivefoldCharts = charts;  // for tests and the curious: the uPlot instances by element id

function chart(id, series, data, opts = {}) {
  const el = $(id);
  const width = Math.max(300, el.clientWidth || 400);
  if (!charts[id]) {
    el.textContent = "";
    charts[id] = new uPlot({width, height: 210, series: [{}, ...series], legend: {live: false},
      scales: {x: {time: opts.time !== false}}, axes: [{}, {size: 60}], ...opts.uplot}, data, el);
    el.dataset.empty = "false";
  } else {
    charts[id].setData(data);
  }
}

// Train and validation losses are measured at different token counts: one x axis, gaps bridged per series.
function lossData(train, val) {
  const xs = [...new Set([...train.map((p) => p[0]), ...val.map((p) => p[0])])].sort((a, b) => a - b);
  const t = new Map(train.map((p) => [p[0], p[1]])), v = new Map(val.map((p) => [p[0], p[1]]));
  return [xs, xs.map((x) => t.get(x) ?? null), xs.map((x) => v.get(x) ?? null)];
}

function drawHistory(h) {
  if (h.train_loss.length || h.val_loss.length) {
    chart("c-loss", [
      {label: "train", stroke: "#2563eb", spanGaps: true},
      {label: "validation", stroke: "#d97706", width: 2, spanGaps: true, points: {show: true}},
    ], lossData(h.train_loss, h.val_loss), {time: false, uplot: {axes: [{values: (u, v) => v.map(si), label: "tokens"}, {size: 60}]}});
  }
  if (h.swarm.length) {
    const t = h.swarm.map((r) => r[0]);
    chart("c-rate", [{label: "samples/s", stroke: "#15803d", fill: "rgba(21,128,61,.08)"}], [t, h.swarm.map((r) => r[2])]);
    chart("c-peers", [{label: "peers", stroke: "#7c3aed", paths: uPlot.paths.stepped({align: 1})}], [t, h.swarm.map((r) => r[1])]);
    chart("c-util", [{label: "utilization %", stroke: "#db2777"}], [t, h.swarm.map((r) => r[3] == null ? null : 100 * r[3])]);
  }
}

// --- status ------------------------------------------------------------------------------------

let sortKey = "credit", sortAsc = false, lastStatus = null;

function drawStatus(s) {
  lastStatus = s;
  const run = s.run || {};
  $("run-id").textContent = s.run_id;
  const m = run.model;
  $("run-desc").textContent = [
    m ? `${m.n_layer} layers × ${m.d_model} wide, ${si(m.parameters)} parameters` : null,
    run.seq_len ? `${run.seq_len} tokens/sequence` : null,
    s.averaging ? `${s.averaging}${run.averaging && s.averaging === "diloco" ? ` (${run.averaging.inner_steps} inner steps, ${run.averaging.compression})` : ""}` : null,
    run.corpus || null,
  ].filter(Boolean).join(" · ");
  $("t-step").textContent = num(s.global_step);
  $("t-tokens").textContent = si(s.tokens_trained);
  $("t-rate").textContent = num(s.samples_per_second, 1);
  $("t-peers").textContent = `${s.peers_online} / ${s.peers.length}`;
  $("t-util").textContent = pct(s.utilization);
  $("t-train").textContent = s.train_loss == null ? "—" : s.train_loss.toFixed(3);
  $("t-val").textContent = s.val_loss == null ? "—" : s.val_loss.toFixed(3);
  // Progress toward the token budget when the operator set one, else through the current data pass.
  const b = s.token_budget, p = b || s.data_pass_progress || {};
  $("t-pass-label").textContent = b ? `token budget ${si(b.tokens)}` : `data pass ${s.data_pass} · shards ${s.shards.done}/${s.shards.total}`;
  $("t-bar").style.width = `${100 * (s.run_complete ? 1 : p.fraction || 0)}%`;
  $("t-eta").textContent = s.run_complete ? `run complete: ${s.run_complete.why}` :
    p.fraction == null ? "—" : `${pct(p.fraction)} done · ETA ${p.eta_seconds == null ? "—" : duration(p.eta_seconds)}`;
  const k = s.keeper;
  $("keeper").textContent = k ? (k.warning ? `keeper: ${k.warning}` : k.checkpoint_step != null ? `latest checkpoint at step ${k.checkpoint_step}` : "no checkpoint yet") : "";
  $("keeper").className = k && k.warning ? "error" : "muted";
  const v = s.verification, vs = run.verification;
  $("verification").textContent = !v || !vs ? "" : !vs.segments ? "verification off: results are credited unchecked" :
    `verification: ${num(v.checked)} results checked (${pct(v.share_checked)}) · ${num(v.valid)} valid, ` +
    `${num(v.invalid)} invalid, ${num(v.awaiting_proof + v.queued)} waiting` +
    (v.keeper_seconds_per_check == null ? "" : ` · keeper ${v.keeper_seconds_per_check.toFixed(2)} s a check ` +
      `(shards trained in ${v.train_seconds_per_check.toFixed(2)} s)`);
  drawPeers();
  drawLeaderboard(s.peers, s.teams);
}

function drawPeers() {
  const s = lastStatus;
  if (!s) return;
  const now = s.time;
  const peers = [...s.peers].sort((a, b) => {
    const x = a[sortKey], y = b[sortKey];
    const c = typeof x === "string" ? String(x).localeCompare(String(y)) : (x ?? -Infinity) - (y ?? -Infinity);
    return sortAsc ? c : -c;
  });
  $("peer-count").textContent = `${s.peers_online} online of ${s.peers.length}`;
  // One string, one DOM write: quick with a thousand peers.
  document.querySelector("#peers tbody").innerHTML = peers.map((p) => `<tr>
    <td class="name" title="${esc(p.peer_id)}">${esc(p.name)}</td><td>${esc(p.team || "")}</td><td>${esc(p.device || "?")}</td>
    <td class="num">${esc(p.micro_batch || "?")}</td><td class="num">${num(p.samples_per_second, 1)}</td>
    <td class="num">${pct(p.utilization)}</td><td class="num">${num(p.shards_done)}</td><td class="num">${num(p.credit, 1)}</td>
    <td class="num">${p.recent_loss == null ? "—" : p.recent_loss.toFixed(3)}</td>
    <td class="num" title="${verifiedTitle(p)}">${verified(p)}</td>
    <td class="${p.online && !p.banned ? "online" : "offline"}" title="${esc(p.ban_reason || p.pause_reason || "")}">${
      p.banned ? "banned" : (p.online ? (p.paused ? "paused" : "online") : "seen " + ago(now - p.last_seen)) +
      (p.poison_reports ? `, reported by ${p.poison_reports}` : "")}</td></tr>`).join("");
  document.querySelectorAll("#peers th").forEach((th) => {
    th.classList.toggle("sorted", th.dataset.key === sortKey);
    th.classList.toggle("asc", th.dataset.key === sortKey && sortAsc);
  });
}

// Results the keeper checked: "3 ok", "2 ok, 1 bad"; the reputation and Gauntlet-style score in the tooltip.
function verified(p) {
  if (!p.results_valid && !p.results_invalid) return "—";
  return `${num(p.results_valid)} ok` + (p.results_invalid ? `, ${num(p.results_invalid)} bad` : "");
}

function verifiedTitle(p) {
  const score = p.contribution_score == null ? "" : `, held-out loss change ${p.contribution_score.toFixed(4)}`;
  return esc(`reputation ${p.reputation == null ? "—" : p.reputation.toFixed(2)}, ${p.valid_streak || 0} valid in a row${score}`);
}

function drawLeaderboard(peers, teams) {
  const top = [...peers].sort((a, b) => b.credit - a.credit).slice(0, 10);
  $("leaderboard").innerHTML = top.map((p) => `<li>${esc(p.name)}${p.team ? ` <span class="muted">[${esc(p.team)}]</span>` : ""} <span class="muted">${num(p.credit, 1)} points · ${num(p.shards_done)} shards</span></li>`).join("");
  $("teams").innerHTML = (teams || []).slice(0, 10).map((t) => `<li>${esc(t.team)} <span class="muted">${num(t.points, 1)} points · ${num(t.shards)} shards · ${num(t.peers)} peers</span></li>`).join("");
  $("teams-head").hidden = !(teams && teams.length);
}

function drawEvents(events, now) {
  const what = {
    run_created: "run created", peer_registered: "joined", peer_left: "left", lease_expired: "lease expired",
    lease_released: "handed a lease back", result_rejected_late: "result rejected (late)",
    result_invalid: "result failed verification", peer_banned: "banned", checkpoint: "checkpoint",
    data_pass_started: "data pass started", run_complete: "run complete", leases_resumed: "coordinator restarted, leases resumed",
  };
  $("events").innerHTML = events.map((e) => `<li>${e.peer ? `<b>${esc(e.peer)}</b> ` : ""}${esc(what[e.kind] || e.kind)}` +
    `${e.shard_id != null ? ` (shard ${esc(e.shard_id)})` : ""}${["checkpoint", "peer_left", "run_complete", "result_invalid", "peer_banned"].includes(e.kind) ? ` <span class="muted">${esc(e.detail)}</span>` : ""}` +
    ` <span class="when">${ago(now - e.at)}</span></li>`).join("");
}

document.querySelectorAll("#peers th").forEach((th) => th.addEventListener("click", () => {
  if (sortKey === th.dataset.key) sortAsc = !sortAsc; else { sortKey = th.dataset.key; sortAsc = th.dataset.key === "name"; }
  drawPeers();
}));

// --- polling -----------------------------------------------------------------------------------

let lastOk = null;

async function pollStatus() {
  try {
    const [s, events] = await Promise.all([getJSON("/api/status"), getJSON("/api/events?limit=30")]);
    drawStatus(s);
    drawEvents(events, s.time);
    lastOk = Date.now();
    $("error").hidden = true;
  } catch (e) {
    $("error").hidden = false;
    $("error").textContent = `cannot reach the coordinator (${e.message}); retrying`;
  }
  setTimeout(pollStatus, STATUS_EVERY_MS);
}

async function pollHistory() {
  try { drawHistory(await getJSON("/api/history")); } catch (e) { /* pollStatus reports the coordinator's state */ }
  setTimeout(pollHistory, HISTORY_EVERY_MS);
}

setInterval(() => {
  const f = $("freshness");
  if (lastOk == null) return;
  const age = (Date.now() - lastOk) / 1000;
  f.textContent = `updated ${ago(age)}`;
  f.className = age > 10 ? "stale" : "muted";
}, 1000);

window.addEventListener("resize", () => {
  for (const [id, u] of Object.entries(charts)) u.setSize({width: Math.max(300, $(id).clientWidth), height: 210});
});

pollStatus();
pollHistory();
