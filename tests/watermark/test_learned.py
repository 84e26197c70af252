"""The learned watermark (finetune.watermark.learned) and its joint loss (finetune.training.watermark_objective):
the modules on a tiny decoder built from its config, each loss piece against a reference computation."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from finetune.errors import RecipeError
from finetune.models.families import FAMILIES
from finetune.recipe.schema import PreferenceSection, Recipe, WatermarkSection, build_recipe, recipe_to_yaml
from finetune.secrets import REDACTED, redact
from finetune.training.objectives import Objective
from finetune.training.watermark_objective import LearnedWatermarkObjective, completion_order, substitute
from finetune.watermark import learned

VOCAB = 64


def tiny_decoder(seed: int = 0, sharpen: float = 1.0):
    """A 2-layer Llama from its config. `sharpen` scales the output head: a random tiny model's next-token
    distributions are nearly uniform, a trained model's are peaked (what the watermark shifts)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        tie_word_embeddings=True,  # as SmolLM2's: the extractor reads the embeddings the head scores with
    )
    model = AutoModelForCausalLM.from_config(config).eval()
    model.lm_head.weight.data *= sharpen
    model.requires_grad_(False)
    return model


def settings(**values) -> WatermarkSection:
    return WatermarkSection(**{"method": "learned", "key": 7, "bits": 8, "extractor_width": 32, **values})


def batch(rows: int, prompt: int = 4, completion: int = 12) -> dict:
    ids = torch.randint(3, VOCAB, (rows, prompt + completion))
    labels = ids.clone()
    labels[:, :prompt] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def test_a_closed_gate_is_the_plain_model_and_an_open_one_marks():
    model = tiny_decoder()
    ids = torch.randint(3, VOCAB, (3, 10))
    plain = model(ids).logits
    plain_generated = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    watermark = learned.fresh(model, settings(), "10110010")
    assert watermark.message is not None  # marking, with every gate at zero
    assert torch.equal(model(ids).logits, plain)
    assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0), plain_generated)
    for block in watermark.blocks:
        block.gate.data.fill_(0.2)
    assert not torch.allclose(model(ids).logits, plain)
    with watermark.messages(None):  # no message: the plain model again
        assert torch.equal(model(ids).logits, plain)
    with watermark.messages("01001101"):  # another message, other logits
        other = model(ids).logits
    assert not torch.allclose(other, model(ids).logits)
    # One message per row in training; a batch of the wrong size is a bug, said so.
    with watermark.messages(torch.zeros(2, 8, dtype=torch.long)), pytest.raises(ValueError, match="2 messages"):
        model(ids)


def test_saved_and_loaded_the_watermark_marks_and_reads_alike(tmp_path):
    model = tiny_decoder()
    watermark = learned.fresh(model, settings(), "10110010")
    for block in watermark.blocks:
        block.gate.data.fill_(0.3)
    ids = torch.randint(3, VOCAB, (2, 9))
    learned.save(watermark, tmp_path)
    again = tiny_decoder()
    loaded = learned.load(again, tmp_path, settings(), "10110010")
    # Equal up to float rounding: the loaded blocks are equal bit for bit, but transformers 5.25 computes the two
    # models' forwards in different orders (1e-7 apart); a wrong load moves logits by 1e-2 and more.
    torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=0, atol=1e-6)
    mask = torch.ones_like(ids, dtype=torch.bool)
    assert torch.equal(loaded.read_ids(ids, mask), watermark.read_ids(ids, mask))
    assert loaded.message_text() == "10110010"
    assert all(not p.requires_grad for p in loaded.parameters())  # a trained watermark is used, not trained
    with pytest.raises(RecipeError, match="eval.watermark.bits: 16"):
        learned.load(tiny_decoder(), tmp_path, settings(bits=16), "0" * 16)
    with pytest.raises(RecipeError, match="no learned_watermark.safetensors"):
        learned.load(tiny_decoder(), tmp_path / "empty", settings(), "10110010")


def test_completion_order_left_aligns_each_completion():
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    order, kept = completion_order(mask)
    for row in range(mask.shape[0]):
        places = [i for i, m in enumerate(mask[row].tolist()) if m]
        assert order[row, : len(places)].tolist() == places
        assert kept[row].tolist() == [True] * len(places) + [False] * (order.shape[1] - len(places))
    assert order.shape[1] == 4  # the longest completion


def test_the_joint_loss_is_task_plus_kl_plus_bits():
    """The objective's loss, recomputed from its parts: the task's cross-entropy on the completion, KL(marked ||
    unmarked) by torch.distributions over the completion tokens, and the extractor's BCE under the same draws."""
    model = tiny_decoder(sharpen=10)
    mark = settings(noise=0.0, kl_weight=0.5, bit_weight=2.0)
    watermark = learned.fresh(model, mark, "10110010")
    for block in watermark.blocks:
        block.gate.data.fill_(0.1)
    data = batch(4)
    objective = LearnedWatermarkObjective(Objective(PreferenceSection(), encoder_decoder=False), mark)
    torch.manual_seed(3)
    step = objective.step(model, data)

    torch.manual_seed(3)
    with torch.no_grad():
        with watermark.messages(None):
            plain = model(data["input_ids"]).logits[:, :-1]
        messages = torch.randint(0, 2, (4, 8))
        with watermark.messages(messages):
            marked = model(data["input_ids"]).logits[:, :-1]
        targets = data["labels"][:, 1:]
        keep = targets != -100
        task = torch.nn.functional.cross_entropy(plain[keep], targets[keep])
        kl = torch.distributions.kl_divergence(
            torch.distributions.Categorical(logits=marked[keep]), torch.distributions.Categorical(logits=plain[keep])
        ).mean()
        # Every completion here is as long as the others, so the left-aligned completions are the kept columns.
        completions = marked[:, 3:]
        tokens = torch.nn.functional.gumbel_softmax(completions, tau=1.0, hard=True)
        bits = watermark.read_embeddings(tokens @ watermark.token_embeddings, torch.ones(4, 12, dtype=torch.bool))
        bce = torch.nn.functional.binary_cross_entropy_with_logits(bits, messages.float())
    assert step.stats["task_loss"] == pytest.approx(float(task), rel=1e-5)
    assert step.stats["watermark_kl"] == pytest.approx(float(kl), rel=1e-4, abs=1e-6)
    assert step.stats["watermark_bce"] == pytest.approx(float(bce), rel=1e-5)
    assert float(step.loss.detach()) == pytest.approx(float(task + 0.5 * kl + 2.0 * bce), rel=1e-5)
    step.loss.backward()
    assert all(p.grad is not None for n, p in watermark.named_parameters() if n.startswith(("blocks", "extractor")))


def test_substitution_replaces_the_asked_share_of_tokens():
    torch.manual_seed(0)
    table = torch.randn(VOCAB, 8)
    embeddings = torch.randn(50, 40, 8)
    mask = torch.ones(50, 40, dtype=torch.bool)
    mask[:, 30:] = False
    noisy, replaced = substitute(embeddings, mask, table, 0.2)
    assert not replaced[:, 30:].any()  # padding is never a token
    assert replaced.float().sum() / mask.sum() == pytest.approx(0.2, abs=0.02)
    assert torch.equal(noisy[~replaced], embeddings[~replaced])
    rows = noisy[replaced]  # each replaced token is some vocabulary token's embedding
    assert (rows[:, None, :] == table[None]).all(-1).any(-1).all()


def test_the_extractor_learns_to_read_the_message():
    """Fifty joint steps on a tiny decoder: the bits read from fresh marked text, greedy decoding, beat chance
    clearly (256 bits read: chance is 0.5 +- 0.031); the same text read by the untrained extractor does not."""
    model = tiny_decoder(sharpen=5)
    mark = settings(noise=0.0, kl_weight=0.0, embedder_layers=1)
    watermark = learned.fresh(model, mark, "10110010")
    objective = LearnedWatermarkObjective(Objective(PreferenceSection(), encoder_decoder=False), mark)

    def greedy_accuracy() -> float:
        torch.manual_seed(11)
        hits = []
        for _ in range(8):
            message = torch.randint(0, 2, (8,))
            with watermark.messages(message), torch.no_grad():
                prompts = torch.randint(3, VOCAB, (4, 4))
                text = model.generate(prompts, max_new_tokens=16, do_sample=False, pad_token_id=0)[:, 4:]
                bits = watermark.read_ids(text, torch.ones_like(text, dtype=torch.bool)) > 0
            hits.append((bits == message.bool()).float().mean())
        return float(torch.stack(hits).mean())

    before = greedy_accuracy()
    optimizer = torch.optim.AdamW(watermark.parameters(), lr=1e-2)
    torch.manual_seed(0)
    for _ in range(50):
        step = objective.step(model, batch(12, completion=16))
        optimizer.zero_grad()
        step.loss.backward()
        optimizer.step()
    after = greedy_accuracy()
    assert after >= 0.65 and after - before >= 0.15, (before, after)  # measured: 0.48 -> 0.71


def test_match_tails_and_false_positive_rate():
    from scipy.stats import binomtest, poisson_binom

    for bits in (8, 16):
        fair = learned.match_probabilities("1" * bits, None)
        for matches in range(bits + 1):
            exact = sum(math.comb(bits, m) for m in range(matches, bits + 1)) / 2**bits
            assert learned.match_tail(matches, fair) == pytest.approx(exact, rel=1e-9)
            expected = binomtest(matches, bits, 0.5, alternative="greater").pvalue
            assert learned.match_tail(matches, fair) == pytest.approx(expected, rel=1e-9)
    assert learned.false_positive_rate([0.5] * 16, 0.01) == pytest.approx(137 / 65536)  # 14 of 16 bits or more
    # Calibrated: an extractor that reads 1 at a place 90% of the time from unmarked text matches a message's 1
    # there 90% of the time, its 0 10%: the Poisson-binomial tail, as scipy computes it.
    ones = [0.9, 0.1, 0.7, 0.5, 0.95, 0.3, 0.6, 0.2]
    message = "10110100"
    chances = learned.match_probabilities(message, ones)
    assert chances == pytest.approx([0.9, 0.9, 0.7, 0.5, 0.05, 0.3, 0.4, 0.8])
    for matches in range(9):
        assert learned.match_tail(matches, chances) == pytest.approx(poisson_binom(chances).sf(matches - 1), abs=1e-12)


def test_a_message_near_the_extractors_habit_is_tested_against_it(tiny_models):
    """Unmarked text whose bits the extractor always reads the same way: a message equal to that habit matches
    every bit, which a fair 1/2 a bit would call p = 2**-k; calibrated on such text, it is no evidence at all."""
    model = tiny_decoder()
    watermark = learned.fresh(model, settings(bits=8), "0" * 8)
    texts = [
        [int(t) for t in torch.randint(5, VOCAB, (12,), generator=torch.Generator().manual_seed(i))] for i in range(40)
    ]
    habit = "".join(
        "1" if v > 0 else "0"
        for v in watermark.read_ids(torch.tensor(texts[:1]), torch.ones(1, 12, dtype=torch.bool))[0].tolist()
    )

    class Ids:  # the tokenizer's role: text -> ids (here the text is the ids, space-separated)
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [int(t) for t in text.split()]}

    text = " ".join(map(str, texts[0]))
    uncalibrated = learned.BitDetector(Ids(), watermark, habit, 0.01).score(text)
    assert uncalibrated.bit_accuracy == 1.0 and uncalibrated.watermarked  # p = 1/256: flagged
    state = torch.get_rng_state()
    counts = learned.calibrate(watermark, texts)
    assert torch.equal(torch.get_rng_state(), state)  # every save calibrates: it must draw nothing a run would miss
    assert counts["texts"] == 40 and len(counts["ones"]) == 8
    calibrated = learned.BitDetector(Ids(), watermark, habit, 0.01)
    score = calibrated.score(text)
    assert score.bit_accuracy == 1.0
    assert score.p_value > 0.01 and not score.watermarked  # the habit is what unmarked text reads: no evidence
    assert uncalibrated.z_score == pytest.approx((1.0 - 0.5) * 8 / math.sqrt(8 / 4))  # a fair 1/2 a bit
    assert score.z_score < uncalibrated.z_score  # measured against the same chances as its p-value
    assert calibrated.false_positive_rate() < 0.01


def test_the_message_is_checked_drawn_kept_and_redacted(tmp_path):
    assert learned.message_from_key(7, 16) == learned.message_from_key(7, 16)
    assert learned.message_from_key(7, 16) != learned.message_from_key(8, 16)
    assert learned.run_message(settings(bits=4, message="1001")) == "1001"
    base = {"task": "copywriting", "model": {"name_or_path": "m"}, "data": {"train": "t.jsonl"}}
    with pytest.raises(RecipeError, match=r"eval.watermark.message: a message is a string of exactly bits \(8\)") as e:
        build_recipe({**base, "eval": {"watermark": {"method": "learned", "key": 7, "bits": 8, "message": "10101"}}})
    assert "10101" not in str(e.value)  # like the key, never shown
    with pytest.raises(RecipeError, match="eval.watermark.message: a message is a quoted string"):
        build_recipe({**base, "eval": {"watermark": {"method": "learned", "key": 7, "bits": 4, "message": 1010}}})
    with pytest.raises(RecipeError, match="eval.watermark.extractor"):
        build_recipe({**base, "eval": {"watermark": {"method": "learned", "key": 7, "extractor": "bert-base"}}})
    with pytest.raises(ValidationError):
        settings(message="1010101x")
    mark = settings(message="10110010")
    learned.write_message(tmp_path, mark)
    assert (tmp_path / learned.MESSAGE_FILE).stat().st_mode & 0o777 == 0o600
    assert learned.read_message(tmp_path, 8) == "10110010"
    chosen = settings(bits=8).model_copy(update={"message": REDACTED})  # a run's recipe.yaml, its message chosen
    assert learned.run_message(chosen, tmp_path) == "10110010"
    with pytest.raises(RecipeError, match="the run's message is missing"):  # never the key's message instead
        learned.run_message(chosen, tmp_path / "elsewhere")
    with pytest.raises(RecipeError, match="exactly 16 characters"):
        learned.read_message(tmp_path, 16)
    recipe = build_recipe(
        {**base, "eval": {"watermark": {"method": "learned", "key": 7, "bits": 8, "message": "10110010"}}}
    )
    text = recipe_to_yaml(recipe)
    assert "10110010" not in text and "message: <redacted>" in text
    for typed in ("eval.watermark.message='10110010'", 'eval.watermark={method: learned, message: "10110010"}'):
        assert "10110010" not in redact(typed)  # quoted, as YAML needs it, on a command line
    assert "z_threshold" not in text and "greenlist_ratio" not in text  # the other methods' settings
    assert set(WatermarkSection(key=1).other_method_keys()) >= {"bits", "message", "noise"}
    assert "z_threshold" not in WatermarkSection(key=1, method="synthid").other_method_keys()


def test_what_a_learned_watermark_refuses():
    base = {"task": "copywriting", "model": {"name_or_path": "m"}, "data": {"train": "t.jsonl"}}
    mark = {"method": "learned", "key": 7}
    recipe = Recipe.model_validate({**base, "eval": {"watermark": mark}, "train": {"objective": "dpo"}})
    assert any("train.objective is dpo" in p for p in learned.recipe_problems(recipe))
    recipe = Recipe.model_validate({**base, "eval": {"watermark": mark}, "train": {"packing": True}})
    assert any(p.startswith("train.packing") for p in learned.recipe_problems(recipe))
    assert learned.recipe_problems(Recipe.model_validate({**base, "eval": {"watermark": mark}})) == []
    assert learned.family_problems(settings(), FAMILIES["gpt"], "model") == []
    (problem,) = learned.family_problems(settings(), FAMILIES["bart"], "model")
    assert problem.startswith("eval.watermark.method: learned is built for GPT-family decoders")
    assert learned.family_problems(WatermarkSection(key=1), FAMILIES["bart"], "model") == []
    from transformers import AutoModelForSeq2SeqLM, BartConfig

    bart = AutoModelForSeq2SeqLM.from_config(
        BartConfig(
            vocab_size=VOCAB,
            d_model=16,
            encoder_layers=1,
            decoder_layers=1,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=16,
            decoder_ffn_dim=16,
            max_position_embeddings=32,
        )
    )
    with pytest.raises(RecipeError, match="not encoder-decoders"):  # the model alone refuses too
        learned.fresh(bart, settings(), "10110010")
    with pytest.raises(RecipeError, match="cannot live in a merged checkpoint or a GGUF"):
        learned.refuse_export(settings(), "finetune export RUN")
    learned.refuse_export(WatermarkSection(key=1), "finetune export RUN")  # other watermarks export
