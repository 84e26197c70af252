"""PEFT methods beyond plain LoRA (DoRA, rsLoRA, PiSSA/OLoRA init, LoRA+): on every family, recorded in the adapter
so peft reloads them, exact across a kill -9 and resume."""

from __future__ import annotations

import json

import pytest
from conftest import classification_recipe
from helpers import invoke_wide as invoke

from tests.training.test_resume import adapter_bytes, killed_run, log_losses


@pytest.mark.parametrize("kind", ["bert", "bart", "gpt2", "llama"])
def test_dora_rslora_loraplus_train_on_every_family(kind, tiny_models, topic_data, write_recipe, tmp_path):
    out = tmp_path / "run"
    recipe = classification_recipe(
        tiny_models[kind], topic_data, out, epochs=2, optimizer="loraplus", loraplus_lr_ratio=4
    )
    recipe["lora"].update(use_dora=True, use_rslora=True)
    dry = invoke("run", write_recipe(recipe), "--dry-run")
    assert dry.exit_code == 0 and "DoRA + rsLoRA scaling" in dry.output and "optimizer loraplus" in dry.output, (
        dry.output
    )
    result = invoke("run", write_recipe(recipe))
    assert result.exit_code == 0, result.output
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["use_dora"] is True and config["use_rslora"] is True
    from safetensors import safe_open

    with safe_open(out / "adapter" / "adapter_model.safetensors", "pt") as tensors:
        assert any("lora_magnitude_vector" in name for name in tensors.keys())  # noqa: SIM118 (safe_open is not iterable)  DoRA's magnitudes were trained
    # peft reloads it as it is: the run's evaluation equals a fresh load's.
    again = invoke("eval", out, "--json")
    assert again.exit_code == 0, again.output
    assert json.loads(again.output)["metrics"] == pytest.approx(
        json.loads((out / "metrics.json").read_text())["metrics"]
    )


def test_loraplus_gives_b_matrices_a_larger_learning_rate(tiny_models):
    import torch
    from transformers import AutoModelForSequenceClassification

    from finetune.models.families import FAMILIES
    from finetune.models.lora import apply_lora, resolve_targets
    from finetune.recipe.schema import LoraSection, TrainSection
    from finetune.training.loop import make_optimizer

    model = AutoModelForSequenceClassification.from_pretrained(tiny_models["bert"], num_labels=3)
    model = apply_lora(
        model, LoraSection(r=2), resolve_targets(model, "attention", FAMILIES["bert"]), ["classifier"], "SEQ_CLS"
    )
    optimizer = make_optimizer(model, TrainSection(lr=1e-3, optimizer="loraplus", loraplus_lr_ratio=16))
    names = {id(p): n for n, p in model.named_parameters()}
    lr_of = {names[id(p)]: group["lr"] for group in optimizer.param_groups for p in group["params"]}
    b_rates = [lr for n, lr in lr_of.items() if "lora_B" in n]
    a_rates = [lr for n, lr in lr_of.items() if "lora_A" in n]
    assert b_rates and b_rates == pytest.approx([16e-3] * len(b_rates))
    assert a_rates and a_rates == pytest.approx([1e-3] * len(a_rates))
    plain = make_optimizer(model, TrainSection(lr=1e-3))
    assert isinstance(plain, torch.optim.AdamW) and len(plain.param_groups) == 1


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_and_olora_adapters_apply_to_the_unchanged_base(init, tiny_models, topic_data, write_recipe, tmp_path):
    """These inits rewrite the base weights; the saved adapter is converted so that it works on the original base."""
    out = tmp_path / "run"
    recipe = classification_recipe(tiny_models["llama"], topic_data, out, epochs=2)
    recipe["lora"]["init"] = init
    result = invoke("run", write_recipe(recipe))
    assert result.exit_code == 0, result.output
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 2 * recipe["lora"]["r"]  # peft's conversion to a plain LoRA doubles the rank
    evaluated = invoke("eval", out, "--json")  # loads the original base, then the adapter
    assert evaluated.exit_code == 0, evaluated.output
    trained = json.loads((out / "metrics.json").read_text())["metrics"]
    assert json.loads(evaluated.output)["metrics"]["accuracy"] == pytest.approx(trained["accuracy"])
    assert json.loads(evaluated.output)["metrics"]["eval_loss"] == pytest.approx(trained["eval_loss"], rel=1e-4)


@pytest.mark.slow  # a real subprocess or a kill -9: `make test` runs it, the fast loop does not
def test_dora_and_loraplus_resume_exactly_after_kill_9(tiny_models, topic_data, write_recipe, tmp_path):
    def recipe(name):
        r = classification_recipe(
            tiny_models["gpt2"],
            topic_data,
            tmp_path / name,
            epochs=2,
            checkpoint_every=3,
            optimizer="loraplus",
            grad_accum=2,
        )
        r["lora"].update(use_dora=True, dropout=0.1)
        return write_recipe(r, f"{name}.yaml")

    whole, broken = recipe("whole"), recipe("broken")
    assert invoke("run", whole).exit_code == 0
    killed_run("step", 5, broken)
    resumed = invoke("run", broken, "--resume", "auto")
    assert resumed.exit_code == 0, resumed.output
    assert adapter_bytes(tmp_path / "broken") == adapter_bytes(tmp_path / "whole")
    assert log_losses(tmp_path / "broken") == log_losses(tmp_path / "whole")
