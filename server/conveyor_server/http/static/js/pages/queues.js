// Queues: depth, delayed, in flight, unroutable, paused and rate, live; pause, resume and
// purge (after a confirmation).

import { follow, get, post } from "../api.js";
import { act, badge, button, confirmAction, h, table } from "../ui.js";

function actions(queue, reload) {
  const name = encodeURIComponent(queue.name);
  const toggle = queue.paused
    ? button("Resume", (b) => act(b, () => post(`/queues/${name}/resume`), () => `Queue ${queue.name} resumed`).then(reload),
      { "data-test": "resume", class: "admin-only" })
    : button("Pause", (b) => act(b, () => post(`/queues/${name}/pause`), () => `Queue ${queue.name} paused`).then(reload),
      { "data-test": "pause", class: "admin-only" });
  const purge = button("Purge", async (b) => {
    if (!(await confirmAction(`Purge queue ${queue.name}? Its ${queue.ready} ready and ${queue.delayed} delayed tasks end as cancelled.`))) return;
    await act(b, () => post(`/queues/${name}/purge`), (r) => `Purged ${r.purged} tasks from ${queue.name}`);
    reload();
  }, { "data-test": "purge", class: "admin-only danger" });
  return [toggle, purge];
}

export async function render(view) {
  const holder = h("div", { "data-test": "queues" });
  view.append(h("h1", {}, "Queues", h("span", { class: "badge live", title: "updates as the queues change" }, "live")), holder);

  function show(data) {
    holder.replaceChildren(table([
      { title: "Queue", cell: (q) => h("span", { class: "mono" }, q.name) },
      { title: "Ready", num: true, cell: (q) => h("span", { "data-test": "ready" }, String(q.ready)) },
      { title: "Delayed", num: true, cell: (q) => String(q.delayed) },
      { title: "In flight", num: true, cell: (q) => h("span", { "data-test": "in-flight" }, String(q.in_flight)) },
      { title: "Unroutable", num: true, cell: (q) => String(q.unroutable) },
      { title: "Submitted/s", num: true, cell: (q) => (q.submitted_per_second ?? 0).toFixed(1) },
      { title: "State", cell: (q) => (q.paused ? h("span", { class: "badge paused", "data-test": "paused" }, "paused") : h("span", { class: "muted" }, "active")) },
      { title: "", class: "actions", cell: (q) => actions(q, reload) },
    ], data.queues, { empty: "No queues yet: submit a task.", rowTest: (q) => `queue-${q.name}` }));
  }

  async function reload() { show(await get("/queues")); }
  await reload();
  return follow("/events/queues", { queues: show });
}
