import pytest

from finetune.errors import RecipeError
from finetune.flows.resolve import build_recipe, load_recipe
from finetune.recipe.schema import apply_overrides

BASE = {
    "task": "classification",
    "model": {"name_or_path": "some/model"},
    "data": {"train": "t.jsonl", "eval": "e.jsonl"},
}


def problems_of(raw) -> list[str]:
    with pytest.raises(RecipeError) as info:
        build_recipe(raw)
    return info.value.problems


def test_minimal_recipe_gets_defaults():
    recipe = build_recipe(BASE)
    assert recipe.lora.targets == "all_linear"
    assert recipe.train.precision == "auto"
    assert recipe.output.dir == "runs/latest"


def test_misspelt_keys_name_place_and_suggestion_all_at_once():
    raw = {**BASE, "lora": {"rank": 8}, "train": {"epoch": 2, "lr": "fast"}, "evall": {}}
    problems = problems_of(raw)
    assert "lora.rank: unknown key (did you mean 'r'?)" in problems
    assert "train.epoch: unknown key (did you mean 'epochs'?)" in problems
    assert "evall: unknown key (did you mean 'eval'?)" in problems
    assert any(p.startswith("train.lr:") for p in problems)
    assert len(problems) == 4
    # PRODUCT.md's sketched names that finetune builds otherwise get what to write instead, not a near spelling.
    sketched = {**BASE, "data": {**BASE["data"], "retrieval": {"rerank": None}}}
    assert any(
        p.startswith("data.retrieval.rerank: unknown key (a reranker is a run of its own: task: rerank")
        for p in problems_of(sketched)
    )
    # Inside a section that may be null (`X | None`) too.
    optional = {**BASE, "eval": {"watermark": {"key": 1, "greenlist_ration": 0.3}}}
    assert "eval.watermark.greenlist_ration: unknown key (did you mean 'greenlist_ratio'?)" in problems_of(optional)


def test_a_key_in_the_wrong_section_is_pointed_at_its_place():
    """The suggestion looked at the section's own keys only: `train.max_length` got 'group_by_length', and
    `train.beta` or a top-level `grpo` (PRODUCT.md's own spellings) nothing."""
    raw = {**BASE, "train": {"max_length": 64, "beta": 0.2}, "model": {**BASE["model"], "targets": "all_linear"}}
    problems = problems_of({**raw, "grpo": {"group_size": 8}})
    assert "train.max_length: unknown key (did you mean 'data.max_length'?)" in problems
    assert "train.beta: unknown key (did you mean 'train.grpo.beta' or 'train.preference.beta'?)" in problems
    assert "model.targets: unknown key (did you mean 'lora.targets'?)" in problems
    assert "grpo: unknown key (did you mean 'train.grpo'?)" in problems


def test_unknown_task_and_missing_section():
    problems = problems_of({"task": "summarise", "data": BASE["data"]})
    assert any(p.startswith("task:") for p in problems)
    assert "model: required key is missing" in problems


def test_unknown_literal_value_suggests():
    problems = problems_of({**BASE, "data": {**BASE["data"], "overflow": "truncat"}})
    assert any("did you mean 'truncate'" in p for p in problems)


def test_task_rules_metrics_gates_columns():
    raw = {
        **BASE,
        "data": {**BASE["data"], "columns": {"txt": "body"}},
        "eval": {"metrics": ["acuracy"], "gates": {"rouge1": ">=0.2"}},
    }
    problems = problems_of(raw)
    assert any("data.columns.txt" in p and "did you mean 'text'" in p for p in problems)
    assert any("eval.metrics" in p and "did you mean 'accuracy'" in p for p in problems)
    assert any("eval.gates.rouge1" in p for p in problems)


def test_malformed_gate_in_recipe():
    problems = problems_of({**BASE, "eval": {"gates": {"accuracy": "at least 0.8"}}})
    assert any(p.startswith("eval.gates:") and "malformed gate" in p for p in problems)
    # A bare threshold: "Input should be a valid string" named no comparison.
    problems = problems_of({**BASE, "eval": {"gates": {"accuracy": 0.85}}})
    assert any('accuracy: 0.85 has no comparison; write one, quoted: accuracy: ">=0.85"' in p for p in problems)


def test_eval_source_required_and_exclusive():
    assert any("data.eval" in p for p in problems_of({**BASE, "data": {"train": "t.jsonl"}}))
    both = {**BASE, "data": {**BASE["data"], "eval_split": 0.1}}
    assert any("exclusive" in p for p in problems_of(both))


def test_overrides_are_parsed_as_yaml():
    raw = apply_overrides(
        {"train": {"epochs": 3}}, ["train.epochs=1", "train.lr=1e-3", "data.columns={text: body}", "output.dir=x"]
    )
    assert raw["train"]["epochs"] == 1
    assert raw["data"]["columns"] == {"text": "body"}
    recipe = build_recipe({**BASE, **raw, "data": {**BASE["data"], **raw["data"]}})
    assert recipe.train.lr == 1e-3 and recipe.output.dir == "x"
    # A gate's condition opens with YAML syntax: the refusal says how to quote it.
    with pytest.raises(RecipeError, match="""quote it: eval.gates.accuracy='">=0.1"'"""):
        apply_overrides({}, ["eval.gates.accuracy=>=0.1"])
    assert apply_overrides({}, ['eval.gates.accuracy=">=0.1"'])["eval"]["gates"]["accuracy"] == ">=0.1"


@pytest.mark.parametrize("bad", ["train.epochs", "=3", "train..lr=1", "train.lr=[1,"])
def test_malformed_overrides(bad):
    with pytest.raises(RecipeError):
        apply_overrides({}, [bad])


def test_override_into_scalar_is_an_error():
    with pytest.raises(RecipeError, match="not a section"):
        apply_overrides({"task": "qa"}, ["task.mode=x"])


def test_yaml_errors_name_the_file_and_line(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("task: classification\nmodel: [unclosed\n")
    with pytest.raises(RecipeError, match=r"r.yaml: not valid YAML \(line"):
        load_recipe(path)
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "missing.yaml")
    path.write_text("- a\n- b\n")
    with pytest.raises(RecipeError, match="mapping of sections"):
        load_recipe(path)


@pytest.mark.parametrize(
    ("gates", "hint"),
    [
        ("eval:\n  gates:\n    accuracy: >=0.8\n", 'accuracy: ">=0.8"'),
        ('eval:\n  gates: {accuracy: "<=0.2", f1: >=0.5}\n', 'f1: ">=0.5"'),
        ("eval:\n  gates:\n    f1: >0.8  # the bar\n", 'f1: ">0.8"'),
    ],
)
def test_a_bare_gate_condition_is_named_with_its_quoting(tmp_path, gates, hint):
    """`accuracy: >=0.8` unquoted: YAML read `>` as a folded block and spoke of chomping indicators."""
    path = tmp_path / "r.yaml"
    path.write_text("task: classification\n" + gates)
    with pytest.raises(RecipeError, match="not valid YAML") as caught:
        load_recipe(path)
    assert f"a gate's condition is quoted: {hint}" in str(caught.value)


def test_a_bare_gate_condition_in_an_override_mapping_is_named():
    with pytest.raises(RecipeError, match='a gate\'s condition is quoted: accuracy: ">=0.8"'):
        apply_overrides({}, ["eval.gates={accuracy: >=0.8}"])


def test_a_gate_folded_into_an_empty_block_is_named(tmp_path):
    """`accuracy: >1` is valid YAML (a folded block, indentation 1) whose text is empty: "malformed gate
    'accuracy'" named no cause."""
    path = tmp_path / "r.yaml"
    path.write_text(
        "task: classification\nmodel: {name_or_path: m}\ndata: {train: t.jsonl}\neval:\n  gates:\n    accuracy: >1\n"
    )
    with pytest.raises(RecipeError, match=r'accuracy: no condition .*quoted, e.g. accuracy: ">=0.8"'):
        load_recipe(path)


@pytest.mark.slow  # a real subprocess or a kill -9: `make test` runs it, the fast loop does not
def test_every_shipped_recipe_validates(monkeypatch):
    import re
    from pathlib import Path

    from finetune.flows.resolve import validate_recipe_file

    repo = Path(__file__).resolve().parents[2]
    monkeypatch.chdir(repo)
    # The BART recipes name a hub id that is not cached here: offline, validate rightly refuses them (tested in
    # test_validation); online it checks everything but the family, without downloading.
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    recipes = sorted((repo / "recipes").glob("*/*.yaml"))
    assert recipes
    for recipe in recipes:
        text = recipe.read_text()
        runs = re.search(r"^# Run: (\w+=\S+ )*finetune run " + re.escape(str(recipe.relative_to(repo))), text, re.M)
        assert text.startswith("#") and runs, f"{recipe} must open with what it does and the command that runs it"
        validate_recipe_file(recipe.relative_to(repo))
