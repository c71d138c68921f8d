"""The execution-log format: formatting, parsing, INV/RES pairing and pending operations."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvstore.check.history import (
    CAS,
    DELETE,
    READ,
    WRITE,
    LogFormatError,
    Op,
    cas_value,
    describe,
    flag_value,
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
        "1\tINV\t1\tD\tk\tv",  # delete invocation with a value
        "1\tRES\t1\tD\tk",  # delete response without its flag
        "1\tRES\t1\tD\tk\t",  # ... or with an empty one
        "1\tRES\t1\tD\tk\t2",  # a flag that is neither 1 nor 0
        "1\tRES\t1\tD\tk\t1\t1",  # too many fields
        "1\tINV\t1\tC\tk\tv",  # CAS invocation without its new value
        "1\tINV\t1\tC\tk",  # ... or without both values
        "1\tINV\t1\tC\tk\ta\tb\tc",  # too many fields
        "1\tRES\t1\tC\tk",  # CAS response without its flag
        "1\tRES\t1\tC\tk\ttrue",  # a flag that is neither 1 nor 0
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


# --- delete and compare-and-set ---------------------------------------------------------------


def test_format_event_writes_delete_and_cas_lines() -> None:
    assert format_event(5, False, 1, DELETE, "k", None) == "5\tINV\t1\tD\tk"
    assert format_event(6, True, 1, DELETE, "k", "1") == "6\tRES\t1\tD\tk\t1"
    assert format_event(6, True, 1, DELETE, "k", "0") == "6\tRES\t1\tD\tk\t0"
    assert format_event(7, False, 2, CAS, "k", "old\tnew") == "7\tINV\t2\tC\tk\told\tnew"
    assert format_event(7, False, 2, CAS, "k", "\tnew") == "7\tINV\t2\tC\tk\t\tnew"
    assert format_event(8, True, 2, CAS, "k", "0") == "8\tRES\t2\tC\tk\t0"
    assert cas_value("", "new") == "\tnew"
    assert (flag_value(True), flag_value(False)) == ("1", "0")


@pytest.mark.parametrize(
    ("kind", "is_response", "value"),
    [
        (DELETE, True, None),
        (DELETE, True, "yes"),
        (CAS, True, ""),
        (CAS, False, None),
        (CAS, False, "no tab"),
        (CAS, False, "a\tb\tc"),
    ],
)
def test_format_event_rejects_bad_delete_and_cas_values(
    kind: str, is_response: bool, value: str | None
) -> None:
    with pytest.raises(ValueError, match=kind):
        format_event(1, is_response, 1, kind, "k", value)


def test_parse_event_decodes_delete_and_cas_lines() -> None:
    assert parse_event("5\tINV\t1\tD\tk\n") == (5, False, 1, DELETE, "k", None)
    assert parse_event("6\tRES\t1\tD\tk\t1\n") == (6, True, 1, DELETE, "k", "1")
    assert parse_event("7\tINV\t2\tC\tk\ta\tb") == (7, False, 2, CAS, "k", "a\tb")
    assert parse_event("7\tINV\t2\tC\tk\t\tb") == (7, False, 2, CAS, "k", "\tb")
    assert parse_event("7\tINV\t2\tC\tk\ta\t\r\n") == (7, False, 2, CAS, "k", "a\t")
    assert parse_event("8\tRES\t2\tC\tk\t0") == (8, True, 2, CAS, "k", "0")


def test_parse_log_builds_delete_and_cas_ops() -> None:
    lines = _lines(
        "1\tINV\t1\tD\tk",
        "2\tINV\t2\tC\tk\t\tnew",
        "3\tRES\t1\tD\tk\t0",
        "4\tRES\t2\tC\tk\t1",
        "5\tINV\t1\tC\tk\tnew\tnewer",  # pending
        "6\tINV\t2\tD\tk",  # pending
    )
    assert parse_log(lines) == [
        Op(1, DELETE, "k", None, 1, 3, returned_flag=False),
        Op(2, CAS, "k", "new", 2, 4, expected="", returned_flag=True),
        Op(1, CAS, "k", "newer", 5, None, expected="new"),
        Op(2, DELETE, "k", None, 6, None),
    ]


def test_delete_and_cas_round_trip_through_a_file(tmp_path: Path) -> None:
    ops = [
        Op(1, WRITE, "k", "a", 10, 20),
        Op(2, CAS, "k", "b", 15, 30, expected="a", returned_flag=True),
        Op(3, DELETE, "k", None, 16, 40, returned_flag=True),
        Op(1, CAS, "k", "c", 25, 35, expected="", returned_flag=False),
        Op(4, READ, "k", "", 41, 42),
        Op(5, CAS, "other", "x y", 43, None, expected="v w"),
        Op(6, DELETE, "other", None, 44, None),
    ]
    path = tmp_path / "history.log"
    write_events(path, [event for op in ops for event in op_events(op)])
    assert read_log(path) == ops
    for line in path.read_text(encoding="utf-8").splitlines():
        event = parse_event(line)
        assert event is not None
        assert format_event(*event) == line


def test_op_events_of_delete_and_cas() -> None:
    assert op_events(Op(4, DELETE, "k", None, 9, 12, returned_flag=True)) == [
        (9, False, 4, DELETE, "k", None),
        (12, True, 4, DELETE, "k", "1"),
    ]
    assert op_events(Op(4, CAS, "k", "new", 9, 12, expected="", returned_flag=False)) == [
        (9, False, 4, CAS, "k", "\tnew"),
        (12, True, 4, CAS, "k", "0"),
    ]
    assert op_events(Op(4, CAS, "k", "new", 9, None, expected="old")) == [
        (9, False, 4, CAS, "k", "old\tnew")
    ]


def test_describe_names_each_kind_and_its_outcome() -> None:
    assert describe(Op(1, WRITE, "k", "v", 1, 2)) == "tid 1 write 'k' = 'v' [1 ns, 2 ns]"
    assert describe(Op(1, READ, "k", "", 1, 2)) == "tid 1 read 'k' -> '' [1 ns, 2 ns]"
    delete = Op(2, DELETE, "k", None, 3, 4, returned_flag=False)
    assert describe(delete) == "tid 2 delete 'k' -> 0 [3 ns, 4 ns]"
    cas = Op(3, CAS, "k", "b", 5, None, expected="a")
    assert describe(cas) == "tid 3 cas 'k' 'a' => 'b' [5 ns, pending]"
