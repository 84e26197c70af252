"""`--compare` when the two evaluations scored different rows (saved predictions re-scored against a baseline run):
refused (exit 2) naming the counts, or with --allow-different-data compared on the rows both scored, so that the
printed change is the one the paired test measures."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from finetune.errors import RecipeError
from finetune.evaluation import intervals as iv
from finetune.evaluation.compare import Baseline, compare, matched_rows, same_data
from finetune.evaluation.scoring import metrics_document, row_scorer, score
from finetune.recipe.schema import EvalSection
from finetune.tasks import get_task
from tests.conftest import write_jsonl

pytestmark = pytest.mark.unit

LABELS = ["billing", "shipping", "refund", "other"]
TASK = get_task("classification")
FIELDS = (*TASK.required_fields, *TASK.optional_fields)


def predicted(ids: range, right: set[int]) -> list[dict]:
    """Rows `ids` (text and label fixed by the id), right when the id is in `right`."""
    out = []
    for i in ids:
        rng = random.Random(i)
        label = rng.choice(LABELS)
        wrong = rng.choice([x for x in LABELS if x != label])
        out.append({"text": f"ticket {i}", "label": label, "prediction": label if i in right else wrong})
    return out


def metrics(rows: list[dict]) -> dict:
    return score(TASK, rows, EvalSection())["metrics"]


def baseline_dir(path: Path, rows: list[dict], allow: bool = False) -> Baseline:
    path.mkdir(parents=True)
    document = metrics_document("classification", score(TASK, rows, EvalSection()), [])
    (path / "metrics.json").write_text(json.dumps(document))
    write_jsonl(path / "predictions.jsonl", rows)
    return Baseline(str(path), document, 0.01, allow_different_data=allow)


def document_of(rows: list[dict]) -> dict:
    """A re-scored predictions file's document: no `eval_data` record."""
    return metrics_document("classification", score(TASK, rows, EvalSection()), [])


def test_other_rows_are_refused_naming_the_counts(tmp_path):
    baseline = baseline_dir(tmp_path / "b", predicted(range(20), set(range(10))))
    rows = predicted(range(30), set(range(15)))  # the baseline's 20 rows and 10 more
    with pytest.raises(RecipeError) as refused:
        compare(document_of(rows), baseline, 0.01, rows, FIELDS, metrics)
    assert refused.value.exit_code == 2
    message = str(refused.value)
    assert "scored 20 rows, this evaluation 30, and 20 of them match" in message
    assert "--allow-different-data" in message
    with pytest.raises(RecipeError):
        same_data(document_of(rows), baseline, rows, FIELDS)


def test_the_same_rows_in_another_order_are_the_same_data(tmp_path):
    base_rows = predicted(range(20), set(range(10)))
    baseline = baseline_dir(tmp_path / "b", base_rows)
    rows = list(reversed(predicted(range(20), set(range(5)))))
    assert same_data(document_of(rows), baseline, rows, FIELDS) is True
    results = compare(document_of(rows), baseline, 0.01, rows, FIELDS, metrics)
    assert results["accuracy"]["change"] == pytest.approx(0.25 - 0.5)
    assert "rows" not in results["accuracy"]


def test_rows_matched_by_id_whose_references_were_edited_are_other_data(tmp_path):
    """Saved predictions with every `id` of the baseline's but five labels edited: "same data", and a paired test
    found a regression in identical predictions judged against other labels."""
    base_rows = [{"id": f"e{i}", **row} for i, row in enumerate(predicted(range(15), set(range(15))))]
    baseline = baseline_dir(tmp_path / "b", base_rows)
    edited = [{**row, "label": "other" if i < 5 else row["label"]} for i, row in enumerate(base_rows)]
    same = 15 - sum(row["label"] != "other" for row in base_rows[:5])
    with pytest.raises(RecipeError, match=f"and {same} of them match"):
        same_data(document_of(edited), baseline, edited, FIELDS)
    assert same_data(document_of(base_rows), baseline, list(reversed(base_rows)), FIELDS) is True


def test_the_same_rows_in_another_order_are_the_same_data_whatever_their_files_hash(tmp_path):
    """An evaluation of a shuffled copy of the eval file: its `eval_data` hash differs from the baseline's (the
    hash follows the order), and it was refused as other data though every row is the baseline's."""
    base_rows = predicted(range(20), set(range(10)))
    baseline = baseline_dir(tmp_path / "b", base_rows)
    baseline.document["eval_data"] = {"source": "test.jsonl", "rows": 20, "sha256": "a" * 64}
    rows = list(reversed(base_rows))
    document = {**document_of(rows), "eval_data": {"source": "shuffled.jsonl", "rows": 20, "sha256": "b" * 64}}
    assert same_data(document, baseline, rows, FIELDS) is True
    with pytest.raises(RecipeError, match="was evaluated on"):
        same_data(document, baseline, rows[:19], FIELDS)


def test_allowed_other_rows_compare_on_the_matched_rows(tmp_path):
    """Baseline: 20 rows, ids 0-9 right. Candidate: ids 0-29, ids 0-9 and 20-29 right: on all its rows accuracy
    20/30 against 10/20, but on the 20 rows both scored 10/20 against 10/20: no change, as the paired test says."""
    base_rows = predicted(range(20), set(range(10)))
    baseline = baseline_dir(tmp_path / "b", base_rows, allow=True)
    rows = predicted(range(30), set(range(10)) | set(range(20, 30)))
    document = document_of(rows)
    assert document["metrics"]["accuracy"] == pytest.approx(20 / 30)
    assert same_data(document, baseline, rows, FIELDS) is False
    results = compare(document, baseline, 0.01, rows, FIELDS, metrics)
    accuracy = results["accuracy"]
    assert accuracy["rows"] == {"this": 30, "baseline": 20, "matched": 20}
    assert accuracy["value"] == pytest.approx(0.5) and accuracy["baseline"] == pytest.approx(0.5)
    assert accuracy["change"] == pytest.approx(0.0)
    matched, paired = iv.paired_tests(
        row_scorer(TASK, EvalSection()),
        rows,
        document["metrics"],
        base_rows,
        baseline.document["metrics"],
        list(results),
        FIELDS,
    )
    assert matched == 20
    for name, result in results.items():  # the printed change is the paired test's difference
        assert result["change"] == pytest.approx(paired[name].difference), name


def test_matched_rows_keep_each_sides_own_prediction_and_repeats():
    ours = predicted(range(4), {0, 1}) + predicted(range(1), set())
    theirs = predicted(range(2, 6), set()) + predicted(range(2, 3), {2})
    mine, other = matched_rows(ours, theirs, FIELDS)
    assert [r["text"] for r in mine] == ["ticket 2", "ticket 3"]
    assert [r["text"] for r in other] == ["ticket 2", "ticket 3"]
    assert mine == [ours[2], ours[3]] and other == [theirs[0], theirs[1]]


def test_no_common_row_is_refused(tmp_path):
    """It compared nothing and passed (exit 0): a regression check that checks nothing."""
    baseline = baseline_dir(tmp_path / "b", predicted(range(10), set()), allow=True)
    rows = predicted(range(10, 20), set(range(10, 20)))
    with pytest.raises(RecipeError, match="no row of this evaluation is one the baseline scored"):
        compare(document_of(rows), baseline, 0.01, rows, FIELDS, metrics)


def test_without_rows_the_metrics_documents_are_compared_as_before(tmp_path):
    baseline = baseline_dir(tmp_path / "b", predicted(range(20), set(range(10))))
    rows = predicted(range(30), set(range(15)))
    results = compare(document_of(rows), baseline.document, 0.01)
    assert results["accuracy"]["change"] == pytest.approx(0.0)
    assert same_data(document_of(rows), baseline) is None


def test_the_same_rows_over_another_knowledge_base_are_other_data():
    """A ranking's rows hold passage ids, not texts: the knowledge base each side searched decides too (and a
    baseline from before it was recorded is judged by its rows alone)."""
    record = {"source": "q.jsonl", "rows": 3, "sha256": "abc"}
    then = {"metrics": {}, "eval_data": {**record, "knowledge_base": {"kb.jsonl": "111"}}}
    now = {"metrics": {}, "eval_data": {**record, "knowledge_base": {"kb.jsonl": "222"}}}
    with pytest.raises(RecipeError, match="with the knowledge base kb.jsonl"):
        same_data(now, Baseline("base", then, 0.01))
    assert same_data(now, Baseline("base", then, 0.01, allow_different_data=True)) is False
    assert same_data(now, Baseline("base", {"metrics": {}, "eval_data": record}, 0.01)) is True
    assert same_data(now, Baseline("base", now, 0.01)) is True
