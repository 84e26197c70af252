"""One validation layer: `finetune validate` refuses exactly what `finetune run --dry-run` refuses, with the same
exit code and message, before any weights load."""

from __future__ import annotations

import copy

import pytest
from conftest import REPO, classification_recipe
from typer.testing import CliRunner

from finetune.cli import app

runner = CliRunner()


def _generation(recipe: dict) -> dict:
    recipe = copy.deepcopy(recipe)
    recipe["task"] = "copywriting"
    recipe["data"]["columns"] = {"prompt": "text", "completion": "label"}
    return recipe


# name -> (change to the valid tiny-BERT recipe, exit code, words the message must hold)
INVALID = {
    "packing on classification": (lambda r: r["train"].update(packing=True), 2, "train.packing"),
    "missing local model directory": (
        lambda r: r["model"].update(name_or_path="./no/such/model"),
        2,
        "no such directory",
    ),
    "missing data file": (
        lambda r: r["data"].update(train="missing.jsonl"),
        3,
        "data.train: file not found: missing.jsonl",
    ),
    "unknown gate metric": (lambda r: r.update(eval={"gates": {"acuracy": ">=0.5"}}), 2, "did you mean 'accuracy'"),
    "gate that can never pass": (lambda r: r.update(eval={"gates": {"accuracy": ">=1.5"}}), 2, "can never pass"),
    "two fields on one column": (
        lambda r: r["data"].update(columns={"text": "text", "text_pair": "text"}),
        2,
        "all map to column 'text'",
    ),
    "duplicate labels": (
        lambda r: r["data"].update(labels=["sports", "weather", "sports"]),
        2,
        "listed more than once",
    ),
    "labels that are one class, spelt two ways": (
        lambda r: r["data"].update(labels=["caf\u00e9", "weather", "cafe\u0301 "]),
        2,
        "listed more than once (as",
    ),
    "a directory as the data file": (lambda r: r["data"].update(train="."), 3, "is a directory, not a data file"),
    "a sweep judged by a metric eval.metrics leaves out": (
        lambda r: r.update(
            eval={"metrics": ["accuracy"]},
            sweep={"trials": 2, "objective": ["macro_f1"], "params": {"train.lr": [0.001, 0.002]}},
        ),
        2,
        "sweep.objective: macro_f1 is not reported",
    ),
    # Evaluations during training judged by best_metric's default (macro_f1), filtered out: never "better".
    "judged by a metric eval.metrics leaves out": (
        lambda r: r.update(eval={"metrics": ["accuracy"], "every": 5}),
        2,
        "eval.best_metric (its default, which evaluations during training are judged by): macro_f1 is not reported",
    ),
    "max_length above the positions": (lambda r: r["data"].update(max_length=4096), 2, "128 positions"),
    "deepspeed without a GPU": (lambda r: r.update(distributed={"strategy": "deepspeed"}), 2, "runs on GPUs"),
    "QLoRA without a GPU": (lambda r: r.update(distributed={"quantization": "4bit"}), 2, "needs a CUDA GPU"),
    "generation on an encoder": (lambda r: r.update(_generation(r)), 2, "not supported on the bert family"),
    "hub id not cached, offline": (
        lambda r: r["model"].update(name_or_path="someorg/not-cached"),
        2,
        "HF_HUB_OFFLINE forbids downloading it",
    ),
    "empty train list": (lambda r: r["data"].update(train=[]), 2, "data.train: the list of training files is empty"),
    "empty eval list": (lambda r: r["data"].update(eval=[]), 2, "data.eval: the list of eval files"),
    # A metric the evaluation never reports: the gate failed as "missing" only after training.
    "a watermark gate without a watermark": (
        lambda r: r.update(eval={"gates": {"watermark_detected": ">=0.5"}}),
        2,
        "eval.gates.watermark_detected: watermark_detected is reported only with eval.watermark",
    ),
    "a retrieval gate without a knowledge base": (
        lambda r: r.update(eval={"gates": {"retrieval_recall@k": ">=0.5"}}),
        2,
        "retrieval_recall@k is reported only by knowledge-base qa",
    ),
    "a multi-label setting on single labels": (
        lambda r: r.update(eval={"threshold": 0.5}),
        2,
        "eval.threshold: applies to multi-label classification only",
    ),
    # Settings nothing in the recipe reads: refused, never ignored.
    "a generation setting on classification": (
        lambda r: r.update(eval={"temperature": 0.7}),
        2,
        "eval.temperature: read only by the generation tasks",
    ),
    "retrieval settings without a knowledge base": (
        lambda r: r["data"].update(retrieval={"top_k": 3}),
        2,
        "data.retrieval: read only by a knowledge base",
    ),
    "an empty stop string": (
        lambda r: r.update(eval={"stop": ["\n", ""]}),
        2,
        "eval.stop: an empty stop string would end every answer at its first token",
    ),
    # Settings of another objective (a recipe turned to sft keeps its grpo section): refused, never ignored.
    "grpo settings under sft": (
        lambda r: r["train"].update(grpo={"group_size": 3}),
        2,
        "train.grpo: group_size set, but only train.objective grpo reads",
    ),
    "a dpo setting under sft": (
        lambda r: r["train"].update(preference={"loss": "ipo"}),
        2,
        "train.preference.loss: only train.objective dpo reads it",
    ),
    # Where run may not write whatever its flags (validate passed both; run refused them).
    "output.dir is a file": (lambda r: r["output"].update(dir="recipe.yaml"), 2, "is a file, not a directory"),
    "output.dir under a file": (lambda r: r["output"].update(dir="recipe.yaml/run"), 2, "which is a file, not"),
    "output.dir holds the user's files": (
        lambda r: r["output"].update(dir="."),
        2,
        "is not empty and holds no finetune run",
    ),
}


GPU_ONLY = {"deepspeed without a GPU", "QLoRA without a GPU"}


def after_the_file(output: str) -> str:
    place = "recipe.yaml:" if "recipe.yaml:" in output else "error:"
    return output.split(place, 1)[1].strip()


@pytest.mark.parametrize("name", list(INVALID))
def test_validate_refuses_exactly_what_run_refuses(name, tiny_models, topic_data, write_recipe, tmp_path, monkeypatch):
    if name in GPU_ONLY:
        import torch

        if torch.cuda.is_available():
            pytest.skip("a GPU is present here, so the recipe is valid")
    monkeypatch.chdir(tmp_path)
    change, code, words = INVALID[name]
    recipe = classification_recipe(tiny_models["bert"], topic_data, tmp_path / "run")
    change(recipe)
    path = write_recipe(recipe)
    validated = runner.invoke(app, ["validate", str(path)])
    dry_run = runner.invoke(app, ["run", str(path), "--dry-run"])
    assert validated.exit_code == code, validated.output
    assert dry_run.exit_code == code, dry_run.output
    assert words in validated.output and words in dry_run.output
    # The same problems, worded the same: everything after the file name (run names none for its output.dir).
    assert after_the_file(validated.output) == after_the_file(dry_run.output)
    assert "Traceback" not in dry_run.output
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_fsdp_is_valid_on_cpu_but_not_with_a_learned_watermark(tiny_models, topic_data, write_recipe, tmp_path):
    """fsdp on CPU processes shards through torch's FSDP2 (training/loop.py); a learned watermark, whose blocks are
    hooked onto the unsharded model's layers, is refused with it."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("on a GPU, fsdp goes through accelerate's own FSDP")
    recipe = classification_recipe(tiny_models["llama"], topic_data, tmp_path / "run")
    recipe["distributed"] = {"strategy": "fsdp", "num_processes": 2}
    result = runner.invoke(app, ["validate", str(write_recipe(recipe))])
    assert result.exit_code == 0, result.output
    marked = _generation(recipe)
    marked["eval"] = {"max_new_tokens": 8, "watermark": {"method": "learned", "key": 7, "bits": 8}}
    result = runner.invoke(app, ["validate", str(write_recipe(marked, "marked.yaml"))])
    assert result.exit_code == 2 and "1 problem" in result.output, result.output
    assert "distributed.strategy: fsdp on CPU trains a sharded copy" in result.output.replace("\n", " ")


def test_a_learned_watermark_on_more_layers_than_the_model_has_is_refused(
    tiny_models, topic_data, write_recipe, tmp_path
):
    """eval.watermark.embedder_layers above the decoder's layer count was cut silently to all of them (and
    recorded as asked): validate and run refuse it alike, naming the count."""
    recipe = _generation(classification_recipe(tiny_models["llama"], topic_data, tmp_path / "run"))
    recipe["eval"] = {
        "max_new_tokens": 8,
        "watermark": {"method": "learned", "key": 7, "bits": 8, "embedder_layers": 100},
    }
    path = write_recipe(recipe)
    validated = runner.invoke(app, ["validate", str(path)])
    dry_run = runner.invoke(app, ["run", str(path), "--dry-run"])
    for result in (validated, dry_run):
        assert result.exit_code == 2, result.output
        assert "eval.watermark.embedder_layers: 100 is more than the" in " ".join(result.output.split())
    recipe["eval"]["watermark"]["embedder_layers"] = 1
    assert runner.invoke(app, ["validate", str(write_recipe(recipe, "ok.yaml"))]).exit_code == 0


def test_every_problem_is_reported_at_once(tiny_models, topic_data, write_recipe, tmp_path):
    recipe = classification_recipe(tiny_models["bert"], topic_data, tmp_path / "run")
    recipe["train"]["packing"] = True
    recipe["data"]["max_length"] = 4096
    result = runner.invoke(app, ["validate", str(write_recipe(recipe))])
    assert result.exit_code == 2 and "2 problems" in result.output
    assert "train.packing" in result.output and "data.max_length" in result.output


def test_duplicate_keys_and_binary_recipes_are_refused(tmp_path):
    duplicated = tmp_path / "dup.yaml"
    duplicated.write_text("task: classification\ntrain:\n  lr: 0.1\nmodel: {name_or_path: x}\ntrain:\n  epochs: 1\n")
    result = runner.invoke(app, ["validate", str(duplicated)])
    assert result.exit_code == 2 and "key 'train' is given twice (first on line 2)" in result.output
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"task: classification\n\xff\xfe\x00")
    result = runner.invoke(app, ["validate", str(binary)])
    assert result.exit_code == 2 and "not a UTF-8 text file" in result.output


def test_a_forced_family_that_contradicts_the_checkpoint_is_refused(tiny_models, topic_data, write_recipe, tmp_path):
    recipe = classification_recipe(tiny_models["llama"], topic_data, tmp_path / "run")
    recipe["model"]["family"] = "bert"
    result = runner.invoke(app, ["validate", str(write_recipe(recipe))])
    assert result.exit_code == 2 and "bert is forced, but" in result.output and "gpt-family" in result.output


DATA_MISTAKES = {
    "latin-1 text": (
        b'{"text": "caf\xe9", "label": "a"}\n',
        "train.jsonl",
        "train.jsonl:1: not UTF-8 text (byte 13 of the line",
    ),
    "a fake .gz": (b"not gzip at all", "train.jsonl.gz", "not a readable gzip file"),
    "an unknown extension": (b"text,label\nx,a\n", "train.txt", "unknown data file type '.txt'"),
    "mixed types in a column": (
        b'{"text": "a", "label": "x"}\n{"text": "b", "label": 3}\n{"text": "c", "label": [1]}\n',
        "train.jsonl",
        "column 'label' is text on line 1 but a number on line 2",
    ),
    # pyarrow's own words before: "Expected bytes, got a 'int' object", no line, no column
    "a number among a row's labels": (
        b'{"text": "a", "label": ["x"]}\n{"text": "b", "label": ["y"]}\n{"text": "c", "label": ["x", 3]}\n',
        "train.jsonl",
        "column 'label' (its items) is text on line 1 but a number on line 3",
    ),
}


@pytest.mark.parametrize("case", list(DATA_MISTAKES))
def test_data_mistakes_name_the_file_and_place(case, tiny_models, topic_data, write_recipe, tmp_path):
    content, name, words = DATA_MISTAKES[case]
    path = tmp_path / name
    path.write_bytes(content)
    recipe = classification_recipe(tiny_models["bert"], {**topic_data, "train": path}, tmp_path / "run")
    result = runner.invoke(app, ["run", str(write_recipe(recipe))])
    assert result.exit_code == 3, result.output
    assert words in result.output.replace("\n", "") and "Traceback" not in result.output
    assert not (tmp_path / "run").exists()


def test_validate_names_a_bad_row_in_each_data_file_at_once(tiny_models, topic_data, write_recipe, tmp_path):
    """A bad line in data.train hid one in data.eval until the first was fixed ("every problem at once")."""
    (tmp_path / "train.jsonl").write_bytes(b'{"text": "a", "label": "x"}\n{"text": "b" "label": "y"}\n')
    (tmp_path / "eval.jsonl").write_bytes(b'{"text": "a", "label": "x"}\n{"text": 7, "label": "y"}\n')
    data = {**topic_data, "train": tmp_path / "train.jsonl", "eval": tmp_path / "eval.jsonl"}
    result = runner.invoke(
        app, ["validate", str(write_recipe(classification_recipe(tiny_models["bert"], data, tmp_path / "run")))]
    )
    assert result.exit_code == 3, result.output
    output = " ".join(result.output.split())
    assert "2 problems" in output and "train.jsonl:2: malformed JSON line" in output and "eval.jsonl:2" in output


def test_a_schema_mistake_does_not_hide_a_missing_data_file(tiny_models, topic_data, write_recipe, tmp_path):
    """validate and run named lora.r and the misspelt key, and only after those were fixed the missing file."""
    recipe = classification_recipe(
        tiny_models["bert"], {**topic_data, "train": tmp_path / "gone.jsonl"}, tmp_path / "run"
    )
    recipe["lora"]["r"] = 0
    path = write_recipe(recipe)
    for command in (["validate", str(path)], ["run", str(path), "--dry-run"]):
        result = runner.invoke(app, command)
        output = " ".join(result.output.split())
        assert result.exit_code == 2 and "2 problems" in output and "lora.r:" in output, result.output
        assert f"data.train: file not found: {tmp_path / 'gone.jsonl'}" in output


@pytest.mark.parametrize("refused", ["schema", "rule"])
def test_a_wrong_setting_does_not_hide_a_bad_row(refused, tiny_models, topic_data, write_recipe, tmp_path):
    """validate and run named train.lr (or a rule's problem) and stopped: the bad row came only after it was fixed. A setting
    the rows' reading depends on (a data key) still hides them: they would be judged by its default."""
    (tmp_path / "train.jsonl").write_bytes(b'{"text": "a", "label": "x"}\n{"text": "b"}\n')
    recipe = classification_recipe(
        tiny_models["bert"], {**topic_data, "train": tmp_path / "train.jsonl"}, tmp_path / "r"
    )
    if refused == "schema":
        recipe["train"]["lr"] = -1
    else:
        recipe["train"]["objective"] = "dpo"  # a preference objective on classification: a rule's refusal
    path = write_recipe(recipe)
    for command in (["validate", str(path)], ["run", str(path), "--dry-run"]):  # validate = run
        result = runner.invoke(app, command)
        output = " ".join(result.output.split())
        assert result.exit_code == 2 and "2 problems" in output, result.output
        assert "train.jsonl:2: column 'label'" in output and ("train.lr:" in output or "train.objective" in output)
    for key, value in (("data", {**recipe["data"], "columns": {"text": "body"}}), ("train", {"objective": "dpoo"})):
        refused = {**recipe, key: {**recipe[key], **value}}  # a setting the rows are read by, refused: not read
        result = runner.invoke(app, ["validate", str(write_recipe(refused))])
        assert result.exit_code == 2 and "train.jsonl:2" not in result.output, result.output


def test_user_text_is_printed_as_typed(tiny_models, topic_data, write_recipe, tmp_path):
    recipe = classification_recipe(tiny_models["bert"], topic_data, tmp_path / "run")
    recipe["data"]["train"] = "squad:smile:"  # not a file: a hub id that is not cached, offline
    result = runner.invoke(app, ["run", str(write_recipe(recipe))])
    assert "squad:smile:" in result.output and "😄" not in result.output


def test_a_prompt_and_its_new_tokens_past_the_positions_get_a_fix_that_is_allowed():
    """'use train.grpo.max_new_tokens <= 0' was offered where the prompt alone fills the positions: at least 1."""
    from finetune.flows.resolve import _room_fix

    assert _room_fix("eval.max_new_tokens", 8, 128, 128) == "data.max_length <= 120"
    assert _room_fix("eval.max_new_tokens", 8, 124, 128) == "eval.max_new_tokens <= 4 or data.max_length <= 120"
    assert _room_fix("eval.max_new_tokens", 200, 128, 128) == (
        "eval.max_new_tokens and data.max_length that add up to at most 128"
    )
    assert _room_fix("eval.max_new_tokens", 126, 130, 128) == (  # data.max_length <= 2: below what the schema takes
        "eval.max_new_tokens and data.max_length that add up to at most 128"
    )


def test_pass_at_k_is_asked_only_where_it_is_reported():
    """pass@10 with one sample per problem, pass@5 not in eval.pass_k, any pass@k with the code not run: the gate
    failed as "missing" after training, and eval.metrics: [pass@5] reported nothing."""
    from finetune.flows.resolve import recipe_rules
    from finetune.recipe.schema import build_recipe

    def problems(**settings):
        raw = {"task": "codegen", "model": {"name_or_path": "m"}, "data": {"train": "t.jsonl", "eval": "e.jsonl"}}
        return recipe_rules(build_recipe({**raw, "eval": settings}))

    assert "eval.gates.pass@10: pass@10 needs at least 10 samples per problem (eval.num_samples 1)" in problems(
        execute_code=True, gates={"pass@10": ">=0.1"}
    )
    assert "eval.metrics: pass@5 is not reported: eval.pass_k [1, 10] does not list 5" in problems(
        execute_code=True, num_samples=10, temperature=0.8, pass_k=[1, 10], metrics=["pass@5"]
    )
    assert any("set eval.execute_code: true" in p for p in problems(gates={"pass@1": ">=0.1"}))
    assert problems(execute_code=True, num_samples=10, temperature=0.8, gates={"pass@10": ">=0.1"}) == []


def test_label_smoothing_is_refused_where_the_dpo_loss_does_not_read_it():
    from finetune.flows.resolve import recipe_rules
    from finetune.recipe.schema import build_recipe

    raw = {"task": "copywriting", "model": {"name_or_path": "m"}, "data": {"train": "t.jsonl", "eval": "e.jsonl"}}

    def problems(**preference):
        return recipe_rules(build_recipe({**raw, "train": {"objective": "dpo", "preference": preference}}))

    assert any("label_smoothing: only DPO's robust loss reads it" in p for p in problems(label_smoothing=0.2))
    assert problems(loss="robust", label_smoothing=0.2) == []


def test_weights_without_their_term_and_a_reward_of_nothing_are_refused():
    from finetune.flows.resolve import recipe_rules
    from finetune.recipe.schema import build_recipe

    raw = {"task": "copywriting", "model": {"name_or_path": "m"}, "data": {"train": "t.jsonl", "eval": "e.jsonl"}}

    def problems(train):
        return recipe_rules(build_recipe({**raw, "train": train}))

    found = problems({"objective": "grpo", "grpo": {"reward": {"task": 0, "pattern_weight": 0.5}}})
    assert "train.grpo.reward.pattern_weight: weighs no term without train.grpo.reward.pattern" in found
    assert any("every term weighs 0" in p for p in found)
    assert problems({"objective": "grpo", "grpo": {"reward": {"task": 0, "length_target": 20}}}) == []
    assert any("read only by train.optimizer: loraplus" in p for p in problems({"loraplus_lr_ratio": 4}))
    assert problems({"optimizer": "loraplus", "loraplus_lr_ratio": 4}) == []


def test_each_retrieval_setting_is_refused_where_nothing_reads_it():
    """data.retrieval's settings by their readers: a reranker's candidates in a search recipe, a retriever's
    training settings where BM25 trains nothing, hybrid's fusion under dense."""
    from finetune.flows.resolve import recipe_rules
    from finetune.recipe.schema import build_recipe

    def problems(task, **retrieval):
        data = {"train": "t.jsonl", "eval": "e.jsonl", "knowledge_base": "kb.jsonl", "retrieval": retrieval}
        return recipe_rules(build_recipe({"task": task, "model": {"name_or_path": "m"}, "data": data}))

    search = problems("retrieval", candidates=5, epochs=1)
    assert any(p.startswith("data.retrieval.candidates: read only by task rerank") for p in search)
    assert any(p.startswith("data.retrieval.epochs: read only by a knowledge base's retriever") for p in search)
    assert any(p.startswith("data.retrieval.epochs:") for p in problems("qa", method="bm25", epochs=1))
    assert any(p.startswith("data.retrieval.fusion:") for p in problems("qa", method="dense", fusion="rrf"))
    assert not [p for p in problems("qa", method="hybrid", fusion="rrf", epochs=1) if "data.retrieval" in p]


def test_a_refused_value_does_not_hide_the_other_keys_problems(tiny_models, topic_data, write_recipe, tmp_path):
    """A schema problem (train.lr -1) hid every rule problem until it was fixed: a user fixed, reran, and met the
    next batch."""
    recipe = classification_recipe(tiny_models["bert"], topic_data, tmp_path / "run")
    recipe["train"]["lr"] = -1
    recipe["eval"] = {"gates": {"acc": ">=0.5"}, "temperature": 0.7}
    validated = runner.invoke(app, ["validate", str(write_recipe(recipe))])
    assert validated.exit_code == 2 and "3 problems" in validated.output, validated.output
    for words in (
        "train.lr: Input should be greater than 0",
        "eval.gates.acc: unknown metric",
        "eval.temperature: read only",
    ):
        assert words in validated.output


def test_a_sweep_over_a_setting_that_decides_what_else_is_read_is_valid(
    tiny_models, topic_data, write_recipe, tmp_path
):
    """Sweeping train.optimizer [adamw, loraplus] with a LoRA+ ratio: the adamw trial does not read the ratio, the
    loraplus one does; the unread-settings rule refused the sweep whatever the base named."""
    recipe = classification_recipe(tiny_models["bert"], topic_data, tmp_path / "run")
    recipe["train"]["loraplus_lr_ratio"] = 8
    recipe["sweep"] = {"trials": 2, "params": {"train.optimizer": ["adamw", "loraplus"]}}
    result = runner.invoke(app, ["validate", str(write_recipe(recipe))])
    assert result.exit_code == 0, result.output


def test_a_schema_mistake_does_not_hide_a_rule_of_the_model():
    """`data.max_length=1024 train.seed=-1`: only the seed was named; the model's 512 positions came after it was
    fixed ("every problem at once")."""
    recipe = str(REPO / "recipes" / "classification" / "minilm-topics.yaml")
    for command in (["validate", recipe], ["run", recipe, "--dry-run"]):
        result = runner.invoke(app, [*command, "data.max_length=1024", "train.seed=-1"])
        words = " ".join(result.output.split())
        assert result.exit_code == 2 and "2 problems" in words and "train.seed:" in words, words
        assert "data.max_length: 1024 is above what" in words, words
