// A workflow as a graph of its chains, groups and chords, live: nodes turn green as tasks end.

import { follow, get, post } from "../api.js";
import { act, badge, button, h } from "../ui.js";
import { drawGraph } from "../graph.js";

const LEGEND = ["PENDING", "RECEIVED", "STARTED", "RETRY", "SUCCESS", "FAILURE", "CANCELLED", "EXPIRED"];

export async function render(view, [workflowId]) {
  const holder = h("div", { "data-test": "workflow" });
  view.append(holder);

  function show(graph) {
    const cancel = button("Cancel workflow", (b) => act(b, () => post(`/tasks/${encodeURIComponent(workflowId)}/cancel`),
      (r) => `Cancelled ${r.cancelled_task_ids.length} task(s)`), { class: "admin-only danger", "data-test": "cancel-workflow" });
    holder.replaceChildren(
      h("h1", {}, `Workflow`, h("span", { class: "mono muted" }, workflowId), badge(graph.root.state),
        graph.root.state === "SUCCESS" || graph.root.state === "FAILURE" || graph.root.state === "CANCELLED" ||
        graph.root.state === "EXPIRED" ? "" : cancel),
      h("div", { class: "legend" }, LEGEND.map((s) => badge(s))),
      drawGraph(graph.root),
      graph.result_task_id ? h("p", {}, "Result: ", h("a", { href: `#/tasks/${graph.result_task_id}` }, graph.result_task_id)) : "");
  }

  show(await get(`/workflows/${encodeURIComponent(workflowId)}`));
  return follow(`/events/workflows/${encodeURIComponent(workflowId)}`, { workflow: show });
}
