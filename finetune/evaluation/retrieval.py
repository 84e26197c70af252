"""IR metrics of ranked passages, as sentence-transformers' InformationRetrievalEvaluator computes them.

A pure function of prediction rows, so `predictions.jsonl` re-scores to the same numbers: each row holds its
query's ranked `passage_ids` (best first, as many as the deepest metric needs), their `scores`, the query's
`relevant_ids`, and `top_k`, the k of recall@k (data.retrieval.top_k). The evaluator's own `compute_metrics`
does the arithmetic (the library BEIR-style evaluations use), so the figures are its figures: recall@k, MRR@10,
nDCG@10 (binary relevance) and MAP@100 over the whole corpus, averaged over the queries that have a relevant
passage (queries without one are skipped, as the evaluator skips them, and counted in the details).
"""

from __future__ import annotations

import math
from typing import Any

from finetune.errors import DataError

MRR_AT = 10
NDCG_AT = 10
MAP_AT = 100
# Passages kept per query: the deepest cut any metric looks at (recall@k may ask for more).
RANKED_PER_QUERY = max(MRR_AT, NDCG_AT, MAP_AT)
FIXED_METRICS = (f"ndcg@{NDCG_AT}", f"mrr@{MRR_AT}", f"map@{MAP_AT}")


def metric_names(top_k: int) -> tuple[str, ...]:
    """The metrics a retrieval evaluation reports, the main one (nDCG@10) first."""
    return (FIXED_METRICS[0], f"recall@{top_k}", *FIXED_METRICS[1:])


def ranked_depth(top_k: int) -> int:
    """How many passages each prediction row keeps."""
    return max(RANKED_PER_QUERY, top_k)


def _is_id(value: Any) -> bool:
    return isinstance(value, (str, int)) and not isinstance(value, bool)


def _where(source: str | None, number: int) -> str:
    return f"{source}:{number}" if source else f"prediction row {number}"


def check_ranked_rows(rows: list[dict], source: str | None = None) -> None:
    """Refuse (exit 3, naming the file, line and field) a ranked prediction row the metrics would misread:
    `passage_ids` a list of ids (strings or integers), none twice; `scores` a list of finite numbers, one per
    passage (the evaluator orders hits by score); `relevant_ids` a list of ids, or empty/null for a query without
    a relevant passage (skipped); `top_k` a positive integer, the same on every row (recall@k is one k). A string
    where a list belongs would be read character by character, a short `scores` would cut the ranking, and a
    repeated id would be counted twice: each gives wrong numbers, not an error, so none is accepted."""
    top_k = None
    for number, row in enumerate(rows, start=1):
        where = _where(source, number)
        ids, scores, relevant = row.get("passage_ids"), row.get("scores"), row.get("relevant_ids")
        if not isinstance(ids, list) or not all(_is_id(i) for i in ids):
            raise DataError(
                f"{where}: field passage_ids must be a list of passage ids (strings or integers), got {_shown(ids)}"
            )
        # The evaluator compares ids as strings, so 7 and "7" are the same passage.
        seen: set[str] = set()
        for i in ids:
            if str(i) in seen:
                raise DataError(f"{where}: field passage_ids ranks passage {i!r} twice; each passage appears once")
            seen.add(str(i))
        if not isinstance(scores, list) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in scores
        ):
            raise DataError(f"{where}: field scores must be a list of finite numbers, got {_shown(scores)}")
        if len(scores) != len(ids):
            raise DataError(
                f"{where}: field scores has {len(scores)} values for {len(ids)} passage_ids; give one score per passage"
            )
        if relevant is not None and (not isinstance(relevant, list) or not all(_is_id(i) for i in relevant)):
            raise DataError(
                f"{where}: field relevant_ids must be a list of passage ids (strings or integers), or empty for a "
                f"query without a relevant passage, got {_shown(relevant)}"
            )
        k = row.get("top_k")
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise DataError(f"{where}: field top_k must be a positive integer (the k of recall@k), got {_shown(k)}")
        if top_k is not None and k != top_k:
            raise DataError(f"{where}: field top_k is {k}, the rows before it {top_k}; recall@k takes one k")
        top_k = k


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def ir_metrics(rows: list[dict]) -> dict[str, Any]:
    """{"metrics": {recall@k, mrr@10, ndcg@10, map@100}, "details": {...}} from ranked prediction rows (checked
    first: check_ranked_rows)."""
    check_ranked_rows(rows)
    from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator

    top_k = rows[0]["top_k"] if rows else 1
    judged = [row for row in rows if row.get("relevant_ids")]
    names = metric_names(top_k)
    if not judged:
        return {"metrics": dict.fromkeys(names, 0.0), "details": {"queries": 0, "skipped_without_relevant": len(rows)}}
    queries: dict[str, Any] = {str(number): "" for number in range(len(judged))}
    relevant = {str(number): {str(i) for i in row["relevant_ids"]} for number, row in enumerate(judged)}
    evaluator = InformationRetrievalEvaluator(
        queries=queries,
        corpus={},
        relevant_docs=relevant,
        mrr_at_k=[MRR_AT],
        ndcg_at_k=[NDCG_AT],
        accuracy_at_k=[1],
        precision_recall_at_k=[top_k],
        map_at_k=[MAP_AT],
        write_csv=False,
    )
    hits: list[Any] = [
        [
            {"corpus_id": str(passage), "score": float(score)}
            for passage, score in zip(row["passage_ids"], row["scores"])
        ]
        for row in judged
    ]
    scores = evaluator.compute_metrics(hits)
    metrics = {
        f"ndcg@{NDCG_AT}": float(scores["ndcg@k"][NDCG_AT]),
        f"recall@{top_k}": float(scores["recall@k"][top_k]),
        f"mrr@{MRR_AT}": float(scores["mrr@k"][MRR_AT]),
        f"map@{MAP_AT}": float(scores["map@k"][MAP_AT]),
    }
    details: dict[str, Any] = {
        "queries": len(judged),
        "accuracy@1": float(scores["accuracy@k"][1]),
        f"precision@{top_k}": float(scores["precision@k"][top_k]),
    }
    if len(judged) < len(rows):
        details["skipped_without_relevant"] = len(rows) - len(judged)
    return {"metrics": metrics, "details": details}


def rank(scores: Any, passage_ids: list[str], depth: int) -> tuple[list[list[str]], list[list[float]]]:
    """Each query's best `depth` passages and their scores from a (queries x passages) score matrix, ordered as the
    evaluator orders hits: by descending score, ties by ascending passage id (so the order never depends on how
    the corpus was chunked or sorted)."""
    import numpy as np

    scores = np.asarray(scores, dtype=np.float64)
    depth = min(depth, scores.shape[1])
    order_of_id = np.empty(len(passage_ids), dtype=np.int64)
    order_of_id[np.argsort(np.array(passage_ids, dtype=object), kind="stable")] = np.arange(len(passage_ids))
    ranked_ids, ranked_scores = [], []
    for row in scores:
        # Candidates: everything scoring at least the depth-th best score (ties at the cut included), then sorted.
        cut = np.partition(row, -depth)[-depth] if depth < len(row) else row.min()
        candidates = np.flatnonzero(row >= cut)
        chosen = candidates[np.lexsort((order_of_id[candidates], -row[candidates]))][:depth]
        ranked_ids.append([passage_ids[i] for i in chosen])
        ranked_scores.append([float(row[i]) for i in chosen])
    return ranked_ids, ranked_scores
