// Rate limits by task name (set, delete) and the task registry (what workers registered).

import { del, get, put } from "../api.js";
import { act, button, h, table, when } from "../ui.js";

export async function render(view) {
  const limits = h("div", { "data-test": "limits" });
  const registry = h("div", { "data-test": "registry" });
  const name = h("input", { name: "name", placeholder: "task name", required: true });
  const rate = h("input", { name: "rate", placeholder: "100/s", required: true, size: 8 });
  const burst = h("input", { name: "burst", type: "number", min: 0, value: 0, size: 5 });
  const perKey = h("input", { name: "per_key", type: "checkbox" });
  const form = h("form", { class: "search admin-only" }, h("label", {}, "Task name", name), h("label", {}, "Rate", rate),
    h("label", {}, "Burst (0: default)", burst), h("label", {}, "Per key", perKey), h("button", { type: "submit", class: "primary" }, "Set limit"));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    await act(form.querySelector("button"), () => put(`/limits/${encodeURIComponent(name.value.trim())}`,
      { rate: rate.value.trim(), burst: Number(burst.value || 0), per_key: perKey.checked }), (r) => `Limit on ${r.name}: ${r.rate}`);
    load();
  });
  view.append(h("h1", {}, "Rate limits"), form, limits, h("h2", {}, "Registered tasks"), registry);

  async function load() {
    const data = await get("/limits");
    limits.replaceChildren(table([
      { title: "Task", cell: (l) => h("span", { class: "mono" }, l.name) },
      { title: "Rate", cell: (l) => l.rate },
      { title: "Burst", num: true, cell: (l) => String(l.burst) },
      { title: "Per key", cell: (l) => (l.per_key ? "yes" : "no") },
      { title: "Source", cell: (l) => l.source },
      { title: "", class: "actions", cell: (l) => (l.source === "admin" ? button("Delete", async (b) => {
        await act(b, () => del(`/limits/${encodeURIComponent(l.name)}`), () => `Removed the limit on ${l.name}`);
        load();
      }, { class: "admin-only danger" }) : "") },
    ], data.limits, { empty: "No rate limits." }));
    const known = await get("/registered-tasks");
    registry.replaceChildren(table([
      { title: "Task", cell: (t) => h("span", { class: "mono" }, t.name) },
      { title: "Description", cell: (t) => t.description },
      { title: "Queues", cell: (t) => (t.queues || []).join(", ") },
      { title: "Languages", cell: (t) => (t.languages || []).join(", ") },
      { title: "Live workers", num: true, cell: (t) => String((t.worker_ids || []).length) },
      { title: "Last seen", cell: (t) => when(t.last_seen) },
    ], known.tasks, { empty: "No worker registered a task yet." }));
  }
  await load();
  return () => {};
}
