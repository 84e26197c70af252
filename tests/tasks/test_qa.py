"""Question answering: SQuAD v1.1 metrics by hand, windows and offsets on long contexts, both modes end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from finetune.cli import app
from finetune.models.references import load_tokenizer
from finetune.tasks import qa_spans
from finetune.tasks.qa import answer_reward, exact_match_score, f1_score, normalize_answer, row_scores, squad_metrics
from tests.conftest import write_jsonl

runner = CliRunner()


# --------------------------------------------------------------------------- metrics


def test_squad_normalisation_and_scores_by_hand():
    assert normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    assert normalize_answer("an apple, a pear") == "apple pear"
    assert normalize_answer("theatre") == "theatre"  # articles only as whole words
    assert exact_match_score("the Eiffel tower.", "Eiffel Tower") == 1.0
    assert f1_score("red big house", "the big red barn") == pytest.approx(2 * (2 / 3) * (2 / 3) / (4 / 3))
    assert f1_score("", "Paris") == 0.0
    assert f1_score("a", "the") == 0.0  # both normalise to nothing: 0 in SQuAD v1.1


def test_max_over_gold_answers_and_mean_over_examples(tmp_path):
    rows = [
        {"answers": {"text": ["Denver Broncos", "Broncos"], "answer_start": [0, 7]}, "prediction": "the Broncos"},
        {"answers": {"text": ["30 days"], "answer_start": [0]}, "prediction": "within 30 days"},
        {"answers": {"text": ["Paris"], "answer_start": [0]}, "prediction": ""},
    ]
    by_hand_f1 = (1.0 + 2 * (2 / 3) * 1.0 / (2 / 3 + 1.0) + 0.0) / 3
    metrics = squad_metrics(rows)["metrics"]
    assert metrics["exact_match"] == pytest.approx(1 / 3)
    assert metrics["f1"] == pytest.approx(by_hand_f1)
    path = write_jsonl(tmp_path / "predictions.jsonl", rows)
    result = runner.invoke(app, ["eval", "--predictions", str(path), "--task", "qa", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["metrics"] == pytest.approx(metrics)


def test_unanswerable_rows_are_scored_as_squad_v2_scores_them():
    """A row with no gold answer was left out of the mean (all of them: 0.0 over 0 rows, and a gate passed on it),
    and SQuAD v2's "" at -1 gave an empty answer EM 1 but F1 0. SQuAD v2's official rule: a no-answer scores 1
    against no answer, anything else 0; rows with an answer are scored as before."""
    rows = [
        {"answers": {"text": [], "answer_start": []}, "prediction": ""},
        {"answers": {"text": [""], "answer_start": [-1]}, "prediction": ""},
        {"answers": {"text": [], "answer_start": []}, "prediction": "Paris"},
        {"answers": {"text": ["Paris"], "answer_start": [0]}, "prediction": "paris"},
    ]
    scored = squad_metrics(rows)
    assert scored["metrics"] == {"exact_match": 0.75, "f1": 0.75}
    assert scored["details"] == {"examples": 4, "unanswerable": 3}
    assert squad_metrics(rows[:1])["metrics"] == {"exact_match": 1.0, "f1": 1.0}
    # As the official SQuAD v2 script: golds the normalisation empties are left out ("" beside "Paris": an empty
    # answer scores 0), and a row with none left is unanswerable.
    assert row_scores("", ["", "Paris"]) == (0.0, 0.0) and row_scores("", ["The", "Paris"]) == (0.0, 0.0)
    assert row_scores("A", ["A"]) == (1.0, 1.0) and row_scores("", ["A"]) == (1.0, 1.0)
    # GRPO's reward is not fooled by that rule on a multiple-choice letter: the letter as written earns it.
    assert answer_reward("", ["A"]) == 0.0 and answer_reward("a ", ["A"]) == 1.0 and answer_reward("B", ["A"]) == 0.0
    assert answer_reward("Paris", ["", "Paris"]) == 1.0


def test_a_model_trained_on_unanswerable_questions_abstains_where_no_answer_scores_highest():
    """The decoder skipped the CLS token, so a model trained to point there for "no answer" always answered, and
    SQuAD v2 scoring gave every such row 0; with `abstains` it answers "" where the no-answer score (the lowest
    over the example's windows) beats every span, as transformers' version_2_with_negative does."""
    from finetune.data.tables import LengthReport

    context = "abc def"
    windows = qa_spans.Windows(
        [[0, 1, 2], [0, 1, 2]], [[1, 1, 1]] * 2, [0, 0], [[None, (0, 3), (4, 7)]] * 2, [0, 0], LengthReport("x", 1, 3)
    )
    starts = np.array([[5.0, 1.0, 0.0], [0.5, 1.0, 0.0]])
    ends = np.array([[5.0, 0.0, 1.0], [0.5, 0.0, 1.0]])
    assert qa_spans.best_answers(windows, starts, ends, [context], 5, 10) == ["abc def"]
    # the lowest no-answer score over the windows is 1.0, below the best span's 2.0: it answers
    assert qa_spans.best_answers(windows, starts, ends, [context], 5, 10, abstains=True) == ["abc def"]
    starts[1, 0] = ends[1, 0] = 3.0  # now every window says "no answer" louder than any span
    assert qa_spans.best_answers(windows, starts, ends, [context], 5, 10, abstains=True) == [""]


# --------------------------------------------------------------------------- windows


WORDS = ["rain", "sun", "cloud", "storm", "wind", "snow", "forecast", "cold", "warm", "temperature"]


@pytest.fixture()
def bert_tokenizer(tiny_models):
    return load_tokenizer(str(tiny_models["bert"]), "bert")


def _context(n_words: int) -> str:
    return " ".join(WORDS[i % len(WORDS)] for i in range(n_words))


def _char_span(context: str, first_word: int, last_word: int) -> tuple[str, int]:
    words = context.split(" ")
    start = sum(len(w) + 1 for w in words[:first_word])
    text = " ".join(words[first_word : last_word + 1])
    assert context[start : start + len(text)] == text
    return text, start


def _windows(tokenizer, context, max_length=16, stride=4):
    return qa_spans.windows(["match"], [context], tokenizer, max_length, stride, "test")


def _labelled_text(w, starts, ends, context, window):
    offsets = w.offsets[window]
    return context[offsets[starts[window]][0] : offsets[ends[window]][1]]


def test_each_word_is_one_token(bert_tokenizer):
    assert len(bert_tokenizer(_context(30), add_special_tokens=False)["input_ids"]) == 30


def test_answer_in_the_second_window(bert_tokenizer):
    context = _context(30)
    w = _windows(bert_tokenizer, context)
    # [CLS] match [SEP] + 12 context tokens + [SEP]: windows of 12 words, each sharing 4 with the next
    assert len(w.example) > 1 and set(w.example) == {0}
    answer = _char_span(context, 14, 15)  # only inside the second window (words 8-19)
    starts, ends, missed = qa_spans.span_labels(w, [answer])
    assert missed == 0
    assert (starts[0], ends[0]) == (w.cls_index[0], w.cls_index[0])
    assert _labelled_text(w, starts, ends, context, 1) == answer[0]


def test_answer_at_the_window_edge(bert_tokenizer):
    context = _context(30)
    w = _windows(bert_tokenizer, context)
    answer = _char_span(context, 10, 11)  # the last two context tokens of the first window
    starts, ends, missed = qa_spans.span_labels(w, [answer])
    assert missed == 0
    assert _labelled_text(w, starts, ends, context, 0) == answer[0]
    assert ends[0] == max(i for i, o in enumerate(w.offsets[0]) if o is not None)


def test_answer_spanning_two_windows_is_in_neither(bert_tokenizer):
    context = _context(30)
    w = _windows(bert_tokenizer, context)
    answer = _char_span(context, 6, 13)  # starts in window 1, ends in window 2, longer than the overlap
    starts, ends, missed = qa_spans.span_labels(w, [answer])
    assert missed == 1
    assert all(s == c and e == c for s, e, c in zip(starts, ends, w.cls_index))


def test_best_answer_comes_back_as_context_text(bert_tokenizer):
    context = _context(30)
    w = _windows(bert_tokenizer, context)
    answer = _char_span(context, 14, 15)
    starts, ends, _ = qa_spans.span_labels(w, [answer])
    width = max(len(ids) for ids in w.input_ids)
    start_logits = np.zeros((len(w.example), width))
    end_logits = np.zeros((len(w.example), width))
    start_logits[1, starts[1]] = end_logits[1, ends[1]] = 5.0
    start_logits[0, 0] = end_logits[0, 0] = 50.0  # the CLS token is never an answer
    assert qa_spans.best_answers(w, start_logits, end_logits, [context], n_best=5, max_answer_length=10) == [answer[0]]
    assert qa_spans.best_answers(w, start_logits, end_logits, [context], n_best=5, max_answer_length=1) != [answer[0]]


# --------------------------------------------------------------------------- end to end


def _extractive_rows(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        context = _context(12 + i % 7)
        word = 2 + i % 5
        text, start = _char_span(context, word, word)
        rows.append({"question": text, "context": context, "answers": {"text": [text], "answer_start": [start]}})
    return rows


def _recipe(model_dir, data, out, mode, **eval_settings):
    # Each mode's own settings only: the other's would be refused as read by nothing.
    extractive = mode in (None, "extractive")
    return {
        "task": "qa",
        "mode": mode,
        "model": {"name_or_path": str(model_dir)},
        "data": {
            "train": str(data["train"]),
            "eval": str(data["eval"]),
            "max_length": 24,
            **({"doc_stride": 8} if extractive else {}),
        },
        "lora": {"r": 4, "alpha": 8},
        "train": {"epochs": 2, "batch_size": 8, "lr": 5e-3, "seed": 0, "precision": "fp32"},
        "eval": {**({} if extractive else {"max_new_tokens": 6}), **eval_settings},
        "output": {"dir": str(out)},
    }


@pytest.mark.parametrize("kind", ["bert", "bart"])
def test_extractive_qa_end_to_end(tiny_models, tmp_path, write_recipe, kind):
    rows = _extractive_rows(40)
    data = {
        "train": write_jsonl(tmp_path / "train.jsonl", rows[:32]),
        "eval": write_jsonl(tmp_path / "eval.jsonl", rows[32:]),
    }
    out = tmp_path / "run"
    result = runner.invoke(app, ["run", str(write_recipe(_recipe(tiny_models[kind], data, out, "extractive")))])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert set(metrics) == {"exact_match", "f1", "eval_loss"}
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 8
    assert all(p["prediction"] == "" or p["prediction"] in p["context"] for p in predictions)
    predicted = runner.invoke(
        app,
        ["predict", str(out), "--input", "-"],
        input=json.dumps({"question": "sun", "context": _context(10)}) + "\n",
    )
    assert predicted.exit_code == 0, predicted.output
    assert json.loads(predicted.stdout)["prediction"] in _context(10)


@pytest.mark.parametrize("kind", ["llama", "bart"])
def test_generative_qa_end_to_end(tiny_models, tmp_path, write_recipe, kind):
    rows = [
        {"question": f"{w} forecast?", "answer": w, **({"context": "rain sun"} if i % 2 else {})}
        for i, w in enumerate(WORDS * 3)
    ]
    data = {
        "train": write_jsonl(tmp_path / "train.jsonl", rows[:24]),
        "eval": write_jsonl(tmp_path / "eval.jsonl", rows[24:]),
    }
    out = tmp_path / "run"
    result = runner.invoke(app, ["run", str(write_recipe(_recipe(tiny_models[kind], data, out, "generative")))])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert {"exact_match", "f1", "eval_loss"} <= set(metrics)
    first = json.loads((out / "predictions.jsonl").read_text().splitlines()[0])
    assert first["answer"] == rows[24]["answer"] and first["prediction"] == first["prediction"].strip()


def test_bad_answer_offsets_name_the_row(tiny_models, tmp_path, write_recipe):
    rows = _extractive_rows(10)
    rows[3]["answers"]["answer_start"] = [1]
    data = {"train": write_jsonl(tmp_path / "train.jsonl", rows), "eval": write_jsonl(tmp_path / "eval.jsonl", rows)}
    result = runner.invoke(
        app, ["run", str(write_recipe(_recipe(tiny_models["bert"], data, tmp_path / "run", "extractive")))]
    )
    assert result.exit_code == 3
    assert "train.jsonl:4" in result.output and "answer_start=1" in result.output  # the file's own line
    # answer_start -1 (an export's "not located") was trained silently as "no answer"; 2.5 was an internal error.
    for start, words in (([-1], "has answer_start -1 (not located"), ([2.5], "must be whole numbers, got 2.5")):
        rows[3]["answers"]["answer_start"] = start
        write_jsonl(tmp_path / "train.jsonl", rows)
        refused = runner.invoke(app, ["run", str(tmp_path / "recipe.yaml"), "--dry-run", "--overwrite"])
        assert refused.exit_code == 3 and "train.jsonl:4" in refused.output and words in refused.output, refused.output
    rows[3]["answers"] = {"text": [""], "answer_start": [-1]}  # "no answer", as some exports write it: accepted
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "eval.jsonl", _extractive_rows(10))
    no_answer = runner.invoke(app, ["run", str(tmp_path / "recipe.yaml"), "--dry-run", "--overwrite"])
    assert no_answer.exit_code == 0, no_answer.output
    rows[3]["answers"] = dict(_extractive_rows(10)[3]["answers"])
    rows[3]["answers"]["answer_start"] = [float(_extractive_rows(10)[3]["answers"]["answer_start"][0])]  # 53.0: 53
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "eval.jsonl", _extractive_rows(10))
    passed = runner.invoke(app, ["run", str(tmp_path / "recipe.yaml"), "--dry-run", "--overwrite"])
    assert passed.exit_code == 0, passed.output


def test_generative_qa_is_refused_on_bert_and_mode_only_for_qa(tiny_models, tmp_path, write_recipe):
    rows = [{"question": "q", "answer": "a"}] * 4
    data = {"train": write_jsonl(tmp_path / "t.jsonl", rows), "eval": write_jsonl(tmp_path / "e.jsonl", rows)}
    refused = runner.invoke(
        app, ["run", str(write_recipe(_recipe(tiny_models["bert"], data, tmp_path / "r", "generative")))]
    )
    assert refused.exit_code == 2 and "encoder-only" in refused.output
    recipe = _recipe(tiny_models["bert"], data, tmp_path / "r", "generative")
    recipe["task"] = "copywriting"
    wrong = runner.invoke(app, ["validate", str(write_recipe(recipe, "wrong.yaml"))])
    assert wrong.exit_code == 2 and "only task qa has modes" in wrong.output


# --------------------------------------------------------------------------- span settings from the data


def test_span_settings_come_from_the_training_answers(bert_tokenizer):
    """Paragraph answers: the answer limit covers the longest, and windows overlap by at least that much."""
    from finetune.flows.resolve import build_recipe
    from finetune.tasks.qa import SQUAD_MAX_ANSWER_TOKENS, span_settings

    def recipe(**data):
        return build_recipe(
            {
                "task": "qa",
                "model": {"name_or_path": "m"},
                "data": {"train": "t.jsonl", "eval": "e.jsonl", "max_length": 128, **data},
            }
        )

    long_answers = [" ".join(WORDS * 8)[: 70 * (i + 1)] for i in range(4)]
    lengths = [len(bert_tokenizer(a, add_special_tokens=False)["input_ids"]) for a in long_answers]
    settings = span_settings(["rain?"], long_answers, bert_tokenizer, recipe())
    assert settings["max_answer_length"] >= max(lengths) > SQUAD_MAX_ANSWER_TOKENS
    assert settings["doc_stride"] >= max(lengths) and settings["doc_stride"] < 128
    assert any("derived from the training answers" in note for note in settings["span_notes"])
    short = span_settings(["rain?"], ["sun", "cold warm"], bert_tokenizer, recipe())
    assert short["max_answer_length"] == SQUAD_MAX_ANSWER_TOKENS  # short answers keep SQuAD's limit
    fixed = span_settings(["rain?"], long_answers, bert_tokenizer, recipe(doc_stride=8))
    assert fixed["doc_stride"] == 8 and any("longer than data.doc_stride=8" in n for n in fixed["span_notes"])


def test_long_answers_that_straddle_windows_are_still_learned(tiny_models, tmp_path, write_recipe, bert_tokenizer):
    """With derived settings every answer lies whole in some window; with SQuAD-style settings some lie in none."""
    rows = []
    for i in range(24):
        context = _context(60 + i % 9)
        text, start = _char_span(context, 32 + i % 5, 46 + i % 5)  # across the first window's end
        rows.append({"question": "sun?", "context": context, "answers": {"text": [text], "answer_start": [start]}})
    data = {
        "train": write_jsonl(tmp_path / "train.jsonl", rows[:20]),
        "eval": write_jsonl(tmp_path / "eval.jsonl", rows[20:]),
    }
    derived = _recipe(tiny_models["bert"], data, tmp_path / "run", "extractive")
    derived["data"] = {**derived["data"], "max_length": 48}
    del derived["data"]["doc_stride"]
    dry = runner.invoke(app, ["run", str(write_recipe(derived)), "--dry-run"], env={"COLUMNS": "400"})
    assert dry.exit_code == 0, dry.output
    assert "derived from the training answers" in dry.output and "fall outside every window" not in dry.output
    squad_like = {**derived, "data": {**derived["data"], "doc_stride": 4}}
    dry = runner.invoke(app, ["run", str(write_recipe(squad_like, "squad.yaml")), "--dry-run"], env={"COLUMNS": "400"})
    assert dry.exit_code == 0 and "fall outside every window" in dry.output


# --------------------------------------------------------------------------- knowledge base


@pytest.mark.parametrize("method", ["bm25", "dense", "hybrid"])
def test_knowledge_base_answering_end_to_end(method, tiny_models, tmp_path, write_recipe, caplog):
    """Rows hold question + answer; contexts come from retrieved passages; recall and passage ids are reported."""
    passages, rows = [], []
    for i in range(30):
        words = [WORDS[(i + j) % len(WORDS)] for j in range(8)]
        code = f"code{i:02d}"
        passages.append({"id": f"p{i}", "title": f"topic {i}", "text": f"{code} " + " ".join(words)})
        rows.append({"question": f"{code} which word?", "answer": words[3]})
    base = write_jsonl(tmp_path / "passages.jsonl", passages)
    data = {
        "train": write_jsonl(tmp_path / "train.jsonl", rows[:24]),
        "eval": write_jsonl(tmp_path / "eval.jsonl", rows[24:]),
    }
    recipe = _recipe(tiny_models["bert"], data, tmp_path / "run", "extractive")
    recipe["data"].update(
        knowledge_base=str(base),
        retrieval={"method": method, "top_k": 3, **({} if method == "bm25" else {"model": str(tiny_models["bert"])})},
        max_length=48,
    )
    del recipe["data"]["doc_stride"]
    result = runner.invoke(app, ["run", str(write_recipe(recipe))])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())["metrics"]
    assert 0.0 <= metrics["retrieval_recall@k"] <= 1.0 and "f1" in metrics
    predictions = [json.loads(line) for line in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()]
    assert all(len(p["passage_ids"]) == 3 and set(p["passage_ids"]) <= {q["id"] for q in passages} for p in predictions)
    recall = sum(p["retrieved_gold"] for p in predictions) / len(predictions)
    assert metrics["retrieval_recall@k"] == pytest.approx(recall)
    if method == "bm25":  # the exact code word in the question: BM25 finds its passage
        assert recall == 1.0
    answered = runner.invoke(
        app,
        ["predict", str(tmp_path / "run"), "--input", "-"],
        input=json.dumps({"id": "q1", "question": "code05 which word?"}) + "\n",
    )
    assert answered.exit_code == 0, answered.output
    row = json.loads(answered.stdout)
    assert row["id"] == "q1" and len(row["passage_ids"]) == 3 and row["prediction"] in row["context"]
    if method != "bm25":
        return
    # An empty question (it would retrieve anything and be answered confidently) or an empty answer (every passage
    # "holds" it): refused by predict, and by validate as by run, at the row.
    blank = runner.invoke(app, ["predict", str(tmp_path / "run"), "--input", "-"], input='{"question": " "}\n')
    assert blank.exit_code == 3 and "stdin:1: field 'question' must be non-empty text" in blank.output
    rows[3]["answer"] = ""
    recipe["data"]["train"] = str(write_jsonl(tmp_path / "empty.jsonl", rows[:24]))
    recipe["output"]["dir"] = str(tmp_path / "run2")
    path = write_recipe(recipe)
    for command in (["validate", str(path)], ["run", str(path), "--dry-run"]):
        refused = runner.invoke(app, command)
        assert refused.exit_code == 3 and "empty.jsonl:4: field 'answer' must be non-empty text" in " ".join(
            refused.output.split()
        ), refused.output
    # Rows carrying their own context (SQuAD rows given a knowledge base): retrieval replaces it, and says so.
    own = [{**r, "context": "own"} for r in rows[:3] + rows[4:24]]
    recipe["data"]["train"] = str(write_jsonl(tmp_path / "own.jsonl", own))
    with caplog.at_level("WARNING", logger="finetune"):
        result = runner.invoke(app, ["run", str(write_recipe(recipe)), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert any("the rows carry their own 'context'" in r.getMessage() for r in caplog.records)


def test_answer_from_first_reads_the_answer_from_the_top_passage(tiny_models):
    """data.retrieval.answer_from first: the reader's best span inside the highest-ranked passage, even where a
    span in a passage below it scores higher; `any` takes that higher one. Passage ranges come from the rows."""
    from datasets import Dataset

    from finetune.data.retrieval import PASSAGE_SEPARATOR, Passage, attach_passages
    from finetune.recipe.schema import RetrievalSection

    tokenizer = load_tokenizer(str(tiny_models["bert"]), "bert")
    first, second = "the cat sat on the mat", "a dog ran in the park"
    passages = [Passage("p1", first), Passage("p2", second)]

    class Ranked:  # the retriever's order: p1, then p2
        settings = RetrievalSection(top_k=2)

        def __init__(self):
            self.passages = passages

        def search(self, questions, k=None):
            return [[0, 1] for _ in questions]

    rows = attach_passages(
        Dataset.from_list([{"question": "where?", "answer": "mat"}]),
        Ranked(),
        extractive=True,
        training=False,
        split="data.eval",
    )
    context = rows["context"][0]
    assert context == first + PASSAGE_SEPARATOR + second
    assert [context[a:b] for a, b in rows["passage_spans"][0]] == [first, second]
    w = qa_spans.windows(["where?"], [context], tokenizer, 64, 16, "data.eval")
    tokens = [i for i, o in enumerate(w.offsets[0]) if o is not None]
    in_first = next(i for i in tokens if w.offsets[0][i][1] <= len(first))
    in_second = next(i for i in tokens if w.offsets[0][i][0] >= len(first) + len(PASSAGE_SEPARATOR))
    start, end = np.zeros((1, len(w.input_ids[0]))), np.zeros((1, len(w.input_ids[0])))
    start[0, in_second] = end[0, in_second] = 5.0  # the best span: in the second passage
    start[0, in_first] = end[0, in_first] = 3.0
    anywhere = qa_spans.best_answers(w, start, end, [context], n_best=5, max_answer_length=4)
    top = qa_spans.best_answers(
        w, start, end, [context], n_best=5, max_answer_length=4, within=[tuple(rows["passage_spans"][0][0])]
    )
    assert anywhere[0] and anywhere[0] in second and top[0] and top[0] in first
    # The n best are counted inside the passage: with n_best 1 the second passage's token must not crowd it out.
    only_one = qa_spans.best_answers(
        w, start, end, [context], n_best=1, max_answer_length=4, within=[tuple(rows["passage_spans"][0][0])]
    )
    assert only_one == top


def test_an_overlap_as_wide_as_the_window_is_refused_naming_it(tiny_models, tmp_path, write_recipe):
    """data.doc_stride above the context's room in a window made the tokenizer panic (a Rust backtrace, exit 1)."""
    rows = _extractive_rows(20)
    data = {"train": write_jsonl(tmp_path / "t.jsonl", rows[:16]), "eval": write_jsonl(tmp_path / "e.jsonl", rows[16:])}
    recipe = _recipe(tiny_models["bert"], data, tmp_path / "run", "extractive")
    recipe["data"]["doc_stride"] = 22  # below max_length 24, above what the question leaves of it
    result = runner.invoke(app, ["run", str(write_recipe(recipe)), "--dry-run", "--no-estimate"])
    assert result.exit_code == 3, result.output
    text = " ".join(result.output.split())
    assert (
        "data.doc_stride 22 (the recipe's, or derived from the training rows) must be below the context's room" in text
    )
    assert "t.jsonl:1: " in text or "t.jsonl:" in text  # the row of the longest question, at its file and line


@pytest.mark.unit
def test_generative_qa_reads_a_prompt_column_only_where_the_recipe_makes_or_maps_one():
    """A file's own `prompt` column took the question's place in training and predict, silently."""
    from finetune.recipe.schema import Recipe
    from finetune.tasks.qa import GenerativeQATask

    def fields(**data):
        recipe = Recipe.model_validate(
            {"task": "qa", "mode": "generative", "model": {"name_or_path": "x"}, "data": {"train": "a", **data}}
        )
        return GenerativeQATask().fields(recipe)

    assert fields() == (("question", "answer"), ("context", "id"))
    assert "prompt" in fields(template="Q: {question}")[1]
    assert "prompt" in fields(columns={"prompt": "instruction"})[1]


def test_training_rows_without_an_answer_let_the_model_abstain(bert_tokenizer):
    from datasets import Dataset

    from finetune.recipe.schema import Recipe
    from finetune.tasks.qa import ExtractiveQATask

    recipe = Recipe.model_validate(
        {"task": "qa", "mode": "extractive", "model": {"name_or_path": "x"}, "data": {"train": "a"}}
    )
    rows = {
        "question": ["which?", "what?"],
        "context": ["rain falls", "sun shines"],
        "answers": [{"text": ["rain"], "answer_start": [0]}, {"text": [], "answer_start": []}],
    }
    assert ExtractiveQATask().fit_state(Dataset.from_dict(rows), recipe, bert_tokenizer)["abstains"] is True
    answered = {k: v[:1] for k, v in rows.items()}
    assert "abstains" not in ExtractiveQATask().fit_state(Dataset.from_dict(answered), recipe, bert_tokenizer)
