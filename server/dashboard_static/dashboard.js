// The fedrecon dashboard: polls /api/state and draws it. Every value from the server is set as text
// (textContent, SVG text nodes), never parsed as markup: task names and failure reasons are operator and
// client input. Charts are inline SVG; nothing is loaded from another origin.
"use strict";

const POLL_MS = 2000;
const SVG_NS = "http://www.w3.org/2000/svg";

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value !== null && value !== undefined && value !== false) node.setAttribute(key, String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, String(value));
  if (text !== undefined) node.textContent = String(text);
  return node;
}

function num(value, digits) {
  if (value === null || value === undefined || !Number.isFinite(value)) return "–";
  return digits === undefined ? String(value) : value.toFixed(digits);
}

function clock(iso) {
  return iso ? new Date(iso).toLocaleTimeString([], {hour12: false}) : "–";
}

function seconds(iso0, iso1) {
  if (!iso0 || !iso1) return "–";
  return ((new Date(iso1) - new Date(iso0)) / 1000).toFixed(1) + " s";
}

function card(title, extraClass, ...body) {
  return el("div", {class: "card " + (extraClass || "")}, el("h3", {}, title), ...body);
}

// A bar of `value` out of `total`, with an optional marker (the minimum of reports).
function bar(label, value, total, marker, kind) {
  const share = total > 0 ? Math.min(1, value / total) : 0;
  const track = el("div", {class: "track"}, el("div", {class: "fill " + (kind || ""), style: null}));
  track.firstChild.style.width = (100 * share).toFixed(1) + "%";
  if (marker !== null && marker !== undefined && total > 0) {
    const m = el("div", {class: "marker", title: "minimum " + marker});
    m.style.left = (100 * Math.min(1, marker / total)).toFixed(1) + "%";
    track.append(m);
  }
  return el("div", {class: "bar"}, el("div", {class: "bar-label"}, el("span", {}, label),
    el("span", {class: "figure"}, `${value} / ${total}`)), track);
}

// A line chart of points [{x, y, label}] (nulls skipped): axes, four ticks each way, a dot per point.
function lineChart(points, opts) {
  const W = 440, H = 190, L = 52, R = 14, T = 12, B = 34;
  const chart = svg("svg", {viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img",
                           "aria-label": opts.title});
  const pts = points.filter(p => p.y !== null && p.y !== undefined && Number.isFinite(p.y));
  if (pts.length === 0) return el("p", {class: "muted empty-chart"}, opts.empty);
  let [x0, x1] = [Math.min(...pts.map(p => p.x)), Math.max(...pts.map(p => p.x))];
  let [y0, y1] = [Math.min(...pts.map(p => p.y)), Math.max(...pts.map(p => p.y))];
  if (opts.yMin !== undefined) y0 = Math.min(y0, opts.yMin);
  if (opts.yMax !== undefined) y1 = Math.max(y1, opts.yMax);
  const [dataX0, dataX1] = [x0, x1];
  if (x1 === x0) { x0 -= 1; x1 += 1; }
  if (y1 === y0) { const pad = Math.abs(y0) * 0.05 || 1; y0 -= pad; y1 += pad; }
  const sx = x => L + (x - x0) / (x1 - x0) * (W - L - R);
  const sy = y => H - B - (y - y0) / (y1 - y0) * (H - T - B);
  for (let i = 0; i <= 4; i++) {
    const y = y0 + (y1 - y0) * i / 4;
    chart.append(svg("line", {x1: L, x2: W - R, y1: sy(y), y2: sy(y), class: "grid"}));
    chart.append(svg("text", {x: L - 6, y: sy(y) + 4, "text-anchor": "end", class: "tick"},
                     num(y, opts.digits)));
  }
  const xs = [...new Set([0, 1, 2, 3, 4].map(i => Math.round(x0 + (x1 - x0) * i / 4)))]
    .filter(x => x >= dataX0 && x <= dataX1);
  for (const x of xs) {
    chart.append(svg("text", {x: sx(x), y: H - B + 16, "text-anchor": "middle", class: "tick"}, x));
  }
  chart.append(svg("line", {x1: L, x2: W - R, y1: H - B, y2: H - B, class: "axis"}));
  chart.append(svg("text", {x: (L + W - R) / 2, y: H - 4, "text-anchor": "middle", class: "axis-label"},
                   opts.xLabel));
  if (opts.limit !== undefined && opts.limit !== null) {
    chart.append(svg("line", {x1: L, x2: W - R, y1: sy(opts.limit), y2: sy(opts.limit), class: "limit"}));
    chart.append(svg("text", {x: W - R, y: sy(opts.limit) - 4, "text-anchor": "end", class: "limit-label"},
                     opts.limitLabel));
  }
  chart.append(svg("polyline", {points: pts.map(p => `${sx(p.x)},${sy(p.y)}`).join(" "), class: "line"}));
  for (const p of pts) {
    const dot = svg("circle", {cx: sx(p.x), cy: sy(p.y), r: 3, class: "dot"});
    dot.append(svg("title", {}, `${opts.xLabel} ${p.x}: ${num(p.y, opts.digits + 2)}`));
    chart.append(dot);
  }
  return chart;
}

// Stacked bars per round: accepted, refused, late or aborted, dropped (assigned, never reported).
function participationChart(rounds) {
  const W = 1000, H = 130, L = 40, R = 10, T = 10, B = 28;
  if (rounds.length === 0) return el("p", {class: "muted empty-chart"}, "no rounds yet");
  const chart = svg("svg", {viewBox: `0 0 ${W} ${H}`, class: "chart wide-chart", role: "img",
                           "aria-label": "participation per round"});
  const top = Math.max(1, ...rounds.map(r => Math.max(r.selected, r.reported)));
  const step = (W - L - R) / rounds.length;
  const width = Math.max(2, Math.min(28, step * 0.7));
  const sy = v => (H - T - B) * v / top;
  chart.append(svg("text", {x: L - 6, y: T + 8, "text-anchor": "end", class: "tick"}, top));
  chart.append(svg("text", {x: L - 6, y: H - B, "text-anchor": "end", class: "tick"}, 0));
  chart.append(svg("line", {x1: L, x2: W - R, y1: H - B, y2: H - B, class: "axis"}));
  rounds.forEach((r, i) => {
    const other = Math.max(0, r.reported - r.accepted - r.refused);
    const dropped = Math.max(0, r.selected - r.reported);
    const parts = [["accepted", r.accepted], ["refused", r.refused], ["other", other], ["dropped", dropped]];
    let y = H - B;
    const x = L + step * i + (step - width) / 2;
    const group = svg("g", {class: "round-bar"});
    group.append(svg("title", {}, `round ${r.round_num} (${r.state}): ${r.selected} selected, ` +
                     `${r.accepted} accepted, ${r.refused} refused, ${other} late or aborted, ` +
                     `${dropped} dropped`));
    for (const [kind, value] of parts) {
      if (value <= 0) continue;
      y -= sy(value);
      group.append(svg("rect", {x, y, width, height: sy(value), class: "p-" + kind}));
    }
    chart.append(group);
    if (rounds.length <= 30 || i % Math.ceil(rounds.length / 30) === 0) {
      chart.append(svg("text", {x: x + width / 2, y: H - B + 14, "text-anchor": "middle", class: "tick"},
                       r.round_num));
    }
  });
  return chart;
}

function legend(items) {
  return el("div", {class: "legend"}, items.map(([kind, label]) =>
    el("span", {}, el("i", {class: "swatch p-" + kind}), label)));
}

function liveCard(task, live) {
  const mine = live && live.task === task.name;
  const r = mine ? live.round : null;
  const body = [];
  if (mine && !live.leading) {
    body.push(el("p", {class: "standby"}, "Standing by: " + (live.standby_reason || "another coordinator leads")));
  }
  if (r) {
    body.push(el("p", {class: "live-title"}, el("strong", {}, `Round ${r.round_num}`), " ",
      el("span", {class: "badge phase-" + r.phase}, r.phase), ` on version ${r.base_version}`));
    body.push(bar("selected", r.selected, r.selection_goal, null, "sel"));
    body.push(bar("reported", r.reported, r.goal, r.min_reports, "rep"));
    body.push(el("p", {class: "figures"},
      `${r.accepted} accepted · ${r.refused} refused · minimum ${r.min_reports} · weight ${num(r.total_weight, 0)}`));
    const when = r.phase === "selecting"
      ? `selection ends in ${num(Math.max(0, r.seconds_to_selection_end), 0)} s`
      : `deadline in ${num(Math.max(0, r.seconds_to_deadline), 0)} s`;
    body.push(el("p", {class: "muted"}, `opened ${clock(r.opened_at)} · ${when}`));
    body.push(el("div", {class: "stages"}, el("span", {class: "muted"}, "stages "),
      r.stages.map(s => el("span", {class: "chip"}, s))));
  } else if (!mine && task.open_round) {
    const o = task.open_round;  // no coordinator of this task here: the store's last recorded counts
    body.push(el("p", {class: "live-title"}, el("strong", {}, `Round ${o.round_num}`), " ",
      el("span", {class: "badge phase-" + o.state}, o.state), " as last recorded in the store"));
    body.push(bar("reported", o.reported, o.target, o.min_reports, "rep"));
    body.push(el("p", {class: "muted"}, `${o.selected} selected · deadline ${clock(o.deadline)}`));
  } else {
    body.push(el("p", {class: "muted"}, mine ? "No round in flight: the next opens at the first check-in."
                                          : "No round in flight."));
  }
  return card("Live round", "live", ...body);
}

function privacyCard(task) {
  const p = task.privacy;
  if (!p) return card("Privacy budget", "", el("p", {class: "muted"}, "Not used: this task adds no DP noise."));
  const budget = p.epsilon_budget;
  const body = [el("p", {class: "epsilon"}, el("strong", {}, `ε = ${num(p.epsilon, 3)}`),
    budget !== null && budget !== undefined ? ` of ${num(budget)}` : " (no budget)",
    ` at δ = ${num(p.delta)}, after ${p.rounds_accounted} rounds`)];
  if (budget) body.push(bar("spent", Number(num(p.epsilon, 3)), budget, null, p.epsilon >= budget ? "over" : "eps"));
  body.push(el("p", {class: "muted"}, `noise multiplier ${num(p.noise_multiplier)} · clip ${num(p.clip)} · ` +
    `${p.accountant || ""} accountant`));
  const pts = task.recent_rounds.filter(r => r.state === "committed")
    .map(r => ({x: r.round_num, y: r.metrics && r.metrics.epsilon}));
  body.push(lineChart(pts, {title: "epsilon over rounds", xLabel: "round", digits: 2, yMin: 0,
                            limit: budget, limitLabel: "budget", empty: "no committed round yet"}));
  return card("Privacy budget", "", ...body);
}

function evaluationCard(task) {
  const ev = task.evaluations;
  const last = ev.length ? ev[ev.length - 1] : null;
  return card("Evaluation", "wide",
    el("p", {class: "muted"}, last ? `${ev.length} versions evaluated; version ${last.version}: RMSE ` +
      `${num(last.rmse, 4)}, accuracy ${num(last.accuracy, 4)} over ${num(last.examples, 0)} examples from ` +
      `${last.clients} clients` : "Devices report reconstruct-then-evaluate sums per model version."),
    el("div", {class: "pair"},
      el("div", {}, el("h4", {}, "RMSE by model version"),
        lineChart(ev.map(e => ({x: e.version, y: e.rmse})),
                  {title: "RMSE by version", xLabel: "version", digits: 3, empty: "no evaluation reported yet"})),
      el("div", {}, el("h4", {}, "Accuracy (|error| ≤ 0.5) by model version"),
        lineChart(ev.map(e => ({x: e.version, y: e.accuracy})),
                  {title: "accuracy by version", xLabel: "version", digits: 3,
                   empty: "no evaluation reported yet"}))));
}

function timelineCard(task, live) {
  const liveRound = live && live.task === task.name && live.round ? live.round : null;
  const rounds = task.recent_rounds.map(r => liveRound && liveRound.round_id === r.round_id
    ? {...r, selected: liveRound.selected, reported: liveRound.reported, accepted: liveRound.accepted,
       refused: liveRound.refused} : r);
  const strip = el("div", {class: "strip"}, rounds.map(r =>
    el("span", {class: "cell s-" + r.state, title: `round ${r.round_num}: ${r.state}` +
                (r.failure_reason ? ` (${r.failure_reason})` : "")})));
  const table = el("table", {class: "rounds"},
    el("thead", {}, el("tr", {}, ["round", "outcome", "version", "selected", "reported", "accepted",
                                  "refused", "dropped", "train loss", "duration", "stages", "note"]
                                  .map(h => el("th", {}, h)))),
    el("tbody", {}, rounds.slice().reverse().slice(0, 15).map(r => {
      const isLive = liveRound && liveRound.round_id === r.round_id;
      const loss = r.metrics ? r.metrics.train_loss : null;
      return el("tr", {"data-round": r.round_num, "data-state": r.state},
        el("td", {class: "n"}, r.round_num),
        el("td", {}, el("span", {class: "badge s-" + r.state}, isLive ? "live" : r.state)),
        el("td", {class: "n"}, r.new_version !== null ? `${r.base_version} → ${r.new_version}` : r.base_version),
        el("td", {class: "n"}, r.selected), el("td", {class: "n"}, r.reported),
        el("td", {class: "n"}, r.accepted), el("td", {class: "n"}, r.refused),
        el("td", {class: "n"}, r.closed_at ? Math.max(0, r.selected - r.reported) : "–"),
        el("td", {class: "n"}, num(loss, 4)),
        el("td", {class: "n"}, seconds(r.opened_at, r.closed_at)),
        el("td", {class: "stage-list"}, (r.stages || []).join(" → ")),
        el("td", {class: "note"}, r.failure_reason || ""));
    })));
  return card("Round timeline", "wide", strip,
    el("h4", {}, "Participation per round"), participationChart(rounds),
    legend([["accepted", "accepted"], ["refused", "refused"], ["other", "late or aborted"],
            ["dropped", "dropped (never reported)"]]),
    rounds.length ? table : el("p", {class: "muted"}, "No round has opened yet."));
}

function versionsCard(task) {
  const rows = task.versions.slice().reverse().map(v => el("tr", {},
    el("td", {class: "n"}, v.version), el("td", {class: "n"}, v.parent === null ? "–" : v.parent),
    el("td", {class: "n"}, v.round_id === null ? "initial" : v.round_id), el("td", {}, clock(v.created_at))));
  const s = task.settings || {};
  const rs = s.rounds || {};
  const agg = s.aggregation || {};
  return card("Model versions", "",
    el("p", {class: "muted"}, `${task.version_count} versions; the latest ${task.versions.length} shown`),
    el("table", {}, el("thead", {}, el("tr", {}, ["version", "parent", "round", "created"].map(h => el("th", {}, h)))),
       el("tbody", {}, rows)),
    el("h4", {}, "Settings"),
    el("dl", {class: "settings"},
      el("dt", {}, "model"), el("dd", {}, s.model || "–"),
      el("dt", {}, "clients per round"), el("dd", {}, rs.clients_per_round ?? "–"),
      el("dt", {}, "minimum reports"), el("dd", {}, rs.min_reports ?? "default (80%)"),
      el("dt", {}, "aggregation"), el("dd", {}, Object.keys(agg).length
        ? Object.entries(agg).filter(([, v]) => v !== null && typeof v !== "object")
            .map(([k, v]) => el("span", {class: "chip"}, `${k} = ${v}`)) : "plain weighted mean")));
}

function taskSection(task, live) {
  const r = task.rounds;
  return el("section", {class: "task", "data-task": task.name},
    el("h2", {}, task.name, el("span", {class: "muted"},
      ` model version ${num(task.latest_version)} · rounds committed ${r.committed}, failed ${r.failed}` +
      `, open ${r.open + r.aggregating}`)),
    el("div", {class: "grid"}, liveCard(task, live), privacyCard(task), versionsCard(task),
       evaluationCard(task), timelineCard(task, live)));
}

function tasksOverview(tasks) {
  return el("table", {class: "overview"},
    el("thead", {}, el("tr", {}, ["task", "version", "committed", "failed", "open"].map(h => el("th", {}, h)))),
    el("tbody", {}, tasks.map(t => el("tr", {}, el("td", {}, el("a", {href: "#task-" + encodeURIComponent(t.name)},
      t.name)), el("td", {class: "n"}, num(t.latest_version)), el("td", {class: "n"}, t.rounds.committed),
      el("td", {class: "n"}, t.rounds.failed), el("td", {class: "n"}, t.rounds.open + t.rounds.aggregating)))));
}

function render(state) {
  const live = state.live;
  const coordinator = document.getElementById("coordinator");
  coordinator.replaceChildren(live
    ? el("span", {}, "task ", el("strong", {}, live.task), ` · model version ${live.version} · `,
         el("span", {class: live.leading ? "ok" : "warn"}, live.leading ? "leading" : "standing by"))
    : el("span", {class: "muted"}, "no coordinator attached"));
  const banner = document.getElementById("store-error");
  banner.hidden = !state.store_error;
  banner.textContent = state.store_error ? "The store cannot be read: " + state.store_error : "";
  const main = document.getElementById("tasks");
  const sections = state.tasks.map(t => {
    const s = taskSection(t, live);
    s.id = "task-" + encodeURIComponent(t.name);
    return s;
  });
  main.replaceChildren(...(state.tasks.length > 1 ? [card("Tasks", "wide", tasksOverview(state.tasks))] : []),
                       ...(sections.length ? sections : [el("p", {class: "muted"}, "The store holds no task yet.")]));
  document.getElementById("generated").textContent = "State of " + clock(state.generated_at) + ".";
}

function setConnection(ok, text) {
  const node = document.getElementById("connection");
  node.dataset.state = ok ? "ok" : "error";
  node.textContent = text;
}

async function poll() {
  try {
    const response = await fetch("/api/state", {cache: "no-store", credentials: "same-origin"});
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    render(await response.json());
    setConnection(true, "live · " + new Date().toLocaleTimeString([], {hour12: false}));
  } catch (err) {
    setConnection(false, "cannot reach the coordinator (" + err.message + "); retrying");
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

document.addEventListener("DOMContentLoaded", poll);
