// Periodic schedules: cron, task, next fire times, last run; run one now, pause, resume or delete it.

import { del, get, post } from "../api.js";
import { act, button, confirmAction, h, table, when } from "../ui.js";

export async function render(view) {
  const holder = h("div", { "data-test": "schedules" });
  view.append(h("h1", {}, "Schedules"), holder);

  async function load() {
    const data = await get("/schedules");
    holder.replaceChildren(table([
      { title: "Schedule", cell: (s) => h("strong", {}, s.name) },
      { title: "Cron (UTC)", cell: (s) => h("span", { class: "mono" }, s.cron) },
      { title: "Task", cell: (s) => h("span", { class: "mono" }, `${s.task.name}(${s.task.args.map((a) => JSON.stringify(a)).join(", ")})`) },
      { title: "Queue", cell: (s) => s.task.queue || "default" },
      { title: "Next runs", cell: (s) => s.paused
        ? h("span", { class: "badge paused", "data-test": "schedule-paused" }, "paused")
        : h("div", { "data-test": "next-runs" }, s.next_runs.slice(0, 3).map((r) => h("div", {}, when(r)))) },
      { title: "Last run", cell: (s) => when(s.last_run_at) },
      { title: "Missed ticks", cell: (s) => s.missed_ticks.toLowerCase().replace("_", " ") },
      { title: "", class: "actions", cell: (s) => [
        button("Run now", async (b) => {
          const made = await act(b, () => post(`/schedules/${encodeURIComponent(s.name)}/run`), (r) => `Submitted ${r.task_id}`);
          if (made) load();
        }, { class: "admin-only", "data-test": "run-now" }),
        button(s.paused ? "Resume" : "Pause", async (b) => {
          const verb = s.paused ? "resume" : "pause";
          await act(b, () => post(`/schedules/${encodeURIComponent(s.name)}/${verb}`),
            () => (s.paused ? `Resumed ${s.name}` : `Paused ${s.name}`));
          load();
        }, { class: "admin-only", "data-test": s.paused ? "resume-schedule" : "pause-schedule" }),
        button("Delete", async (b) => {
          if (!(await confirmAction(`Delete schedule ${s.name}? It stops firing on every server.`))) return;
          await act(b, () => del(`/schedules/${encodeURIComponent(s.name)}`), () => `Deleted ${s.name}`);
          load();
        }, { class: "admin-only danger", "data-test": "delete-schedule" }),
      ] },
    ], data.schedules, { empty: "No schedules. Create one with `conveyor schedule add` or POST /api/v1/schedules.",
      rowTest: (s) => `schedule-${s.name}` }));
  }
  await load();
  return () => {};
}
