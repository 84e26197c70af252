"""Preference metrics from prediction rows: what the policy's implicit reward says about judged answers.

Each evaluated pair row carries `chosen_reward` and `rejected_reward` (DPO, KTO: beta x the log-ratio to the
reference policy; ORPO: beta x the mean token log-probability) and the two answers' log-probabilities; each thumb
row (KTO) its `reward` and `desirable`. Pure functions of the rows, so a saved predictions.jsonl re-scores to the
same numbers.
"""

from __future__ import annotations

import math

from finetune.errors import DataError

PREFERENCE_METRICS = ("preference_accuracy", "reward_margin", "logps_chosen", "logps_rejected")


PAIR_FIELDS = ("chosen_reward", "rejected_reward", "chosen_logps", "rejected_logps")
THUMB_FIELDS = ("reward", "desirable")


def _judged_as(row: dict) -> str | None:
    return "pairs" if "chosen_reward" in row else "thumbs" if "reward" in row and "desirable" in row else None


def _judged(rows: list[dict]) -> list[dict]:
    """One entry per judged row: a row generated several times (eval.num_samples) is judged once, on its first."""
    return [row for row in rows if row.get("sample", 0) == 0]


def has_preferences(rows: list[dict]) -> bool:
    return bool(rows) and _judged_as(rows[0]) is not None


def check_preference_rows(rows: list[dict], source: str) -> None:
    """A saved predictions.jsonl's judgements, before they are re-scored: every row judged as the first one is
    (pairs or thumbs), each reward and log-probability a finite number (a run writes a non-finite one as null),
    each thumb's `desirable` true or false. Text "false" counted as a thumb up, a text or null reward was an
    internal error, a row without the fields skipped silently."""
    judged = _judged(rows)
    if rows and not judged:
        raise DataError(f"{source}: no row with sample 0: each judged row's first sample carries its judgement")
    kind = _judged_as(judged[0]) if judged else None
    if kind is None:
        return
    fields = PAIR_FIELDS if kind == "pairs" else THUMB_FIELDS
    for number, row in enumerate(rows, start=1):
        if row.get("sample", 0) != 0:  # (numbered among all the rows: their place in the file)
            continue
        missing = [field for field in fields if field not in row]
        if missing:
            raise DataError(
                f"{source}:{number}: no {', '.join(repr(f) for f in missing)}: the rows before it are judged "
                f"{kind} ({', '.join(fields)}), every row must be"
            )
        for field in fields:
            value = row[field]
            if field == "desirable":
                if not isinstance(value, bool):
                    raise DataError(f"{source}:{number}: 'desirable' must be true or false, got {value!r}")
            elif isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise DataError(
                    f"{source}:{number}: {field!r} must be a finite number, got {value!r}"
                    + (" (a run writes a non-finite value as null: nothing to score)" if value is None else "")
                )


def preference_metrics(rows: list[dict]) -> dict[str, float]:
    """Pairs: the share where the chosen answer's reward is higher (ties count as wrong, as in TRL), the mean
    margin and mean log-probabilities. Thumbs: the share whose reward has the label's sign, and the gap between
    the desirable and the undesirable rows' mean rewards."""
    judged = _judged(rows)
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
