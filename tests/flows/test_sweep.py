"""`finetune sweep` (flows/sweep.py) on a tiny GPT-2 classifier: every trial a normal run, the best and the cheapest
passing trial as the trials' own metrics.json files say, resume after a stop and after a kill without repeating a
finished trial, best.yaml reproducing the best trial, and the sweep section's rules.

One sweep (three trials of a grid over lora.r, through a stop, a kill and two resumes) is shared by the fast tests:
with best.yaml's run, four small runs in all (about 30 s on 2 cores). The kill -9 test (slow tier) sweeps again in
two real subprocesses."""

from __future__ import annotations

import copy
import csv
import json
import math
import random
import signal
from pathlib import Path

import optuna
import pytest
import yaml
from conftest import classification_recipe, corpus, write_jsonl
from rich.console import Console
from typer.testing import CliRunner

from finetune.cli import app
from finetune.errors import Interrupted, RecipeError
from finetune.flows import sweep as sweeping
from finetune.flows.resolve import load_recipe, resolve, sweep_rules
from finetune.flows.sweep import SweepDir, choose, search_space, sweep, yaml_text
from finetune.flows.train import run
from finetune.recipe.schema import SweepSection, apply_overrides
from finetune.tasks import recipe_task
from finetune.training import loop

GATE = ">=0.7"  # macro_f1: lora.r 1 stays below it on this data, 2 and 8 pass (the test checks it is informative)


def quiet() -> Console:
    return Console(quiet=True)


def stop_at_step(patch: pytest.MonkeyPatch, step: int) -> None:
    """Ask the training loop to stop at optimizer step `step`, as SIGTERM would (it checkpoints, then raises)."""
    original, calls = loop.NonFiniteGuard.check, [0]

    def check(self, grad_norm, stop, progress):
        calls[0] += 1
        if calls[0] == step:
            stop.received = signal.SIGTERM
        return original(self, grad_norm, stop, progress)

    patch.setattr(loop.NonFiniteGuard, "check", check)


def files_of(directory) -> dict[str, int]:
    """Every file under `directory` with its modification time: what a repeated trial would change."""
    return {str(p.relative_to(directory)): p.stat().st_mtime_ns for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def swept(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    rows = corpus(150)
    data = {
        "train": write_jsonl(root / "data" / "train.jsonl", rows[:120]),
        "eval": write_jsonl(root / "data" / "eval.jsonl", rows[120:]),
    }
    out = root / "sweep"
    recipe = classification_recipe(tiny_models["gpt2"], data, out, lr=0.02, checkpoint_every=3)
    recipe["eval"] = {"gates": {"macro_f1": GATE}}
    recipe["sweep"] = {"trials": 3, "sampler": "grid", "params": {"lora.r": [1, 2, 8, 16]}}
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    stages = {}

    stages["first"] = sweep(path, ["sweep.trials=1"], quiet())
    stages["first files"] = files_of(out / "trials" / "0")

    with pytest.MonkeyPatch.context() as patch:  # the second trial is stopped at step 5 (a checkpoint is saved)
        stop_at_step(patch, 5)
        with pytest.raises(Interrupted) as stopped:
            sweep(path, ["sweep.trials=2"], quiet())
    stages["stopped"] = stopped.value

    # A sweep killed (kill -9) while its third trial runs leaves that trial RUNNING in the study.
    study = optuna.load_study(study_name=sweeping.STUDY_NAME, storage=SweepDir(out).storage)
    space = search_space(SweepSection.model_validate(recipe["sweep"]))
    assert sweeping.queue_grid_point(study, space, seed=0)  # as the sweep would have, before its third trial
    killed = study.ask({key: param.distribution for key, param in space.items()})
    killed.set_user_attr("dir", str(SweepDir(out).trial(killed.number)))
    stages["killed"] = killed.number

    stages["resumed"] = sweep(path, [], quiet())
    stages["resumed files"] = {n: files_of(out / "trials" / str(n)) for n in range(3)}
    stages["again"] = sweep(path, [], quiet())  # the budget is spent: nothing runs
    stages["again files"] = {n: files_of(out / "trials" / str(n)) for n in range(3)}
    return {"path": path, "out": out, "recipe": recipe, **stages}


def test_trials_are_normal_runs_and_sweep_json_names_them(swept):
    document = swept["resumed"]
    out = swept["out"]
    records = {r["number"]: r for r in document["trials"]}
    # 0 finished; 1 stopped and 2 killed, each retried once (3, 4) in its own run directory.
    assert [records[n]["state"] for n in range(5)] == ["complete", "interrupted", "interrupted", "complete", "complete"]
    assert swept["killed"] == 2 and records[3]["retry_of"] == 1 and records[4]["retry_of"] == 2
    assert records[1]["retried_as"] == 3 and records[2]["retried_as"] == 4
    assert records[3]["dir"] == str(out / "trials" / "1") and records[4]["dir"] == str(out / "trials" / "2")
    assert sorted(records[n]["params"]["lora.r"] for n in (0, 3, 4)) == [1, 2, 8]  # each grid point once
    for n in (0, 3, 4):
        record = records[n]
        metrics = json.loads((Path(record["dir"]) / "metrics.json").read_text())
        assert record["metrics"] == metrics["metrics"]
        assert record["passed"] == all(g["passed"] for g in metrics["gates"].values())
        assert record["train_seconds"] == metrics["training"]["train_seconds"]
        assert record["seconds"] >= record["train_seconds"]
        run_recipe = yaml.safe_load((Path(record["dir"]) / "recipe.yaml").read_text())
        assert run_recipe["lora"]["r"] == record["params"]["lora.r"] and run_recipe["sweep"] is None
    assert document["budget"]["stopped_because"].startswith("trial budget")
    assert swept["stopped"].exit_code == 75 and "resumable checkpoint" in str(swept["stopped"])


def test_the_retry_continues_the_stopped_trial_from_its_checkpoint(swept):
    metrics = json.loads((swept["out"] / "trials" / "1" / "metrics.json").read_text())
    assert metrics["training"]["resumed_from"].endswith("step-00000005")


def test_resuming_never_repeats_a_finished_trial(swept):
    assert swept["resumed files"][0] == swept["first files"]  # trial 0 untouched by the resumed sweep
    assert swept["again files"] == swept["resumed files"]  # a sweep whose budget is spent runs nothing
    assert swept["again"]["trials"] == swept["resumed"]["trials"]


def test_best_and_cheapest_passing_as_the_run_directories_say(swept):
    """Reference: read every finished trial's metrics.json and count its trainable parameters by loading its
    adapter with peft, independently of what the sweep recorded."""
    from peft import AutoPeftModelForSequenceClassification

    document = swept["resumed"]
    reference = {}
    for r in document["trials"]:
        if r["state"] != "complete":
            continue
        directory = Path(r["dir"])
        metrics = json.loads((directory / "metrics.json").read_text())
        model = AutoPeftModelForSequenceClassification.from_pretrained(directory / "adapter", is_trainable=True)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        passed = all(g["passed"] for g in metrics["gates"].values())
        reference[r["number"]] = (metrics["metrics"]["macro_f1"], trainable, passed)
        assert r["trainable_params"] == trainable
    passing = {n: v for n, v in reference.items() if v[2]}
    assert passing and len(passing) < len(reference), reference  # informative: some pass, some fail
    assert document["objective"] == {"metric": "macro_f1", "direction": "maximize", "cost": None}
    assert document["best"] == max(passing, key=lambda n: passing[n][0])
    assert document["best_passed"] is True
    assert document["cheapest"] == min(passing, key=lambda n: (passing[n][1], -passing[n][0]))
    assert document["cheapest_by"] == "trainable_params"


def test_trials_csv_and_the_plot(swept):
    out = swept["out"]
    document = json.loads((out / "sweep.json").read_text())
    assert document["written_by"] == "finetune sweep"
    with open(out / "trials.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["number"]) for r in rows] == [r["number"] for r in document["trials"]]
    for row, record in zip(rows, document["trials"]):
        assert row["state"] == record["state"] and row["dir"] == record["dir"]
        if record["state"] == "complete":
            assert float(row["macro_f1"]) == pytest.approx(record["metrics"]["macro_f1"])
            assert int(row["lora.r"]) == record["params"]["lora.r"]
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_best_yaml_runs_as_it_is_and_reproduces_the_best_trial(swept, tmp_path):
    out = swept["out"]
    document = swept["resumed"]
    best = next(r for r in document["trials"] if r["number"] == document["best"])
    written = yaml.safe_load((out / "best.yaml").read_text())
    assert "sweep" not in written and written["output"]["dir"] == str(out / "best")
    assert written["lora"]["r"] == best["params"]["lora.r"]
    resolved = resolve(out / "best.yaml")  # the command line's own reading of a recipe file
    again = run(resolved, quiet())
    assert again is not None
    assert again["metrics"]["accuracy"] == best["metrics"]["accuracy"]
    for name, value in best["metrics"].items():
        assert again["metrics"][name] == pytest.approx(value, abs=1e-6), name


def test_budgets_count_every_session_and_a_changed_recipe_is_refused(swept):
    path, out = swept["path"], swept["out"]
    before = files_of(out / "trials")
    timed = sweep(path, ["sweep.trials=10", "sweep.time_budget=1"], quiet())
    assert timed["budget"]["stopped_because"].startswith("time budget")
    assert [r["number"] for r in timed["trials"]] == [r["number"] for r in swept["resumed"]["trials"]]
    with pytest.raises(RecipeError, match="holds a sweep of another recipe.*train.batch_size"):
        sweep(path, ["train.batch_size=4"], quiet())
    with pytest.raises(RecipeError, match=r"train.epochs: \d+ then, 7 now"):  # as a recipe writes it, not 7.0
        sweep(path, ["train.epochs=7"], quiet())
    assert files_of(out / "trials") == before


def test_the_sweep_directory_follows_the_write_policy(swept, tmp_path):
    recipe = copy.deepcopy(swept["recipe"])
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    recipe["output"]["dir"] = str(foreign)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(RecipeError, match="not a sweep that finetune wrote"):
        sweep(path, [], quiet())
    inside_a_run = swept["out"] / "trials" / "0" / "sweep"
    with pytest.raises(RecipeError, match="lies inside the finetune run"):
        sweep(path, [f"output.dir={inside_a_run}"], quiet())
    assert not inside_a_run.exists() and sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    del recipe["sweep"]
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(RecipeError, match="no sweep section"):
        sweep(path, [], quiet())


def test_a_run_never_replaces_a_sweeps_trial_or_its_folder(swept, tmp_path):
    """`finetune run R output.dir=SWEEP/trials/0 --overwrite` replaced trial 0 with another recipe's run, while
    sweep.json and its best still described the trial's; SWEEP itself was refused as "holds no finetune run"."""
    from helpers import invoke

    recipe = copy.deepcopy(swept["recipe"])
    del recipe["sweep"]
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    trial = swept["out"] / "trials" / "0"
    before = files_of(trial)
    for where, words in ((trial, "lies inside the finetune sweep"), (swept["out"], "is the finetune sweep")):
        result = invoke("run", path, f"output.dir={where}", "--overwrite")
        assert result.exit_code == 2 and words in " ".join(result.output.split()), result.output
    assert files_of(trial) == before


def test_overwrite_refuses_a_file_no_trial_wrote_and_removes_nothing(swept, tmp_path):
    """--overwrite replaces trials/ whole: it deleted a user's file in a trial's folder, and one beside the trials."""
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(swept["recipe"]))
    trials = swept["out"] / "trials"
    before = sorted(p for p in swept["out"].rglob("*") if ".finetune-lock" not in p.name)
    for mine in (trials / "0" / "mine.txt", trials / "notes.txt"):
        mine.write_text("mine")
        try:
            with pytest.raises(RecipeError, match=f"{mine.name} was not written by a trial of this sweep"):
                sweep(path, [], quiet(), overwrite=True)
            assert sorted(p for p in swept["out"].rglob("*") if ".finetune-lock" not in p.name) == sorted(
                [*before, mine]
            )
        finally:
            mine.unlink()


def _sweep_recipe(model_dir, tmp_path, rows: int, sweep: dict, **train) -> tuple[dict, Path]:
    """A grid sweep over the topic corpus (4/5 of `rows` to train on), into tmp_path/sweep."""
    rows_ = corpus(rows)
    cut = rows * 4 // 5
    data = {
        "train": write_jsonl(tmp_path / "train.jsonl", rows_[:cut]),
        "eval": write_jsonl(tmp_path / "eval.jsonl", rows_[cut:]),
    }
    out = tmp_path / "sweep"
    recipe = classification_recipe(model_dir, data, out, **train)
    recipe["sweep"] = {"sampler": "grid", **sweep}
    return recipe, out


def test_overwrite_starts_the_sweep_again_and_keeps_the_users_files_beside_it(tiny_models, tmp_path):
    recipe, out = _sweep_recipe(tiny_models["bert"], tmp_path, 60, {"trials": 1, "params": {"lora.r": [2]}}, epochs=1)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    sweep(path, [], quiet())
    (out / "notes.txt").write_text("mine")
    first = (out / "trials" / "0" / "metrics.json").stat().st_mtime_ns
    document = sweep(path, [], quiet(), overwrite=True)
    assert [t["number"] for t in document["trials"]] == [0]
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "trials" / "0" / "metrics.json").stat().st_mtime_ns != first


# Runs a sweep in this process's child and SIGKILLs it at its N-th optimizer step, counted over every trial.
KILLER = r"""
import os, signal, sys
import finetune.training.loop as loop
from rich.console import Console
from finetune.flows.sweep import sweep

at = int(sys.argv[1])
if at:
    original, calls = loop.NonFiniteGuard.check, [0]
    def check(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == at:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, *args, **kwargs)
    loop.NonFiniteGuard.check = check
sweep(sys.argv[2], sys.argv[3:], Console(stderr=True))
"""


@pytest.mark.slow  # real subprocesses and kill -9
def test_a_sweep_killed_mid_trial_resumes_without_repeating_a_finished_trial(tiny_models, tmp_path):
    import subprocess
    import sys

    sweep = {"trials": 2, "params": {"lora.r": [2, 8]}}
    recipe, out = _sweep_recipe(tiny_models["gpt2"], tmp_path, 150, sweep, lr=0.02, checkpoint_every=3)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))

    def child(kill_at: int) -> subprocess.CompletedProcess:
        command = [sys.executable, "-c", KILLER, str(kill_at), str(path)]
        return subprocess.run(command, capture_output=True, text=True, timeout=300)

    # 2 epochs of 15 steps a trial: killed at step 7 of the second trial (its checkpoint of step 6 on disk).
    killed = child(30 + 7)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    first = files_of(out / "trials" / "0")
    assert (out / "trials" / "0" / "metrics.json").is_file() and not (out / "trials" / "1" / "metrics.json").exists()

    resumed = child(0)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    document = json.loads((out / "sweep.json").read_text())
    assert [(r["number"], r["state"]) for r in document["trials"]] == [
        (0, "complete"),
        (1, "interrupted"),
        (2, "complete"),
    ]
    assert document["trials"][2]["retry_of"] == 1 and document["trials"][2]["dir"] == str(out / "trials" / "1")
    assert files_of(out / "trials" / "0") == first  # the finished trial was not run again
    metrics = json.loads((out / "trials" / "1" / "metrics.json").read_text())
    assert metrics["training"]["resumed_from"].endswith("step-00000006")
    assert sorted(r["params"]["lora.r"] for r in document["trials"] if r["state"] == "complete") == [2, 8]


def test_the_median_pruner_stops_trials_that_trail_at_the_same_step(tiny_models, tmp_path):
    """Reference: each trial's eval_log.jsonl; a trial is pruned at step s exactly when, once 5 trials finished, its
    best value up to s is below the median of the finished trials' values at s (Optuna's MedianPruner)."""
    import statistics

    rows = corpus(150)
    data = {
        "train": write_jsonl(tmp_path / "train.jsonl", rows[:120]),
        "eval": write_jsonl(tmp_path / "eval.jsonl", rows[120:]),
    }
    recipe = classification_recipe(tiny_models["gpt2"], data, tmp_path / "sweep", epochs=1)
    recipe["eval"] = {"every": 5}
    recipe["sweep"] = {
        "trials": 8,
        "sampler": "random",
        "pruner": "median",
        "objective": ["accuracy"],
        "params": {"train.lr": {"low": 1.0e-5, "high": 5.0e-2, "log": True}},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    document = sweep(path, [], quiet())

    def history(record: dict) -> dict[int, float]:
        lines = (Path(record["dir"]) / "eval_log.jsonl").read_text().splitlines()
        return {entry["step"]: entry["metrics"]["accuracy"] for entry in map(json.loads, lines)}

    finished: list[dict[int, float]] = []
    pruned = []
    for record in document["trials"]:
        values = history(record)
        expected_stop = None
        if len(finished) >= 5:
            best = -math.inf
            for step, value in sorted(values.items()):
                best = max(best, value)
                earlier = [h[step] for h in finished if step in h]
                if earlier and best < statistics.median(earlier):
                    expected_stop = step
                    break
        assert (record["state"] == "pruned") == (expected_stop is not None), (record["number"], values)
        if expected_stop is not None:
            assert max(values) == expected_stop  # it trained no further
            pruned.append(record["number"])
        else:
            finished.append(values)
    assert pruned, "no trial was pruned: the test would not tell a pruner that never prunes"
    assert document["best"] not in pruned and document["cheapest"] not in pruned


# --------------------------------------------------------------------------- rules and pure parts (no training)


def rules_of(tiny_models, tmp_path, sweep_section: dict, **changes) -> list[str]:
    data = {"train": tmp_path / "t.jsonl", "eval": tmp_path / "e.jsonl"}
    write_jsonl(data["train"], corpus(12))
    write_jsonl(data["eval"], corpus(6))
    raw = classification_recipe(tiny_models["gpt2"], data, tmp_path / "out")
    raw.update(changes)
    raw["sweep"] = sweep_section
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    recipe = load_recipe(path)
    return sweep_rules(recipe, recipe_task(recipe))


@pytest.mark.parametrize(
    "section, changes, expected",
    [
        (
            {"params": {"train.lrr": [0.1]}},
            {},
            "sweep.params.train.lrr: unknown key (did you mean 'lr'?)",
        ),
        ({"params": {"lora.r": {"low": 1, "high": 8, "log": True, "step": 2}}}, {}, "log and step cannot be combined"),
        ({"params": {"lora.r": {"low": 1.5, "high": 8}}}, {}, "lora.r takes whole numbers"),
        ({"params": {"lora.r": ["x", 4]}}, {}, "sweep.params.lora.r: x: "),
        ({"params": {"lora.r": {"low": 0, "high": 8}}}, {}, "sweep.params.lora.r: 0: "),
        ({"sampler": "grid", "params": {"train.lr": {"low": 0.001, "high": 0.01}}}, {}, "give this range a step"),
        ({"params": {"output.dir": ["a", "b"]}}, {}, "sweep.params.output.dir: a trial writes"),
        (
            {"params": {"task": ["classification", "qa"]}},
            {},
            "sweep.params.task: a sweep compares settings of one task",
        ),
        ({"params": {}}, {}, "sweep.params: name at least one setting"),
        ({"objective": ["train_seconds"], "params": {"lora.r": [2]}}, {}, "train_seconds is a cost"),
        ({"objective": ["acuracy"], "params": {"lora.r": [2]}}, {}, "did you mean 'accuracy'"),
        ({"objective": ["accuracy", "train_second"], "params": {"lora.r": [2]}}, {}, "did you mean 'train_seconds'"),
        ({"params": {"lora.r": [2]}}, {"distributed": {"num_processes": 2}}, "runs each trial in this one process"),
    ],
)
def test_sweep_rules_name_the_place(section, changes, expected, tiny_models, tmp_path):
    problems = rules_of(tiny_models, tmp_path, section, **changes)
    assert any(expected in p for p in problems), problems


def test_a_misspelt_range_key_is_named_with_the_nearest_valid_one():
    from finetune.recipe.schema import build_recipe

    raw = {"task": "classification", "model": {"name_or_path": "m"}, "data": {"train": "t.jsonl"}}
    raw["sweep"] = {"trials": 2, "params": {"train.lr": {"lo": 0.001, "high": 0.01}}}
    with pytest.raises(RecipeError, match=r"train.lr.lo: unknown key \(did you mean 'low'\?\)"):
        build_recipe(raw)


def test_validate_and_run_refuse_what_sweep_refuses(tiny_models, tmp_path):
    """The sweep section's rules are the recipe's: validate names the place as sweep does, with exit 2."""
    rules_of(tiny_models, tmp_path, {"params": {"lora.r": {"low": 0, "high": 8}}})
    for command in (["validate"], ["run", "--dry-run"], ["sweep"]):
        result = CliRunner().invoke(app, [*command, str(tmp_path / "r.yaml")])
        assert result.exit_code == 2 and "sweep.params.lora.r: 0: " in result.output, (command, result.output)


def test_a_swept_setting_no_trial_reads_is_refused(tiny_models, tmp_path):
    """train.preference.beta swept in a classification recipe: every trial trained the same model (validate said
    ok). Read under some value of another swept key (a swept objective), it is not refused."""
    unread = rules_of(tiny_models, tmp_path, {"params": {"train.preference.beta": [0.1, 0.3]}})
    assert len(unread) == 1 and unread[0].startswith("sweep.params.train.preference.beta: no trial reads it: ")
    section = rules_of(tiny_models, tmp_path, {"params": {"data.retrieval.top_k": [3, 7]}})  # the section's message
    assert len(section) == 1 and section[0].startswith("sweep.params.data.retrieval.top_k: no trial reads it: ")
    read = {"params": {"train.lr": [0.01, 0.02], "train.preference.beta": [0.1, 0.3]}}
    base = yaml.safe_load((tmp_path / "r.yaml").read_text())
    base.update(task="copywriting", sweep=read)
    base["data"]["columns"] = {"prompt": "text", "completion": "label"}
    base["train"]["objective"] = "dpo"
    (tmp_path / "g.yaml").write_text(yaml.safe_dump(base))
    recipe = load_recipe(tmp_path / "g.yaml")
    assert not any("no trial reads it" in p for p in sweep_rules(recipe, recipe_task(recipe)))
    base["train"]["objective"] = "sft"
    base["sweep"]["params"]["train.objective"] = ["sft", "dpo"]
    (tmp_path / "g.yaml").write_text(yaml.safe_dump(base))
    recipe = load_recipe(tmp_path / "g.yaml")
    assert not any("no trial reads it" in p for p in sweep_rules(recipe, recipe_task(recipe)))
    # A metric its objective never reports is refused in a sweep's recipe too (the rule once ran only outside
    # sweeps: a DPO sweep gated on reward_mean validated, and each trial failed its gate as "missing").
    base["train"]["objective"] = "dpo"
    base["sweep"]["params"] = {"train.lr": [0.01, 0.02]}
    base["eval"] = {**base.get("eval", {}), "gates": {"reward_mean": ">=0.1"}}
    (tmp_path / "g.yaml").write_text(yaml.safe_dump(base))
    with pytest.raises(RecipeError, match="reward_mean is reported by train.objective grpo"):
        load_recipe(tmp_path / "g.yaml")


def test_a_valid_sweep_section_has_no_problems(tiny_models, tmp_path):
    section = {
        "objective": ["accuracy", "trainable_params"],
        "sampler": "grid",
        "params": {
            "train.lr": {"low": 0.001, "high": 0.003, "step": 0.001},
            "lora.r": {"low": 2, "high": 8, "step": 2},
            "lora.targets": [["c_attn"], "all_linear"],
            "train.epochs": [1, 2.5],
        },
    }
    assert rules_of(tiny_models, tmp_path, section) == []


def test_search_space_samples_whole_number_settings_as_integers():
    space = search_space(
        SweepSection.model_validate(
            {
                "params": {
                    "lora.r": {"low": 2, "high": 9, "step": 2},
                    "train.max_steps": {"low": 10, "high": 100, "log": True},
                    "train.epochs": {"low": 1, "high": 3},
                    "train.lr": {"low": 0.1, "high": 0.3, "step": 0.1},
                    "lora.targets": [["q", "v"], "all_linear", "yes"],
                }
            }
        )
    )
    assert isinstance(space["lora.r"].distribution, optuna.distributions.IntDistribution)
    assert space["lora.r"].grid == (2, 4, 6, 8)
    assert isinstance(space["train.max_steps"].distribution, optuna.distributions.IntDistribution)
    assert isinstance(space["train.epochs"].distribution, optuna.distributions.FloatDistribution)
    assert space["train.lr"].grid == (0.1, 0.2, 0.3)
    # A choice reaches the recipe as the value it was: a list stays a list, the string 'yes' is not YAML's true.
    for text in space["lora.targets"].grid or ():
        override = space["lora.targets"].override(text)
        assert apply_overrides({}, [override])["lora"]["targets"] == space["lora.targets"].shown(text)
    assert [space["lora.targets"].shown(t) for t in space["lora.targets"].grid or ()] == [
        ["q", "v"],
        "all_linear",
        "yes",
    ]


@pytest.mark.parametrize("value", [1e-05, 0.1, 3, "yes", "1e-3", None, True, ["q", "v"], {"a": 1}, "a: b"])
def test_yaml_text_reads_back_as_the_same_value(value):
    assert apply_overrides({}, [f"k={yaml_text(value)}"])["k"] == value


def test_pareto_front_and_choices_equal_optunas_on_the_same_values():
    """Reference: Optuna's own best_trials of a two-objective study (maximise the metric, minimise the cost)."""
    rng = random.Random(3)
    objective = sweeping.Objective("accuracy", "train_seconds")
    records = []
    study = optuna.create_study(directions=["maximize", "minimize"])
    for number in range(40):
        accuracy, seconds = round(rng.random(), 2), round(rng.uniform(1, 10), 1)
        records.append(
            {
                "number": number,
                "state": "complete",
                "metrics": {"accuracy": accuracy},
                "passed": True,
                "train_seconds": seconds,
                "trainable_params": 1000 - number,
            }
        )
        study.add_trial(
            optuna.trial.create_trial(
                values=[accuracy, seconds],
                distributions={},
                params={},
            )
        )
    chosen = choose(records, objective)
    assert sorted(chosen["pareto"]) == sorted(t.number for t in study.best_trials)
    best_accuracy = max(r["metrics"]["accuracy"] for r in records)
    best = [r for r in records if r["metrics"]["accuracy"] == best_accuracy]
    assert chosen["best"] == min(best, key=lambda r: (r["train_seconds"], r["number"]))["number"]
    least = min(r["train_seconds"] for r in records)
    assert chosen["cheapest"] in [r["number"] for r in records if r["train_seconds"] == least]


def test_a_dead_trial_is_failed_and_retried_once_in_its_own_directory(tmp_path):
    """What a resumed sweep does first, on a study in memory: a RUNNING trial (its sweep was killed) is failed and
    queued again with its settings and run directory; a retry interrupted in its turn is not queued a third time;
    a trial that failed for a reason of its own is a result, not retried."""
    directory = SweepDir(tmp_path)
    study = optuna.create_study()
    space = {"lora.r": optuna.distributions.CategoricalDistribution(["2", "8"])}
    dead = study.ask(space)
    dead.set_user_attr("dir", "elsewhere/7")
    diverged = study.ask(space)
    diverged.set_user_attr(sweeping.FAILURE, "diverged: loss is nan")
    study.tell(diverged, state=optuna.trial.TrialState.FAIL)
    sweeping._retry_interrupted(study, directory)
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["FAIL", "FAIL", "WAITING"]
    assert trials[2].user_attrs == {"retry_of": 0, "dir": "elsewhere/7"}
    assert [sweeping._counted(t) for t in trials] == [False, True, False]

    retry = study.ask(space)  # the queued retry runs next, with the dead trial's settings, and is killed in its turn
    assert retry.number == 2 and retry.params == dead.params
    sweeping._retry_interrupted(study, directory)
    sweeping._retry_interrupted(study, directory)  # a second resume queues nothing either
    assert [t.state.name for t in study.get_trials()] == ["FAIL", "FAIL", "FAIL"]


@pytest.mark.parametrize("sampler", ["tpe", "random"])
def test_a_resumed_sweep_proposes_what_an_unstopped_one_would(sampler, tmp_path):
    """The same seed, the same trials: a sweep whose process ended after its second trial (a kill, a stop, a time
    budget) and was resumed by a new process proposes the same settings for the later trials as one never stopped.
    (Its sampler was seeded once per process: the resumed one drew other settings.)"""
    settings = SweepSection.model_validate(
        {"trials": 6, "seed": 3, "sampler": sampler, "params": {"train.lr": {"low": 1e-5, "high": 1e-2, "log": True}}}
    )
    space = {"train.lr": optuna.distributions.FloatDistribution(1e-5, 1e-2, log=True)}

    def sweep_to(storage: str, trials: int) -> list[float]:
        study = optuna.create_study(storage=storage, study_name="s", load_if_exists=True)  # a new process's study
        while len(study.trials) < trials:
            trial = sweeping.propose(study, settings, [], space)
            study.tell(trial, math.log(trial.params["train.lr"]) ** 2)
        return [t.params["train.lr"] for t in study.trials]

    unstopped = sweep_to(f"sqlite:///{tmp_path / 'a.db'}", 6)
    sweep_to(f"sqlite:///{tmp_path / 'b.db'}", 2)
    assert sweep_to(f"sqlite:///{tmp_path / 'b.db'}", 6) == unstopped
    assert len(set(unstopped)) == 6


def test_choices_prefer_passing_trials_and_lower_is_better_metrics():
    objective = sweeping.Objective("eval_loss")
    records = [
        {"number": 0, "state": "complete", "metrics": {"eval_loss": 0.1}, "passed": False, "trainable_params": 5},
        {"number": 1, "state": "complete", "metrics": {"eval_loss": 0.4}, "passed": True, "trainable_params": 9},
        {"number": 2, "state": "complete", "metrics": {"eval_loss": 0.3}, "passed": True, "trainable_params": 20},
        {"number": 3, "state": "failed", "metrics": {}, "passed": False, "trainable_params": None},
    ]
    chosen = choose(records, objective)
    assert (chosen["best"], chosen["best_passed"], chosen["cheapest"]) == (2, True, 1)
    for record in records:
        record["passed"] = False
    chosen = choose(records, objective)
    assert (chosen["best"], chosen["best_passed"], chosen["cheapest"]) == (0, False, None)
    assert math.isclose(objective.quality(0.1), -0.1)


# --------------------------------------------------------------------------- the command (wired by cli.py)


def _sweep_command_wired() -> bool:
    from finetune.cli import app

    return any(command.name == "sweep" for command in app.registered_commands)


@pytest.mark.skipif(not _sweep_command_wired(), reason="`finetune sweep` is not in cli.py yet (docs/sweep.md)")
def test_the_command_prints_sweep_json_and_exits_4_when_no_trial_passes(swept, tmp_path):
    from helpers import invoke

    recipe = copy.deepcopy(swept["recipe"])
    recipe["output"]["dir"] = str(tmp_path / "cli")
    recipe["sweep"] = {"trials": 1, "sampler": "grid", "params": {"lora.r": [1]}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = invoke("sweep", path, "--json")
    document = json.loads(result.stdout)
    assert document == json.loads((tmp_path / "cli" / "sweep.json").read_text())
    assert result.exit_code == (0 if document["best_passed"] else 4), result.output
    assert invoke("sweep", path, "eval.gates={macro_f1: '>=1.01'}").exit_code == 2  # another recipe: refused
    # An override of a swept key (or of its section) would be replaced in every trial: refused before any runs.
    for override in ("lora.r=8", "lora={r: 8}"):
        swept_too = invoke("sweep", path, override)
        assert swept_too.exit_code == 2 and "lora.r is swept" in swept_too.output, swept_too.output


def test_overwrite_takes_a_trials_retriever_run_as_the_trials_own(tmp_path):
    """A knowledge-base trial keeps its retriever's run inside it (RUN/retriever): it made every sweep of such
    trials impossible to overwrite; a file of the user's inside it still refuses."""
    from finetune.flows.sweep import _refuse_foreign_trials
    from finetune.outputs.rundir import RunDir

    trial = tmp_path / "trials" / "0"
    for made in (RunDir(trial), RunDir(trial / "retriever")):
        made.path.mkdir(parents=True)
        made.marker.write_text("{}")
        made.recipe.write_text("task: retrieval\n")
    _refuse_foreign_trials(SweepDir(tmp_path))
    (trial / "retriever" / "mine.txt").write_text("mine")
    with pytest.raises(RecipeError, match="retriever/mine.txt was not written by a trial"):
        _refuse_foreign_trials(SweepDir(tmp_path))
