"""Evaluation during training with the task's real metrics: best weights, early stopping, exact resume,
and every checkpoint evaluable."""

from __future__ import annotations

import json

import pytest
from conftest import classification_recipe
from helpers import invoke_wide as invoke

from tests.training.test_resume import adapter_bytes, killed_run, log_losses


def metrics_of(run):
    return json.loads((run / "metrics.json").read_text())


def test_evaluating_during_training_changes_nothing_in_training(tiny_models, topic_data, write_recipe, tmp_path):
    """With eval.keep: last, a run that evaluates has the same losses and adapter bytes as one that does not."""

    def run(name, **evaluation):
        recipe = classification_recipe(tiny_models["gpt2"], topic_data, tmp_path / name, epochs=3, log_every=1)
        recipe["lora"]["dropout"] = 0.2  # draws from the RNG every step: evaluation must not shift it
        recipe["eval"] = evaluation
        result = invoke("run", write_recipe(recipe, f"{name}.yaml"))
        assert result.exit_code == 0, result.output
        return tmp_path / name

    plain, watched = run("plain"), run("watched", every=4)
    assert log_losses(watched) == log_losses(plain)
    assert adapter_bytes(watched) == adapter_bytes(plain)
    history = metrics_of(watched)["evaluation"]["history"]
    expected = [*range(4, 45, 4), 45]  # 15 steps an epoch x 3: every 4 steps, and the last
    assert [e["step"] for e in history] == expected
    assert all({"accuracy", "macro_f1", "eval_loss"} <= set(e["metrics"]) for e in history)
    lines = (watched / "eval_log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == expected
    # The last evaluation scored the same weights as the final evaluation, on the same rows.
    assert history[-1]["metrics"]["accuracy"] == pytest.approx(metrics_of(watched)["metrics"]["accuracy"])


def test_patience_running_out_at_the_last_evaluation_is_not_an_early_stop(
    tiny_models, topic_data, write_recipe, tmp_path
):
    """No evaluation after the first improves by min_delta 1.0, so patience 1 runs out at the second: the
    schedule's last step. Nothing was skipped: the run is not reported (or printed) as stopped early."""
    out = tmp_path / "run"
    recipe = classification_recipe(
        tiny_models["bert"], topic_data, out, epochs=2, early_stopping={"patience": 1, "min_delta": 1.0}
    )
    recipe["eval"] = {"every": "epoch", "best_metric": "eval_loss"}
    result = invoke("run", write_recipe(recipe))
    assert result.exit_code == 0, result.output
    document = metrics_of(out)
    assert len(document["evaluation"]["history"]) == 2
    assert document["training"]["stopped_early"] is False and document["evaluation"]["stopped_early"] is False
    assert "stopped early" not in result.output


def test_keep_best_with_early_stopping(tiny_models, topic_data, write_recipe, tmp_path):
    out = tmp_path / "run"
    recipe = classification_recipe(
        tiny_models["bert"], topic_data, out, epochs=10, lr=3e-2, early_stopping={"patience": 2}, keep_checkpoints=1
    )
    recipe["eval"] = {"every": "epoch", "keep": "best", "best_metric": "eval_loss"}
    result = invoke("run", write_recipe(recipe))
    assert result.exit_code == 0, result.output
    document = metrics_of(out)
    evaluation = document["evaluation"]
    history = evaluation["history"]
    losses = [e["metrics"]["eval_loss"] for e in history]
    best = min(range(len(losses)), key=losses.__getitem__)
    assert evaluation["best_step"] == history[best]["step"] == evaluation["kept_step"]
    # Stopped once the metric had not improved for 2 evaluations (or ran the whole schedule).
    if evaluation["stopped_early"]:
        assert len(history) - 1 - best == 2 and document["training"]["stopped_early"] is True
        assert document["training"]["steps"] < 10 * 15 and "stopped early" in result.output
    # The kept weights score what the best evaluation scored.
    assert document["metrics"]["eval_loss"] == pytest.approx(evaluation["best_value"], rel=1e-5)
    # The best checkpoint is never pruned, whatever keep_checkpoints says.
    on_disk = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert f"step-{evaluation['best_step']:08d}" in on_disk
    table = invoke("eval", out, "--all-checkpoints", "--json")
    assert table.exit_code == 0, table.output
    rows = json.loads(table.output)["checkpoints"]
    assert len(rows) >= 2 and rows[-1]["weights"] == "adapter (kept)"
    by_step = {r["step"]: r["metrics"] for r in rows if r["weights"] != "adapter (kept)"}
    assert by_step[evaluation["best_step"]]["eval_loss"] == pytest.approx(rows[-1]["metrics"]["eval_loss"], rel=1e-5)
    assert len(list((out / "evals").iterdir())) == 1


@pytest.mark.slow  # a real subprocess or a kill -9: `make test` runs it, the fast loop does not
def test_kill_9_during_a_run_with_evaluation_and_early_stopping_resumes_exactly(
    tiny_models, topic_data, write_recipe, tmp_path
):
    def recipe(name):
        r = classification_recipe(
            tiny_models["gpt2"],
            topic_data,
            tmp_path / name,
            epochs=6,
            checkpoint_every=5,
            early_stopping={"patience": 2, "min_delta": 0.0},
        )
        r["lora"]["dropout"] = 0.1
        r["eval"] = {"every": 3, "keep": "best"}
        return write_recipe(r, f"{name}.yaml")

    whole, broken = recipe("whole"), recipe("broken")
    assert invoke("run", whole).exit_code == 0
    killed_run("step", 8, broken)
    resumed = invoke("run", broken, "--resume", "auto")
    assert resumed.exit_code == 0, resumed.output
    assert "resuming from" in resumed.output
    assert adapter_bytes(tmp_path / "broken") == adapter_bytes(tmp_path / "whole")
    assert log_losses(tmp_path / "broken") == log_losses(tmp_path / "whole")
    history = lambda name: [(e["step"], e["metrics"]) for e in metrics_of(tmp_path / name)["evaluation"]["history"]]
    assert history("broken") == history("whole")
    assert (tmp_path / "broken" / "eval_log.jsonl").read_text() != ""


def test_evaluation_settings_are_checked(tiny_models, topic_data, write_recipe, tmp_path):
    recipe = classification_recipe(tiny_models["bert"], topic_data, tmp_path / "run", early_stopping={"patience": 2})
    recipe["eval"] = {"keep": "best", "best_metric": "rougeL"}
    result = invoke("validate", write_recipe(recipe))
    assert result.exit_code == 2
    for words in (
        "eval.keep: best needs evaluations during training",
        "train.early_stopping: needs evaluations",
        "eval.best_metric: unknown metric 'rougeL'",
    ):
        assert words in result.output


def test_sampling_evaluations_leave_the_training_random_streams_alone(tiny_models, write_recipe, tmp_path):
    """Sampled generation draws from the RNG during evaluation; training must not notice (dropout masks, order)."""
    from conftest import write_jsonl

    from tests.tasks.test_generation import copy_rows, generation_recipe

    rows = copy_rows(32)
    data = {"train": write_jsonl(tmp_path / "t.jsonl", rows[:24]), "eval": write_jsonl(tmp_path / "e.jsonl", rows[24:])}

    def run(name, **evaluation):
        recipe = generation_recipe(
            "copywriting",
            tiny_models["llama"],
            data,
            tmp_path / name,
            train={"epochs": 2, "log_every": 1},
            eval={"temperature": 0.9, "max_new_tokens": 6, **evaluation},
        )
        recipe["lora"]["dropout"] = 0.3
        result = invoke("run", write_recipe(recipe, f"{name}.yaml"))
        assert result.exit_code == 0, result.output
        return tmp_path / name

    plain, watched = run("plain"), run("watched", every=2)
    assert len(metrics_of(watched)["evaluation"]["history"]) >= 3
    assert log_losses(watched) == log_losses(plain)
    assert adapter_bytes(watched) == adapter_bytes(plain)
