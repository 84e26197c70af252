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


def test_eval_refuses_settings_only_training_reads(tiny_models, topic_data, write_recipe, tmp_path):
    """`eval RUN eval.watermark.noise=0.3` or `train.lr=1` changed nothing, silently: refused, naming them, before
    anything loads; a setting evaluation reads (the eval data, a gate) is still applied."""
    path = write_recipe(classification_recipe(tiny_models["bert"], topic_data, tmp_path / "run"))
    refused = invoke("eval", path, "train.lr=1", "eval.watermark.noise=0.3", "--output", tmp_path / "e")
    assert refused.exit_code == 2, refused.output
    said = " ".join(refused.output.split())
    assert "'train.lr=1', 'eval.watermark.noise=0.3': only training reads them" in said
    assert not (tmp_path / "e").exists()
    one = invoke("eval", path, "lora.r=4", "--output", tmp_path / "e")
    assert one.exit_code == 2 and "'lora.r=4': only training reads it" in one.output, one.output
    assert invoke("eval", path, "eval.batch_size=2", "--output", tmp_path / "e2").exit_code in (0, 4)
    # Where a run writes and how many processes train it: eval has --output and runs one process.
    elsewhere = invoke("eval", path, "output.dir=x", "distributed.num_processes=2", "--output", tmp_path / "e")
    assert elsewhere.exit_code == 2 and "eval writes where --output says" in elsewhere.output, elsewhere.output


def test_a_problem_with_an_override_says_the_command_line_set_it(tiny_models, topic_data, write_recipe, tmp_path):
    """The heading names the recipe file; the file does not hold a value an override gave, so that problem says so."""
    recipe = classification_recipe(tiny_models["bert"], topic_data, tmp_path / "run")
    recipe["train"]["warmup"] = -1  # the file's own mistake
    path = write_recipe(recipe)
    for command in (("validate", path), ("run", path, "--dry-run", "--no-estimate")):
        result = invoke(*command, "lora.r=abc")
        assert result.exit_code == 2, result.output
        lines = [" ".join(line.split()) for line in result.output.splitlines()]
        assert any(line.startswith("- lora.r:") and line.endswith("(set on the command line)") for line in lines)
        assert any(line.startswith("- train.warmup:") and "command line" not in line for line in lines), lines


def test_eval_applies_no_rule_on_what_only_training_reads(monkeypatch, tiny_models, topic_data, write_recipe, tmp_path):
    """A recipe naming a tracker this machine lacks trains nowhere here, but evaluates: its override is refused at
    eval (it would be ignored), so the rule on it must not block eval either."""
    import finetune.flows.resolve as resolve

    monkeypatch.setattr(resolve, "missing_trackers", lambda names: [f"{n} needs its package" for n in names])
    path = write_recipe(classification_recipe(tiny_models["bert"], topic_data, tmp_path / "run", report_to=["wandb"]))
    trained = invoke("run", path, "--dry-run", "--no-estimate")
    assert trained.exit_code == 2 and "train.report_to: wandb needs its package" in trained.output
    evaluated = invoke("eval", path, "--output", tmp_path / "e")
    assert evaluated.exit_code in (0, 4), evaluated.output


def test_a_section_given_whole_is_refused_at_eval_by_the_keys_it_sets(tiny_models, topic_data, write_recipe, tmp_path):
    path = write_recipe(classification_recipe(tiny_models["bert"], topic_data, tmp_path / "run"))
    refused = invoke("eval", path, "train={lr: 1, seed: 3}", "--output", tmp_path / "e")
    assert refused.exit_code == 2 and "only training reads it" in refused.output, refused.output
    best = invoke("eval", path, "eval.best_metric=accuracy", "--output", tmp_path / "e")
    assert best.exit_code == 2 and "only training reads it" in best.output, best.output


def test_a_problem_the_file_made_is_not_put_on_an_override_inside_its_section(
    tiny_models, topic_data, write_recipe, tmp_path
):
    recipe = classification_recipe(tiny_models["bert"], topic_data, tmp_path / "run")
    recipe["data"]["eval_split"] = 0.2  # beside data.eval: the file's own mistake, reported on the section
    result = invoke("validate", write_recipe(recipe), "data.max_length=64")
    assert result.exit_code == 2 and "data.eval_split" in result.output, result.output
    assert "command line" not in result.output
