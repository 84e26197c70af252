"""Two CPU processes (gloo) through accelerate's launcher: the same loop, unchanged."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import classification_recipe

from finetune.launch import free_port

# Subprocesses, signals and kill -9: `make test` runs these, the fast loop (`-m "not slow"`) does not.
pytestmark = pytest.mark.slow


def isolated_env(tmp_path: Path) -> dict:
    """One thread per process, and no accelerate config of the user's (it lives under HF_HOME) or ACCELERATE_*."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    return {**env, "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf-home")}


def accelerate_launch(*flags: str, processes: int = 2) -> list[str]:
    """accelerate's launcher on this machine, on a free port, with no mixed precision or dynamo of its own."""
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        *flags,
        "--num_processes",
        str(processes),
        "--num_machines",
        "1",
        "--main_process_port",
        str(free_port()),
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
    ]


def last_step(run: Path) -> int:
    return json.loads((run / "train_log.jsonl").read_text().splitlines()[-1])["step"]


def test_accelerate_launch_two_cpu_processes(tiny_models, topic_data, write_recipe, tmp_path):
    single = tmp_path / "single"
    double = tmp_path / "double"
    # Same global batch: 8 per process x 2 processes vs 16 in one.
    one = write_recipe(
        classification_recipe(tiny_models["gpt2"], topic_data, single, batch_size=16, epochs=4), "one.yaml"
    )
    two = write_recipe(
        classification_recipe(tiny_models["gpt2"], topic_data, double, batch_size=8, epochs=4), "two.yaml"
    )
    env = isolated_env(tmp_path)
    assert (
        subprocess.run([sys.executable, "-m", "finetune", "run", str(one)], env=env, capture_output=True).returncode
        == 0
    )
    launched = subprocess.run(
        [*accelerate_launch("--multi_gpu"), "-m", "finetune", "run", str(two)],
        env=env,
        capture_output=True,
        text=True,
    )
    assert launched.returncode == 0, launched.stderr[-3000:]
    manifest = json.loads((double / "manifest.json").read_text())
    assert manifest["hardware"]["num_processes"] == 2
    # Every eval example scored exactly once, in order.
    rows = [json.loads(line) for line in (double / "predictions.jsonl").read_text().splitlines()]
    expected = [json.loads(line)["text"] for line in Path(topic_data["eval"]).read_text().splitlines()]
    assert [r["text"] for r in rows] == expected
    a = json.loads((single / "metrics.json").read_text())["metrics"]
    b = json.loads((double / "metrics.json").read_text())["metrics"]
    assert last_step(single) == last_step(double) > 0  # the same optimizer steps over the same data
    # Two processes see the same batches split differently (8 + 8), so the numbers differ a little, not a lot.
    assert abs(a["eval_loss"] - b["eval_loss"]) <= 0.05 * a["eval_loss"], (a, b)
    assert abs(a["accuracy"] - b["accuracy"]) <= 0.1


def test_num_processes_option_keeps_exit_codes(tiny_models, topic_data, write_recipe, tmp_path):
    recipe = write_recipe(classification_recipe(tiny_models["bert"], topic_data, tmp_path / "run", epochs=1))
    env = isolated_env(tmp_path)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "finetune",
            "run",
            str(recipe),
            "--num-processes",
            "2",
            "eval.gates={eval_loss: '<=0.000001'}",
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 4, result.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["hardware"]["num_processes"] == 2


def test_a_refused_output_dir_is_refused_once_before_any_process_starts(
    tiny_models, topic_data, write_recipe, tmp_path
):
    """A run of several processes into a directory it may not write: the one clear refusal (exit 2), from the
    launching process, not the main process's refusal followed by the others reporting a lost peer."""
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("the user's own file\n")
    recipe = write_recipe(classification_recipe(tiny_models["bert"], topic_data, taken, epochs=1))
    result = subprocess.run(
        [sys.executable, "-m", "finetune", "run", str(recipe), "--num-processes", "2"],
        env=isolated_env(tmp_path),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.count("error:") == 1 and "holds no finetune run" in result.stderr, result.stderr[-3000:]
    assert "lost" not in result.stderr
    assert sorted(p.name for p in taken.iterdir()) == ["notes.txt"]


def test_resume_auto_of_a_finished_run_with_several_processes_shows_its_metrics(
    tiny_models, topic_data, write_recipe, tmp_path
):
    """`--resume auto` of a finished run: nothing to train, its metrics shown, exit 0, as with one process (the
    main process used to return while the other reported a lost peer, exit 76)."""
    run = tmp_path / "run"
    recipe = write_recipe(classification_recipe(tiny_models["bert"], topic_data, run, epochs=1))
    env = isolated_env(tmp_path)
    first = subprocess.run([sys.executable, "-m", "finetune", "run", str(recipe)], env=env, capture_output=True)
    assert first.returncode == 0
    before = (run / "metrics.json").read_bytes()
    again = subprocess.run(
        [sys.executable, "-m", "finetune", "run", str(recipe), "--num-processes", "2", "--resume", "auto"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert "nothing to resume" in again.stdout.replace("\n", " ") and "lost" not in again.stderr
    assert (run / "metrics.json").read_bytes() == before


def test_the_num_processes_flag_wins_over_the_recipes_count(tiny_models, topic_data, write_recipe, tmp_path):
    """A recipe written for an 8-GPU node was refused here even with --num-processes 1, the flag's whole purpose."""
    from helpers import invoke

    recipe = classification_recipe(tiny_models["bert"], topic_data, tmp_path / "run")
    recipe["distributed"] = {"num_processes": 64}
    path = write_recipe(recipe)
    assert invoke("validate", path).exit_code == 2  # this machine cannot run 64
    result = invoke("run", path, "--num-processes", "1", "--dry-run", "--no-estimate")
    assert result.exit_code == 0, result.output
