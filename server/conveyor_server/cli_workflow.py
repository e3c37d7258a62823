"""How the `conveyor` command shows a workflow: a tree of its nodes (kind, task name, id, state,
result) for people, or the same nesting as plain JSON values with `-o json`."""

from __future__ import annotations

from typing import Any

from conveyor.client import state_name
from conveyor.v1 import result_pb2, task_service_pb2
from conveyor.values import from_value

from .cli_output import json_value, plain, value_text


def is_workflow_id(text: str) -> bool:
    return text.startswith("wf-")


def workflow_json(workflow: task_service_pb2.GetWorkflowResponse, overall: result_pb2.TaskResult) -> dict[str, Any]:
    """The workflow's own state, result and error, and its root node with the nodes nested."""
    return {
        "workflowId": workflow.workflow_id,
        "state": state_name(overall.state),
        "result": _value(overall),
        "error": _error(overall),
        "resultTaskId": workflow.result_task_id,
        "root": node_json(workflow.root),
    }


def node_json(node: task_service_pb2.WorkflowNode) -> dict[str, Any]:
    """A node as plain JSON: tasks carry name, id, attempts, result and error; canvases their children."""
    data: dict[str, Any] = {"kind": node.kind, "nodeId": node.node_id, "state": state_name(node.state)}
    if node.kind == "task":
        task = node.task
        data |= {"name": task.name, "taskId": task.task_id, "attempts": task.attempts,
                 "result": _value(task), "error": _error(task)}
    else:
        data["children"] = [node_json(child) for child in node.children]
    return data


def workflow_text(workflow: task_service_pb2.GetWorkflowResponse, overall: result_pb2.TaskResult) -> str:
    """A heading line (id, state, result or error), then one line per node, drawn as a tree:

        workflow wf-1  SUCCESS  330
        chain  SUCCESS
        ├── task add  t-1  SUCCESS  3
        └── task mul  t-2  SUCCESS  330
    """
    heading = f"workflow {workflow.workflow_id}  {state_name(overall.state)}"
    outcome = _outcome_text(overall)
    lines = [f"{heading}  {outcome}" if outcome else heading, _node_line(workflow.root)]
    lines += _children_lines(workflow.root, "")
    return "\n".join(lines)


def _children_lines(node: task_service_pb2.WorkflowNode, indent: str) -> list[str]:
    lines: list[str] = []
    for position, child in enumerate(node.children):
        last = position == len(node.children) - 1
        lines.append(f"{indent}{'└── ' if last else '├── '}{_node_line(child)}")
        lines += _children_lines(child, indent + ("    " if last else "│   "))
    return lines


def _node_line(node: task_service_pb2.WorkflowNode) -> str:
    state = state_name(node.state) if node.state else "PENDING"  # a task whose record is not written yet
    if node.kind != "task":
        return f"{node.kind}  {state}"
    task = node.task
    parts = [f"task {task.name or '?'}", task.task_id or "-", state, _outcome_text(task)]
    return "  ".join(part for part in parts if part)


def _outcome_text(result: result_pb2.TaskResult) -> str:
    """The value of a success, the error of a failure or cancel; empty while it runs."""
    if result.state == result_pb2.TASK_STATE_SUCCESS:
        return " ".join(value_text(from_value(result.result)).split())
    if result.error.type or result.error.message:
        return " ".join(f"{result.error.type}: {result.error.message}".split())
    return ""


def _value(result: result_pb2.TaskResult) -> Any:
    if result.state != result_pb2.TASK_STATE_SUCCESS:
        return None
    return json_value(from_value(result.result))


def _error(result: result_pb2.TaskResult) -> dict[str, Any] | None:
    if not (result.error.type or result.error.message):
        return None
    return plain(result.error)
