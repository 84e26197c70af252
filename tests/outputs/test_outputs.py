"""What a run leaves behind: adapters peft loads, merged checkpoints, model card, pictures, trackers, CI output."""

import json
from xml.etree import ElementTree

import pytest
import torch
from conftest import classification_recipe, corpus, write_jsonl
from helpers import invoke

from tests.tasks.test_generation import copy_rows, generation_recipe


@pytest.fixture(scope="module")
def classification_run(tiny_models, tmp_path_factory):
    """A finished tiny-GPT-2 classification run (3 labels; GPT needs its pad token to classify)."""
    root = tmp_path_factory.mktemp("outputs")
    rows = corpus(150)
    data = {
        "train": write_jsonl(root / "train.jsonl", rows[:120]),
        "eval": write_jsonl(root / "eval.jsonl", rows[120:]),
    }
    recipe = classification_recipe(tiny_models["gpt2"], data, root / "run", epochs=3)
    path = root / "recipe.yaml"
    path.write_text(json.dumps(recipe))
    result = invoke("run", path)
    assert result.exit_code == 0, result.output
    return root / "run", data


def eval_texts(data) -> list[str]:
    return [json.loads(line)["text"] for line in data["eval"].read_text().splitlines()]


def logits_of(model, tokenizer, texts):
    with torch.no_grad():
        batch = tokenizer(texts, return_tensors="pt", padding=True)
        return model.eval()(**batch).logits


def test_auto_peft_model_loads_the_adapter_with_its_labels(classification_run):
    from peft import AutoPeftModelForSequenceClassification
    from transformers import AutoTokenizer

    run, data = classification_run
    model = AutoPeftModelForSequenceClassification.from_pretrained(str(run / "adapter"))
    tokenizer = AutoTokenizer.from_pretrained(str(run / "adapter"))
    texts = eval_texts(data)
    predicted = [model.config.id2label[int(i)] for i in logits_of(model, tokenizer, texts).argmax(-1)]
    ours = [json.loads(line)["prediction"] for line in (run / "predictions.jsonl").read_text().splitlines()]
    assert predicted == ours
    meta = json.loads((run / "adapter" / "finetune.json").read_text())
    assert meta["task"] == "classification" and meta["state"]["labels"] == ["cooking", "sports", "weather"]
    assert model.config.id2label == {0: "cooking", 1: "sports", 2: "weather"}


def test_merged_checkpoint_predicts_like_the_adapter(classification_run, tmp_path):
    from peft import AutoPeftModelForSequenceClassification
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    run, data = classification_run
    assert invoke("merge", run, "--output", tmp_path / "merged").exit_code == 0
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    adapter = AutoPeftModelForSequenceClassification.from_pretrained(str(run / "adapter"))
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    texts = eval_texts(data)
    torch.testing.assert_close(
        logits_of(merged, tokenizer, texts), logits_of(adapter, tokenizer, texts), rtol=1e-4, atol=1e-5
    )
    assert merged.config.id2label == adapter.config.id2label


def test_model_card_and_pictures(classification_run):
    run, _ = classification_run
    card = (run / "README.md").read_text()
    metrics = json.loads((run / "metrics.json").read_text())["metrics"]
    assert f"| accuracy | {metrics['accuracy']:.4f} |" in card
    for needed in (
        "## Data",
        "sha256",
        "LoRA: r=4",
        "## Reproduce",
        "finetune run",
        "## Limitations",
        "AutoPeftModelForSequenceClassification",
        "![training_curves.png]",
    ):
        assert needed in card, needed
    for picture in ("training_curves.png", "confusion_matrix.png"):
        assert (run / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gates_compare_and_junit(classification_run, tmp_path):
    run, _ = classification_run
    report = tmp_path / "gates.xml"
    failing = invoke("eval", run, "--gate", "eval_loss<=0.001", "--gate", "macro_f1>=0.0", "--junit", report)
    assert failing.exit_code == 4, failing.output
    suite = ElementTree.parse(report).getroot().find("testsuite")
    cases = {case.get("name"): case.find("failure") is not None for case in suite.iter("testcase")}
    assert cases == {"eval_loss<=0.001": True, "macro_f1>=0": False} and suite.get("failures") == "1"
    passing = invoke("eval", run, "--gate", "accuracy>=0.0", "--compare", run, "--junit", report, "--json")
    assert passing.exit_code == 0, passing.output
    assert json.loads(passing.output)["comparison"]["metrics"]["accuracy"]["passed"] is True
    assert len(list(ElementTree.parse(report).getroot().iter("testcase"))) >= 2

    better = json.loads((run / "metrics.json").read_text())
    better["metrics"]["accuracy"] += 0.05
    baseline = tmp_path / "baseline.json"
    baseline.write_text(json.dumps(better))
    rescored = invoke(
        "eval",
        "--predictions",
        run / "predictions.jsonl",
        "--task",
        "classification",
        "--compare",
        baseline,
        "--tolerance",
        "0.02",
        "--junit",
        report,
    )
    assert rescored.exit_code == 4 and "accuracy regressed against" in rescored.output
    failure = next(
        c for c in ElementTree.parse(report).getroot().iter("testcase") if c.get("name") == "accuracy vs baseline"
    )
    assert failure.find("failure") is not None
    loose = invoke(
        "eval",
        "--predictions",
        run / "predictions.jsonl",
        "--task",
        "classification",
        "--compare",
        baseline,
        "--tolerance",
        "0.1",
    )
    assert loose.exit_code == 0, loose.output
    missing = invoke("eval", run, "--compare", tmp_path / "nowhere")
    assert missing.exit_code == 2 and "no metrics.json there" in missing.output


def test_tensorboard_tracker_and_a_missing_tracker_package(
    tiny_models, topic_data, write_recipe, tmp_path, monkeypatch
):
    pytest.importorskip(
        "tensorboard", reason="the tensorboard tracker needs the tensorboard package (finetune[trackers])"
    )
    recipe = classification_recipe(tiny_models["bert"], topic_data, tmp_path / "run", report_to=["tensorboard"])
    result = invoke("run", write_recipe(recipe))
    assert result.exit_code == 0, result.output
    events = list((tmp_path / "run" / "trackers").rglob("events.out.tfevents.*"))
    assert events and sum(e.stat().st_size for e in events) > 0

    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    recipe["train"]["report_to"] = ["wandb"]
    refused = invoke("run", write_recipe(recipe))
    assert refused.exit_code == 2 and "wandb needs the wandb package" in refused.output


def test_causal_lm_adapter_loads_with_auto_peft(tiny_models, write_recipe, tmp_path):
    from peft import AutoPeftModelForCausalLM

    rows = copy_rows(40)
    data = {
        "train": write_jsonl(tmp_path / "train.jsonl", rows[:32]),
        "eval": write_jsonl(tmp_path / "eval.jsonl", rows[32:]),
    }
    out = tmp_path / "run"
    result = invoke("run", write_recipe(generation_recipe("copywriting", tiny_models["gpt2"], data, out)))
    assert result.exit_code == 0, result.output
    model = AutoPeftModelForCausalLM.from_pretrained(str(out / "adapter")).eval()
    assert model.peft_config["default"].task_type == "CAUSAL_LM"
    meta = json.loads((out / "adapter" / "finetune.json").read_text())
    assert meta["generation"]["max_new_tokens"] == 8
    # Plain transformers greedy decoding, one prompt at a time, reproduces what the run predicted (batched).
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(out / "adapter"))
    predicted = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(predicted) == 8 and any(row["prediction"].strip() for row in predicted)
    for row in predicted:
        ids = torch.tensor([tokenizer(row["prompt"])["input_ids"]])
        output = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=8,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        assert tokenizer.decode(output[0, ids.shape[1] :], skip_special_tokens=True) == row["prediction"]


def test_a_classifier_checkpoint_with_another_number_of_labels_is_tuned_and_loads_elsewhere(
    tiny_models, topic_data, write_recipe, tmp_path
):
    """A sentiment model's 2-output head tuned for the topics' labels: loading it was an internal error (transformers
    refuses mismatched shapes), and AutoPeftModel then failed on the linked base weights the same way."""
    from peft import AutoPeftModelForSequenceClassification
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    two_labels = tmp_path / "sentiment-bert"
    AutoModelForSequenceClassification.from_pretrained(tiny_models["bert"], num_labels=2).save_pretrained(two_labels)
    AutoTokenizer.from_pretrained(tiny_models["bert"]).save_pretrained(two_labels)
    recipe = write_recipe(classification_recipe(two_labels, topic_data, tmp_path / "run", epochs=1))
    result = invoke("run", recipe)
    assert result.exit_code == 0, result.output
    labels = json.loads((tmp_path / "run" / "metrics.json").read_text())["metrics"]
    assert "accuracy" in labels
    loaded = AutoPeftModelForSequenceClassification.from_pretrained(tmp_path / "run" / "adapter")
    assert loaded.config.num_labels > 2
    assert invoke("eval", tmp_path / "run", "--output", tmp_path / "ev").exit_code == 0


def test_a_checkpoint_whose_body_does_not_match_its_config_is_refused(tiny_models, topic_data, write_recipe, tmp_path):
    """Only the task's head may differ from the checkpoint: another mismatched weight is a damaged checkpoint."""
    import shutil

    broken = tmp_path / "bert"
    shutil.copytree(tiny_models["bert"], broken)
    config = json.loads((broken / "config.json").read_text())
    config["intermediate_size"] *= 2
    (broken / "config.json").write_text(json.dumps(config))
    result = invoke("run", write_recipe(classification_recipe(broken, topic_data, tmp_path / "run")))
    assert result.exit_code == 2, result.output
    assert "shapes differ from its config" in result.output and "intermediate" in result.output


def test_junit_to_stdout(tmp_path, monkeypatch):
    """`--junit -` wrote a file named `-` into the working directory; it is stdout now (the table: stderr)."""
    from conftest import write_jsonl

    monkeypatch.chdir(tmp_path)
    rows = [{"text": f"t{i}", "label": "a", "prediction": "a" if i < 8 else "b"} for i in range(10)]
    predictions = write_jsonl(tmp_path / "predictions.jsonl", rows)
    args = ("eval", "--predictions", predictions, "--task", "classification", "--gate", "accuracy>=0.9")
    result = invoke(*args, "--junit", "-")
    assert result.exit_code == 4, result.output
    suite = ElementTree.fromstring(result.stdout).find("testsuite")
    assert suite is not None and suite.get("failures") == "1"
    assert "accuracy" in result.stderr and not (tmp_path / "-").exists()
    both = invoke(*args, "--junit", "-", "--json")
    assert both.exit_code == 2 and "both print to stdout" in both.output
