"""Recipe values that would blow up later: step counts beyond what the step arithmetic holds, YAML aliases that
multiply a recipe (a "billion laughs"), and huge values quoted in a problem. Each is refused by `validate` and
`run` alike with exit 2, naming the key or the line, at once and in little memory."""

from __future__ import annotations

import pytest
import yaml
from typer.testing import CliRunner

from finetune.cli import app
from finetune.errors import brief
from finetune.recipe.schema import ALIAS_VALUES_MAX, STEPS_MAX, build_recipe

runner = CliRunner()

BASE = {
    "task": "classification",
    "model": {"name_or_path": "some/model"},
    "data": {"train": "t.jsonl", "eval": "e.jsonl"},
}


def invoke(tmp_path, text: str, command: str):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    result = runner.invoke(app, [command, str(path)] + (["--dry-run", "--no-estimate"] if command == "run" else []))
    assert "Traceback" not in result.output and "internal error" not in result.output, result.output
    return result


def with_setting(section: str, key: str, value) -> str:
    raw = yaml.safe_load(yaml.safe_dump(BASE))
    node = raw
    for part in section.split("."):
        node = node.setdefault(part, {})
    node[key] = value
    return yaml.safe_dump(raw)


HUGE = [
    ("train", "epochs", "1e308"),  # YAML reads an unquoted 1e308 as this text; the schema takes numeric text
    ("train", "epochs", 1e308),
    ("train", "epochs", 2 * STEPS_MAX),  # a float: 2**53 + 1 is 2**53
    ("train", "max_steps", STEPS_MAX + 1),
    ("train", "max_steps", 10**20),
    ("train", "warmup", 1e300),
    ("data.retrieval", "epochs", 1e308),
    ("eval", "memory_mb", 2**44),
]


@pytest.mark.parametrize(("section", "key", "value"), HUGE, ids=[f"{s}.{k}={v!r}" for s, k, v in HUGE])
@pytest.mark.parametrize("command", ["validate", "run"])
def test_a_huge_step_count_is_refused_naming_the_key(section, key, value, command, tmp_path):
    result = invoke(tmp_path, with_setting(section, key, value), command)
    assert result.exit_code == 2, result.output
    assert f"{section}.{key}: Input should be less than or equal to" in result.output, result.output


def test_the_largest_step_counts_are_accepted():
    recipe = build_recipe({**BASE, "train": {"epochs": STEPS_MAX, "max_steps": STEPS_MAX, "warmup": STEPS_MAX}})
    assert recipe.train.epochs == STEPS_MAX and recipe.train.max_steps == STEPS_MAX


def laughs(levels: int, width: int = 10) -> list[str]:
    """YAML flow items nesting `levels` anchors, each repeating the one before `width` times."""
    items = ["&l0 [" + ", ".join(["lol"] * width) + "]"]
    for level in range(1, levels):
        items.append(f"&l{level} [" + ", ".join([f"*l{level - 1}"] * width) + "]")
    return items


def bomb_recipe(levels: int) -> str:
    return yaml.safe_dump(BASE).replace("data:\n", "data:\n  labels: [" + ", ".join(laughs(levels)) + "]\n", 1)


@pytest.mark.parametrize("command", ["validate", "run"])
def test_an_alias_bomb_is_refused_before_it_is_expanded(command, tmp_path):
    # 10**6 values once expanded: far above the limit, still small enough to expand without the refusal.
    result = invoke(tmp_path, bomb_recipe(6), command)
    assert result.exit_code == 2, result.output
    assert "refused (line" in result.output and f"more than {ALIAS_VALUES_MAX:,} values" in result.output
    assert len(result.output) < 1000, len(result.output)


def test_an_alias_bomb_in_an_override_is_refused(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(BASE))
    result = runner.invoke(app, ["run", str(path), "--dry-run", f"data.labels=[{', '.join(laughs(6))}]"])
    assert result.exit_code == 2 and "value refused" in result.output, result.output


def test_a_recursive_alias_is_refused(tmp_path):
    text = yaml.safe_dump(BASE).replace("data:\n", "data:\n  labels: &a [x, *a]\n", 1)
    result = invoke(tmp_path, text, "validate")
    assert result.exit_code == 2 and "refers to the value that contains it" in result.output, result.output


def test_a_few_aliases_are_still_yaml(tmp_path):
    # An anchor reused a few times is ordinary YAML: the recipe gets past the loader (and fails later, on the
    # missing model, not on its aliases).
    text = yaml.safe_dump(BASE).replace("data:\n", "data:\n  labels: &a [x, y]\n", 1) + "sweep_labels_copy: *a\n"
    result = invoke(tmp_path, text, "validate")
    assert result.exit_code == 2 and "sweep_labels_copy: unknown key" in result.output, result.output


def test_a_huge_value_is_quoted_short(tmp_path):
    result = invoke(tmp_path, with_setting("train", "scheduler", "x" * 10**6), "validate")
    assert result.exit_code == 2 and "train.scheduler:" in result.output, result.output
    assert "(got 'xxx" in result.output and "...x" in result.output and len(result.output) < 2000


def test_brief_cuts_long_values_and_nesting():
    assert brief("short") == "'short'"
    assert len(brief("y" * 10**6)) < 500
    assert brief(list(range(100))).endswith(", ...]")
    assert len(brief([[["z" * 1000] * 1000] * 1000])) < 2000


def test_yaml_merge_keys_work_and_a_key_given_here_overrides_the_merged_one():
    """`<<: *defaults` (YAML 1.1 merge keys, common in CI configs) was refused by the duplicate-key check with the
    loader's "could not determine a constructor for the tag ...merge"."""
    from finetune.recipe.schema import _UniqueKeyLoader

    text = "defaults: &d {max_length: 32, eval_split: 0.2}\ndata:\n  <<: *d\n  max_length: 64\n  train: t.jsonl\n"
    assert yaml.load(text, Loader=_UniqueKeyLoader)["data"] == {"max_length": 64, "eval_split": 0.2, "train": "t.jsonl"}
    with pytest.raises(yaml.constructor.ConstructorError, match="key 'train' is given twice"):
        yaml.load("data:\n  <<: {a: 1}\n  train: x\n  train: y\n", Loader=_UniqueKeyLoader)
