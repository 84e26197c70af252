"""A learned watermark end to end through the commands: `finetune run` trains the blocks and the extractor and keeps
them (and the message, as the key) beside the adapter; `detect` reads the bits back with a binomial test; `predict`
marks with another message; merge/export refuse; a BART recipe is refused before anything loads."""

from __future__ import annotations

import json
import stat

import yaml
from conftest import write_jsonl
from helpers import invoke
from safetensors import safe_open

from finetune.watermark import learned
from tests.tasks.test_generation import copy_rows, generation_recipe

MESSAGE = "10110010"
OTHER = "01001101"


def learned_recipe(model_dir, root, **watermark) -> dict:
    rows = copy_rows(40)
    data = {"train": write_jsonl(root / "train.jsonl", rows[:24]), "eval": write_jsonl(root / "eval.jsonl", rows[24:])}
    recipe = generation_recipe(
        "copywriting", model_dir, data, root / "run", train={"epochs": 1}, eval={"max_new_tokens": 16}
    )
    recipe["eval"]["watermark"] = {
        "method": "learned",
        "key": 5,
        "bits": 8,
        "message": MESSAGE,
        "extractor_width": 32,
        **watermark,
    }
    return recipe


def test_a_learned_watermark_through_the_commands(tiny_models, tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(learned_recipe(tiny_models["llama"], tmp_path)))
    result = invoke("run", path)
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    adapter = run / "adapter"
    assert (adapter / "learned_watermark.safetensors").is_file()
    message_file = adapter / "watermark.message"
    assert message_file.read_text().strip() == MESSAGE and stat.S_IMODE(message_file.stat().st_mode) == 0o600
    for name in ("recipe.yaml", "manifest.json", "README.md", "adapter/finetune.json"):
        assert MESSAGE not in (run / name).read_text(), name  # kept like the key, shown nowhere else
    (checkpoint,) = sorted((run / "checkpoints").glob("step-*"))  # exact resume carries the watermark's weights
    with safe_open(str(checkpoint / "trainable.safetensors"), "pt") as saved:
        assert any(k.startswith("learned_watermark.blocks.") for k in saved.keys())  # noqa: SIM118 (a safetensors file)
    assert (checkpoint / "adapter" / "learned_watermark.safetensors").is_file()
    metrics = json.loads((run / "metrics.json").read_text())["metrics"]
    predictions = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    assert metrics["watermark_bit_accuracy"] == sum(p["bit_accuracy"] for p in predictions) / len(predictions)
    assert not any("message" in p for p in predictions)  # decoded bits would give the run's message away

    # detect: the same bits read again from the text alone, against the run's message or another.
    result = invoke("detect", run, "--input", run / "predictions.jsonl", "--json")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    for row, prediction in zip(document["rows"], predictions):
        assert row["p_value"] == prediction["p_value"] and row["bit_accuracy"] == prediction["bit_accuracy"]
        matches = sum(a == b for a, b in zip(row["message"], MESSAGE))
        assert row["bit_accuracy"] == matches / 8
    summary = document["summary"]
    assert summary["rows"] == len(predictions) and summary["false_positive_rate"] <= summary["p_threshold"]
    # Tested against what the extractor reads from the run's own (unmarked) training references.
    assert summary["calibrated"] is True
    counts = json.loads((adapter / "learned_watermark_calibration.json").read_text())
    assert counts["texts"] > 0 and len(counts["ones"]) == 8
    chances = learned.match_probabilities(MESSAGE, learned.ones_rate(counts))
    for row in document["rows"]:
        assert row["p_value"] == learned.match_tail(round(row["bit_accuracy"] * 8), chances)
    assert summary["least_p_value"] == learned.match_tail(8, chances)
    result = invoke("detect", run, "--input", run / "predictions.jsonl", "--json", "--message", OTHER)
    assert result.exit_code == 0, result.output
    for row in json.loads(result.stdout)["rows"]:
        assert row["bit_accuracy"] == sum(a == b for a, b in zip(row["message"], OTHER)) / 8
    result = invoke("detect", run, "--input", run / "predictions.jsonl", "--message", "101")
    assert result.exit_code == 2 and "--message: a message is a string of exactly 8" in result.output

    # predict marks with a message given on the command line; what it generates is read back against it.
    inputs = write_jsonl(tmp_path / "inputs.jsonl", [{"prompt": p["prompt"]} for p in predictions[:4]])
    result = invoke("predict", run, "--input", inputs, "--message", OTHER)
    assert result.exit_code == 0, result.output
    marked = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(marked) == 4 and all("prediction" in row for row in marked)

    # merge/export cannot carry the cross-attention blocks.
    for command in (("merge", run, "--output", tmp_path / "merged"), ("export", run, "--output", tmp_path / "m.gguf")):
        result = invoke(*command)
        assert result.exit_code == 2 and "cannot live in a merged checkpoint or a GGUF" in result.output


def test_a_learned_watermark_on_bart_is_refused_before_loading(tiny_models, tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(learned_recipe(tiny_models["bart"], tmp_path)))
    result = invoke("validate", path)
    assert result.exit_code == 2
    assert "eval.watermark.method: learned is built for GPT-family decoders" in result.output


def stop_a_run_and_its_twin(tiny_models, tmp_path, monkeypatch, **watermark) -> dict:
    """Two runs of one learned-watermark recipe (2 epochs, checkpoints every 2 steps): "whole" to the end, and
    "stopped" at step 3 (exit 75, a checkpoint kept). The recipes' paths, by name."""
    from tests.training.test_resume_in_process import stop_at_step

    paths = {}
    for name in ("whole", "stopped"):
        recipe = learned_recipe(tiny_models["llama"], tmp_path, **watermark)
        recipe["train"].update({"epochs": 2, "checkpoint_every": 2, "log_every": 1})
        recipe["output"]["dir"] = str(tmp_path / name)
        paths[name] = tmp_path / f"{name}.yaml"
        paths[name].write_text(yaml.safe_dump(recipe))
    # --no-estimate: the plan's estimate would run training steps of its own, and the stop counts steps.
    assert invoke("run", paths["whole"], "--no-estimate").exit_code == 0
    with monkeypatch.context() as patch:
        stop_at_step(patch, 3)
        assert invoke("run", paths["stopped"], "--no-estimate").exit_code == 75
    return paths


def resume_to_the_whole_runs_bytes(paths: dict, tmp_path) -> None:
    """`--resume auto` the stopped run; it ends with the whole run's adapter, watermark and training log."""
    from tests.training.test_resume import log_losses

    resumed = invoke("run", paths["stopped"], "--resume", "auto", "--no-estimate")
    assert resumed.exit_code == 0, resumed.output
    for file in ("adapter_model.safetensors", "learned_watermark.safetensors"):
        assert (tmp_path / "stopped" / "adapter" / file).read_bytes() == (
            tmp_path / "whole" / "adapter" / file
        ).read_bytes()
    assert log_losses(tmp_path / "stopped") == log_losses(tmp_path / "whole")


def test_a_stopped_learned_watermark_run_resumes_exactly(tiny_models, tmp_path, monkeypatch):
    """The blocks and extractor are checkpointed with the LoRA, the messages and Gumbel draws come from the
    checkpointed generator: a run stopped at step 3 and resumed ends with the uninterrupted run's bytes."""
    resume_to_the_whole_runs_bytes(stop_a_run_and_its_twin(tiny_models, tmp_path, monkeypatch), tmp_path)
