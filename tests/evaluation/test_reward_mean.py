"""GRPO's metric: `reward_mean`, the mean of the task's own reward (task.rewards) over the evaluation's prediction
rows, with a bootstrap interval over units; gateable in a GRPO recipe, refused in others; each row's reward is
kept on it (`task_reward`), so resampling never scores it again and code never runs again for it."""

from __future__ import annotations

import random

import numpy as np
import pytest

from finetune.evaluation import intervals as iv
from finetune.evaluation.scoring import failed_gates, metrics_document, score
from finetune.recipe.gates import parse_gate
from finetune.recipe.schema import EvalSection, Recipe
from finetune.tasks import get_task
from finetune.tasks.generative import Rewards
from tests.evaluation.test_intervals import copy_rows


def qa_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        gold = f"the answer {i} is here"
        guess = rng.choice([gold, f"answer {i}", "no idea", f"the answer {i}"])
        rows.append({"question": f"q{i}", "answers": {"text": [gold], "answer_start": [0]}, "prediction": guess})
    return rows


@pytest.mark.parametrize(("task_name", "make_rows"), [("qa", qa_rows), ("copywriting", copy_rows)])
def test_reward_mean_is_the_mean_of_the_tasks_rewards_with_its_interval(task_name, make_rows, monkeypatch):
    monkeypatch.setattr(iv, "RESAMPLES", 200)
    task, settings = get_task(task_name, "generative" if task_name == "qa" else None), EvalSection()
    rows = make_rows(20)
    expected = task.rewards([dict(r) for r in rows], settings).values  # type: ignore[attr-defined]
    document = metrics_document(task_name, score(task, rows, settings, intervals=True, rewards=True), [])
    assert document["metrics"]["reward_mean"] == pytest.approx(float(np.mean(expected)), abs=1e-12)
    assert [r["task_reward"] for r in rows] == pytest.approx(expected, abs=1e-12)
    # The interval: the plain percentile bootstrap of the mean over the same resampled rows.
    drawn = np.random.default_rng(iv.SEED).integers(0, len(rows), size=(iv.RESAMPLES, len(rows)))
    low, high = np.percentile(np.asarray(expected)[drawn].mean(axis=1), [2.5, 97.5])
    got = document["intervals"]["reward_mean"]
    assert got["method"] == "bootstrap" and got["low"] == pytest.approx(low) and got["high"] == pytest.approx(high)


def test_no_reward_mean_without_grpo():
    task, settings = get_task("copywriting"), EvalSection()
    rows = copy_rows(6)
    assert "reward_mean" not in score(task, rows, settings, intervals=True)["metrics"]
    assert all("task_reward" not in r for r in rows)


def test_rewards_are_scored_once_and_reused(monkeypatch):
    """Codegen's reward runs the programs (in the sandbox): once for the evaluation, never for its resamples."""
    task, settings = get_task("copywriting"), EvalSection()
    calls = []
    original = type(task).rewards

    def counted(self, rows, settings_):
        calls.append(len(rows))
        return original(self, rows, settings_)

    monkeypatch.setattr(type(task), "rewards", counted)
    monkeypatch.setattr(iv, "RESAMPLES", 100)
    rows = copy_rows(12)
    scored = score(task, rows, settings, intervals=True, rewards=True)
    assert calls == [12] and "reward_mean" in scored["intervals"].estimates
    score(task, rows, settings, rewards=True)  # rows that hold their reward keep it
    assert calls == [12]


def test_samples_of_one_prompt_count_each_and_thumbs_down_rows_do_not(monkeypatch):
    task, settings = get_task("copywriting"), EvalSection()
    monkeypatch.setattr(
        type(task), "rewards", lambda self, rows, s: Rewards([float(r["prediction"] == "yes") for r in rows])
    )
    rows = [
        {"prompt": "a", "completion": "c", "prediction": "yes", "sample": 0},
        {"prompt": "a", "completion": "c", "prediction": "no", "sample": 1},
        {"prompt": "b", "completion": "c", "prediction": "yes", "sample": 0},
        {"prompt": "b", "completion": "c", "prediction": "yes", "sample": 1},
        {"prompt": "d", "completion": "c", "prediction": "yes", "desirable": False},
    ]
    metrics = score(task, rows, settings, rewards=True)["metrics"]
    assert metrics["reward_mean"] == pytest.approx(3 / 4) and "task_reward" not in rows[4]


def test_a_gate_on_reward_mean_is_judged():
    task, settings = get_task("copywriting"), EvalSection()
    rows = copy_rows(10)
    scored = score(task, rows, settings, rewards=True)
    value = scored["metrics"]["reward_mean"]
    passing, failing = parse_gate(f"reward_mean>={value - 0.01:.4f}"), parse_gate(f"reward_mean>={value + 0.01:.4f}")
    document = metrics_document("copywriting", scored, [passing, failing])
    assert document["gates"][str(passing)]["passed"] is True and document["gates"][str(failing)]["passed"] is False
    assert failed_gates(document) == [str(failing)]


BASE = {"task": "qa", "mode": "generative", "model": {"name_or_path": "m"}, "data": {"train": "t.jsonl"}}


@pytest.mark.parametrize("objective", ["grpo", "sft", "dpo"])
def test_a_recipe_gate_on_reward_mean_needs_grpo(objective):
    recipe = Recipe.model_validate(
        {**BASE, "train": {"objective": objective}, "eval": {"gates": {"reward_mean": ">=0.5"}}}
    )
    why = get_task("qa", "generative").unavailable_metrics(recipe, ["reward_mean"]).get("reward_mean")
    if objective == "grpo":
        assert why is None
    else:
        assert why == (
            "is reported by train.objective grpo (the mean of the task's reward of each prediction); this recipe's "
            f"objective is {objective}"
        )


def test_a_task_without_a_reward_does_not_know_reward_mean():
    assert get_task("classification").knows_metric("reward_mean") is False
    assert get_task("copywriting").knows_metric("reward_mean") is True


def test_a_grpo_runs_metrics_hold_reward_mean_and_judge_its_gate(tiny_models, tmp_path, write_recipe):
    """A tiny GRPO run: metrics.json's reward_mean is the mean of task.rewards over its predictions.jsonl, with an
    interval, and the recipe's gate on it is judged; the same gate in an SFT recipe is refused (exit 2)."""
    import json

    from tests.helpers import invoke
    from tests.training.test_grpo import _recipe

    recipe = _recipe(tiny_models["gpt2"], tmp_path, max_steps=2)
    recipe["eval"]["gates"] = {"reward_mean": ">=0"}
    result = invoke("run", str(write_recipe(recipe)))
    assert result.exit_code == 0, result.output
    document = json.loads((tmp_path / "run" / "metrics.json").read_text())
    predictions = [json.loads(line) for line in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()]
    task = get_task("copywriting")
    fresh = [{k: v for k, v in row.items() if k != "task_reward"} for row in predictions]
    values = task.rewards(fresh, EvalSection(max_new_tokens=6)).values  # type: ignore[attr-defined]
    assert document["metrics"]["reward_mean"] == pytest.approx(sum(values) / len(values), abs=1e-12)
    assert document["intervals"]["reward_mean"]["method"] in ("bootstrap", "wilson")
    assert document["gates"]["reward_mean>=0"] == {
        "metric": "reward_mean",
        "value": document["metrics"]["reward_mean"],
        "passed": True,
    }
    # Re-scored from its predictions (`eval --predictions`), the reward is recomputed as every metric is: it was
    # read from each row's stored task_reward (stale after an edit, 5.0 accepted, a row without one left out).
    edited = [dict(row, prediction=row["completion"]) for row in predictions]
    edited[0]["task_reward"], edited[1:2] = 5.0, [{k: v for k, v in edited[1].items() if k != "task_reward"}]
    path = tmp_path / "edited.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in edited))
    rescored = invoke("eval", "--predictions", str(path), "--task", "copywriting", "--json")
    assert rescored.exit_code == 0, rescored.output
    metrics = json.loads(rescored.stdout)["metrics"]
    assert metrics["reward_mean"] == pytest.approx(1.0) and metrics["rougeL"] == pytest.approx(1.0)
    recipe["train"]["objective"] = "sft"
    refused = invoke("validate", str(write_recipe(recipe, "sft.yaml")))
    assert refused.exit_code == 2 and "eval.gates.reward_mean: reward_mean is reported by train.objective grpo" in (
        refused.output
    )
    # A command-line gate by the same rule, before any model loads (it evaluated, then failed as "missing", exit 4),
    # as one on a preference metric.
    recipe["eval"]["gates"] = {}
    recipe["train"].pop("grpo", None)
    plain = str(write_recipe(recipe, "plain.yaml"))
    for gate, words in (("reward_mean>=0.1", "train.objective grpo"), ("reward_margin>=0", "preference objectives")):
        gated = invoke("eval", plain, "--gate", gate, "--output", str(tmp_path / "never"))
        assert gated.exit_code == 2 and words in " ".join(gated.output.split()), gated.output
        assert not (tmp_path / "never").exists()
