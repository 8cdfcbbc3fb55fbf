// busway dashboard: renders the snapshots /api/events streams (server-sent events).
"use strict";
(function () {
  const HISTORY_MS = 5 * 60 * 1000;
  const COLORS = ["#2f6fdf", "#e67e22", "#27ae60", "#8e44ad", "#c0392b", "#16a085", "#d4ac0d", "#7f8c8d"];
  const state = { snapshot: null, points: [], dlqQueue: null, token: sessionStorage.getItem("busway-token") || "" };
  const $ = (id) => document.getElementById(id);
  const esc = (s) => String(s === null || s === undefined ? "" : s)
    .replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;").replace(/"/g, "&quot;");
  const fmt = (n) => (n === null || n === undefined) ? "-" : (Math.round(n * 10) / 10).toLocaleString();

  function headers() {
    return state.token ? { Authorization: "Bearer " + state.token } : {};
  }

  async function action(method, url, body) {
    const init = { method, headers: Object.assign({ "Content-Type": "application/json" }, headers()) };
    if (body) init.body = JSON.stringify(body);
    const response = await fetch(url, init);
    let json = {};
    try { json = await response.json(); } catch (e) { /* empty body */ }
    if (!response.ok) throw new Error((json && json.error) || response.status + " " + response.statusText);
    return json;
  }

  function updateAuth() {
    const enabled = state.snapshot && state.snapshot.actions_enabled;
    $("auth-state").textContent = !enabled ? "read-only (no token configured)" : state.token ? "token set" : "read-only: enter the token for actions";
    document.querySelectorAll("button.action").forEach((b) => { b.disabled = !enabled || !state.token; });
  }

  $("token-button").addEventListener("click", async () => {
    const token = window.prompt("Token for actions (replay, purge, retry, abort):", state.token);
    if (token === null) return;
    state.token = token.trim();
    sessionStorage.setItem("busway-token", state.token);
    if (state.token) {
      const r = await fetch("/api/auth", { headers: headers() });
      if (r.status !== 204) { window.alert("The server refused this token (" + r.status + ")"); }
    }
    updateAuth();
  });

  // ------------------------------------------------------------ chart
  function drawChart() {
    const canvas = $("chart");
    const ratio = window.devicePixelRatio || 1;
    const width = canvas.clientWidth, height = canvas.clientHeight;
    if (canvas.width !== width * ratio) { canvas.width = width * ratio; canvas.height = height * ratio; }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, width, height);
    const now = Date.now(), left = 48, bottom = height - 20, top = 8, right = width - 48;
    const totals = {};
    state.points.forEach((p) => Object.entries(p.topics).forEach(([t, v]) => { totals[t] = (totals[t] || 0) + v; }));
    const topics = Object.keys(totals).sort((a, b) => totals[b] - totals[a]).slice(0, COLORS.length);
    let max = 1, maxDepth = 1;
    state.points.forEach((p) => {
      topics.forEach((t) => { max = Math.max(max, p.topics[t] || 0); });
      maxDepth = Math.max(maxDepth, p.depth || 0);
    });
    const first = state.points.length ? state.points[0].at_ms : now;
    const span = Math.min(HISTORY_MS, Math.max(30000, now - first));
    const x = (at) => left + (right - left) * (1 - (now - at) / span);
    ctx.strokeStyle = "#e3e6eb"; ctx.fillStyle = "#6b7385"; ctx.font = "11px system-ui"; ctx.lineWidth = 1;
    for (let i = 0; i <= 4; i++) {
      const y = bottom - (bottom - top) * i / 4;
      ctx.beginPath(); ctx.moveTo(left, y); ctx.lineTo(right, y); ctx.stroke();
      ctx.textAlign = "right"; ctx.fillText(fmt(max * i / 4) + "/s", left - 4, y + 4);
      ctx.textAlign = "left"; ctx.fillText(fmt(maxDepth * i / 4), right + 4, y + 4);
    }
    ctx.textAlign = "center";
    for (let i = 0; i <= 5; i++) {
      const ago = span * i / 5;
      const label = i === 0 ? "now" : ago >= 60000 ? "-" + (ago / 60000).toFixed(1) + "m" : "-" + Math.round(ago / 1000) + "s";
      ctx.fillText(label, x(now - ago), height - 4);
    }
    const line = (values, color, dashed) => {
      ctx.strokeStyle = color; ctx.lineWidth = 2; ctx.setLineDash(dashed ? [5, 4] : []);
      ctx.beginPath();
      values.forEach(([at, v, scale], i) => {
        const px = x(at), py = bottom - (bottom - top) * v / scale;
        if (i === 0) ctx.moveTo(px, py); else ctx.lineTo(px, py);
      });
      ctx.stroke(); ctx.setLineDash([]);
    };
    topics.forEach((t, i) => line(state.points.map((p) => [p.at_ms, p.topics[t] || 0, max]), COLORS[i], false));
    line(state.points.map((p) => [p.at_ms, p.depth || 0, maxDepth]), "#1d2330", true);
    $("legend").innerHTML = topics.length === 0
      ? '<span class="muted">no events published since the dashboard started</span>'
      : topics.map((t, i) => '<span><i style="background:' + COLORS[i] + '"></i>' + esc(t) + "</span>").join("");
  }

  // ------------------------------------------------------------ panels
  function renderQueues(s) {
    const filter = $("queue-filter").value.trim();
    const rows = filter ? s.queues.filter((q) => q.queue.includes(filter)) : s.queues;
    $("queue-count").textContent = s.queues_error ? s.queues_error : s.queues.length + " queues";
    const html = new Array(rows.length);
    for (let i = 0; i < rows.length; i++) {
      const q = rows[i];
      const dead = q.dead_lettered > 0
        ? '<a href="#dlq" class="dead" data-queue="' + esc(q.queue) + '">' + q.dead_lettered + "</a>"
        : '<a href="#dlq" data-queue="' + esc(q.queue) + '">0</a>';
      html[i] = '<tr data-name="' + esc(q.queue) + '"><td>' + esc(q.queue) + '</td><td class="num">' + q.ready +
        '</td><td class="num">' + q.delayed + '</td><td class="num">' + q.in_flight + '</td><td class="num">' +
        q.consumers + '</td><td class="num">' + dead + '</td><td class="num">' +
        (q.acked_per_s === null ? '<span class="muted" title="not available on this backend">n/a</span>' : fmt(q.acked_per_s)) + "</td></tr>";
    }
    $("queues").tBodies[0].innerHTML = html.join("");
  }

  function renderSagas(s) {
    const b = s.sagas || {};
    if (!b.available) {
      $("saga-board").innerHTML = '<p class="muted">' + esc(b.reason || "not available on this backend") + "</p>";
      $("saga-failures").tBodies[0].innerHTML = "";
      return;
    }
    const rate = b.completion_rate === null ? "-" : (b.completion_rate * 100).toFixed(1) + "%";
    const tile = (label, value, id) => '<div class="tile" id="' + id + '"><b>' + esc(value) + "</b>" + label + "</div>";
    $("saga-board").innerHTML = tile("running", b.running, "sagas-running") + tile("completed", b.completed, "sagas-completed") +
      tile("compensated", b.compensated, "sagas-compensated") + tile("failed", b.failed, "sagas-failed") +
      tile("completion rate", rate, "sagas-rate");
    $("saga-failures").tBodies[0].innerHTML = (b.recent_failures || []).map((f) =>
      "<tr><td><code>" + esc(f.id) + "</code></td><td>" + esc(f.status) + '</td><td class="reason">' + esc(f.error) + "</td><td>" +
      (f.status === "failed"
        ? '<button class="action" data-retry="' + esc(f.id) + '">Retry</button> <button class="action danger" data-abort="' + esc(f.id) + '">Abort</button>'
        : "") + "</td></tr>").join("") || '<tr><td colspan="4" class="muted">none</td></tr>';
  }

  function renderSide(s) {
    const h = s.health || {};
    const badge = $("health");
    badge.textContent = h.ready ? "ready" : h.live ? "not ready" : "down";
    badge.className = "badge " + (h.ready ? "ok" : "bad");
    $("checks").innerHTML = (h.checks || []).map((c) =>
      '<li class="' + (c.ok ? "ok" : "bad") + '"><b>' + esc(c.name) + "</b> " + esc(c.detail) + "</li>").join("");
    $("rpc").textContent = s.rpc && s.rpc.available === false ? s.rpc.reason : JSON.stringify(s.rpc);
    const breakers = (s.circuits && s.circuits.breakers) || [];
    $("circuits").innerHTML = breakers.length === 0
      ? '<p class="muted">none registered in this process</p>'
      : "<table><tbody>" + breakers.map((c) => "<tr><td>" + esc(c.name) + "</td><td>" + esc(c.state) + "</td></tr>").join("") + "</tbody></table>";
    const p = s.projections || {};
    $("projections").innerHTML = !p.available
      ? '<p class="muted">' + esc(p.reason || "not available on this backend") + "</p>"
      : (p.projections.length === 0 ? '<p class="muted">no projections with a checkpoint (log head ' + p.head + ")</p>"
        : '<table><thead><tr><th>Projection</th><th class="num">Checkpoint</th><th class="num">Head</th><th class="num">Lag</th></tr></thead><tbody>' +
          p.projections.map((r) => "<tr><td>" + esc(r.projection) + '</td><td class="num">' + (r.checkpoint === null ? "-" : r.checkpoint) +
            '</td><td class="num">' + r.head + '</td><td class="num">' + r.lag + "</td></tr>").join("") + "</tbody></table>");
    $("backend").textContent = s.backend;
    $("updated").textContent = "updated " + new Date(s.at_ms).toLocaleTimeString() + " (read in " + s.sample_ms + " ms)";
  }

  function render(s) {
    const started = performance.now();
    state.snapshot = s;
    state.points.push({ at_ms: s.at_ms, topics: s.topics, depth: s.queues.reduce((n, q) => n + q.ready + q.delayed + q.in_flight, 0) });
    while (state.points.length && state.points[0].at_ms < Date.now() - HISTORY_MS) state.points.shift();
    renderQueues(s);
    renderSagas(s);
    renderSide(s);
    drawChart();
    updateAuth();
    window.buswayRenders = (window.buswayRenders || 0) + 1;
    window.buswayLastRenderMs = performance.now() - started;
  }

  // ------------------------------------------------------------ dead letters
  async function openDlq(queue) {
    state.dlqQueue = queue;
    $("dlq").classList.remove("hidden");
    $("dlq-queue").textContent = queue;
    $("dlq-result").textContent = "";
    await loadDlq();
    $("dlq").scrollIntoView();
  }

  async function loadDlq() {
    const queue = state.dlqQueue;
    const r = await fetch("/api/dlq/" + encodeURIComponent(queue));
    const data = await r.json();
    if (!r.ok) { $("dlq-result").textContent = data.error; return; }
    $("dlq-count").textContent = data.count + " in " + data.dead_letter_queue + (data.count > data.letters.length ? " (first " + data.letters.length + " shown)" : "");
    $("dlq-letters").tBodies[0].innerHTML = data.letters.map((l) =>
      "<tr><td><code>" + esc(l.id) + "</code></td><td>" + esc(l.kind) + '</td><td class="reason">' + esc(l.reason) + '</td><td class="num">' +
      esc(l.attempts) + '</td><td class="num">' + esc(l.age_s) + 's</td><td class="reason"><code>' + esc(JSON.stringify(l.payload)).slice(0, 160) + "</code></td></tr>"
    ).join("") || '<tr><td colspan="6" class="muted">no dead letters</td></tr>';
  }

  document.addEventListener("click", async (e) => {
    const t = e.target;
    if (t.dataset && t.dataset.queue) { e.preventDefault(); openDlq(t.dataset.queue); return; }
    try {
      if (t.dataset && t.dataset.retry) {
        await action("POST", "/api/sagas/" + encodeURIComponent(t.dataset.retry) + "/retry");
      } else if (t.dataset && t.dataset.abort) {
        const reason = window.prompt("Why abort saga " + t.dataset.abort + "?", "aborted from the dashboard");
        if (reason !== null) await action("POST", "/api/sagas/" + encodeURIComponent(t.dataset.abort) + "/abort", { reason });
      }
    } catch (err) { window.alert(err.message); }
  });
  $("dlq-close").addEventListener("click", () => { $("dlq").classList.add("hidden"); state.dlqQueue = null; });
  $("dlq-replay").addEventListener("click", async () => {
    try {
      const r = await action("POST", "/api/dlq/" + encodeURIComponent(state.dlqQueue) + "/replay");
      $("dlq-result").textContent = r.replayed + " replayed, " + r.left + " left";
    } catch (err) { $("dlq-result").textContent = "refused: " + err.message; }
    loadDlq();
  });
  $("dlq-purge").addEventListener("click", async () => {
    if (!window.confirm("Delete every dead letter of " + state.dlqQueue + " for good?")) return;
    try {
      const r = await action("POST", "/api/dlq/" + encodeURIComponent(state.dlqQueue) + "/purge");
      $("dlq-result").textContent = r.purged + " purged, " + r.left + " left";
    } catch (err) { $("dlq-result").textContent = "refused: " + err.message; }
    loadDlq();
  });
  $("queue-filter").addEventListener("input", () => { if (state.snapshot) renderQueues(state.snapshot); });
  window.addEventListener("resize", drawChart);

  // ------------------------------------------------------------ live updates
  fetch("/api/throughput").then((r) => r.json()).then((h) => {
    state.points = h.points.concat(state.points).filter((p, i, all) => i === 0 || p.at_ms > all[i - 1].at_ms);
    drawChart();
  }).catch(() => {});
  const source = new EventSource("/api/events");
  source.addEventListener("snapshot", (e) => render(JSON.parse(e.data)));
  source.onerror = () => { $("health").textContent = "disconnected"; $("health").className = "badge bad"; };
})();
