"""`finetune detect --key` on a run with a learned watermark: refused with exit 2 (a learned watermark is read
back as a message and has no key to give), as --message is refused on a keyed watermark; never silently ignored."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from finetune.data.tables import Origins, Source
from finetune.errors import DataError, RecipeError
from finetune.flows import watermark as flow
from finetune.recipe.schema import Recipe

BASE = {"task": "copywriting", "model": {"name_or_path": "m"}, "data": {"train": "t.jsonl"}}
ROWS = Origins.of(Source("rows.jsonl", None, "lines", lines=(1,)), 1)


def run_with(monkeypatch, mark: dict) -> None:
    recipe = Recipe.model_validate({**BASE, "eval": {"watermark": mark}})
    monkeypatch.setattr(flow, "resolve_run", lambda path: (SimpleNamespace(recipe=recipe), None))


def test_key_on_a_learned_watermark_is_refused(monkeypatch):
    run_with(monkeypatch, {"method": "learned", "key": 7})
    with pytest.raises(RecipeError) as info:
        flow.detect("RUN", [{"prediction": "text"}], ROWS, key=5)
    assert info.value.exit_code == 2
    assert str(info.value).startswith("--key: RUN carries a learned watermark") and "--message" in str(info.value)


def test_message_on_a_keyed_watermark_is_still_refused(monkeypatch):
    run_with(monkeypatch, {"method": "kirchenbauer", "key": 7})
    with pytest.raises(RecipeError, match="--message: RUN carries no learned watermark"):
        flow.detect("RUN", [{"prediction": "text"}], ROWS, message="1010")


def test_a_row_without_text_is_named_at_its_line(monkeypatch):
    """The line the reader counted (a blank line before it), not the row's number."""
    run_with(monkeypatch, {"method": "kirchenbauer", "key": 7})
    rows = Origins.of(Source("stdin", None, "lines", lines=(1, 3)), 2)
    with pytest.raises(DataError, match="stdin:3: field 'prediction' must be text, got int"):
        flow.detect("RUN", [{"prediction": "text"}, {"prediction": 5}], rows)


def test_a_missing_field_and_an_empty_input_are_named(monkeypatch):
    """A row without the field said 'got NoneType'; an empty input scored '0 of 0 rows' with exit 0."""
    run_with(monkeypatch, {"method": "kirchenbauer", "key": 7})
    rows = Origins.of(Source("texts.jsonl", None, "lines", lines=(2,)), 1)
    with pytest.raises(DataError, match=r"texts.jsonl:2: no field 'prediction' \(the row has: text\); .*--field"):
        flow.detect("RUN", [{"text": "a"}], rows)
    with pytest.raises(DataError, match="texts.jsonl: no input rows"):
        flow.detect("RUN", [], Origins.of(Source("texts.jsonl", None, "lines", lines=()), 0))
