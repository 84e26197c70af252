"""A bi-encoder's texts are cut at the checkpoint's own max_seq_length where it is below data.max_length: in
training, in evaluation, and in the sentence-transformers files of the saved retriever, so the library encodes the
trained retriever exactly as the run scored it."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from finetune.cli import app
from finetune.models.embedding import EmbeddingLayout, embedding_layout
from finetune.models.families import FAMILIES
from tests.tasks.test_retrieval import _corpus, _recipe

runner = CliRunner()
# Below the passages' token counts (five words and the two special tokens) and far below data.max_length (32).
WIDTH = 5


@pytest.fixture()
def capped_model(tiny_models, tmp_path):
    """The tiny BERT with a sentence_bert_config.json declaring max_seq_length WIDTH."""
    directory = tmp_path / "capped"
    shutil.copytree(tiny_models["bert"], directory)
    (directory / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": WIDTH, "do_lower_case": False}))
    return directory


def test_the_layout_reads_the_checkpoints_max_seq_length(capped_model, tiny_models):
    layout = embedding_layout(str(capped_model), FAMILIES["bert"], "auto", "data.retrieval.pooling")
    assert layout.max_seq_length == WIDTH and layout.width(32) == WIDTH and layout.width(3) == 3
    plain = embedding_layout(str(tiny_models["bert"]), FAMILIES["bert"], "mean", "data.retrieval.pooling")
    assert plain.max_seq_length is None and plain.width(32) == 32
    # A state written before the width was recorded reads back as uncapped.
    assert EmbeddingLayout("mean", True, "cosine", "old").width(32) == 32


def test_training_evaluation_and_the_saved_retriever_cut_at_the_checkpoints_width(capped_model, tmp_path, write_recipe):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator

    passages, queries = _corpus()
    result = runner.invoke(app, ["run", str(write_recipe(_recipe(capped_model, tmp_path, queries, passages)))])
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    report = json.loads((run / "data_report.json").read_text())["splits"]["train"]
    assert any(f"cut at {WIDTH} tokens" in note for note in report["notes"])
    assert report["truncated"] > 0  # the passages are longer than WIDTH: the cap did cut
    saved = json.loads((run / "adapter" / "sentence_bert_config.json").read_text())
    assert saved["max_seq_length"] == WIDTH

    metrics = json.loads((run / "metrics.json").read_text())["metrics"]
    rows = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    corpus = {p["id"]: p["text"] for p in passages}
    evaluator = InformationRetrievalEvaluator(
        {str(i): r["query"] for i, r in enumerate(rows)},
        corpus,
        {str(i): set(r["relevant_ids"]) for i, r in enumerate(rows)},
        write_csv=False,
    )
    model = SentenceTransformer(str(run / "adapter"), device="cpu")
    assert model.max_seq_length == WIDTH
    theirs = evaluator(model)
    for name in ("ndcg@10", "recall@5", "mrr@10", "map@100"):
        assert metrics[name] == pytest.approx(theirs[f"cosine_{name}"], abs=1e-9), name
    # The run's scores are the library's at WIDTH, and not what the passages give uncut (the check can fail).
    query = model.encode([rows[0]["query"]], convert_to_tensor=True)
    best = model.encode([corpus[rows[0]["passage_ids"][0]]], convert_to_tensor=True)
    assert float(model.similarity(query, best)) == pytest.approx(rows[0]["scores"][0], abs=1e-5)
    model.max_seq_length = 32
    uncut = model.encode([corpus[rows[0]["passage_ids"][0]]], convert_to_tensor=True)
    assert float(model.similarity(query, uncut)) != pytest.approx(rows[0]["scores"][0], abs=1e-3)


def test_reader_windows_over_retrieved_passages_advance_by_at_least_half_their_room(tiny_models):
    """Knowledge-base contexts are several passages long: one training answer nearly a window long must not make
    the windows crawl (the derived overlap stops at half a window's room); short answers keep SQuAD's overlap."""
    from finetune.flows.resolve import build_recipe
    from finetune.models.references import load_tokenizer
    from finetune.tasks import qa_spans
    from finetune.tasks.qa import SQUAD_DOC_STRIDE, span_settings

    tokenizer = load_tokenizer(str(tiny_models["bert"]), "bert")
    words = ["rain", "sun", "cloud", "storm", "wind", "snow", "forecast", "cold", "warm", "temperature"]
    recipe = build_recipe(
        {
            "task": "qa",
            "model": {"name_or_path": "m"},
            "data": {"train": "t.jsonl", "eval": "e.jsonl", "max_length": 128},
        }
    )
    question = "which word?"
    room = 128 - len(tokenizer(question, add_special_tokens=False)["input_ids"]) - 3
    long_answer = " ".join(words[i % 10] for i in range(room - 10))  # nearly a window's room
    settings = span_settings([question] * 3, ["sun", "cold warm", long_answer], tokenizer, recipe)
    assert settings["doc_stride"] == room // 2
    assert any("half their room" in note for note in settings["span_notes"])
    assert any("longer than data.doc_stride" in note for note in settings["span_notes"])
    # The windows a long context is read in: bounded by about twice a reading without overlap.
    context = " ".join(words[i % 10] for i in range(20 * room))
    read = qa_spans.windows([question], [context], tokenizer, 128, settings["doc_stride"], "data.train")
    tokens = len(tokenizer(context, add_special_tokens=False)["input_ids"])
    assert len(read.input_ids) <= 2 * tokens / room + 2
    short = span_settings([question] * 2, ["sun", "cold warm"], tokenizer, recipe)
    assert short["doc_stride"] == min(SQUAD_DOC_STRIDE, room // 2)
