"""Re-scoring saved retrieval/rerank predictions (`finetune eval --predictions FILE --task retrieval`): a malformed
ranking is refused with exit 3 naming the file, the line and the field, never re-scored into wrong numbers (a
string of ids read character by character, a short `scores` cutting the ranking, a passage ranked twice) and never
an internal error (null ids, string scores)."""

from __future__ import annotations

import json

import pytest
from helpers import invoke

from finetune.errors import DataError
from finetune.evaluation.retrieval import ir_metrics
from tests.conftest import write_jsonl

pytestmark = pytest.mark.unit


def rows() -> list[dict]:
    """Three queries, each with its relevant passage first: every metric 1.0 when read rightly."""
    return [
        {
            "query": f"q{n}",
            "passage_ids": [f"p{n}", f"p{n + 1}", f"p{n + 2}"],
            "scores": [0.9, 0.5, 0.1],
            "relevant_ids": [f"p{n}"],
            "top_k": 2,
        }
        for n in range(3)
    ]


BROKEN = {
    "string ids": ({"passage_ids": "p1"}, "field passage_ids must be a list of passage ids"),
    "null ids": ({"passage_ids": None}, "field passage_ids must be a list of passage ids"),
    "nested ids": ({"passage_ids": [["p1"], "p2", "p3"]}, "field passage_ids must be a list of passage ids"),
    "a repeated id": ({"passage_ids": ["p1", "p2", "p1"]}, "field passage_ids ranks passage 'p1' twice"),
    "an id repeated as a number": (
        {"passage_ids": [7, "7", "p3"]},
        "field passage_ids ranks passage '7' twice",
    ),
    "short scores": ({"scores": [0.9]}, "field scores has 1 values for 3 passage_ids"),
    "string scores": ({"scores": ["x", "y", "z"]}, "field scores must be a list of finite numbers"),
    "nan scores": ({"scores": [float("nan"), 0.5, 0.1]}, "field scores must be a list of finite numbers"),
    "boolean scores": ({"scores": [True, False, False]}, "field scores must be a list of finite numbers"),
    "string relevant ids": ({"relevant_ids": "p1"}, "field relevant_ids must be a list of passage ids"),
    "string top_k": ({"top_k": "2"}, "field top_k must be a positive integer"),
    "another top_k": ({"top_k": 3}, "field top_k is 3, the rows before it 2"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_a_malformed_row_is_refused_naming_file_line_and_field(tmp_path, case):
    change, message = BROKEN[case]
    data = rows()
    data[1] = data[1] | change
    path = tmp_path / "predictions.jsonl"
    # json.dumps writes NaN as the NaN token, which the JSONL reader accepts as Python's json does.
    path.write_text("".join(json.dumps(row) + "\n" for row in data), encoding="utf-8")
    result = invoke("eval", "--predictions", path, "--task", "retrieval")
    assert result.exit_code == 3, result.output
    assert f"{path}:2: {message}" in " ".join(result.output.split()), result.output
    assert "internal error" not in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("task", ["retrieval", "rerank"])
def test_well_formed_rows_rescore(tmp_path, task):
    data = rows()
    data[2] = data[2] | {"passage_ids": [3, 4, 5], "relevant_ids": [3]}  # integer ids are ids too
    path = write_jsonl(tmp_path / "predictions.jsonl", data)
    result = invoke("eval", "--predictions", path, "--task", task, "--json")
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)["metrics"]
    for name in ("ndcg@10", "recall@2", "mrr@10", "map@100"):
        assert metrics[name] == pytest.approx(1.0), name


def test_rerank_refuses_a_string_ranking(tmp_path):
    data = rows()
    data[0] = data[0] | {"passage_ids": "p0"}
    path = write_jsonl(tmp_path / "predictions.jsonl", data)
    result = invoke("eval", "--predictions", path, "--task", "rerank")
    assert result.exit_code == 3, result.output
    assert f"{path}:1: field passage_ids" in " ".join(result.output.split())


def test_ir_metrics_refuses_a_string_ranking_it_would_read_by_character():
    data = rows()
    data[0] = data[0] | {"passage_ids": "p0", "scores": [0.9, 0.5]}
    with pytest.raises(DataError, match="prediction row 1: field passage_ids"):
        ir_metrics(data)
