"""How `finetune eval` batches generation: rows from free memory unless eval.batch_size sets them, the same text
either way."""

from __future__ import annotations

import json

from finetune.tasks import text2text
from tests.conftest import write_jsonl
from tests.helpers import invoke
from tests.tasks.test_generation import copy_rows, generation_recipe


def _batches(monkeypatch) -> list[int]:
    """The number of rows of every batch the decoder is given."""
    seen: list[int] = []
    decode = text2text.Decoder.__call__

    def counted(self, prompts):
        seen.append(len(prompts))
        return decode(self, prompts)

    monkeypatch.setattr(text2text.Decoder, "__call__", counted)
    return seen


def test_eval_generates_in_batches_from_memory_unless_eval_batch_size_sets_them(
    tiny_models, tmp_path, write_recipe, monkeypatch
):
    """With eval.batch_size unset the 12 eval prompts are decoded together (they fit in memory), not in the eval
    loss's batches of 2 x train.batch_size; eval.batch_size=5 gives batches of 5, 5 and 2. The answers and the
    metrics are the same."""
    rows = copy_rows(40)
    data = {"train": write_jsonl(tmp_path / "t.jsonl", rows[:28]), "eval": write_jsonl(tmp_path / "e.jsonl", rows[28:])}
    recipe = write_recipe(
        generation_recipe("copywriting", tiny_models["llama"], data, tmp_path / "run", train={"batch_size": 2})
    )
    seen = _batches(monkeypatch)
    documents, answers = [], []
    for number, extra in enumerate(([], ["eval.batch_size=5"])):
        out = tmp_path / f"eval-{number}"
        result = invoke("eval", recipe, *extra, "--output", out, "--json")
        assert result.exit_code == 0, result.output
        documents.append(json.loads((out / "metrics.json").read_text())["metrics"])
        answers.append(
            [json.loads(line)["prediction"] for line in (out / "predictions.jsonl").read_text().splitlines()]
        )
    assert seen == [12, 5, 5, 2]
    assert answers[0] == answers[1] and len(answers[0]) == 12
    assert documents[0] == documents[1]


def test_the_plan_states_the_generation_batch(tiny_models, tmp_path, write_recipe):
    """The plan says how many rows the final evaluation decodes together, and who chose the number."""
    rows = copy_rows(40)
    data = {"train": write_jsonl(tmp_path / "t.jsonl", rows[:28]), "eval": write_jsonl(tmp_path / "e.jsonl", rows[28:])}
    recipe = write_recipe(generation_recipe("copywriting", tiny_models["llama"], data, tmp_path / "run"))
    chosen = invoke("run", recipe, "--dry-run", env={"COLUMNS": "400"})
    assert chosen.exit_code == 0, chosen.output
    line = next(line for line in chosen.output.splitlines() if "rows per batch" in line)
    assert "generation" in line and text2text.MEMORY_CHOICE in line
    # The 12 eval rows, not the memory's own figure (a million rows per batch for 8 rows read as a bug).
    assert "12 rows per batch (every row at once" in line, line
    fixed = invoke("run", recipe, "eval.batch_size=3", "--dry-run", env={"COLUMNS": "400"})
    assert "3 rows per batch (eval.batch_size)" in fixed.output


def test_only_greedy_decoding_sizes_its_batches_from_memory():
    """Sampled tokens come from one generator over a batch, so a sampled evaluation keeps the recipe's fixed eval
    batch (the same seed, the same answers whatever memory is free); greedy decoding takes memory's choice (None);
    eval.batch_size wins for both."""
    from finetune.recipe.schema import EvalSection

    assert text2text.decode_batch_size(EvalSection(temperature=0.0), 16) is None
    assert text2text.decode_batch_size(EvalSection(temperature=0.8, num_samples=4), 16) == 16
    assert text2text.decode_batch_size(EvalSection(temperature=0.8, batch_size=3), 16) == 3
    assert text2text.decode_batch_size(EvalSection(temperature=0.0, batch_size=3), 16) == 3


def test_the_memory_budget_is_shared_by_the_processes_of_a_node(monkeypatch):
    """Every process of a node decodes at once: each takes its share of what is free (LOCAL_WORLD_SIZE)."""
    import torch

    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    alone = text2text.free_memory(torch.device("cpu"))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    shared = text2text.free_memory(torch.device("cpu"))
    assert 0 < shared <= alone // 4 * 1.2  # free memory moves a little between the two reads
