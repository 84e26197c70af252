"""Preference objectives (DPO, ORPO, KTO): each loss equals TRL's on the same model, adapter and batch; the
reference policy is the starting point, never the policy being trained; end to end through `finetune run`."""

from __future__ import annotations

import json

import pytest
import torch
from datasets import Dataset

from finetune.recipe.schema import PreferenceSection
from finetune.training.objectives import DPO, KTO, ORPO, reference_policy, sequence_logps
from tests.conftest import write_jsonl
from tests.helpers import invoke
from tests.tasks.test_generation import copy_rows

trl = pytest.importorskip("trl")

PAIRS = [
    {"prompt": "the cat", "chosen": " sat on the mat", "rejected": " ran"},
    {"prompt": "a dog", "chosen": " barked", "rejected": " slept all day long"},
    {"prompt": "one bird in the tree", "chosen": " sang", "rejected": " flew away"},
]
THUMBS = [
    {"prompt": "the cat", "completion": " sat on the mat", "label": True},
    {"prompt": "a dog", "completion": " slept all day", "label": False},
    {"prompt": "a bird", "completion": " sang", "label": True},
    {"prompt": "the fish", "completion": " swam", "label": False},
]


def _peft_model(model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], init_lora_weights=False)
    return get_peft_model(model, config)


def _tokenizer(model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@torch.no_grad()
def _move_policy(model) -> None:
    """Training's effect: the trained adapter moves away from where it started (TRL's "ref" copy stays)."""
    generator = torch.Generator().manual_seed(1)
    for name, parameter in model.named_parameters():
        if "lora_B.default" in name:
            parameter.add_(0.5 * torch.randn(parameter.shape, generator=generator))


def _logps(model, batch):
    return sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"], encoder_decoder=False)


@pytest.mark.parametrize(("loss", "smoothing"), [("sigmoid", 0.0), ("ipo", 0.0), ("hinge", 0.0), ("robust", 0.2)])
def test_dpo_loss_equals_trl(tiny_models, tmp_path, loss, smoothing):
    model_dir = tiny_models["gpt2"]
    config = trl.DPOConfig(
        output_dir=str(tmp_path), beta=0.3, loss_type=[loss], label_smoothing=smoothing, report_to=[], use_cpu=True
    )
    trainer = trl.DPOTrainer(
        model=_peft_model(model_dir),
        args=config,
        train_dataset=Dataset.from_list(PAIRS),
        processing_class=_tokenizer(model_dir),
    )
    model = trainer.model
    model.eval()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(PAIRS))])
    ours = {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
        "labels": batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100),
    }
    with torch.no_grad():  # the reference: the model as training starts
        ref_chosen, ref_rejected = _logps(model, ours).chunk(2)
    _move_policy(model)
    ours |= {"ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}
    settings = PreferenceSection(beta=0.3, loss=loss, label_smoothing=smoothing)
    expected = trainer._compute_loss(model, batch, return_outputs=False)
    got = DPO(settings, encoder_decoder=False).step(model, ours)
    assert got.loss.item() == pytest.approx(expected.item(), abs=1e-5)
    assert got.loss.item() != pytest.approx(
        DPO(settings, False).step(model, ours | {"ref_chosen_logps": _logps(model, ours).chunk(2)[0]}).loss.item(),
        abs=1e-4,
    ), "a reference equal to the trained policy must change the loss (the test would not see the bug)"
    # TRL's own log of the same batch: rewards and accuracy agree with the rows we report.
    logged = trainer._metrics["train" if model.training else "eval"]
    margin = (got.rows["chosen_reward"] - got.rows["rejected_reward"]).mean().item()
    assert margin == pytest.approx(logged["rewards/margins"][-1], abs=1e-5)
    # The frozen copy TRL made is the reference policy finetune's evaluation switches to.
    with torch.no_grad(), reference_policy(model, "ref"):
        assert torch.allclose(_logps(model, ours).chunk(2)[0], ref_chosen, atol=1e-5)
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_B.default" in n)
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".ref." in n)


def test_orpo_loss_equals_trl(tiny_models, tmp_path):
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    model_dir = tiny_models["gpt2"]
    trainer = ORPOTrainer(
        model=_peft_model(model_dir),
        args=ORPOConfig(output_dir=str(tmp_path), beta=0.25, report_to=[], use_cpu=True),
        train_dataset=Dataset.from_list(PAIRS),
        processing_class=_tokenizer(model_dir),
    )
    model = trainer.model
    model.eval()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(PAIRS))])
    joined = trainer.concatenated_inputs(batch, is_encoder_decoder=False, padding_value=trainer.padding_value)
    ours = {
        "input_ids": joined["concatenated_input_ids"],
        "attention_mask": joined["concatenated_attention_mask"],
        "labels": joined["concatenated_labels"],
    }
    expected = trainer.get_batch_loss_metrics(model, batch)[0]
    got = ORPO(PreferenceSection(beta=0.25), encoder_decoder=False).step(model, ours)
    assert got.loss.item() == pytest.approx(expected.item(), abs=1e-5)


def test_kto_loss_equals_trl(tiny_models, tmp_path):
    model_dir = tiny_models["gpt2"]
    trainer = trl.KTOTrainer(
        model=_peft_model(model_dir),
        args=trl.KTOConfig(
            output_dir=str(tmp_path),
            beta=0.2,
            desirable_weight=1.5,
            undesirable_weight=0.5,
            report_to=[],
            use_cpu=True,
            per_device_train_batch_size=len(THUMBS),
        ),
        train_dataset=Dataset.from_list(THUMBS),
        processing_class=_tokenizer(model_dir),
    )
    model = trainer.model
    model.eval()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(THUMBS))])
    own = {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
        "labels": batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100),
    }
    mismatched = {
        "input_ids": batch["KL_input_ids"],
        "attention_mask": batch["KL_attention_mask"],
        "labels": batch["KL_input_ids"].masked_fill(batch["KL_completion_mask"] == 0, -100),
    }
    with torch.no_grad():
        ref, ref_kl = _logps(model, own), _logps(model, mismatched)
    _move_policy(model)
    # finetune's collator lays the rows' own sequences, then their mismatched ones, in one padded batch.
    width = max(own["input_ids"].shape[1], mismatched["input_ids"].shape[1])

    def pad(tensor, value):
        return torch.nn.functional.pad(tensor, (0, width - tensor.shape[1]), value=value)

    ours = {
        "input_ids": torch.cat([pad(own["input_ids"], 0), pad(mismatched["input_ids"], 0)]),
        "attention_mask": torch.cat([pad(own["attention_mask"], 0), pad(mismatched["attention_mask"], 0)]),
        "labels": torch.cat([pad(own["labels"], -100), pad(mismatched["labels"], -100)]),
        "desirable": batch["label"].bool(),
        "ref_logps": ref,
        "ref_kl_logps": ref_kl,
    }
    expected = trainer._compute_loss(model, batch, return_outputs=False)
    settings = PreferenceSection(beta=0.2, desirable_weight=1.5, undesirable_weight=0.5)
    got = KTO(settings, encoder_decoder=False).step(model, ours)
    assert got.loss.item() == pytest.approx(expected.item(), abs=1e-5)
    assert trainer._metrics["eval"]["kl"][-1] > 0  # the KL baseline took part (not clamped to 0)


def test_the_schema_names_the_registered_objectives():
    from typing import get_args

    from finetune.recipe.schema import TrainSection
    from finetune.training.objectives import OBJECTIVES

    assert set(get_args(TrainSection.model_fields["objective"].annotation)) == set(OBJECTIVES)


# --------------------------------------------------------------------------- end to end


def _pairs(n: int, seed: int = 0) -> list[dict]:
    rows = copy_rows(n, seed)
    out = []
    for i, row in enumerate(rows):
        other = next(r["completion"] for r in rows[i + 1 :] + rows[:i] if r["completion"] != row["completion"])
        out.append({"brief": row["prompt"], "good": row["completion"], "bad": other})
    return out


def _recipe(model_dir, tmp_path, objective: str, **train) -> dict:
    rows = _pairs(60)
    columns = {"prompt": "brief", "chosen": "good", "rejected": "bad"}
    if objective == "kto":  # thumbs to train on, in the fields' own names; evaluated on pairs
        thumbs = [
            {"prompt": r["brief"], "completion": text, "label": ok}
            for r in rows[:48]
            for text, ok in ((r["good"], True), (r["bad"], False))
        ]
        train_file = write_jsonl(tmp_path / "data" / "thumbs.jsonl", thumbs)
        rows = [{"prompt": r["brief"], "chosen": r["good"], "rejected": r["bad"]} for r in rows]
        columns = {}
    else:
        train_file = write_jsonl(tmp_path / "data" / "train.jsonl", rows[:48])
    eval_file = write_jsonl(tmp_path / "data" / "eval.jsonl", rows[48:])
    return {
        "task": "copywriting",
        "model": {"name_or_path": str(model_dir)},
        "data": {
            "train": str(train_file),
            "eval": str(eval_file),
            "max_length": 32,
            "columns": columns,
        },
        "lora": {"r": 4, "alpha": 8, "targets": "all_linear"},
        "train": {
            "epochs": 2,
            "batch_size": 8,
            "lr": 1e-2,
            "seed": 0,
            "precision": "fp32",
            "objective": objective,
            **train,
        },
        "eval": {"max_new_tokens": 6, "every": 4},
        "output": {"dir": str(tmp_path / f"run-{objective}")},
    }


# ORPO's odds-ratio term sits beside the NLL; on a model this small it needs a larger beta to show in a few steps.
SETTINGS = {"dpo": {}, "kto": {}, "orpo": {"epochs": 4, "preference": {"beta": 1.0}}}


@pytest.mark.parametrize("objective", ["dpo", "orpo", "kto"])
def test_preference_run_end_to_end(tiny_models, tmp_path, write_recipe, objective):
    recipe = _recipe(tiny_models["gpt2"], tmp_path, objective, **SETTINGS[objective])
    result = invoke("run", str(write_recipe(recipe)))
    assert result.exit_code == 0, result.output
    run = tmp_path / f"run-{objective}"
    metrics = json.loads((run / "metrics.json").read_text())["metrics"]
    assert {"preference_accuracy", "reward_margin", "rougeL"} <= set(metrics)
    assert ("eval_loss" in metrics) == (objective != "kto")  # KTO's loss is defined on thumbs; judged on pairs
    assert metrics["preference_accuracy"] >= 0.75, metrics  # the pairs are learnable: one phrase per topic
    history = [json.loads(line) for line in (run / "eval_log.jsonl").read_text().splitlines()]
    assert "preference_accuracy" in history[0]["metrics"]
    rows = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    assert {"prediction", "chosen_reward", "rejected_reward"} <= set(rows[0])
    # Re-scoring the saved rows gives the same numbers.
    accuracy = sum(r["chosen_reward"] > r["rejected_reward"] for r in rows) / len(rows)
    assert accuracy == pytest.approx(metrics["preference_accuracy"])
    assert (run / "reference_logps.json").is_file() == (objective != "orpo")
    # The adapter is a plain peft adapter.
    from peft import AutoPeftModelForCausalLM

    AutoPeftModelForCausalLM.from_pretrained(run / "adapter")


def test_dpo_reference_is_the_base_model(tiny_models, tmp_path, write_recipe):
    """Stored reference log-probabilities are the base model's (fresh LoRA), not the trained policy's."""
    from finetune.flows.resolve import resolve
    from finetune.flows.session import open_session
    from finetune.tasks.preference import PreferenceCollator

    recipe = _recipe(tiny_models["gpt2"], tmp_path, "dpo", max_steps=3)
    path = write_recipe(recipe)
    assert invoke("run", str(path)).exit_code == 0
    saved = json.loads((tmp_path / "run-dpo" / "reference_logps.json").read_text())
    session = open_session(resolve(str(path)), with_lora=False)
    features = session.features["eval"].dataset
    batch = PreferenceCollator(session.tokenizer)([features[i] for i in range(len(features))])
    with torch.no_grad():
        chosen, _ = _logps(session.model, batch).chunk(2)
    assert chosen.tolist() == pytest.approx(saved["eval"]["ref_chosen_logps"], abs=1e-4)


@pytest.mark.parametrize("objective", ["dpo", "kto"])
def test_stopped_preference_run_resumes_to_the_same_adapter(
    tiny_models, tmp_path, write_recipe, monkeypatch, objective
):
    """Stopped at step 3, resumed: the reference log-probabilities are read back (not recomputed from moved
    weights), and the adapter bytes equal an uninterrupted run's."""
    from tests.training.test_resume import adapter_bytes, log_losses
    from tests.training.test_resume_in_process import stop_at_step

    recipe = _recipe(tiny_models["gpt2"], tmp_path, objective, checkpoint_every=2, epochs=1, log_every=1)
    whole = write_recipe(recipe, "whole.yaml")
    assert invoke("run", str(whole)).exit_code == 0
    recipe["output"]["dir"] = str(tmp_path / "stopped")
    stopped_recipe = write_recipe(recipe, "stopped.yaml")
    with monkeypatch.context() as patch:
        stop_at_step(patch, 3)
        assert invoke("run", str(stopped_recipe)).exit_code == 75
    resumed = invoke("run", str(stopped_recipe), "--resume", "auto")
    assert resumed.exit_code == 0, resumed.output
    assert adapter_bytes(tmp_path / "stopped") == adapter_bytes(tmp_path / f"run-{objective}")
    assert log_losses(tmp_path / "stopped") == log_losses(tmp_path / f"run-{objective}")


@pytest.mark.parametrize(
    ("change", "code", "words"),
    [
        ({"task": "classification"}, 2, "train.objective"),
        ({"train": {"objective": "dpo", "packing": True}}, 2, "train.packing"),
        ({"data": {"columns": {"prompt": "brief", "completion": "good"}}}, 3, "field 'chosen' not found"),
        ({"train": {"objective": "sft"}, "eval": {"best_metric": "preference_accuracy"}}, 2, "preference"),
        ({"model": {"adapter": "nowhere"}}, 2, "model.adapter"),
    ],
)
def test_preference_refusals(tiny_models, tmp_path, write_recipe, change, code, words):
    recipe = _recipe(tiny_models["gpt2"], tmp_path, "dpo")
    for section, values in change.items():
        recipe[section] = {**recipe[section], **values} if isinstance(values, dict) else values
    if recipe["task"] == "classification":
        recipe["data"].pop("columns")
    result = invoke("run", str(write_recipe(recipe)), "--dry-run")
    assert result.exit_code == code, result.output
    assert words in result.output
    assert "Traceback" not in result.output


def test_identical_pair_is_refused_with_its_row(tiny_models, tmp_path, write_recipe):
    recipe = _recipe(tiny_models["gpt2"], tmp_path, "dpo")
    rows = _pairs(10)
    rows[3]["bad"] = rows[3]["good"]
    recipe["data"]["train"] = str(write_jsonl(tmp_path / "data" / "same.jsonl", rows))
    result = invoke("run", str(write_recipe(recipe)), "--dry-run")
    assert result.exit_code == 3, result.output
    assert "same.jsonl:4" in result.output and "equals" in result.output  # the file's own line


def test_the_data_report_counts_the_rejected_side_too(tiny_models, tmp_path, write_recipe):
    """A rejected answer far over max_length showed as max 26 tokens, 0 truncated: the chosen side's report alone."""
    recipe = _recipe(tiny_models["gpt2"], tmp_path, "dpo")
    rows = _pairs(10)
    rows[1]["bad"] = "word " * 300
    recipe["data"]["train"] = str(write_jsonl(tmp_path / "data" / "long.jsonl", rows))
    result = invoke("data", str(write_recipe(recipe)), "--output", str(tmp_path / "report.json"))
    assert result.exit_code == 0, result.output
    train = json.loads((tmp_path / "report.json").read_text())["splits"]["train"]
    assert train["token_length"]["max"] >= 32 and train["truncated"] == 1, train
    assert "0 chosen and 1 rejected sequence(s)" in " ".join(train["notes"])
    # Rows cut on either side are counted (the larger side's count said 2 of 3), and each side's cut completions
    # said under its name (two sides' equal notes were said once: 1 completion cut, of 2).
    rows[0]["good"] = "word " * 300
    rows[2]["brief"] = "word " * 300  # a long prompt: both of its sequences over max_length
    recipe["data"]["train"] = str(write_jsonl(tmp_path / "data" / "long.jsonl", rows))
    assert invoke("data", str(write_recipe(recipe)), "--output", str(tmp_path / "r2.json")).exit_code == 0
    train = json.loads((tmp_path / "r2.json").read_text())["splits"]["train"]
    notes = " ".join(train["notes"])
    assert train["truncated"] == 3, train
    assert "chosen: 1 completion(s) were cut" in notes and "rejected: 1 completion(s) were cut" in notes, notes


def test_kto_thumbs_both_ways_are_said():
    from finetune.tasks.preference import _thumbed_both_ways

    prompts, completions = ["a", "a", "b", "a", "a"], ["good", "good", "x", "bad", "good"]
    assert _thumbed_both_ways(prompts, completions, [True, False, True, True, False]) == [(1, 2)]
    assert _thumbed_both_ways(prompts, completions, [True, True, False, False, True]) == []


def test_kto_without_labels_is_refused(tiny_models, tmp_path, write_recipe):
    recipe = _recipe(tiny_models["gpt2"], tmp_path, "kto")
    rows = [{"prompt": "a b", "completion": "c d"}] * 4
    recipe["data"]["train"] = str(write_jsonl(tmp_path / "data" / "nolabel.jsonl", rows))
    result = invoke("run", str(write_recipe(recipe)), "--dry-run")
    assert result.exit_code == 3, result.output
    assert "label" in result.output


@pytest.mark.parametrize("start", ["base", "sft-run"])
def test_eval_of_a_finished_run_uses_the_same_reference(tiny_models, tmp_path, write_recipe, start):
    """`finetune eval RUN` recomputes the reference policy with peft (adapters disabled, or the starting adapter
    loaded frozen beside the trained one) and gets the rewards training reported from its stored log-probs."""
    recipe = _recipe(tiny_models["gpt2"], tmp_path, "dpo", max_steps=6)
    if start == "sft-run":
        sft = _recipe(tiny_models["gpt2"], tmp_path, "sft", max_steps=4)
        sft["data"]["columns"] = {"prompt": "brief", "completion": "good"}
        sft["output"]["dir"] = str(tmp_path / "sft")
        assert invoke("run", str(write_recipe(sft, "sft.yaml"))).exit_code == 0
        recipe["model"]["adapter"] = str(tmp_path / "sft")
    result = invoke("run", str(write_recipe(recipe)))
    assert result.exit_code == 0, result.output
    if start == "sft-run":
        assert "starts from" in result.output
    run = tmp_path / "run-dpo"
    trained = json.loads((run / "metrics.json").read_text())["metrics"]
    again = invoke("eval", str(run), "--output", str(tmp_path / "again"))
    assert again.exit_code == 0, again.output
    evaluated = json.loads((tmp_path / "again" / "metrics.json").read_text())["metrics"]
    for name in ("reward_margin", "logps_chosen", "logps_rejected"):
        assert evaluated[name] == pytest.approx(trained[name], abs=1e-4), name
    assert "starting adapter" not in again.output
    if start == "sft-run":  # the SFT run trained again: the reference is another model now, and eval says so
        sft["train"]["seed"] = 7
        assert invoke("run", str(write_recipe(sft, "sft.yaml")), "--overwrite").exit_code == 0
        changed = invoke("eval", str(run), "--output", str(tmp_path / "changed"))
        assert changed.exit_code == 0, changed.output
        assert "is not the one the run trained from" in " ".join(changed.output.split())
        warnings = json.loads((tmp_path / "changed" / "metrics.json").read_text())["warnings"]
        assert any(str(tmp_path / "sft") in w for w in warnings)


@pytest.mark.parametrize("objective", ["dpo", "orpo", "kto"])
def test_preference_objectives_train_bart(tiny_models, tmp_path, write_recipe, objective):
    recipe = _recipe(tiny_models["bart"], tmp_path, objective, max_steps=4)
    result = invoke("run", str(write_recipe(recipe)))
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / f"run-{objective}" / "metrics.json").read_text())["metrics"]
    assert 0 <= metrics["preference_accuracy"] <= 1


def test_a_pair_batch_in_halves_gives_the_whole_batch_gradient(tiny_models):
    """DPO runs a batch of pairs as two halves (an SFT batch's activations); the summed gradients are the whole's."""
    from finetune.training.objectives import pair_halves

    model = _peft_model(tiny_models["gpt2"])
    model.eval()
    tokenizer = _tokenizer(tiny_models["gpt2"])
    rows = [tokenizer(p["prompt"] + p[side])["input_ids"] for side in ("chosen", "rejected") for p in PAIRS]
    width = max(map(len, rows))
    batch = {
        "input_ids": torch.tensor([r + [0] * (width - len(r)) for r in rows]),
        "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows]),
        "labels": torch.tensor([[-100] * 2 + r[2:] + [-100] * (width - len(r)) for r in rows]),
        "ref_chosen_logps": torch.tensor([-20.0, -15.0, -30.0]),
        "ref_rejected_logps": torch.tensor([-18.0, -25.0, -22.0]),
    }
    objective = DPO(PreferenceSection(beta=0.5), encoder_decoder=False)

    def gradients(parts):
        model.zero_grad()
        for part, weight in parts:
            (objective.step(model, part).loss * weight).backward()
        return [p.grad.clone() for p in model.parameters() if p.requires_grad]

    halves = pair_halves(batch, encoder_decoder=False)
    assert [weight for _, weight in halves] == pytest.approx([2 / 3, 1 / 3])
    assert halves[1][0]["input_ids"].shape[1] <= width
    for whole, split in zip(gradients([(batch, 1.0)]), gradients(halves)):
        assert torch.allclose(whole, split, atol=1e-6)


def test_kto_trains_on_pairs_as_trl_unpairs_them(tiny_models, tmp_path, write_recipe):
    """KTO on pair rows (a documented input) failed at the first step (internal error, validate said ok): each pair
    is two thumbs now, as TRL's `unpair_preference_dataset` makes them, row for row; thumbs beside pairs win."""
    from trl.data_utils import unpair_preference_dataset

    from finetune.tasks.preference import kto_rows, unpaired_numbers

    pairs = Dataset.from_dict(
        {
            "prompt": [f"p{i % 7}" for i in range(2500)],  # more than one of datasets.map's batches
            "chosen": [f"good {i}" for i in range(2500)],
            "rejected": [f"bad {i}" for i in range(2500)],
        }
    )
    ours = kto_rows(pairs, "kto", "data.train", "prompt", "completion")
    assert ours.to_dict() == unpair_preference_dataset(pairs).to_dict()
    # Each thumb's pair, as messages name it: the row whose chosen or rejected answer it is.
    numbers = unpaired_numbers(2500)
    assert len(numbers) == len(ours) and all(
        ours[i]["completion"].split()[1] == str(n - 1) for i, n in enumerate(numbers)
    )
    assert kto_rows(pairs, "kto", "data.eval", "prompt", "completion") is pairs  # evaluated on pairs
    assert kto_rows(pairs, "dpo", "data.train", "prompt", "completion") is pairs

    recipe = _recipe(tiny_models["gpt2"], tmp_path, "kto", max_steps=2)
    recipe["data"]["train"] = recipe["data"]["eval"]  # the pairs file
    path = write_recipe(recipe)
    assert invoke("validate", str(path)).exit_code == 0
    result = invoke("run", str(path))
    assert result.exit_code == 0, result.output


def test_kto_pairs_too_long_are_named_by_their_pair_row(tiny_models, tmp_path, write_recipe):
    """KTO trains on pairs as two thumbs each; a too-long answer was named by its row among those thumbs (each
    batch's chosen answers, then its rejected ones), not by the pair's line in the file."""
    recipe = _recipe(tiny_models["gpt2"], tmp_path, "kto", max_steps=1)
    pairs = [json.loads(line) for line in open(recipe["data"]["eval"], encoding="utf-8")]
    pairs[2]["rejected"] = "long " * 200  # the third pair's rejected answer: the 15th thumb of 24
    recipe["data"]["train"] = str(write_jsonl(tmp_path / "data" / "pairs.jsonl", pairs))
    recipe["data"]["overflow"] = "error"
    result = invoke("run", str(write_recipe(recipe)))
    words = " ".join(result.output.split())
    assert result.exit_code == 3 and "pairs.jsonl:3" in words and "pairs.jsonl:15" not in words, words


def test_dpo_pairs_too_long_on_either_side_are_named_at_once(tiny_models, tmp_path, write_recipe):
    """data.overflow: error on pairs named only the rows whose chosen answer was too long ("1 examples exceed"),
    the rejected side's rows coming only after those were fixed."""
    recipe = _recipe(tiny_models["gpt2"], tmp_path, "dpo", max_steps=1)
    pairs = [json.loads(line) for line in open(recipe["data"]["eval"], encoding="utf-8")]
    pairs[1]["bad"] = "long " * 200  # the rejected answer (data.columns), then another row's chosen one
    pairs[3]["good"] = "long " * 200
    recipe["data"]["train"] = str(write_jsonl(tmp_path / "data" / "long-pairs.jsonl", pairs))
    recipe["data"]["overflow"] = "error"
    result = invoke("run", str(write_recipe(recipe)), "--dry-run")
    words = " ".join(result.output.split())
    assert result.exit_code == 3 and "2 pairs exceed" in words, words
    assert "long-pairs.jsonl:2" in words and "long-pairs.jsonl:4" in words, words


def test_pairs_beside_a_messages_prompt_are_pointed_at_prompt(tiny_models, tmp_path, write_recipe):
    """`{"messages": [user turn], "chosen": ..., "rejected": ...}` was refused as a conversation with "no assistant
    turn", which said nothing of the pair; the message now names the column TRL reads a pair's prompt from."""
    recipe = _recipe(tiny_models["gpt2"], tmp_path, "dpo", max_steps=1)
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}], "chosen": "good", "rejected": "bad"} for i in range(8)]
    recipe["data"].update(train=str(write_jsonl(tmp_path / "data" / "m.jsonl", rows)), columns={})
    path = str(write_recipe(recipe))
    for command in (["validate", path], ["run", path, "--dry-run"]):
        result = invoke(*command)
        words = " ".join(result.output.split())
        assert result.exit_code == 3 and "rename 'messages' to 'prompt'" in words, words


def test_kto_evaluated_on_thumbs_has_no_pair_metrics_to_gate(tiny_models, tmp_path, write_recipe):
    """A gate on logps_chosen with thumbs as data.eval: validate said ok, the run trained, then failed as "missing"
    (exit 4). Refused where the eval rows are read, validate and run alike."""
    recipe = _recipe(tiny_models["gpt2"], tmp_path, "kto", max_steps=1)
    recipe["data"]["eval"] = recipe["data"]["train"]  # thumbs
    recipe["eval"]["gates"] = {"logps_chosen": ">=-100"}
    path = str(write_recipe(recipe))
    for command in (["validate"], ["run"]):
        result = invoke(*command, path)
        words = " ".join(result.output.split())
        assert result.exit_code == 2 and "logps_chosen is reported when data.eval holds pairs" in words, words
    assert not (tmp_path / "run-kto" / "adapter").exists()
    recipe["eval"]["gates"] = {"preference_accuracy": ">=0"}  # reported for thumbs
    assert invoke("validate", str(write_recipe(recipe))).exit_code == 0
