"""Hybrid retrieval's fusion, measured: dense alone, BM25 alone, reciprocal-rank fusion, and the convex fusion at
each sparse weight, on held-out questions; and the weight finetune chooses on the training questions.

    python bench/fusion.py --data DIR [--trained ADAPTER] [--data DIR --trained ADAPTER ...]

DIR holds passages.jsonl (id, text), train.jsonl and test.jsonl, rows either knowledge-base questions (question,
answer: relevant = every passage holding the answer) or retrieval queries (query, positive_id). --trained adds a
fine-tuned retriever (a run's adapter) beside the untrained all-MiniLM-L6-v2. Everything goes through finetune's own
Retriever and choose_sparse_weight; the result lands in bench/results/fusion-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(name, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
from datasets import Dataset  # noqa: E402

from finetune.data.retrieval import (  # noqa: E402
    DEFAULT_EMBEDDING_MODEL,
    SPARSE_WEIGHTS,
    Retriever,
    choose_sparse_weight,
    holds_answer,
    knowledge_base_hash,
    load_passages,
)
from finetune.recipe.schema import RetrievalSection  # noqa: E402


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _relevant(rows: list[dict], passages: list) -> list[set[int]]:
    index = {p.id: i for i, p in enumerate(passages)}
    if rows and "positive_id" in rows[0]:
        return [{index[r["positive_id"]]} for r in rows]
    return [{i for i, p in enumerate(passages) if holds_answer(p, r["answer"])} for r in rows]


def _scores(rankings: list[list[int]], relevant: list[set[int]]) -> dict[str, float]:
    return {
        "top1": float(np.mean([r[0] in g for r, g in zip(rankings, relevant)])),
        "recall@5": float(np.mean([bool(set(r[:5]) & g) for r, g in zip(rankings, relevant)])),
        "mrr@10": float(
            np.mean(
                [next((1 / (k + 1) for k, i in enumerate(r[:10]) if i in g), 0.0) for r, g in zip(rankings, relevant)]
            )
        ),
    }


def measure(directory: Path, model: str) -> dict:
    base = str(directory / "passages.jsonl")
    passages = load_passages(base)
    source = knowledge_base_hash(base)
    test, train = _rows(directory / "test.jsonl"), _rows(directory / "train.jsonl")
    questions = [r.get("question") or r["query"] for r in test]
    relevant = _relevant(test, passages)
    k = min(10, len(passages))

    def retriever(**settings) -> Retriever:
        return Retriever(passages, RetrievalSection(model=model, **settings), source)

    out: dict = {}
    for method in ("dense", "bm25"):
        out[method] = _scores(retriever(method=method).search(questions, k), relevant)
    out["rrf"] = _scores(retriever(method="hybrid", fusion="rrf").search(questions, k), relevant)
    hybrid = retriever(method="hybrid", sparse_weight=0.0)
    fused = hybrid.fused_rankings(questions, SPARSE_WEIGHTS, k)
    for w in SPARSE_WEIGHTS:
        out[f"convex w={w}"] = _scores(fused[w], relevant)
    if train:  # the weight a run would choose; a retrieval row's answer is its positive passage's text
        text = {p.id: p.text for p in passages}
        asked = [
            {"question": r.get("question") or r["query"], "answer": r.get("answer") or text[r["positive_id"]]}
            for r in train
        ]
        choice = choose_sparse_weight(hybrid, Dataset.from_list(asked))
        out["chosen_on_training_questions"] = {"weight": choice.weight, "mrr@10_by_weight": choice.mrr}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", action="append", required=True, help="a data directory (repeatable)")
    parser.add_argument(
        "--trained", action="append", default=[], help="a trained retriever for the --data at its place"
    )
    options = parser.parse_args()
    result = {}
    for number, directory in enumerate(options.data):
        models = {"untrained": DEFAULT_EMBEDDING_MODEL}
        if number < len(options.trained) and options.trained[number]:
            models["trained"] = options.trained[number]
        result[directory] = {name: measure(Path(directory), model) for name, model in models.items()}
        for name, table in result[directory].items():
            for row, values in table.items():
                if "top1" in values:
                    print(
                        f"{Path(directory).name:12s} {name:9s} {row:14s} "
                        + "  ".join(f"{m} {v:.3f}" for m, v in values.items())
                    )
            if "chosen_on_training_questions" in table:
                print(
                    f"{Path(directory).name:12s} {name:9s} chosen weight {table['chosen_on_training_questions']['weight']}"
                )
    out = REPO / "bench" / "results" / f"fusion-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
