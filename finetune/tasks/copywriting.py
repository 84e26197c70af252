"""Copywriting: brief (prompt) -> marketing copy (completion), scored with ROUGE, BLEU and distinct-2."""

from __future__ import annotations

from typing import Any

from finetune.recipe.schema import EvalSection
from finetune.tasks.generative import GenerationTask, Rewards


class CopywritingTask(GenerationTask):
    name = "copywriting"
    required_fields = ("prompt", "completion")
    reference_fields = ("completion",)
    metric_names = ("rouge1", "rouge2", "rougeL", "bleu", "distinct_2", "mean_length")

    def main_metric(self, settings: EvalSection) -> str:
        return "rougeL"

    reward_fields = ("completion",)

    def rewards(self, rows: list[dict], settings: EvalSection) -> Rewards:
        """ROUGE-L F-measure against the row's reference copy, as the rougeL metric scores it."""
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
        return Rewards([scorer.score(r["completion"], r["prediction"])["rougeL"].fmeasure for r in rows])

    def compute_metrics(self, rows: list[dict], settings: EvalSection | None = None) -> dict[str, Any]:
        return {
            "metrics": text_metrics([r["prediction"] for r in rows], [r["completion"] for r in rows]),
            "details": {},
        }


def text_metrics(predictions: list[str], references: list[str]) -> dict[str, float]:
    """ROUGE-1/2/L (rouge-score F-measure, stemmed, mean over rows), corpus BLEU / 100, distinct-2, mean length.

    `mean_length` is in words per prediction: the one metric here that is not a fraction.
    """
    import sacrebleu
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for prediction, reference in zip(predictions, references):
        scores = scorer.score(reference, prediction)  # (target, prediction)
        for name in totals:
            totals[name] += scores[name].fmeasure
    count = max(len(predictions), 1)
    metrics = {name: value / count for name, value in totals.items()}
    metrics["bleu"] = sacrebleu.corpus_bleu(predictions, [references]).score / 100
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
