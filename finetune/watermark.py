"""Watermarking what a fine-tuned model generates, and finding the mark again: transformers' own green-list
watermark (Kirchenbauer et al. 2023) and its detector, with the run's tokenizer and secret key.

Each text is scored on its own tokens, never inside a padded batch: padding (often EOS repeated) would be
scored too and make human text look watermarked.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase, WatermarkDetector, WatermarkingConfig

from finetune.config import WatermarkSection
from finetune.errors import RecipeError

KEY_FILE = "watermark.key"


def generation_config(settings: WatermarkSection | None) -> WatermarkingConfig | None:
    """What `model.generate` needs to mark its output, or None without a watermark."""
    if settings is None:
        return None
    if not isinstance(settings.key, int):
        raise RecipeError("eval.watermark.key: the key is redacted here; evaluate the run directory (its adapter "
                          "holds the key) or give the key")
    return WatermarkingConfig(greenlist_ratio=settings.greenlist_ratio, bias=settings.bias,
                              hashing_key=settings.key, seeding_scheme="lefthash", context_width=settings.context_width)


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
    green_fraction: float | None
    z_score: float | None
    p_value: float | None
    watermarked: bool

    def as_dict(self) -> dict:
        return {"watermark_tokens": self.tokens, "green_fraction": self.green_fraction, "z_score": self.z_score,
                "p_value": self.p_value, "watermarked": self.watermarked}


class Detector:
    """transformers' WatermarkDetector with the run's key, scoring one text at a time."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, model_config, settings: WatermarkSection):
        self.tokenizer, self.settings = tokenizer, settings
        self.detector = WatermarkDetector(model_config, "cpu", generation_config(settings))

    def score(self, text: str) -> Score:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) <= self.settings.context_width:  # nothing to score after the seeding context
            return Score(len(ids), None, None, None, False)
        result = self.detector(torch.tensor([ids]), z_threshold=self.settings.z_threshold, return_dict=True)
        return Score(len(ids), float(result.green_fraction[0]), float(result.z_score[0]), float(result.p_value[0]),
                     bool(result.prediction[0]))


def false_positive_rate(z_threshold: float) -> float:
    """One-sided normal tail: how often unwatermarked text scores above the threshold."""
    return float(0.5 * torch.special.erfc(torch.tensor(z_threshold / 2 ** 0.5)))
