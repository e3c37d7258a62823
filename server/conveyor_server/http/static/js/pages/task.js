// One task: its call, result or error with traceback, history as a timeline, attempts, lease
// and trace; cancel and retry. Live: it follows the task's state changes.

import { follow, get, post } from "../api.js";
import { act, badge, button, h, json, when } from "../ui.js";

const TERMINAL = new Set(["SUCCESS", "FAILURE", "CANCELLED", "EXPIRED"]);

function timeline(history) {
  return h("div", { class: "timeline", "data-test": "timeline" }, history.map((step) =>
    h("div", { class: "step", title: step.error ? `${step.error.type}: ${step.error.message}` : "" },
      h("span", { class: `dot ${step.state}` }),
      h("span", { class: "what" }, step.state),
      h("span", { class: "when" }, when(step.at)),
      h("span", { class: "when" }, step.attempt ? `attempt ${step.attempt}` : ""))));
}

function facts(task) {
  const lease = task.lease;
  const rows = [
    ["Id", h("span", { class: "mono", "data-test": "task-id" }, task.id)],
    ["Queue", task.queue],
    ["Attempts", String(task.attempts)],
    ["Worker", task.worker_id || "—"],
    ["Submitted", when(task.submitted_at)],
    ["Started", when(task.started_at)],
    ["Finished", when(task.finished_at)],
    ["Lease", lease ? `${lease.held ? "held by a worker" : "none"}${lease.deliveries ? `, ${lease.deliveries} deliveries` : ""}${lease.renewed_at ? `, renewed ${when(lease.renewed_at)}` : ""}${lease.retry_at ? `, retry at ${when(lease.retry_at)}` : ""}` : "—"],
    ["Trace", task.trace_url ? h("a", { href: task.trace_url, target: "_blank", rel: "noopener", "data-test": "trace" }, task.trace_id)
      : (task.trace_id ? h("span", { class: "mono" }, task.trace_id) : "—")],
    ["Workflow", task.workflow_id ? h("a", { href: `#/workflows/${task.workflow_id}`, "data-test": "workflow-link" }, task.workflow_id) : "—"],
  ];
  if (task.call.parent_id) rows.push(["Submitted by", h("a", { href: `#/tasks/${task.call.parent_id}` }, task.call.parent_id)]);
  return h("dl", { class: "grid" }, rows.flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
}

function outcome(task) {
  if (task.error) {
    return [h("h2", {}, "Error"), h("p", { "data-test": "error" }, h("strong", {}, task.error.type), `: ${task.error.message}`),
      task.error.traceback ? h("pre", { "data-test": "traceback" }, task.error.traceback) : h("p", { class: "muted" }, "No traceback.")];
  }
  if (task.state === "SUCCESS") return [h("h2", {}, "Result"), h("div", { "data-test": "result" }, json(task.result))];
  if (task.progress !== null && task.progress !== undefined) return [h("h2", {}, "Progress"), json(task.progress)];
  return [];
}

export async function render(view, [taskId]) {
  const holder = h("div", { "data-test": "task" });
  view.append(holder);

  function show(task) {
    const cancel = button("Cancel", (b) => act(b, () => post(`/tasks/${encodeURIComponent(task.id)}/cancel`),
      (r) => `Cancelled ${r.cancelled_task_ids.length} task(s)`), { class: "admin-only danger", "data-test": "cancel" });
    const retry = button("Retry", async (b) => {
      const made = await act(b, () => post(`/tasks/${encodeURIComponent(task.id)}/retry`), (r) => `Retried as ${r.task_id}`);
      if (made) window.location.hash = `#/tasks/${made.task_id}`;
    }, { class: "admin-only", "data-test": "retry" });
    const attempts = (task.attempt_errors || []).length > 1
      ? [h("h2", {}, "Earlier attempts"), h("ol", {}, task.attempt_errors.map((e) => h("li", {}, `${e.type}: ${e.message}`)))]
      : [];
    holder.replaceChildren(
      h("h1", {}, task.name, badge(task.state), TERMINAL.has(task.state) ? retry : cancel),
      h("div", { class: "two" },
        h("section", { class: "panel" }, facts(task)),
        h("section", { class: "panel" }, h("h2", {}, "Arguments"), json({ args: task.call.args, kwargs: task.call.kwargs }))),
      h("section", { class: "panel" }, h("h2", {}, "History"), timeline(task.history)),
      h("section", { class: "panel", "data-test": "outcome" }, ...outcome(task), ...attempts));
  }

  show(await get(`/tasks/${encodeURIComponent(taskId)}`));
  return follow(`/events/tasks/${encodeURIComponent(taskId)}`, { task: show });
}
