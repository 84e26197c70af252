"""Behaviours the README promises that no other test covered: each asserted by what it does, not by exit 0."""

from __future__ import annotations

import gzip
import json

import pytest
from conftest import classification_recipe, corpus, write_jsonl
from helpers import invoke_wide as invoke

from finetune import __version__
from tests.tasks.test_generation import copy_rows, generation_recipe
from tests.training.test_resume import pair  # noqa: F401  (fixture)


def predictions(run) -> list[dict]:
    return [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]


def test_version_and_debug():
    result = invoke("--version")
    assert result.exit_code == 0 and result.output.strip() == f"finetune {__version__}"
    plain = invoke("run", "no-such-recipe.yaml")
    debug = invoke("--debug", "run", "no-such-recipe.yaml")
    assert plain.exit_code == debug.exit_code == 2
    assert "Traceback" not in plain.output and "no-such-recipe.yaml" in plain.output
    assert "Traceback" in debug.output  # --debug shows where the one-line error came from


def test_tsv_and_gzipped_jsonl_train_the_same_as_jsonl(tiny_models, write_recipe, tmp_path):
    rows = corpus(150)
    jsonl = {
        "train": write_jsonl(tmp_path / "j" / "train.jsonl", rows[:120]),
        "eval": write_jsonl(tmp_path / "j" / "eval.jsonl", rows[120:]),
    }
    tsv = {}
    for split, part in (("train", rows[:120]), ("eval", rows[120:])):
        tsv[split] = tmp_path / "t" / f"{split}.tsv"
        tsv[split].parent.mkdir(parents=True, exist_ok=True)
        tsv[split].write_text("text\tlabel\n" + "".join(f"{r['text']}\t{r['label']}\n" for r in part))
    gz = {split: tmp_path / "g" / f"{split}.jsonl.gz" for split in ("train", "eval")}
    gz["train"].parent.mkdir(parents=True, exist_ok=True)
    for split in gz:
        gz[split].write_bytes(gzip.compress(jsonl[split].read_bytes()))
    outputs = []
    for name, data in (("jsonl", jsonl), ("tsv", tsv), ("gz", gz)):
        recipe = classification_recipe(tiny_models["bert"], data, tmp_path / f"run-{name}", epochs=1)
        result = invoke("run", write_recipe(recipe, f"{name}.yaml"))
        assert result.exit_code == 0, result.output
        outputs.append([(r["text"], r["prediction"]) for r in predictions(tmp_path / f"run-{name}")])
    assert outputs[0] == outputs[1] == outputs[2] and len(outputs[0]) == 30


def test_overflow_drop_end_to_end(tiny_models, write_recipe, tmp_path):
    rows = corpus(150)
    long_text = " ".join(["match goal team player coach"] * 20)
    rows[3]["text"] = rows[125]["text"] = long_text
    data = {
        "train": write_jsonl(tmp_path / "train.jsonl", rows[:120]),
        "eval": write_jsonl(tmp_path / "eval.jsonl", rows[120:]),
    }
    recipe = classification_recipe(tiny_models["bert"], data, tmp_path / "run", epochs=1)
    recipe["data"].update(overflow="drop", max_length=16)
    result = invoke("run", write_recipe(recipe))
    assert result.exit_code == 0, result.output
    assert "120 rows -> 119 inputs" in result.output and "dropped 1" in result.output, [
        l for l in result.output.splitlines() if "rows" in l
    ]
    rows_out = predictions(tmp_path / "run")
    assert len(rows_out) == 29 and all(r["text"] != long_text for r in rows_out)
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert report["splits"]["train"]["dropped"] == 1 and report["splits"]["eval"]["dropped"] == 1


def test_text_pair_and_a_fixed_label_order(tiny_models, write_recipe, tmp_path):
    rows = [{"premise": r["text"], "hypothesis": r["text"].split()[0], "label": r["label"]} for r in corpus(150)]
    data = {
        "train": write_jsonl(tmp_path / "train.jsonl", rows[:120]),
        "eval": write_jsonl(tmp_path / "eval.jsonl", rows[120:]),
    }
    recipe = classification_recipe(tiny_models["bert"], data, tmp_path / "run", epochs=1)
    recipe["data"].update(
        columns={"text": "premise", "text_pair": "hypothesis"}, labels=["weather", "sports", "cooking"]
    )
    result = invoke("run", write_recipe(recipe))
    assert result.exit_code == 0, result.output
    config = (
        json.loads((tmp_path / "run" / "adapter" / "config.json").read_text())
        if (tmp_path / "run" / "adapter" / "config.json").exists()
        else None
    )
    meta = json.loads((tmp_path / "run" / "adapter" / "finetune.json").read_text())
    assert meta["state"]["labels"] == ["weather", "sports", "cooking"]  # the given order, not sorted
    if config is not None:
        assert config["id2label"] == {"0": "weather", "1": "sports", "2": "cooking"}
    out = predictions(tmp_path / "run")
    assert [r["text_pair"] for r in out] == [r["hypothesis"] for r in rows[120:]]


def test_chat_template_on_a_tokenizer_without_one_is_refused(tiny_models, write_recipe, tmp_path):
    rows = copy_rows(40)
    data = {
        "train": write_jsonl(tmp_path / "train.jsonl", rows[:32]),
        "eval": write_jsonl(tmp_path / "eval.jsonl", rows[32:]),
    }
    recipe = generation_recipe("copywriting", tiny_models["llama"], data, tmp_path / "run")
    recipe["data"]["chat_template"] = True
    path = write_recipe(recipe)
    for command in (("run", path, "--dry-run"), ("validate", path)):  # a recipe/model mismatch, found by both
        refused = invoke(*command)
        assert refused.exit_code == 2 and "data.chat_template: the tokenizer of" in refused.output, refused.output
        assert "has no chat template" in refused.output


@pytest.mark.slow  # a real subprocess or a kill -9: `make test` runs it, the fast loop does not
def test_resume_accepts_the_run_directory(pair):  # noqa: F811  (the fixture)
    from tests.training.test_resume import adapter_bytes, killed_run

    _, whole, broken_recipe, broken = pair
    killed_run("step", 11, broken_recipe)
    resumed = invoke("run", broken_recipe, "--resume", broken)  # the run directory, not a step-N directory
    assert resumed.exit_code == 0, resumed.output
    assert json.loads((broken / "metrics.json").read_text())["training"]["resumed_from"].endswith("step-00000009")
    assert adapter_bytes(broken) == adapter_bytes(whole)


def test_conversations_on_a_tokenizer_without_a_chat_template_are_refused_by_validate_too(
    tiny_models, write_recipe, tmp_path
):
    rows = [{"instruction": f"Describe item {i}", "output": f"Item {i} is fine."} for i in range(12)]
    data = {
        "train": write_jsonl(tmp_path / "train.jsonl", rows[:8]),
        "eval": write_jsonl(tmp_path / "eval.jsonl", rows[8:]),
    }
    recipe = generation_recipe("copywriting", tiny_models["llama"], data, tmp_path / "run")
    recipe["data"]["format"] = "alpaca"
    path = write_recipe(recipe)
    said = []
    for command in (("run", path, "--dry-run", "--no-estimate"), ("validate", path)):
        refused = invoke(*command)
        assert refused.exit_code == 2, refused.output
        said.append(next(line.strip(" -") for line in refused.output.splitlines() if "chat template" in line))
    assert said[0].removeprefix("error: ") == said[1] and said[1].startswith("model: the tokenizer of")
