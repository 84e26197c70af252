"""A learned watermark's own learning rate (eval.watermark.lr): the loop's make_optimizer gives its blocks and
extractor an AdamW group of their own, beside the LoRA's (plain AdamW or LoRA+), on the run's schedule, and a run
rebuilt from a saved optimizer continues bit for bit."""

from __future__ import annotations

import io

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import get_scheduler

from finetune.recipe.schema import PreferenceSection, TrainSection, WatermarkSection
from finetune.training.loop import make_optimizer
from finetune.training.objectives import Objective
from finetune.training.watermark_objective import LearnedWatermarkObjective
from finetune.watermark import learned
from tests.watermark.test_learned import batch, settings, tiny_decoder

MESSAGE = "10110010"


def marked_lora_model(**mark):
    """The tests' tiny decoder with a LoRA on its attention and a fresh learned watermark, as a run trains them."""
    model = get_peft_model(tiny_decoder(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(1)
    watermark = learned.fresh(model, settings(**mark), MESSAGE)
    return model, watermark


def ids(parameters) -> set[int]:
    return {id(p) for p in parameters}


def check_groups(optimizer, model, watermark) -> list[dict]:
    """Every trainable parameter in exactly one group, the watermark's all in the last one; the groups returned."""
    grouped = [id(p) for group in optimizer.param_groups for p in group["params"]]
    assert len(grouped) == len(set(grouped))  # no parameter trained twice
    assert set(grouped) == ids(p for p in model.parameters() if p.requires_grad)
    assert ids(optimizer.param_groups[-1]["params"]) == ids(watermark.parameters())
    return optimizer.param_groups


def test_the_watermark_trains_in_a_group_of_its_own_at_its_lr():
    model, watermark = marked_lora_model(lr=5e-2)
    assert watermark.lr == 5e-2
    first, last = check_groups(make_optimizer(model, TrainSection(lr=1e-3)), model, watermark)
    assert first["lr"] == 1e-3 and last["lr"] == 5e-2
    assert all("lora_" in name for name, p in model.named_parameters() if id(p) in ids(first["params"]))

    # The schedule scales both groups alike: warmup then linear decay, each from its own peak.
    optimizer = make_optimizer(model, TrainSection(lr=1e-3))
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=2, num_training_steps=10)
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    lora_lr, mark_lr = (group["lr"] for group in optimizer.param_groups)
    assert lora_lr == pytest.approx(1e-3 * 5 / 8) and mark_lr == pytest.approx(5e-2 * 5 / 8)

    # null: the LoRA's learning rate, in the LoRA's one group (the loop as it was).
    model, watermark = marked_lora_model(lr=None)
    (group,) = make_optimizer(model, TrainSection(lr=1e-3)).param_groups
    assert group["lr"] == 1e-3 and ids(watermark.parameters()) <= ids(group["params"])


def test_by_default_the_watermark_trains_in_the_loras_group():
    """eval.watermark.lr defaults to null (measured: at SmolLM2's width the LoRA's rate did as well as any), so a
    run checkpointed before the key existed resumes into the same single group."""
    model, watermark = marked_lora_model()
    assert watermark.lr is None
    (group,) = make_optimizer(model, TrainSection(lr=1e-3)).param_groups
    assert ids(group["params"]) == ids(p for p in model.parameters() if p.requires_grad)
    assert "lr" in WatermarkSection(key=1).other_method_keys()  # a learned watermark's setting, refused elsewhere


def test_loraplus_keeps_its_groups_and_the_watermark_its_own():
    model, watermark = marked_lora_model(lr=5e-2)
    optimizer = make_optimizer(model, TrainSection(lr=1e-3, optimizer="loraplus", loraplus_lr_ratio=16))
    groups = check_groups(optimizer, model, watermark)
    assert groups[-1]["lr"] == 5e-2
    names = {id(p): n for n, p in model.named_parameters()}
    lr_of = {names[id(p)]: group["lr"] for group in groups[:-1] for p in group["params"]}
    b_rates = [lr for n, lr in lr_of.items() if "lora_B" in n]
    a_rates = [lr for n, lr in lr_of.items() if "lora_A" in n]
    assert b_rates and b_rates == pytest.approx([16e-3] * len(b_rates))
    assert a_rates and a_rates == pytest.approx([1e-3] * len(a_rates))

    # lr null under LoRA+: still a group of their own, at the run's lr (never lr x ratio for their biases).
    model, watermark = marked_lora_model(lr=None)
    optimizer = make_optimizer(model, TrainSection(lr=1e-3, optimizer="loraplus", loraplus_lr_ratio=16))
    assert check_groups(optimizer, model, watermark)[-1]["lr"] == 1e-3


def train_steps(model, optimizer, scheduler, objective, steps: int) -> None:
    for _ in range(steps):
        step = objective.step(model, batch(4, completion=8))
        optimizer.zero_grad()
        step.loss.backward()
        optimizer.step()
        scheduler.step()


def test_a_run_rebuilt_from_its_saved_optimizer_continues_bit_for_bit():
    """Four steps straight equal two steps, the trainable weights, optimizer, schedule and generator saved, a new
    model and optimizer built (the group order as the first's) and loaded, and two more steps."""
    t = TrainSection(lr=1e-3)

    def fresh():
        model, watermark = marked_lora_model(lr=5e-2)
        optimizer = make_optimizer(model, t)
        scheduler = get_scheduler("linear", optimizer, num_warmup_steps=1, num_training_steps=4)
        objective = LearnedWatermarkObjective(Objective(PreferenceSection(), encoder_decoder=False), settings(lr=5e-2))
        return model, optimizer, scheduler, objective

    def trainable(model) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    model, optimizer, scheduler, objective = fresh()
    torch.manual_seed(5)
    train_steps(model, optimizer, scheduler, objective, 4)
    whole = trainable(model)

    model, optimizer, scheduler, objective = fresh()
    torch.manual_seed(5)
    train_steps(model, optimizer, scheduler, objective, 2)
    buffer = io.BytesIO()
    torch.save([trainable(model), optimizer.state_dict(), scheduler.state_dict(), torch.get_rng_state()], buffer)
    torch.manual_seed(99)  # whatever happened in between
    buffer.seek(0)
    weights, optimizer_state, scheduler_state, rng = torch.load(buffer, weights_only=False)
    model, optimizer, scheduler, objective = fresh()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(weights[name])
    optimizer.load_state_dict(optimizer_state)
    scheduler.load_state_dict(scheduler_state)
    torch.set_rng_state(rng)
    assert optimizer.param_groups[-1]["lr"] == pytest.approx(5e-2 * 2 / 3)  # mid-schedule, its own peak
    train_steps(model, optimizer, scheduler, objective, 2)
    resumed = trainable(model)
    assert resumed.keys() == whole.keys()
    assert all(torch.equal(resumed[n], whole[n]) for n in whole)
    # And the watermark did train: its gates opened from exactly zero.
    assert all(float(v) != 0 for n, v in whole.items() if n.endswith(".gate"))
