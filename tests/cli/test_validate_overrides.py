"""`finetune validate RECIPE [KEY=VALUE...]` checks the exact command line `run` will get (its overrides), and a
directory given as the recipe is named as one."""

from __future__ import annotations

from conftest import classification_recipe
from helpers import invoke


def test_validate_applies_runs_overrides(tiny_models, topic_data, write_recipe, tmp_path):
    path = write_recipe(classification_recipe(tiny_models["bert"], topic_data, tmp_path / "run"))
    assert invoke("validate", path).exit_code == 0
    validated = invoke("validate", path, "lora.r=64", "train.packing=true")
    dry_run = invoke("run", path, "lora.r=64", "train.packing=true", "--dry-run", "--no-estimate")
    assert validated.exit_code == 2, validated.output
    assert dry_run.exit_code == 2, dry_run.output
    for words in ("lora.r: 64 is above the hidden size", "train.packing"):
        assert words in " ".join(validated.output.split())
        assert words in " ".join(dry_run.output.split())
    assert invoke("validate", path, "train.epochs=3").exit_code == 0  # a good override is just applied


def test_validate_names_a_directory(tmp_path):
    (tmp_path / "recipes").mkdir()
    validated = invoke("validate", tmp_path / "recipes")
    assert validated.exit_code == 2, validated.output
    assert "a directory, not a recipe file" in validated.output
    assert "not found" not in validated.output
