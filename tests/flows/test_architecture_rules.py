"""What a checkpoint's architecture allows, decided from its config by validate as by run (an architecture tester
found each of these passed by validate, then refused, crashed or silently wrong in run)."""

from __future__ import annotations

import shutil

import pytest
from conftest import classification_recipe
from helpers import invoke
from transformers import AutoConfig

from tests.tasks.test_generation import copy_data, generation_recipe  # noqa: F401 (the fixture)


def _checkpoint(tiny_models, tmp_path, kind: str, model_type: str, **sizes) -> str:
    """A config of `model_type` beside a tiny tokenizer: all validate reads of a checkpoint."""
    folder = tmp_path / model_type
    shutil.copytree(tiny_models[kind], folder)
    for weights in folder.glob("*.safetensors"):
        weights.unlink()
    AutoConfig.for_model(model_type, **sizes).save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("model_type", ["opt", "bloom"])
def test_packing_is_refused_where_attention_crosses_examples(
    tiny_models,
    tmp_path,
    copy_data,  # noqa: F811
    write_recipe,
    model_type,
):
    """OPT builds its own mask and BLOOM uses ALiBi without position ids: packed examples attended across each
    other (packed loss 6.0162 against 6.0189 padded), silently."""
    model = _checkpoint(tiny_models, tmp_path, "gpt2", model_type, vocab_size=256)
    recipe = generation_recipe("copywriting", model, copy_data, tmp_path / "run", train={"packing": True})
    refused = invoke("validate", write_recipe(recipe))
    assert refused.exit_code == 2 and f"train.packing: '{model_type}' models are not known to keep" in refused.output


@pytest.mark.parametrize(
    ("model_type", "kind", "task"),
    [("pegasus", "bart", "classification"), ("gemma", "llama", "qa")],
)
def test_a_task_whose_head_the_architecture_lacks_is_refused(
    tiny_models, tmp_path, write_recipe, topic_data, model_type, kind, task
):
    model = _checkpoint(tiny_models, tmp_path, kind, model_type, vocab_size=256)
    recipe = classification_recipe(model, topic_data, tmp_path / "run")
    if task == "qa":
        recipe.update(task="qa", mode="extractive")
    refused = invoke("validate", write_recipe(recipe))
    assert refused.exit_code == 2, refused.output
    head = "AutoModelForSequenceClassification" if task == "classification" else "AutoModelForQuestionAnswering"
    assert f"transformers has no {head} for model_type '{model_type}'" in refused.output


def test_mpnet_positions_count_on_from_its_padding_index(tiny_models, tmp_path, topic_data, write_recipe):
    """MPNet's positions start after its padding index, 1 whatever the config's pad id: max_length 256 on 256
    positions passed validate and crashed at the first step (index out of range); so does 255."""
    model = _checkpoint(
        tiny_models, tmp_path, "bert", "mpnet", vocab_size=256, max_position_embeddings=256, pad_token_id=0
    )
    recipe = classification_recipe(model, topic_data, tmp_path / "run")
    recipe["data"]["max_length"] = 256
    refused = invoke("validate", write_recipe(recipe))
    assert refused.exit_code == 2 and "(254 positions)" in refused.output, refused.output
    recipe["data"]["max_length"] = 254
    fits = invoke("validate", write_recipe(recipe))
    assert fits.exit_code == 0, fits.output
