"""Copywriting metrics against hand-computed values and the reference libraries (rouge-score, sacrebleu)."""

from __future__ import annotations

import json

import pytest
import sacrebleu
from rouge_score import rouge_scorer
from typer.testing import CliRunner

from finetune.cli import app
from finetune.tasks.copywriting import distinct_n, text_metrics
from tests.conftest import write_jsonl

ROWS = [
    {"prompt": "p1", "completion": "The cat sat on the mat.", "prediction": "the cats sat"},  # cats: stemmed to cat
    {
        "prompt": "p2",
        "completion": "Running shoes that run as far as you do",
        "prediction": "Shoes that ran far with you",
    },
    {"prompt": "p3", "completion": "Fresh coffee, every morning", "prediction": ""},
]


def test_hand_computed_values():
    m = text_metrics(["the cat sat"], ["the cat sat on the mat"])
    assert m["rouge1"] == pytest.approx(2 * 1.0 * 0.5 / 1.5)  # P 3/3, R 3/6
    assert m["rouge2"] == pytest.approx(2 * 1.0 * 0.4 / 1.4)  # P 2/2, R 2/5
    assert m["mean_length"] == 3
    assert distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)  # (a b), (b a), (a b)
    assert distinct_n(["a", ""], 2) == 0.0
    # n-grams counted over every prediction: (a b), (a b), (b c) -> 2 distinct of 3
    assert distinct_n(["a b", "A B c"], 2) == pytest.approx(2 / 3)
    assert text_metrics(["a b", "a b c"], ["x", "y"])["distinct_2"] == pytest.approx(2 / 3)


def test_equal_to_rouge_score_and_sacrebleu_on_the_same_rows(tmp_path):
    path = write_jsonl(tmp_path / "predictions.jsonl", ROWS)
    result = CliRunner().invoke(app, ["eval", "--predictions", str(path), "--task", "copywriting", "--json"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)["metrics"]

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    for name in ("rouge1", "rouge2", "rougeL"):
        expected = sum(scorer.score(r["completion"], r["prediction"])[name].fmeasure for r in ROWS) / len(ROWS)
        assert metrics[name] == pytest.approx(expected, abs=1e-12)
    bleu = sacrebleu.corpus_bleu([r["prediction"] for r in ROWS], [[r["completion"] for r in ROWS]]).score / 100
    assert metrics["bleu"] == pytest.approx(bleu, abs=1e-12)
    unstemmed = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=False)
    plain = sum(unstemmed.score(r["completion"], r["prediction"])["rouge1"].fmeasure for r in ROWS) / len(ROWS)
    assert metrics["rouge1"] > plain  # "cats" matches "cat" only through the stemmer: it is on


def test_missing_reference_field_is_a_data_error(tmp_path):
    path = write_jsonl(tmp_path / "predictions.jsonl", [{"prompt": "p", "prediction": "x"}])
    result = CliRunner().invoke(app, ["eval", "--predictions", str(path), "--task", "copywriting"])
    assert result.exit_code == 3
    assert "predictions.jsonl:1" in result.output and "completion" in result.output


def test_any_script_scores_as_words_and_a_perfect_bleu_is_one():
    """rouge-score keeps only [a-z0-9]: a Hindi, Chinese or Arabic prediction identical to its reference scored 0.
    Rows whose reference holds another character are tokenized as Unicode words (a Han character each); an ASCII
    row is rouge-score's exactly whatever rows surround it. sacreBLEU's perfect 100.00000000000004 was above 1."""
    same = ["वह घर जा रहा है", "我们的咖啡每天早上新鲜烘焙", "قهوة طازجة كل صباح", "Frischer Kaffee, jeden Morgen"]
    metrics = text_metrics(same, same)
    assert metrics["rouge1"] == metrics["rouge2"] == metrics["rougeL"] == 1.0 and metrics["bleu"] == 1.0
    # One vowel sign apart (रहा / रही: "he" / "she is going"): not the same words, as the default tokenizer said.
    half = text_metrics(["वह घर जा रही है"], ["वह घर जा रहा है"])
    assert half["rouge1"] == pytest.approx(0.8) and half["rouge2"] == pytest.approx(0.5)
    assert text_metrics(["咖啡新鲜"], ["咖啡每天新鲜"])["rouge1"] == pytest.approx(2 * 1.0 * (4 / 6) / (1 + 4 / 6))
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    mixed = text_metrics(["the cats sat", "वह घर"], ["The cat sat on the mat.", "वह घर जा रहा है"])
    ascii_row = scorer.score("The cat sat on the mat.", "the cats sat")["rougeL"].fmeasure
    assert mixed["rougeL"] == pytest.approx((ascii_row + 2 * (2 / 5) / (1 + 2 / 5)) / 2, abs=1e-12)
    assert text_metrics(["The cat sat on the mat."] * 3, ["The cat sat on the mat."] * 3)["bleu"] == 1.0
    # English with typographic punctuation is still rouge-score's (stemmed): the marks are no letters.
    curly = text_metrics(["the cats’ bowls — empty"], ["The cat’s bowl — “empty”"])
    reference = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True).score(
        "The cat’s bowl — “empty”", "the cats’ bowls — empty"
    )
    assert curly["rouge1"] == pytest.approx(reference["rouge1"].fmeasure, abs=1e-12)


@pytest.mark.parametrize(
    ("value", "words"),
    [
        (["sports"], "prediction is a list where the rows before hold one class"),
        (None, "prediction must be a class name (text, an integer or a boolean) or a list of them, got None"),
        (1.0, "got 1.0"),
    ],
)
def test_rescored_classification_predictions_are_checked_row_by_row(tmp_path, value, words):
    """One list among single labels turned the whole file into multi-label metrics; a null or 1.0 was scored as a
    wrong class. Each is refused at its row, exit 3 (true/false are classes, as training reads them)."""
    rows = [{"text": f"t{i}", "label": "sports" if i % 2 else "weather", "prediction": "sports"} for i in range(6)]
    rows[3]["prediction"] = value
    path = write_jsonl(tmp_path / "predictions.jsonl", rows)
    result = CliRunner().invoke(app, ["eval", "--predictions", str(path), "--task", "classification"])
    assert result.exit_code == 3 and words in " ".join(result.output.split()), result.output
    assert "predictions.jsonl:4" in result.output


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"prediction": 5}, "prediction must be text, got 5"),
        ({"answers": {"text": [3], "answer_start": [0]}}, "answers must be SQuAD's"),
        ({"answers": 42}, "answers must be SQuAD's"),
    ],
)
def test_rescored_qa_predictions_are_checked_row_by_row(tmp_path, change, words):
    """A number as the prediction was an internal error (AttributeError: 'int' object has no attribute 'lower');
    a gold answer that is no text was dropped silently."""
    rows = [
        {"question": f"q{i}", "answers": {"text": [f"a{i}"], "answer_start": [0]}, "prediction": f"a{i}"}
        for i in range(5)
    ]
    rows[3].update(change)
    path = write_jsonl(tmp_path / "predictions.jsonl", rows)
    result = CliRunner().invoke(app, ["eval", "--predictions", str(path), "--task", "qa"])
    assert result.exit_code == 3 and "predictions.jsonl:4" in result.output, result.output
    assert words in " ".join(result.output.split())
    rows[3].update({"prediction": None, "answers": ["a3", "the a3"]})  # no answer; a list of gold texts: both fine
    assert (
        CliRunner().invoke(app, ["eval", "--predictions", str(write_jsonl(path, rows)), "--task", "qa"]).exit_code == 0
    )


@pytest.mark.parametrize(
    ("kind", "change", "words"),
    [
        ("thumbs", {"desirable": "false"}, "'desirable' must be true or false, got 'false'"),
        ("pairs", {"chosen_reward": "high"}, "'chosen_reward' must be a finite number, got 'high'"),
        ("pairs", {"chosen_reward": None}, "non-finite value as null"),
        ("pairs", {"chosen_reward": float("nan")}, "must be a finite number, got nan"),
        ("pairs", {"rejected_reward": "drop"}, "no 'rejected_reward'"),
    ],
)
def test_rescored_preference_judgements_are_checked_row_by_row(tmp_path, kind, change, words):
    """A KTO thumb of text "false" was counted as desirable (exit 0, a wrong accuracy); a text or null reward was an
    internal error, a missing one a KeyError; NaN was a silently wrong pair."""
    rows = [{"prompt": f"p{i}", "completion": f"c{i}", "prediction": f"c{i}"} for i in range(5)]
    for i, row in enumerate(rows):
        if kind == "pairs":
            row.update(chosen_reward=1.0 + i, rejected_reward=0.5, chosen_logps=-3.0, rejected_logps=-4.0)
        else:
            row.update(reward=0.5 if i % 2 else -0.5, desirable=bool(i % 2))
    rescore = ["eval", "--predictions", str(tmp_path / "predictions.jsonl"), "--task", "copywriting"]
    write_jsonl(tmp_path / "predictions.jsonl", rows)
    assert CliRunner().invoke(app, rescore).exit_code == 0
    if change.get("rejected_reward") == "drop":
        del rows[3]["rejected_reward"]
    else:
        rows[3].update(change)
    write_jsonl(tmp_path / "predictions.jsonl", rows)
    result = CliRunner().invoke(app, rescore)
    assert result.exit_code == 3 and "predictions.jsonl:4" in result.output, result.output
    assert words in " ".join(result.output.split()), result.output
