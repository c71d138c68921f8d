"""The execution-log format: formatting, parsing, INV/RES pairing and pending operations."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvstore.check.history import (
    READ,
    WRITE,
    LogFormatError,
    Op,
    format_event,
    op_events,
    parse_event,
    parse_log,
    read_log,
    write_events,
)


def _lines(*fields: str) -> list[str]:
    return [f"{line}\n" for line in fields]


def test_format_event_writes_exactly_the_watca_fields() -> None:
    assert format_event(5, False, 1, READ, "k", "ignored") == "5\tINV\t1\tR\tk"
    assert format_event(6, True, 1, READ, "k", "v") == "6\tRES\t1\tR\tk\tv"
    assert format_event(6, True, 1, READ, "k", "") == "6\tRES\t1\tR\tk\t"
    assert format_event(6, True, 1, READ, "k", None) == "6\tRES\t1\tR\tk\t"
    assert format_event(7, False, 2, WRITE, "k", "v") == "7\tINV\t2\tW\tk\tv"
    assert format_event(8, True, 2, WRITE, "k", "ignored") == "8\tRES\t2\tW\tk"


def test_format_event_rejects_an_unknown_kind() -> None:
    with pytest.raises(ValueError, match="unknown operation kind"):
        format_event(1, False, 1, "X", "k", "v")


def test_round_trip_through_a_file(tmp_path: Path) -> None:
    ops = [
        Op(1, WRITE, "key one", "välue 1", 10, 20),
        Op(2, READ, "key one", "välue 1", 15, 30),
        Op(3, READ, "other", "", 16, 17),
        Op(1, READ, "other", "x y", 25, 40),
        Op(2, WRITE, "other", "x y", 35, 39),
    ]
    path = tmp_path / "history.log"
    write_events(path, [event for op in ops for event in op_events(op)])
    assert read_log(path) == sorted(ops, key=lambda op: op.invoke_ns)


def test_parse_event_decodes_each_line_kind() -> None:
    assert parse_event("5\tINV\t1\tR\tk\n") == (5, False, 1, READ, "k", None)
    assert parse_event("6\tRES\t1\tR\tk\tv\n") == (6, True, 1, READ, "k", "v")
    assert parse_event("7\tINV\t2\tW\tk\tv") == (7, False, 2, WRITE, "k", "v")
    assert parse_event("8\tRES\t2\tW\tk\r\n") == (8, True, 2, WRITE, "k", None)
    assert parse_event("\n") is None


def test_empty_read_value_with_and_without_trailing_tab() -> None:
    lines = _lines("1\tINV\t1\tR\tk", "2\tRES\t1\tR\tk\t", "3\tINV\t1\tR\tk", "4\tRES\t1\tR\tk")
    assert parse_log(lines) == [Op(1, READ, "k", "", 1, 2), Op(1, READ, "k", "", 3, 4)]


def test_blank_lines_are_skipped() -> None:
    lines = ["\n", "1\tINV\t1\tW\tk\tv\n", "   \n", "2\tRES\t1\tW\tk\n", ""]
    assert parse_log(lines) == [Op(1, WRITE, "k", "v", 1, 2)]


def test_invocation_followed_by_another_invocation_is_pending() -> None:
    lines = _lines(
        "1\tINV\t1\tW\tk\tlost",
        "2\tINV\t2\tR\tk",
        "3\tINV\t1\tR\tk",  # thread 1 gave up on its write
        "4\tRES\t2\tR\tk\tlost",
        "5\tRES\t1\tR\tk\tlost",
    )
    assert parse_log(lines) == [
        Op(1, WRITE, "k", "lost", 1, None),
        Op(2, READ, "k", "lost", 2, 4),
        Op(1, READ, "k", "lost", 3, 5),
    ]


def test_invocations_at_end_of_file_are_pending() -> None:
    lines = _lines("1\tINV\t1\tW\tk\tv", "2\tINV\t2\tR\tk", "3\tRES\t1\tW\tk", "4\tINV\t1\tW\tk\tw")
    ops = parse_log(lines)
    assert ops == [
        Op(1, WRITE, "k", "v", 1, 3),
        Op(2, READ, "k", None, 2, None),
        Op(1, WRITE, "k", "w", 4, None),
    ]
    assert [op.is_pending for op in ops] == [False, True, True]


@pytest.mark.parametrize(
    "bad_line",
    [
        "x\tINV\t1\tR\tk",  # time not an integer
        "1\tINV\tone\tR\tk",  # tid not an integer
        "1\tGET\t1\tR\tk",  # unknown event
        "1\tINV\t1\tX\tk",  # unknown kind
        "1\tINV\t1\tR",  # too few fields
        "1\tINV\t1\tW\tk",  # write without value
        "1\tINV\t1\tR\tk\tv",  # read invocation with a value
        "1\tRES\t1\tR\tk\tv\textra",  # too many fields
        "garbage",
    ],
)
def test_malformed_line_error_names_the_line_number(bad_line: str) -> None:
    lines = _lines("1\tINV\t7\tW\tk\tv", "2\tRES\t7\tW\tk", bad_line)
    with pytest.raises(LogFormatError, match=r"^line 3: "):
        parse_log(lines)


def test_response_without_invocation_is_an_error() -> None:
    with pytest.raises(LogFormatError, match=r"^line 2: .*no invocation"):
        parse_log(_lines("", "1\tRES\t1\tW\tk"))


def test_response_that_does_not_match_its_invocation_is_an_error() -> None:
    with pytest.raises(LogFormatError, match=r"^line 2: .*does not match .* line 1"):
        parse_log(_lines("1\tINV\t1\tW\tk\tv", "2\tRES\t1\tW\tother"))


def test_response_before_its_invocation_is_an_error() -> None:
    with pytest.raises(LogFormatError, match=r"^line 2: .*precedes"):
        parse_log(_lines("5\tINV\t1\tW\tk\tv", "4\tRES\t1\tW\tk"))


def test_write_events_sorts_by_time_and_keeps_ties_in_order(tmp_path: Path) -> None:
    events = [
        (30, True, 1, WRITE, "k", None),
        (10, False, 1, WRITE, "k", "v"),
        (20, False, 2, READ, "k", None),
        (20, False, 3, READ, "k", None),
        (40, True, 3, READ, "k", "v"),
        (40, True, 2, READ, "k", "v"),
    ]
    path = tmp_path / "sorted.log"
    write_events(path, events)
    assert path.read_text(encoding="utf-8").splitlines() == [
        "10\tINV\t1\tW\tk\tv",
        "20\tINV\t2\tR\tk",
        "20\tINV\t3\tR\tk",
        "30\tRES\t1\tW\tk",
        "40\tRES\t3\tR\tk\tv",
        "40\tRES\t2\tR\tk\tv",
    ]


def test_op_events_of_a_pending_op_is_only_its_invocation() -> None:
    assert op_events(Op(4, WRITE, "k", "v", 9, None)) == [(9, False, 4, WRITE, "k", "v")]
    assert op_events(Op(4, READ, "k", "v", 9, 12)) == [
        (9, False, 4, READ, "k", None),
        (12, True, 4, READ, "k", "v"),
    ]
