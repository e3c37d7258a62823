// Dead letters: tasks that failed for good. Replay or delete one, replay the selected ones,
// or replay every dead letter of a queue (after a confirmation).

import { del, get, post, query } from "../api.js";
import { act, button, confirmAction, h, notice, pager, table, when, shortId } from "../ui.js";

const PAGE = 100;

export async function render(view, args, params) {
  const queue = params.get("queue") || "";
  const filter = h("input", { name: "queue", value: queue, placeholder: "every queue", "data-test": "dead-queue" });
  const form = h("form", { class: "search" }, h("label", {}, "Queue", filter), h("button", { type: "submit" }, "Filter"));
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    window.location.hash = `#/dead-letters${query({ queue: filter.value.trim() })}`;
  });
  const holder = h("div", { "data-test": "dead-letters" });
  const selected = new Set();
  const replaySelected = button("Replay selected", async (b) => {
    const ids = [...selected];
    if (!ids.length) { notice("Select dead letters first."); return; }
    await act(b, () => post("/dead-letters/replay", { task_ids: ids }), (r) => `Replayed ${r.task_ids.length} task(s)`);
    load();
  }, { class: "admin-only", "data-test": "replay-selected" });
  const replayAll = button("Replay all", async (b) => {
    const scope = queue ? `of queue ${queue}` : "of every queue";
    if (!(await confirmAction(`Replay every dead letter ${scope}? Each runs again as a new task.`))) return;
    await act(b, () => post("/dead-letters/replay", { queue }), (r) => `Replayed ${r.task_ids.length} task(s)`);
    load();
  }, { class: "admin-only", "data-test": "replay-all" });
  const pages = pager(load, ["← Older", "older"], ["Newer →", "newer"]);
  view.append(h("h1", {}, "Dead letters"), form, h("div", { class: "pager" }, replaySelected, replayAll), holder,
    h("div", { class: "pager" }, ...pages.buttons));

  async function load() {
    selected.clear();
    const data = await get(`/dead-letters${query({ queue, limit: PAGE, page_token: pages.token() })}`);
    holder.replaceChildren(table([
      { title: "", cell: (t) => {
        const box = h("input", { type: "checkbox", "data-test": "select" });
        box.addEventListener("change", () => (box.checked ? selected.add(t.id) : selected.delete(t.id)));
        return box;
      } },
      { title: "Failed", cell: (t) => when(t.finished_at) },
      { title: "Task", cell: (t) => h("a", { href: `#/tasks/${t.id}`, class: "mono" }, shortId(t.id)) },
      { title: "Name", cell: (t) => t.name },
      { title: "Queue", cell: (t) => t.queue },
      { title: "Attempts", num: true, cell: (t) => String(t.attempts) },
      { title: "Error", cell: (t) => (t.error ? `${t.error.type}: ${t.error.message}`.slice(0, 140) : "") },
      { title: "", class: "actions", cell: (t) => [
        button("Replay", async (b) => {
          await act(b, () => post("/dead-letters/replay", { task_ids: [t.id] }), (r) => `Replayed as ${r.task_ids[0]}`);
          load();
        }, { class: "admin-only", "data-test": "replay" }),
        button("Delete", async (b) => {
          if (!(await confirmAction(`Delete dead letter ${t.id}? It will not run again.`))) return;
          await act(b, () => del(`/dead-letters/${encodeURIComponent(t.id)}`), () => "Deleted");
          load();
        }, { class: "admin-only danger", "data-test": "delete" }),
      ] },
    ], data.tasks, { empty: "No dead letters.", rowTest: (t) => `dead-${t.id}` }));
    pages.shown(data.next_page_token);
  }
  await load();
  return () => {};
}
