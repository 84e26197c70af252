"""`finetune validate` reads preference pairs and thumbs as `run` does: a row `run --dry-run` refuses (exit 3) is
refused by validate with the same message, the file and line named (one check: preference.judged_rows)."""

from __future__ import annotations

import pytest
from conftest import write_jsonl
from helpers import invoke

PAIRS = [
    {"prompt": "the cat", "chosen": "sat on the mat", "rejected": "ran"},
    {"prompt": "a dog", "chosen": "barked", "rejected": "slept all day long"},
    {"prompt": "one bird", "chosen": "sang", "rejected": "flew away"},
    {"prompt": "the fish", "chosen": "swam", "rejected": "sank"},
]
THUMBS = [
    {"prompt": "the cat", "completion": "sat on the mat", "label": True},
    {"prompt": "a dog", "completion": "slept all day", "label": False},
    {"prompt": "a bird", "completion": "sang", "label": True},
    {"prompt": "the fish", "completion": "swam", "label": False},
]


def _with(rows: list[dict], line: int, **changes) -> list[dict]:
    rows = [dict(r) for r in rows]
    rows[line - 1].update(changes)
    return rows


# name -> (objective, training rows, words the message holds)
CASES = {
    "chosen equals rejected": ("dpo", _with(PAIRS, 3, rejected="sang"), "'chosen' equals 'rejected'"),
    "chosen equals rejected but for a space": ("dpo", _with(PAIRS, 3, rejected="sang "), "'chosen' equals 'rejected'"),
    "empty rejected": ("dpo", _with(PAIRS, 2, rejected="  "), "'rejected' is empty"),
    "thumb label not a boolean": (
        "kto",
        _with([dict(r, label=str(r["label"]).lower()) for r in THUMBS], 2, label="yes"),
        "must be true (desirable) or false",
    ),
    "every thumb desirable": ("kto", [dict(r, label=True) for r in THUMBS], "every row is desirable"),
}


def _recipe(model_dir, tmp_path, objective: str, rows: list[dict]) -> dict:
    return {
        "task": "copywriting",
        "model": {"name_or_path": str(model_dir)},
        "data": {
            "train": str(write_jsonl(tmp_path / "data" / "train.jsonl", rows)),
            "eval": str(write_jsonl(tmp_path / "data" / "eval.jsonl", PAIRS)),
            "max_length": 32,
        },
        "lora": {"r": 4, "alpha": 8, "targets": "all_linear"},
        "train": {"epochs": 1, "batch_size": 2, "precision": "fp32", "objective": objective},
        "eval": {"max_new_tokens": 4},
        "output": {"dir": str(tmp_path / "run")},
    }


def _message(output: str) -> str:
    """The problem as both commands print it, from the split's name on, on one line."""
    text = " ".join(output.split())
    return text[text.index("data.train:") :]


@pytest.mark.parametrize("name", list(CASES))
def test_validate_refuses_the_preference_rows_run_refuses(name, tiny_models, tmp_path, write_recipe):
    objective, rows, words = CASES[name]
    path = write_recipe(_recipe(tiny_models["gpt2"], tmp_path, objective, rows))
    validated = invoke("validate", path)
    dry_run = invoke("run", path, "--dry-run", "--no-estimate")
    assert dry_run.exit_code == 3, dry_run.output
    assert validated.exit_code == 3, validated.output
    assert words in _message(validated.output)
    assert _message(validated.output) == _message(dry_run.output)
    if "every" not in name:  # a row's problem names its file and line
        assert "train.jsonl:" in _message(validated.output)


def test_validate_accepts_good_pairs_and_thumbs(tiny_models, tmp_path, write_recipe):
    for objective, rows in (("dpo", PAIRS), ("kto", THUMBS)):
        path = write_recipe(_recipe(tiny_models["gpt2"], tmp_path, objective, rows))
        validated = invoke("validate", path)
        assert validated.exit_code == 0, validated.output


@pytest.mark.parametrize("field", ["test", "entry_point"])
def test_validate_refuses_a_grpo_code_row_run_refuses(field, tiny_models, tmp_path, write_recipe, monkeypatch):
    """GRPO's code reward reads each training row's tests and entry point: a row without them passed validate
    (exit 0) and was refused by run (exit 3)."""
    import json
    from pathlib import Path

    monkeypatch.setenv("FINETUNE_ALLOW_CODE_EXECUTION", "1")
    source = Path(__file__).resolve().parents[2] / "data" / "code_rl"
    rows = [json.loads(line) for line in (source / "train.jsonl").read_text().splitlines()[:4]]
    del rows[2][field]
    recipe = _recipe(tiny_models["gpt2"], tmp_path, "grpo", rows)
    recipe["task"] = "codegen"
    recipe["data"]["eval"] = str(source / "eval.jsonl")
    recipe["data"]["max_length"] = 64  # the prompt and GRPO's 64 sampled tokens in the tiny model's 128 positions
    recipe["train"]["grpo"] = {"max_new_tokens": 8}
    recipe["eval"] = {"max_new_tokens": 4, "execute_code": True, "sandbox": "basic"}
    path = write_recipe(recipe)
    validated = invoke("validate", path)
    dry_run = invoke("run", path, "--dry-run", "--no-estimate")
    assert dry_run.exit_code == 3 and validated.exit_code == 3, (validated.output, dry_run.output)
    assert f"train.jsonl:3: field {field!r} must be text, got no value (missing or null)" in _message(validated.output)
    assert _message(validated.output) == _message(dry_run.output)
