"""The unit tier: pure logic with no model and no run (batching, step arithmetic, the step logger, family specs,
gates). Fast: `pytest -m unit` or this file alone."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from finetune.models.families import FAMILIES, family_of_config
from finetune.recipe.gates import parse_gate
from finetune.recipe.schema import Recipe
from finetune.training.loop import LengthGroupedBatches, StepLogger, TrainPlan

pytestmark = pytest.mark.unit


def recipe(**train) -> Recipe:
    return Recipe.model_validate(
        {
            "task": "classification",
            "model": {"name_or_path": "m"},
            "data": {"train": "t.jsonl", "eval": "e.jsonl"},
            "train": train,
        }
    )


# --------------------------------------------------------------------------- LengthGroupedBatches


def test_every_index_once_per_epoch_and_reproducible():
    lengths = [i % 17 + 1 for i in range(103)]
    sampler = LengthGroupedBatches(lengths, batch_size=8, seed=3, window=4)
    batches = sampler.batches()
    assert sorted(i for b in batches for i in b) == list(range(103))
    assert len(batches) == len(sampler) == 13
    assert LengthGroupedBatches(lengths, 8, 3, 4).batches() == batches  # a pure function of (seed, epoch)
    sampler.set_epoch(1)
    assert sampler.batches() != batches  # a fresh order each epoch


def test_grouping_reduces_padding_and_window_1_does_not_sort():
    lengths = [(i * 37) % 100 + 1 for i in range(512)]

    def padding(window):
        batches = LengthGroupedBatches(lengths, 16, seed=0, window=window).batches()
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    assert padding(64) < padding(1) / 4
    batch = LengthGroupedBatches(lengths, 16, seed=0, window=64).batches()[0]
    assert [lengths[i] for i in batch] == sorted((lengths[i] for i in batch), reverse=True)


# --------------------------------------------------------------------------- TrainPlan


@pytest.mark.parametrize(
    ("examples", "train", "world", "expected"),
    [
        (100, {"batch_size": 10, "epochs": 3}, 1, (10, 10, 30)),
        (101, {"batch_size": 10, "epochs": 1, "grad_accum": 4}, 1, (11, 3, 3)),
        (100, {"batch_size": 10, "epochs": 2}, 2, (5, 5, 10)),
        (100, {"batch_size": 10, "epochs": 0.5}, 1, (10, 10, 5)),
        (100, {"batch_size": 10, "max_steps": 7}, 1, (10, 10, 7)),
    ],
)
def test_train_plan_step_arithmetic(examples, train, world, expected):
    plan = TrainPlan.build(recipe(**train).train, examples, world)
    assert (plan.batches_per_epoch, plan.steps_per_epoch, plan.total_steps) == expected


def test_warmup_fraction_steps_and_clamp():
    assert TrainPlan.build(recipe(batch_size=10, epochs=1, warmup=0.1).train, 100, 1).warmup_steps == 1
    assert TrainPlan.build(recipe(batch_size=10, epochs=1, warmup=5).train, 100, 1).warmup_steps == 5
    assert TrainPlan.build(recipe(batch_size=10, epochs=1, warmup=50).train, 100, 1).warmup_steps == 10


# --------------------------------------------------------------------------- StepLogger


class _OneProcess:
    device = torch.device("cpu")

    def reduce(self, tensor, op):
        return tensor

    def log(self, values, step):
        self.logged = (values, step)


def test_step_logger_means_over_its_window_and_resumes(tmp_path):
    path = tmp_path / "log.jsonl"
    logger = StepLogger(path, _OneProcess(), every=2)
    logger.add(torch.tensor(1.0), torch.tensor(10))
    assert logger.maybe_log(1, 0.5, 1e-3) is None
    logger.add(torch.tensor(3.0), torch.tensor(30))
    entry = logger.maybe_log(2, 1.0, 1e-3)
    assert entry["loss"] == 2.0 and entry["step"] == 2 and logger.total_tokens == 40
    # An objective's own figures (rewards, KL) are means over the window too; reason counts stay totals.
    logger.add(torch.tensor(5.0), torch.tensor(5), {"reward_mean": 0.5, "reward_reason_timeout": 1.0})
    window = logger.window_state()
    assert window == {
        "loss_sum": 5.0,
        "batches": 1.0,
        "tokens": 5,
        "stats": {"reward_mean": 0.5, "reward_reason_timeout": 1.0},
    }
    logger.maybe_log(4, 2.0, 1e-3)
    # A run resumed from the checkpoint at step 3 keeps the log up to step 3 and the unlogged window.
    resumed = StepLogger(path, _OneProcess(), every=2)
    resumed.resume(SimpleNamespace(step=3, tokens=40), window)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [2]
    resumed.add(torch.tensor(7.0), torch.tensor(5), {"reward_mean": 1.0, "reward_reason_timeout": 2.0})
    entry = resumed.maybe_log(4, 2.0, 1e-3)
    assert entry["loss"] == 6.0
    assert entry["reward_mean"] == 0.75 and entry["reward_reason_timeout"] == 3.0


# --------------------------------------------------------------------------- family specs


def test_family_specs_drive_auto_classes_peft_types_and_refusals():
    bert, bart, gpt = FAMILIES["bert"], FAMILIES["bart"], FAMILIES["gpt"]
    assert not bert.supports("generation") and bart.supports("generation") and gpt.supports("generation")
    assert bart.auto_class_name("generation") == "AutoModelForSeq2SeqLM"
    assert gpt.auto_class_name("generation") == "AutoModelForCausalLM"
    assert {f.auto_class_name("sequence_classification") for f in FAMILIES.values()} == {
        "AutoModelForSequenceClassification"
    }
    assert (bart.peft_task_type("generation"), gpt.peft_task_type("generation")) == ("SEQ_2_SEQ_LM", "CAUSAL_LM")
    assert gpt.peft_task_type("question_answering") == "QUESTION_ANS"
    assert (bert.prompt_padding, bart.prompt_padding, gpt.prompt_padding) == ("right", "right", "left")
    assert [f.name for f in FAMILIES.values() if f.packs] == ["gpt"]
    assert bart.is_cross_attention("encoder_attn") and bart.is_cross_attention("EncDecAttention")
    assert not bart.is_cross_attention("self_attn") and bart.is_attention("self_attn")
    assert not gpt.is_cross_attention("attn") and gpt.is_attention("attn") and not gpt.is_attention("mlp")


@pytest.mark.parametrize(
    ("config", "family"),
    [
        ({"model_type": "bert"}, "bert"),
        ({"model_type": "roberta"}, "bert"),
        ({"model_type": "bart", "is_encoder_decoder": True}, "bart"),
        ({"model_type": "t5", "is_encoder_decoder": True}, "bart"),
        ({"model_type": "gpt2"}, "gpt"),
        ({"model_type": "llama"}, "gpt"),
        ({"model_type": "qwen2"}, "gpt"),
        ({"model_type": "vit"}, None),
    ],
)
def test_family_of_config(config, family):
    assert family_of_config(SimpleNamespace(**config)) == family


# --------------------------------------------------------------------------- gates


@pytest.mark.parametrize(
    ("gate", "possible"),
    [
        ("accuracy>=0.9", True),
        ("accuracy>=1.5", False),
        ("accuracy>1", False),
        ("accuracy>=1", True),
        ("accuracy<=0", True),
        ("accuracy<0", False),
        ("accuracy==0.5", True),
        ("accuracy==2", False),
    ],
)
def test_gates_that_can_never_pass(gate, possible):
    assert parse_gate(gate).can_pass_within(0.0, 1.0) is possible


@pytest.mark.parametrize("gate", ["reward_margin>=2", "logps_chosen<=-10", "reward_mean>=1.5", "mean_length>=30"])
def test_gates_on_metrics_that_are_no_fraction_are_not_refused(gate):
    """A preference run's margin or log-probabilities and GRPO's weighted reward were refused as "can never pass:
    a fraction in [0, 1]"."""
    from finetune.flows.resolve import gate_problems

    assert gate_problems(parse_gate(gate), "eval.gates") == []
    assert gate_problems(parse_gate("accuracy>=1.5"), "eval.gates") != []


@pytest.mark.parametrize(
    "precision, native_bf16, expected",
    [
        ("auto", True, {"attn_implementation": "eager"}),  # bf16 on this CPU: eager (CPU flash backward is slow)
        ("bf16", True, {"attn_implementation": "eager"}),
        ("auto", False, {}),  # fp32 here: transformers' default
        ("fp32", True, {}),
    ],
)
def test_attention_implementation_follows_the_precision(monkeypatch, precision, native_bf16, expected):
    from finetune.flows import session
    from finetune.training import loop as train

    monkeypatch.setattr(train, "cpu_has_native_bf16", lambda: native_bf16)
    monkeypatch.setattr(session, "has_accelerator_device", lambda: False)
    assert session.attention_kwargs(train.resolve_precision(recipe(precision=precision).train.precision)) == expected


def test_the_generation_plan_counts_whole_prompts():
    """eval.batch_size 2 with 4 samples a prompt decodes 4 rows a batch (one prompt's samples), not the 2 said."""
    from finetune.tasks.text2text import batch_plan

    assert batch_plan(16, "eval.batch_size").startswith("16 rows per batch (eval.batch_size)")
    assert batch_plan(2, "eval.batch_size", samples=4).startswith("4 rows per batch (2 asked; a prompt's 4 samples")
    assert batch_plan(30, "memory", samples=4).startswith("28 rows per batch")


def test_a_forced_colour_pipe_gets_plain_progress_lines(monkeypatch):
    """rich reports a terminal whenever FORCE_COLOR is set (common in CI): a piped log got live redraws."""
    import io

    from rich.console import Console

    from finetune.training.loop import live_console

    monkeypatch.setenv("FORCE_COLOR", "1")
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm-256color")
    piped = io.StringIO()
    # As the command line makes its consoles: interactive only where the stream is a terminal.
    console = Console(file=piped, force_interactive=piped.isatty())
    assert console.is_terminal and not live_console(console)
    assert live_console(Console(file=io.StringIO(), force_terminal=True))  # a terminal keeps the bar


def test_an_atomic_write_names_its_target_not_its_temporary_file(tmp_path):
    """A folder where a file goes was reported as `.recipe.yaml.6g26vxt1: Is a directory`."""
    from finetune.files import write_text_atomic

    (tmp_path / "recipe.yaml").mkdir()
    with pytest.raises(IsADirectoryError) as info:
        write_text_atomic(tmp_path / "recipe.yaml", "x")
    assert info.value.filename == str(tmp_path / "recipe.yaml")
    assert [p.name for p in tmp_path.iterdir()] == ["recipe.yaml"]  # no temporary file left


@pytest.mark.unit
def test_printed_commands_quote_paths_a_shell_would_split_or_read_as_options():
    """`next: finetune eval odd dir/rün out` split at the spaces when pasted, and `finetune eval -out` read an
    option."""
    import shlex

    from finetune.files import shell_word

    assert shell_word("runs/demo") == "runs/demo" and shell_word("output.dir=/tmp/r-again") == "output.dir=/tmp/r-again"
    assert shlex.split(f"finetune eval {shell_word('odd dir/ünï 日本/rün out')}")[-1] == "odd dir/ünï 日本/rün out"
    assert shell_word("-out") == "./-out" and shlex.split(shell_word("it's"))[0] == "it's"


@pytest.mark.unit
def test_a_too_long_refusal_crosses_processes_whole():
    """Raised in a tokenising worker, the refusal is pickled back to the parent: it could not be rebuilt."""
    import pickle

    from finetune.data.tables import TooLong

    again = pickle.loads(pickle.dumps(TooLong("data.train", [4, 1], 16, "pair")))
    assert isinstance(again, TooLong) and list(again.rows) == [1, 4] and "2 pairs exceed" in str(again)


@pytest.mark.unit
def test_kto_labels_as_pandas_writes_them_are_read():
    """A CSV or parquet of thumbs written by pandas holds 1.0 / 0.0: refused as not true or false."""
    from finetune.errors import DataError
    from finetune.tasks.preference import _thumbs

    assert _thumbs([1.0, 0.0, True, "false", 1], "data.train") == [True, False, True, False, True]
    for bad in (0.5, float("nan"), 2, "yes"):
        with pytest.raises(DataError, match="must be true"):
            _thumbs([bad], "data.train")
