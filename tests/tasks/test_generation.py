"""Generation tasks on tiny GPT-2, Llama and BART: loss masking, truncation, stops, padding, end to end."""

from __future__ import annotations

import json
import random

import pytest
import torch
from typer.testing import CliRunner

from finetune.cli import app
from finetune.flows.resolve import build_recipe
from finetune.models.families import FAMILIES
from finetune.models.references import load_tokenizer
from finetune.tasks.text2text import IGNORE, PadCollator, cut_at_stops, encode, generate
from tests.conftest import WORDS, write_jsonl

runner = CliRunner()
FAMILY = {"gpt2": "gpt", "llama": "gpt", "bart": "bart"}


def copy_rows(n: int, seed: int = 0) -> list[dict]:
    """Prompt: a topic word list; completion: a fixed phrase per topic, so a model can learn it."""
    rng = random.Random(seed)
    topics = list(WORDS)
    rows = []
    for i in range(n):
        topic = topics[i % len(topics)]
        words = WORDS[topic].split()
        rows.append(
            {"prompt": " ".join(rng.choice(words) for _ in range(rng.randint(3, 6))), "completion": " ".join(words[:4])}
        )
    return rows


def generation_recipe(task: str, model_dir, data, out, **sections) -> dict:
    recipe = {
        "task": task,
        "model": {"name_or_path": str(model_dir)},
        "data": {"train": str(data["train"]), "eval": str(data["eval"]), "max_length": 32},
        "lora": {"r": 4, "alpha": 8, "targets": "all_linear"},
        "train": {"epochs": 2, "batch_size": 8, "lr": 5e-3, "seed": 0, "precision": "fp32"},
        "eval": {"max_new_tokens": 8},
        "output": {"dir": str(out)},
    }
    for section, values in sections.items():
        recipe[section] = {**recipe.get(section, {}), **values}
    return recipe


def _recipe(tmp_path, **data):
    raw = {
        "task": "copywriting",
        "model": {"name_or_path": "x"},
        "data": {"train": "t.jsonl", "eval": "e.jsonl", "max_length": 32, **data},
    }
    return build_recipe(raw)


@pytest.fixture()
def copy_data(tmp_path):
    rows = copy_rows(60)
    return {
        "train": write_jsonl(tmp_path / "train.jsonl", rows[:48]),
        "eval": write_jsonl(tmp_path / "eval.jsonl", rows[48:]),
    }


# --------------------------------------------------------------------------- features


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_decoder_loss_is_on_completion_tokens_only(tiny_models, tmp_path, kind):
    tokenizer = load_tokenizer(str(tiny_models[kind]), "gpt")
    prompt, completion = "rain sun cloud", "cold warm"
    encoded = encode([prompt], [completion], tokenizer, FAMILIES["gpt"], _recipe(tmp_path), "data.train")
    p = tokenizer(prompt)["input_ids"]
    c = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    row = encoded.features[0]
    assert row["input_ids"] == p + c
    assert row["labels"] == [IGNORE] * len(p) + c
    assert row["attention_mask"] == [1] * (len(p) + len(c))
    # The model's loss equals cross-entropy over the completion positions alone, computed by hand.
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_models[kind])
    batch = PadCollator(tokenizer)(
        [row, encode(["rain"], ["snow"], tokenizer, FAMILIES["gpt"], _recipe(tmp_path), "x").features[0]]
    )
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"][:1], attention_mask=batch["attention_mask"][:1]).logits[0]
        loss = model(**{k: v[:1] for k, v in batch.items()}).loss
    positions = range(len(p) - 1, len(p) + len(c) - 1)  # position t predicts token t + 1
    by_hand = torch.stack([-logits[t].log_softmax(-1)[row["input_ids"][t + 1]] for t in positions]).mean()
    assert torch.allclose(loss, by_hand, atol=1e-5)
    assert batch["labels"][1, -1] == IGNORE  # padding is masked too


def test_bart_targets_end_with_eos_and_prompt_is_the_encoder_input(tiny_models, tmp_path):
    tokenizer = load_tokenizer(str(tiny_models["bart"]), "bart")
    encoded = encode(["rain sun"], ["cold warm"], tokenizer, FAMILIES["bart"], _recipe(tmp_path), "data.train")
    row = encoded.features[0]
    assert row["input_ids"] == tokenizer("rain sun")["input_ids"]
    assert row["labels"] == tokenizer(text_target="cold warm")["input_ids"]
    assert row["labels"][-1] == tokenizer.eos_token_id


def test_truncation_keeps_the_completion_and_reports_it(tiny_models, tmp_path):
    tokenizer = load_tokenizer(str(tiny_models["llama"]), "gpt")
    long_prompt = " ".join(["rain"] * 40)
    recipe = _recipe(tmp_path, max_length=12)
    encoded = encode([long_prompt, "sun"], ["cold warm", "snow"], tokenizer, FAMILIES["gpt"], recipe, "data.train")
    row = encoded.features[0]
    c = tokenizer("cold warm", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert len(row["input_ids"]) == 12
    assert row["input_ids"][-len(c) :] == c and row["labels"][-len(c) :] == c
    assert row["input_ids"][: 12 - len(c)] == tokenizer(long_prompt)["input_ids"][-(12 - len(c)) :]  # the start is cut
    assert encoded.report.truncated == 1
    assert any("shortened" in note for note in encoded.report.notes)

    too_long_completion = encode(["sun"], [" ".join(["snow"] * 40)], tokenizer, FAMILIES["gpt"], recipe, "data.train")
    assert any("completion(s) longer" in note for note in too_long_completion.report.notes)

    dropped = encode(
        [long_prompt, "sun"],
        ["cold", "snow"],
        tokenizer,
        FAMILIES["gpt"],
        _recipe(tmp_path, max_length=12, overflow="drop"),
        "d",
    )
    assert dropped.keep == [1] and dropped.report.dropped == 1
    from finetune.errors import DataError

    with pytest.raises(DataError, match="rows 1"):
        encode(
            [long_prompt], ["cold"], tokenizer, FAMILIES["gpt"], _recipe(tmp_path, max_length=12, overflow="error"), "d"
        )


# --------------------------------------------------------------------------- generation


class _Settings:
    def __init__(self, **kw):
        self.max_new_tokens, self.temperature, self.top_p, self.num_samples = 12, 0.0, 1.0, 1
        self.watermark = None
        self.__dict__.update(kw)


def _generator(tiny_models, kind, no_eos=False):
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    family = FAMILY[kind]
    tokenizer = load_tokenizer(str(tiny_models[kind]), family)
    auto = AutoModelForSeq2SeqLM if family == "bart" else AutoModelForCausalLM
    model = auto.from_pretrained(tiny_models[kind])
    if no_eos:  # an untrained model may end at once; keep it talking so there is text to stop in
        with torch.no_grad():
            model.get_output_embeddings().weight[tokenizer.eos_token_id] = 0
            if hasattr(model, "final_logits_bias"):
                model.final_logits_bias[0, tokenizer.eos_token_id] = -1e4
    accelerator = Accelerator(cpu=True)

    def run(prompts, stops=(), batch_size=8, **settings):
        ids = [tokenizer(p)["input_ids"] for p in prompts]
        return generate(
            model, tokenizer, FAMILIES[family], ids, _Settings(**settings), list(stops), batch_size, accelerator
        )

    return run


@pytest.mark.parametrize("kind", ["gpt2", "llama", "bart"])
def test_batched_generation_equals_one_by_one(tiny_models, kind):
    """Left padding (decoders) / right padding (encoder-decoder) must not change greedy outputs."""
    generate_texts = _generator(tiny_models, kind, no_eos=True)  # text to compare: an untrained BART says "" at once
    prompts = ["rain", "match goal team player coach league", "oven salt pepper"]
    batched = generate_texts(prompts, batch_size=3)
    single = [generate_texts([p], batch_size=1)[0] for p in prompts]
    assert all(len(samples) == 1 and samples[0].strip() for samples in batched), batched
    assert batched == single


@pytest.mark.parametrize("kind", ["gpt2", "bart"])
def test_generation_stops_at_a_stop_string(tiny_models, kind):
    generate_texts = _generator(tiny_models, kind, no_eos=True)
    free = generate_texts(["rain sun"], max_new_tokens=20)[0][0]
    words = free.split()
    assert len(words) >= 4, free
    stop = " " + words[2]  # a string the model is known to produce
    cut = generate_texts(["rain sun"], stops=[stop], max_new_tokens=20)[0][0]
    assert cut == free[: free.find(stop)]
    assert stop not in cut


def test_cutting_a_prompt_keeps_its_bos():
    from finetune.tasks.text2text import _keep_end

    assert _keep_end([1, 5, 6, 7, 8], 3, bos_id=1) == [1, 7, 8]
    assert _keep_end([5, 6, 7, 8], 3, bos_id=1) == [6, 7, 8]
    assert _keep_end([5, 6], 3, bos_id=1) == [5, 6]


def test_cut_at_stops_takes_the_earliest():
    assert cut_at_stops("a\ndef b\nclass c", ["\nclass", "\ndef"]) == "a"
    assert cut_at_stops("no stop here", ["\ndef"]) == "no stop here"


def test_sampling_gives_num_samples_per_prompt(tiny_models):
    out = _generator(tiny_models, "gpt2")(["rain", "sun"], num_samples=3, temperature=1.0, top_p=0.9)
    assert [len(samples) for samples in out] == [3, 3]


# --------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("kind", ["gpt2", "llama", "bart"])
def test_copywriting_trains_and_generates(tiny_models, copy_data, tmp_path, write_recipe, kind):
    out = tmp_path / "run"
    recipe = write_recipe(
        generation_recipe("copywriting", tiny_models[kind], copy_data, out, train={"epochs": 6, "lr": 1e-2})
    )
    result = runner.invoke(app, ["run", str(recipe)])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["metrics"]) >= {"rouge1", "rouge2", "rougeL", "bleu", "distinct_2", "mean_length", "eval_loss"}
    for name in ("rouge1", "rouge2", "rougeL", "bleu", "distinct_2"):
        assert 0.0 <= metrics["metrics"][name] <= 1.0
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and all({"prompt", "completion", "prediction"} <= set(r) for r in rows)
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["loss"] < log[0]["loss"]
    # The adapter was saved for the right peft task, so AutoPeftModelFor... can load it.
    adapter_config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["task_type"] == ("SEQ_2_SEQ_LM" if kind == "bart" else "CAUSAL_LM")
    # Re-scoring the saved predictions gives the same metrics.
    again = runner.invoke(
        app, ["eval", "--predictions", str(out / "predictions.jsonl"), "--task", "copywriting", "--json"]
    )
    assert again.exit_code == 0, again.output
    rescored = json.loads(again.stdout)["metrics"]
    assert all(rescored[k] == pytest.approx(metrics["metrics"][k]) for k in rescored)


def test_predict_generates_for_new_prompts(tiny_models, copy_data, tmp_path, write_recipe):
    out = tmp_path / "run"
    recipe = write_recipe(generation_recipe("copywriting", tiny_models["gpt2"], copy_data, out, train={"epochs": 1}))
    assert runner.invoke(app, ["run", str(recipe)]).exit_code == 0
    result = runner.invoke(
        app, ["predict", str(out), "--input", "-"], input='{"prompt": "rain sun"}\n{"prompt": "oven"}\n'
    )
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["prompt"] for r in rows] == ["rain sun", "oven"]
    assert all(isinstance(r["prediction"], str) for r in rows)


def test_template_builds_the_prompt_from_columns(tiny_models, tmp_path, write_recipe):
    rows = [{"product": r["prompt"], "tone": "warm", "copy": r["completion"]} for r in copy_rows(30)]
    data = {"train": write_jsonl(tmp_path / "t.jsonl", rows[:24]), "eval": write_jsonl(tmp_path / "e.jsonl", rows[24:])}
    out = tmp_path / "run"
    recipe = generation_recipe("copywriting", tiny_models["llama"], data, out, train={"epochs": 1})
    recipe["data"].update(template="{product} in a {tone} tone:", columns={"completion": "copy"})
    result = runner.invoke(app, ["run", str(write_recipe(recipe))])
    assert result.exit_code == 0, result.output
    first = json.loads((out / "predictions.jsonl").read_text().splitlines()[0])
    assert first["prompt"] == f"{rows[24]['product']} in a warm tone:"

    recipe["data"]["template"] = "{product} for {audience}"
    recipe["output"]["dir"] = str(tmp_path / "another-run")
    bad = runner.invoke(app, ["run", str(write_recipe(recipe, "bad.yaml"))])
    assert bad.exit_code == 3
    assert "audience" in bad.output and "columns are" in bad.output


def test_bert_is_refused_for_generation(tiny_models, copy_data, tmp_path, write_recipe):
    recipe = write_recipe(generation_recipe("copywriting", tiny_models["bert"], copy_data, tmp_path / "run"))
    result = runner.invoke(app, ["run", str(recipe)])
    assert result.exit_code == 2
    assert "encoder-only" in result.output
