"""`run --dry-run`'s estimate: measured through the real loop, its fields, --no-estimate, and no trace left."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import WORDS, classification_recipe, write_jsonl
from helpers import invoke
from transformers import AutoModel, AutoTokenizer, BertConfig


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _scratch() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("finetune-estimate-*")}


def test_dry_run_estimate_fields_and_no_trace(tiny_models, topic_data, write_recipe, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()  # an empty folder, as a new run's output.dir may be
    recipe = write_recipe(classification_recipe(tiny_models["bert"], topic_data, run_dir))
    before, scratch = _tree(tmp_path), _scratch()
    result = invoke("run", recipe, "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout[result.stdout.index("{") :])
    estimate = document["estimate"]
    for name in ("total_seconds", "train_seconds", "eval_seconds", "peak_rss_bytes", "startup_seconds"):
        assert estimate[name] > 0, name
    assert estimate["total_seconds"] >= estimate["train_seconds"] + estimate["eval_seconds"]
    assert any(line.startswith("training: measured") for line in estimate["how"])
    assert document["steps"] == 30  # 120 rows / batch 8 x 2 epochs
    assert _tree(tmp_path) == before and list(run_dir.iterdir()) == []
    assert _scratch() == scratch  # the scratch checkpoint and adapter are gone too

    skipped = invoke("run", recipe, "--dry-run", "--json", "--no-estimate")
    assert skipped.exit_code == 0, skipped.output
    assert json.loads(skipped.stdout[skipped.stdout.index("{") :])["estimate"] is None


@pytest.mark.parametrize("precision", ["fp32", "auto"])  # auto: bf16 where the CPU runs it natively
def test_estimate_leaves_a_real_run_unchanged(tiny_models, topic_data, write_recipe, tmp_path, precision):
    """The measurement trains a few steps on the session's model: a run after it is the run without it (in bf16 it
    was not: the frozen base modules came back in training mode)."""
    logs = []
    for name, flags in (("measured", ["--estimate"]), ("plain", [])):  # a real run measures when asked
        settings = classification_recipe(
            tiny_models["bert"], topic_data, tmp_path / name, epochs=1, precision=precision
        )
        recipe = write_recipe(settings, f"{name}.yaml")
        result = invoke("run", recipe, *flags)
        assert result.exit_code in (0, 4), result.output
        assert ("estimating time and memory" in result.output) == bool(flags)
        lines = [json.loads(line) for line in (tmp_path / name / "train_log.jsonl").read_text().splitlines()]
        metrics = json.loads((tmp_path / name / "metrics.json").read_text())["metrics"]
        adapter = (tmp_path / name / "adapter" / "adapter_model.safetensors").read_bytes()
        logs.append(([(e["step"], e["loss"]) for e in lines], metrics, adapter))
    assert logs[0] == logs[1]


def _peak_of(command: list[str]) -> tuple[int, str]:
    """(the child's own peak resident set in bytes, as the kernel counted it, and its stdout)."""
    with tempfile.TemporaryFile() as out:
        child = subprocess.Popen([sys.executable, "-m", "finetune", *command], stdout=out, stderr=subprocess.DEVNULL)
        _, status, usage = os.wait4(child.pid, 0)  # this child's rusage alone (RUSAGE_CHILDREN is every child's max)
        child.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read().decode()
    assert child.returncode in (0, 4), text[-2000:]
    return usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024), text


def test_peak_memory_estimate_matches_the_real_run(tiny_models, write_recipe, tmp_path):
    """The dry run's predicted peak RSS against the real run's, each in its own process, its peak as the kernel
    counted it (the ±20% the estimate is judged by).

    The model is big enough that training (batches of 32 rows up to 128 tokens) takes the process from ~0.5 GB
    (interpreter, libraries, model) to ~0.8 GB: an estimate that missed the training or evaluation peak would fall
    far outside the band."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["bert"])
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=512,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
    )
    model_dir = tmp_path / "model"
    AutoModel.from_config(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    rng = random.Random(1)
    rows = []
    for i in range(128):  # lengths spread from a few words to past max_length: many batch shapes, long rows
        label = list(WORDS)[i % len(WORDS)]
        words = WORDS[label].split()
        rows.append({"text": " ".join(rng.choice(words) for _ in range(int(4 * 80 ** rng.random()))), "label": label})
    data = {
        "train": write_jsonl(tmp_path / "data" / "train.jsonl", rows[:96]),
        "eval": write_jsonl(tmp_path / "data" / "eval.jsonl", rows[96:]),
    }
    recipe = classification_recipe(model_dir, data, tmp_path / "run", epochs=1, batch_size=32)
    recipe["data"]["max_length"] = 128
    path = write_recipe(recipe)

    _, plan = _peak_of(["run", str(path), "--dry-run", "--json"])
    predicted = json.loads(plan[plan.index("{") :])["estimate"]["peak_rss_bytes"]
    real, _ = _peak_of(["run", str(path)])
    assert 0.8 <= predicted / real <= 1.2, (predicted, real)


def test_checkpoints_and_evaluations_are_counted_as_the_loop_counts_them():
    """The closed form (a plan of 2^53 steps hung the dry run, counting step by step) against the loop's own rule."""
    from finetune.flows.estimate import saves_and_evaluations
    from finetune.training.monitor import Monitor

    def by_step(steps: int, per_epoch: int, every_ckpt: int, every) -> tuple[int, int]:
        """The loop's rule, step by step: the monitor's own `due`, a checkpoint at each evaluation, epoch end,
        the last step and every `checkpoint_every` steps."""
        monitor = Monitor.__new__(Monitor)  # only `due`, which reads `every`
        monitor.every = every
        saved = evaluated = 0
        for step in range(1, steps + 1):
            epoch_end = step % per_epoch == 0
            done = step == steps
            evaluates = every is not None and monitor.due(step, epoch_end, done)
            evaluated += evaluates
            saved += done or epoch_end or evaluates or step % every_ckpt == 0
        return saved, evaluated

    rng = random.Random(0)
    for _ in range(500):
        steps, per_epoch, ckpt = rng.randint(1, 400), rng.randint(1, 60), rng.randint(1, 80)
        every = rng.choice([None, "epoch", rng.randint(1, 50)])
        assert saves_and_evaluations(steps, per_epoch, ckpt, every) == by_step(steps, per_epoch, ckpt, every)
    assert saves_and_evaluations(2**53, 15, 500, None)[0] > 0  # at once


def test_a_long_run_is_priced_from_its_first_steps_and_scaled(
    tiny_models, topic_data, write_recipe, tmp_path, monkeypatch
):
    """Listing every batch of a long run took minutes and gigabytes: the first PRICED_STEPS are priced, the rest
    scaled from them, and the estimate says so."""
    import finetune.flows.estimate as estimate

    monkeypatch.setattr(estimate, "PRICED_STEPS", 6)
    recipe = write_recipe(classification_recipe(tiny_models["bert"], topic_data, tmp_path / "run"))
    result = invoke("run", recipe, "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    how = " ".join(json.loads(result.stdout[result.stdout.index("{") :])["estimate"]["how"])
    assert "(6 steps of 30, the rest scaled from them)" in how


def test_generation_is_priced_per_row_not_in_eval_batches(tiny_models, write_recipe, tmp_path):
    """Generation decodes in batches of its own (often every row at once): the estimate said it ran "in batches of
    {eval batch}" and priced that many batches, a batch the run never used."""
    from tests.tasks.test_generation import copy_rows, generation_recipe

    rows = copy_rows(60)
    data = {"train": write_jsonl(tmp_path / "t.jsonl", rows[:40]), "eval": write_jsonl(tmp_path / "e.jsonl", rows[40:])}
    recipe = write_recipe(generation_recipe("copywriting", tiny_models["gpt2"], data, tmp_path / "run"))
    result = invoke("run", recipe, "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    estimate = json.loads(result.stdout[result.stdout.index("{") :])["estimate"]
    evaluation = next(line for line in estimate["how"] if line.startswith("evaluation:"))
    assert "extrapolated per row to 20 rows" in evaluation and "batches of" not in evaluation
    assert estimate["eval_seconds"] > 0
