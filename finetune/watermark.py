"""Watermarking what a fine-tuned model generates, and finding the mark again, with the run's tokenizer and key.

Two of transformers' watermarks:
- kirchenbauer: the green-list watermark (Kirchenbauer et al. 2023) and transformers' `WatermarkDetector`
  (a z-test on the fraction of green tokens);
- synthid: SynthID Text's tournament sampling (Dathathri et al. 2024). Its detector here is the paper's mean
  score as a z-test: on unmarked text each g-value is a fair coin (Bernoulli with the sampling table's own mean)
  once repeated contexts are masked, so the mean g-value over a text has a known null distribution and the
  threshold a known false-positive rate, with no detector to train. (transformers' Bayesian detector would need
  a training set of marked and unmarked generations of this model first.)

Each text is scored on its own tokens, never inside a padded batch: padding (often EOS repeated) would be
scored too and make human text look watermarked.
"""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (PreTrainedTokenizerBase, SynthIDTextWatermarkingConfig, WatermarkDetector,
                          WatermarkingConfig)

from finetune.config import WatermarkSection
from finetune.errors import RecipeError

KEY_FILE = "watermark.key"


def generation_config(settings: WatermarkSection | None) -> WatermarkingConfig | SynthIDTextWatermarkingConfig | None:
    """What `model.generate` needs to mark its output, or None without a watermark."""
    if settings is None:
        return None
    if not isinstance(settings.key, int):
        raise RecipeError("eval.watermark.key: the key is redacted here; evaluate the run directory (its adapter "
                          "holds the key) or give the key")
    if settings.method == "synthid":
        return SynthIDTextWatermarkingConfig(ngram_len=settings.ngram_len, keys=synthid_keys(settings.key, settings.depth))
    return WatermarkingConfig(greenlist_ratio=settings.greenlist_ratio, bias=settings.bias,
                              hashing_key=settings.key, seeding_scheme="lefthash", context_width=settings.context_width)


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
    path = adapter_dir / KEY_FILE
    if not path.is_file():
        return None
    try:
        return int(path.read_text(encoding="utf-8").strip())
    except ValueError:
        raise RecipeError(f"{path}: not a watermark key (an integer)") from None


@dataclass(frozen=True)
class Score:
    tokens: int
    statistic: float | None  # the fraction of green tokens (kirchenbauer) or the mean g-value (synthid)
    z_score: float | None
    p_value: float | None
    watermarked: bool
    statistic_name: str = "green_fraction"

    def as_dict(self) -> dict:
        return {"watermark_tokens": self.tokens, self.statistic_name: self.statistic, "z_score": self.z_score,
                "p_value": self.p_value, "watermarked": self.watermarked}


class Detector:
    """The detector of the run's watermark with the run's key, scoring one text at a time."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, model_config, settings: WatermarkSection):
        self.tokenizer, self.settings = tokenizer, settings
        config = generation_config(settings)
        if settings.method == "synthid":
            self.processor = config.construct_processor(model_config.vocab_size, "cpu")
            # The null mean of a g-value is the sampling table's own mean (0.5 up to the table's sampling noise).
            self.null_mean = float(self.processor.sampling_table.float().mean())
        else:
            self.detector = WatermarkDetector(model_config, "cpu", config)

    def score(self, text: str) -> Score:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if self.settings.method == "synthid":
            return self._score_synthid(ids)
        if len(ids) <= self.settings.context_width:  # nothing to score after the seeding context
            return Score(len(ids), None, None, None, False)
        result = self.detector(torch.tensor([ids]), z_threshold=self.settings.z_threshold, return_dict=True)
        return Score(len(ids), float(result.green_fraction[0]), float(result.z_score[0]), float(result.p_value[0]),
                     bool(result.prediction[0]))

    def _score_synthid(self, ids: list[int]) -> Score:
        """z-test of the mean g-value over the text's unrepeated contexts (SynthID's mean score)."""
        skip = self.settings.ngram_len - 1  # the first tokens have no full context
        if len(ids) <= skip:
            return Score(len(ids), None, None, None, False, "mean_g_value")
        tokens = torch.tensor([ids])
        g_values = self.processor.compute_g_values(tokens)[0]  # (positions, depth)
        # A repeated context repeats its g-values: counted once, as transformers' own detector does.
        keep = self.processor.compute_context_repetition_mask(tokens)[0].bool()
        eos = self.tokenizer.eos_token_id
        if eos is not None:  # nothing after an end of text counts
            keep &= self.processor.compute_eos_token_mask(tokens, eos)[0, skip:].bool()
        values = g_values[keep].double()
        if values.numel() == 0:
            return Score(len(ids), None, None, None, False, "mean_g_value")
        mean = float(values.mean())
        p = self.null_mean
        z = (mean - p) / math.sqrt(p * (1 - p) / values.numel())
        return Score(len(ids), mean, z, normal_tail(z), z > self.settings.z_threshold, "mean_g_value")


def normal_tail(z: float) -> float:
    """One-sided normal tail P(Z > z)."""
    return 0.5 * math.erfc(z / math.sqrt(2))


def false_positive_rate(z_threshold: float) -> float:
    """How often unwatermarked text scores above the threshold."""
    return normal_tail(z_threshold)
