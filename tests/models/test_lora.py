import pytest
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from finetune.models.families import FAMILIES
from finetune.models.lora import count_parameters, group_targets, resolve_targets, role_of


def leaves(names):
    return sorted({".".join(n.split(".")[-2:]) for n in names})


def test_bert_attention_and_mlp(tiny_models):
    model = AutoModelForSequenceClassification.from_pretrained(tiny_models["bert"], num_labels=3)
    attention = resolve_targets(model, "attention", FAMILIES["bert"])
    assert leaves(attention) == ["output.dense", "self.key", "self.query", "self.value"]
    assert all(".attention." in n for n in attention)
    mlp = resolve_targets(model, "mlp", FAMILIES["bert"])
    assert leaves(mlp) == ["intermediate.dense", "output.dense"] and not any(".attention." in n for n in mlp)
    assert not any("pooler" in n or "classifier" in n for n in resolve_targets(model, "all_linear", FAMILIES["bert"]))


def test_bart_self_vs_cross_attention(tiny_models):
    model = AutoModelForSequenceClassification.from_pretrained(tiny_models["bart"], num_labels=2)
    cross = resolve_targets(model, "cross_attention", FAMILIES["bart"])
    assert cross and all(".encoder_attn." in n for n in cross)
    self_attn = resolve_targets(model, "self_attention", FAMILIES["bart"])
    assert all(".self_attn." in n for n in self_attn)
    assert {n.rsplit(".", 1)[-1] for n in self_attn} == {"q_proj", "k_proj", "v_proj", "out_proj"}
    assert not any("classification_head" in n for n in resolve_targets(model, "all_linear", FAMILIES["bart"]))
    assert role_of("model.decoder.layers.0.fc1", FAMILIES["bart"]) == "mlp"


def test_gpt2_conv1d_and_llama(tiny_models):
    gpt2 = AutoModelForCausalLM.from_pretrained(tiny_models["gpt2"])
    assert {n.rsplit(".", 1)[-1] for n in resolve_targets(gpt2, "attention", FAMILIES["gpt"])} == {"c_attn", "c_proj"}
    assert {n.rsplit(".", 1)[-1] for n in resolve_targets(gpt2, "mlp", FAMILIES["gpt"])} == {"c_fc", "c_proj"}
    llama = AutoModelForCausalLM.from_pretrained(tiny_models["llama"])
    assert {n.rsplit(".", 1)[-1] for n in resolve_targets(llama, "mlp", FAMILIES["gpt"])} == {
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    with pytest.raises(ValueError, match="no cross_attention layers"):
        resolve_targets(llama, "cross_attention", FAMILIES["gpt"])


def test_explicit_names_and_unknown_name(tiny_models):
    llama = AutoModelForCausalLM.from_pretrained(tiny_models["llama"])
    assert len(resolve_targets(llama, ["q_proj", "v_proj"], FAMILIES["gpt"])) == 4
    with pytest.raises(ValueError, match="'qproj'.*q_proj"):
        resolve_targets(llama, ["qproj"], FAMILIES["gpt"])


def test_classification_head_is_trained_and_base_frozen(tiny_models):
    from finetune.models.lora import apply_lora, head_modules
    from finetune.recipe.schema import LoraSection

    model = AutoModelForSequenceClassification.from_pretrained(tiny_models["bert"], num_labels=3)
    heads = head_modules(model, ("classifier", "score", "pooler"))
    assert heads == ["classifier", "pooler"]
    peft_model = apply_lora(
        model, LoraSection(r=2), resolve_targets(model, "attention", FAMILIES["bert"]), heads, "SEQ_CLS"
    )
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert any("classifier" in n for n in trainable) and any("lora_A" in n for n in trainable)
    assert not any("word_embeddings" in n for n in trainable)
    assert 0 < count_parameters(peft_model)[0] < count_parameters(peft_model)[1]


def test_plan_groups_targets_by_block(tiny_models):
    """The dry-run plan shows self- vs cross-attention without module paths."""
    bart = AutoModelForSequenceClassification.from_pretrained(tiny_models["bart"], num_labels=2)
    layers = bart.config.encoder_layers
    lines = group_targets(resolve_targets(bart, "attention", FAMILIES["bart"]), FAMILIES["bart"])
    assert lines == [
        f"encoder self-attention: k_proj, v_proj, q_proj, out_proj x{layers}",
        f"decoder self-attention: k_proj, v_proj, q_proj, out_proj x{bart.config.decoder_layers}",
        f"decoder cross-attention: k_proj, v_proj, q_proj, out_proj x{bart.config.decoder_layers}",
    ]
    bert = AutoModelForSequenceClassification.from_pretrained(tiny_models["bert"], num_labels=3)
    lines = group_targets(resolve_targets(bert, "all_linear", FAMILIES["bert"]), FAMILIES["bert"])
    n = bert.config.num_hidden_layers
    assert lines == [
        f"encoder self-attention: query, key, value, output x{n}",
        f"encoder mlp: intermediate, output x{n}",
    ]
