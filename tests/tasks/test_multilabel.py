"""Several labels per text, thresholds, and class weights (classification), on tiny models built from config."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import WORDS, classification_recipe, corpus, write_jsonl
from helpers import invoke

from finetune.recipe.schema import Recipe, build_recipe
from finetune.tasks.classification import (
    ClassificationTask,
    classification_loss,
    loss_weights,
    tune_thresholds,
)

TOPICS = list(WORDS)


def multilabel_rows(n: int, seed: int = 0) -> list[dict]:
    """Texts mixing the words of 0 to 2 topics; `labels` lists the topics present (sorted)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        count = (0, 1, 1, 2)[i % 4]
        topics = sorted(rng.sample(TOPICS, count))
        words = [rng.choice(WORDS[t].split()) for t in topics for _ in range(rng.randint(3, 6))]
        rng.shuffle(words)
        rows.append({"text": " ".join(words) or "hello there", "labels": topics})
    return rows


@pytest.fixture()
def multilabel_data(tmp_path) -> dict[str, Path]:
    rows = multilabel_rows(160)
    return {
        "train": write_jsonl(tmp_path / "ml" / "train.jsonl", rows[:120]),
        "eval": write_jsonl(tmp_path / "ml" / "eval.jsonl", rows[120:]),
    }


def multilabel_recipe(model_dir: Path, data: dict[str, Path], out: Path, **train) -> dict:
    recipe = classification_recipe(model_dir, data, out, **{"epochs": 3, **train})
    recipe["data"]["columns"] = {"label": "labels"}
    return recipe


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def sklearn_metrics(rows: list[dict]) -> dict[str, float]:
    """The multi-label metrics computed here, independently, with scikit-learn."""
    from sklearn.metrics import accuracy_score, f1_score, hamming_loss
    from sklearn.preprocessing import MultiLabelBinarizer

    binarizer = MultiLabelBinarizer().fit([r["label"] for r in rows] + [r["prediction"] for r in rows])
    gold, said = binarizer.transform([r["label"] for r in rows]), binarizer.transform([r["prediction"] for r in rows])
    return {
        "micro_f1": f1_score(gold, said, average="micro", zero_division=0),
        "macro_f1": f1_score(gold, said, average="macro", zero_division=0),
        "weighted_f1": f1_score(gold, said, average="weighted", zero_division=0),
        "subset_accuracy": accuracy_score(gold, said),
        "hamming_loss": hamming_loss(gold, said),
    }


def chosen_by_thresholds(row: dict, thresholds: dict[str, float]) -> list[str]:
    return sorted(label for label, score in row["scores"].items() if score >= thresholds[label])


# --------------------------------------------------------------------------- end to end


def test_multilabel_run_eval_and_predict_share_the_tuned_thresholds(
    tiny_models, multilabel_data, write_recipe, tmp_path
):
    out = tmp_path / "run"
    recipe = write_recipe(multilabel_recipe(tiny_models["bert"], multilabel_data, out))
    result = invoke("run", recipe)
    assert result.exit_code == 0, result.output

    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["metrics"]) == {
        "micro_f1",
        "macro_f1",
        "weighted_f1",
        "subset_accuracy",
        "hamming_loss",
        "eval_loss",
    }
    rows = read_jsonl(out / "predictions.jsonl")
    assert len(rows) == 40
    assert all(isinstance(r["label"], list) and isinstance(r["prediction"], list) for r in rows)
    assert set(rows[0]["scores"]) == set(TOPICS) and all(0 <= s <= 1 for s in rows[0]["scores"].values())
    assert any(r["label"] == [] for r in rows)  # a text with no labels is allowed
    # The metrics equal scikit-learn's on predictions.jsonl, computed independently here.
    for name, value in sklearn_metrics(rows).items():
        assert metrics["metrics"][name] == pytest.approx(value), name
    per_label = metrics["details"]["per_label"]
    assert set(per_label) <= set(TOPICS) and all(
        {"precision", "recall", "f1", "support"} <= set(v) for v in per_label.values()
    )

    # Thresholds: tuned on the eval split, saved beside the adapter, and the ones the predictions used.
    saved = json.loads((out / "adapter" / "thresholds.json").read_text())
    assert saved["chosen"].startswith("tuned") and set(saved["thresholds"]) == set(TOPICS)
    thresholds = saved["thresholds"]
    assert all(0 <= t <= 1 for t in thresholds.values())
    assert all(sorted(r["prediction"]) == chosen_by_thresholds(r, thresholds) for r in rows)
    meta = json.loads((out / "adapter" / "finetune.json").read_text())
    assert meta["state"]["multi_label"] is True and meta["state"]["labels"] == sorted(TOPICS)
    config = json.loads((out / "adapter" / "base" / "config.json").read_text())
    assert config["problem_type"] == "multi_label_classification"

    # eval of the run reads the saved thresholds: the same predictions and metrics, not re-tuned ones.
    evaluated = invoke("eval", out, "--json")
    assert evaluated.exit_code == 0, evaluated.output
    again = json.loads(evaluated.output)["metrics"]
    assert {k: v for k, v in again.items() if k != "eval_loss"} == pytest.approx(
        {k: v for k, v in metrics["metrics"].items() if k != "eval_loss"}
    )
    (evals,) = (out / "evals").iterdir()
    assert [r["prediction"] for r in read_jsonl(evals / "predictions.jsonl")] == [r["prediction"] for r in rows]

    # A different threshold file changes eval's decisions: eval reads it (not the recipe, not a re-tuning).
    (out / "adapter" / "thresholds.json").write_text(
        json.dumps({"thresholds": dict.fromkeys(TOPICS, 0.0), "chosen": "test"})
    )
    everything = invoke("eval", out, "--json")
    assert everything.exit_code == 0, everything.output
    assert json.loads(everything.output)["metrics"]["hamming_loss"] == pytest.approx(
        np.mean([[t not in r["label"] for t in TOPICS] for r in rows])
    )
    (out / "adapter" / "thresholds.json").write_text(json.dumps(saved))

    # predict returns every label's score and the chosen set, by the same thresholds.
    lines = "".join(json.dumps({"text": r["text"]}) + "\n" for r in rows[:8])
    predicted = invoke("predict", out, "--input", "-", input=lines)
    assert predicted.exit_code == 0, predicted.output
    answers = [json.loads(line) for line in predicted.output.splitlines()]
    assert [a["prediction"] for a in answers] == [r["prediction"] for r in rows[:8]]
    assert all(sorted(a["prediction"]) == chosen_by_thresholds(a, thresholds) for a in answers)

    # A merged checkpoint keeps the thresholds and the sigmoid head's problem type.
    merged = tmp_path / "merged"
    assert invoke("merge", out, "--output", merged).exit_code == 0
    assert json.loads((merged / "thresholds.json").read_text()) == saved
    assert json.loads((merged / "config.json").read_text())["problem_type"] == "multi_label_classification"

    # Metrics are a pure function of predictions.jsonl.
    rescored = invoke("eval", "--predictions", out / "predictions.jsonl", "--task", "classification", "--json")
    assert rescored.exit_code == 0, rescored.output
    rescored_metrics = json.loads(rescored.output)["metrics"]
    assert rescored_metrics == pytest.approx({k: v for k, v in metrics["metrics"].items() if k != "eval_loss"})


@pytest.mark.parametrize("kind", ["bart", "gpt2"])
def test_multilabel_trains_on_every_family(kind, tiny_models, multilabel_data, write_recipe, tmp_path):
    out = tmp_path / "run"
    recipe = multilabel_recipe(tiny_models[kind], multilabel_data, out, epochs=1)
    result = invoke("run", write_recipe(recipe))
    assert result.exit_code == 0, result.output
    rows = read_jsonl(out / "predictions.jsonl")
    thresholds = json.loads((out / "adapter" / "thresholds.json").read_text())["thresholds"]
    assert all(sorted(r["prediction"]) == chosen_by_thresholds(r, thresholds) for r in rows)
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert metrics["macro_f1"] == pytest.approx(sklearn_metrics(rows)["macro_f1"])


def test_separated_labels_fixed_threshold_and_evaluation_during_training(tiny_models, write_recipe, tmp_path):
    source = multilabel_rows(100, seed=1)
    rows = [{"text": r["text"], "tags": " ; ".join(r["labels"])} for r in source]
    data = {"train": write_jsonl(tmp_path / "t.jsonl", rows[:80]), "eval": write_jsonl(tmp_path / "e.jsonl", rows[80:])}
    out = tmp_path / "run"
    recipe = classification_recipe(tiny_models["bert"], data, out)
    recipe["data"].update(columns={"label": "tags"}, label_separator=";")
    recipe["eval"] = {"threshold": 0.4, "every": "epoch", "keep": "best", "gates": {"hamming_loss": "<=1"}}
    result = invoke("run", write_recipe(recipe))
    assert result.exit_code == 0, result.output
    predictions = read_jsonl(out / "predictions.jsonl")
    # The reference is the separated text split into a list; an empty text is no label.
    assert [p["label"] for p in predictions] == [r["labels"] for r in source[80:]]
    saved = json.loads((out / "adapter" / "thresholds.json").read_text())
    assert saved == {"thresholds": dict.fromkeys(TOPICS, 0.4), "chosen": "eval.threshold 0.4"}
    assert all(sorted(p["prediction"]) == chosen_by_thresholds(p, saved["thresholds"]) for p in predictions)
    document = json.loads((out / "metrics.json").read_text())
    assert document["gates"]["hamming_loss<=1"]["passed"]
    # Evaluations during training report the multi-label metrics, and macro_f1 decides the best weights.
    history = document["evaluation"]["history"]
    assert len(history) == 2 and all("macro_f1" in entry["metrics"] for entry in history)
    assert document["evaluation"]["best_step"] is not None


# --------------------------------------------------------------------------- refusals


def test_refusals_with_their_exit_codes(tiny_models, multilabel_data, topic_data, write_recipe, tmp_path):
    def run(recipe: dict, *args):
        return invoke("run", write_recipe(recipe, f"r{random.random()}.yaml"), *args)

    multi = multilabel_recipe(tiny_models["bert"], multilabel_data, tmp_path / "run")
    single = classification_recipe(tiny_models["bert"], topic_data, tmp_path / "run")

    # A threshold outside [0, 1]: a recipe error, at validate as at run.
    for value in ("1.5", "-0.1", "maybe"):
        result = run(multi, f"eval.threshold={value}")
        assert result.exit_code == 2 and "eval.threshold" in result.output, result.output
    assert invoke("validate", write_recipe({**multi, "eval": {"threshold": 2}})).exit_code == 2

    # Settings of the other mode, known from the recipe (validate) or from the data (run, before training).
    result = invoke(
        "validate",
        write_recipe({**single, "data": {**single["data"], "multi_label": False}, "eval": {"threshold": 0.3}}),
    )
    assert result.exit_code == 2 and "eval.threshold: applies to multi-label classification only" in result.output
    result = run(single, "eval.threshold=0.3")
    assert result.exit_code == 2 and "eval.threshold: applies to multi-label" in result.output
    result = run(multi, "eval.gates={accuracy: '>=0.5'}")
    assert result.exit_code == 2 and "eval.gates.accuracy: accuracy is not reported" in result.output
    assert "subset_accuracy" in result.output and not (tmp_path / "run" / "train_log.jsonl").exists()
    result = run(single, "eval.best_metric=hamming_loss", "eval.every=epoch")
    assert result.exit_code == 2 and "eval.best_metric: hamming_loss is not reported" in result.output
    result = run(multi, "data.label_separator=;", "data.multi_label=false")
    assert result.exit_code == 2 and "data.label_separator" in result.output

    # Classification's settings on another task.
    copy = {**single, "task": "copywriting", "data": {**single["data"], "columns": {}, "label_separator": ","}}
    result = invoke("validate", write_recipe(copy))
    assert result.exit_code == 2 and "data.label_separator: a classification setting" in result.output

    # A label at eval the training data never had: a data error naming the row.
    unseen = write_jsonl(tmp_path / "unseen.jsonl", [{"text": "rain goal", "labels": ["weather", "politics"]}])
    result = run({**multi, "data": {**multi["data"], "eval": str(unseen)}})
    assert result.exit_code == 3 and "1: label 'politics' is not one of the 3 training labels" in result.output

    # A missing label is not an empty list.
    missing = write_jsonl(
        tmp_path / "missing.jsonl", [{"text": "rain", "labels": ["weather"]}, {"text": "goal", "labels": None}]
    )
    result = run({**multi, "data": {**multi["data"], "train": str(missing)}})
    assert result.exit_code == 3 and "2: label is missing" in result.output


def test_a_list_label_in_a_single_label_recipe_is_a_data_error(tiny_models, multilabel_data, write_recipe, tmp_path):
    recipe = multilabel_recipe(tiny_models["bert"], multilabel_data, tmp_path / "run")
    result = invoke("run", write_recipe(recipe), "data.multi_label=false")
    assert result.exit_code == 3, result.output
    assert "data.train" in result.output and "Traceback" not in result.output


# --------------------------------------------------------------------------- class weights


def test_class_weights_change_the_training_loss(tiny_models, write_recipe, tmp_path):
    """An imbalanced single-label set: auto weighs the loss (the hook is live under peft and accelerate), none
    does not; the weights come from the recipe, not from the cached data."""
    rows = [r for r in corpus(300) if r["label"] != "cooking" or random.Random(r["text"]).random() < 0.15]
    data = {
        "train": write_jsonl(tmp_path / "t.jsonl", rows[:160]),
        "eval": write_jsonl(tmp_path / "e.jsonl", rows[160:]),
    }

    def first_loss(name: str, choice: str) -> float:
        out = tmp_path / name
        recipe = classification_recipe(tiny_models["bert"], data, out, epochs=1, log_every=1, class_weights=choice)
        result = invoke("run", write_recipe(recipe, f"{name}.yaml"))
        assert result.exit_code == 0, result.output
        return read_jsonl(out / "train_log.jsonl")[0]["loss"]

    weighted, plain, again = first_loss("auto", "auto"), first_loss("none", "none"), first_loss("auto2", "auto")
    assert weighted != plain and weighted == again
    meta = json.loads((tmp_path / "auto" / "adapter" / "finetune.json").read_text())
    counts = meta["state"]["label_counts"]
    assert max(counts) / min(counts) >= 4 and sum(counts) == meta["state"]["rows"] == 160


def model_for(num_labels: int, multi: bool):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=50,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        num_labels=num_labels,
        problem_type="multi_label_classification" if multi else None,
    )
    return BertForSequenceClassification(config).eval()


@pytest.mark.parametrize("multi", [False, True])
def test_the_loss_hook_computes_the_weighted_loss(multi):
    task, model = ClassificationTask(), model_for(3, multi)
    state = {"labels": ["a", "b", "c"], "multi_label": multi, "label_counts": [40, 8, 2], "rows": 50}
    recipe = build_recipe(
        {
            "task": "classification",
            "model": {"name_or_path": "x"},
            "data": {"train": "t.jsonl"},
            "train": {"class_weights": "inverse"},
        }
    )
    inputs = {
        "input_ids": torch.tensor([[1, 5, 7, 2], [1, 9, 2, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]),
    }
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]) if multi else torch.tensor([2, 1])
    plain = model(**inputs, labels=labels)
    task.set_loss(model, recipe, state)
    weighted = model(**inputs, labels=labels)
    weights = torch.tensor(loss_weights(state, "inverse"))
    if multi:
        expected = torch.nn.functional.binary_cross_entropy_with_logits(plain.logits, labels, pos_weight=weights)
        assert weights.tolist() == pytest.approx([10 / 40, 42 / 8, 48 / 2])
    else:
        expected = torch.nn.functional.cross_entropy(plain.logits, labels, weight=weights)
        assert weights.tolist() == pytest.approx([1, 5, 20])
    assert weighted.loss.item() == pytest.approx(expected.item())
    assert weighted.loss.item() != pytest.approx(plain.loss.item())
    assert classification_loss(plain.logits, labels, multi, weights).item() == pytest.approx(expected.item())


@pytest.mark.unit
def test_class_weight_choices():
    state = {"labels": ["a", "b", "c"], "multi_label": False, "label_counts": [100, 25, 4], "rows": 129}
    assert loss_weights(state, "none") is None
    assert loss_weights(state, "inverse") == pytest.approx([1, 4, 25])
    assert loss_weights(state, "inverse_sqrt") == pytest.approx([1, 2, 5])
    assert loss_weights(state, "auto") == loss_weights(state, "inverse_sqrt")  # 25x >= 4x
    balanced = {**state, "label_counts": [40, 45, 43]}
    assert loss_weights(balanced, "auto") is None and loss_weights(balanced, "inverse") is not None
    assert loss_weights({"labels": ["a", "b"]}, "auto") is None  # an adapter from before class weights
    unseen = {**state, "label_counts": [100, 25, 0]}  # a data.labels class with no training row: the largest weight
    assert loss_weights(unseen, "inverse") == pytest.approx([1, 4, 4])


# --------------------------------------------------------------------------- thresholds and metrics


@pytest.mark.unit
def test_tuned_thresholds_maximise_each_labels_f1():
    """Within 1 / positives of the best F1 any cut through the scores reaches, nearest 0.5."""
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(0)
    for _ in range(100):
        rows = int(rng.integers(1, 40))
        truth = rng.random((rows, 4)) < 0.3
        scores = np.round(np.clip(truth * 0.3 + rng.random((rows, 4)) * 0.7, 0, 1), 3)
        thresholds = tune_thresholds(scores, truth)
        for j in range(4):
            if not truth[:, j].any():
                assert thresholds[j] == 0.5  # nothing to tune on
                continue
            f1 = {t: f1_score(truth[:, j], scores[:, j] >= t, zero_division=0) for t in [*np.unique(scores[:, j]), 1.1]}
            best, positives = max(f1.values()), truth[:, j].sum()
            got = f1_score(truth[:, j], scores[:, j] >= thresholds[j], zero_division=0)
            assert got >= best - 1 / positives - 1e-9 and 0 <= thresholds[j] <= 1
            if f1_score(truth[:, j], scores[:, j] >= 0.5, zero_division=0) >= best - 1 / positives - 1e-9:
                assert thresholds[j] == 0.5  # the default when it is as good
    # Where the scores of the positives sit below 0.5, the threshold moves to the middle of the gap.
    truth = np.array([[1], [1], [1], [1], [0], [0], [0], [0]], bool)
    assert tune_thresholds(np.array([[0.4], [0.35], [0.3], [0.3], [0.1], [0.1], [0.05], [0.02]]), truth)[0] == 0.2
    assert tune_thresholds(np.array([[0.9], [0.8], [0.7], [0.6], [0.2], [0.1], [0.1], [0.0]]), truth)[0] == 0.5


@pytest.mark.unit
def test_multilabel_metrics_equal_sklearns():
    from sklearn.metrics import precision_recall_fscore_support
    from sklearn.preprocessing import MultiLabelBinarizer

    rng = random.Random(3)
    labels = ["a", "b", "c", "d"]
    rows = [
        {
            "label": sorted(rng.sample(labels, rng.randint(0, 3))),
            "prediction": sorted(rng.sample(labels, rng.randint(0, 3))),
        }
        for _ in range(50)
    ]
    scored = ClassificationTask().compute_metrics(rows)
    assert scored["metrics"] == pytest.approx(sklearn_metrics(rows))
    binarizer = MultiLabelBinarizer(classes=labels).fit([])
    p, r, f, s = precision_recall_fscore_support(
        binarizer.transform([x["label"] for x in rows]),
        binarizer.transform([x["prediction"] for x in rows]),
        zero_division=0,
    )
    for i, label in enumerate(labels):
        assert scored["details"]["per_label"][label] == pytest.approx(
            {"precision": p[i], "recall": r[i], "f1": f[i], "support": s[i]}
        )
    # Integer labels compare as text, like single-label classification's; no label anywhere is all correct.
    assert ClassificationTask().compute_metrics([{"label": [1], "prediction": ["1"]}])["metrics"]["micro_f1"] == 1.0
    empty = ClassificationTask().compute_metrics([{"label": [], "prediction": []}])["metrics"]
    assert empty["subset_accuracy"] == 1.0 and empty["hamming_loss"] == 0.0


@pytest.mark.unit
def test_multilabel_recipe_keys_and_their_defaults():
    recipe = Recipe.model_validate({"task": "classification", "model": {"name_or_path": "x"}, "data": {"train": "a"}})
    assert recipe.eval.threshold == "tune" and recipe.train.class_weights == "auto"
    assert recipe.data.multi_label is None and recipe.data.label_separator is None
    assert ClassificationTask().main_metric(recipe.eval) == "macro_f1"
    assert ClassificationTask().knows_metric("hamming_loss") and ClassificationTask().knows_metric("subset_accuracy")


def test_eval_rows_without_any_label_are_said_before_training(tiny_models, write_recipe, tmp_path, caplog):
    """F1 is 0/0 on such rows and reported 0 (scikit-learn's zero_division): a model right on every row scored F1 0
    without a word, and failed an F1 gate."""
    rows = multilabel_rows(80)
    data = {
        "train": write_jsonl(tmp_path / "train.jsonl", rows[:60]),
        "eval": write_jsonl(tmp_path / "eval.jsonl", [{**row, "labels": []} for row in rows[60:]]),
    }
    recipe = multilabel_recipe(tiny_models["bert"], data, tmp_path / "run")
    recipe["data"]["multi_label"] = True
    with caplog.at_level("WARNING", logger="finetune"):
        result = invoke("run", write_recipe(recipe), "--dry-run", "--no-estimate")
    assert result.exit_code == 0, result.output
    assert any("no eval row carries a label" in r.getMessage() for r in caplog.records)


@pytest.mark.unit
def test_spaces_around_a_label_are_formatting_not_another_class():
    """ "sports " (a CSV cell's trailing space) was a class of its own in a label list; the separator path stripped."""
    from datasets import Dataset

    task = ClassificationTask()
    recipe = Recipe.model_validate({"task": "classification", "model": {"name_or_path": "x"}, "data": {"train": "a"}})
    lists = Dataset.from_dict({"text": ["a", "b", "c"], "label": [["sports "], ["sports", "tech"], [" tech"]]})
    state = task.fit_state(lists, recipe)
    assert state["labels"] == ["sports", "tech"] and state["label_counts"] == [2, 2]
    assert task.label_codes([[" sports"], ["tech "]], state, recipe, "data.eval") == [[1, 0], [0, 1]]
    single = Dataset.from_dict({"text": ["a", "b", "c"], "label": ["sports ", "sports", "tech"]})
    state = task.fit_state(single, recipe)
    assert state["labels"] == ["sports", "tech"] and state["label_counts"] == [2, 1]
    assert task.label_codes(["tech  ", "sports"], state, recipe, "data.eval") == [1, 0]
    composed = Dataset.from_dict({"text": ["a", "b", "c"], "label": ["caf\u00e9", "cafe\u0301", "tea"]})
    state = task.fit_state(composed, recipe)  # one word typed two ways: one class, not two that look alike
    assert state["labels"] == ["caf\u00e9", "tea"] and state["label_counts"] == [2, 1]


@pytest.mark.unit
def test_a_gate_on_a_metric_eval_metrics_leaves_out_is_refused_before_anything_runs():
    """It validated, trained in full, then failed as "missing" (exit 4); eval --gate likewise after evaluating."""
    recipe = Recipe.model_validate(
        {
            "task": "classification",
            "model": {"name_or_path": "x"},
            "data": {"train": "a"},
            "eval": {"metrics": ["accuracy"], "gates": {"macro_f1": ">=0.1"}, "best_metric": "weighted_f1"},
        }
    )
    unavailable = ClassificationTask().unavailable_metrics(recipe, asked=["eval_loss", "accuracy"])
    assert {"macro_f1", "weighted_f1", "eval_loss"} <= set(unavailable) and "accuracy" not in unavailable
    assert "eval.metrics (accuracy) leaves it out" in unavailable["macro_f1"]


def test_labels_written_as_json_lists_in_a_csv_are_named_as_such(tiny_models, tmp_path, write_recipe):
    """A CSV's cells hold text: `["billing", "refund"]` was read as one class name, and the first eval row with a
    real list was refused as if it were the wrong one."""
    from helpers import invoke

    rows = [{"text": f"ticket {i}", "labels": '["billing", "refund"]' if i % 2 else '["login"]'} for i in range(12)]
    train = tmp_path / "train.csv"
    train.write_text(
        "text,labels\n" + "".join(f'{r["text"]},"{r["labels"].replace(chr(34), chr(34) * 2)}"\n' for r in rows)
    )
    recipe = {
        "task": "classification",
        "model": {"name_or_path": str(tiny_models["bert"])},
        "data": {"train": str(train), "eval_split": 0.25, "columns": {"label": "labels"}, "max_length": 32},
        "output": {"dir": str(tmp_path / "run")},
    }
    refused = invoke("validate", write_recipe(recipe))
    assert refused.exit_code == 3 and "every label is a JSON list written as text" in refused.output, refused.output
