"""IR metrics equal sentence-transformers' InformationRetrievalEvaluator, ranking and ties included."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from finetune.evaluation.retrieval import ir_metrics, rank

sentence_transformers = pytest.importorskip("sentence_transformers")
from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator  # noqa: E402
from sentence_transformers.util import cos_sim  # noqa: E402


class FixedEmbeddings:
    """What the evaluator asks of a model, answering with given vectors (so both sides rank the same floats)."""

    similarity_fn_name = "cosine"

    def __init__(self, queries: dict[str, torch.Tensor], passages: dict[str, torch.Tensor]):
        self.vectors = {**queries, **passages}
        self.model_card_data = SimpleNamespace(set_evaluation_metrics=lambda *a, **k: None)

    def similarity(self, a, b):
        return cos_sim(a, b)

    def _encode(self, texts, **_):
        return torch.stack([self.vectors[t] for t in texts])

    encode_query = encode_document = _encode


def _case(seed: int, queries: int = 40, passages: int = 300, dim: int = 8, tied: bool = False):
    rng = np.random.default_rng(seed)
    q = torch.tensor(rng.normal(size=(queries, dim)), dtype=torch.float32)
    p = torch.tensor(rng.normal(size=(passages, dim)), dtype=torch.float32)
    if tied:  # copies of passages: exact ties that only the passage id can order
        p[1::3] = p[0:-1:3][: len(p[1::3])]
    ids = [f"p{rng.integers(10**6):06d}-{i}" for i in range(passages)]  # ids not in corpus order
    relevant = {
        f"q{i}": {ids[j] for j in rng.choice(passages, size=rng.integers(1, 4), replace=False)} for i in range(queries)
    }
    relevant["q0"] = set()  # a query with nothing relevant: skipped by both
    return q, p, ids, relevant


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("top_k", [1, 5, 20])
def test_metrics_equal_the_evaluator_to_1e9(tied, top_k):
    q, p, ids, relevant = _case(seed=top_k + tied, tied=tied)
    names = [f"q{i}" for i in range(len(q))]
    model = FixedEmbeddings(dict(zip(names, q)), dict(zip(ids, p)))
    evaluator = InformationRetrievalEvaluator(
        {n: n for n in names},
        {i: i for i in ids},
        relevant,
        precision_recall_at_k=[top_k],
        corpus_chunk_size=64,  # chunked as a large corpus would be
        write_csv=False,
    )
    reference = evaluator(model)
    ranked, scores = rank(cos_sim(q, p).numpy(), ids, max(100, top_k))
    rows = [
        {"passage_ids": r, "scores": s, "relevant_ids": sorted(relevant[n]), "top_k": top_k}
        for n, r, s in zip(names, ranked, scores)
    ]
    rows = [json.loads(json.dumps(row)) for row in rows]  # as predictions.jsonl holds them
    result = ir_metrics(rows)
    ours = result["metrics"]
    pairs = {
        "ndcg@10": "cosine_ndcg@10",
        f"recall@{top_k}": f"cosine_recall@{top_k}",
        "mrr@10": "cosine_mrr@10",
        "map@100": "cosine_map@100",
    }
    for name, theirs in pairs.items():
        assert ours[name] == pytest.approx(reference[theirs], abs=1e-9), name
    assert result["details"]["queries"] == len(names) - 1 and result["details"]["skipped_without_relevant"] == 1


def test_metrics_by_hand():
    """Two queries: relevant at rank 2 (of one relevant), and at ranks 1 and 3 (of three relevant)."""
    rows = [
        {"passage_ids": ["a", "b", "c"], "scores": [0.9, 0.8, 0.7], "relevant_ids": ["b"], "top_k": 2},
        {"passage_ids": ["x", "y", "z"], "scores": [0.9, 0.8, 0.7], "relevant_ids": ["x", "z", "w"], "top_k": 2},
    ]
    metrics = ir_metrics(rows)["metrics"]
    assert metrics["recall@2"] == pytest.approx((1 + 1 / 3) / 2)
    assert metrics["mrr@10"] == pytest.approx((1 / 2 + 1) / 2)
    ideal3 = 1 + 1 / math.log2(3) + 1 / math.log2(4)
    assert metrics["ndcg@10"] == pytest.approx(((1 / math.log2(3)) / 1 + (1 + 1 / math.log2(4)) / ideal3) / 2)
    assert metrics["map@100"] == pytest.approx((1 / 2 + (1 + 2 / 3) / 3) / 2)


def test_rank_orders_ties_by_passage_id():
    ids, scores = rank(np.array([[0.5, 0.9, 0.5, 0.5]]), ["d", "a", "c", "b"], 3)
    assert ids == [["a", "b", "c"]] and scores == [[0.9, 0.5, 0.5]]
