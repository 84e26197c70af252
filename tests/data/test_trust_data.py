"""Data a user can trust: every message about a row names the user's file and the file's own line (whatever the eval
split did), a type error names the first offending row, its column and the type expected, files of different formats
mix, eval_split is seeded (and stratified for classification), `validate` reads the rows `run` reads, a template
cannot ask for gigabytes, the data report names every rare class and every class only in eval, and the bundled demo
data holds no duplicates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import REPO, classification_recipe, corpus, write_jsonl
from typer.testing import CliRunner

from finetune.cli import app
from finetune.data.report import find_overlap, input_texts, read_rows
from finetune.data.tables import apply_template, read_splits
from finetune.errors import DataError, RecipeError
from finetune.flows.resolve import build_recipe

runner = CliRunner()


def recipe_of(data: dict, task: str = "classification", seed: int = 0):
    """A Recipe (schema and recipe-alone rules) around a data section; the model is never read."""
    raw = {"task": task, "model": {"name_or_path": "unused"}, "data": data, "train": {"seed": seed}}
    return build_recipe(raw)


def split_of(data: dict, task: str = "classification", seed: int = 0):
    recipe = recipe_of(data, task, seed)
    fields = {"classification": (("text", "label"), ("text_pair",)), "copywriting": (("prompt", "completion"), ())}
    return read_splits(recipe, *fields[task], classify=task == "classification")


def with_blank_lines(path: Path, rows: list[dict], every: int = 7) -> dict[int, int]:
    """JSON Lines with a blank line after every `every` rows; returns row index -> its line in the file."""
    lines, where = [], {}
    for index, row in enumerate(rows):
        lines.append(json.dumps(row))
        where[index] = len(lines)
        if index % every == every - 1:
            lines.append("")
    path.write_text("\n".join(lines) + "\n")
    return where


def one_line(output: str) -> str:
    return " ".join(output.split())


# --------------------------------------------------------------------------- 1. the file's own row numbers


@pytest.mark.parametrize("seed", [0, 3])
def test_a_bad_row_after_a_seeded_split_is_named_at_its_line(seed, tiny_models, write_recipe, tmp_path):
    rows = corpus(60)
    rows[41] = {"text": " ".join(["goal match team"] * 40), "label": rows[41]["label"]}  # far over max_length
    lines = with_blank_lines(tmp_path / "train.jsonl", rows)
    recipe = classification_recipe(tiny_models["bert"], {"train": tmp_path / "train.jsonl", "eval": ""}, tmp_path / "r")
    recipe["data"].update(eval=None, eval_split=0.3, overflow="error")
    recipe["train"]["seed"] = seed
    result = runner.invoke(app, ["run", str(write_recipe(recipe)), "--dry-run"])
    assert result.exit_code == 3, result.output
    text = one_line(result.output)
    assert f"train.jsonl:{lines[41]}" in text, text  # line 47 (blank lines above it), not its row in the split
    assert "(rows " not in text and "Traceback" not in text


def test_row_errors_of_tasks_name_the_place_in_each_format(tiny_models, write_recipe, tmp_path):
    """An eval label the training rows do not have, in a JSON list (record N) and in a CSV with a quoted field
    that spans lines (the line its record starts on)."""
    train = write_jsonl(tmp_path / "train.jsonl", corpus(30))
    records = [dict(r) for r in corpus(8, seed=1)]
    records[5]["label"] = "politics"
    (tmp_path / "eval.json").write_text(json.dumps(records))
    quoted = 'text,label\n"rain\nand snow",weather\nwind,weather\n"goal,\nmatch",sports\nflour,politics\n'
    (tmp_path / "eval.csv").write_text(quoted)
    for name, place in (("eval.json", "eval.json: record 6"), ("eval.csv", "eval.csv:7")):
        recipe = classification_recipe(tiny_models["bert"], {"train": train, "eval": tmp_path / name}, tmp_path / "r")
        result = runner.invoke(app, ["run", str(write_recipe(recipe)), "--dry-run"])
        assert result.exit_code == 3, result.output
        assert place in one_line(result.output) and "'politics'" in result.output, result.output


# --------------------------------------------------------------------------- 2. type errors: row, column, type


def test_a_float_in_an_integer_label_column_names_its_own_line(tmp_path):
    rows = [{"body": f"text {i}", "y": i % 3} for i in range(12)]
    rows[9]["y"] = 2.5  # the reader makes the whole column float: row 1 is not the culprit
    lines = with_blank_lines(tmp_path / "train.jsonl", rows, every=4)
    data = {"train": str(tmp_path / "train.jsonl"), "eval_split": 0.2, "columns": {"text": "body", "label": "y"}}
    with pytest.raises(DataError) as error:
        split_of(data)
    assert str(error.value) == (
        f"data.train: {tmp_path / 'train.jsonl'}:{lines[9]}: column 'y' (data.columns.label) must be a class name "
        "(text or an integer), got a number (2.5)"
    )


def test_csv_columns_a_task_reads_as_text_or_names_are_read_as_written(tmp_path):
    """A CSV file has no types: "01", "1" and "007" are three classes (pandas read all three as numbers, and the
    classes "01" and "1" merged silently), and a number in a text column stays text."""
    path = tmp_path / "train.csv"
    rows = [("01", "sports"), ("1", "weather"), ("007", "cooking"), ("3.5", "versions")]
    path.write_text("text,label\n" + "".join(f"{topic} {i},{label}\n" for i in range(4) for label, topic in rows))
    read = split_of({"train": str(path), "eval_split": 0.25})
    assert sorted({*read.train["label"], *read.eval["label"]}) == ["007", "01", "1", "3.5"]
    for label, topic in rows:
        assert {r["label"] for r in [*read.train, *read.eval] if r["text"].startswith(topic)} == {label}
    # Labels all written as plain whole numbers stay numbers: classes ordered 2 before 10, as before.
    (tmp_path / "numbered.csv").write_text(
        "text,label\n" + "".join(f"t{i} {j},{j}\n" for i in range(3) for j in range(11))
    )
    numbered = split_of({"train": str(tmp_path / "numbered.csv"), "eval_split": 0.2})
    assert sorted({*numbered.train["label"], *numbered.eval["label"]}) == list(range(11))
    (tmp_path / "numbers.csv").write_text("text,label\n2024,a\n17,b\n99,a\n12,b\n")
    rows = split_of({"train": str(tmp_path / "numbers.csv"), "eval_split": 0.5})
    assert sorted([*rows.train["text"], *rows.eval["text"]]) == ["12", "17", "2024", "99"]


def test_a_csv_row_with_more_fields_than_its_header_is_refused_at_its_line(tmp_path):
    """pandas read a first extra field on every row as an index column, silently: each value then sat under the
    next column's name (the text under `label`, a stray field as the label), and predict passed the shifted row on.
    A separator closing every line (a spreadsheet export) is no extra value; a file not in UTF-8 names its line."""
    (tmp_path / "extra.csv").write_text("text,label\nstadium goal,sport,web\nrecipe bake,food,web\n")
    with pytest.raises(DataError, match=r"extra.csv:2: 3 fields where the header names 2 columns \(extra: \['web'\]\)"):
        split_of({"train": str(tmp_path / "extra.csv"), "eval_split": 0.5})
    (tmp_path / "closed.csv").write_text("text,label\n" + "stadium goal,sport,\nrecipe bake,food,\n" * 2)
    read = split_of({"train": str(tmp_path / "closed.csv"), "eval_split": 0.5})
    assert sorted([*read.train["text"], *read.eval["text"]]) == ["recipe bake"] * 2 + ["stadium goal"] * 2
    assert sorted([*read.train["label"], *read.eval["label"]]) == ["food", "food", "sport", "sport"]
    # Further down, where pandas' own tokenizer error named no column: the same, at the line the record starts on.
    (tmp_path / "late.csv").write_text('text,label\nstadium goal,sport\n"recipe\nbake",food,web\n')
    with pytest.raises(DataError, match=r"late.csv:3: 3 fields where the header names 2 columns"):
        split_of({"train": str(tmp_path / "late.csv"), "eval_split": 0.5})
    (tmp_path / "some.csv").write_text("text,label\n" + "stadium goal,sport\nrecipe bake,food,\n" * 2)
    read = split_of({"train": str(tmp_path / "some.csv"), "eval_split": 0.5})
    assert sorted([*read.train["label"], *read.eval["label"]]) == ["food", "food", "sport", "sport"]
    (tmp_path / "latin.csv").write_bytes(b"text,label\nstadium goal,sport\nrecipe b\xe9ke,food\n")
    with pytest.raises(DataError, match=r"latin.csv:3: not UTF-8 text"):
        split_of({"train": str(tmp_path / "latin.csv"), "eval_split": 0.5})


def test_a_quotation_mark_that_never_closes_is_named_at_its_line(tmp_path):
    """A value opened by a stray quotation mark on line 12 of 49: training read the 10 rows before it and dropped
    the other 38 without a word (and predict returned 1 answer for 4 inputs)."""
    lines = ["text,label"] + [f"word{i} here,{'a' if i % 2 else 'b'}" for i in range(48)]
    lines[11] = '"' + lines[11]
    (tmp_path / "quote.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"quote.csv:12: a quotation mark opens a value here that nothing later"):
        split_of({"train": str(tmp_path / "quote.csv"), "eval_split": 0.5})
    lines[3] = '"word2" here,b'  # text after a closing quote, as pandas reads it: a strict csv scan stopped there
    lines[6] += ","  # an empty extra field earlier (a spreadsheet export): pandas' first error was that one
    (tmp_path / "quote.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"quote.csv:12: a quotation mark opens a value here that nothing later"):
        split_of({"train": str(tmp_path / "quote.csv"), "eval_split": 0.5})


def test_a_number_or_nothing_where_text_is_expected_names_the_row_column_and_type(tmp_path):
    rows = [{"body": f"text {i}", "topic": "a" if i % 2 else "b"} for i in range(10)]
    rows[6]["body"] = 42  # text and numbers in one column: the reader cannot make a table of it
    lines = with_blank_lines(tmp_path / "mixed.jsonl", rows, every=3)
    data = {"train": str(tmp_path / "mixed.jsonl"), "eval_split": 0.2, "columns": {"text": "body", "label": "topic"}}
    with pytest.raises(DataError) as error:
        split_of(data)
    assert f"mixed.jsonl:{lines[6]}: column 'body' (data.columns.text) must be text, got a number (42)" in str(
        error.value
    )
    rows[6] = {"topic": "a"}  # no text at all
    lines = with_blank_lines(tmp_path / "missing.jsonl", rows, every=3)
    data["train"] = str(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match=rf"missing.jsonl:{lines[6]}: column 'body' .* got no value"):
        split_of(data)


# --------------------------------------------------------------------------- 3. mixed file formats


def test_jsonl_csv_and_parquet_mix_in_one_data_list(tmp_path, tiny_models, write_recipe):
    import pandas as pd

    rows = corpus(30)
    write_jsonl(tmp_path / "a.jsonl", rows[:10])
    pd.DataFrame(rows[10:20]).to_csv(tmp_path / "b.csv", index=False)
    pd.DataFrame(rows[20:]).to_parquet(tmp_path / "c.parquet")
    files = [str(tmp_path / n) for n in ("a.jsonl", "b.csv", "c.parquet")]
    split = split_of({"train": files, "eval_split": 0.2})
    assert len(split.train) + len(split.eval) == 30
    assert sorted([*split.train["text"], *split.eval["text"]]) == sorted(r["text"] for r in rows)
    places = {split.origins["data.train"].place(i).split(":")[0] for i in range(len(split.train))}
    assert places == set(files)
    recipe = classification_recipe(tiny_models["bert"], {"train": "", "eval": tmp_path / "a.jsonl"}, tmp_path / "r")
    recipe["data"]["train"] = files
    result = runner.invoke(app, ["validate", str(write_recipe(recipe))])
    assert result.exit_code == 0, result.output


def test_files_that_cannot_be_joined_are_refused_naming_both(tmp_path, tiny_models, write_recipe):
    write_jsonl(tmp_path / "lists.jsonl", [{"text": "a b", "label": ["x", "y"]}, {"text": "c", "label": ["y"]}])
    write_jsonl(tmp_path / "ints.jsonl", [{"text": "d e", "label": 1}, {"text": "f", "label": 2}])
    write_jsonl(tmp_path / "pairs.jsonl", [{"text": "d e", "text_pair": "g", "label": "x"}])
    for second, words in (("ints.jsonl", "is a list in"), ("pairs.jsonl", "gives the fields label, text, text_pair")):
        files = [str(tmp_path / "lists.jsonl"), str(tmp_path / second)]
        recipe = classification_recipe(tiny_models["bert"], {"train": "", "eval": files[0]}, tmp_path / "r")
        recipe["data"]["train"] = files
        for command in (["validate"], ["run", "--dry-run"]):
            result = runner.invoke(app, [command[0], str(write_recipe(recipe)), *command[1:]])
            assert result.exit_code == 3, result.output
            text = one_line(result.output)
            assert words in text and "lists.jsonl" in text and second in text and "Traceback" not in text


# --------------------------------------------------------------------------- 4. splits that leave nothing


@pytest.mark.parametrize(
    "change, words",
    [
        (
            lambda d, tmp: d.update(train=str(write_jsonl(tmp / "two.jsonl", corpus(2))), eval=None, eval_split=0.6),
            "data.eval_split: 0.6 of the 2 training row(s) holds out 2 for evaluation and leaves 0 to train on",
        ),
        (
            lambda d, tmp: d.update(eval=d["train"], on_overlap="drop"),
            "data.on_overlap: drop removed every one of the 120 training rows",
        ),
    ],
)
def test_splits_that_leave_no_rows_are_data_errors(change, words, tiny_models, topic_data, write_recipe, tmp_path):
    recipe = classification_recipe(tiny_models["bert"], topic_data, tmp_path / "r")
    change(recipe["data"], tmp_path)
    for command in (["validate"], ["run", "--dry-run"]):
        result = runner.invoke(app, [command[0], str(write_recipe(recipe)), *command[1:]])
        assert result.exit_code == 3, result.output
        assert words in one_line(result.output) and "Traceback" not in result.output


# --------------------------------------------------------------------------- 5. seeded, stratified eval splits


def test_eval_split_follows_the_seed(tmp_path):
    rows = [{"prompt": f"prompt {i}", "completion": f"answer {i}"} for i in range(50)]
    data = {"train": str(write_jsonl(tmp_path / "copy.jsonl", rows)), "eval_split": 0.2}
    first, again, other = (list(split_of(data, "copywriting", seed).eval["prompt"]) for seed in (5, 5, 6))
    assert first == again and first != other and len(first) == 10
    labelled = {"train": str(write_jsonl(tmp_path / "topics.jsonl", corpus(90))), "eval_split": 0.2}
    first, again, other = (list(split_of(labelled, seed=seed).eval["text"]) for seed in (5, 5, 6))
    assert first == again and sorted(first) != sorted(other)


def test_classification_eval_split_is_stratified_by_label(tmp_path):
    rows = [{"text": f"row {i}", "label": "big" if i < 60 else "mid" if i < 90 else "small"} for i in range(100)]
    split = split_of({"train": str(write_jsonl(tmp_path / "t.jsonl", rows)), "eval_split": 0.2})
    counts = {label: list(split.eval["label"]).count(label) for label in ("big", "mid", "small")}
    assert counts == {"big": 12, "mid": 6, "small": 2}
    assert split.eval_split is not None and split.eval_split["method"] == "stratified"
    rare = [{"text": f"rare {i}", "label": f"c{i % 40}"} for i in range(82)]  # 40 classes of 2-3 rows, 9 eval rows
    split = split_of({"train": str(write_jsonl(tmp_path / "rare.jsonl", rare)), "eval_split": 0.1})
    assert len(split.eval) == 9 and set(split.train["label"]) == {f"c{i}" for i in range(40)}


def test_a_class_with_one_row_makes_the_split_random_and_stays_in_training(tmp_path):
    rows = corpus(40) + [{"text": "a lone row", "label": "lonely"}]
    data = {"train": str(write_jsonl(tmp_path / "t.jsonl", rows)), "eval_split": 0.5}
    for seed in range(5):
        split = split_of(data, seed=seed)
        assert "lonely" in list(split.train["label"]) and "lonely" not in list(split.eval["label"])
        assert split.eval_split is not None and split.eval_split["method"] == "random"
        assert "kept in training" in split.eval_split["note"] and "lonely" in split.eval_split["note"]
    with pytest.raises(DataError, match="data.stratify: a stratified split needs two rows of every class"):
        split_of({**data, "stratify": True})
    # More held out than the classes with two rows or more have: the single rows still stay, and the note says so.
    few = [{"text": f"pair {i}", "label": "twice"} for i in range(2)] + [
        {"text": f"row {i}", "label": f"once {i}"} for i in range(4)
    ]
    split = split_of({"train": str(write_jsonl(tmp_path / "few.jsonl", few)), "eval_split": 0.5})
    assert list(split.eval["label"]) == ["twice"] and sorted(split.train["label"]) == [
        "once 0",
        "once 1",
        "once 2",
        "once 3",
        "twice",
    ]
    assert "1 of the 3 rows asked held out" in split.eval_split["note"]
    # Every class a single row: nothing can be held out; said of data.eval_split (it blamed a data.eval never given).
    lone = [{"text": f"row {i}", "label": f"once {i}"} for i in range(3)]
    with pytest.raises(DataError, match="data.eval_split: every class of the 3 training row"):
        split_of({"train": str(write_jsonl(tmp_path / "lone.jsonl", lone)), "eval_split": 0.34})


def test_labels_only_in_eval_are_refused_or_warned(tiny_models, write_recipe, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train = write_jsonl(tmp_path / "train.jsonl", corpus(60))
    eval_rows = corpus(12, seed=2)
    eval_rows[4]["label"] = eval_rows[9]["label"] = "politics"
    data = {"train": train, "eval": write_jsonl(tmp_path / "eval.jsonl", eval_rows)}
    recipe = classification_recipe(tiny_models["bert"], data, tmp_path / "r")
    for command in (["validate"], ["run", "--dry-run"]):
        result = runner.invoke(app, [command[0], str(write_recipe(recipe)), *command[1:]])
        assert result.exit_code == 3, result.output
        assert "'politics': 2 row(s), first at " in result.output and "eval.jsonl:5" in one_line(result.output)
    recipe["data"]["labels"] = ["cooking", "politics", "sports", "weather"]
    result = runner.invoke(app, ["data", str(write_recipe(recipe)), "--output", str(tmp_path / "report.json")])
    assert result.exit_code == 0, result.output
    assert "1 class(es) only in eval" in one_line(result.output) and "politics (2 eval rows)" in result.output
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["label_balance"]["only_in_eval"] == ["politics"]


# --------------------------------------------------------------------------- 6. validate reads the rows run reads

ROW_MISTAKES = {
    "malformed line": ('{"text": "a", "label": "x"}\n{"text": "b", "label": "y"\n', "train.jsonl:2: malformed JSON"),
    "missing column": ('{"body": "a", "label": "x"}\n{"body": "b", "label": "y"}\n', "column 'text' for field 'text'"),
    "number as text": (
        '{"text": "a", "label": "x"}\n\n{"text": 7, "label": "y"}\n',
        "train.jsonl:3: column 'text' must be text, got a number (7)",
    ),
    "float label": (
        '{"text": "a", "label": 1}\n{"text": "b", "label": 0.5}\n',
        "train.jsonl:2: column 'label' must be a class name (text or an integer), got a number (0.5)",
    ),
    "empty label": ('{"text": "a", "label": "x"}\n{"text": "b", "label": " "}\n', "got an empty text"),
}


@pytest.mark.parametrize("case", list(ROW_MISTAKES))
def test_validate_reads_and_refuses_the_rows_run_refuses(case, tiny_models, topic_data, write_recipe, tmp_path):
    content, words = ROW_MISTAKES[case]
    (tmp_path / "train.jsonl").write_text(content)
    recipe = classification_recipe(
        tiny_models["bert"], {**topic_data, "train": tmp_path / "train.jsonl"}, tmp_path / "r"
    )
    path = write_recipe(recipe)
    validated = runner.invoke(app, ["validate", str(path)])
    dry_run = runner.invoke(app, ["run", str(path), "--dry-run"])
    assert validated.exit_code == dry_run.exit_code == 3, (validated.output, dry_run.output)
    message = one_line(dry_run.output).removeprefix("error: ")
    assert words in message and message in one_line(validated.output)  # the same message, the recipe named too
    assert str(path) in validated.output and not (tmp_path / "r").exists()


# --------------------------------------------------------------------------- 7. template memory bombs


def test_template_bombs_are_refused_before_any_prompt_is_filled(tiny_models, write_recipe, tmp_path):
    from datasets import Dataset

    rows = [{"product": "x" * 1000, "completion": "c"} for _ in range(50)]
    table = Dataset.from_list(rows)
    with pytest.raises(RecipeError, match=r"data.template: filled with the rows of data.train, a prompt could reach"):
        apply_template(table, "{product}" * 1100, "data.train")  # 1.1 MB a row, were it filled
    assert len(apply_template(table, "{product} {product}", "data.train")["prompt"][0]) == 2001
    data = {"train": write_jsonl(tmp_path / "copy.jsonl", rows), "eval": tmp_path / "copy.jsonl"}
    recipe = classification_recipe(tiny_models["llama"], data, tmp_path / "r")
    recipe["task"] = "copywriting"
    recipe["eval"] = {"max_new_tokens": 8}
    for template, words in (
        ("{product:>2000000}", "{product:>2000000} asks for 2,000,000 characters"),
        ("{product:{width}}", "a format spec cannot hold another field"),
        ("Copy for {product}" * 1100, "a prompt could reach"),
    ):
        recipe["data"]["template"] = template
        for command in (["validate"], ["run", "--dry-run"]):
            result = runner.invoke(app, [command[0], str(write_recipe(recipe)), *command[1:]])
            assert result.exit_code == 2, result.output
            assert "data.template" in result.output and words in one_line(result.output), result.output


# --------------------------------------------------------------------------- 8. rare classes, every one of them


def test_the_report_names_every_rare_class(tiny_models, write_recipe, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rows = [{"text": f"common text {i}", "label": f"common{i % 4}"} for i in range(80)]
    rare = {f"rare{k:02d}": 1 + k % 4 for k in range(16)}  # 16 classes of 1 to 4 rows
    rows += [{"text": f"{label} text {i}", "label": label} for label, n in rare.items() for i in range(n)]
    data = {"train": write_jsonl(tmp_path / "t.jsonl", rows), "eval": write_jsonl(tmp_path / "e.jsonl", rows[:8])}
    recipe = classification_recipe(tiny_models["bert"], data, tmp_path / "r")
    result = runner.invoke(app, ["data", str(write_recipe(recipe)), "--output", str(tmp_path / "report.json")])
    assert result.exit_code == 0, result.output
    text = one_line(result.output)
    assert "16 class(es) with fewer than 5 training rows" in text
    assert all(f"{label} ({n})" in text for label, n in rare.items()), text
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["label_balance"]["train"]["rare_classes"] == sorted(rare)


def test_classes_that_differ_only_in_case_are_said(tiny_models, write_recipe, tmp_path, monkeypatch):
    """`sport` and `SPORT` are two classes (case may mean something), but the report said nothing of it."""
    monkeypatch.chdir(tmp_path)
    rows = [{"text": f"text {i}", "label": ["sport", "SPORT", "food"][i % 3]} for i in range(30)]
    data = {"train": write_jsonl(tmp_path / "t.jsonl", rows), "eval": write_jsonl(tmp_path / "e.jsonl", rows[:6])}
    recipe = classification_recipe(tiny_models["bert"], data, tmp_path / "r")
    result = runner.invoke(app, ["data", str(write_recipe(recipe))])
    assert result.exit_code == 0, result.output
    assert "differ only in case are separate classes: 'SPORT' / 'sport'" in one_line(result.output), result.output


# --------------------------------------------------------------------------- 9. the bundled demo data


@pytest.mark.parametrize(
    "train, test",
    [
        ("data/tickets/train.jsonl", "data/tickets/test.jsonl"),
        ("data/faq/train_generative.jsonl", "data/faq/test_generative.jsonl"),
        ("data/copy/train.jsonl", "data/copy/test.jsonl"),
    ],
)
def test_bundled_data_has_no_duplicates_or_overlap(train, test):
    columns = {"data/tickets/train.jsonl": {"text": "body", "label": "topic"}}.get(train, {})
    task = "classification" if columns else "copywriting"
    fields = {"classification": (("text", "label"), ()), "copywriting": ((), ("prompt", "question", "context"))}
    recipe = recipe_of({"train": str(REPO / train), "eval": str(REPO / test), "columns": columns}, task)
    rows, found = read_rows(recipe, *fields[task], classify=False)
    assert found["train_duplicates"]["exact"] == found["train_duplicates"]["near"] == 0, found["train_duplicates"]
    assert found["train_eval"]["exact"] == found["train_eval"]["near"] == 0, found["train_eval"]
    assert len(find_overlap(input_texts(rows.eval)).exact) == 0


def test_knowledge_base_ids_in_a_csv_file_are_read_as_written(tmp_path):
    """Passage ids "007" and "7" are two passages (read as numbers they were one id twice, refused as duplicates;
    a row naming `positive_id: "007"` found no passage)."""
    from finetune.data.retrieval import load_passages

    (tmp_path / "kb.csv").write_text("id,title,text\n007,Agent,licensed to kill\n7,Seven,a lucky number\n")
    assert [(p.id, p.text) for p in load_passages(str(tmp_path / "kb.csv"))] == [
        ("007", "Agent\nlicensed to kill"),
        ("7", "Seven\na lucky number"),
    ]


def test_a_tsv_quotation_mark_never_swallows_rows(tmp_path):
    """A text opening with a quotation mark (`"Great" movie`, unquoted) lost its marks, or started a quoted field that
    ran over the next lines, their tabs and labels: 10 rows lost without a word. A TSV written by hand keeps its
    marks as text; one that pandas or Python's csv module wrote (texts with marks quoted, the marks doubled) reads
    as it was written."""
    import pandas as pd

    texts = [f"row {i} about the weather" for i in range(12)]
    texts[3], texts[7] = '"Great" movie, would watch again', 'a 12" screen'
    pd.DataFrame({"text": texts, "label": ["weather"] * 12}).to_csv(tmp_path / "written.tsv", sep="\t", index=False)
    rows = split_of({"train": str(tmp_path / "written.tsv"), "eval_split": 0.25})
    assert sorted([*rows.train["text"], *rows.eval["text"]]) == sorted(texts)
    # A value holding a tab or a line break, quoted as pandas writes it (read line by line, its marks were text).
    texts[9], texts[10] = "tab\there", "two\nlines"
    pd.DataFrame({"text": texts, "label": ["weather"] * 12}).to_csv(tmp_path / "written.tsv", sep="\t", index=False)
    rows = split_of({"train": str(tmp_path / "written.tsv"), "eval_split": 0.25})
    assert sorted([*rows.train["text"], *rows.eval["text"]]) == sorted(texts)
    texts[9], texts[10] = "row 9", "row 10"
    texts[5] = '"12 inch screen'  # never closed: it ran on over every later line
    lines = [f"{text}\tweather" for text in texts]  # written by hand: the marks are text
    (tmp_path / "by_hand.tsv").write_text("text\tlabel\n" + "\n".join(lines) + "\n")
    rows = split_of({"train": str(tmp_path / "by_hand.tsv"), "eval_split": 0.25})
    assert sorted([*rows.train["text"], *rows.eval["text"]]) == sorted(texts)


@pytest.mark.parametrize("suffix, separator", [(".csv", ","), (".tsv", "\t")])
def test_a_header_naming_a_column_twice_is_refused(tmp_path, suffix, separator):
    """pandas reads a second `body` as `body.1`: the first was read alone, the other silently dropped."""
    path = tmp_path / f"twice{suffix}"
    path.write_text(separator.join(["body", "body", "label"]) + "\n" + separator.join(["a", "b", "x"]) + "\n")
    with pytest.raises(DataError, match="the header names column\\(s\\) 'body' more than once"):
        split_of({"train": str(path), "eval_split": 0.5})


def test_a_directory_named_as_a_data_file_is_said_to_be_one(tmp_path):
    """It was "file not found: DIR", for a path that is there."""
    (tmp_path / "data").mkdir()
    with pytest.raises(DataError, match="is a directory, not a data file"):
        split_of({"train": str(tmp_path / "data"), "eval_split": 0.5})


def test_an_object_whose_inner_value_changes_kind_is_named_at_its_line(tmp_path):
    """SQuAD-style `answers` with lists on one line and a bare text on another: pyarrow's "cannot mix list and
    non-list" named no line and no column."""
    from finetune.data.tables import load_table

    rows = [{"question": "q", "answers": {"text": ["a"], "answer_start": [0]}}] * 3
    rows += [{"question": "q", "answers": {"text": "a", "answer_start": 0}}]
    path = write_jsonl(tmp_path / "squad.jsonl", rows)
    with pytest.raises(DataError, match=r"column 'answers' \(its 'text'\) is a list on line 1 but text on line 4"):
        load_table(str(path), "data.train")
    # A list's items: an answer_start written as text on one line ("Could not convert '12'", no line, no column).
    rows[3] = {"question": "q", "answers": {"text": ["a"], "answer_start": ["0"]}}
    path = write_jsonl(tmp_path / "squad.jsonl", rows)
    with pytest.raises(
        DataError, match=r"'answers' \(its 'answer_start' items\) is a number on line 1 but text on line 4"
    ):
        load_table(str(path), "data.train")
