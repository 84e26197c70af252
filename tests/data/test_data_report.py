"""The data report: planted duplicates and near-duplicates are found, data.on_overlap acts on them, and a
generation task shows which tokens its loss counts."""

from __future__ import annotations

import json

import pyarrow as pa
from conftest import classification_recipe, corpus, write_jsonl
from typer.testing import CliRunner

from finetune.cli import app
from finetune.data.report import find_overlap
from tests.tasks.test_generation import copy_rows, generation_recipe

runner = CliRunner()


def planted(tmp_path):
    """Training rows with 2 exact copies of eval rows, 2 near copies (a word changed), and 1 duplicate inside."""
    rows = [{"text": f"{r['text']} {i}", "label": r["label"]} for i, r in enumerate(corpus(120))]
    eval_rows = [
        {"text": f"unique eval sentence number {i} about storms and goals and ovens", "label": rows[i]["label"]}
        for i in range(10)
    ]
    long = "the match ended with a late goal by the home team after a long rain delay in the cold"
    train = rows + [
        dict(eval_rows[0]),
        {"text": eval_rows[1]["text"].upper() + "!", "label": "sports"},
        {"text": long, "label": "sports"},
        {"text": long.replace("cold", "wind"), "label": "sports"},
        dict(rows[5]),
    ]
    eval_rows += [{"text": long.replace("cold", "snow"), "label": "sports"}]
    return {
        "train": write_jsonl(tmp_path / "train.jsonl", train),
        "eval": write_jsonl(tmp_path / "eval.jsonl", eval_rows),
    }


def test_overlap_finds_exact_and_near_duplicates():
    first = ["The cat sat on the mat today in the sun", "a b c d e f g", "completely different words here now"]
    second = ["the cat sat on the mat today in the sun!", "a b c d e f x", "nothing alike at all anywhere"]
    overlap = find_overlap(pa.chunked_array([first]), pa.chunked_array([second]))
    assert overlap.exact == [(0, 0)]
    assert overlap.rows_of_second() == {0} | {j for _, j in overlap.near}
    inside = find_overlap(pa.chunked_array([["one two three four five six", "x y z", "one two Three four, five six"]]))
    assert inside.exact == [(0, 2)]


def test_duplicates_in_any_script_and_spacing():
    """Combining marks were deleted, so Hindi sentences one vowel sign apart (रहा / रही) were exact duplicates
    (on_overlap: drop removed them); a copy spaced with no-break spaces, or in decomposed form, was not one."""
    train = ["वह घर जा रहा है", "किताब अच्छा है", "Reset your password from the login page", "Café au lait"]
    evals = [
        "वह घर जा रही है",
        "किताब अच्छी है",
        "Reset\u00a0your\u00a0password from the login page",
        "Cafe\u0301 au lait",
    ]
    overlap = find_overlap(pa.chunked_array([train]), pa.chunked_array([evals]))
    assert overlap.exact == [(2, 2), (3, 3)]


def test_data_report_and_on_overlap(tiny_models, write_recipe, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = planted(tmp_path)
    recipe = classification_recipe(tiny_models["bert"], data, tmp_path / "run")
    result = runner.invoke(app, ["data", str(write_recipe(recipe)), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    # --json prints the report: no file unless --output asks (a second identical run was refused by the first's).
    assert not (tmp_path / "data_report.json").exists()
    again = runner.invoke(app, ["data", str(tmp_path / "recipe.yaml"), "--json"])
    assert again.exit_code == 0 and json.loads(again.stdout) == report
    assert runner.invoke(app, ["data", str(tmp_path / "recipe.yaml")]).exit_code == 0
    assert json.loads((tmp_path / "data_report.json").read_text())["train_eval_overlap"] == report["train_eval_overlap"]
    overlap = report["train_eval_overlap"]
    assert overlap["exact"] == 2 and overlap["near"] == 1
    assert report["train_duplicates"]["exact"] >= 1 and report["train_duplicates"]["near"] >= 1
    assert set(report["label_balance"]["train"]["counts"]) == {"sports", "weather", "cooking"}
    again = runner.invoke(app, ["data", str(write_recipe(recipe))])
    assert again.exit_code == 2 and "holds an earlier data report" in again.output  # the earlier report is kept

    recipe["data"]["on_overlap"] = "error"
    refused = runner.invoke(app, ["run", str(write_recipe(recipe, "strict.yaml"))])
    assert refused.exit_code == 3 and "3 eval row(s) also appear in data.train" in refused.output
    recipe["data"]["on_overlap"] = "drop"
    recipe["train"]["epochs"] = 1
    dropped = runner.invoke(app, ["run", str(write_recipe(recipe, "drop.yaml"))])
    assert dropped.exit_code == 0, dropped.output
    written = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert written["train_eval_overlap"]["dropped_train_rows"] == 3
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["data"]["train"]["rows"] == 125 - 3
    card = (tmp_path / "run" / "README.md").read_text()  # the model card carries the report's findings
    assert "- data report: 2 eval row(s) duplicate training rows exactly, 1 nearly (data.on_overlap: drop)" in card
    assert "near duplicate(s) inside data.train" in card


def test_generation_report_shows_the_loss_mask(tiny_models, write_recipe, tmp_path):
    rows = copy_rows(20)
    data = {"train": write_jsonl(tmp_path / "t.jsonl", rows[:16]), "eval": write_jsonl(tmp_path / "e.jsonl", rows[16:])}
    recipe = generation_recipe("copywriting", tiny_models["llama"], data, tmp_path / "run")
    result = runner.invoke(app, ["data", str(write_recipe(recipe)), "--output", str(tmp_path / "report.json")])
    assert result.exit_code == 0, result.output
    example = json.loads((tmp_path / "report.json").read_text())["loss_mask_example"]
    rendered = example["rendered"]
    prompt, trained = rendered.split("⟦")
    assert rows[0]["prompt"].split()[0] in prompt and rows[0]["completion"].split()[0] in trained
    assert trained.endswith("⟧") and example["trained_tokens"] < example["tokens"]


def test_a_hash_collision_is_not_a_duplicate(monkeypatch):
    import numpy as np

    from finetune.data import report as data_report

    texts = pa.chunked_array([["alpha beta gamma", "delta epsilon zeta", "alpha beta gamma"]])
    monkeypatch.setattr(data_report, "text_hashes", lambda values: np.zeros(len(values), dtype=np.uint64))
    assert data_report.exact_duplicates(texts) == [(0, 2)]  # every hash equal: only the equal texts count
