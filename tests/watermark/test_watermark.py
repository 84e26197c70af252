"""Watermarked generation and its detection (transformers' green-list and SynthID watermarks) with the run's key."""

from __future__ import annotations

import json
import math
import stat

import pytest
from conftest import classification_recipe, write_jsonl
from helpers import invoke

from tests.tasks.test_generation import copy_rows, generation_recipe

KEY = 987654321


def detected(result) -> list[bool]:
    assert result.exit_code == 0, result.output
    return [r["watermarked"] for r in json.loads(result.stdout)["rows"]]


# Each watermark with its own generation settings and extra watermark settings. synthid marks through
# sampling: its runs sample at temperature 0.7 (the unmarked comparison too). kirchenbauer is entropy-gated by
# default (detection loads the model); "plain" marks and counts every token (detection reads the tokenizer only).
METHODS = {"kirchenbauer": ({}, {}), "plain": ({}, {"entropy_threshold": 0.0}), "synthid": ({"temperature": 0.7}, {})}


@pytest.fixture(scope="module", params=sorted(METHODS))
def marked_run(request, tiny_models, tmp_path_factory):
    import yaml

    generation, settings = METHODS[request.param]
    root = tmp_path_factory.mktemp(f"watermark-{request.param}")
    rows = copy_rows(40)
    data = {"train": write_jsonl(root / "train.jsonl", rows[:24]), "eval": write_jsonl(root / "eval.jsonl", rows[24:])}
    # A barely trained model: its outputs have the entropy a watermark needs (a saturated tiny model has none).
    recipe = generation_recipe(
        "copywriting",
        tiny_models["llama"],
        data,
        root / "run",
        train={"epochs": 1, "lr": 1e-6},
        eval={"max_new_tokens": 48, **generation},
    )
    method = "kirchenbauer" if request.param == "plain" else request.param
    recipe["eval"]["watermark"] = {"method": method, "key": KEY, **settings}
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = invoke("run", path, f"eval.watermark.key={KEY}")  # also on the command line: the manifest records it
    assert result.exit_code == 0, result.output
    return root / "run"


def test_generations_are_marked_and_the_key_stays_secret(marked_run):
    metrics = json.loads((marked_run / "metrics.json").read_text())["metrics"]
    assert metrics["watermark_detected"] >= 0.9 and "rougeL" in metrics
    key_file = marked_run / "adapter" / "watermark.key"
    assert key_file.read_text().strip() == str(KEY)
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    for file in marked_run.rglob("*"):
        if file.is_file() and file.name != "watermark.key" and "checkpoints" not in file.parts:
            assert str(KEY).encode() not in file.read_bytes(), file
    assert "key: <redacted>" in (marked_run / "recipe.yaml").read_text()
    card = (marked_run / "README.md").read_text()
    assert "## Watermark" in card and recipe_method(marked_run) in card


def recipe_method(run) -> str:
    import yaml

    return yaml.safe_load((run / "recipe.yaml").read_text())["eval"]["watermark"]["method"]


def test_detect_flags_marked_text_and_not_human_or_unmarked_text(marked_run, tmp_path):
    predictions = marked_run / "predictions.jsonl"
    marked = detected(invoke("detect", marked_run, "--input", predictions, "--json"))
    assert sum(marked) / len(marked) >= 0.9
    human = detected(invoke("detect", marked_run, "--input", predictions, "--field", "completion", "--json"))
    assert sum(human) / len(human) <= 0.05
    card = (marked_run / "README.md").read_text()
    plain = invoke("eval", marked_run, "eval.watermark=null", "--output", tmp_path / "plain")
    assert plain.exit_code == 0, plain.output
    # The same model unwatermarked: the difference is the mark's cost, in the evaluation and on the card.
    cost = json.loads((tmp_path / "plain" / "metrics.json").read_text())["watermark_cost"]["rougeL"]
    assert cost["difference"] == pytest.approx(cost["watermarked"] - cost["unwatermarked"])
    marked_rouge = json.loads((marked_run / "metrics.json").read_text())["metrics"]["rougeL"]
    assert cost["watermarked"] == marked_rouge
    measured = (marked_run / "README.md").read_text()
    assert "Quality cost: not measured yet" in card and "Quality cost: not measured yet" not in measured
    assert f"rougeL {marked_rouge:.4f} watermarked vs {cost['unwatermarked']:.4f} unwatermarked" in measured
    unmarked = detected(invoke("detect", marked_run, "--input", tmp_path / "plain" / "predictions.jsonl", "--json"))
    assert sum(unmarked) / len(unmarked) <= 0.1
    # Each text is scored on its own tokens: the same row scores the same alone and among others.
    first = predictions.read_text().splitlines()[0]
    alone = json.loads(invoke("detect", marked_run, "--json", input=first + "\n").stdout)["rows"][0]
    among = json.loads(invoke("detect", marked_run, "--input", predictions, "--json").stdout)["rows"][0]
    assert alone["z_score"] == among["z_score"]


def test_predict_keeps_marking(marked_run):
    # The evaluation's prompts (without their references): predict marks its answers as the run's evaluation did.
    rows = [json.loads(line) for line in (marked_run / "predictions.jsonl").read_text().splitlines()]
    prompts = "".join(json.dumps({"id": i, "prompt": r["prompt"]}) + "\n" for i, r in enumerate(rows))
    result = invoke("predict", marked_run, "--input", "-", input=prompts)
    assert result.exit_code == 0, result.output
    verdicts = detected(invoke("detect", marked_run, "--json", input=result.stdout))
    assert len(verdicts) == len(rows) and sum(verdicts) / len(verdicts) >= 0.8


def test_synthid_bayesian_detector_is_trained_for_the_run(marked_run, tmp_path):
    result = invoke("train-detector", marked_run, "--samples", 24)
    if recipe_method(marked_run) != "synthid":  # the green list's z-test is exact: nothing to train
        assert result.exit_code == 2 and "needs no training" in result.output, result.output
        return
    assert result.exit_code == 0, result.output
    trained = marked_run / "watermark_detector"
    assert (trained / "config.json").is_file() and (trained / "model.safetensors").is_file()
    report = json.loads((trained / "training.json").read_text())
    assert report["prompts"] == 24 and report["train_texts"] + report["validation_texts"] == 48
    weights = (trained / "model.safetensors").read_bytes()
    again = invoke("train-detector", marked_run, "--samples", 24)  # nothing lost without --overwrite
    assert again.exit_code == 2 and "--overwrite" in again.output
    assert (trained / "model.safetensors").read_bytes() == weights
    predictions = marked_run / "predictions.jsonl"
    marked = json.loads(invoke("detect", marked_run, "--input", predictions, "--json").stdout)
    human = json.loads(invoke("detect", marked_run, "--input", predictions, "--field", "completion", "--json").stdout)
    bayes = marked["summary"]["bayesian"]
    assert bayes["validation_false_positive_rate"] == report["validation_false_positive_rate"]
    # (a text too short for one full context has no probability)
    marked_p = [r.get("probability", 0.0) for r in marked["rows"]]
    human_p = [r.get("probability", 0.0) for r in human["rows"]]
    assert sum(marked_p) / len(marked_p) > 0.8 and sum(human_p) / len(human_p) < 0.1
    assert bayes["probability_above_half"] == sum(p > 0.5 for p in marked_p)
    # The verdict stays the calibrated z-test's.
    assert [r["watermarked"] for r in marked["rows"]] == [(r["z_score"] or 0) > 3.0 for r in marked["rows"]]


def test_watermark_refusals(tiny_models, topic_data, write_recipe, tmp_path):
    recipe = classification_recipe(tiny_models["bert"], topic_data, tmp_path / "cls", epochs=1)
    recipe["eval"] = {"watermark": {"key": 1}}
    result = invoke("validate", write_recipe(recipe, "wm.yaml"))
    assert result.exit_code == 2 and "generates no text to watermark" in result.output
    del recipe["eval"]
    assert invoke("run", write_recipe(recipe)).exit_code == 0
    refused = invoke("detect", tmp_path / "cls", "--json", input='{"prediction": "some text here"}\n')
    assert refused.exit_code == 2 and "no watermark key" in refused.output
    for settings, message in [
        ({"method": "synthid", "key": 1}, "synthid marks text through sampling; set eval.temperature above 0"),
        ({"method": "synthid", "key": 1, "bias": 4.0}, "eval.watermark.bias: a kirchenbauer setting; method synthid"),
        ({"key": 1, "ngram_len": 4}, "eval.watermark.ngram_len: a synthid setting; method kirchenbauer"),
        ({"method": "synthid", "key": 1, "entropy_threshold": 1.0}, "eval.watermark.entropy_threshold: a kirchenbauer"),
    ]:
        recipe = generation_recipe(
            "copywriting", tiny_models["llama"], topic_data, tmp_path / "gen", eval={"watermark": settings}
        )
        result = invoke("validate", write_recipe(recipe, "wm.yaml"))
        assert result.exit_code == 2 and message in result.output, result.output


def test_synthid_detection_is_a_calibrated_z_test(tiny_models):
    """On text it did not mark, the mean g-value's z-score behaves like a standard normal: the false-positive
    rate the card states is the one users get (marked text is detected in the run tests above)."""
    import torch
    from transformers import AutoConfig, AutoTokenizer

    from finetune.recipe.schema import WatermarkSection
    from finetune.watermark.marking import Detector

    tokenizer = AutoTokenizer.from_pretrained(tiny_models["llama"])
    config = AutoConfig.from_pretrained(tiny_models["llama"])
    detector = Detector(tokenizer, config, WatermarkSection(method="synthid", key=KEY))
    generator = torch.Generator().manual_seed(0)
    vocab = [i for i in range(len(tokenizer)) if i not in tokenizer.all_special_ids]
    z_scores = []
    for _ in range(300):
        ids = [vocab[i] for i in torch.randint(len(vocab), (64,), generator=generator).tolist()]
        z_scores.append(detector._score_synthid(ids).z_score)
    z = torch.tensor(z_scores)
    assert abs(float(z.mean())) < 0.25 and 0.8 < float(z.std()) < 1.2
    assert float((z > 3.0).float().mean()) <= 0.02


def test_gated_watermark_leaves_tokens_the_model_is_sure_of_alone():
    """SWEET's generation half: a peaked next-token distribution passes unchanged, a flat one gets the bias on
    exactly transformers' green list."""
    import torch
    from transformers import WatermarkLogitsProcessor

    from finetune.recipe.schema import WatermarkSection
    from finetune.watermark.marking import EntropyGatedWatermark, entropy

    settings = WatermarkSection(key=KEY, entropy_threshold=1.0)
    vocab = 50
    sure = torch.full((vocab,), -20.0)
    sure[7] = 20.0
    flat = torch.zeros(vocab)
    scores, input_ids = torch.stack([sure, flat]), torch.tensor([[3, 4], [3, 4]])
    assert entropy(scores)[0] < 0.01 and abs(float(entropy(scores)[1]) - math.log(vocab)) < 1e-4
    out = EntropyGatedWatermark(settings, vocab, "cpu")(input_ids, scores.clone())
    assert torch.equal(out[0], sure)
    plain = WatermarkLogitsProcessor(
        vocab_size=vocab,
        device="cpu",
        greenlist_ratio=0.25,
        bias=settings.bias,
        hashing_key=KEY,
        seeding_scheme="lefthash",
        context_width=1,
    )
    expected = plain(input_ids[1:], flat[None].clone())[0]
    assert torch.equal(out[1], expected) and int((out[1] > 0).sum()) == int(vocab * 0.25)


def entropy_setup(kind, tiny_models):
    """A tiny model of `kind` with its tokenizer, family and a copywriting recipe, and its CompletionEntropy."""
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    from finetune.flows.resolve import build_recipe
    from finetune.models.families import FAMILIES
    from finetune.tasks.text2text import CompletionEntropy

    family = FAMILIES["bart" if kind == "bart" else "gpt"]
    auto = AutoModelForSeq2SeqLM if kind == "bart" else AutoModelForCausalLM
    model = auto.from_pretrained(tiny_models[kind]).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_models[kind])
    recipe = build_recipe(generation_recipe("copywriting", tiny_models[kind], {"train": "t", "eval": "e"}, "out"))
    return model, tokenizer, family, recipe, CompletionEntropy(model, tokenizer, family, recipe, Accelerator(cpu=True))


@pytest.mark.parametrize("kind", ["llama", "bart"])
def test_detection_recomputes_the_entropies_generation_saw(kind, tiny_models):
    """CompletionEntropy(prompt, generated ids) gives, token for token, the entropy the logits processor saw while
    generating them: an off-by-one here would gate the wrong tokens."""
    import torch
    from transformers import LogitsProcessor

    from finetune.tasks.text2text import encode
    from finetune.watermark.marking import entropy

    class Recorder(LogitsProcessor):
        def __init__(self):
            self.seen = []

        def __call__(self, input_ids, scores):
            self.seen.append(entropy(scores)[0])
            return scores

    model, tokenizer, family, recipe, entropies = entropy_setup(kind, tiny_models)
    prompt = "a sunny day by the sea"
    prompt_ids = encode([prompt], None, tokenizer, family, recipe, "test").prompt_ids[0]
    recorder = Recorder()
    # Never stopped by EOS (min_new_tokens instead would hide EOS from the entropy the recorder sees).
    model.generation_config.eos_token_id = None
    output = model.generate(
        torch.tensor([prompt_ids]),
        max_new_tokens=12,
        do_sample=False,
        logits_processor=[recorder],
        pad_token_id=tokenizer.pad_token_id,
    )[0].tolist()
    new_ids = output[1:] if kind == "bart" else output[len(prompt_ids) :]  # bart's output starts with its start token
    assert len(new_ids) == len(recorder.seen) >= 8
    assert torch.allclose(entropies(prompt, new_ids), torch.stack(recorder.seen), atol=1e-4)


@pytest.mark.parametrize("kind", ["gpt2", "bart"])
def test_a_text_longer_than_the_model_is_scored_in_stretches(kind, tiny_models):
    """GPT-2 and BART have 128 learned positions here: a 300-token human text still gets one entropy per token,
    and the first stretch's are exactly those of a single pass."""
    import torch

    _, tokenizer, _, _, entropies = entropy_setup(kind, tiny_models)
    vocab = [i for i in range(len(tokenizer)) if i not in tokenizer.all_special_ids]
    ids = [vocab[i % len(vocab)] for i in torch.randint(len(vocab), (300,), generator=torch.Generator().manual_seed(0))]
    long = entropies("a prompt", ids)
    assert long.shape == (300,) and torch.isfinite(long).all()
    assert torch.allclose(long[:40], entropies("a prompt", ids[:40]), atol=1e-5)


def test_gated_detection_is_a_calibrated_z_test_that_counts_only_unsure_tokens(tiny_models):
    """On text the key did not mark, the gated z-score is standard normal whichever tokens the entropies pick;
    where the model was sure of every token there is nothing to test and nothing is flagged."""
    import torch
    from transformers import AutoConfig, AutoTokenizer

    from finetune.recipe.schema import WatermarkSection
    from finetune.watermark.marking import Detector

    tokenizer = AutoTokenizer.from_pretrained(tiny_models["llama"])
    config = AutoConfig.from_pretrained(tiny_models["llama"])
    generator = torch.Generator().manual_seed(1)
    settings = WatermarkSection(key=KEY, entropy_threshold=1.0)
    # Half the positions "unsure", chosen at random: the test must stay calibrated on the subset it counts.
    detector = Detector(
        tokenizer, config, settings, lambda prompt, ids: 2.0 * torch.rand(len(ids), generator=generator)
    )
    vocab = [i for i in range(len(tokenizer)) if i not in tokenizer.all_special_ids]
    scores = []
    for _ in range(300):
        ids = [vocab[i] for i in torch.randint(len(vocab), (64,), generator=generator).tolist()]
        scores.append(detector._score_green_list(ids, ""))
    z = torch.tensor([s.z_score for s in scores])
    assert abs(float(z.mean())) < 0.25 and 0.8 < float(z.std()) < 1.2
    assert float((z > 3.0).float().mean()) <= 0.02
    assert 20 <= sum(s.tokens for s in scores) / len(scores) <= 44  # about half of the 63 scorable tokens
    sure = Detector(tokenizer, config, settings, lambda prompt, ids: torch.zeros(len(ids)))._score_green_list(ids, "")
    assert (sure.tokens, sure.z_score, sure.watermarked) == (0, None, False)
    # A loop is one piece of evidence: each (context, token) pair counts once.
    loop = Detector(tokenizer, config, settings, lambda prompt, ids: torch.full((len(ids),), 5.0))
    assert loop._score_green_list(vocab[:3] * 20, "").tokens == 3


def test_the_cost_line_replaces_only_finetunes_own_line(tmp_path):
    from finetune.outputs.card import WATERMARK_COST_UNMEASURED, record_watermark_cost
    from finetune.outputs.rundir import RunDir

    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    cost = {"rougeL": {"watermarked": 0.5, "unwatermarked": 0.6, "difference": -0.1}}
    run.card.write_text(f"# card\n\n{WATERMARK_COST_UNMEASURED}\n\nmy notes\n")
    assert record_watermark_cost(run, cost, run.path / "evals" / "x")
    first = run.card.read_text()
    assert "(`evals/x`): rougeL 0.5000 watermarked vs 0.6000 unwatermarked (-0.1000)." in first and "my notes" in first
    cost["rougeL"]["unwatermarked"] = 0.7
    assert record_watermark_cost(run, cost, run.path / "evals" / "y")  # a newer measurement replaces its own line
    assert "vs 0.7000 unwatermarked" in run.card.read_text() and "0.6000" not in run.card.read_text()
    run.card.write_text("# card edited by hand\n")
    assert not record_watermark_cost(run, cost, run.path / "evals" / "z")
    assert run.card.read_text() == "# card edited by hand\n"


def test_a_short_texts_verdict_is_an_exact_binomial_test_at_the_stated_rate(tiny_models, monkeypatch):
    """The z-test's normal tail understated short texts' p-values (7 green of 10 at ratio 0.25: 5.1e-4 against an
    exact 3.5e-3), and 1.55% of 6,000 short unmarked texts were flagged against a stated 0.135%. The verdict is now
    the exact test at the stated rate; the z-score stays the reference's."""
    import itertools
    import math

    from scipy.stats import binom
    from transformers import AutoConfig, AutoTokenizer

    from finetune.recipe.schema import WatermarkSection
    from finetune.watermark.marking import Detector, false_positive_rate

    tokenizer = AutoTokenizer.from_pretrained(tiny_models["llama"])
    config = AutoConfig.from_pretrained(tiny_models["llama"])
    settings = WatermarkSection(key=KEY, greenlist_ratio=0.25, z_threshold=3.0, entropy_threshold=0)
    detector = Detector(tokenizer, config, settings)
    vocab = [i for i in range(len(tokenizer)) if i not in tokenizer.all_special_ids]
    for green, n in ((7, 10), (6, 6), (30, 60)):
        verdicts = itertools.chain([True] * green, itertools.repeat(False))
        monkeypatch.setattr(detector, "_is_green", lambda ngram, v=verdicts: next(v))
        score = detector._score_green_list(vocab[: n + 1], "")  # n distinct (context, token) pairs
        assert score.tokens == n
        assert score.z_score == pytest.approx((green - 0.25 * n) / math.sqrt(n * 0.25 * 0.75))
        assert score.p_value == pytest.approx(float(binom.sf(green - 1, n, 0.25)), rel=1e-12)
        assert score.watermarked == (score.p_value <= false_positive_rate(3.0))
    # 7 of 10: z 3.65 > 3 flagged it; the exact p (3.5e-3) is above the stated 1.35e-3
    verdicts = itertools.chain([True] * 7, itertools.repeat(False))
    monkeypatch.setattr(detector, "_is_green", lambda ngram, v=verdicts: next(v))
    assert not detector._score_green_list(vocab[:11], "").watermarked
