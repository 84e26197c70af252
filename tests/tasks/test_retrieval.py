"""task: retrieval (a bi-encoder over data.knowledge_base) and knowledge-base qa that trains its retriever first."""

from __future__ import annotations

import itertools
import json
import random

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from finetune.cli import app
from finetune.data.retrieval import (
    DenseIndex,
    Passage,
    attach_passages,
    knowledge_base_hash,
    mine_negatives,
    relevant_passages,
)
from finetune.evaluation.retrieval import ir_metrics
from finetune.recipe.schema import RetrievalSection
from tests.conftest import WORDS, write_jsonl
from tests.data.test_retrieval_fusion import kb_qa_recipe

runner = CliRunner()

VOCAB = [word for words in WORDS.values() for word in words.split()]


def _corpus(n: int = 36, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Passages of in-vocabulary words, no two alike, and a query per passage made of some of its words."""
    rng = random.Random(seed)
    combos = list(itertools.combinations(VOCAB, 5))
    rng.shuffle(combos)
    passages, queries = [], []
    for i, words in enumerate(combos[:n]):
        passages.append({"id": f"doc-{i:03d}", "text": " ".join(words)})
        queries.append({"query": " ".join(rng.sample(words, 3)), "positive_id": f"doc-{i:03d}"})
    return passages, queries


def _recipe(model_dir, tmp_path, queries, passages, **data) -> dict:
    return {
        "task": "retrieval",
        "model": {"name_or_path": str(model_dir)},
        "data": {
            "train": str(write_jsonl(tmp_path / "train.jsonl", queries[:28])),
            "eval": str(write_jsonl(tmp_path / "eval.jsonl", queries[28:])),
            "knowledge_base": str(write_jsonl(tmp_path / "passages.jsonl", passages)),
            "max_length": 32,
            **data,
        },
        "lora": {"r": 4, "alpha": 8},
        "train": {"epochs": 2, "batch_size": 8, "lr": 5e-3, "seed": 0, "precision": "fp32"},
        "output": {"dir": str(tmp_path / "run")},
    }


def _rerank_recipe(model_dir, tmp_path, queries, passages, **retrieval) -> dict:
    """`task: rerank` on the `_recipe` rows, its first stage the same checkpoint, with these data.retrieval settings."""
    recipe = _recipe(model_dir, tmp_path, queries, passages)
    recipe["task"] = "rerank"
    recipe["data"]["retrieval"] = {"model": str(model_dir), **retrieval}
    return recipe


def _first_stage(model_dir, tmp_path, passages) -> DenseIndex:
    """The rerank recipe's first stage as it ranks on its own: the checkpoint's embeddings of `_recipe`'s corpus."""
    return DenseIndex(
        [Passage(p["id"], p["text"]) for p in passages],
        str(model_dir),
        knowledge_base_hash(str(tmp_path / "passages.jsonl")),
    )


def test_retrieval_end_to_end_equals_sentence_transformers(tiny_models, tmp_path, write_recipe):
    """Train, then: metrics.json recomputes from predictions.jsonl, SentenceTransformer(RUN/adapter) loads the
    trained retriever with the same embeddings, and its InformationRetrievalEvaluator reports the same metrics."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator

    passages, queries = _corpus()
    result = runner.invoke(app, ["run", str(write_recipe(_recipe(tiny_models["bert"], tmp_path, queries, passages)))])
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    document = json.loads((run / "metrics.json").read_text())
    metrics = document["metrics"]
    assert set(metrics) == {"ndcg@10", "recall@5", "mrr@10", "map@100", "eval_loss"}
    rows = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    ids = {p["id"] for p in passages}
    for row in rows:
        assert len(row["passage_ids"]) == len(passages) and set(row["passage_ids"]) == ids  # the whole corpus
        assert row["scores"] == sorted(row["scores"], reverse=True) and row["relevant_ids"] == [row["positive_id"]]
    recomputed = ir_metrics(rows)["metrics"]
    assert all(recomputed[name] == pytest.approx(value, abs=1e-12) for name, value in recomputed.items())
    assert {k: metrics[k] for k in recomputed} == pytest.approx(recomputed, abs=1e-12)
    rescored = runner.invoke(
        app, ["eval", "--predictions", str(run / "predictions.jsonl"), "--task", "retrieval", "--json"]
    )
    assert rescored.exit_code == 0, rescored.output
    assert json.loads(rescored.stdout)["metrics"] == pytest.approx(recomputed, abs=1e-12)

    model = SentenceTransformer(str(run / "adapter"), device="cpu")
    evaluator = InformationRetrievalEvaluator(
        {str(i): r["query"] for i, r in enumerate(rows)},
        {p["id"]: p["text"] for p in passages},
        {str(i): set(r["relevant_ids"]) for i, r in enumerate(rows)},
        write_csv=False,
    )
    theirs = evaluator(model)
    for name in ("ndcg@10", "recall@5", "mrr@10", "map@100"):
        assert metrics[name] == pytest.approx(theirs[f"cosine_{name}"], abs=1e-9), name
    # The library's embeddings of the saved retriever are the run's own scores.
    query = model.encode([rows[0]["query"]], convert_to_tensor=True)
    best = model.encode([{p["id"]: p["text"] for p in passages}[rows[0]["passage_ids"][0]]], convert_to_tensor=True)
    assert float(model.similarity(query, best)) == pytest.approx(rows[0]["scores"][0], abs=1e-5)
    adapter = run / "adapter"
    assert f'`SentenceTransformer("{adapter}")`' in (run / "README.md").read_text()  # the card says so
    data_report = json.loads((run / "data_report.json").read_text())
    assert any("negative(s) per row" in note for note in data_report["splits"]["train"].get("notes", []))

    found = runner.invoke(
        app, ["predict", str(run), "--input", "-"], input=json.dumps({"id": "x", "query": rows[0]["query"]}) + "\n"
    )
    assert found.exit_code == 0, found.output
    answer = json.loads(found.stdout)
    assert answer["id"] == "x" and answer["passage_ids"][:3] == rows[0]["passage_ids"][:3]
    # An empty query would rank the corpus by nothing and look like an answer: refused at its line.
    empty = runner.invoke(
        app, ["predict", str(run), "--input", "-"], input=json.dumps({"query": "q"}) + "\n" + '{"query": " "}\n'
    )
    assert empty.exit_code == 3 and "stdin:2" in empty.output and "'query' must be non-empty" in empty.output
    # --knowledge-base: that corpus is searched instead of the run's own (it was ignored).
    other = write_jsonl(tmp_path / "other.jsonl", passages[5:9])
    elsewhere = runner.invoke(
        app,
        ["predict", str(run), "--input", "-", "--knowledge-base", str(other)],
        input=json.dumps({"query": "q"}) + "\n",
    )
    assert elsewhere.exit_code == 0, elsewhere.output
    assert sorted(json.loads(elsewhere.stdout)["passage_ids"]) == sorted(p["id"] for p in passages[5:9])
    # A retrieval run is not merged into a transformers or GGUF checkpoint: its adapter is the model.
    for command in (["merge", str(run), "--output", str(tmp_path / "m")], ["export", str(run), "--output", "m.gguf"]):
        refused = runner.invoke(app, command)
        assert refused.exit_code == 2 and "sentence-transformers model" in refused.output, refused.output


def test_the_plan_names_the_loss_and_what_the_corpus_is(tiny_models, tmp_path, write_recipe):
    passages, queries = _corpus()
    queries[1]["positive_id"] = queries[0]["positive_id"]  # in one batch, each would be the other's negative
    result = runner.invoke(
        app, ["run", str(write_recipe(_recipe(tiny_models["bert"], tmp_path, queries, passages))), "--dry-run"]
    )
    assert result.exit_code == 0, result.output
    words = " ".join(result.output.replace("│", " ").split())
    assert "multiple-negatives ranking (InfoNCE over in-batch negatives" in words
    assert "the corpus searched" in words and "gold passage" not in words and "completions" not in words
    assert "2 rows share their positive with another row (27 distinct positives)" in words


def test_untrained_and_trained_evaluate_through_the_same_path(tiny_models, tmp_path, write_recipe):
    """`finetune eval RECIPE` scores the base model as a bi-encoder (the untrained baseline)."""
    passages, queries = _corpus()
    path = write_recipe(_recipe(tiny_models["bert"], tmp_path, queries, passages))
    result = runner.invoke(app, ["eval", str(path), "--json", "--output", str(tmp_path / "base")])
    assert result.exit_code == 0, result.output
    assert set(json.loads(result.stdout)["metrics"]) >= {"ndcg@10", "recall@5", "mrr@10", "map@100"}


@pytest.mark.parametrize(
    "change, code, words",
    [
        ("positive", 3, ["train.jsonl:1", "is the text of no passage"]),
        # a row without a query: an internal error from the miner (the rows were checked after mining)
        ("no_query", 3, ["train.jsonl:4", "field 'query' must be text, got no value"]),
        ("empty_query", 3, ["train.jsonl:4", "field 'query' must be non-empty text"]),
        # the file's column named, not the task's field it feeds (a knowledge base's questions are read as `query`)
        ("empty_mapped_query", 3, ["train.jsonl:4", "column 'q' must be non-empty text"]),
        # an id and the text of another passage: the text won silently, and predictions rewrote the id
        ("disagreeing_positive", 3, ["train.jsonl:5", "'doc-004' and the positive", "name different passages"]),
        ("unknown_id", 3, ["train.jsonl:2", "is not the id of"]),
        ("duplicate_id", 3, ["passages.jsonl): passage 2", "already the id of passage 1"]),
        ("missing_id", 3, ["passages.jsonl): passage 2 has no id"]),
        (
            "one_positive_id",
            3,
            ["data.train: all 28 rows have the same positive passage ('doc-000')", "learns nothing"],
        ),
        (
            "one_positive_empty_negatives",  # a negative column of empty lists gives none: refused as without it
            3,
            ["data.train: all 28 rows have the same positive passage ('doc-000')", "learns nothing"],
        ),
        ("negative_is_positive", 3, ["train.jsonl:3", "is the text of passage 'doc-002', which is relevant"]),
        ("empty_negative", 3, ["train.jsonl:4", "an empty negative"]),
        ("empty_corpus", 3, ["passages.jsonl", "has no rows"]),
        ("bm25", 2, ["data.retrieval.method", "use dense"]),
        ("gate_k", 2, ["recall@3 is not reported", "recall@5"]),
        ("no_corpus", 2, ["task retrieval searches a corpus"]),
    ],
)
def test_refusals_name_the_place(change, code, words, tiny_models, tmp_path, write_recipe):
    passages, queries = _corpus()
    extra: dict = {}
    if change == "positive":
        queries[0] = {"query": queries[0]["query"], "positive": "a text the corpus does not hold"}
    elif change == "unknown_id":
        queries[1]["positive_id"] = "doc-999"
    elif change == "no_query":
        del queries[3]["query"]
    elif change == "empty_query":
        queries[3]["query"] = " "
    elif change == "empty_mapped_query":
        queries = [{("q" if k == "query" else k): v for k, v in query.items()} for query in queries]
        queries[3]["q"] = " "
    elif change == "disagreeing_positive":
        queries[4]["positive"] = passages[7]["text"]
    elif change == "duplicate_id":
        passages[1]["id"] = passages[0]["id"]
    elif change == "missing_id":  # read as a duplicate id 'None' before
        passages[1]["id"] = None
    elif change.startswith("one_positive"):  # nothing to tell apart: the loss was log(batch size) at every step
        for query in queries[:28]:
            query["positive_id"] = "doc-000"
            if change.endswith("empty_negatives"):
                query["negative"] = []
        extra["retrieval"] = {"hard_negatives": 0}
    elif change in ("negative_is_positive", "empty_negative"):  # used silently as negatives before
        for query in queries[:28]:
            query["negative"] = [passages[20]["text"]]
        del queries[5]["negative"]  # a row without negatives beside rows with some: fine
        if change == "negative_is_positive":
            queries[2]["negative"] = [passages[2]["text"]]  # its own positive's text
        else:
            queries[3]["negative"] = [" "]
    recipe = _recipe(tiny_models["bert"], tmp_path, queries, passages, **extra)
    if change == "empty_corpus":
        (tmp_path / "passages.jsonl").write_text("")
    elif change == "bm25":
        recipe["data"]["retrieval"] = {"method": "bm25"}
    elif change == "gate_k":
        recipe["eval"] = {"gates": {"recall@3": ">=0.5"}}
    elif change == "no_corpus":
        del recipe["data"]["knowledge_base"]
    elif change == "empty_mapped_query":
        recipe["data"]["columns"] = {**recipe["data"].get("columns", {}), "query": "q"}
    path = write_recipe(recipe)
    result = runner.invoke(app, ["run", str(path)])
    assert result.exit_code == code, result.output
    assert all(w in result.output for w in words), result.output
    if code == 2 or change.endswith(("_id", "_corpus", "_negatives", "_positive", "_negative", "_query")):  # as run
        checked = runner.invoke(app, ["validate", str(path)])
        assert checked.exit_code == code and all(w in checked.output for w in words), checked.output
    if change == "one_positive_id":  # nothing trains when the untrained model is scored
        assert runner.invoke(app, ["eval", str(path), "--output", str(tmp_path / "e")]).exit_code == 0


def test_a_decoder_needs_its_pooling_named(tiny_models, tmp_path, write_recipe):
    """A decoder without a sentence-transformers config is refused (exit 2) until pooling is set; with
    last-token pooling it trains and its adapter loads in sentence-transformers."""
    passages, queries = _corpus()
    recipe = _recipe(tiny_models["gpt2"], tmp_path, queries, passages)
    refused = runner.invoke(app, ["validate", str(write_recipe(recipe))])
    assert refused.exit_code == 2 and "data.retrieval.pooling" in refused.output, refused.output
    recipe["data"]["retrieval"] = {"pooling": "lasttoken"}
    recipe["train"]["epochs"] = 1
    result = runner.invoke(app, ["run", str(write_recipe(recipe))])
    assert result.exit_code == 0, result.output
    assert (
        json.loads((tmp_path / "run" / "adapter" / "1_Pooling" / "config.json").read_text())["pooling_mode"]
        == "lasttoken"
    )


class _Index:
    """A DenseIndex stand-in with fixed vectors (the query is the first basis vector)."""

    def __init__(self, scores: list[float]):
        self.vectors = np.array([[s, (1 - s * s) ** 0.5] for s in scores], dtype=np.float32)

    def encode(self, texts):
        return np.array([[1.0, 0.0]] * len(texts), dtype=np.float32)


def test_mining_skips_relevant_passages_and_near_duplicates_of_the_positive():
    passages = [Passage(f"p{i}", f"text {i}") for i in range(6)] + [Passage("p6", "text 0")]
    scores = [0.80, 0.95, 0.93, 0.70, 0.60, 0.10, 0.99]  # p0 positive; p1 relevant too; p6 the positive's text
    mined, hard = mine_negatives(["q"], [["p0", "p1"]], ["text 0"], _Index(scores), passages, 2, 0.05)
    # 0.79 is within 5% of the best positive (0.95): a likely unlabelled positive; 0.70 and 0.60 are hard.
    assert mined == [["p3", "p4"]] and hard == [2]
    mined, hard = mine_negatives(["q"], [["p5"]], ["text 5"], _Index(scores), passages, 2, 0.05)
    # The positive scores lowest: nothing is safely below it, so the least similar passages fill in.
    assert hard == [0] and mined == [["p4", "p3"]]


def test_a_positive_quoting_a_titled_passage_and_integer_ids_name_their_passage(tmp_path):
    """A knowledge base with titles: a row's `positive` copied from a passage's `text` is that passage (the title,
    put first for encoding, made it 'the text of no passage'); integer ids in the rows name the corpus's ids, which
    are read as text (`positive_id: 0` was refused as not text)."""
    from datasets import Dataset

    from finetune.data.retrieval import load_passages

    kb = write_jsonl(
        tmp_path / "kb.jsonl",
        [{"id": i, "title": f"Title {i}", "text": f"body of passage {i}"} for i in range(3)],
    )
    passages = load_passages(str(kb))
    assert [p.text for p in passages][0] == "Title 0\nbody of passage 0"
    rows = Dataset.from_list(
        [{"query": "q1", "positive": "body of passage 1"}, {"query": "q2", "positive": "Title 2\nbody of passage 2"}]
    )
    assert relevant_passages(rows, passages, "data.train")["positive_id"] == ["1", "2"]
    by_int = Dataset.from_list([{"query": "q", "positive_id": 0}, {"query": "r", "positive_id": 2}])
    assert relevant_passages(by_int, passages, "data.train")["relevant_ids"] == [["0"], ["2"]]


def test_an_answer_several_passages_hold_trains_on_the_one_its_question_names():
    """A templated knowledge base repeats an answer across companies: every holder is relevant, but the positive the
    retriever trains on (and the gold passage the reader gets) is the one the question names, not the first in
    file order, which was another company's for 74 of the bundled 140 training questions."""
    from datasets import Dataset

    answer = "You can cancel within 14 days without any fee."
    passages = [Passage(f"{name.lower()}-1", f"{name}: cancelling\n{answer} Call us to do it.") for name in NAMES]
    passages.append(Passage("other", "Meter readings are due every month."))
    rows = Dataset.from_list([{"query": f"How do I cancel with {name}?", "answer": answer} for name in NAMES])
    judged = relevant_passages(rows, passages, "data.train")
    assert judged["positive_id"] == [f"{name.lower()}-1" for name in NAMES]
    assert all(sorted(ids) == sorted(p.id for p in passages[:-1]) for ids in judged["relevant_ids"])

    class Missing:  # a retriever that returns only the unrelated passage: training adds the gold one
        settings = RetrievalSection(top_k=1)
        bm25 = None

        def __init__(self):
            self.passages = passages

        def search(self, questions, k=None):
            return [[len(passages) - 1] for _ in questions]

    questions = Dataset.from_list([{"question": q, "answer": answer} for q in rows["query"]])
    attached = attach_passages(questions, Missing(), extractive=False, training=True, split="data.train")
    assert [ids[0] for ids in attached["passage_ids"]] == judged["positive_id"]


NAMES = ("Alder", "Birch", "Cedar")


def test_knowledge_base_qa_trains_its_retriever_first(tiny_models, tmp_path, write_recipe):
    """data.retrieval.train (on by default for dense retrieval): RUN/retriever is a retrieval run on the questions,
    the reader retrieves with its adapter, recipe.yaml says so, and a resumed finished run keeps it."""
    rows, passages = [], []
    for i, words in enumerate(itertools.islice(itertools.combinations(VOCAB, 6), 0, 600, 20)):
        passages.append({"id": f"p{i}", "text": " ".join(words)})
        rows.append({"question": f"{words[0]} {words[5]} which?", "answer": f"{words[2]} {words[3]}"})
    kb = str(write_jsonl(tmp_path / "passages.jsonl", passages))
    retrieval = {"top_k": 3, "model": str(tiny_models["bert"]), "epochs": 1, "batch_size": 8}
    recipe = kb_qa_recipe(tiny_models, tmp_path, rows, kb, retrieval)
    path = write_recipe(recipe)
    result = runner.invoke(app, ["run", str(path)])
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    inner = json.loads((run / "retriever" / "metrics.json").read_text())
    assert inner["task"] == "retrieval" and "ndcg@10" in inner["metrics"]
    outer = json.loads((run / "metrics.json").read_text())
    assert outer["retriever"]["metrics"] == inner["metrics"] and "retrieval_recall@k" in outer["metrics"]
    import yaml

    saved = yaml.safe_load((run / "recipe.yaml").read_text())["data"]["retrieval"]
    assert saved["model"] == str((run / "retriever" / "adapter").resolve()) and saved["train"] is False
    inner_rows = [json.loads(line) for line in (run / "retriever" / "predictions.jsonl").read_text().splitlines()]
    assert all(r["relevant_ids"] for r in inner_rows)  # each question's gold passage: the one holding its answer
    stamp = (run / "retriever" / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns
    again = runner.invoke(app, ["run", str(path), "--resume", "auto"])
    assert again.exit_code == 0, again.output
    assert "nothing to resume" in again.output
    assert (run / "retriever" / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns == stamp
    # A changed recipe is refused for a finished knowledge-base run as for any other (its metrics came back as if
    # this recipe had made them): the reader's settings, and the retriever's own.
    for change, named in (("train.lr=0.02", "lr"), ("data.retrieval.epochs=2", "epochs")):
        changed = runner.invoke(app, ["run", str(path), "--resume", "auto", change])
        assert changed.exit_code == 2 and named in changed.output, changed.output
    # The run's recipe.yaml reused (it names the trained retriever, train: false) to replace the reader alone: the
    # retriever it reads stays.
    reused = tmp_path / "again.yaml"
    reused.write_text((run / "recipe.yaml").read_text())
    assert runner.invoke(app, ["run", str(reused), "--overwrite"]).exit_code == 0
    assert (run / "retriever" / "adapter" / "adapter_model.safetensors").is_file()
    # Replaced by a run that trains no retriever (BM25): the earlier retriever's run goes with the rest, but a file
    # of the user's in it stays (with its folder); without it, the folder goes too.
    (run / "retriever" / "notes.txt").write_text("mine")
    bm25 = ["run", str(path), "--overwrite", "data.retrieval={method: bm25, top_k: 3}"]  # its training keys go
    assert runner.invoke(app, bm25).exit_code == 0
    assert [p.name for p in (run / "retriever").iterdir() if p.name != ".finetune-run"] == ["notes.txt"]
    (run / "retriever" / "notes.txt").unlink()
    assert runner.invoke(app, bm25).exit_code == 0 and not (run / "retriever").exists()


def test_bi_encoder_loss_is_sentence_transformers_mnrl(tiny_models):
    """The training loss equals MultipleNegativesRankingLoss computed by hand (InfoNCE at scale 1/temperature)."""
    from transformers import AutoModel, AutoTokenizer

    from finetune.models.embedding import BiEncoder, Embedder, EmbeddingLayout
    from finetune.recipe.schema import RetrievalSection
    from finetune.tasks.retrieval import PairCollator, ranking_loss

    encoder = AutoModel.from_pretrained(str(tiny_models["bert"]))
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_models["bert"]))
    embedder = Embedder(encoder, EmbeddingLayout("mean", True, "cosine", "test"))
    settings = RetrievalSection(temperature=0.1)
    model = BiEncoder(embedder, ranking_loss(embedder, settings))
    texts = [
        tokenizer(t)["input_ids"]
        for t in ("rain sun", "cold snow", "match goal", "oven salt", "wind storm", "team win")
    ]
    batch = PairCollator(tokenizer, None)(
        [
            {"input_ids": texts[i], "positive_input_ids": texts[i + 2], "negative_input_ids": [texts[(i + 4) % 6]]}
            for i in range(2)
        ]
    )
    loss = model(**batch).loss
    with torch.no_grad():
        q = embedder.embed(batch["input_ids"], batch["attention_mask"])
        d = embedder.embed(batch["passage_input_ids"], batch["passage_attention_mask"])
    logits = torch.nn.functional.normalize(q, dim=-1) @ torch.nn.functional.normalize(d, dim=-1).T / 0.1
    assert float(loss.detach()) == pytest.approx(
        float(torch.nn.functional.cross_entropy(logits, torch.arange(2))), abs=1e-5
    )


def test_matryoshka_adds_the_loss_of_each_truncated_size(tiny_models):
    """MatryoshkaLoss (sentence-transformers') around the ranking loss: the full size's loss plus each truncated
    size's, the truncated embeddings compared by cosine again."""
    from transformers import AutoModel, AutoTokenizer

    from finetune.models.embedding import BiEncoder, Embedder, EmbeddingLayout
    from finetune.recipe.schema import RetrievalSection
    from finetune.tasks.retrieval import PairCollator, ranking_loss

    encoder = AutoModel.from_pretrained(str(tiny_models["bert"]))
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_models["bert"]))
    embedder = Embedder(encoder, EmbeddingLayout("mean", True, "cosine", "test"))
    model = BiEncoder(embedder, ranking_loss(embedder, RetrievalSection(matryoshka_dims=[16, 8])))
    texts = [tokenizer(t)["input_ids"] for t in ("rain sun", "cold snow", "match goal", "oven salt")]
    batch = PairCollator(tokenizer, None)(
        [{"input_ids": texts[i], "positive_input_ids": texts[i + 2]} for i in range(2)]
    )
    loss = float(model(**batch).loss.detach())
    with torch.no_grad():
        q = embedder.embed(batch["input_ids"], batch["attention_mask"])
        d = embedder.embed(batch["passage_input_ids"], batch["passage_attention_mask"])

    def infonce(a, b):
        logits = torch.nn.functional.normalize(a, dim=-1) @ torch.nn.functional.normalize(b, dim=-1).T * 20
        return float(torch.nn.functional.cross_entropy(logits, torch.arange(len(a))))

    assert loss == pytest.approx(infonce(q, d) + infonce(q[:, :8], d[:, :8]), abs=1e-5)


def test_validate_checks_the_retrievers_own_run(tiny_models, tmp_path, write_recipe):
    """Knowledge-base qa that trains its retriever: validate refuses what the retriever's run would (a decoder
    retriever with no pooling), and bm25 with train: true."""
    passages, queries = _corpus()
    rows = [{"question": q["query"], "answer": passages[i]["text"].split()[2]} for i, q in enumerate(queries)]
    recipe = {
        "task": "qa",
        "model": {"name_or_path": str(tiny_models["bert"])},
        "data": {
            "train": str(write_jsonl(tmp_path / "train.jsonl", rows[:28])),
            "eval": str(write_jsonl(tmp_path / "eval.jsonl", rows[28:])),
            "knowledge_base": str(write_jsonl(tmp_path / "passages.jsonl", passages)),
            "retrieval": {"model": str(tiny_models["gpt2"])},
        },
    }
    refused = runner.invoke(app, ["validate", str(write_recipe(recipe))])
    assert refused.exit_code == 2, refused.output
    assert "the retriever's run" in refused.output and "data.retrieval.pooling" in refused.output
    recipe["data"]["retrieval"] = {"method": "bm25", "train": True}
    refused = runner.invoke(app, ["validate", str(write_recipe(recipe))])
    assert refused.exit_code == 2 and "bm25 has no weights to train" in refused.output, refused.output
    # A one-passage knowledge base: the retriever's run has nothing to rank the positive against, and refuses its
    # rows (exit 3) once it starts; validate reads them as that run does (it passed them).
    word = passages[0]["text"].split()[2]
    one = [{"question": q["query"], "answer": word} for q in queries]
    recipe["data"].update(
        train=str(write_jsonl(tmp_path / "one_train.jsonl", one[:28])),
        eval=str(write_jsonl(tmp_path / "one_eval.jsonl", one[28:])),
        knowledge_base=str(write_jsonl(tmp_path / "one.jsonl", passages[:1])),
        retrieval={},
        max_length=64,
    )
    refused = runner.invoke(app, ["validate", str(write_recipe(recipe))])
    assert refused.exit_code == 3, refused.output
    said = " ".join(refused.output.split())
    assert "(data.retrieval: the retriever's run): data.train: all 28 rows have the same positive passage" in said


def test_rerank_reorders_the_first_stages_candidates(tiny_models, tmp_path, write_recipe):
    """task rerank: a cross-encoder trained on the retrieval rows reorders the first stage's top candidates; the
    passages after them keep the first stage's order, and the metrics recompute from predictions.jsonl."""
    passages, queries = _corpus()
    recipe = _rerank_recipe(tiny_models["bert"], tmp_path, queries, passages, candidates=5, hard_negatives=2)
    recipe["data"]["max_length"] = 48
    result = runner.invoke(app, ["run", str(write_recipe(recipe))])
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    rows = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    metrics = json.loads((run / "metrics.json").read_text())["metrics"]
    assert {k: metrics[k] for k in ir_metrics(rows)["metrics"]} == pytest.approx(ir_metrics(rows)["metrics"])
    for row in rows:
        assert row["reranked"] == 5 and row["scores"] == sorted(row["scores"], reverse=True)
        assert set(row["passage_ids"]) == {p["id"] for p in passages}


def test_rerank_adds_its_correction_to_the_first_stages_scaled_similarity(
    monkeypatch, tiny_models, tmp_path, write_recipe
):
    """The candidates are ordered by the first stage's similarity x 1/temperature plus the cross-encoder's output,
    ties by passage id; the passages after them keep the first stage's order. The cross-encoder's outputs are
    replaced by known corrections (one per passage text) to check the arithmetic and the order."""
    from finetune.tasks import rerank

    def correction(text: str) -> float:
        return 0.3 * (sum(map(ord, text)) % 7)

    monkeypatch.setattr(
        rerank, "score_pairs", lambda ranker, tokenizer, pairs, recipe, accelerator: [correction(p) for _, p in pairs]
    )
    passages, queries = _corpus()
    recipe = _rerank_recipe(
        tiny_models["bert"], tmp_path, queries, passages, candidates=6, hard_negatives=1, temperature=0.1
    )
    result = runner.invoke(app, ["run", str(write_recipe(recipe)), "train.max_steps=1"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()]
    first = _first_stage(tiny_models["bert"], tmp_path, passages)
    found, similarity = first.search_scored([r["query"] for r in rows], 12)
    moved = 0
    for row, indices, values in zip(rows, found, similarity):
        fused = {passages[i]["id"]: 10.0 * v + correction(passages[i]["text"]) for i, v in zip(indices[:6], values)}
        order = sorted(fused, key=lambda name: (-fused[name], name))
        assert row["passage_ids"][:6] == order
        assert row["scores"][:6] == pytest.approx([fused[name] for name in order], abs=1e-4)
        assert row["passage_ids"][6:12] == [passages[i]["id"] for i in indices[6:12]]
        moved += order != [passages[i]["id"] for i in indices[:6]]
    assert moved  # the corrections reorder some queries' candidates


def test_a_stopped_retrieval_run_resumes_to_the_same_adapter_bytes(monkeypatch, tiny_models, tmp_path, write_recipe):
    """Exact resume: mined negatives, the data order and the ranking loss give a resumed run the bytes and losses
    of an uninterrupted one."""
    from tests.training.test_resume import adapter_bytes, log_losses
    from tests.training.test_resume_in_process import stop_at_step

    passages, queries = _corpus()
    paths = {}
    for name in ("whole", "stopped"):
        recipe = _recipe(tiny_models["bert"], tmp_path, queries, passages)
        recipe["train"].update(checkpoint_every=2, log_every=1, epochs=2)
        recipe["output"]["dir"] = str(tmp_path / name)
        paths[name] = write_recipe(recipe, f"{name}.yaml")
    assert runner.invoke(app, ["run", str(paths["whole"])]).exit_code == 0
    with monkeypatch.context() as patch:
        stop_at_step(patch, 3)
        stopped = runner.invoke(app, ["run", str(paths["stopped"])])
    assert stopped.exit_code == 75, stopped.output
    resumed = runner.invoke(app, ["run", str(paths["stopped"]), "--resume", "auto"])
    assert resumed.exit_code == 0, resumed.output
    assert adapter_bytes(tmp_path / "stopped") == adapter_bytes(tmp_path / "whole")
    assert log_losses(tmp_path / "stopped") == log_losses(tmp_path / "whole")


def test_the_passages_holding_an_answer_are_those_a_search_of_every_passage_finds():
    """AnswerHolders searches only the passages holding the answer's rarest whole word: the same passages, in the
    same order, as `holds_answer` over the whole corpus, for answers cut anywhere (mid-word ends, one or two words,
    spaces and case as the user wrote them, absent)."""
    from finetune.data.retrieval import AnswerHolders, holds_answer

    rng = random.Random(3)
    words = ["cancel", "within", "14", "days", "fee", "call", "us", "meter", "readings", "due", "month", "day"]
    passages = [Passage(f"p{i}", " ".join(rng.choice(words) for _ in range(rng.randint(3, 20)))) for i in range(300)]
    holders = AnswerHolders(passages)
    answers = []
    for _ in range(400):
        text = rng.choice(passages).text
        start = rng.randrange(len(text))
        answers.append(text[start : start + rng.randint(1, 40)])
    answers += ["  Cancel\tWITHIN 14  ", "days fee call us meter readings", "no passage holds this", "ays fee cal"]
    for answer in answers:
        assert holders.holding(answer) == [i for i, p in enumerate(passages) if holds_answer(p, answer)], answer


def test_rows_without_negatives_of_their_own_beside_rows_with_some():
    """Only some queries with labelled hard negatives (the rest null): no refusal."""
    from datasets import Dataset

    from finetune.data.retrieval import check_given_negatives

    passages = [Passage("p1", "refunds within 14 days"), Passage("p2", "shipping to 60 countries")]
    rows = Dataset.from_list(
        [
            {"query": "refunds?", "negative": ["shipping to 60 countries"], "relevant_ids": ["p1"]},
            {"query": "shipping?", "negative": None, "relevant_ids": ["p2"]},
        ]
    )
    check_given_negatives(rows, passages, "data.train")


def test_a_query_on_several_rows_has_every_positive_relevant():
    """Relevance is the query's (IR qrels): rows "when are refunds paid?" -> p1 and -> p3 each keep their own
    positive, and both count p1 and p3 relevant (so neither is mined as the other's negative, and a ranking with
    both first is perfect for both)."""
    from datasets import Dataset

    passages = [Passage(f"p{i}", f"text {i}") for i in range(1, 5)]
    rows = Dataset.from_list(
        [
            {"query": "when are refunds paid?", "positive_id": "p1"},
            {"query": "when are refunds paid?", "positive_id": "p3"},
            {"query": "shipping?", "positive_id": "p2"},
        ]
    )
    found = relevant_passages(rows, passages, "data.train")
    assert found["positive_id"] == ["p1", "p3", "p2"]
    assert found["relevant_ids"] == [["p1", "p3"], ["p1", "p3"], ["p2"]]
    ranked = [
        {
            "query": "when are refunds paid?",
            "passage_ids": ["p1", "p3", "p2", "p4"],
            "scores": [4.0, 3.0, 2.0, 1.0],
            "relevant_ids": relevant,
            "top_k": 5,
        }
        for relevant in found["relevant_ids"][:2]
    ]
    assert ir_metrics(ranked)["metrics"]["mrr@10"] == 1.0 and ir_metrics(ranked)["metrics"]["ndcg@10"] == 1.0


def test_an_answer_spaced_unlike_its_passage_is_found_where_it_is_held():
    """holds_answer ignores spacing and case; the span search did not, so a held answer was trained as 'no answer'."""
    from finetune.data.retrieval import _find, holds_answer

    context = "Refunds are paid\nwithin 14 days of cancellation."
    for answer in ("within 14 days", "Within 14 days", "within  14   days", "paid within 14"):
        start, end = _find(context, answer)
        assert holds_answer(Passage("p", context), answer) and start >= 0, answer
        assert " ".join(context[start:end].lower().split()) == " ".join(answer.lower().split())
    assert _find(context, "within 15 days") == (-1, -1)
