"""Classification end to end on tiny BERT, BART, GPT-2 and Llama, through the CLI."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import classification_recipe, write_jsonl
from helpers import invoke


@pytest.mark.parametrize("kind", ["bert", "bart", "gpt2", "llama"])
def test_run_writes_the_run_directory(kind, tiny_models, topic_data, write_recipe, tmp_path):
    out = tmp_path / "run"
    recipe = write_recipe(classification_recipe(tiny_models[kind], topic_data, out))
    result = invoke("run", recipe)
    assert result.exit_code == 0, result.output
    for name in ("recipe.yaml", "manifest.json", "metrics.json", "predictions.jsonl", "train_log.jsonl", "README.md"):
        assert (out / name).is_file(), name
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    # Sorted: peft writes its set of targets in hash order, which differed between two runs of one recipe.
    targets = json.loads((out / "adapter" / "adapter_config.json").read_text())["target_modules"]
    assert targets == sorted(targets) and len(targets) > 1
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["schema"] == 1 and metrics["task"] == "classification"
    assert set(metrics["metrics"]) == {"accuracy", "macro_f1", "weighted_f1", "eval_loss"}
    assert all(0 <= v <= 1 for k, v in metrics["metrics"].items() if k != "eval_loss")
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 30 and {"text", "label", "prediction"} <= set(rows[0])
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 30 and all(entry["tokens_per_s"] > 0 for entry in log)
    # The reported metrics equal scikit-learn's on the predictions, computed independently here.
    from sklearn.metrics import accuracy_score, f1_score

    gold, said = [r["label"] for r in rows], [r["prediction"] for r in rows]
    assert metrics["metrics"]["accuracy"] == pytest.approx(accuracy_score(gold, said))
    assert metrics["metrics"]["macro_f1"] == pytest.approx(f1_score(gold, said, average="macro", zero_division=0))
    assert metrics["metrics"]["weighted_f1"] == pytest.approx(f1_score(gold, said, average="weighted", zero_division=0))
    # Metrics are a pure function of predictions.jsonl.
    rescored = invoke("eval", "--predictions", out / "predictions.jsonl", "--task", "classification", "--json")
    assert rescored.exit_code == 0, rescored.output
    again = json.loads(rescored.output)["metrics"]
    assert again["accuracy"] == metrics["metrics"]["accuracy"]


def test_training_learns_and_is_reproducible(tiny_models, topic_data, write_recipe, tmp_path):
    def run(name, seed):
        out = tmp_path / name
        recipe = classification_recipe(tiny_models["gpt2"], topic_data, out, epochs=4, seed=seed)
        assert invoke("run", write_recipe(recipe, f"{name}.yaml")).exit_code == 0
        return json.loads((out / "metrics.json").read_text())["metrics"], (
            out / "adapter" / "adapter_model.safetensors"
        ).read_bytes()

    first, adapter_a = run("a", 0)
    second, adapter_b = run("b", 0)
    _, adapter_c = run("c", 1)
    assert first["accuracy"] >= 0.8  # the topics are readable from the words
    assert first == second and adapter_a == adapter_b
    assert adapter_a != adapter_c


def test_eval_gates_predict_and_merge(tiny_models, topic_data, write_recipe, tmp_path, monkeypatch):
    out = tmp_path / "run"
    recipe = write_recipe(classification_recipe(tiny_models["llama"], topic_data, out))
    assert invoke("run", recipe).exit_code == 0
    trained = json.loads((out / "metrics.json").read_text())["metrics"]

    failing = invoke("eval", out, "--gate", "eval_loss<=0.001", "--gate", "macro_f1>=0")
    assert failing.exit_code == 4 and "eval_loss<=0.001" in failing.output
    passing = invoke("eval", out, "--gate", "accuracy>=0.0", "--json")
    assert passing.exit_code == 0
    document = json.loads(passing.output)
    assert document["metrics"]["accuracy"] == pytest.approx(trained["accuracy"])
    assert document["gates"]["accuracy>=0"]["passed"] is True

    base = invoke("eval", recipe, "--output", tmp_path / "base")
    assert base.exit_code == 0 and (tmp_path / "base" / "metrics.json").is_file()
    # The tiny encoder has no trained classifier: its head is random, which the accuracy alone did not say.
    warnings = json.loads((tmp_path / "base" / "metrics.json").read_text())["warnings"]
    assert any("no trained classification head" in warning for warning in warnings), warnings
    # Without --output a base model's evaluation goes to a new evals/<time>-base/ here, said (it was written nowhere).
    monkeypatch.chdir(tmp_path)
    unnamed = invoke("eval", recipe)
    assert unnamed.exit_code == 0, unnamed.output
    (written,) = (tmp_path / "evals").iterdir()
    assert written.name.endswith("-base") and f"written to {Path('evals') / written.name}" in unnamed.output
    assert (
        json.loads((written / "metrics.json").read_text())["metrics"]
        == json.loads((tmp_path / "base" / "metrics.json").read_text())["metrics"]
    )
    assert (written / "predictions.jsonl").read_text() == (tmp_path / "base" / "predictions.jsonl").read_text()

    lines = '{"text": "rain snow storm wind"}\n{"text": "goal match team"}\n'
    predicted = invoke("predict", out, "--input", "-", input=lines)
    assert predicted.exit_code == 0, predicted.output
    rows = [json.loads(line) for line in predicted.output.splitlines()]
    assert len(rows) == 2 and all(r["prediction"] in {"sports", "weather", "cooking"} for r in rows)
    # The layouts training reads, by suffix (a CSV was refused as a "malformed JSON line"): the same predictions.
    (tmp_path / "in.csv").write_text("text,id\nrain snow storm wind,007\ngoal match team,2\n")
    from_csv = invoke("predict", out, "--input", tmp_path / "in.csv")
    assert from_csv.exit_code == 0, from_csv.output
    csv_rows = [json.loads(line) for line in from_csv.output.splitlines()]
    assert [(r["id"], r["prediction"]) for r in csv_rows] == [
        ("007", rows[0]["prediction"]),
        ("2", rows[1]["prediction"]),
    ]
    (tmp_path / "in.json").write_text(
        json.dumps([{"text": "rain snow storm wind", "id": 1}, {"text": "goal match team"}])
    )
    from_json = invoke("predict", out, "--input", tmp_path / "in.json")
    json_rows = [json.loads(line) for line in from_json.output.splitlines()]
    assert [r["prediction"] for r in json_rows] == [r["prediction"] for r in rows]
    assert "id" not in json_rows[1]  # each row as written: no other row's keys added as nulls
    (tmp_path / "lines.json").write_text(
        '{"text": "rain snow storm wind", "id": 1}\n{"text": "goal match team", "id": 2}\n'
    )
    from_lines = invoke("predict", out, "--input", tmp_path / "lines.json")  # JSON Lines saved as .json
    assert [json.loads(line)["id"] for line in from_lines.output.splitlines()] == [1, 2], from_lines.output
    # Fields of mixed types that predict only carries (an id of 1 and "x5", a note) come back as written: a row was
    # refused over a field predict never reads.
    mixed = '{"text": "rain snow", "id": 1, "note": 3}\n{"text": "goal match", "id": "x5", "note": "three"}\n'
    carried = invoke("predict", out, "--input", "-", input=mixed)
    assert carried.exit_code == 0, carried.output
    assert [(r["id"], r["note"]) for r in map(json.loads, carried.output.splitlines())] == [(1, 3), ("x5", "three")]
    typed = invoke("predict", out, "--input", "-", input='{"text": "rain"}\n{"text": 5}\n')  # a field it reads
    assert typed.exit_code == 3 and "field 'text' is int, but str" in typed.output, typed.output

    merged_dir = tmp_path / "merged"
    assert invoke("merge", out, "--output", merged_dir).exit_code == 0
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    merged = AutoModelForSequenceClassification.from_pretrained(merged_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    with torch.no_grad():
        logits = merged(**tokenizer("rain snow storm wind", return_tensors="pt")).logits
    assert merged.config.id2label[int(logits.argmax())] == rows[0]["prediction"]


def test_eval_split_and_string_or_int_labels(tiny_models, tmp_path, write_recipe):
    rows = [{"sentence": r["text"], "y": i % 3} for i, r in enumerate(__import__("conftest").corpus(90))]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    recipe = classification_recipe(tiny_models["bert"], {"train": data, "eval": data}, tmp_path / "run")
    recipe["data"] = {
        "train": str(data),
        "eval_split": 0.2,
        "columns": {"text": "sentence", "label": "y"},
        "max_length": 32,
    }
    result = invoke("run", write_recipe(recipe))
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "run" / "adapter" / "finetune.json").read_text())
    assert meta["state"]["labels"] == [0, 1, 2]
    assert len((tmp_path / "run" / "predictions.jsonl").read_text().splitlines()) == 18
    # eval RUN scores the rows the run held out: an override that would draw them again is refused (it scored
    # training rows as held-out ones); an eval file instead draws nothing.
    for override in ("train.seed=7", "data.eval_split=0.5", "data.stratify=false"):
        redrawn = invoke("eval", str(tmp_path / "run"), override)
        assert redrawn.exit_code == 2 and "the run held out its eval rows" in redrawn.output, redrawn.output
    assert invoke("eval", str(tmp_path / "run"), f"data.eval={data}", "data.eval_split=null").exit_code == 0
    assert invoke("eval", str(tmp_path / "run"), "train.seed=0").exit_code == 0  # the run's own: its own split
    # The training file by its bytes: the same rows elsewhere draw the same split; other rows, or the same file
    # twice, do not (a relative path read from another working directory was another file, unnoticed).
    (tmp_path / "copy").mkdir()
    copy = (tmp_path / "copy" / "d.jsonl").write_bytes(data.read_bytes()) and tmp_path / "copy" / "d.jsonl"
    assert invoke("eval", str(tmp_path / "run"), f"data.train={copy}").exit_code == 0
    (tmp_path / "other.jsonl").write_text("".join(reversed(data.read_text().splitlines(keepends=True))))
    for other in (f"data.train={tmp_path / 'other.jsonl'}", f"data.train=[{data},{data}]"):
        moved = invoke("eval", str(tmp_path / "run"), other)
        assert moved.exit_code == 2 and "data.train: the run held out" in moved.output, moved.output
    # The training file edited in place: eval refuses; predict, which scores no split, still answers.
    data.write_text((tmp_path / "other.jsonl").read_text())
    assert invoke("eval", str(tmp_path / "run")).exit_code == 2
    answered = invoke("predict", str(tmp_path / "run"), "--input", "-", input='{"sentence": "rain"}\n')
    assert answered.exit_code == 0, answered.output


BAD_INPUTS = {
    "unknown key": ({"lora": {"rnk": 4}}, 2, "lora.rnk: unknown key (did you mean 'r'?)"),
    "wrong type": ({"train": {"epochs": "many"}}, 2, "train.epochs"),
    "unknown task": ({"task": "translation"}, 2, "task:"),
    "missing file": ({"data": {"train": "nope.jsonl"}}, 3, "file not found: nope.jsonl"),
    "wrong column": ({"data": {"columns": {"text": "body"}}}, 3, "column 'body' for field 'text'"),
    "unknown target": ({"lora": {"targets": ["qv"]}}, 2, "no linear layer named 'qv'"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_recipes_get_one_line_and_exit_code(case, tiny_models, topic_data, write_recipe, tmp_path):
    change, code, message = BAD_INPUTS[case]
    recipe = classification_recipe(tiny_models["bert"], topic_data, tmp_path / "run")
    for section, values in change.items():
        recipe[section] = {**recipe[section], **values} if isinstance(values, dict) else values
    result = invoke("run", write_recipe(recipe))
    assert result.exit_code == code, result.output
    assert message in result.output and "Traceback" not in result.output


def test_bad_data_rows(tiny_models, topic_data, write_recipe, tmp_path):
    recipe = classification_recipe(tiny_models["bert"], topic_data, tmp_path / "run")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": \n')
    result = invoke("run", write_recipe({**recipe, "data": {**recipe["data"], "train": str(broken)}}))
    assert result.exit_code == 3 and "broken.jsonl:2: malformed JSON line" in result.output
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    result = invoke("run", write_recipe({**recipe, "data": {**recipe["data"], "train": str(empty)}}))
    assert result.exit_code == 3 and "has no rows" in result.output
    unseen = write_jsonl(tmp_path / "unseen.jsonl", [{"text": "rain", "label": "politics"}])
    result = invoke("run", write_recipe({**recipe, "data": {**recipe["data"], "eval": str(unseen)}}))
    assert result.exit_code == 3 and "'politics': 1 row(s), first at " in result.output
    assert "unseen.jsonl:1" in result.output.replace("\n", "")
    null_text = write_jsonl(tmp_path / "null.jsonl", [{"text": None, "label": "a"}, {"text": "x", "label": "b"}])
    result = invoke("run", write_recipe({**recipe, "data": {**recipe["data"], "train": str(null_text)}}))
    assert result.exit_code == 3 and "null.jsonl:1: column 'text' must be text, got no value" in result.output.replace(
        "\n", ""
    )


def test_malformed_override_and_dry_run(tiny_models, topic_data, write_recipe, tmp_path):
    recipe = write_recipe(classification_recipe(tiny_models["bert"], topic_data, tmp_path / "run"))
    bad = invoke("run", recipe, "train.epochs")
    assert bad.exit_code == 2 and "malformed override" in bad.output
    # A setting given twice, or a section and a key inside it, is refused by run and validate alike (was: last wins).
    for command in ("run", "validate"):
        bare = invoke(command, recipe, "train.epochs")  # validate read it as a missing recipe file
        assert bare.exit_code == 2 and "malformed override 'train.epochs'" in bare.output, bare.output
        twice = invoke(command, recipe, "train.lr=0.1", "train.epochs=1", "train.lr=0.2")
        assert twice.exit_code == 2 and "'train.lr=0.1' and 'train.lr=0.2' both set train.lr" in twice.output
        nested = invoke(command, recipe, "lora.r=4", "lora={r: 8}")
        assert nested.exit_code == 2 and "both set lora;" in nested.output
    dry = invoke("run", recipe, "--dry-run", "lora.targets=attention")
    assert dry.exit_code == 0, dry.output
    assert "trainable of" in dry.output and "query" in dry.output and "truncated 0" in dry.output
    assert "cross-entropy on the labels" in " ".join(dry.output.split())  # the task's loss, not a generic one
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_validate_command(tiny_models, topic_data, write_recipe, tmp_path):
    good = write_recipe(classification_recipe(tiny_models["bart"], topic_data, tmp_path / "run"), "good.yaml")
    ok = invoke("validate", good)
    assert ok.exit_code == 0 and "bart family" in ok.output
    refused = classification_recipe(tiny_models["bert"], topic_data, tmp_path / "run")
    refused["task"] = "copywriting"
    refused["data"]["columns"] = {}
    bad = invoke("validate", good, write_recipe(refused, "bad.yaml"))
    assert bad.exit_code == 2
    # LoRA targets the model does not have: validate refuses what run refuses, from the config's module tree.
    for command in (["validate", good], ["run", good, "--dry-run", "--no-estimate"]):
        targets = invoke(*command, "lora.targets=[foo]")
        assert targets.exit_code == 2 and "lora.targets: no linear layer named 'foo'" in targets.output, targets.output
    assert invoke("validate", good, "lora.targets=[q_proj, fc1]").exit_code == 0


@pytest.mark.slow  # a real subprocess or a kill -9: `make test` runs it, the fast loop does not
def test_no_traceback_in_a_real_process(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "task: classification\nmodel: {name_or_path: x}\ndata: {train: a.jsonl, eval: b.jsonl}\nlora: {rank: 4}\n"
    )
    result = subprocess.run([sys.executable, "-m", "finetune", "validate", str(recipe)], capture_output=True, text=True)
    assert result.returncode == 2
    assert "lora.rank: unknown key (did you mean 'r'?)" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("case", "words"),
    [
        ("one class", "data.train: classification needs at least two classes"),
        ("list labels in a single-label eval", "label must be a string or an integer"),
        ("data.labels without a training label", "are not in data.labels"),
        ("multi-label, every training list empty", "found no labels at all"),
    ],
)
def test_validate_refuses_the_labels_run_refuses(case, words, tiny_models, tmp_path, write_recipe):
    """What featurize decides from the labels (fit_state, then each row's encoding): validate passed these, run
    refused them (exit 3)."""
    from conftest import corpus

    rows = corpus(60)
    train, evaluation = rows[:40], rows[40:]
    data: dict = {}
    if case == "one class":
        train = [{**row, "label": "sports"} for row in train]
        evaluation = [{**row, "label": "sports"} for row in evaluation]
    elif case == "list labels in a single-label eval":
        evaluation = [{**row, "label": [row["label"]]} for row in evaluation]
    elif case == "data.labels without a training label":
        data["labels"] = sorted({row["label"] for row in train})[:-1]
    else:
        train = [{**row, "label": []} for row in train]
        evaluation = [{**row, "label": []} for row in evaluation]
    files = {
        "train": write_jsonl(tmp_path / "train.jsonl", train),
        "eval": write_jsonl(tmp_path / "eval.jsonl", evaluation),
    }
    recipe = classification_recipe(tiny_models["bert"], files, tmp_path / "run")
    recipe["data"].update(data)
    path = write_recipe(recipe)
    for command in (("validate", path), ("run", path, "--dry-run", "--no-estimate")):
        result = invoke(*command)
        assert result.exit_code == 3 and words in " ".join(result.output.split()), (command[0], result.output)


def test_an_eval_label_written_otherwise_is_pointed_at_its_training_twin(tiny_models, tmp_path, write_recipe):
    """'SPORTS ' against training's 'sports' was refused as a label no training row has, without saying why."""
    from conftest import corpus

    rows = corpus(60)
    evaluation = [{**row, "label": "SPORTS " if row["label"] == "sports" else row["label"]} for row in rows[40:]]
    files = {
        "train": write_jsonl(tmp_path / "train.jsonl", rows[:40]),
        "eval": write_jsonl(tmp_path / "eval.jsonl", evaluation),
    }
    path = write_recipe(classification_recipe(tiny_models["bert"], files, tmp_path / "run"))
    for command in (("validate", path), ("run", path, "--dry-run", "--no-estimate")):
        result = invoke(*command)
        said = " ".join(result.output.split())
        assert result.exit_code == 3 and "(training has 'sports', which differs only in case or spaces)" in said, said


def test_a_model_trained_on_text_pairs_refuses_rows_without_their_pair(tiny_models):
    """predict scored rows without `text_pair` on their text alone, silently, for a model trained on pairs."""
    from datasets import Dataset

    from finetune.errors import DataError
    from finetune.models.references import load_tokenizer
    from finetune.recipe.schema import Recipe
    from finetune.tasks.classification import ClassificationTask

    task = ClassificationTask()
    recipe = Recipe.model_validate({"task": "classification", "model": {"name_or_path": "x"}, "data": {"train": "a"}})
    pairs = Dataset.from_dict({"text": ["a", "b"], "text_pair": ["c", "d"], "label": ["x", "y"]})
    state = {**task.fit_state(pairs, recipe), "family": "bert"}
    assert state["text_pairs"] is True
    tokenizer = load_tokenizer(str(tiny_models["bert"]), "bert")
    assert len(task.featurize(pairs, tokenizer, recipe, state, "data.eval").dataset) == 2
    alone = Dataset.from_dict({"text": ["a"]})
    with pytest.raises(DataError, match="trained on text pairs"):
        task.featurize(alone, tokenizer, recipe, state, "stdin", labeled=False)
    singles = Dataset.from_dict({"text": ["a", "b"], "label": ["x", "y"]})
    single_state = {**task.fit_state(singles, recipe), "family": "bert"}
    assert single_state["text_pairs"] is False
    with pytest.raises(DataError, match="trained on single texts"):  # a pair the model never saw
        task.featurize(pairs, tokenizer, recipe, single_state, "stdin", labeled=False)
    older = {k: v for k, v in state.items() if k != "text_pairs"}  # an adapter saved before it was recorded
    assert len(task.featurize(alone, tokenizer, recipe, older, "stdin", labeled=False).dataset) == 1


def test_a_decoders_pad_id_in_its_config_is_the_tokenizers(tiny_models):
    """A checkpoint whose config says pad 3 while its tokenizer pads with EOS: the classification head read every
    shorter row at a padding position, so a row's prediction changed with the other rows of its batch."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from finetune.models.families import FAMILIES
    from finetune.tasks import TASKS

    tokenizer = AutoTokenizer.from_pretrained(tiny_models["llama"])
    tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForSequenceClassification.from_pretrained(tiny_models["llama"], num_labels=3, pad_token_id=3)
    assert tokenizer.pad_token_id != 3
    TASKS["classification"].prepare_model(model, tokenizer, FAMILIES["gpt"])
    model.eval()
    with torch.no_grad():
        alone = model(**tokenizer(["goal match"], return_tensors="pt")).logits
        batch = model(**tokenizer(["goal match", "goal match the team won the cup"], return_tensors="pt", padding=True))
    torch.testing.assert_close(batch.logits[:1], alone, rtol=1e-5, atol=1e-6)


def test_an_encoders_pad_id_in_its_config_is_its_own(tiny_models):
    """RoBERTa-style encoders count positions from the config's pad id as built: a merged config given the
    tokenizer's would count them otherwise on reload. An encoder's config keeps its own."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from finetune.models.families import FAMILIES
    from finetune.tasks import TASKS

    tokenizer = AutoTokenizer.from_pretrained(tiny_models["bert"])
    model = AutoModelForSequenceClassification.from_pretrained(tiny_models["bert"], num_labels=3, pad_token_id=3)
    assert tokenizer.pad_token_id != 3
    TASKS["classification"].prepare_model(model, tokenizer, FAMILIES["bert"])
    assert model.config.pad_token_id == 3
