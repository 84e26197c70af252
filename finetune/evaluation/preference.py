"""Preference metrics from prediction rows: what the policy's implicit reward says about judged answers.

Each evaluated pair row carries `chosen_reward` and `rejected_reward` (DPO, KTO: beta x the log-ratio to the
reference policy; ORPO: beta x the mean token log-probability) and the two answers' log-probabilities; each thumb
row (KTO) its `reward` and `desirable`. Pure functions of the rows, so a saved predictions.jsonl re-scores to the
same numbers.
"""

from __future__ import annotations

PREFERENCE_METRICS = ("preference_accuracy", "reward_margin", "logps_chosen", "logps_rejected")


def has_preferences(rows: list[dict]) -> bool:
    return bool(rows) and ("chosen_reward" in rows[0] or ("reward" in rows[0] and "desirable" in rows[0]))


def preference_metrics(rows: list[dict]) -> dict[str, float]:
    """Pairs: the share where the chosen answer's reward is higher (ties count as wrong, as in TRL), the mean
    margin and mean log-probabilities. Thumbs: the share whose reward has the label's sign, and the gap between
    the desirable and the undesirable rows' mean rewards."""
    # One entry per judged row: a row generated several times (eval.num_samples) is judged once.
    judged = [row for row in rows if row.get("sample", 0) == 0]
    if "chosen_reward" in judged[0]:
        n = len(judged)
        return {
            "preference_accuracy": sum(r["chosen_reward"] > r["rejected_reward"] for r in judged) / n,
            "reward_margin": sum(r["chosen_reward"] - r["rejected_reward"] for r in judged) / n,
            "logps_chosen": sum(r["chosen_logps"] for r in judged) / n,
            "logps_rejected": sum(r["rejected_logps"] for r in judged) / n,
        }
    good = [r["reward"] for r in judged if r["desirable"]]
    bad = [r["reward"] for r in judged if not r["desirable"]]
    right = sum(x > 0 for x in good) + sum(x < 0 for x in bad)
    metrics = {"preference_accuracy": right / len(judged)}
    if good and bad:
        metrics["reward_margin"] = sum(good) / len(good) - sum(bad) / len(bad)
    return metrics
