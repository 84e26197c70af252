"""task: rerank: the fused score (the first stage's similarity at its training scale plus the cross-encoder's
output) and the reranker's starting point."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from finetune.cli import app
from tests.tasks.test_retrieval import _corpus, _first_stage, _rerank_recipe

runner = CliRunner()


def test_an_untrained_reranker_ranks_exactly_as_its_first_stage(tiny_models, tmp_path, write_recipe):
    """`finetune eval RECIPE` (the reranker as it starts, no training): the head's output layer starts at zero, so
    every correction is 0 and the candidates keep the first stage's order, scored by its similarity x 1/temperature.
    A head drawn at random (transformers' default for the missing one-output layer) shifts the scores."""
    passages, queries = _corpus()
    recipe = _rerank_recipe(
        tiny_models["bert"], tmp_path, queries, passages, candidates=6, hard_negatives=1, temperature=0.1
    )
    out = tmp_path / "untrained"
    result = runner.invoke(app, ["eval", str(write_recipe(recipe)), "--output", str(out)])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    first = _first_stage(tiny_models["bert"], tmp_path, passages)
    found, similarity = first.search_scored([r["query"] for r in rows], 6)
    for row, indices, values in zip(rows, found, similarity):
        assert row["passage_ids"][:6] == [passages[i]["id"] for i in indices]
        assert row["scores"][:6] == pytest.approx([10.0 * v for v in values], abs=1e-6)


def test_the_fused_loss_adds_the_output_to_the_scaled_similarity(tiny_models):
    """FusedRanker's loss is the listwise cross-entropy of similarity / temperature + the cross-encoder's output
    over each group, the positive first."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from finetune.tasks.rerank import FusedRanker, GroupCollator

    torch.manual_seed(0)
    scorer = AutoModelForSequenceClassification.from_pretrained(str(tiny_models["bert"]), num_labels=1).eval()
    with torch.no_grad():  # the tiny model's pairs pool alike: a large head makes their outputs differ by ~0.1
        scorer.classifier.weight.normal_(0.0, 300.0)
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_models["bert"]))
    groups = [
        [("rain sun", "cold snow"), ("rain sun", "match goal"), ("rain sun", "oven salt")],
        [("oven salt", "wind storm"), ("oven salt", "team win"), ("oven salt", "rain sun")],
    ]
    similarity = torch.tensor([[0.5, 0.45, 0.1], [0.3, 0.6, 0.2]])
    features = []
    for row, group in zip(similarity.tolist(), groups):
        encoded = tokenizer([q for q, _ in group], [p for _, p in group])
        features.append({**{k: encoded[k] for k in ("input_ids", "attention_mask")}, "first_stage": row})
    batch = GroupCollator(tokenizer, None)(features)
    with torch.no_grad():
        loss = float(FusedRanker(scorer, 20.0)(**batch).loss)
        own = scorer(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.view(2, 3)
    labels = torch.zeros(2, dtype=torch.long)
    expected = float(torch.nn.functional.cross_entropy(20.0 * similarity + own, labels))
    scaled_too = float(torch.nn.functional.cross_entropy(20.0 * (similarity + own), labels))
    assert loss == pytest.approx(expected, abs=1e-5)
    assert abs(expected - scaled_too) > 1e-2  # the test tells the output's two possible places apart


def test_a_fresh_head_starts_at_zero_and_a_cross_encoders_own_head_is_kept(tiny_models, tmp_path):
    """The one-output layer is zeroed only where the checkpoint has none (a bi-encoder or plain encoder); a
    checkpoint saved as a sequence classifier (a cross-encoder) keeps the head it was trained with."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from finetune.models.families import FAMILIES
    from finetune.tasks.rerank import RerankTask

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_models["bert"]))
    fresh = AutoModelForSequenceClassification.from_pretrained(str(tiny_models["bert"]), num_labels=1)
    assert fresh.classifier.weight.abs().sum() > 0  # transformers drew it
    RerankTask().prepare_model(fresh, tokenizer, FAMILIES["bert"])
    assert fresh.classifier.weight.abs().sum() == 0 and fresh.classifier.bias.abs().sum() == 0
    with torch.no_grad():
        fresh.classifier.weight.normal_()  # "trained"
    fresh.save_pretrained(tmp_path / "cross-encoder")
    trained = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "cross-encoder"), num_labels=1)
    RerankTask().prepare_model(trained, tokenizer, FAMILIES["bert"])
    assert torch.equal(trained.classifier.weight, fresh.classifier.weight)
