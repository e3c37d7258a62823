"""bench/perf_summary.py: it reads `perf report` rows and files each shared object under what it does."""

from __future__ import annotations

import pytest

from bench.perf_summary import Sample, by_group, by_thread, group_of, parse

# `perf report --stdio --no-children -g none --sort comm,dso` of a server, trimmed.
REPORT = """\
# To display the perf.data header info, please use --header/--header-only options.
#
# Samples: 7K of event 'cpu-clock'
#
# Overhead  Command       Shared Object
# ........  ............  ........................................
#
    46.22%  python        libpython3.11.so.1.0
    22.99%  python        [kernel.kallsyms]
     8.33%  event_engine  [kernel.kallsyms]
     5.31%  python        cygrpc.cpython-311-x86_64-linux-gnu.so
     3.32%  python        loop.cpython-311-x86_64-linux-gnu.so
     2.75%  event_engine  cygrpc.cpython-311-x86_64-linux-gnu.so
     0.21%  python        ld-linux-x86-64.so.2

"""


def test_it_reads_every_row_and_skips_the_header() -> None:
    rows = parse(REPORT)

    assert rows[0] == Sample(46.22, "python", "libpython3.11.so.1.0")
    assert rows[-1] == Sample(0.21, "python", "ld-linux-x86-64.so.2")
    assert len(rows) == 7


def test_a_symbol_row_keeps_its_marker() -> None:
    assert parse("     6.24%  python        [k] finish_task_switch.isra.0\n") == [
        Sample(6.24, "python", "[k] finish_task_switch.isra.0")
    ]


@pytest.mark.parametrize(("shared_object", "group"), [
    ("libpython3.11.so.1.0", "Python interpreter (all Python code)"),
    ("[kernel.kallsyms]", "kernel (system calls, TCP, switches)"),
    ("cygrpc.cpython-311-x86_64-linux-gnu.so", "gRPC core"),
    ("_message.abi3.so", "protobuf (upb)"),
    ("loop.cpython-311-x86_64-linux-gnu.so", "event loop (uvloop)"),
    ("_asyncio.cpython-311-x86_64-linux-gnu.so", "asyncio (C)"),
    ("hiredis.cpython-311-x86_64-linux-gnu.so", "hiredis"),
    ("libc.so.6", "libc"),
    ("ld-linux-x86-64.so.2", "ld-linux-x86-64.so.2"),  # anything else keeps its name
])
def test_each_shared_object_is_filed_under_what_it_does(shared_object: str, group: str) -> None:
    assert group_of(shared_object) == group


def test_groups_and_threads_add_up_their_rows() -> None:
    rows = parse(REPORT)

    groups = by_group(rows)
    threads = by_thread(rows)

    assert groups["kernel (system calls, TCP, switches)"] == pytest.approx(31.32)
    assert groups["gRPC core"] == pytest.approx(8.06)
    assert threads["event_engine"] == pytest.approx(11.08)
    assert sum(threads.values()) == pytest.approx(sum(groups.values()))
    assert list(groups)[:2] == ["Python interpreter (all Python code)", "kernel (system calls, TCP, switches)"]
    assert list(threads) == ["python", "event_engine"]
