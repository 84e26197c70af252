"""JSON Lines that JSON itself accepts but no row can hold: a lone UTF-16 surrogate from a \\u escape, and (in a
data file) an object giving a key twice. Each is a data error (exit 3) naming the file, the line and the key."""

from __future__ import annotations

import json

import pytest

from finetune.data.tables import load_table, parse_jsonl, read_jsonl
from finetune.errors import DataError

GOOD = [{"text": f"row {i}", "label": "a" if i % 2 else "b"} for i in range(5)]


def write_lines(path, rows: list[dict], extra: str, at: int) -> str:
    lines = [json.dumps(row) for row in rows]
    lines.insert(at, extra)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def test_a_lone_surrogate_in_a_data_file_names_the_line_and_key(tmp_path):
    path = write_lines(tmp_path / "train.jsonl", GOOD, '{"text": "broken \\ud800 here", "label": "a"}', at=3)
    with pytest.raises(DataError) as info:
        load_table(path, "data.train")
    assert f"{path}:4: a lone surrogate" in str(info.value) and "at text: '\\ud800'" in str(info.value)
    assert info.value.exit_code == 3


def test_a_lone_surrogate_in_a_nested_value_of_predictions(tmp_path):
    path = tmp_path / "predictions.jsonl"
    write_lines(path, GOOD, '{"text": "x", "meta": {"tags": ["ok", "\\udfff"]}}', at=1)
    with pytest.raises(DataError, match=r"predictions\.jsonl:2: a lone surrogate .* at meta\.tags\.1: '\\udfff'"):
        read_jsonl(path)


def test_a_surrogate_pair_is_an_ordinary_character():
    rows = parse_jsonl(['{"text": "smile \\ud83d\\ude00"}'], "-")
    assert rows == [{"text": "smile \U0001f600"}]


def test_a_key_given_twice_in_a_data_file_is_refused(tmp_path):
    path = write_lines(tmp_path / "train.jsonl", GOOD, '{"text": "one", "label": "a", "text": "two"}', at=2)
    with pytest.raises(DataError) as info:
        load_table(path, "data.train")
    assert str(info.value) == f"{path}:3: key 'text' is given twice in one object"
    assert info.value.exit_code == 3


def test_a_clean_data_file_still_loads(tmp_path):
    path = write_lines(tmp_path / "train.jsonl", GOOD, '{"text": "fine \\u00e9", "label": "a"}', at=0)
    assert load_table(path, "data.train").num_rows == 6


def test_a_byte_order_mark_is_read_past_by_every_jsonl_reader(tmp_path):
    """Training data with a BOM trains; the rows predict and detect read (a file or stdin) take it the same way."""
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "a"}\n{"text": "b"}\n')
    assert read_jsonl(path) == [{"text": "a"}, {"text": "b"}]
    assert parse_jsonl(['\ufeff{"text": "a"}\n'], "stdin") == [{"text": "a"}]


def test_text_after_a_json_list_is_named_where_it_starts(tmp_path):
    """A .json list followed by anything (a stray bracket, a second list) was read as JSON Lines, and its first
    line refused as "must be a JSON object, got list"."""
    from finetune.data.tables import _read_json

    path = tmp_path / "rows.json"
    path.write_text('[{"text": "a", "label": "x"},\n {"text": "b", "label": "y"}]\n]garbage\n')
    with pytest.raises(DataError, match=r"rows.json:3: text after the end of the JSON document"):
        _read_json(path)
    path.write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n')  # JSON Lines named .json
    assert _read_json(path) is None
