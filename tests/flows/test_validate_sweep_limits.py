"""Swept values meet the model-dependent limits a plain recipe meets (positions, hidden size): `finetune validate`
and the start of `finetune sweep` refuse them (exit 2) with the plain recipe's own message, before any trial."""

from __future__ import annotations

import pytest
from conftest import classification_recipe
from helpers import invoke

# swept key -> (a value the tiny BERT takes, one it refuses: hidden size 16, 128 positions)
SWEPT = {"lora.r": (4, 64), "data.max_length": (16, 4096)}


def _problem_line(output: str, key: str) -> str:
    """The refusal's words after `key: `, on one line."""
    text = " ".join(output.split())
    return text[text.index(f"{key}: ") + len(key) + 2 :]


@pytest.mark.parametrize("key", list(SWEPT))
def test_swept_values_meet_the_model_limits(key, tiny_models, topic_data, write_recipe, tmp_path):
    good, bad = SWEPT[key]
    recipe = classification_recipe(tiny_models["bert"], topic_data, tmp_path / "sweep")
    recipe["sweep"] = {"trials": 2, "sampler": "grid", "params": {key: [good, bad]}}
    swept = write_recipe(recipe)
    plain = invoke("validate", swept, f"{key}={bad}", "sweep=null")
    validated = invoke("validate", swept)
    started = invoke("sweep", swept)
    assert plain.exit_code == 2, plain.output
    assert validated.exit_code == 2, validated.output
    assert started.exit_code == 2, started.output
    refusal = _problem_line(plain.output, key)
    assert refusal.endswith(" (set on the command line)")  # the plain check's value came from an override
    refusal = refusal.removesuffix(" (set on the command line)")
    assert str(bad) in refusal
    assert f"sweep.params.{key}: {refusal}" in " ".join(validated.output.split())
    assert f"sweep.params.{key}: {refusal}" in " ".join(started.output.split())
    assert not (tmp_path / "sweep").exists()  # refused before anything was written, no trial run


def test_swept_values_within_the_limits_pass(tiny_models, topic_data, write_recipe, tmp_path):
    recipe = classification_recipe(tiny_models["bert"], topic_data, tmp_path / "sweep")
    recipe["sweep"] = {"trials": 2, "params": {key: [good] for key, (good, _) in SWEPT.items()}}
    validated = invoke("validate", write_recipe(recipe))
    assert validated.exit_code == 0, validated.output
