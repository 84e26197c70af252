"""Watermarking what a fine-tuned model generates, and finding the mark again, with the run's tokenizer and key.

Two of transformers' watermarks:
- kirchenbauer: the green-list watermark (Kirchenbauer et al. 2023), detected with the green-list test of
  transformers' `WatermarkDetector`: a z-test on the fraction of green tokens, each (context, token) pair
  counted once (repeats, as in a greedy loop, break the test's independence). With `entropy_threshold` > 0 (the
  default), marked and counted only where the model was unsure of the next token (SWEET, Lee et al. 2023, "Who
  Wrote this Code?"): a token the model was sure of cannot be moved into the green list, so counting it only
  dilutes the mark, and a fine-tuned model is sure of most of its tokens. Detection then needs the run's model,
  to recompute each token's entropy from its prompt and the text before it. The test stays exact on unmarked
  text: which positions count depends only on the text before them, and an unmarked token is green with
  probability `greenlist_ratio` whatever came before it.
- synthid: SynthID Text's tournament sampling (Dathathri et al. 2024). Its detector here is the paper's mean
  score as a z-test: on unmarked text each g-value is a fair coin (Bernoulli with the sampling table's own mean)
  once repeated contexts are masked, so the mean g-value over a text has a known null distribution and the
  threshold a known false-positive rate, with no detector to train. A Bayesian detector trained for the run
  (`synthid_detector.py`, `finetune train-detector`) adds its posterior probability to each score; the verdict
  stays the z-test's, whose false-positive rate is known (the trained one's was not: docs/watermarks.md).

Each text is scored on its own tokens, never inside a padded batch: padding (often EOS repeated) would be
scored too and make human text look watermarked.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import cast, overload

import torch
from transformers import (
    BayesianDetectorModel,
    LogitsProcessorList,
    PretrainedConfig,
    PreTrainedTokenizerBase,
    SynthIDTextWatermarkingConfig,
    SynthIDTextWatermarkLogitsProcessor,
    WatermarkDetector,
    WatermarkingConfig,
    WatermarkLogitsProcessor,
)

from finetune.errors import RecipeError
from finetune.recipe.schema import KEY_MAX, WatermarkSection

KEY_FILE = "watermark.key"


def check_key(key: int, where: str) -> int:
    """A key in the range every method can seed from (0 .. 2**64 - 1), or a RecipeError (exit 2) naming `where`
    (never the key itself)."""
    if isinstance(key, bool) or not isinstance(key, int) or not 0 <= key <= KEY_MAX:
        raise RecipeError(f"{where}: a watermark key is a whole number from 0 to 2**64 - 1 ({KEY_MAX})")
    return key


def _key(settings: WatermarkSection) -> int:
    """The watermark key; a key redacted out of a saved recipe cannot mark or detect."""
    if not isinstance(settings.key, int):
        raise RecipeError(
            "eval.watermark.key: the key is redacted here; evaluate the run directory (its adapter "
            "holds the key) or give the key"
        )
    return check_key(settings.key, "eval.watermark.key")


@overload
def generation_config(settings: None) -> None: ...
@overload
def generation_config(
    settings: WatermarkSection | None,
) -> WatermarkingConfig | SynthIDTextWatermarkingConfig | None: ...
def generation_config(settings: WatermarkSection | None) -> WatermarkingConfig | SynthIDTextWatermarkingConfig | None:
    """What `model.generate` needs to mark its output, or None without a watermark (or with a learned one, which
    the model itself writes: finetune.watermark.learned)."""
    if settings is None or settings.method == "learned":
        return None
    key = _key(settings)
    if settings.method == "synthid":
        return SynthIDTextWatermarkingConfig(ngram_len=settings.ngram_len, keys=synthid_keys(key, settings.depth))
    return WatermarkingConfig(
        greenlist_ratio=settings.greenlist_ratio,
        bias=settings.bias,
        hashing_key=key,
        seeding_scheme="lefthash",
        context_width=settings.context_width,
    )


def logits_processors(
    settings: WatermarkSection | None, vocab_size: int, device: torch.device | str
) -> tuple[LogitsProcessorList, LogitsProcessorList]:
    """The processors that mark generated text, as (on the raw logits, after temperature and top-p): the
    entropy-gated green list reads the raw logits whose entropy detection recomputes; transformers' own watermarks
    come last, where `model.generate` puts them (after every other processor, transformers #34630). Fresh
    processors for each batch: SynthID's keeps per-row state."""
    config = generation_config(settings)
    if settings is None or config is None:  # no watermark, or one the model writes itself
        return LogitsProcessorList(), LogitsProcessorList()
    if gated(settings):
        return LogitsProcessorList([EntropyGatedWatermark(settings, vocab_size, device)]), LogitsProcessorList()
    return LogitsProcessorList(), LogitsProcessorList([config.construct_processor(vocab_size, device)])


def keeps_row_state(settings: WatermarkSection | None) -> bool:
    """Whether the marking processors remember each row by its place in the batch (SynthID keeps each row's recent
    contexts), so that a finished row may not leave the batch while the others generate."""
    return settings is not None and settings.method == "synthid"


def gated(settings: WatermarkSection) -> bool:
    """Whether marking and detection look at the model's entropy (and detection so needs the model)."""
    return settings.method == "kirchenbauer" and settings.entropy_threshold > 0


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of the next-token distribution of each row of logits."""
    return torch.distributions.Categorical(logits=logits.float()).entropy()


class EntropyGatedWatermark(WatermarkLogitsProcessor):
    """transformers' green-list processor, applied only where the model's next-token entropy is at least
    `entropy_threshold` nats (SWEET); elsewhere the logits pass unchanged."""

    def __init__(self, settings: WatermarkSection, vocab_size: int, device: torch.device | str):
        super().__init__(
            vocab_size=vocab_size,
            device=device,
            greenlist_ratio=settings.greenlist_ratio,
            bias=settings.bias,
            hashing_key=_key(settings),
            seeding_scheme="lefthash",
            context_width=settings.context_width,
        )
        self.threshold = settings.entropy_threshold

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        unsure = entropy(scores) >= self.threshold
        return torch.where(unsure[:, None], super().__call__(input_ids, scores), scores)


def synthid_keys(key: int, depth: int) -> list[int]:
    """One key per tournament layer, derived from the one secret (the same secret always gives the same keys)."""
    generator = random.Random(key)
    return [generator.randrange(1, 2**31) for _ in range(depth)]


def write_key(adapter_dir: Path, settings: WatermarkSection) -> None:
    """The key beside the adapter, readable by its owner only."""
    path = adapter_dir / KEY_FILE
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        handle.write(f"{settings.key}\n")


def read_key(adapter_dir: Path) -> int | None:
    """The key a run keeps beside its adapter, or None without one; a damaged or out-of-range key is refused
    (exit 2) naming the file."""
    path = adapter_dir / KEY_FILE
    if not path.is_file():
        return None
    try:
        key = int(path.read_text(encoding="utf-8").strip())
    except (ValueError, UnicodeDecodeError):
        raise RecipeError(f"{path}: not a watermark key (an integer)") from None
    return check_key(key, str(path))


@dataclass(frozen=True)
class Score:
    tokens: int  # green list: the (context, token) pairs the test counted; synthid: the text's tokens
    statistic: float | None  # the fraction of green tokens (kirchenbauer) or the mean g-value (synthid)
    z_score: float | None
    p_value: float | None
    watermarked: bool
    statistic_name: str = "green_fraction"
    text_tokens: int | None = None  # all of the text's tokens, when the test counts only some
    probability: float | None = None  # synthid with a trained Bayesian detector: P(watermarked | g-values)

    def as_dict(self) -> dict:
        scores = {
            "text_tokens": self.tokens if self.text_tokens is None else self.text_tokens,
            "watermark_tokens": self.tokens,
            self.statistic_name: self.statistic,
            "z_score": self.z_score,
            "p_value": self.p_value,
        }
        if self.probability is not None:
            scores["probability"] = self.probability
        return {**scores, "watermarked": self.watermarked}


# (prompt, the text's token ids) -> the model's next-token entropy before each of those tokens (nats).
EntropyFunction = Callable[[str, list[int]], torch.Tensor]


class Detector:
    """The detector of the run's watermark with the run's key, scoring one text at a time.

    An entropy-gated watermark needs `entropies` (the run's model on the text and its prompt); a synthid one may
    bring its trained Bayesian detector (`bayesian`, transformers' BayesianDetectorModel)."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        model_config: PretrainedConfig,
        settings: WatermarkSection,
        entropies: EntropyFunction | None = None,
        bayesian: BayesianDetectorModel | None = None,
    ):
        if gated(settings) and entropies is None:
            raise ValueError("an entropy-gated watermark is detected with the model's entropies")
        self.tokenizer, self.settings, self.entropies, self.bayesian = tokenizer, settings, entropies, bayesian
        config = generation_config(settings)
        if config is None:
            raise ValueError("a learned watermark is read by its extractor (finetune.watermark.learned.BitDetector)")
        if isinstance(config, SynthIDTextWatermarkingConfig):  # settings.method == "synthid"
            processor = config.construct_processor(model_config.vocab_size, "cpu")
            # transformers annotates it as WatermarkLogitsProcessor; synthid's config builds its own processor.
            assert isinstance(processor, SynthIDTextWatermarkLogitsProcessor)
            self.processor = processor
            # The null mean of a g-value is the sampling table's own mean (0.5 up to the table's sampling noise).
            self.null_mean = float(self.processor.sampling_table.float().mean())
        else:
            self.detector = WatermarkDetector(model_config, "cpu", config)  # its green-list test

    def score(self, text: str, prompt: str = "") -> Score:
        """The text's score; `prompt` (what the text answers) sharpens an entropy-gated test's choice of tokens."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if self.settings.method == "synthid":
            return self._score_synthid(ids)
        return self._score_green_list(ids, prompt)

    def _score_green_list(self, ids: list[int], prompt: str) -> Score:
        """The green-token z-test, each (context, token) pair counted once (a phrase repeated in a loop is one
        piece of evidence: counted again and again, unmarked loops look marked; measured, docs/watermarks.md),
        over the tokens the model was unsure of when the watermark is entropy-gated."""
        width, ratio = self.settings.context_width, self.settings.greenlist_ratio
        if len(ids) <= width:  # nothing to test after the seeding context
            return Score(0, None, None, None, False, text_tokens=len(ids))
        if gated(self.settings):
            assert self.entropies is not None  # the constructor refuses a gated watermark without them
            unsure = (self.entropies(prompt, ids) >= self.settings.entropy_threshold).tolist()
        else:
            unsure = [True] * len(ids)
        counted = {tuple(ids[i - width : i + 1]) for i in range(width, len(ids)) if unsure[i]}
        if not counted:  # the model was sure of every token: nothing to test
            return Score(0, None, None, None, False, text_tokens=len(ids))
        green = sum(self._is_green(ngram) for ngram in counted)
        n = len(counted)
        z = (green - ratio * n) / math.sqrt(n * ratio * (1 - ratio))  # the reference's z-score, reported
        p = binomial_tail(green, n, ratio)
        return Score(n, green / n, z, p, p <= false_positive_rate(self.settings.z_threshold), text_tokens=len(ids))

    def _is_green(self, ngram: tuple[int, ...]) -> bool:
        """transformers' own green-list test for the last token of the n-gram, seeded by the tokens before it."""
        prefix = cast(torch.LongTensor, torch.tensor(ngram[:-1]))  # token ids: an int64 tensor
        return bool(self.detector._get_ngram_score(prefix, ngram[-1]))

    def _score_synthid(self, ids: list[int]) -> Score:
        """The mean g-value over the text's unrepeated contexts (SynthID's mean score) and its z; the verdict is the
        exact binomial test of the count of g-values of 1 (0/1 tables), and with a trained Bayesian detector its
        posterior probability stands beside it."""
        g_values, keep = synthid_evidence(self.processor, self.tokenizer, ids)
        values = g_values[keep].double()
        if values.numel() == 0:  # too short for one full context
            return Score(len(ids), None, None, None, False, "mean_g_value")
        mean = float(values.mean())
        p = self.null_mean
        z = (mean - p) / math.sqrt(p * (1 - p) / values.numel())
        binary = bool(((values == 0) | (values == 1)).all())  # g-values drawn from a 0/1 table: a count, tested exactly
        p_value = binomial_tail(int(values.sum()), values.numel(), p) if binary else normal_tail(z)
        probability = None
        if self.bayesian is not None:
            with torch.no_grad():
                probability = float(self.bayesian(g_values[None].float(), keep[None].float())[0][0])
        return Score(
            len(ids),
            mean,
            z,
            p_value,
            p_value <= false_positive_rate(self.settings.z_threshold),
            "mean_g_value",
            probability=probability,
        )


def synthid_evidence(
    processor: SynthIDTextWatermarkLogitsProcessor, tokenizer: PreTrainedTokenizerBase, ids: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """A text's g-values (positions, depth) and which positions count: a repeated context repeats its g-values, so
    only its first counts (as in transformers' detector), and nothing after an end of text counts."""
    skip = processor.ngram_len - 1  # the first tokens have no full context
    if len(ids) <= skip:
        return torch.zeros(0, len(processor.keys)), torch.zeros(0, dtype=torch.bool)
    tokens = cast(torch.LongTensor, torch.tensor([ids]))  # token ids: an int64 tensor
    g_values = processor.compute_g_values(tokens)[0]
    keep = processor.compute_context_repetition_mask(tokens)[0].bool()
    if tokenizer.eos_token_id is not None:
        keep &= processor.compute_eos_token_mask(tokens, tokenizer.eos_token_id)[0, skip:].bool()
    return g_values, keep


def normal_tail(z: float) -> float:
    """One-sided normal tail P(Z > z)."""
    return 0.5 * math.erfc(z / math.sqrt(2))


def false_positive_rate(z_threshold: float) -> float:
    """The p-value at or below which a text is called watermarked: the normal tail of the z threshold, as the
    reference detectors state it. The verdict is an exact binomial test at that level (`binomial_tail`), so this is
    the most often unwatermarked text is flagged at any length; the z-test alone flagged 1.55% of 6,000 unmarked
    texts of about 10 counted tokens against a stated 0.135% (z > 3)."""
    return normal_tail(z_threshold)


def binomial_tail(successes: int, trials: int, chance: float) -> float:
    """Exact one-sided P(X >= successes) for X ~ Binomial(trials, chance): an unmarked text's chance of this many
    green tokens (or g-values of 1) or more."""
    from scipy.stats import binom

    return float(binom.sf(successes - 1, trials, chance))
