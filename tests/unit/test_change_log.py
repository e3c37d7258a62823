"""What a watch is told of a key's changes (backends/base.py ChangeLog): the version a change
wrote is kept only while every change of the key since came with one, so a reader never
skips a read on the word of a version that a later, untold change has passed."""

from __future__ import annotations

from conveyor_server.backends.base import ChangeLog, Changes


def test_a_version_told_is_taken_with_its_key_and_the_log_starts_over() -> None:
    log = ChangeLog()
    log.note("a", 2)
    log.note("b")
    taken = log.take()
    assert set(taken) == {"a", "b"} and dict(taken.versions) == {"a": 2}
    assert not log and not log.take()


def test_the_highest_of_the_versions_told_is_kept() -> None:
    log = ChangeLog()
    log.note("a", 3)
    log.note("a", 2)  # told late: the record is at 3 at least
    assert log.take().versions == {"a": 3}


def test_a_change_without_a_version_makes_the_key_unknown_whatever_comes_before_or_after() -> None:
    log = ChangeLog()
    log.note("a", 2)
    log.note("a")
    log.note("a", 5)
    log.note("b")
    log.note("b", 4)
    taken = log.take()
    assert set(taken) == {"a", "b"} and taken.versions == {}, "either may have been written past what was told"


def test_changes_noted_all_at_once_keep_their_versions_and_a_plain_set_tells_none() -> None:
    log = ChangeLog()
    log.note("a", 7)
    log.note_all(Changes({"a", "b"}, {"a": 8, "b": 1}))
    log.note_all({"c"})
    taken = log.take()
    assert set(taken) == {"a", "b", "c"} and taken.versions == {"a": 8, "b": 1}
