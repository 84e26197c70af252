"""A hybrid knowledge base's open sparse weight has one owner, `settle_retrieval`: every command opening the recipe
(run, eval RECIPE, data) goes through it and says so; a run's retriever-training miner and the settling share one
embedding of the corpus with the starting model; in a run of several processes the main one alone chooses."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from typer.testing import CliRunner

from finetune.cli import app
from finetune.data.retrieval import SPARSE_WEIGHTS, DenseIndex, WeightChoice
from finetune.data.tables import data_file_hashes
from finetune.errors import RecipeError
from finetune.flows import session
from finetune.flows.resolve import build_recipe
from finetune.outputs import rundir
from finetune.training import checkpoint
from tests.data.test_retrieval_fusion import kb_passages, kb_qa_recipe

runner = CliRunner()

NOTE = re.compile(
    r"data\.retrieval\.sparse_weight (\d\.\d+): chosen on (\d+) training questions with the starting model"
)


def _counting_choices(monkeypatch) -> list[float]:
    """Every weight the owner chooses (choose_sparse_weight as settle_retrieval calls it), in order."""
    chosen: list[float] = []
    choose = session.choose_sparse_weight

    def counted(retriever, rows):
        choice = choose(retriever, rows)
        chosen.append(choice.weight)
        return choice

    monkeypatch.setattr(session, "choose_sparse_weight", counted)
    return chosen


def _notes(output: str) -> list[tuple[float, int]]:
    return [(float(w), int(n)) for w, n in NOTE.findall(output)]


def test_eval_data_and_run_settle_the_same_weight_through_the_one_owner_and_say_so(
    monkeypatch, tiny_models, tmp_path, write_recipe
):
    """`finetune eval RECIPE`, `finetune data` and `finetune run` each choose the open weight once, through
    settle_retrieval, print the same note, and retrieve with it: eval RECIPE's passages are the run's."""
    chosen = _counting_choices(monkeypatch)
    passages, rows, kb = kb_passages(tmp_path)
    retrieval = {"method": "hybrid", "top_k": 3, "model": str(tiny_models["bert"]), "train": False}
    path = write_recipe(kb_qa_recipe(tiny_models, tmp_path, rows, kb, retrieval))

    evaluated = runner.invoke(app, ["eval", str(path), "--output", str(tmp_path / "base"), "--json"])
    assert evaluated.exit_code == 0, evaluated.output
    assert len(chosen) == 1 and _notes(evaluated.output) == [(chosen[0], 24)], evaluated.output
    json.loads(evaluated.stdout)  # the note went to stderr: stdout is the JSON document alone

    reported = runner.invoke(app, ["data", str(path), "--output", str(tmp_path / "report.json")])
    assert reported.exit_code == 0, reported.output
    assert chosen[1:] == chosen[:1] and _notes(reported.output) == [(chosen[0], 24)], reported.output

    ran = runner.invoke(app, ["run", str(path)], env={"COLUMNS": "400"})
    assert ran.exit_code == 0, ran.output
    assert chosen[2:] == chosen[:1] and _notes(ran.output) == [(chosen[0], 24)], ran.output
    saved = yaml.safe_load((tmp_path / "run" / "recipe.yaml").read_text())["data"]["retrieval"]
    assert saved["sparse_weight"] == chosen[0] and chosen[0] in SPARSE_WEIGHTS
    # The weight reached the retriever at construction: eval RECIPE retrieved what the run's evaluation did.
    base = [json.loads(x) for x in (tmp_path / "base" / "predictions.jsonl").read_text().splitlines()]
    trained = [json.loads(x) for x in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()]
    assert [r["passage_ids"] for r in base] == [r["passage_ids"] for r in trained]
    assert len(chosen) == 3  # `finetune eval RUN` reads the recorded weight: nothing is chosen again
    again = runner.invoke(app, ["eval", str(tmp_path / "run"), "--output", str(tmp_path / "again")])
    assert again.exit_code == 0 and len(chosen) == 3 and not _notes(again.output), again.output


def test_the_starting_model_embeds_the_corpus_once_for_the_weight_and_the_miner(
    monkeypatch, tiny_models, tmp_path, write_recipe
):
    """A run that trains its retriever: the weight is settled with the starting retriever pooled as the retriever's
    own run pools it, so that run's hard-negative miner finds the corpus embedded (one cache key). The corpus is
    embedded twice in all: once with the starting model, once with the trained retriever the reader uses."""
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))  # nothing embedded by another test
    passages, rows, kb = kb_passages(tmp_path)
    corpus = [p["text"] for p in passages]
    embedded: list[str] = []
    encode, embeddings = DenseIndex.encode, DenseIndex._embeddings
    encoded = {"corpus": 0}

    def counting_encode(self, texts):
        encoded["corpus"] += texts == corpus
        return encode(self, texts)

    def counting_embeddings(self, passages, model_path, source_hash):
        before = encoded["corpus"]
        vectors = embeddings(self, passages, model_path, source_hash)
        embedded.extend([model_path] * (encoded["corpus"] - before))
        return vectors

    monkeypatch.setattr(DenseIndex, "encode", counting_encode)
    monkeypatch.setattr(DenseIndex, "_embeddings", counting_embeddings)
    chosen = _counting_choices(monkeypatch)
    retrieval = {"method": "hybrid", "top_k": 3, "model": str(tiny_models["bert"]), "epochs": 1, "batch_size": 8}
    result = runner.invoke(app, ["run", str(write_recipe(kb_qa_recipe(tiny_models, tmp_path, rows, kb, retrieval)))])
    assert result.exit_code == 0, result.output
    assert len(chosen) == 1 and _notes(result.output) == [(chosen[0], 24)]
    retriever = str((tmp_path / "run" / "retriever" / "adapter").resolve())
    assert embedded == [str(tiny_models["bert"]), retriever], embedded
    assert encoded["corpus"] == 2


@pytest.mark.parametrize("main", [True, False])
def test_in_a_run_of_several_processes_the_main_one_alone_chooses(main, monkeypatch, tiny_models, tmp_path, capsys):
    """The main process reads, embeds, chooses and says so; the others read and embed nothing and take the weight
    broadcast from it (accelerate's broadcast_object_list, replaced here by what it returns on each side)."""
    passages, rows, kb = kb_passages(tmp_path)
    retrieval = {"method": "hybrid", "top_k": 3, "model": str(tiny_models["bert"]), "train": False}
    recipe = build_recipe(kb_qa_recipe(tiny_models, tmp_path, rows, kb, retrieval), "recipe")
    chosen = _counting_choices(monkeypatch)
    sent: list[list] = []
    broadcast = WeightChoice(0.4, 24, dict.fromkeys(SPARSE_WEIGHTS, 0.5))

    def broadcast_object_list(objects):
        sent.append(list(objects))
        return objects if main else [broadcast]

    monkeypatch.setattr(session, "broadcast_object_list", broadcast_object_list)
    if not main:
        monkeypatch.setattr(session, "read_rows", lambda *a, **k: pytest.fail("a process other than the main read"))
        monkeypatch.setattr(
            DenseIndex, "__init__", lambda *a, **k: pytest.fail("a process other than the main embedded")
        )
    settled = session.settle_retrieval(recipe, accelerator=SimpleNamespace(is_main_process=main, num_processes=2))
    printed = capsys.readouterr().err
    if main:
        assert len(chosen) == 1 and [s[0].weight for s in sent] == chosen
        assert settled.data.retrieval.sparse_weight == chosen[0] and _notes(printed) == [(chosen[0], 24)]
    else:
        assert chosen == [] and sent == [[None]] and not _notes(printed)
        assert settled.data.retrieval.sparse_weight == 0.4


def test_answer_from_is_no_part_of_the_resume_identity(tiny_models, tmp_path):
    """data.retrieval.answer_from only decides where the extractive reader's answer is read (its decoding), like
    eval.n_best: a checkpoint resumes under either value."""
    passages, rows, kb = kb_passages(tmp_path)
    identities = [
        rundir.resume_identity(
            build_recipe(kb_qa_recipe(tiny_models, tmp_path, rows, kb, {"answer_from": value}), "recipe"), 1
        )
        for value in ("first", "any")
    ]
    assert identities[0] == identities[1]


def test_the_knowledge_base_binds_a_resume_and_is_in_the_manifests_hashes(tiny_models, tmp_path):
    """Retrieval, the contexts the reader trains on and the retriever's mined negatives all come from the knowledge
    base: an edited one makes a checkpoint's resume inexact (refused, naming the file), as edited training rows do."""
    passages, rows, kb = kb_passages(tmp_path)
    recipe = build_recipe(kb_qa_recipe(tiny_models, tmp_path, rows, kb, {}), "recipe")
    before = rundir.resume_identity(recipe, 1)
    assert f"data file {kb}" in before and kb in data_file_hashes(recipe.data)
    Path(kb).write_text(Path(kb).read_text().replace("code00", "code99", 1))
    after = rundir.resume_identity(recipe, 1)
    assert before[f"data file {kb}"] != after[f"data file {kb}"]
    with pytest.raises(RecipeError, match="cannot resume exactly"):
        checkpoint.check_identity(before, after, force=False)
    # A checkpoint from before the knowledge base was hashed: its hash is unknown, not changed.
    older = {k: v for k, v in before.items() if k != f"data file {kb}"}
    assert checkpoint.check_identity(older, after, force=False) == []
    # A first-stage retriever replaced under the same path (a reranker's candidates, a reader's contexts) binds too.
    first = tmp_path / "first-stage"
    shutil.copytree(tiny_models["bert"], first)
    staged = build_recipe(kb_qa_recipe(tiny_models, tmp_path, rows, kb, {"model": str(first)}), "recipe")
    then = rundir.resume_identity(staged, 1)
    (first / "config.json").write_text((first / "config.json").read_text() + " ")
    with pytest.raises(RecipeError, match=f"model files {first}"):
        checkpoint.check_identity(then, rundir.resume_identity(staged, 1), force=False)
