// notification-hub admin page. Plain JavaScript, no build step, no dependencies.
//
// Everything goes through the public interfaces any client uses:
//   REST   POST /api/v1/auth/login, /auth/refresh, /auth/logout, GET /users/me,
//          GET /api/v1/admin/stats (polled), POST /api/v1/notifications,
//          GET /api/v1/webhooks and /webhooks/{id}/deliveries;
//   WS     /ws/notifications?token=…, subscribed to `admin` and `global` (protocol §3),
//          with heartbeat pings, in-band token refresh and `since` recovery on reconnect.
// Tokens live in memory only: reloading the page signs out.
(() => {
  "use strict";

  const API = "/api/v1";
  const CHANNELS = ["admin", "global"];
  const params = new URLSearchParams(location.search);
  const POLL_MS = clamp(Number(params.get("poll")) || 2000, 250, 60000);
  const WEBHOOK_POLL_MS = Math.max(POLL_MS * 5, 1000);
  const NODE_STALE_MS = Math.max(POLL_MS * 4, 10000);
  const HISTORY_POINTS = 60;
  const FEED_MAX = 50;
  const WEBHOOKS_SHOWN = 5;
  const DELIVERIES_SHOWN = 10;
  const RECONNECT_MAX_MS = 30000;

  const $ = (id) => document.getElementById(id);
  const state = {
    access: null,
    refresh: null,
    refreshTimer: null,
    pollTimer: null,
    webhookTimer: null,
    ws: null,
    wsRetries: 0,
    wsTimer: null,
    pingTimer: null,
    offsets: {},
    nodes: new Map(),
    series: { connections: [], rate: [] },
    signedIn: false,
  };

  function clamp(value, low, high) {
    return Math.min(high, Math.max(low, value));
  }

  // -- REST ------------------------------------------------------------------------------
  async function api(method, path, body) {
    const headers = { Accept: "application/json" };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    if (state.access) headers.Authorization = "Bearer " + state.access;
    let response;
    try {
      response = await fetch(API + path, {
        method,
        headers,
        body: body === undefined ? undefined : JSON.stringify(body),
        cache: "no-store",
      });
    } catch (error) {
      return { status: 0, ok: false, payload: null, message: "Network error: " + error.message };
    }
    let payload = null;
    try {
      payload = await response.json();
    } catch (error) {
      payload = null;
    }
    const message =
      payload && payload.error ? payload.error.message : response.ok ? "" : "HTTP " + response.status;
    return { status: response.status, ok: response.ok, payload, message };
  }

  function setTokens(data) {
    state.access = data.access_token;
    state.refresh = data.refresh_token;
    clearTimeout(state.refreshTimer);
    const seconds = Number(data.expires_in) || 3600;
    state.refreshTimer = setTimeout(refreshTokens, Math.max(5, seconds * 0.8) * 1000);
  }

  async function refreshTokens() {
    if (!state.refresh) return false;
    const res = await api("POST", "/auth/refresh", { refresh_token: state.refresh });
    if (!res.ok) {
      signOut("Your session has ended; sign in again.");
      return false;
    }
    setTokens(res.payload.data);
    if (state.ws && state.ws.readyState === WebSocket.OPEN) {
      state.ws.send(JSON.stringify({ type: "refresh", token: state.access }));
    }
    return true;
  }

  // -- sign in and out ---------------------------------------------------------------------
  function showLoginError(text) {
    const el = $("login-error");
    el.textContent = text;
    el.hidden = !text;
  }

  async function onLogin(event) {
    event.preventDefault();
    showLoginError("");
    const button = $("login-submit");
    button.disabled = true;
    try {
      const res = await api("POST", "/auth/login", {
        email: $("login-email").value.trim(),
        password: $("login-password").value,
      });
      if (!res.ok) {
        showLoginError(res.message || "Sign-in failed.");
        return;
      }
      setTokens(res.payload.data);
      const stats = await api("GET", "/admin/stats");
      if (!stats.ok) {
        const text =
          stats.status === 403 ? "This account is not an administrator." : stats.message;
        await api("POST", "/auth/logout");
        clearSession();
        showLoginError(text);
        return;
      }
      $("login-password").value = "";
      enterDashboard(stats.payload.data);
    } finally {
      button.disabled = false;
    }
  }

  function clearSession() {
    state.signedIn = false;
    state.access = null;
    state.refresh = null;
    clearTimeout(state.refreshTimer);
    clearInterval(state.pollTimer);
    clearInterval(state.webhookTimer);
    clearTimeout(state.wsTimer);
    clearInterval(state.pingTimer);
    const ws = state.ws;
    state.ws = null;
    if (ws) ws.close(1000);
    state.offsets = {};
    state.nodes.clear();
    state.series = { connections: [], rate: [] };
  }

  function signOut(message) {
    clearSession();
    $("dashboard").hidden = true;
    $("session").hidden = true;
    $("login-view").hidden = false;
    showLoginError(message || "");
  }

  async function onLogout() {
    await api("POST", "/auth/logout");
    signOut("");
  }

  async function enterDashboard(firstStats) {
    state.signedIn = true;
    $("login-view").hidden = true;
    $("dashboard").hidden = false;
    $("session").hidden = false;
    resetFeed();
    addStats(firstStats);
    state.pollTimer = setInterval(pollStats, POLL_MS);
    loadWebhooks();
    state.webhookTimer = setInterval(loadWebhooks, WEBHOOK_POLL_MS);
    connectWs();
    const me = await api("GET", "/users/me");
    if (me.ok) $("who").textContent = me.payload.data.email;
  }

  // -- statistics, tiles and charts ----------------------------------------------------------
  async function pollStats() {
    const res = await api("GET", "/admin/stats");
    if (res.status === 401) {
      if (!(await refreshTokens())) return;
    } else if (res.ok) {
      addStats(res.payload.data);
    }
  }

  function addStats(data) {
    const now = Date.now();
    state.nodes.set(data.node_id, { at: now, data });
    for (const [id, entry] of state.nodes) {
      if (now - entry.at > NODE_STALE_MS) state.nodes.delete(id);
    }
    // Behind a load balancer each poll may reach another node: sum the latest of each.
    let connections = 0;
    let rate = 0;
    let deliveries = 0;
    const channels = new Map();
    for (const { data: d } of state.nodes.values()) {
      connections += d.connections;
      rate += d.messages_per_second;
      deliveries += d.deliveries_per_second;
      for (const c of d.channels) channels.set(c.name, (channels.get(c.name) || 0) + c.subscribers);
    }
    $("stat-connections").textContent = String(connections);
    $("stat-rate").textContent = formatRate(rate);
    $("stat-deliveries").textContent = formatRate(deliveries);
    $("stat-channels").textContent = String(channels.size);
    $("stat-nodes").textContent = [...state.nodes.keys()].sort().join(", ");
    push(state.series.connections, connections);
    push(state.series.rate, rate);
    drawCharts();
    renderChannels(channels);
  }

  function drawCharts() {
    drawChart($("chart-connections"), state.series.connections, "#2f6fed", true);
    drawChart($("chart-rate"), state.series.rate, "#12a37f", false);
  }

  function push(series, value) {
    series.push(value);
    if (series.length > HISTORY_POINTS) series.shift();
  }

  function formatRate(value) {
    if (value >= 1000) return (value / 1000).toFixed(1) + "k";
    if (value >= 10) return value.toFixed(0);
    return value.toFixed(value > 0 ? 1 : 0);
  }

  // A y-axis of at most ~5 gridlines at 1, 2 or 5 × 10^k steps (whole steps for counts).
  function axis(maxValue, whole) {
    const top = Math.max(maxValue, 1);
    const raw = top / 4;
    const power = Math.pow(10, Math.floor(Math.log10(raw)));
    let step = [1, 2, 5, 10].map((m) => m * power).find((s) => s >= raw);
    if (whole) step = Math.max(1, Math.round(step));
    const ticks = Math.max(1, Math.ceil(top / step - 1e-9));
    return { step, ticks, max: step * ticks };
  }

  function formatTick(value) {
    return Number.isInteger(value) ? String(value) : value.toFixed(value < 1 ? 2 : 1);
  }

  function drawChart(canvas, points, color, whole) {
    const ratio = window.devicePixelRatio || 1;
    const width = canvas.clientWidth || 560;
    const height = canvas.clientHeight || 170;
    canvas.width = Math.round(width * ratio);
    canvas.height = Math.round(height * ratio);
    const ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, width, height);
    const left = 44;
    const right = 8;
    const top = 10;
    const bottom = 20;
    const plotW = width - left - right;
    const plotH = height - top - bottom;
    const scale = axis(Math.max(0, ...points), whole);
    const max = scale.max;

    ctx.font = "11px system-ui, sans-serif";
    ctx.textBaseline = "middle";
    ctx.textAlign = "right";
    for (let i = 0; i <= scale.ticks; i++) {
      const y = top + plotH - (plotH * i) / scale.ticks;
      ctx.strokeStyle = i === 0 ? "#c9cfda" : "#eef1f5";
      ctx.lineWidth = 1;
      ctx.beginPath();
      ctx.moveTo(left, Math.round(y) + 0.5);
      ctx.lineTo(left + plotW, Math.round(y) + 0.5);
      ctx.stroke();
      ctx.fillStyle = "#6b7487";
      ctx.fillText(formatTick(scale.step * i), left - 6, y);
    }
    ctx.textAlign = "left";
    ctx.textBaseline = "alphabetic";
    ctx.fillText(`last ${Math.round((HISTORY_POINTS * POLL_MS) / 1000)} s`, left, height - 4);
    canvas.dataset.samples = String(points.length);
    if (points.length < 2) {
      ctx.textAlign = "center";
      ctx.fillText("collecting…", left + plotW / 2, top + plotH / 2);
      return;
    }
    const step = plotW / (HISTORY_POINTS - 1);
    const x0 = left + plotW - step * (points.length - 1);
    const yOf = (v) => top + plotH - (plotH * v) / max;
    ctx.beginPath();
    points.forEach((v, i) => (i ? ctx.lineTo(x0 + i * step, yOf(v)) : ctx.moveTo(x0, yOf(v))));
    ctx.strokeStyle = color;
    ctx.lineWidth = 2;
    ctx.lineJoin = "round";
    ctx.stroke();
    ctx.lineTo(x0 + (points.length - 1) * step, top + plotH);
    ctx.lineTo(x0, top + plotH);
    ctx.closePath();
    ctx.globalAlpha = 0.12;
    ctx.fillStyle = color;
    ctx.fill();
    ctx.globalAlpha = 1;
    const last = points[points.length - 1];
    ctx.beginPath();
    ctx.arc(x0 + (points.length - 1) * step, yOf(last), 3, 0, Math.PI * 2);
    ctx.fillStyle = color;
    ctx.fill();
  }

  function cell(row, text, className) {
    const td = document.createElement("td");
    td.textContent = text;
    if (className) td.className = className;
    row.appendChild(td);
    return td;
  }

  function renderChannels(channels) {
    const body = $("channels").tBodies[0];
    body.replaceChildren();
    const rows = [...channels.entries()].sort((a, b) => b[1] - a[1] || a[0].localeCompare(b[0]));
    if (!rows.length) {
      const tr = body.insertRow();
      const td = cell(tr, "No active channels.", "empty");
      td.colSpan = 2;
      return;
    }
    for (const [name, subscribers] of rows) {
      const tr = body.insertRow();
      tr.dataset.channel = name;
      cell(tr, name);
      cell(tr, String(subscribers), "num");
    }
  }

  // -- the WebSocket -----------------------------------------------------------------------
  function setWsState(value, detail) {
    const el = $("ws-state");
    el.dataset.state = value;
    el.textContent = value;
    el.title = detail || "WebSocket";
  }

  function connectWs() {
    if (!state.signedIn || !state.access) return;
    const scheme = location.protocol === "https:" ? "wss://" : "ws://";
    const url = scheme + location.host + "/ws/notifications?token=" + encodeURIComponent(state.access);
    const ws = new WebSocket(url);
    state.ws = ws;
    setWsState("connecting");
    ws.onmessage = (event) => {
      let frame;
      try {
        frame = JSON.parse(event.data);
      } catch (error) {
        return;
      }
      onFrame(ws, frame);
    };
    ws.onclose = (event) => {
      clearInterval(state.pingTimer);
      if (state.ws !== ws) return;
      state.ws = null;
      setWsState("offline", "closed with " + event.code + (event.reason ? ": " + event.reason : ""));
      if (!state.signedIn) return;
      addSystem(`WebSocket closed (${event.code}${event.reason ? " " + event.reason : ""}); reconnecting`);
      scheduleReconnect(event.code === 4001 || event.code === 4010);
    };
  }

  async function scheduleReconnect(needsToken) {
    if (needsToken && !(await refreshTokens())) return;
    const delay = Math.min(RECONNECT_MAX_MS, 500 * 2 ** state.wsRetries) * (0.5 + Math.random());
    state.wsRetries += 1;
    clearTimeout(state.wsTimer);
    state.wsTimer = setTimeout(connectWs, delay);
  }

  function onFrame(ws, frame) {
    switch (frame.type) {
      case "welcome": {
        const every = (Number(frame.heartbeat_interval) || 30) * 1000;
        clearInterval(state.pingTimer);
        state.pingTimer = setInterval(() => {
          if (ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify({ type: "ping" }));
        }, every);
        const subscribe = { type: "subscribe", channels: CHANNELS };
        if (Object.keys(state.offsets).length) subscribe.since = { ...state.offsets };
        ws.send(JSON.stringify(subscribe));
        break;
      }
      case "subscribed":
        state.wsRetries = 0;
        setWsState("live", "subscribed to " + frame.channels.join(", "));
        for (const [channel, ok] of Object.entries(frame.recovered || {})) {
          if (!ok) addSystem(`Some notifications on ${channel} were missed while offline.`);
        }
        break;
      case "notification":
        state.offsets[frame.channel] = frame.offset;
        addNotification(frame);
        break;
      case "error":
        addSystem(`Error ${frame.code}${frame.channel ? " on " + frame.channel : ""}: ${frame.message || ""}`);
        break;
      default:
        break; // pong, refreshed, unsubscribed
    }
  }

  // -- the feed ------------------------------------------------------------------------------
  function resetFeed() {
    const feed = $("feed");
    feed.replaceChildren();
    const li = document.createElement("li");
    li.className = "empty";
    li.textContent = "Waiting for notifications…";
    feed.appendChild(li);
  }

  function prepend(li) {
    const feed = $("feed");
    const placeholder = feed.querySelector("li.empty");
    if (placeholder) placeholder.remove();
    feed.insertBefore(li, feed.firstChild);
    while (feed.children.length > FEED_MAX) feed.lastChild.remove();
  }

  function addNotification(frame) {
    const data = frame.data || {};
    const li = document.createElement("li");
    li.className = "notification";
    li.dataset.channel = frame.channel;
    li.dataset.id = data.id || "";
    const meta = document.createElement("div");
    meta.className = "meta";
    const channel = document.createElement("span");
    channel.className = "channel" + (frame.channel.startsWith("admin") ? " admin" : "");
    channel.textContent = frame.channel;
    const when = document.createElement("span");
    when.textContent = new Date(data.timestamp || Date.now()).toLocaleTimeString();
    const offset = document.createElement("span");
    offset.textContent = "offset " + frame.offset + (data.event ? " · " + data.event : "");
    meta.append(channel, when, offset);
    const title = document.createElement("div");
    title.className = "title";
    title.textContent = data.title || data.event || data.id || "(no title)";
    li.append(meta, title);
    if (data.body) {
      const body = document.createElement("div");
      body.className = "body";
      body.textContent = data.body;
      li.appendChild(body);
    }
    prepend(li);
  }

  function addSystem(text) {
    const li = document.createElement("li");
    li.className = "system";
    li.textContent = text;
    prepend(li);
  }

  // -- publish -------------------------------------------------------------------------------
  async function onPublish(event) {
    event.preventDefault();
    const result = $("publish-result");
    const button = $("pub-submit");
    const body = {
      channel: $("pub-channel").value.trim(),
      data: { title: $("pub-title").value },
    };
    const text = $("pub-body").value;
    if (text) body.data.body = text;
    const eventName = $("pub-event").value.trim();
    if (eventName) body.event = eventName;
    button.disabled = true;
    try {
      const res = await api("POST", "/notifications", body);
      if (res.ok) {
        const offsets = Object.entries(res.payload.data.offsets).map(([c, o]) => `${c} @ ${o}`);
        result.dataset.status = "ok";
        result.textContent = `Published ${res.payload.data.id} (${offsets.join(", ")})`;
        $("pub-title").value = "";
        $("pub-body").value = "";
      } else {
        result.dataset.status = "error";
        result.textContent = res.message || "Publishing failed.";
      }
    } finally {
      button.disabled = false;
    }
  }

  // -- webhooks ------------------------------------------------------------------------------
  function webhookMessage(text) {
    const p = document.createElement("p");
    p.className = "empty";
    p.textContent = text;
    $("webhooks").replaceChildren(p);
  }

  async function loadWebhooks() {
    const list = await api("GET", "/webhooks");
    if (list.status === 404 || list.status === 405) {
      webhookMessage("Webhooks are not available on this node.");
      return;
    }
    if (!list.ok) {
      webhookMessage("Could not load webhooks: " + list.message);
      return;
    }
    const hooks = Array.isArray(list.payload.data) ? list.payload.data : [];
    if (!hooks.length) {
      webhookMessage("No webhooks registered.");
      return;
    }
    const rows = [];
    for (const hook of hooks.slice(0, WEBHOOKS_SHOWN)) {
      const id = hook.id || hook.webhook_id;
      const res = await api("GET", `/webhooks/${encodeURIComponent(id)}/deliveries?limit=${DELIVERIES_SHOWN}`);
      if (!res.ok || !Array.isArray(res.payload.data)) continue;
      for (const d of res.payload.data) rows.push({ hook, d });
    }
    if (!rows.length) {
      webhookMessage(`${hooks.length} webhook(s), no deliveries yet.`);
      return;
    }
    const when = (d) => d.updated_at || d.last_attempt_at || d.created_at || "";
    rows.sort((a, b) => String(when(b.d)).localeCompare(String(when(a.d))));
    const table = document.createElement("table");
    const head = table.createTHead().insertRow();
    for (const name of ["when", "endpoint", "event", "status", "attempts"]) {
      const th = document.createElement("th");
      th.textContent = name;
      head.appendChild(th);
    }
    const body = table.createTBody();
    for (const { hook, d } of rows.slice(0, DELIVERIES_SHOWN)) {
      const tr = body.insertRow();
      const at = when(d);
      cell(tr, at ? new Date(at).toLocaleTimeString() : "–", "nowrap");
      cell(tr, hook.url || hook.id || "", "endpoint").title = hook.url || "";
      cell(tr, d.event || "", "nowrap");
      const code = d.status_code ?? d.response_status ?? d.last_status_code;
      const ok = typeof code === "number" && code >= 200 && code < 300;
      const status = [d.status, code].filter((v) => v !== undefined && v !== null).join(" ");
      const td = cell(tr, status || "–", ok ? "ok" : d.last_error ? "bad" : "");
      if (d.last_error) td.title = d.last_error;
      cell(tr, String(d.attempts ?? ""), "num");
    }
    $("webhooks").replaceChildren(table);
  }

  // -- start -----------------------------------------------------------------------------------
  document.addEventListener("DOMContentLoaded", () => {
    $("login-form").addEventListener("submit", onLogin);
    $("publish-form").addEventListener("submit", onPublish);
    $("logout").addEventListener("click", onLogout);
    window.addEventListener("resize", drawCharts);
  });
})();
