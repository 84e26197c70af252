"""`run --dry-run`'s estimate: measured through the real loop, its fields, --no-estimate, and no trace left."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from conftest import classification_recipe
from helpers import invoke


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


def test_estimate_leaves_a_real_run_unchanged(tiny_models, topic_data, write_recipe, tmp_path):
    """The measurement trains a few steps on the session's model: a run after it is the run without it."""
    logs = []
    for name, flags in (("measured", ["--estimate"]), ("plain", [])):  # a real run measures when asked
        recipe = write_recipe(
            classification_recipe(tiny_models["bert"], topic_data, tmp_path / name, epochs=1), f"{name}.yaml"
        )
        result = invoke("run", recipe, *flags)
        assert result.exit_code in (0, 4), result.output
        assert ("estimating time and memory" in result.output) == bool(flags)
        lines = [json.loads(line) for line in (tmp_path / name / "train_log.jsonl").read_text().splitlines()]
        metrics = json.loads((tmp_path / name / "metrics.json").read_text())["metrics"]
        logs.append(([(e["step"], e["loss"]) for e in lines], metrics))
    assert logs[0] == logs[1]
