"""Padding-free packing, gradient checkpointing, and what the distributed section refuses."""

import random
from types import SimpleNamespace

import pytest
import torch
from conftest import classification_recipe, write_jsonl
from helpers import invoke

from finetune.tasks.text2text import IGNORE, PackedCollator, PadCollator
from tests.tasks.test_generation import copy_rows, generation_recipe


def examples(vocab: int, seed: int = 0) -> list[dict]:
    """Sequences of different lengths; the first part of each is a prompt (no loss)."""
    rng = random.Random(seed)
    rows = []
    for length in (5, 17, 9, 30, 12):
        ids = [rng.randrange(3, vocab) for _ in range(length)]
        prompt = rng.randrange(1, length - 2)
        rows.append({"input_ids": ids, "attention_mask": [1] * length, "labels": [IGNORE] * prompt + ids[prompt:]})
    return rows


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_packed_batch_has_the_padded_loss_and_no_cross_contamination(kind, tiny_models):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_models[kind]).eval()
    rows = examples(model.config.vocab_size)
    with torch.no_grad():
        padded = model(**PadCollator(SimpleNamespace(pad_token_id=0))(rows))
        packed_batch = PackedCollator()(rows)
        packed = model(**packed_batch)
        torch.testing.assert_close(packed.loss, padded.loss, rtol=1e-5, atol=1e-6)
        # Each sequence's logits inside the packed row equal those of the sequence alone.
        start = 0
        for row in rows:
            alone = model(input_ids=torch.tensor([row["input_ids"]])).logits[0]
            end = start + len(row["input_ids"])
            torch.testing.assert_close(packed.logits[0, start:end], alone, rtol=1e-4, atol=1e-5)
            start = end
    assert packed_batch["input_ids"].shape == (1, sum(len(r["input_ids"]) for r in rows))


def test_packing_trains_a_decoder_and_is_refused_elsewhere(tiny_models, topic_data, write_recipe, tmp_path):
    rows = copy_rows(40)
    data = {
        "train": write_jsonl(tmp_path / "train.jsonl", rows[:32]),
        "eval": write_jsonl(tmp_path / "eval.jsonl", rows[32:]),
    }
    packed = generation_recipe("copywriting", tiny_models["llama"], data, tmp_path / "packed", train={"packing": True})
    result = invoke("run", write_recipe(packed, "packed.yaml"))
    assert result.exit_code == 0, result.output
    refused = classification_recipe(tiny_models["bert"], topic_data, tmp_path / "cls", packing=True)
    result = invoke("run", write_recipe(refused, "refused.yaml"))
    assert result.exit_code == 2 and "train.packing: only for GPT-family models" in result.output


def test_gradient_checkpointing_gives_the_same_training(tiny_models, topic_data, write_recipe, tmp_path, monkeypatch):
    import json

    from transformers import PreTrainedModel

    enabled = []
    original = PreTrainedModel.gradient_checkpointing_enable

    def spy(self, *args, **kwargs):  # the setting must really switch checkpointing on, not be ignored
        enabled.append(kwargs.get("gradient_checkpointing_kwargs"))
        original(self, *args, **kwargs)
        assert self.is_gradient_checkpointing

    monkeypatch.setattr(PreTrainedModel, "gradient_checkpointing_enable", spy)

    def losses(name, checkpointing):
        recipe = classification_recipe(tiny_models["llama"], topic_data, tmp_path / name, log_every=1)
        recipe["distributed"] = {"gradient_checkpointing": checkpointing}
        assert invoke("run", write_recipe(recipe, f"{name}.yaml")).exit_code == 0
        return [json.loads(line)["loss"] for line in (tmp_path / name / "train_log.jsonl").read_text().splitlines()]

    with_checkpointing = losses("with", True)
    assert enabled == [{"use_reentrant": False}]
    assert with_checkpointing == pytest.approx(losses("without", False), rel=1e-5)
    assert len(enabled) == 1


def test_qlora_and_deepspeed_are_refused_without_a_gpu(tiny_models, topic_data, write_recipe, tmp_path):
    recipe = classification_recipe(tiny_models["bert"], topic_data, tmp_path / "run")
    recipe["distributed"] = {"quantization": "4bit"}
    result = invoke("run", write_recipe(recipe, "qlora.yaml"))
    assert result.exit_code == 2 and "4bit (QLoRA) needs a CUDA GPU" in result.output
    # fsdp runs on CPU processes too (torch's FSDP2, tests/training/test_fsdp_cpu.py); DeepSpeed needs GPUs.
    recipe["distributed"] = {"strategy": "deepspeed", "num_processes": 2}
    result = invoke("run", write_recipe(recipe, "deepspeed.yaml"))
    assert result.exit_code == 2 and "deepspeed (ZeRO) runs on GPUs" in result.output
