import datetime as dt

import pytest

from conveyor import RetryPolicy, chain, chord, group, si, sig
from conveyor.v1 import task_pb2, workflow_pb2
from conveyor_server.config import Limits
from conveyor_server.core.canvas import kind_of
from conveyor_server.core.errors import InvalidArgument
from conveyor_server.core.planner import compile_workflow, new_workflow_id, result_task_id, task_ids
from conveyor_server.core.signatures import filled, with_leading_arg
from conveyor_server.core.validation import check_workflow


def fill(signature: task_pb2.Signature) -> task_pb2.Signature:
    return filled(signature, "default")


def test_sig_options_reach_the_proto() -> None:
    eta = dt.datetime(2030, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    proto = sig("add", 1, b"x", k=[1]).set(
        queue="math", priority=7, eta=eta, retry=RetryPolicy(max_attempts=4, backoff="fibonacci"), time_limit=2.5
    ).to_proto()
    assert proto.name == "add"
    assert proto.queue == "math"
    assert proto.priority == 7
    assert proto.eta.ToDatetime(tzinfo=dt.UTC) == eta
    assert proto.retry.max_attempts == 4
    assert proto.retry.backoff == task_pb2.BACKOFF_KIND_FIBONACCI
    assert proto.time_limit.ToMilliseconds() == 2500
    assert [a.WhichOneof("kind") for a in proto.args] == ["int_value", "bytes_value"]
    assert proto.kwargs["k"].json_value == "[1]"


def test_dispatch_options_reach_the_proto() -> None:
    proto = sig("charge", 5).set(rate_limit_key="customer-7", concurrency_key="account:7", concurrency_limit=2,
                                 unique_for=30.0, unique_key="charge-7", routing_timeout=1.5).to_proto()
    assert (proto.rate_limit_key, proto.concurrency_key, proto.concurrency_limit) == ("customer-7", "account:7", 2)
    assert (proto.unique_for.ToMilliseconds(), proto.unique_key) == (30_000, "charge-7")
    assert proto.routing_timeout.ToMilliseconds() == 1500
    assert sig("charge").set(routing_timeout=0).to_proto().HasField("routing_timeout"), "0: fail at once"
    plain = sig("charge", 5).to_proto()
    assert (plain.rate_limit_key, plain.concurrency_key, plain.concurrency_limit) == ("", "", 0)
    assert not plain.HasField("unique_for") and not plain.HasField("routing_timeout")


def test_chains_flatten_like_celery() -> None:
    flow = chain(sig("a"), sig("b")) | sig("c")
    assert [s.name for s in flow.steps] == ["a", "b", "c"]  # type: ignore[union-attr]


def test_plan_of_a_nested_canvas() -> None:
    flow = chain(sig("a"), group(sig("b"), chain(sig("c"), sig("d"))), chord([sig("x"), sig("y")], sig("cb")))
    compiled = compile_workflow(flow.to_workflow(), new_workflow_id(), fill)  # plans are cached by id
    kinds = [kind_of(n).label for n in compiled.plan.nodes]
    assert kinds == ["chain", "task", "group", "task", "chain", "task", "task", "chord", "group", "task", "task",
                     "task"]
    names = [compiled.signatures[t].name for t in task_ids(compiled.plan)]
    assert names == ["a", "b", "c", "d", "x", "y", "cb"]
    assert compiled.signatures[result_task_id(compiled.plan)].name == "cb"
    assert result_task_id(compiled.plan, compiled.plan.nodes[2].node_id) == ""  # a group has no single result


def test_leading_arg_respects_immutability() -> None:
    value = task_pb2.Value(int_value=3)
    assert [a.int_value for a in with_leading_arg(sig("mul", 10).to_proto(), value).args] == [3, 10]
    assert [a.int_value for a in with_leading_arg(si("mul", 10).to_proto(), value).args] == [10]


def test_workflow_limits() -> None:
    deep = sig("leaf").to_workflow()
    for _ in range(40):
        deep = workflow_pb2.Workflow(chain=workflow_pb2.Chain(steps=[deep]))
    with pytest.raises(InvalidArgument, match="deeper than the limit of 32"):
        check_workflow(deep, Limits())
    wide = group(sig("t") for _ in range(20)).to_workflow()
    with pytest.raises(InvalidArgument, match="20 tasks, over the limit of 10"):
        check_workflow(wide, Limits(max_workflow_tasks=10))
    with pytest.raises(InvalidArgument, match="at least one step"):
        check_workflow(workflow_pb2.Workflow(chain=workflow_pb2.Chain()), Limits())
    with pytest.raises(InvalidArgument, match=r"chain\[1\]: name is empty"):
        check_workflow(chain(sig("a"), sig("")).to_workflow(), Limits())
