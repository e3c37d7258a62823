// Tasks: search by id (prefix), name, state, queue and submission time; a page at a time
// (newest first); the first page refreshes itself when tasks change.

import { follow, get, query } from "../api.js";
import { badge, h, pager, table, when, shortId } from "../ui.js";

const STATES = ["", "PENDING", "RECEIVED", "STARTED", "RETRY", "SUCCESS", "FAILURE", "CANCELLED", "EXPIRED"];

function localToIso(value) {
  return value ? new Date(value).toISOString() : "";
}

function isoToLocal(value) {
  if (!value) return "";
  const at = new Date(value);
  return new Date(at.getTime() - at.getTimezoneOffset() * 60000).toISOString().slice(0, 16);
}

function lookup(view) {
  const input = h("input", { name: "id", placeholder: "task or workflow id", "data-test": "lookup" });
  const form = h("form", { class: "search" }, h("label", {}, "Open a task by id", input),
    h("button", { type: "submit" }, "Open"));
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const id = input.value.trim();
    if (id) window.location.hash = id.startsWith("wf-") ? `#/workflows/${id}` : `#/tasks/${id}`;
  });
  return form;
}

export async function render(view, args, params, session) {
  view.append(h("h1", {}, "Tasks", h("span", { class: "badge live" }, "live")));
  if (!session.listing.enabled) {
    view.append(h("p", { class: "info", "data-test": "cannot-list" }, session.listing.reason), lookup(view));
    return () => {};
  }
  const filters = Object.fromEntries(["id", "name", "state", "queue", "since", "until", "order"]
    .map((key) => [key, params.get(key) || ""]));
  const field = (label, name, attrs = {}) => h("label", {}, label, h("input", { name, value: filters[name], ...attrs }));
  const state = h("select", { name: "state", "data-test": "filter-state" },
    STATES.map((s) => h("option", { value: s, selected: s === filters.state }, s || "any")));
  const form = h("form", { class: "search", "data-test": "search" },
    field("Id starts with", "id", { "data-test": "filter-id", size: 14 }),
    field("Name", "name", { "data-test": "filter-name", size: 14 }),
    h("label", {}, "State", state),
    field("Queue", "queue", { "data-test": "filter-queue", size: 10 }),
    h("label", {}, "Submitted from", h("input", { type: "datetime-local", name: "since", value: isoToLocal(filters.since) })),
    h("label", {}, "to", h("input", { type: "datetime-local", name: "until", value: isoToLocal(filters.until) })),
    h("button", { type: "submit", class: "primary" }, "Search"));
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const data = new FormData(form);
    const wanted = {
      id: data.get("id").trim(), name: data.get("name").trim(), state: data.get("state"),
      queue: data.get("queue").trim(), since: localToIso(data.get("since")), until: localToIso(data.get("until")),
    };
    window.location.hash = `#/tasks${query(wanted)}`;
  });
  const results = h("div", { "data-test": "task-list" });
  const pages = pager(load);
  view.append(form, results, h("div", { class: "pager" }, ...pages.buttons));

  async function load() {
    const page = await get(`/tasks${query({ ...filters, page_size: 25, page_token: pages.token() })}`);
    results.replaceChildren(table([
      { title: "Submitted", cell: (t) => when(t.submitted_at) },
      { title: "Task", cell: (t) => h("a", { href: `#/tasks/${t.id}`, class: "mono", title: t.id }, shortId(t.id)) },
      { title: "Name", cell: (t) => t.name },
      { title: "Queue", cell: (t) => t.queue },
      { title: "State", cell: (t) => badge(t.state) },
      { title: "Attempts", num: true, cell: (t) => String(t.attempts) },
      { title: "Workflow", cell: (t) => (t.workflow_id ? h("a", { href: `#/workflows/${t.workflow_id}` }, "graph") : "") },
      { title: "Error", cell: (t) => (t.error ? `${t.error.type}: ${t.error.message}`.slice(0, 120) : "") },
    ], page.tasks, { empty: "No task matches.", rowTest: (t) => `task-${t.id}` }));
    pages.shown(page.next_page_token);
  }
  await load();
  return follow("/events/tasks", { changed: () => { if (pages.onFirstPage()) load().catch(() => {}); } });
}
