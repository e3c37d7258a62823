// Overview: counts, throughput, queue depth and oldest waiting task over the last hour (uPlot
// charts fed by the server's samples, live), and the latest failures.

import uPlot from "../../vendor/uplot/uPlot.esm.js";
import { follow, get } from "../api.js";
import { badge, h, table, when, shortId } from "../ui.js";

const PALETTE = ["#2563eb", "#16a34a", "#f59e0b", "#db2777", "#7c3aed", "#0891b2", "#65a30d", "#ea580c"];
const MAX_SERIES = 6;

function chart(title, test) {
  const box = h("div", { class: "chart", "data-test": test }, h("h3", {}, title));
  return { box, plot: null, keys: "" };
}

function draw(holder, names, columns, colors) {
  const keys = names.join("|");
  const width = Math.max(300, holder.box.clientWidth - 20);
  if (holder.plot && holder.keys === keys) {
    holder.plot.setData(columns);
    return;
  }
  if (holder.plot) holder.plot.destroy();
  holder.keys = keys;
  holder.plot = new uPlot({
    width, height: 200,
    series: [{}, ...names.map((name, i) => ({ label: name, stroke: colors[i], width: 2,
      fill: `${colors[i]}1a` }))],
    axes: [{}, { size: 50 }],
    scales: { x: { time: true } },
    legend: { live: false },
  }, columns, holder.box);
}

// The queues worth a line: those with the most tasks waiting over the hour.
function topQueues(samples, field) {
  const peak = new Map();
  for (const sample of samples) {
    for (const [queue, value] of Object.entries(sample[field] || {})) {
      peak.set(queue, Math.max(peak.get(queue) || 0, value));
    }
  }
  return [...peak.entries()].sort((a, b) => b[1] - a[1]).slice(0, MAX_SERIES).map(([queue]) => queue).sort();
}

export async function render(view, args, params, session) {
  const cards = h("div", { class: "cards", "data-test": "cards" });
  const throughput = chart("Throughput (tasks per second, this server)", "chart-throughput");
  const depth = chart("Queue depth (ready tasks)", "chart-depth");
  const oldest = chart("Oldest waiting task (seconds)", "chart-oldest");
  const failures = h("div", { "data-test": "recent-failures" });
  view.append(h("h1", {}, "Overview"), cards, h("div", { class: "charts" }, throughput.box, depth.box, oldest.box),
    h("h2", {}, "Recent failures"), failures);

  let samples = (await get("/metrics/history")).samples;

  function redraw() {
    const xs = samples.map((s) => s.at);
    draw(throughput, ["succeeded/s", "failed/s"],
      [xs, samples.map((s) => s.succeeded), samples.map((s) => s.failed)], ["#16a34a", "#dc2626"]);
    for (const [holder, field] of [[depth, "ready"], [oldest, "oldest"]]) {
      const names = topQueues(samples, field);
      const columns = [xs, ...names.map((q) => samples.map((s) => (s[field] && q in s[field] ? s[field][q] : 0)))];
      draw(holder, names.length ? names : ["(none)"], names.length ? columns : [xs, xs.map(() => 0)], PALETTE);
    }
  }

  async function refreshSummary() {
    const data = await get("/overview");
    cards.replaceChildren(...[
      ["Workers", data.workers, "workers"], ["Queues", data.queues, "queues"], ["Ready", data.ready, "ready"],
      ["Delayed", data.delayed, "delayed"], ["In flight", data.in_flight, "in-flight"], ["Paused queues", data.paused, "paused"],
    ].map(([label, value, test]) => h("div", { class: "card", "data-test": `card-${test}` },
      h("div", { class: "value" }, String(value)), h("div", { class: "label" }, label))));
    const recent = data.recent_failures;
    if (recent.tasks === null) {
      failures.replaceChildren(h("p", { class: "info" }, recent.reason));
      return;
    }
    failures.replaceChildren(table([
      { title: "Failed", cell: (t) => when(t.finished_at) },
      { title: "Task", cell: (t) => h("a", { href: `#/tasks/${t.id}` }, shortId(t.id)) },
      { title: "Name", cell: (t) => t.name },
      { title: "Queue", cell: (t) => t.queue },
      { title: "State", cell: (t) => badge(t.state) },
      { title: "Error", cell: (t) => (t.error ? `${t.error.type}: ${t.error.message}` : "") },
    ], recent.tasks, { empty: "No failures.", test: "failures-table" }));
  }

  redraw();
  await refreshSummary();
  const onResize = () => { for (const c of [throughput, depth, oldest]) if (c.plot) c.plot.setSize({ width: Math.max(300, c.box.clientWidth - 20), height: 200 }); };
  window.addEventListener("resize", onResize);
  const stop = follow("/events/overview", {
    sample: (sample) => {
      samples = [...samples.filter((s) => s.at >= sample.at - 3600 && s.at !== sample.at), sample];
      redraw();
      refreshSummary().catch(() => {});
    },
  });
  return () => { stop(); window.removeEventListener("resize", onResize); };
}
