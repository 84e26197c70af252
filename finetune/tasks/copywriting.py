"""Copywriting: brief (prompt) -> marketing copy (completion), scored with ROUGE, BLEU and distinct-2."""

from __future__ import annotations

import functools
import unicodedata
from typing import Any

import regex

from finetune.evaluation.intervals import bleu_fraction
from finetune.recipe.schema import EvalSection
from finetune.tasks.generative import GenerationTask, Rewards


class CopywritingTask(GenerationTask):
    name = "copywriting"
    required_fields = ("prompt", "completion")
    optional_fields = ("id",)  # kept in predictions, which --compare matches by it
    reference_fields = ("completion",)
    metric_names = ("rouge1", "rouge2", "rougeL", "bleu", "distinct_2", "mean_length")

    def main_metric(self, settings: EvalSection) -> str:
        return "rougeL"

    reward_fields = ("completion",)

    def rewards(self, rows: list[dict], settings: EvalSection) -> Rewards:
        """ROUGE-L F-measure against the row's reference copy, as the rougeL metric scores it."""
        return Rewards([rouge(r["completion"], r["prediction"])["rougeL"] for r in rows])

    def compute_metrics(self, rows: list[dict], settings: EvalSection | None = None) -> dict[str, Any]:
        return {
            "metrics": text_metrics([r["prediction"] for r in rows], [r["completion"] for r in rows]),
            "details": {},
        }


ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


class UnicodeWords:
    """A rouge-score tokenizer for any script: NFKC, lower-cased; a word is a run of Unicode letters, marks and
    digits, and each Han, Hiragana or Katakana character is a word of its own (those scripts put no spaces between
    words). rouge-score's own tokenizer keeps only [a-z0-9]: a Hindi, Arabic or Chinese prediction identical to its
    reference scored 0."""

    _WORD = regex.compile(r"[\p{Han}\p{Hiragana}\p{Katakana}]|[\p{L}\p{M}\p{N}]+")

    def tokenize(self, text: str) -> list[str]:
        return self._WORD.findall(unicodedata.normalize("NFKC", text).lower())


@functools.cache
def _scorer(unicode_words: bool) -> Any:
    from rouge_score import rouge_scorer

    if unicode_words:
        return rouge_scorer.RougeScorer(list(ROUGE_TYPES), tokenizer=UnicodeWords())
    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)


def rouge(reference: str, prediction: str) -> dict[str, float]:
    """ROUGE-1/2/L F-measures of one row: rouge-score exactly (Porter-stemmed [a-z0-9] words) unless the reference
    holds a letter or digit outside ASCII, which rouge-score's tokenizer drops: then `UnicodeWords` (not stemmed).
    Typographic punctuation (’ — “) both drop, so English with curly quotes stays rouge-score's. Decided by the
    row's own reference, so a row scores the same in any set of rows."""
    unicode_words = any(ch.isalnum() and not ch.isascii() for ch in reference)
    scores = _scorer(unicode_words).score(reference, prediction)  # (target, prediction)
    return {name: scores[name].fmeasure for name in ROUGE_TYPES}


def text_metrics(predictions: list[str], references: list[str]) -> dict[str, float]:
    """ROUGE-1/2/L (F-measure, mean over rows: `rouge`), corpus BLEU / 100, distinct-2, mean length.

    `mean_length` is in words per prediction: the one metric here that is not a fraction.
    """
    import sacrebleu

    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for prediction, reference in zip(predictions, references):
        for name, value in rouge(reference, prediction).items():
            totals[name] += value
    count = max(len(predictions), 1)
    metrics = {name: value / count for name, value in totals.items()}
    metrics["bleu"] = bleu_fraction(sacrebleu.corpus_bleu(predictions, [references]).score)
    metrics["distinct_2"] = distinct_n(predictions, 2)
    metrics["mean_length"] = sum(len(p.split()) for p in predictions) / count
    return metrics


def distinct_n(texts: list[str], n: int) -> float:
    """Distinct word n-grams over all n-grams across the predictions (lower-cased, whitespace words)."""
    seen: set[tuple[str, ...]] = set()
    total = 0
    for text in texts:
        words = text.lower().split()
        grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
        seen.update(grams)
        total += len(grams)
    return len(seen) / total if total else 0.0
