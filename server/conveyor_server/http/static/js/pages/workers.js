// Workers connected to this server, live: language, host, queues, slots, tasks, heartbeat.

import { follow, get } from "../api.js";
import { ago, h, table, when } from "../ui.js";

function slotBar(worker) {
  const fill = h("span");
  fill.style.width = `${Math.min(100, (100 * worker.slots_used) / Math.max(1, worker.slots))}%`;
  return h("div", { class: "bar" }, fill);
}

export async function render(view) {
  const holder = h("div", { "data-test": "workers" });
  view.append(h("h1", {}, "Workers", h("span", { class: "badge live" }, "live")), holder);

  function show(data) {
    holder.replaceChildren(table([
      { title: "Worker", cell: (w) => h("span", { class: "mono" }, w.id) },
      { title: "Language", cell: (w) => `${w.language}${w.sdk_version ? ` ${w.sdk_version}` : ""}` },
      { title: "Host", cell: (w) => `${w.hostname}${w.pid ? ` (pid ${w.pid})` : ""}` },
      { title: "Queues", cell: (w) => w.queues.join(", ") },
      { title: "Slots", cell: (w) => h("div", { "data-test": "slots" }, `${w.slots_used} / ${w.slots}`, slotBar(w)) },
      { title: "Tasks", cell: (w) => h("span", { title: w.tasks.join("\n") }, w.tasks.length ? `${w.tasks.length} registered` : "any") },
      { title: "Connected", cell: (w) => h("span", { title: when(w.connected_at) }, ago(w.connected_at)) },
      { title: "Last heartbeat", cell: (w) => ago(w.last_heartbeat_at) },
    ], data.workers, { empty: "No worker is connected to this server.", rowTest: (w) => `worker-${w.id}` }));
  }

  show(await get("/workers"));
  return follow("/events/workers", { workers: show });
}
