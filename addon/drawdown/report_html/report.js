// drawdown report page. Builds the DOM from the JSON in #drawdown-data with
// createElement/textContent/setAttribute only: nothing from the ledger is ever parsed as markup.
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("drawdown-data").textContent);
  var app = document.getElementById("app");
  var SVGNS = "http://www.w3.org/2000/svg";
  var STATUSES = ["normal", "budget_exhausted", "denied", "anomalous"];
  var RUN_PAGE = 1000;  // rows of the runs table made at a time (drawMore)

  // --- helpers -----------------------------------------------------------------------------
  function el(tag, attrs, children) {
    var node = document.createElement(tag);
    setAll(node, attrs);
    append(node, children);
    return node;
  }
  function sv(tag, attrs, children) {
    var node = document.createElementNS(SVGNS, tag);
    setAll(node, attrs);
    append(node, children);
    return node;
  }
  function setAll(node, attrs) {
    if (!attrs) return;
    Object.keys(attrs).forEach(function (key) {
      var value = attrs[key];
      if (value === null || value === undefined || value === false) return;
      node.setAttribute(key, String(value));
    });
  }
  function append(node, children) {
    if (children === null || children === undefined) return;
    if (!Array.isArray(children)) children = [children];
    children.forEach(function (child) {
      if (child === null || child === undefined || child === false) return;
      node.appendChild(typeof child === "object" ? child : document.createTextNode(String(child)));
    });
  }
  function fmtUsd(v) {
    if (v === null || v === undefined) return "–";
    return "$" + (Math.abs(v) >= 0.01 ? v.toFixed(4) : v.toFixed(6));
  }
  function fmtInt(n) {
    return n === null || n === undefined ? "–" : Number(n).toLocaleString("en-US");
  }
  function fmtSeconds(s) {
    if (s === null || s === undefined) return "–";
    if (s < 1) return Math.round(s * 1000) + " ms";
    if (s < 120) return s.toFixed(1) + " s";
    if (s < 7200) return (s / 60).toFixed(1) + " min";
    return (s / 3600).toFixed(1) + " h";
  }
  function fmtTime(epoch, withDate, withSeconds) {
    var iso = new Date(epoch * 1000).toISOString().slice(0, withSeconds ? 19 : 16);
    return withDate ? iso.replace("T", " ") : iso.slice(11);
  }
  function num(key, value, text) {
    return el("td", { "class": "num", "data-k": key, "data-v": value === null ? "" : value }, text);
  }
  // A run id as a shell word (ids come from agents: quoted unless plainly safe).
  function shellWord(text) {
    text = String(text);
    return /^[A-Za-z0-9._%:@+=,\/-]+$/.test(text) ? text : "'" + text.replace(/'/g, "'\\''") + "'";
  }
  function badge(cls, text) {
    return el("span", { "class": "badge " + cls }, text);
  }
  function section(id, title, count) {
    var h = el("h2", null, [title, count === undefined ? null : el("span", { "class": "count" }, String(count))]);
    var s = el("section", { id: id }, h);
    app.appendChild(s);
    return s;
  }

  // --- header and summary ------------------------------------------------------------------
  var runs = data.runs || [];
  var anomalies = data.anomalies || [];
  var spend = data.spend || { series: [], bucket_seconds: 3600 };
  var total = spend.series.filter(function (s) { return s.budget === null; })[0];
  // --tenant / --workflow (and --run with them): the part of the fleet this page is of.
  var narrowed = data.filter || {};
  var of = ["tenant", "workflow"].filter(function (k) { return narrowed[k] !== null && narrowed[k] !== undefined; })
    .map(function (k) { return k + " " + narrowed[k]; }).join(" · ");
  var meta = "generated " + (data.generated_at || "") + (data.since ? " · since " + data.since : " · whole ledger") +
    (of ? " · " + of : "") + " · " + runs.length + " runs";
  app.appendChild(el("header", { "class": "top" }, [el("h1", null, "drawdown report"), el("div", { "class": "meta" }, meta)]));

  var d = data.decisions || { allow: 0, deny: 0, would_deny: 0 };
  function card(id, cls, label, value, raw) {
    return el("div", { "class": "card " + cls, id: id, "data-v": raw }, [
      el("div", { "class": "label" }, label), el("div", { "class": "value" }, value)]);
  }
  app.appendChild(el("div", { "class": "cards" }, [
    card("card-allow", "allow", "allowed", fmtInt(d.allow), d.allow),
    card("card-deny", "deny", "denied", fmtInt(d.deny), d.deny),
    card("card-would", "would", "would deny (shadow)", fmtInt(d.would_deny), d.would_deny),
    card("card-spend", "spend", "spent", fmtUsd(total ? total.usd : 0), total ? total.usd : 0),
    card("card-runs", "runs", "runs", fmtInt(runs.length), runs.length),
    card("card-anomalies", "anom", "anomalies", fmtInt(anomalies.length), anomalies.length),
  ]));

  // --- spend over time ---------------------------------------------------------------------
  var spendSection = section("spend", "Spend over time");
  if (!spend.series.length) {
    spendSection.appendChild(el("p", { "class": "empty" }, "No committed spend in this period."));
  } else {
    var select = el("select", { id: "series-select", "aria-label": "budget scope" });
    spend.series.forEach(function (s, i) {
      var label = s.budget === null ? "All spend" : s.scope + (s.per ? " (per " + s.per + (s.window_start ? " from " + s.window_start : "") + ")" : "");
      select.appendChild(el("option", { value: i }, label + " — " + fmtUsd(s.usd)));
    });
    var bucketLabel = fmtSeconds(spend.bucket_seconds).replace(".0", "");
    spendSection.appendChild(el("div", { "class": "controls" }, [el("span", null, "Scope"), select,
      el("span", null, "bars: spend per " + bucketLabel + " (UTC) · line: cumulative")]));
    if (spend.series_omitted) {
      // The page embeds series for the total and the budget instances it lists (data.budget_summaries).
      spendSection.appendChild(el("p", { "class": "reason", id: "series-omitted" },
        fmtInt(spend.series_omitted) + " budget instances' spend is not drawn in this page (it draws the total and the instances the Budgets table lists). " +
        "drawdown report --run ID --html FILE draws a run's own; --json lists every instance."));
    }
    var chartBox = el("div", { id: "spend-chart" });
    spendSection.appendChild(chartBox);
    var drawSpend = function () {
      while (chartBox.firstChild) chartBox.removeChild(chartBox.firstChild);
      chartBox.appendChild(spendChart(spend.series[Number(select.value)], spend.bucket_seconds));
    };
    select.addEventListener("change", drawSpend);
    drawSpend();
  }

  function spendChart(series, size) {
    var W = 900, H = 240, L = 64, R = 70, T = 14, B = 28;
    var points = series.points;
    var first = points[0].t, last = points[points.length - 1].t;
    var n = Math.round((last - first) / size) + 1;
    var byT = {};
    points.forEach(function (p) { byT[p.t] = p; });
    var maxBar = Math.max.apply(null, points.map(function (p) { return p.usd; })) || 1;
    var limit = series.limit && series.limit.usd !== null ? series.limit.usd : null;
    var maxCum = Math.max(series.usd || 0, limit || 0) || 1;
    var bw = (W - L - R) / n;
    var svg = sv("svg", { viewBox: "0 0 " + W + " " + H, role: "img", "aria-label": "spend over time for " + series.scope });
    svg.appendChild(sv("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, "class": "axis" }));
    [0, 0.5, 1].forEach(function (f) {
      var y = H - B - f * (H - B - T);
      svg.appendChild(sv("line", { x1: L, y1: y, x2: W - R, y2: y, "class": "axis" }));
      svg.appendChild(sv("text", { x: L - 6, y: y + 4, "text-anchor": "end" }, f ? fmtUsd(maxBar * f) : "$0"));
      svg.appendChild(sv("text", { x: W - R + 6, y: y + 4 }, f ? fmtUsd(maxCum * f) : "$0"));
    });
    var cum = 0, path = [];
    for (var i = 0; i < n; i++) {
      var t = first + i * size;
      var p = byT[t];
      var x = L + i * bw;
      if (p) {
        var h = (p.usd / maxBar) * (H - B - T);
        var bar = sv("rect", { x: x + bw * 0.1, y: H - B - h, width: Math.max(bw * 0.8, 1), height: Math.max(h, 0.5), "class": "bar" });
        bar.appendChild(sv("title", null, fmtTime(t, true, size < 60) + " UTC: " + fmtUsd(p.usd) + ", " + fmtInt(p.tokens) + " tokens, " + fmtInt(p.requests) + " requests"));
        svg.appendChild(bar);
        cum = p.cum_usd;
      }
      var yc = H - B - (cum / maxCum) * (H - B - T);
      path.push((i === 0 ? "M" : "L") + x.toFixed(1) + " " + yc.toFixed(1) + " L" + (x + bw).toFixed(1) + " " + yc.toFixed(1));
    }
    svg.appendChild(sv("path", { d: path.join(" "), "class": "cum" }));
    if (limit !== null) {
      var yl = H - B - (limit / maxCum) * (H - B - T);
      svg.appendChild(sv("line", { x1: L, y1: yl, x2: W - R, y2: yl, "class": "limit" }));
      svg.appendChild(sv("text", { x: W - R - 4, y: yl - 4, "text-anchor": "end" }, "limit " + fmtUsd(limit)));
    }
    var ticks = Math.min(n, 6);
    for (var k = 0; k < ticks; k++) {
      var idx = ticks === 1 ? 0 : Math.round(k * (n - 1) / (ticks - 1));
      svg.appendChild(sv("text", { x: L + idx * bw + bw / 2, y: H - 8, "text-anchor": "middle" }, fmtTime(first + idx * size, k === 0, size < 60)));
    }
    return svg;
  }

  // --- runs --------------------------------------------------------------------------------
  var runSection = section("runs", "Runs", runs.length);
  if (!runs.length) {
    runSection.appendChild(el("p", { "class": "empty" }, "No runs in this period."));
  } else {
    var filters = el("div", { "class": "filters" });
    var table = el("table", { id: "runs-table" });
    var head = el("tr", null, ["run", "status", "steps", "allowed", "denied", "would deny", "cost", "tokens", "duration", "anomalies"].map(function (h, i) {
      return el("th", { "class": i >= 2 && i <= 8 ? "num" : null }, h);
    }));
    table.appendChild(el("thead", null, head));
    var body = el("tbody");
    table.appendChild(body);
    // A week of a fleet is tens of thousands of runs: their rows are made as they are shown,
    // RUN_PAGE at a time (a table of 48,000 rows took Chromium most of a minute to open).
    var rows = runs.map(function (run) { return { run: run, tr: null, close: function () {} }; });
    var shown = rows;
    var drawn = 0;
    var moreButton = el("button", { type: "button", id: "more-runs" });
    var more = el("tr", { "class": "more" }, el("td", { colspan: 10 }, moreButton));
    moreButton.addEventListener("click", function () { drawMore(RUN_PAGE); });
    function drawMore(count) {
      var end = Math.min(shown.length, drawn + count);
      if (more.parentNode) body.removeChild(more);
      for (; drawn < end; drawn++) body.appendChild(rowOf(shown[drawn]).tr);
      if (drawn < shown.length) {
        moreButton.textContent = "show " + fmtInt(Math.min(RUN_PAGE, shown.length - drawn)) + " more (" +
          fmtInt(shown.length - drawn) + " of " + fmtInt(shown.length) + " not shown yet)";
        body.appendChild(more);
      }
    }
    function render(status) {
      rows.forEach(function (r) { r.close(); });
      while (body.firstChild) body.removeChild(body.firstChild);
      shown = rows.filter(function (r) {
        // "shadow": the runs whose would_deny decisions enforcing would have refused
        return status === "all" || (status === "shadow" ? !!r.run.would_status : r.run.status === status);
      });
      drawn = 0;
      drawMore(RUN_PAGE);
    }
    function rowOf(entry) {
      if (entry.tr) return entry;
      var run = entry.run;
      var kinds = {};
      run.anomalies.forEach(function (a) { kinds[a.kind] = true; });
      var tr = el("tr", { "class": "run", "data-scope": run.scope, "data-status": run.status,
        "data-timeline": run.timeline_omitted ? "omitted" : null, tabindex: 0 }, [
        el("td", { "class": "scope", "data-k": "scope" }, run.scope),
        el("td", { "data-k": "status", "data-v": run.status }, [badge(run.status, run.status.replace("_", " ")),
          run.would_status ? el("span", { "class": "reason", title: "what enforcing the would_deny decisions would have made of this run" }, " shadow: " + run.would_status.replace("_", " ")) : null]),
        // --since reports a run active in the window whole; "(N since)" is its part in the window
        // steps as the guards count them; "+N retried": failed attempts its SDK retried, no steps
        num("steps", run.steps, fmtInt(run.steps) + (run.retried ? " +" + fmtInt(run.retried) + " retried" : "") +
          (run.in_window && run.in_window.requests !== run.requests ? " (" + fmtInt(run.in_window.requests) + " requests since)" : "")),
        num("allowed", run.allowed, fmtInt(run.allowed)),
        num("denied", run.denied, fmtInt(run.denied)),
        num("would_deny", run.would_deny, fmtInt(run.would_deny)),
        num("usd", run.usd, fmtUsd(run.usd)),
        num("tokens", run.tokens, fmtInt(run.tokens)),
        num("duration_s", run.duration_s, fmtSeconds(run.duration_s)),
        el("td", { "data-k": "anomalies", "data-v": run.anomalies.length }, Object.keys(kinds).sort().map(function (k) { return badge("kind", k); })),
      ]);
      var detail = null;
      var toggle = function () {
        if (detail) {
          body.removeChild(detail);
          detail = null;
          tr.classList.remove("open");
          return;
        }
        detail = el("tr", { "class": "detail" }, el("td", { colspan: 10 }, runDetail(run)));
        body.insertBefore(detail, tr.nextSibling);
        tr.classList.add("open");
      };
      tr.addEventListener("click", toggle);
      tr.addEventListener("keydown", function (e) { if (e.key === "Enter") toggle(); });
      entry.tr = tr;
      entry.close = function () { if (detail) toggle(); };
      return entry;
    }
    drawMore(RUN_PAGE);
    var counts = { all: runs.length };
    STATUSES.forEach(function (s) { counts[s] = runs.filter(function (r) { return r.status === s; }).length; });
    counts.shadow = runs.filter(function (r) { return r.would_status; }).length;
    var chips = {};
    ["all"].concat(STATUSES, ["shadow"]).forEach(function (s) {
      if (s !== "all" && !counts[s]) return;
      var label = s === "shadow" ? "shadow: would be refused" : s.replace("_", " ");
      var b = el("button", { type: "button", "data-status": s, "class": s === "all" ? "on" : null }, label + " (" + counts[s] + ")");
      b.addEventListener("click", function () {
        Array.prototype.forEach.call(filters.children, function (c) { c.classList.toggle("on", c === b); });
        render(s);
      });
      filters.appendChild(b);
      chips[s] = b;
    });
    // #status=NAME opens the page filtered (a link to a shadow week's runs to look at first)
    var wanted = /^#status=(\w+)$/.exec(window.location.hash);
    if (wanted && chips[wanted[1]]) chips[wanted[1]].click();
    runSection.appendChild(filters);
    runSection.appendChild(table);
    runSection.appendChild(el("p", { "class": "reason" }, "Click a run for its timeline (open the page with #all to expand every run, e.g. to print it)."));
    var omitted = data.timelines ? data.timelines.runs_omitted : 0;
    if (omitted) {
      runSection.appendChild(el("p", { "class": "reason", id: "timelines-omitted" },
        fmtInt(omitted) + " of " + fmtInt(runs.length) + " runs have no timeline in this page: it embeds " + fmtInt(data.timelines.budget) +
        " steps, given first to denied, over-budget and anomalous runs, then the latest. drawdown report --run ID --html FILE draws any run whole."));
    }
    if (window.location.hash === "#all") {  // every run, expanded: to print the page
      drawMore(shown.length);
      rows.forEach(function (r) { r.tr.click(); });
    }
  }

  function runDetail(run) {
    var box = el("div", { "class": "run-detail", "data-scope": run.scope });
    var steps = run.timeline || [];
    var facts = [run.agent ? "agent " + run.agent : null, run.workflow ? "workflow " + run.workflow : null,
      "started " + (run.started || "–"), "estimated " + fmtUsd(run.est_usd)].filter(Boolean).join(" · ");
    box.appendChild(el("div", { "class": "reason" }, facts));
    run.anomalies.forEach(function (a) {
      box.appendChild(el("p", null, [badge("kind", a.kind), " ", a.detail]));
    });
    if (run.timeline_omitted) {
      // The page embeds a budget of steps (data.timelines), flagged and recent runs first.
      box.appendChild(el("p", { "class": "empty timeline-omitted" }, [
        "This run's " + fmtInt(run.timeline_total) + " requests are not drawn in this page (it holds " +
        fmtInt(data.timelines.budget) + " steps, given first to denied, over-budget and anomalous runs, then the latest). Its whole timeline: ",
        el("code", null, "drawdown report --run " + shellWord(run.run) + " --html run.html")]));
      return box;
    }
    if (!steps.length) {
      box.appendChild(el("p", { "class": "empty" }, "No steps recorded in this period."));
      return box;
    }
    box.appendChild(el("div", { "class": "legend" }, [
      el("span", null, [el("i", { style: "background:var(--allow)" }), "allowed"]),
      el("span", null, [el("i", { style: "background:var(--deny)" }), "denied"]),
      el("span", null, [el("i", { style: "background:var(--would)" }), "would deny"]),
      el("span", null, [el("i", { style: "border:2px solid var(--anom)" }), "evidence of an anomaly"]),
      el("span", null, [el("i", { "class": "retried" }), "failed attempt its SDK retried (no step)"]),
    ]));
    box.appendChild(timeline(steps));
    if (run.timeline_total > steps.length) {
      box.appendChild(el("p", { "class": "reason" }, ["Showing the first " + steps.length + " of " + run.timeline_total + " requests; more of them: ",
        el("code", null, "drawdown report --run " + shellWord(run.run) + " --html run.html")]));
    }
    var list = el("table", { "class": "steps" });
    list.appendChild(el("thead", null, el("tr", null, ["#", "at", "action", "decision", "status", "cost", "tokens", "took", "request", "anomalies"].map(function (h) { return el("th", null, h); }))));
    var tbody = el("tbody");
    steps.forEach(function (s, i) {
      tbody.appendChild(el("tr", { "data-request": s.request_id }, [
        el("td", { "class": "num" }, String(i + 1)),
        el("td", { "class": "num" }, "+" + fmtSeconds(s.t)),
        el("td", null, s.action || "–"),
        el("td", { title: s.reason || "" }, [badge(s.decision, s.decision.replace("_", " ")), s.reason_code ? el("span", { "class": "reason" }, " " + s.reason_code) : null]),
        el("td", { "class": "num" }, [s.status === null ? "–" : String(s.status), s.retried ? el("span", { "class": "reason" }, " retried") : null]),
        el("td", { "class": "num" }, fmtUsd(s.usd)),
        el("td", { "class": "num" }, fmtInt(s.tokens)),
        el("td", { "class": "num" }, s.ms === null ? "–" : fmtSeconds(s.ms / 1000)),
        el("td", { "class": "mono" }, s.request),
        el("td", null, s.anomalies.map(function (k) { return badge("kind", k); })),
      ]));
    });
    list.appendChild(tbody);
    box.appendChild(el("details", null, [el("summary", null, "All " + steps.length + " requests"), list]));
    return box;
  }

  function timeline(steps) {
    var W = 900, L = 40, R = 12, T = 6, B = 22;
    var rowH = steps.length > 150 ? 3 : steps.length > 40 ? 6 : 12;
    var H = T + B + steps.length * rowH;
    var end = 0;
    steps.forEach(function (s) { end = Math.max(end, s.t + (s.ms || 0) / 1000); });
    end = end || 1;
    var scale = (W - L - R) / end;
    var svg = sv("svg", { viewBox: "0 0 " + W + " " + H, "class": "timeline", role: "img", "aria-label": "timeline of the run's steps" });
    for (var k = 0; k <= 4; k++) {
      var x = L + (k / 4) * (W - L - R);
      svg.appendChild(sv("line", { x1: x, y1: T, x2: x, y2: H - B, "class": "axis" }));
      svg.appendChild(sv("text", { x: x, y: H - 6, "text-anchor": k === 0 ? "start" : k === 4 ? "end" : "middle" }, "+" + fmtSeconds(end * k / 4)));
    }
    steps.forEach(function (s, i) {
      var cls = "step " + s.decision + (s.anomalies.length ? " flagged" : "") + (s.retried ? " retried" : "");
      var r = sv("rect", {
        x: L + s.t * scale, y: T + i * rowH + 1, width: Math.max(((s.ms || 0) / 1000) * scale, 3),
        height: Math.max(rowH - 2, 1.5), rx: 1.5, "class": cls, "data-request": s.request_id,
      });
      r.appendChild(sv("title", null, "#" + (i + 1) + " " + (s.action || "?") + " — " + s.decision +
        (s.reason ? ": " + s.reason : "") + (s.retried ? " · failed, retried by its SDK" : "") + " · " + fmtUsd(s.usd) + " · " + (s.ms === null ? "–" : fmtSeconds(s.ms / 1000)) +
        (s.anomalies.length ? " · " + s.anomalies.join(", ") : "")));
      svg.appendChild(r);
    });
    if (steps.length <= 40) {
      svg.appendChild(sv("text", { x: L - 6, y: T + rowH - 2, "text-anchor": "end" }, "#1"));
    }
    return svg;
  }

  // --- anomalies ---------------------------------------------------------------------------
  var anomalySection = section("anomalies", "Anomalies", anomalies.length);
  // Whose thresholds found them (or found none): the report's own line, as the text says it.
  var judged = data.judged_by;
  var unrecorded = judged ? judged.unrecorded_policies || 0 : 0;
  if (judged && (judged.source !== "defaults" || unrecorded)) {
    var byPolicy = Object.keys(judged.runs_by_policy || {}).map(function (digest) {
      var runs = judged.runs_by_policy[digest];
      return digest + " (" + runs + (runs === 1 ? " run)" : " runs)");
    });
    var whose = judged.source === "policy" ? "the policy given (--policy, " + judged.policy_digest + ")"
      : judged.source === "ledger" && byPolicy.length > 1
        ? "the settings the proxy recorded for each run's policy: " + byPolicy.join(", ")
      : judged.source === "ledger" ? "the settings of policy " + (Object.keys(judged.runs_by_policy || {})[0] ||
        judged.policy_digest) + ", the proxy's, as it recorded them"
      : "the built-in settings (see --policy)";
    var unknown = unrecorded ? "; " + unrecorded + (unrecorded === 1 ? " policy" : " policies") +
      " of these decisions left no settings in the ledger (an older drawdown's)" : "";
    anomalySection.appendChild(el("p", { "class": "reason", id: "judged-by", "data-source": judged.source },
      "Judged by " + whose + unknown + "."));
  }
  if (!anomalies.length) {
    anomalySection.appendChild(el("p", { "class": "empty" }, "No anomalies: every run looks structurally normal."));
  } else {
    var at = el("table", { id: "anomalies-table" });
    at.appendChild(el("thead", null, el("tr", null, ["kind", "scope", "what happened", "evidence", ""].map(function (h) { return el("th", null, h); }))));
    var ab = el("tbody");
    anomalies.forEach(function (a) {
      ab.appendChild(el("tr", { "class": "anomaly", "data-kind": a.kind, "data-scope": a.scope }, [
        el("td", null, badge("kind", a.kind)),
        el("td", { "class": "scope" }, a.scope),
        el("td", null, a.detail),
        el("td", null, el("details", null, [el("summary", null, a.evidence_total + " request(s)"),
          el("div", { "class": "ids mono" }, a.evidence.join(" "))])),
        el("td", null, a.denied && a.denied.length ? badge("enforced", "denied " + a.denied.length)
          : a.would_deny && a.would_deny.length ? badge("flag", "would deny " + a.would_deny.length)
          : badge("flag", a.on_detect === "deny" ? "deny" : "flag")),
      ]));
    });
    at.appendChild(ab);
    anomalySection.appendChild(at);
  }

  // --- denials -----------------------------------------------------------------------------
  var denials = data.denials || [];
  var denialsTotal = data.denials_total === undefined ? denials.length : data.denials_total;
  var denialSection = section("denials", "Denials", denials.length < denialsTotal ?
    "latest " + fmtInt(denials.length) + " of " + fmtInt(denialsTotal) : denials.length);
  if (!denials.length) {
    denialSection.appendChild(el("p", { "class": "empty" }, "Nothing was denied, or would have been."));
  } else {
    var dt = el("table", { id: "denials-table" });
    dt.appendChild(el("thead", null, el("tr", null, ["time", "scope", "action", "decision", "reason"].map(function (h) { return el("th", null, h); }))));
    var db = el("tbody");
    denials.forEach(function (x) {
      db.appendChild(el("tr", { "class": "denial", "data-request": x.request_id }, [
        el("td", { "class": "mono" }, (x.ts || "").replace("T", " ").replace("Z", "")),
        el("td", { "class": "scope" }, x.scope),
        el("td", null, x.action || "–"),
        el("td", null, badge(x.decision, x.decision.replace("_", " "))),
        el("td", null, [el("strong", null, x.reason_code || ""), " ", el("span", { "class": "reason" }, x.reason || "")]),
      ]));
    });
    dt.appendChild(db);
    denialSection.appendChild(dt);
  }

  // --- budgets -----------------------------------------------------------------------------
  var budgets = data.budgets || [];
  // A budget with many instances comes as its top spenders (per run) or latest windows, and a summary row.
  var summaries = {};
  var instances = budgets.length;
  (data.budget_summaries || []).forEach(function (s) {
    summaries[s.budget + " " + s.of] = { summary: s, left: s.listed };
    instances += s.instances - s.listed;
  });
  var budgetSection = section("budgets", "Budgets", instances);
  if (!budgets.length) {
    budgetSection.appendChild(el("p", { "class": "empty" }, "No budget instances in this period."));
  } else {
    var bt = el("table", { id: "budgets-table" });
    bt.appendChild(el("thead", null, el("tr", null, ["instance", "window", "unit", "used", "", "limit"].map(function (h, i) { return el("th", { "class": i === 3 || i === 5 ? "num" : null }, h); }))));
    var bb = el("tbody");
    budgets.forEach(function (b) {
      ["usd", "tokens", "requests"].forEach(function (unit) {
        var limit = b.limit[unit];
        if (limit === null) return;
        var used = b.spent[unit] + b.reserved[unit];
        var share = limit > 0 ? Math.min(used / limit, 1) : 1;
        var show = unit === "usd" ? fmtUsd : fmtInt;
        var bar = el("div", { "class": "usage" + (share >= 1 ? " full" : "") }, el("span", { style: "width:" + (share * 100).toFixed(1) + "%" }));
        bb.appendChild(el("tr", { "class": "budget", "data-scope": b.scope, "data-unit": unit, "data-shared": b.shared ? "1" : null }, [
          el("td", { "class": "scope" }, b.shared ? [b.scope + " ", badge("flag", "shared")] : b.scope),
          el("td", null, (b.per || "lifetime") + (b.window_start ? " from " + b.window_start : "")),
          el("td", null, unit),
          num("spent", b.spent[unit], show(b.spent[unit]) + (b.reserved[unit] ? " (+" + show(b.reserved[unit]) + " held)" : "")),
          el("td", null, bar),
          num("limit", limit, show(limit)),
        ]));
      });
      var perRun = /(^|\/)run:[^\/]*$/.test(b.scope);
      var group = summaries[b.budget + " " + (perRun ? "runs" : b.per ? "windows" : "")];
      if (group && --group.left === 0) {
        var s = group.summary;
        var runs = s.of === "runs";
        bb.appendChild(el("tr", { "class": "budget-summary", "data-budget": s.budget, "data-instances": s.instances }, [
          el("td", { "class": "reason", colspan: 6 },
            s.budget + ": " + fmtInt(s.instances) + (runs ? " run instances, " : " windows, ") + fmtInt(s.exhausted) + " exhausted, " +
            fmtUsd(s.usd.spent) + " spent and " + fmtUsd(s.usd.reserved) + " held in all; listed: the " + fmtInt(s.listed) +
            (runs ? " exhausted or that spent most (drawdown report --run ID --html FILE shows a run's own, --json all)" : " latest (--json lists all)")),
        ]));
      }
    });
    bt.appendChild(bb);
    budgetSection.appendChild(bt);
    if (budgets.some(function (b) { return b.shared; })) {
      budgetSection.appendChild(el("p", { "class": "reason", id: "budgets-shared" },
        "shared: an instance this page's requests are charged to together with others' outside " + of +
        "; its spent and held are everyone's."));
    }
  }

  app.setAttribute("data-ready", "1");
})();
