"""Model inputs for one split, aligned with the rows they came from (what tasks build and training reads)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from datasets import Dataset

from finetune.data.tables import LengthReport


@dataclass
class Features:
    """Model inputs for one split, aligned with the rows they came from."""

    dataset: Dataset  # tokenised features, one row per model input
    rows: Dataset  # the task-field rows they were built from (after overflow drops)
    report: LengthReport
    prompts: list[list[int]] | None = None  # generation tasks: prompt token ids, one per row
    windows: Any = None  # extractive QA: which example and character offsets each window holds
