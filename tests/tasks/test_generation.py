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
from finetune.tasks.text2text import IGNORE, PadCollator, completion_loss, cut_at_stops, encode, generate
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


@pytest.mark.parametrize("kind", ["gpt2", "llama", "bart"])
def test_eval_loss_equals_cross_entropy_of_the_full_logits(tiny_models, tmp_path, kind):
    """completion_loss makes logits only where some row is scored (and its log-softmax a few positions at a time);
    the mean is that of cross-entropy over the model's full logits, computed directly."""
    from finetune.recipe.schema import TrainSection
    from finetune.training.loop import make_accelerator

    model, tokenizer, family = _tiny(tiny_models, kind, lively=True)
    rng, words = random.Random(1), " ".join(WORDS.values()).split()
    prompts = [" ".join(rng.choices(words, k=rng.randint(2, 12))) for _ in range(7)]
    completions = [" ".join(rng.choices(words, k=rng.randint(1, 6))) for _ in range(7)]
    features = encode(prompts, completions, tokenizer, family, _recipe(tmp_path), "data.eval").features
    accelerator = make_accelerator(TrainSection(), "no")  # float32, whatever an earlier test left in accelerate
    loss = completion_loss(model, features, tokenizer, family, 3, accelerator)
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(features), 3):
            batch = PadCollator(tokenizer)([features[i] for i in range(start, min(start + 3, len(features)))])
            labels = batch.pop("labels")
            if family.encoder_decoder:
                logits = model(**batch, labels=labels).logits
            else:
                logits, labels = model(**batch).logits[:, :-1], labels[:, 1:]
            per_token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none")
            total += per_token[labels != IGNORE].sum().item()
            count += int((labels != IGNORE).sum())
    assert loss == pytest.approx(total / count, rel=1e-5)


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
    assert any("completion(s) were cut" in note for note in too_long_completion.report.notes)
    # A completion as long as max_length left no prompt at all (trained to answer nothing): the prompt keeps a
    # quarter of the width, the completion the rest.
    both_long = encode([long_prompt], [" ".join(["snow"] * 40)], tokenizer, FAMILIES["gpt"], recipe, "data.train")
    row = both_long.features[0]
    assert len(row["input_ids"]) == 12 and row["labels"][:3] == [IGNORE] * 3 and IGNORE not in row["labels"][3:]
    assert row["input_ids"][:3] == tokenizer(long_prompt)["input_ids"][:1] + tokenizer(long_prompt)["input_ids"][-2:]
    # One that fits beside that quarter keeps its end and EOS (the prompt gives way down to the quarter).
    fits = encode([long_prompt], [" ".join(["snow"] * 8)], tokenizer, FAMILIES["gpt"], recipe, "data.train")
    row = fits.features[0]
    assert row["labels"][-1] == tokenizer.eos_token_id, row
    assert not any("were cut" in note for note in fits.report.notes), fits.report.notes

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


def _tiny(tiny_models, kind, no_eos=False, lively=False):
    """A tiny model of `kind` in float32, its tokenizer and family. `lively`: weights drawn wider than the init, so
    greedy answers differ from prompt to prompt (at the init, a tiny BART says the same to every prompt)."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    family = FAMILY[kind]
    tokenizer = load_tokenizer(str(tiny_models[kind]), family)
    auto = AutoModelForSeq2SeqLM if family == "bart" else AutoModelForCausalLM
    model = auto.from_pretrained(tiny_models[kind], dtype=torch.float32).eval()
    with torch.no_grad():
        if lively:
            generator = torch.Generator().manual_seed(0)
            for weight in model.parameters():
                if weight.dim() > 1:
                    weight.copy_(0.3 * torch.randn(weight.shape, generator=generator))
        if no_eos:  # an untrained model may end at once; keep it talking so there is text to stop in
            model.get_output_embeddings().weight[tokenizer.eos_token_id] = 0
            if hasattr(model, "final_logits_bias"):
                model.final_logits_bias[0, tokenizer.eos_token_id] = -1e4
    return model, tokenizer, FAMILIES[family]


def _generator(tiny_models, kind, no_eos=False):
    from accelerate import Accelerator

    model, tokenizer, family = _tiny(tiny_models, kind, no_eos)
    accelerator = Accelerator(cpu=True)

    def run(prompts, stops=(), batch_size=8, **settings):
        ids = [tokenizer(p)["input_ids"] for p in prompts]
        return generate(model, tokenizer, family, ids, _Settings(**settings), list(stops), batch_size, accelerator)

    return run


def _reference(model, tokenizer, family, prompts, ends, max_new_tokens=12, **options) -> list[str]:
    """transformers' own generate, one prompt at a time, in float32: the reference text."""
    texts = []
    for prompt in prompts:
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        output = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            eos_token_id=list(ends),
            pad_token_id=tokenizer.pad_token_id,
            **{"do_sample": False, **options},
        )[0]
        new = output[1:] if family.encoder_decoder else output[ids.shape[1] :]  # bart's output starts with its start
        texts.append(tokenizer.decode(new, skip_special_tokens=True))
    return texts


# Prompts of different lengths (1 to 10 words), so a batch pads them.
PROMPTS = [
    "rain",
    "match goal team player coach league",
    "oven salt pepper",
    "storm wind snow forecast cold warm temperature recipe bake boil",
    "score season",
]


def _staggered_end(model, tokenizer, family, prompts) -> int:
    """A token the greedy answers reach at different steps (or never): as an end token, rows end one by one."""
    free = _reference(model, tokenizer, family, prompts, [tokenizer.eos_token_id])
    rows = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in free]

    def first_steps(token):
        return {row.index(token) if token in row else None for row in rows}

    return max(sorted({t for row in rows for t in row}), key=lambda t: len(first_steps(t)))


@pytest.mark.parametrize("kind", ["gpt2", "llama", "bart"])
def test_batched_generation_equals_transformers_one_prompt_at_a_time(tiny_models, kind):
    """Prompts of different lengths, rows ending at their own end token at different steps (leaving the batch as
    they end), batches of 1, 2 and all: every answer equals transformers' `generate` on its prompt alone, greedy,
    float32. Also with mixed precision on (decoding never autocasts) and with the batch size chosen from memory."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    model, tokenizer, family = _tiny(tiny_models, kind, lively=True)
    end = _staggered_end(model, tokenizer, family, PROMPTS)
    ends = [tokenizer.eos_token_id, end]
    expected = _reference(model, tokenizer, family, PROMPTS, ends)
    lengths = {len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in expected}
    assert len(lengths) >= 2, expected  # rows really end at different steps
    ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
    for batch_size, precision in ((1, "no"), (2, "no"), (len(PROMPTS), "no"), (None, "bf16")):
        AcceleratorState._reset_state(reset_partial_state=False)  # precision is a per-process singleton
        accelerator = Accelerator(cpu=True, mixed_precision=precision)
        answers = generate(model, tokenizer, family, ids, _Settings(), [], batch_size, accelerator, [end])
        assert [a[0] for a in answers] == expected, (batch_size, precision)
    AcceleratorState._reset_state(reset_partial_state=False)


def test_sampling_draws_what_transformers_draws(tiny_models):
    """Temperature and top-p as transformers applies them: with the same seed, the same sampled tokens. No top-k
    cut (transformers' default of 50 is not the recipe's): top_k=0 for the reference."""
    from accelerate import Accelerator

    model, tokenizer, family = _tiny(tiny_models, "llama", no_eos=True, lively=True)
    settings = {"temperature": 0.7, "top_p": 0.9}
    torch.manual_seed(3)
    expected = _reference(
        model, tokenizer, family, PROMPTS[1:2], [tokenizer.eos_token_id], do_sample=True, top_k=0, **settings
    )
    ids = [tokenizer(PROMPTS[1])["input_ids"]]
    torch.manual_seed(3)
    answers = generate(model, tokenizer, family, ids, _Settings(**settings), [], 1, Accelerator(cpu=True))
    assert answers == [expected]
    torch.manual_seed(4)
    assert generate(model, tokenizer, family, ids, _Settings(**settings), [], 1, Accelerator(cpu=True)) != answers


@pytest.mark.parametrize("method", ["kirchenbauer", "gated", "synthid"])
def test_watermarked_generation_equals_transformers(tiny_models, method):
    """Each watermark marks as transformers' generate marks (its config, or the gated processor passed to it), one
    prompt at a time and in a batch whose rows end at different steps (SynthID keeps per-row state: its rows stay
    in place)."""
    from accelerate import Accelerator

    from finetune.recipe.schema import WatermarkSection
    from finetune.watermark.marking import EntropyGatedWatermark, generation_config

    model, tokenizer, family = _tiny(tiny_models, "llama", lively=True)
    extra = {"kirchenbauer": {"entropy_threshold": 0.0}, "gated": {"entropy_threshold": 0.5}, "synthid": {}}[method]
    settings = WatermarkSection(method="synthid" if method == "synthid" else "kirchenbauer", key=12345, **extra)
    if method == "gated":
        marking = {"logits_processor": [EntropyGatedWatermark(settings, model.config.vocab_size, "cpu")]}
    else:
        marking = {"watermarking_config": generation_config(settings)}
    end = _staggered_end(model, tokenizer, family, PROMPTS)
    ends = [tokenizer.eos_token_id, end]
    expected = _reference(model, tokenizer, family, PROMPTS, ends, **marking)
    assert expected != _reference(model, tokenizer, family, PROMPTS, ends)  # the mark changes the text
    ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
    for batch_size in (1, len(PROMPTS)):
        answers = generate(
            model, tokenizer, family, ids, _Settings(watermark=settings), [], batch_size, Accelerator(cpu=True), [end]
        )
        assert [a[0] for a in answers] == expected, batch_size


def test_decoding_reads_with_sdpa_and_gives_eager_back(tiny_models):
    """A session that chose eager attention (bf16 training on a CPU) decodes with SDPA, and trains on with eager."""
    from accelerate import Accelerator

    model, tokenizer, family = _tiny(tiny_models, "llama", lively=True)
    model.set_attn_implementation("eager")
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(module.config._attn_implementation))
    ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
    answers = generate(model, tokenizer, family, ids, _Settings(), [], None, Accelerator(cpu=True))
    assert set(seen) == {"sdpa"} and model.config._attn_implementation == "eager"
    assert [a[0] for a in answers] == _reference(model, tokenizer, family, PROMPTS, [tokenizer.eos_token_id])


def _cache_bytes(cache) -> int:
    parts = (
        [cache.self_attention_cache, cache.cross_attention_cache]
        if hasattr(cache, "cross_attention_cache")
        else [cache]
    )
    return sum(layer.keys.nbytes + layer.values.nbytes for part in parts for layer in part.layers)


@pytest.mark.parametrize("kind", ["gpt2", "llama", "bart"])
def test_the_memory_estimate_counts_the_real_cache(tiny_models, kind):
    """`row_bytes` holds a row's key/value cache exactly as the model builds it (for BART the decoder's own and
    the cross-attention's), and the batch size chosen from memory shrinks as prompts grow."""
    from finetune.tasks.text2text import generation_batch_size, row_bytes

    model, _, family = _tiny(tiny_models, kind)
    prompt, new, rows = 9, 5, 3
    with torch.no_grad():
        if family.encoder_decoder:
            decoder = torch.randint(5, 100, (rows, new))
            out = model(input_ids=torch.randint(5, 100, (rows, prompt)), decoder_input_ids=decoder, use_cache=True)
        else:
            out = model(input_ids=torch.randint(5, 100, (rows, prompt + new)), use_cache=True)
    # The cache grows with positions alone: row_bytes(0 prompt, N new) - row_bytes(0, 0) is N positions' cache.
    assert (
        row_bytes(model.config, 0, prompt + new) - row_bytes(model.config, 0, 0)
        == _cache_bytes(out.past_key_values) // rows
    )
    short = generation_batch_size(model.config, 8, _Settings(max_new_tokens=16), "cpu")
    long = generation_batch_size(model.config, 128, _Settings(max_new_tokens=16), "cpu")
    assert short > long >= 1


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
    # predict fills the template from the input's own columns: no `prompt` field is asked of it.
    new = runner.invoke(app, ["predict", str(out), "--input", "-"], input='{"product": "oven", "tone": "warm"}\n')
    assert new.exit_code == 0, new.output
    assert isinstance(json.loads(new.stdout)["prediction"], str)

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


def test_an_encoder_decoder_generates_from_the_start_token_it_trains_from(tiny_models):
    """A checkpoint whose generation_config.json names another decoder start than its config: training and
    finetune's decoding use the config's, and `generate` on the merged model used the other (no answer matched)."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from finetune.models.families import FAMILIES
    from finetune.tasks import TASKS

    model = AutoModelForSeq2SeqLM.from_pretrained(tiny_models["bart"])
    model.generation_config.decoder_start_token_id = model.config.decoder_start_token_id + 1
    TASKS["copywriting"].prepare_model(model, AutoTokenizer.from_pretrained(tiny_models["bart"]), FAMILIES["bart"])
    assert model.generation_config.decoder_start_token_id == model.config.decoder_start_token_id


def test_mbart_keeps_its_own_decoder_start(tiny_models):
    """mBART's training starts each target from its language token, not the config's start: its generation_config
    is left as it is."""
    from transformers import AutoTokenizer, MBartConfig, MBartForConditionalGeneration

    from finetune.models.families import FAMILIES
    from finetune.tasks import TASKS

    config = MBartConfig(
        vocab_size=64, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64,
    )  # fmt: skip
    model = MBartForConditionalGeneration(config)
    model.generation_config.decoder_start_token_id = 7
    TASKS["copywriting"].prepare_model(model, AutoTokenizer.from_pretrained(tiny_models["bart"]), FAMILIES["bart"])
    assert model.generation_config.decoder_start_token_id == 7 != model.config.decoder_start_token_id
