// linectl HMI: reel list (/reels), one reel's report (/reels/<id>), and the dose-per-metre
// chart that both the report and the live HMI draw (window.linectlCharts), so that a metre
// looks the same live and in the record. Plain JavaScript, no build step; uPlot is vendored.
(function () {
  "use strict";

  // ------------------------------------------------------------------ shared helpers

  // Verdicts of a metre, in report order. Colours: Okabe-Ito (colour-blind safe), lightened
  // where the report's print colour would vanish on the dark screen; each is also named in
  // the legend next to the chart, so colour is never the only cue.
  const VERDICTS = {
    in_spec: { label: "in spec", colour: null },
    under_dose: { label: "under-dose", colour: "#56B4E9" },
    over_dose: { label: "over-dose", colour: "#D55E00" },
    unproven: { label: "unproven", colour: "#BBBBBB" },
    energy_out_of_tolerance: { label: "energy out of tolerance", colour: "#CC79A7" },
    missing: { label: "missing (no record)", colour: "#F0E442" },
  };
  const VERDICT_CODES = Object.keys(VERDICTS); // index = the number the hidden series carries

  function verdictLabel(v) {
    return VERDICTS[v] ? VERDICTS[v].label : String(v);
  }

  function verdictColour(v) {
    return VERDICTS[v] && VERDICTS[v].colour ? VERDICTS[v].colour : "#E69F00";
  }

  function el(tag, attrs, children) {
    // Builds DOM with textContent only: server text (alarm messages, reasons) is never HTML.
    const node = document.createElement(tag);
    if (attrs) {
      for (const [k, v] of Object.entries(attrs)) {
        if (v === null || v === undefined || v === false) continue;
        if (k === "text") node.textContent = v;
        else if (k === "class") node.className = v;
        else if (k.startsWith("data-")) node.setAttribute(k, v);
        else node.setAttribute(k, v === true ? "" : v);
      }
    }
    for (const c of children || []) {
      if (c === null || c === undefined) continue;
      node.append(typeof c === "string" ? document.createTextNode(c) : c);
    }
    return node;
  }

  function fmtNum(x, digits) {
    if (x === null || x === undefined || typeof x !== "number" || !Number.isFinite(x)) return "—";
    return x.toFixed(digits === undefined ? 1 : digits);
  }

  function pad2(n) {
    return String(n).padStart(2, "0");
  }

  // ISO time from the records -> local "YYYY-MM-DD HH:MM:SS" (the operator's clock).
  function fmtIso(text) {
    if (!text) return "—";
    const d = new Date(text);
    if (Number.isNaN(d.getTime())) return String(text);
    return (
      `${d.getFullYear()}-${pad2(d.getMonth() + 1)}-${pad2(d.getDate())} ` +
      `${pad2(d.getHours())}:${pad2(d.getMinutes())}:${pad2(d.getSeconds())}`
    );
  }

  function fmtDuration(s) {
    if (typeof s !== "number" || !Number.isFinite(s)) return "—";
    const h = Math.floor(s / 3600);
    const m = Math.floor((s % 3600) / 60);
    const sec = Math.round(s % 60);
    return h ? `${h} h ${pad2(m)} min` : m ? `${m} min ${pad2(sec)} s` : `${fmtNum(s, 1)} s`;
  }

  // ------------------------------------------------------------------ dose chart

  // Turns points [[metre_index, dose, min, max, verdict], ...] into uPlot columns. Metre i
  // covers [i, i+1) m; its values are drawn at i + 0.5. A hole in the indices breaks the
  // lines (null) and is marked "missing": no line ever bridges a metre without a record.
  function buildDoseData(points, limits) {
    const byIdx = new Map();
    for (const p of points || []) {
      // Later points for the same metre win (a metre may be re-sent when revised).
      if (Array.isArray(p) && typeof p[0] === "number" && Number.isFinite(p[0])) byIdx.set(p[0], p);
    }
    const idxs = Array.from(byIdx.keys()).sort((a, b) => a - b);
    const cols = { x: [], dose: [], lo: [], hi: [], verdict: [] };
    const marks = []; // runs {a, b, verdict} of metres not in spec, in metres
    const counts = {}; // verdict -> metres
    const num = (v) => (typeof v === "number" && Number.isFinite(v) ? v : null);

    function mark(a, b, verdict) {
      counts[verdict] = (counts[verdict] || 0) + (b - a);
      const last = marks[marks.length - 1];
      if (last && last.verdict === verdict && last.b === a) last.b = b;
      else marks.push({ a: a, b: b, verdict: verdict });
    }

    let prev = null;
    for (const i of idxs) {
      if (prev !== null && i > prev + 1) {
        cols.x.push(prev + 1);
        cols.dose.push(null);
        cols.lo.push(null);
        cols.hi.push(null);
        cols.verdict.push(VERDICT_CODES.indexOf("missing"));
        mark(prev + 1, i, "missing");
      }
      const p = byIdx.get(i);
      const verdict = typeof p[4] === "string" ? p[4] : "unproven";
      cols.x.push(i + 0.5);
      cols.dose.push(num(p[1]));
      cols.lo.push(num(p[2]));
      cols.hi.push(num(p[3]));
      const code = VERDICT_CODES.indexOf(verdict);
      cols.verdict.push(code >= 0 ? code : null);
      if (verdict !== "in_spec") mark(i, i + 1, verdict);
      else counts.in_spec = (counts.in_spec || 0) + 1;
      prev = i;
    }
    const lim = limits || {};
    const data = [cols.x, cols.dose, cols.lo, cols.hi, cols.verdict];
    return {
      data: data,
      marks: marks,
      counts: counts,
      metres: idxs.length,
      lastIndex: prev,
      limits: { min: num(lim.min), target: num(lim.target), max: num(lim.max) },
    };
  }

  // The dose chart: mean dose per metre, its min..max band, the recipe's min/target/max as
  // dashed lines across the whole axis (labelled, drawn even before the first metre), and
  // every metre not in spec shaded by verdict with an opaque tick along the bottom (one bad
  // metre on a long reel stays visible even narrower than a pixel).
  function makeDoseChart(container, options) {
    const opts = options || {};
    const height = opts.height || 260;
    let marks = [];
    let limits = { min: null, target: null, max: null };
    let xMax = 1;
    let metres = 0;

    const LIMIT_STYLE = [
      ["max", "limit max", "#ff5c5c", [10, 6]],
      ["target", "target", "#4cd964", [4, 4]],
      ["min", "limit min", "#ff5c5c", [10, 6]],
    ];

    function drawLimits(u) {
      const ctx = u.ctx;
      const left = u.bbox.left;
      const right = u.bbox.left + u.bbox.width;
      const px = devicePixelRatio;
      ctx.save();
      ctx.font = `${Math.round(12 * px)}px system-ui, sans-serif`;
      ctx.textAlign = "right";
      ctx.textBaseline = "bottom";
      for (const [key, label, colour, dash] of LIMIT_STYLE) {
        const v = limits[key];
        if (v === null) continue;
        const y = Math.round(u.valToPos(v, "y", true));
        ctx.strokeStyle = colour;
        ctx.lineWidth = 2 * px;
        ctx.setLineDash(dash.map((d) => d * px));
        ctx.beginPath();
        ctx.moveTo(left, y);
        ctx.lineTo(right, y);
        ctx.stroke();
        // The label on a dark patch, so a dose line running through it cannot hide it.
        const text = `${label} ${fmtNum(v, 1)}`;
        const w = ctx.measureText(text).width;
        ctx.setLineDash([]);
        ctx.fillStyle = "rgba(16,19,23,0.85)";
        ctx.fillRect(right - w - 8 * px, y - 16 * px, w + 6 * px, 15 * px);
        ctx.fillStyle = colour;
        ctx.fillText(text, right - 4 * px, y - 2 * px);
      }
      ctx.restore();
    }

    function drawMarks(u, tickOnly) {
      if (!marks.length) return;
      const ctx = u.ctx;
      const top = u.bbox.top;
      const h = u.bbox.height;
      const tick = Math.max(4, Math.round(6 * devicePixelRatio));
      ctx.save();
      for (const m of marks) {
        let x0 = u.valToPos(m.a, "x", true);
        let x1 = u.valToPos(m.b, "x", true);
        if (x1 - x0 < 2) {
          const c = (x0 + x1) / 2;
          x0 = c - 1;
          x1 = c + 1;
        }
        ctx.fillStyle = verdictColour(m.verdict);
        if (tickOnly) {
          ctx.globalAlpha = 1;
          ctx.fillRect(x0, top + h - tick, x1 - x0, tick);
        } else {
          ctx.globalAlpha = 0.25;
          ctx.fillRect(x0, top, x1 - x0, h);
        }
      }
      ctx.restore();
    }

    const axisColour = "#d8dde3";
    const gridColour = "rgba(255,255,255,0.10)";
    const uopts = {
      width: Math.max(200, container.clientWidth || 600),
      height: height,
      cursor: { drag: { x: false, y: false } },
      // The live screen has no room for the cursor legend; the report keeps it.
      legend: { show: opts.legend !== false, live: true },
      scales: {
        x: { time: false, range: () => [0, xMax] },
        y: {
          // The data and the recipe's limits, with headroom so no line sits on the frame.
          range: (u, min, max) => {
            const vals = [min, max, limits.min, limits.target, limits.max].filter((v) => typeof v === "number" && Number.isFinite(v));
            if (!vals.length) return [0, 1];
            const lo = Math.min(...vals);
            const hi = Math.max(...vals);
            const pad = Math.max(1, (hi - lo) * 0.08);
            return [Math.max(0, lo - pad), hi + pad];
          },
        },
        verdict: { range: [0, 10] },
      },
      axes: [
        { stroke: axisColour, grid: { stroke: gridColour }, ticks: { stroke: gridColour }, label: "metre of the reel", labelSize: 20 },
        { stroke: axisColour, grid: { stroke: gridColour }, ticks: { stroke: gridColour }, label: "dose, kGy", labelSize: 20, size: 60 },
      ],
      series: [
        { label: "metre", value: (u, v) => (v === null || v === undefined ? "—" : `${Math.floor(v)}`) },
        { label: "dose kGy", stroke: "#ffffff", width: 2, value: (u, v) => fmtNum(v, 1) },
        { label: "min kGy", stroke: "rgba(120,190,255,0.75)", width: 1, points: { show: false }, value: (u, v) => fmtNum(v, 1) },
        { label: "max kGy", stroke: "rgba(120,190,255,0.75)", width: 1, points: { show: false }, value: (u, v) => fmtNum(v, 1) },
        {
          // Not drawn: carries the verdict so the cursor legend names it in words.
          label: "verdict",
          scale: "verdict",
          stroke: "#E69F00",
          paths: () => null,
          points: { show: false },
          value: (u, v) => (v === null || v === undefined ? "—" : verdictLabel(VERDICT_CODES[v])),
        },
      ],
      bands: [{ series: [3, 2], fill: "rgba(120,190,255,0.18)" }],
      hooks: {
        drawClear: [(u) => drawMarks(u, false)],
        draw: [
          (u) => {
            drawLimits(u);
            drawMarks(u, true);
          },
        ],
      },
    };
    const empty = [[], [], [], [], []];
    const u = new uPlot(uopts, empty, container);

    return {
      uplot: u,
      // points: as in the live STATE.dose.points; recipeLimits {min, target, max}; xEnd: the
      // right end of the metre axis (planned length), or null for the data's own end.
      update(points, recipeLimits, xEnd) {
        const built = buildDoseData(points, recipeLimits);
        marks = built.marks;
        limits = built.limits;
        metres = built.metres;
        const dataEnd = built.lastIndex === null ? 0 : built.lastIndex + 1;
        xMax = Math.max(1, dataEnd, typeof xEnd === "number" && Number.isFinite(xEnd) ? xEnd : 0);
        u.setData(built.data);
        return built;
      },
      setWidth(width) {
        const w = Math.max(200, Math.floor(width));
        if (w !== u.width) u.setSize({ width: w, height: height });
      },
      pointCount() {
        return metres;
      },
    };
  }

  // The key under a dose chart: what each line is, then every verdict present, in words,
  // with its metres.
  function renderVerdictLegend(node, counts) {
    const key = (cls, text) => el("span", { class: "legend-item" }, [el("span", { class: `key ${cls}` }), text]);
    const items = [key("key-dose", "dose (mean per metre)"), key("key-band", "min..max in the metre"), key("key-limit", "limits"), key("key-target", "target")];
    for (const v of VERDICT_CODES) {
      const n = counts ? counts[v] || 0 : 0;
      if (v === "in_spec") {
        items.push(el("span", { class: "legend-item", "data-verdict": v }, [`in spec: ${n} m`]));
        continue;
      }
      if (!n) continue;
      const swatch = el("span", { class: "swatch" });
      swatch.style.background = verdictColour(v);
      items.push(el("span", { class: "legend-item", "data-verdict": v }, [swatch, `${verdictLabel(v)}: ${n} m`]));
    }
    node.replaceChildren(...items);
  }

  // Keeps a chart as wide as its box (window resizes, panels reflowing).
  function followWidth(container, chart) {
    const apply = () => chart.setWidth(container.clientWidth);
    if (typeof ResizeObserver === "function") new ResizeObserver(apply).observe(container);
    else window.addEventListener("resize", apply);
    apply();
  }

  async function getJson(url) {
    // Returns {status, body}; body null when the answer is not JSON.
    const resp = await fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } });
    let body = null;
    try {
      body = await resp.json();
    } catch (e) {
      body = null;
    }
    return { status: resp.status, body: body };
  }

  window.linectlCharts = {
    VERDICTS: VERDICTS,
    verdictLabel: verdictLabel,
    makeDoseChart: makeDoseChart,
    buildDoseData: buildDoseData,
    renderVerdictLegend: renderVerdictLegend,
    followWidth: followWidth,
    el: el,
    fmtNum: fmtNum,
    fmtIso: fmtIso,
  };

  // ------------------------------------------------------------------ page helpers

  function setStatus(text, cls) {
    const node = document.getElementById("page-status");
    if (!node) return;
    node.textContent = text || "";
    node.className = `page-status ${cls || ""}`;
    node.hidden = !text;
  }

  // Not logged in: the reel pages have no login form of their own; point to the HMI's.
  function showNotLoggedIn() {
    const node = document.getElementById("page-status");
    if (!node) return;
    node.replaceChildren("Not logged in. ", el("a", { href: "/", text: "Log in on the HMI page" }), ", then come back.");
    node.className = "page-status error";
    node.hidden = false;
  }

  async function loadSessionHeader() {
    try {
      const r = await getJson("/api/session");
      if (r.status === 200 && r.body) {
        const who = document.getElementById("session-user");
        const role = document.getElementById("session-role");
        if (who) who.textContent = r.body.user || "";
        if (role) role.textContent = r.body.role || "";
        const box = document.getElementById("header-user");
        if (box) box.hidden = false;
        const line = document.getElementById("header-line");
        if (line && r.body.line_id) line.textContent = `line ${r.body.line_id}`;
        return true;
      }
      if (r.status === 401) {
        showNotLoggedIn();
        return false;
      }
      setStatus(`The server answered HTTP ${r.status} to /api/session.`, "error");
      return false;
    } catch (e) {
      setStatus(`Cannot reach the server: ${e.message}`, "error");
      return false;
    }
  }

  function reelHref(id) {
    return `/reels/${encodeURIComponent(id)}`;
  }

  // ------------------------------------------------------------------ /reels

  async function initReelList() {
    if (!(await loadSessionHeader())) return;
    setStatus("Loading reels…");
    let r;
    try {
      r = await getJson("/api/reels");
    } catch (e) {
      setStatus(`Cannot reach the server: ${e.message}`, "error");
      return;
    }
    if (r.status === 401) return showNotLoggedIn();
    if (r.status !== 200 || !r.body || !Array.isArray(r.body.reels)) {
      setStatus(r.body && r.body.error ? r.body.error : `Reel list: HTTP ${r.status}`, "error");
      return;
    }
    const reels = r.body.reels;
    setStatus(reels.length ? "" : "No reel recorded yet.");
    const rows = reels.map((reel) => {
      const bad = typeof reel.out_of_spec === "number" && reel.out_of_spec > 0;
      return el("tr", { "data-reel": reel.reel_id, "data-state": reel.state, class: bad ? "has-bad" : "" }, [
        el("td", null, [el("a", { href: reelHref(reel.reel_id), text: reel.reel_id })]),
        el("td", { text: reel.state || "—" }),
        el("td", { text: fmtIso(reel.started_at) }),
        el("td", { text: fmtIso(reel.ended_at) }),
        el("td", { text: reel.product || "—" }),
        el("td", { text: reel.recipe_version === null || reel.recipe_version === undefined ? "—" : String(reel.recipe_version) }),
        el("td", { text: reel.operator || "—" }),
        el("td", { class: "num", text: fmtNum(reel.planned_length_m, 1) }),
        el("td", { class: "num", text: fmtNum(reel.metres_recorded, 0) }),
        el("td", { class: "num", text: fmtNum(reel.in_spec, 0) }),
        el("td", { class: bad ? "num bad" : "num", text: bad ? `${reel.out_of_spec} NOT IN SPEC` : fmtNum(reel.out_of_spec, 0) }),
        el("td", { text: reel.end_reason || "—" }),
      ]);
    });
    document.getElementById("reel-table-body").replaceChildren(...rows);
  }

  // ------------------------------------------------------------------ /reels/<id>

  function reelIdFromPath() {
    const parts = location.pathname.split("/").filter((p) => p !== "");
    if (!parts.length) return "";
    try {
      return decodeURIComponent(parts[parts.length - 1]);
    } catch (e) {
      return parts[parts.length - 1];
    }
  }

  function dl(pairs) {
    const items = [];
    for (const [k, v] of pairs) items.push(el("dt", { text: k }), el("dd", { text: v }));
    return el("dl", { class: "facts" }, items);
  }

  function table(headers, rows, cls) {
    return el("table", { class: cls || "data" }, [
      el("thead", null, [el("tr", null, headers.map((h) => el("th", { text: h })))]),
      el("tbody", null, rows.map((r) => el("tr", null, r.map((c) => (c instanceof Node ? el("td", null, [c]) : el("td", { text: c })))))),
    ]);
  }

  function rangesText(ranges) {
    // [[from_m, to_m], ...] metre marks: "10-15 m" covers metres 10 to 14.
    if (!Array.isArray(ranges) || !ranges.length) return "—";
    return `${ranges.map((r) => `${r[0]}-${r[1]}`).join(", ")} m`;
  }

  function renderVerdict(node, verdict) {
    // The report's verdict is an object {decision, reasons, by_cause, ...}; a bare string
    // (a verdict name) is shown as it is.
    if (typeof verdict === "string" || verdict === null || verdict === undefined) {
      const text = verdict ? verdictLabel(verdict) : "—";
      node.replaceChildren(el("div", { id: "verdict-decision", class: "decision", "data-decision": verdict || "", text: text.toUpperCase() }));
      return;
    }
    const decision = verdict.decision || "—";
    const parts = [el("div", { id: "verdict-decision", class: "decision", "data-decision": decision, text: decision })];
    const reasons = Array.isArray(verdict.reasons) ? verdict.reasons : [];
    if (reasons.length) parts.push(el("ul", { class: "reasons" }, reasons.map((r) => el("li", { text: r }))));
    else if (decision === "RELEASE") parts.push(el("p", { text: "Every product metre is in spec." }));
    if (typeof verdict.product_to_m === "number") {
      parts.push(
        el("p", {
          class: "sub",
          text: `Product metres ${verdict.product_from_m || 0}-${verdict.product_to_m} m: ${fmtNum(verdict.in_spec_m, 0)} in spec, ${fmtNum(verdict.not_in_spec_m, 0)} not in spec.`,
        })
      );
    }
    const groups = Array.isArray(verdict.by_cause) ? verdict.by_cause : [];
    if (groups.length) {
      parts.push(
        table(
          ["not in spec", "why", "metres", "where"],
          groups.map((g) => [g.label || verdictLabel(g.cause), g.why || "—", fmtNum(g.metres, 0), rangesText(g.ranges)])
        )
      );
    }
    node.replaceChildren(...parts);
  }

  // Labels and units of the summary keys we know; any other key is shown as it comes.
  const SUMMARY_LABELS = {
    metres_recorded: ["metres recorded", "m"],
    in_spec: ["in spec", "m"],
    out_of_spec: ["not in spec", "m"],
    out_of_spec_by_verdict: ["not in spec by verdict", "m"],
    metres_by_cause: ["metres by cause", "m"],
    dose_stats_metres: ["metres with a proven dose", "m"],
    dose_min_kgy: ["dose min (lowest bin)", "kGy"],
    dose_mean_kgy: ["dose mean", "kGy"],
    dose_max_kgy: ["dose max (highest bin)", "kGy"],
    duration_s: ["duration", "s"],
    speed_m_min_mean: ["metres per minute of duration (not line speed)", "m/min"],
    speed_m_min_running: ["line speed while running", "m/min"],
    speed_timed_m: ["line speed: metres timed", "m"],
    speed_timed_s: ["line speed: seconds timed", "s"],
    running_s: ["time running", "s"],
    operator_actions: ["operator actions", ""],
    state_changes: ["state changes", ""],
    accounting_events: ["accounting events", ""],
  };

  function summaryValue(key, v, unit) {
    if (v === null || v === undefined) return "—";
    if (typeof v === "object") {
      const parts = Object.entries(v).map(([k, n]) => `${key === "out_of_spec_by_verdict" ? verdictLabel(k) : k} ${n}`);
      return parts.length ? `${parts.join(", ")}${unit ? " " + unit : ""}` : "—";
    }
    if ((key === "duration_s" || key === "running_s") && typeof v === "number") return `${fmtDuration(v)} (${fmtNum(v, 1)} s)`;
    if (typeof v === "number") return `${Number.isInteger(v) ? String(v) : fmtNum(v, 2)}${unit ? " " + unit : ""}`;
    return String(v);
  }

  function renderSummary(node, summary) {
    const rows = Object.entries(summary || {}).map(([k, v]) => {
      const known = SUMMARY_LABELS[k] || [k.replace(/_/g, " "), ""];
      return [known[0], summaryValue(k, v, known[1])];
    });
    node.replaceChildren(rows.length ? table(["", ""], rows, "data summary") : el("p", { text: "No summary." }));
  }

  function renderReel(report) {
    const reel = report.reel || {};
    const recipe = report.recipe || {};
    document.getElementById("reel-title").textContent = `Reel ${reel.reel_id || reelIdFromPath()}`;
    document.title = `Reel ${reel.reel_id || ""} — linectl`;

    document.getElementById("reel-facts").replaceChildren(
      dl([
        ["Reel", reel.reel_id || "—"],
        ["Line", reel.line_id || "—"],
        ["Operator", reel.operator || "—"],
        ["State", reel.state || "—"],
        ["Started", fmtIso(reel.started_at)],
        ["Ended", fmtIso(reel.ended_at)],
        ["End reason", reel.end_reason || "—"],
        ["Planned length", reel.planned_length_m === null || reel.planned_length_m === undefined ? "—" : `${fmtNum(reel.planned_length_m, 1)} m`],
        ["Product", recipe.product || "—"],
        ["Recipe version", recipe.version === null || recipe.version === undefined ? "—" : String(recipe.version)],
        ["Recipe hash", recipe.hash ? String(recipe.hash).slice(0, 16) + "…" : "—"],
        ["Dose limits", `min ${fmtNum(recipe.min_dose_kgy)} · target ${fmtNum(recipe.target_dose_kgy)} · max ${fmtNum(recipe.max_dose_kgy)} kGy`],
      ])
    );
    renderVerdict(document.getElementById("reel-verdict"), report.verdict);
    renderSummary(document.getElementById("reel-summary"), report.summary);

    // The plot: the report's metres in the live chart's shape.
    const points = (report.metres || []).map((m) => [m.index, m.dose_kgy, m.min_dose_kgy, m.max_dose_kgy, m.verdict]);
    const chartBox = document.getElementById("reel-chart");
    const chart = makeDoseChart(chartBox, { height: 340 });
    followWidth(chartBox, chart);
    const v = report.verdict && typeof report.verdict === "object" ? report.verdict : {};
    const xEnd = typeof v.product_to_m === "number" ? v.product_to_m : reel.planned_length_m;
    const built = chart.update(points, { min: recipe.min_dose_kgy, target: recipe.target_dose_kgy, max: recipe.max_dose_kgy }, xEnd);
    // Missing metres past the last record (a reel that reached its length) are in the
    // verdict but not in the metres: mark them too.
    if (typeof v.product_to_m === "number" && built.lastIndex !== null && v.product_to_m > built.lastIndex + 1) {
      const extra = v.product_to_m - (built.lastIndex + 1);
      built.counts.missing = (built.counts.missing || 0) + extra;
      built.marks.push({ a: built.lastIndex + 1, b: v.product_to_m, verdict: "missing" });
      chart.uplot.redraw(false);
    }
    renderVerdictLegend(document.getElementById("reel-chart-legend"), built.counts);
    window.reelPage = { chartPoints: () => chart.pointCount(), report: report };

    const cuts = report.cut_list && Array.isArray(report.cut_list.cuts) ? report.cut_list.cuts : [];
    document.getElementById("reel-cuts").replaceChildren(
      cuts.length
        ? table(
            ["from (m)", "to (m)", "length (m)", "verdicts", "causes"],
            cuts.map((c) => [String(c.from_m), String(c.to_m), String(c.length_m), (c.verdicts || []).map(verdictLabel).join(", "), (c.causes || []).join(", ")])
          )
        : el("p", { text: "Nothing to cut." })
    );

    // Ranges: the report gives inclusive metre indices first/last; start_m/end_m also read.
    const ranges = Array.isArray(report.ranges) ? report.ranges : [];
    document.getElementById("reel-ranges").replaceChildren(
      ranges.length
        ? table(
            ["from", "to", "length (m)", "verdict", "causes"],
            ranges.map((r) => [
              r.start_m !== undefined ? `${fmtNum(r.start_m, 1)} m` : `metre ${r.first}`,
              r.end_m !== undefined ? `${fmtNum(r.end_m, 1)} m` : `metre ${r.last}`,
              fmtNum(r.length_m, 0),
              verdictLabel(r.verdict),
              (r.causes || []).join(", "),
            ])
          )
        : el("p", { text: "Every recorded metre is in spec." })
    );

    const alarms = Array.isArray(report.alarms) ? report.alarms : [];
    document.getElementById("reel-alarms").replaceChildren(
      alarms.length
        ? table(
            ["alarm", "message", "raised", "acknowledged", "by", "cleared"],
            alarms.map((a) => [a.kind || "—", a.message || "", fmtIso(a.raised_at), fmtIso(a.acknowledged_at), a.acknowledged_by || "—", fmtIso(a.cleared_at)])
          )
        : el("p", { text: "No alarm while this reel was loaded." })
    );

    const events = Array.isArray(report.events) ? report.events : [];
    document.getElementById("reel-events-count").textContent = `(${events.length})`;
    document.getElementById("reel-events").replaceChildren(
      events.length
        ? table(
            ["time", "who", "action", "detail", "result"],
            events.map((e) => [
              fmtIso(e.t),
              e.actor || "—",
              e.action || "—",
              e.detail && typeof e.detail === "object" ? JSON.stringify(e.detail) : String(e.detail || ""),
              e.accepted === false ? `refused: ${e.reason || ""}` : "accepted",
            ])
          )
        : el("p", { text: "No event." })
    );
    const raw = document.getElementById("reel-json");
    if (raw) raw.href = `/api/reels/${encodeURIComponent(reel.reel_id || reelIdFromPath())}`;
    document.getElementById("reel-body").hidden = false;
  }

  async function initReelReport() {
    const id = reelIdFromPath();
    document.getElementById("reel-title").textContent = `Reel ${id}`;
    if (!(await loadSessionHeader())) return;
    setStatus("Loading the reel's report…");
    let r;
    try {
      r = await getJson(`/api/reels/${encodeURIComponent(id)}`);
    } catch (e) {
      setStatus(`Cannot reach the server: ${e.message}`, "error");
      return;
    }
    if (r.status === 401) return showNotLoggedIn();
    if (r.status !== 200 || !r.body) {
      setStatus(r.body && r.body.error ? r.body.error : `Reel ${id}: HTTP ${r.status}`, "error");
      return;
    }
    setStatus("");
    renderReel(r.body);
  }

  // This file is also loaded by the HMI page for the chart; it runs a page only on its own.
  function start() {
    const page = document.body.dataset.page;
    if (page === "reels") initReelList();
    else if (page === "reel") initReelReport();
  }
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
