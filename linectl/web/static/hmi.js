// linectl operator HMI: the live page (/). Reads the line's state over the WebSocket /ws
// (snapshot + deltas + heartbeats), draws it, and sends operator commands over HTTP, each
// after a confirmation. Protocol and screen: docs/hmi.md. Plain JavaScript, no build step.
// Needs uPlot (vendored) and reels.js (the shared dose chart) loaded before it.
(function () {
  "use strict";

  const charts = window.linectlCharts;
  const el = charts.el;
  const fmtNum = charts.fmtNum;
  const $ = (id) => document.getElementById(id);

  // ------------------------------------------------------------------ constants

  const STALE_AFTER_MS = 1500; // no message proving the state current for this long: stale
  const CONNECT_TIMEOUT_MS = 4000; // a new socket must open and deliver a snapshot by then
  const BACKOFF_MS = [500, 1000, 2000, 3000]; // reconnect delays, the last one repeats
  const TREND_WINDOW_MS = 10 * 60 * 1000;
  // Redraw at most 10 times a second. The server sends at most 5 updates a second, so an
  // update is normally drawn the moment it arrives; a limit equal to the feed's period
  // held each update back by up to a whole period (bench/hmi_latency.py measured it).
  const RENDER_MIN_MS = 100;
  const COMMAND_TIMEOUT_MS = 10000;
  const ID_RE = /^[A-Za-z0-9_.:-]{1,64}$/;
  const WS_CLOSE_UNAUTHORIZED = 4401; // a server closing the feed for a lost session

  const COMMAND_LABELS = {
    start_reel: "start a reel",
    stop: "stop the line",
    end_reel: "end a reel",
    reset: "reset",
    ack_alarm: "acknowledge alarms",
    shelve_alarm: "shelve alarms",
    unshelve_alarm: "unshelve alarms",
    select_recipe: "select a recipe",
  };

  // ------------------------------------------------------------------ page state

  let session = null; // /api/session body: {user, role, csrf, commands, line_id}
  let state = null; // STATE as the server last described it
  let seq = null; // seq of `state`
  let awaitingSnapshot = true; // after connect or a resync: deltas are ignored until a snapshot
  let resyncSince = null; // performance.now() when the pending resync was sent
  let stale = true; // the overlay is up; cleared only by a snapshot
  let lastGoodWall = null; // Date.now() of the last message that proved `state` current
  let watchBase = 0; // performance.now() of that message, or of the connect attempt
  let ws = null; // the socket we listen to (an abandoned one has its handlers removed)
  let wsOpen = false;
  let attempt = 0; // reconnect attempts since the last snapshot (backoff index)
  let reconnectTimer = null;
  let recipes = { recipes: [], current: null };
  let pending = null; // the command awaiting #confirm-yes: {name, args}
  let shelveKind = null;
  let doseChart = null;
  let trendChart = null;
  let trendRange = [0, 1];
  let trendCount = 0;
  let renderTimer = null;
  let lastRenderAt = 0;
  let alarmSignature = "";
  const dirty = { dose: true, trend: true, alarms: true };

  // ------------------------------------------------------------------ small helpers

  function pad2(n) {
    return String(n).padStart(2, "0");
  }

  function hhmmss(ms) {
    if (typeof ms !== "number" || !Number.isFinite(ms)) return "—";
    const d = new Date(ms);
    return `${pad2(d.getHours())}:${pad2(d.getMinutes())}:${pad2(d.getSeconds())}`;
  }

  function hhmm(ms) {
    if (typeof ms !== "number" || !Number.isFinite(ms)) return "—";
    const d = new Date(ms);
    return `${pad2(d.getHours())}:${pad2(d.getMinutes())}`;
  }

  function isNum(x) {
    return typeof x === "number" && Number.isFinite(x);
  }

  // A length as the operator typed it: 1000 -> "1000", 12.5 -> "12.5".
  function fmtLength(x) {
    if (!isNum(x)) return "—";
    return Number.isInteger(x) ? String(x) : String(Math.round(x * 10) / 10);
  }

  function setText(id, text) {
    const node = $(id);
    if (node && node.textContent !== text) node.textContent = text;
  }

  function setData(id, key, value) {
    const node = $(id);
    if (node) node.setAttribute(`data-${key}`, value);
  }

  // A fresh request id per command, matching ^[A-Za-z0-9_.:-]{1,64}$. getRandomValues
  // works on plain http too (randomUUID needs a secure context).
  let requestCounter = 0;
  function newRequestId() {
    const bytes = new Uint8Array(6);
    crypto.getRandomValues(bytes);
    const rand = Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
    requestCounter += 1;
    return `hmi-${Date.now().toString(36)}-${requestCounter}-${rand}`;
  }

  function allowed(name) {
    if (!session || !Array.isArray(session.commands)) return false;
    return session.commands.includes(name) || session.commands.includes("*");
  }

  async function readJson(resp) {
    try {
      return await resp.json();
    } catch (e) {
      return null;
    }
  }

  // ------------------------------------------------------------------ session and login

  async function fetchSession() {
    // {status, body}; status 0 when the server could not be reached.
    try {
      const resp = await fetch("/api/session", { credentials: "same-origin", headers: { Accept: "application/json" } });
      return { status: resp.status, body: await readJson(resp) };
    } catch (e) {
      return { status: 0, body: null, error: e };
    }
  }

  function showLogin(message) {
    session = null;
    dropSocket();
    clearTimeout(reconnectTimer);
    reconnectTimer = null;
    closeConfirm();
    closeShelve();
    $("hmi-view").hidden = true;
    $("header-user").hidden = true;
    $("logout").hidden = true;
    $("stale-overlay").hidden = true;
    $("login-view").hidden = false;
    $("login-error").textContent = message || "";
    $("login-password").value = "";
    $("login-submit").disabled = false;
    $("login-user").focus();
  }

  function showHmi(body) {
    session = body;
    $("login-view").hidden = true;
    $("hmi-view").hidden = false;
    $("session-user").textContent = body.user || "";
    $("session-role").textContent = body.role || "";
    $("header-user").hidden = false;
    $("logout").hidden = false;
    setText("header-line", body.line_id ? `line ${body.line_id}` : "");
    ensureCharts();
    setStale(true); // until the first snapshot
    attempt = 0;
    connect();
    loadRecipes();
    updateControls();
  }

  async function onLoginSubmit(ev) {
    ev.preventDefault();
    const user = $("login-user").value.trim();
    const password = $("login-password").value;
    if (!user || !password) {
      $("login-error").textContent = "Enter your user name and password.";
      return;
    }
    $("login-submit").disabled = true;
    $("login-error").textContent = "";
    try {
      const resp = await fetch("/api/login", {
        method: "POST",
        credentials: "same-origin",
        headers: { "Content-Type": "application/json", Accept: "application/json" },
        body: JSON.stringify({ user: user, password: password }),
      });
      const body = await readJson(resp);
      if (resp.status === 200 && body) {
        $("login-password").value = "";
        showHmi(body);
        return;
      }
      $("login-error").textContent = body && body.error ? body.error : `Login failed: HTTP ${resp.status}`;
      $("login-password").value = "";
    } catch (e) {
      $("login-error").textContent = `Cannot reach the server: ${e.message}`;
    } finally {
      $("login-submit").disabled = false;
    }
  }

  async function onLogout() {
    const csrf = session ? session.csrf : "";
    try {
      await fetch("/api/logout", { method: "POST", credentials: "same-origin", headers: { "X-CSRF-Token": csrf || "" } });
    } catch (e) {
      // Logged out locally either way; the server's session times out.
    }
    showLogin("Logged out.");
  }

  // ------------------------------------------------------------------ live feed

  function connect() {
    if (!session) return;
    clearTimeout(reconnectTimer);
    reconnectTimer = null;
    dropSocket();
    const url = `${location.protocol === "https:" ? "wss:" : "ws:"}//${location.host}/ws`;
    let sock;
    try {
      sock = new WebSocket(url);
    } catch (e) {
      scheduleReconnect();
      return;
    }
    ws = sock;
    wsOpen = false;
    awaitingSnapshot = true;
    resyncSince = null;
    watchBase = performance.now();
    let opened = false;
    sock.onopen = () => {
      if (ws !== sock) return;
      opened = true;
      wsOpen = true;
      scheduleRender();
    };
    sock.onmessage = (ev) => {
      if (ws === sock) onMessage(ev.data);
    };
    sock.onerror = () => {
      if (ws === sock) setStale(true); // a close event follows
    };
    sock.onclose = (ev) => {
      if (ws !== sock) return;
      ws = null;
      wsOpen = false;
      setStale(true);
      afterClose(ev.code, opened);
    };
  }

  // Stops listening to the current socket (its late messages are never applied).
  function dropSocket() {
    const sock = ws;
    ws = null;
    wsOpen = false;
    if (!sock) return;
    sock.onopen = sock.onmessage = sock.onerror = sock.onclose = null;
    try {
      sock.close(4000, "client gave up on this connection");
    } catch (e) {
      // already closing
    }
  }

  // The browser hides the HTTP status of a refused handshake (code 1006), so after any
  // close we ask /api/session: a 401 means the login form, anything else a reconnect.
  async function afterClose(code, opened) {
    if (!session) return;
    if (code === WS_CLOSE_UNAUTHORIZED) {
      showLogin("Your session has ended: log in again.");
      return;
    }
    const r = await fetchSession();
    if (!session) return;
    if (r.status === 401) {
      showLogin(r.body && r.body.error ? r.body.error : "Your session has ended: log in again.");
      return;
    }
    if (r.status === 200 && r.body) session = Object.assign({}, session, r.body);
    scheduleReconnect();
  }

  function scheduleReconnect() {
    if (!session || reconnectTimer) return;
    const delay = BACKOFF_MS[Math.min(attempt, BACKOFF_MS.length - 1)];
    attempt += 1;
    reconnectTimer = setTimeout(() => {
      reconnectTimer = null;
      connect();
    }, delay);
    scheduleRender();
  }

  function send(obj) {
    // Sent now or not at all: nothing is queued for later.
    if (ws && wsOpen && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(obj));
  }

  function fresh() {
    watchBase = performance.now();
    lastGoodWall = Date.now();
  }

  function onMessage(text) {
    let msg;
    try {
      msg = JSON.parse(text);
    } catch (e) {
      return; // not ours to guess at
    }
    if (!msg || typeof msg !== "object") return;
    if (msg.type === "snapshot") applySnapshot(msg);
    else if (msg.type === "delta") applyDelta(msg);
    else if (msg.type === "heartbeat") onHeartbeat(msg);
  }

  function applySnapshot(msg) {
    if (!msg.state || typeof msg.state !== "object") return;
    state = msg.state;
    seq = msg.seq;
    if (!state.dose || typeof state.dose !== "object") state.dose = { reel_id: null, points: [] };
    if (!Array.isArray(state.dose.points)) state.dose.points = [];
    if (!Array.isArray(state.trend)) state.trend = [];
    trimTrend();
    awaitingSnapshot = false;
    resyncSince = null;
    attempt = 0;
    fresh();
    dirty.dose = dirty.trend = dirty.alarms = true;
    setStale(false); // the only way out of stale: everything was just replaced
    renderNow(); // at once: when hmi.stale turns false the screen already shows the snapshot
  }

  function applyDelta(msg) {
    if (awaitingSnapshot || state === null) return; // a resync is under way
    if (msg.base !== seq) {
      requestResync();
      return;
    }
    const set = msg.set && typeof msg.set === "object" ? msg.set : {};
    for (const key of Object.keys(set)) {
      state[key] = set[key];
      if (key === "dose" || key === "recipe" || key === "reel") dirty.dose = true;
      if (key === "trend" || key === "recipe" || key === "conveyor") dirty.trend = true;
      if (key === "alarms") dirty.alarms = true;
    }
    if (!state.dose || typeof state.dose !== "object") state.dose = { reel_id: null, points: [] };
    if (!Array.isArray(state.dose.points)) state.dose.points = [];
    if (!Array.isArray(state.trend)) state.trend = [];
    const append = msg.append && typeof msg.append === "object" ? msg.append : {};
    if (Array.isArray(append.dose) && append.dose.length) {
      for (const p of append.dose) state.dose.points.push(p);
      dirty.dose = true;
    }
    if (Array.isArray(append.trend) && append.trend.length) {
      for (const row of append.trend) state.trend.push(row);
      dirty.trend = true;
    }
    trimTrend();
    seq = msg.seq;
    fresh();
    scheduleRender();
  }

  // A heartbeat carries the seq of the server's latest state: equal to ours proves our
  // state current; different means we missed something.
  function onHeartbeat(msg) {
    if (awaitingSnapshot || state === null) return;
    if (msg.seq === seq) fresh();
    else requestResync();
  }

  function requestResync() {
    awaitingSnapshot = true;
    resyncSince = performance.now();
    send({ type: "resync" });
  }

  // Keep the trend rows of the last 10 minutes before the newest row.
  function trimTrend() {
    const rows = state.trend;
    if (!rows.length) return;
    const newest = rows[rows.length - 1][0];
    if (!isNum(newest)) return;
    let first = 0;
    while (first < rows.length && !(isNum(rows[first][0]) && rows[first][0] >= newest - TREND_WINDOW_MS)) first += 1;
    if (first > 0) rows.splice(0, first);
  }

  // Watchdog: silence means stale; a silent or slow socket is dropped and made again
  // (that also gets past a half-open TCP connection that would never report a close).
  function watchdog() {
    setText("header-clock", hhmmss(Date.now()));
    if (!session) return;
    const now = performance.now();
    const quiet = now - watchBase;
    const silent = !awaitingSnapshot && quiet > STALE_AFTER_MS;
    const resyncLate = resyncSince !== null && now - resyncSince > STALE_AFTER_MS;
    const connectLate = awaitingSnapshot && ws !== null && quiet > CONNECT_TIMEOUT_MS;
    if (silent || resyncLate || connectLate) {
      setStale(true);
      dropSocket();
      resyncSince = null;
      scheduleReconnect();
    }
  }

  function setStale(on) {
    if (on && !stale) {
      stale = true;
      awaitingSnapshot = true; // only a snapshot ends it
    } else if (!on) {
      stale = false;
    }
    const overlay = $("stale-overlay");
    overlay.hidden = !(stale && session);
    const since = lastGoodWall === null ? "NO LIVE DATA — waiting for the line's first data" : `NO LIVE DATA — values shown are stale since ${hhmmss(lastGoodWall)}`;
    setText("stale-text", since);
    document.body.classList.toggle("is-stale", stale);
    updateControls();
    scheduleRender();
  }

  // ------------------------------------------------------------------ controls

  // Every command control is off while stale, and for commands the role may not send
  // (the server refuses those anyway).
  function updateControls() {
    for (const node of document.querySelectorAll("[data-command]")) {
      const name = node.getAttribute("data-command");
      let why = "";
      if (!allowed(name)) why = `Your role (${session ? session.role : "none"}) may not ${COMMAND_LABELS[name] || name}`;
      else if (stale) why = "No live data: commands are off until the feed is back";
      node.disabled = why !== "";
      if (why) node.title = why;
      else node.removeAttribute("title");
    }
    // The forms' fields too: nothing can be typed toward a command while stale.
    for (const id of ["start-form", "end-form", "stop-form", "recipe-form", "shelve-form"]) {
      const form = $(id);
      if (!form) continue;
      for (const field of form.querySelectorAll("input, select")) field.disabled = stale;
    }
    const yes = $("confirm-yes");
    yes.disabled = stale || pending === null || !allowed(pending.name);
    $("confirm-stale").hidden = !stale;
  }

  function showResult(cls, text, requestId) {
    const node = $("cmd-result");
    node.textContent = text;
    node.className = `cmd-result ${cls}`;
    setText("cmd-result-time", `${hhmmss(Date.now())}${requestId ? ` · request ${requestId}` : ""}`);
  }

  async function sendCommand(name, args) {
    // Never queued, and not held back by a command still in flight: a STOP must not wait
    // for a slow start_reel. The confirmation is the guard against double sends.
    if (stale || !session || !allowed(name)) return;
    const requestId = newRequestId();
    const body = Object.assign({}, args, { request_id: requestId });
    showResult("pending", `Sending ${name}…`, requestId);
    let resp;
    const abort = new AbortController();
    const timer = setTimeout(() => abort.abort(), COMMAND_TIMEOUT_MS);
    try {
      resp = await fetch(`/api/cmd/${encodeURIComponent(name)}`, {
        method: "POST",
        credentials: "same-origin",
        headers: { "Content-Type": "application/json", "X-CSRF-Token": session.csrf || "", Accept: "application/json" },
        body: JSON.stringify(body),
        signal: abort.signal,
      });
    } catch (e) {
      // The command may or may not have reached the line: say so, never retry.
      showResult("nak", `NAK ${name}: no answer from the server — check the line state before sending again`, requestId);
      return;
    } finally {
      clearTimeout(timer);
    }
    const data = await readJson(resp);
    const valid = data && typeof data === "object" && (data.result === "ACK" || data.result === "NAK" || typeof data.ack === "boolean");
    if (!valid) {
      showResult("nak", `NAK: HTTP ${resp.status}`, requestId);
    } else {
      const ack = data.result ? data.result === "ACK" : data.ack === true;
      const command = data.command || name;
      const reason = typeof data.reason === "string" ? data.reason : "";
      if (ack) showResult("ack", `ACK ${command}${reason ? `: ${reason}` : ""}`, data.request_id || requestId);
      else showResult("nak", `NAK ${command}: ${reason || `HTTP ${resp.status}`}`, data.request_id || requestId);
      if (ack) afterAck(name);
    }
    if (resp.status === 401) showLogin("Your session has ended: log in again.");
  }

  // Tidy the forms of a command the line took.
  function afterAck(name) {
    if (name === "start_reel") {
      $("start-form").reset();
      $("start-form").hidden = true;
    } else if (name === "end_reel") {
      $("end-form").reset();
      $("end-form").hidden = true;
    } else if (name === "stop") {
      $("stop-reason").value = "";
    } else if (name === "select_recipe") {
      loadRecipes(); // the "(current)" mark moves
    }
  }

  // ------------------------------------------------------------------ confirmation

  function askConfirm(name, args, text) {
    if (stale || !allowed(name)) return;
    pending = { name: name, args: args };
    $("confirm-text").textContent = text;
    $("confirm-detail").textContent = `Sends ${name} ${JSON.stringify(args)}`;
    $("confirm-dialog").hidden = false;
    updateControls();
    $("confirm-no").focus(); // Enter alone must not send
  }

  function closeConfirm() {
    pending = null;
    $("confirm-dialog").hidden = true;
    updateControls();
  }

  function onConfirmYes() {
    if (!pending || stale) return;
    const p = pending;
    closeConfirm();
    sendCommand(p.name, p.args);
  }

  // ------------------------------------------------------------------ command forms

  function currentRecipeName() {
    if (state && state.recipe && state.recipe.name) return state.recipe.name;
    return recipes.current || null;
  }

  async function loadRecipes() {
    try {
      const resp = await fetch("/api/recipes", { credentials: "same-origin", headers: { Accept: "application/json" } });
      const body = await readJson(resp);
      if (resp.status === 200 && body && Array.isArray(body.recipes)) recipes = { recipes: body.recipes, current: body.current || null };
      else if (resp.status === 401) return showLogin("Your session has ended: log in again.");
    } catch (e) {
      // keep the last list
    }
    fillRecipeSelect($("start-recipe"), true);
    fillRecipeSelect($("select-recipe"), false);
  }

  function fillRecipeSelect(select, forStart) {
    const keep = select.value;
    const current = currentRecipeName();
    const options = recipes.recipes.map((name) => el("option", { value: name, text: name === current ? `${name} (current)` : name }));
    if (!options.length) options.push(el("option", { value: "", text: forStart ? "current recipe (list not loaded)" : "no recipe list" }));
    select.replaceChildren(...options);
    if (keep && recipes.recipes.includes(keep)) select.value = keep;
    else if (current && recipes.recipes.includes(current)) select.value = current;
  }

  function onStartOpen() {
    if (stale || !allowed("start_reel")) return;
    $("end-form").hidden = true;
    $("start-form").hidden = false;
    $("start-error").textContent = "";
    loadRecipes();
    $("start-reel-id").focus();
  }

  function onStartSubmit(ev) {
    ev.preventDefault();
    if (stale || !allowed("start_reel")) return;
    const reelId = $("start-reel-id").value.trim();
    const lengthText = $("start-length").value.trim();
    const length = Number(lengthText);
    const recipe = $("start-recipe").value;
    const operator = $("start-operator").value.trim();
    const error = $("start-error");
    if (!ID_RE.test(reelId)) {
      error.textContent = "Reel id: 1 to 64 letters, digits or _ . : -";
      return;
    }
    if (lengthText === "" || !Number.isFinite(length) || length <= 0) {
      error.textContent = "Planned length: a number of metres above 0.";
      return;
    }
    error.textContent = "";
    const args = { reel_id: reelId, length_m: length };
    if (recipe) args.recipe = recipe;
    if (operator) args.operator = operator;
    const recipeText = recipe || currentRecipeName() || "current";
    askConfirm("start_reel", args, `Start reel ${reelId}, ${fmtLength(length)} m, recipe ${recipeText}${operator ? `, operator ${operator}` : ""}?`);
  }

  function onEndOpen() {
    if (stale || !allowed("end_reel")) return;
    $("start-form").hidden = true;
    $("end-form").hidden = false;
    $("end-error").textContent = "";
    const reel = state && state.reel ? state.reel.reel_id : "";
    if (reel) $("end-reel-id").value = reel;
    $("end-reason").focus();
  }

  function onEndSubmit(ev) {
    ev.preventDefault();
    if (stale || !allowed("end_reel")) return;
    const reelId = $("end-reel-id").value.trim();
    const reason = $("end-reason").value.trim();
    const error = $("end-error");
    if (!ID_RE.test(reelId)) {
      error.textContent = "Reel id: 1 to 64 letters, digits or _ . : -";
      return;
    }
    if (!reason) {
      error.textContent = "Say why the reel ends short of its planned length.";
      return;
    }
    error.textContent = "";
    askConfirm("end_reel", { reel_id: reelId, reason: reason }, `End reel ${reelId} now, short of its planned length? Reason: ${reason}`);
  }

  function onStopSubmit(ev) {
    ev.preventDefault();
    if (stale || !allowed("stop")) return;
    const reason = $("stop-reason").value.trim();
    const reel = state && state.reel && state.reel.reel_id ? ` (reel ${state.reel.reel_id})` : "";
    const args = reason ? { reason: reason } : {};
    askConfirm("stop", args, `Stop the line${reel}: ramp down, beam off at minimum speed, line stopped?${reason ? ` Reason: ${reason}` : ""}`);
  }

  function onReset() {
    if (stale || !allowed("reset")) return;
    askConfirm("reset", {}, "Reset the line: clear the latched alarms and leave FAULT? The beam stays off until a new start.");
  }

  function onSelectRecipe(ev) {
    ev.preventDefault();
    if (stale || !allowed("select_recipe")) return;
    const recipe = $("select-recipe").value;
    if (!recipe) return;
    const current = currentRecipeName();
    askConfirm("select_recipe", { recipe: recipe }, `Select recipe ${recipe}${current ? ` (now ${current})` : ""}?`);
  }

  function onAckAll() {
    if (stale || !allowed("ack_alarm")) return;
    askConfirm("ack_alarm", { alarm: "*" }, "Acknowledge every unacknowledged alarm?");
  }

  function onAlarmClick(ev) {
    const button = ev.target.closest("button");
    if (!button || button.disabled || stale) return;
    const row = button.closest("[data-alarm]");
    if (!row) return;
    const kind = row.getAttribute("data-alarm");
    if (button.classList.contains("btn-ack")) {
      askConfirm("ack_alarm", { alarm: kind }, `Acknowledge alarm ${kind}?`);
    } else if (button.classList.contains("btn-unshelve")) {
      askConfirm("unshelve_alarm", { alarm: kind }, `Unshelve alarm ${kind}? It shows and sounds again while active.`);
    } else if (button.classList.contains("btn-shelve")) {
      openShelve(kind);
    }
  }

  function openShelve(kind) {
    if (stale || !allowed("shelve_alarm")) return;
    shelveKind = kind;
    $("shelve-kind").textContent = kind;
    $("shelve-form").reset();
    $("shelve-error").textContent = "";
    $("shelve-dialog").hidden = false;
    updateControls();
    $("shelve-reason").focus();
  }

  function closeShelve() {
    shelveKind = null;
    $("shelve-dialog").hidden = true;
  }

  function onShelveSubmit(ev) {
    ev.preventDefault();
    if (stale || !shelveKind || !allowed("shelve_alarm")) return;
    const minutes = Number($("shelve-duration").value);
    const reason = $("shelve-reason").value.trim();
    if (!reason) {
      $("shelve-error").textContent = "A reason is required to shelve an alarm.";
      return;
    }
    const kind = shelveKind;
    closeShelve();
    const until = hhmm(Date.now() + minutes * 60000);
    askConfirm("shelve_alarm", { alarm: kind, duration_s: minutes * 60, reason: reason }, `Shelve alarm ${kind} for ${minutes} min (until about ${until})? Reason: ${reason}`);
  }

  // ------------------------------------------------------------------ rendering

  function scheduleRender() {
    if (renderTimer) return;
    const wait = Math.max(0, lastRenderAt + RENDER_MIN_MS - performance.now());
    renderTimer = setTimeout(() => {
      renderTimer = null;
      lastRenderAt = performance.now();
      render();
    }, wait);
  }

  function renderNow() {
    clearTimeout(renderTimer);
    renderTimer = null;
    lastRenderAt = performance.now();
    render();
  }

  function render() {
    if (!session) return;
    renderBanner();
    renderDosePanel();
    renderAlarms();
    renderCharts();
  }

  function renderBanner() {
    const s = state || {};
    const status = s.status || {};
    // linectl names states in lower case (as MQTT `state` does); the banner shouts them.
    const lineState = status.state ? String(status.state).toUpperCase() : "—";
    setText("line-state", lineState);
    setData("line-state", "state", status.state ? String(status.state).toUpperCase() : "");
    const since = isNum(status.since_ms) ? ` since ${hhmmss(status.since_ms)}` : "";
    setText("line-cause", status.cause ? `${status.cause}${since}` : since.trim());
    setText("line-not-ready", status.not_ready_reason ? `Not ready: ${status.not_ready_reason}` : "");
    document.title = `${lineState} — ${s.line_id || (session && session.line_id) || "line"} — linectl`;
    if (s.line_id) setText("header-line", `line ${s.line_id}`);

    // The beam indicator: the text always says it; the colour only repeats it.
    const beam = s.beam || {};
    let on = false;
    let known = false;
    if (typeof beam.on === "boolean") {
      on = beam.on;
      known = true;
    } else if (isNum(beam.current_ma)) {
      on = beam.current_ma > 0.5; // the controller's "beam measured on"
    }
    setText("beam-indicator", on ? "BEAM ON" : "BEAM OFF");
    setData("beam-indicator", "on", on ? "1" : "0");
    setData("beam-indicator", "known", known ? "1" : "0");
    let note = "";
    if (!state) note = "no data yet";
    else if (!known) note = "beam state unknown (no accelerator data)";
    else if (stale) note = "last known value — no live data";
    else note = `HV ${beam.hv_on === true ? "ON" : beam.hv_on === false ? "OFF" : "?"}`;
    setText("beam-note", note);

    const recipe = s.recipe || {};
    setText("banner-recipe", recipe.name ? `${recipe.name}${recipe.product ? ` — ${recipe.product}` : ""}${recipe.version !== null && recipe.version !== undefined ? ` v${recipe.version}` : ""}` : "—");
    const reel = s.reel;
    if (reel && reel.reel_id) {
      setText("banner-reel", `${reel.reel_id}${reel.operator ? ` (${reel.operator})` : ""}${reel.started ? "" : " — not started"}`);
      const pos = isNum(reel.position_m) ? fmtNum(reel.position_m, 1) : "—";
      setText("banner-position", `${pos} / ${fmtLength(reel.planned_length_m)} m`);
    } else {
      setText("banner-reel", "no reel");
      setText("banner-position", "—");
    }
    const perms = s.permissives || {};
    renderPerm("perm-beam", perms.beam);
    renderPerm("perm-line", perms.line);

    const links = s.links || {};
    renderPlcLink("link-accelerator", links.accelerator);
    renderPlcLink("link-conveyor", links.conveyor);
    const broker = typeof links.broker === "string" ? links.broker : null;
    setText("link-broker", broker ? broker.toUpperCase() : "—");
    setData("link-broker", "up", broker === "connected" ? "1" : broker === "off" ? "off" : broker ? "0" : "");

    let feed;
    if (!stale) feed = "LIVE";
    else if (ws && !wsOpen) feed = "CONNECTING…";
    else if (reconnectTimer) feed = "RECONNECTING…";
    else feed = "NO DATA";
    setText("link-feed", feed);
    setData("link-feed", "up", stale ? "0" : "1");
  }

  function renderPerm(id, perm) {
    if (!perm || typeof perm.ok !== "boolean") {
      setText(id, "—");
      setData(id, "ok", "");
      return;
    }
    setText(id, perm.ok ? "OK" : perm.why || "not OK");
    setData(id, "ok", perm.ok ? "1" : "0");
  }

  function fmtAge(ms) {
    if (!isNum(ms)) return "";
    return ms < 1000 ? `${Math.round(ms)} ms` : `${(ms / 1000).toFixed(1)} s`;
  }

  function renderPlcLink(id, link) {
    if (!link || typeof link.up !== "boolean") {
      setText(id, "—");
      setData(id, "up", "");
      return;
    }
    const age = fmtAge(link.age_ms);
    setText(id, link.up ? `UP${age ? ` · data ${age} old` : ""}` : `DOWN${age ? ` · last data ${age} ago` : ""}`);
    setData(id, "up", link.up ? "1" : "0");
  }

  function renderDosePanel() {
    const s = state || {};
    const recipe = s.recipe || {};
    const beam = s.beam || {};
    const cnv = s.conveyor || {};
    setText("dose-min", fmtNum(recipe.min_dose_kgy, 1));
    setText("dose-target", fmtNum(recipe.target_dose_kgy, 1));
    setText("dose-max", fmtNum(recipe.max_dose_kgy, 1));
    const dose = s.dose_now_kgy;
    setText("dose-now", fmtNum(dose, 1));
    let word = "";
    let range = "";
    if (isNum(dose) && isNum(recipe.min_dose_kgy) && dose < recipe.min_dose_kgy) {
      word = "BELOW MIN";
      range = "low";
    } else if (isNum(dose) && isNum(recipe.max_dose_kgy) && dose > recipe.max_dose_kgy) {
      word = "ABOVE MAX";
      range = "high";
    } else if (isNum(dose) && isNum(recipe.min_dose_kgy)) {
      word = "within limits";
      range = "ok";
    }
    setText("dose-now-range", word);
    setData("dose-now-range", "range", range);
    setText("beam-current", fmtNum(beam.current_ma, 2));
    setText("beam-current-sp", fmtNum(beam.current_sp_ma, 2));
    setText("beam-current-max", fmtNum(recipe.beam_current_max_ma, 1));
    setText("hv-state", beam.hv_on === true ? "ON" : beam.hv_on === false ? "OFF" : "—");
    setText("beam-energy", fmtNum(beam.energy_mev, 3));
    // A vacuum reads in powers of ten: 1.0e-4 Pa, never 0.000.
    setText("beam-vacuum", isNum(beam.vacuum_pa) ? beam.vacuum_pa.toExponential(1) : "—");
    setText("line-speed", fmtNum(cnv.speed_m_min, 1));
    setText("speed-limit", fmtNum(cnv.speed_limit_m_min, 1));
    setText("line-speed-sp", fmtNum(cnv.speed_sp_m_min, 1));
    setText("conveyor-running", cnv.running === true ? "RUNNING" : cnv.running === false ? "STOPPED" : "—");
    setText("conveyor-tension", fmtNum(cnv.tension_n, 0));
  }

  const ALARM_ORDER = { unack: 0, rtn_unack: 1, acked: 2, shelved: 3 };

  function alarmStateText(a) {
    if (a.state === "unack") return "UNACK";
    if (a.state === "acked") return "ACKED";
    if (a.state === "rtn_unack") return "RTN UNACK";
    if (a.state === "shelved") {
      const until = isNum(a.shelved_until_ms) ? ` until ${hhmm(a.shelved_until_ms)}` : "";
      const by = a.shelved_by ? ` by ${a.shelved_by}` : "";
      return `SHELVED${until}${by}${a.shelve_reason ? `: ${a.shelve_reason}` : ""}`;
    }
    return String(a.state || "?").toUpperCase();
  }

  function renderAlarms() {
    const alarms = state && Array.isArray(state.alarms) ? state.alarms : [];
    // Rebuilt only when something shown changed, so a button is not replaced under the cursor.
    const signature = JSON.stringify([alarms, stale, session ? session.commands : null]);
    if (signature === alarmSignature && !dirty.alarms) return;
    alarmSignature = signature;
    dirty.alarms = false;
    const sorted = alarms.slice().sort((a, b) => {
      const oa = ALARM_ORDER[a.state] !== undefined ? ALARM_ORDER[a.state] : 9;
      const ob = ALARM_ORDER[b.state] !== undefined ? ALARM_ORDER[b.state] : 9;
      return oa - ob || (b.t_ms || 0) - (a.t_ms || 0);
    });
    const rows = sorted.map((a) => {
      const kind = String(a.kind || "");
      const buttons = [];
      if (a.state === "unack" || a.state === "rtn_unack") buttons.push(el("button", { type: "button", class: "btn-ack", "data-command": "ack_alarm", text: "Acknowledge…" }));
      if (a.state === "shelved") buttons.push(el("button", { type: "button", class: "btn-unshelve", "data-command": "unshelve_alarm", text: "Unshelve…" }));
      else buttons.push(el("button", { type: "button", class: "btn-shelve", "data-command": "shelve_alarm", text: "Shelve…" }));
      return el(
        "li",
        {
          class: "alarm",
          "data-alarm": kind,
          "data-state": a.state || "",
          "data-active": a.active ? "1" : "0",
          "data-latched": a.latched ? "1" : "0",
        },
        [
          el("div", { class: "alarm-main" }, [
            el("span", { class: "alarm-state", text: alarmStateText(a) }),
            el("span", { class: "alarm-kind", text: kind }),
            el("span", { class: "alarm-message", text: a.message || "" }),
          ]),
          el("div", { class: "alarm-meta" }, [
            el("span", { class: "alarm-time", text: `raised ${hhmmss(a.t_ms)}` }),
            el("span", { class: "alarm-active", text: a.active ? "ACTIVE" : "CLEARED" }),
            a.latched ? el("span", { class: "alarm-latched", text: "LATCHED — needs reset" }) : null,
          ]),
          el("div", { class: "alarm-buttons" }, buttons),
        ]
      );
    });
    if (!rows.length) rows.push(el("li", { class: "alarm-none", text: state ? "No alarms." : "—" }));
    $("alarm-list").replaceChildren(...rows);
    const unack = alarms.filter((a) => a.state === "unack" || a.state === "rtn_unack").length;
    setText("alarm-count", alarms.length ? `(${alarms.length}${unack ? `, ${unack} to acknowledge` : ""})` : "");
    updateControls();
  }

  // ------------------------------------------------------------------ charts

  function ensureCharts() {
    if (doseChart) return;
    doseChart = charts.makeDoseChart($("dose-chart"), { height: 230, legend: false });
    charts.followWidth($("dose-chart"), doseChart);
    trendChart = makeTrendChart($("trend-chart"));
    charts.followWidth($("trend-chart"), trendChart);
  }

  function renderCharts() {
    if (!doseChart || !state) return;
    if (dirty.dose) {
      dirty.dose = false;
      const dose = state.dose || { points: [] };
      const recipe = state.recipe || {};
      const reel = state.reel;
      // The metre axis runs to the planned length of the reel being drawn.
      const planned = reel && dose.reel_id && reel.reel_id === dose.reel_id ? reel.planned_length_m : null;
      const built = doseChart.update(dose.points, { min: recipe.min_dose_kgy, target: recipe.target_dose_kgy, max: recipe.max_dose_kgy }, planned);
      charts.renderVerdictLegend($("dose-chart-legend"), built.counts);
      setText("dose-chart-reel", dose.reel_id ? `reel ${dose.reel_id}` : "no reel");
    }
    if (dirty.trend) {
      dirty.trend = false;
      trendChart.update(state.trend || [], state.t_ms, state.recipe || {}, state.conveyor || {});
    }
  }

  // Beam current (left axis, mA) and line speed (right axis, m/min) over 10 minutes.
  function makeTrendChart(container) {
    const height = 180;
    let yMaxMa = 1;
    let yMaxSpeed = 1;
    const axisColour = "#d8dde3";
    const grid = "rgba(255,255,255,0.10)";
    const u = new uPlot(
      {
        width: Math.max(200, container.clientWidth || 600),
        height: height,
        cursor: { drag: { x: false, y: false } },
        legend: { show: false }, // the coloured axis labels name the two lines
        scales: {
          x: { time: true, range: () => trendRange },
          mA: { range: (self, min, max) => [0, Math.max(yMaxMa, isNum(max) ? max * 1.05 : 0, 1)] },
          speed: { range: (self, min, max) => [0, Math.max(yMaxSpeed, isNum(max) ? max * 1.05 : 0, 1)] },
        },
        axes: [
          {
            stroke: axisColour,
            grid: { stroke: grid },
            ticks: { stroke: grid },
            // 24-hour local clock, seconds only when the ticks need them.
            values: (self, splits) => {
              const secs = splits.some((v) => v % 60 !== 0);
              return splits.map((v) => (secs ? hhmmss(v * 1000) : hhmm(v * 1000)));
            },
          },
          { scale: "mA", stroke: "#ffb000", grid: { stroke: grid }, ticks: { stroke: grid }, label: "beam current, mA", labelSize: 20, size: 55 },
          { scale: "speed", side: 1, stroke: "#4fc3f7", grid: { show: false }, ticks: { stroke: grid }, label: "line speed, m/min", labelSize: 20, size: 60 },
        ],
        series: [
          { label: "time", value: (self, v) => (isNum(v) ? hhmmss(v * 1000) : "—") },
          { label: "beam current mA", scale: "mA", stroke: "#ffb000", width: 2, value: (self, v) => fmtNum(v, 2) },
          { label: "line speed m/min", scale: "speed", stroke: "#4fc3f7", width: 2, value: (self, v) => fmtNum(v, 1) },
        ],
      },
      [[], [], []],
      container
    );
    return {
      uplot: u,
      update(rows, tMs, recipe, conveyor) {
        const x = [];
        const cur = [];
        const spd = [];
        for (const r of rows) {
          if (!Array.isArray(r) || !isNum(r[0])) continue;
          x.push(r[0] / 1000); // uPlot's time scale is in seconds
          cur.push(isNum(r[1]) ? r[1] : null);
          spd.push(isNum(r[2]) ? r[2] : null);
        }
        const newest = Math.max(x.length ? x[x.length - 1] : 0, isNum(tMs) ? tMs / 1000 : 0);
        trendRange = newest > 0 ? [newest - TREND_WINDOW_MS / 1000, newest] : [0, 1];
        // Steady tops (the recipe's current limit, the speed the beam allows) so the axes
        // do not jump with every sample; higher data still widens them.
        yMaxMa = isNum(recipe.beam_current_max_ma) ? recipe.beam_current_max_ma : 1;
        yMaxSpeed = isNum(conveyor.speed_limit_m_min) ? conveyor.speed_limit_m_min : isNum(recipe.speed_max_m_min) ? recipe.speed_max_m_min : 1;
        trendCount = x.length;
        u.setData([x, cur, spd]);
      },
      setWidth(width) {
        const w = Math.max(200, Math.floor(width));
        if (w !== u.width) u.setSize({ width: w, height: height });
      },
      pointCount() {
        return trendCount;
      },
    };
  }

  // ------------------------------------------------------------------ wiring

  function wire() {
    $("login-form").addEventListener("submit", onLoginSubmit);
    $("logout").addEventListener("click", onLogout);
    $("cmd-start").addEventListener("click", onStartOpen);
    $("start-form").addEventListener("submit", onStartSubmit);
    $("start-cancel").addEventListener("click", () => {
      $("start-form").hidden = true;
    });
    $("cmd-end").addEventListener("click", onEndOpen);
    $("end-form").addEventListener("submit", onEndSubmit);
    $("end-cancel").addEventListener("click", () => {
      $("end-form").hidden = true;
    });
    $("stop-form").addEventListener("submit", onStopSubmit);
    $("cmd-reset").addEventListener("click", onReset);
    $("recipe-form").addEventListener("submit", onSelectRecipe);
    $("cmd-ack-all").addEventListener("click", onAckAll);
    $("alarm-list").addEventListener("click", onAlarmClick);
    $("confirm-yes").addEventListener("click", onConfirmYes);
    $("confirm-no").addEventListener("click", closeConfirm);
    $("shelve-form").addEventListener("submit", onShelveSubmit);
    $("shelve-cancel").addEventListener("click", closeShelve);
    document.addEventListener("keydown", (ev) => {
      if (ev.key !== "Escape") return;
      if (!$("confirm-dialog").hidden) closeConfirm();
      else if (!$("shelve-dialog").hidden) closeShelve();
    });
    setInterval(watchdog, 250);
  }

  async function boot() {
    wire();
    let shown = false;
    for (;;) {
      const r = await fetchSession();
      if (session) return; // logged in meanwhile
      if (r.status === 200 && r.body) return showHmi(r.body);
      if (r.status === 401) {
        if (shown) $("login-error").textContent = "";
        else showLogin("");
        return;
      }
      // Server down or odd: say so on the login screen and ask again shortly (without
      // wiping what the operator is typing).
      const text = r.status === 0 ? "Cannot reach the line's server; trying again…" : `The server answered HTTP ${r.status}; trying again…`;
      if (!shown) showLogin(text);
      else $("login-error").textContent = text;
      shown = true;
      await new Promise((resolve) => setTimeout(resolve, 3000));
      if (session) return;
    }
  }

  // For tests and for a look from the browser console.
  window.hmi = {
    get connected() {
      return wsOpen; // the socket is open (live data also needs !stale)
    },
    get seq() {
      return seq;
    },
    get state() {
      return state;
    },
    get stale() {
      return stale;
    },
    doseChartPoints() {
      return doseChart ? doseChart.pointCount() : 0;
    },
    trendChartPoints() {
      return trendChart ? trendChart.pointCount() : 0;
    },
  };

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", boot);
  else boot();
})();
