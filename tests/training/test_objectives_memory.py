"""Logits and loss only where the labels are (training/objectives.py): the chunked cross-entropy equals torch's
cross_entropy on full logits, in value and gradient; the SFT loss and its LoRA gradients equal the model's own
(padded and packed batches, GPT-2 and Llama); a model whose logits are more than its head (soft-capping) is scored
from its own logits; and no [tokens x vocabulary] tensor is kept for the backward pass."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from finetune.recipe.schema import PreferenceSection
from finetune.training import objectives
from finetune.training.objectives import IGNORE, LinearCrossEntropy, Objective, next_token_logps, plain_head


def _reference_nll(hidden, weight, bias, targets, temperature):
    return F.cross_entropy(F.linear(hidden, weight, bias).float() / temperature, targets, reduction="none")


@pytest.mark.parametrize(("temperature", "with_bias"), [(1.0, False), (0.7, True)])
def test_chunked_cross_entropy_equals_full_logits_in_value_and_gradient(monkeypatch, temperature, with_bias):
    vocab, width, rows = 97, 24, 50
    # 7 rows a chunk: several chunks and a ragged last one.
    monkeypatch.setattr(objectives, "CHUNK_BYTES", 8 * vocab * 7)
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(rows, width, generator=generator, dtype=torch.float64)
    weight = torch.randn(vocab, width, generator=generator, dtype=torch.float64)
    bias = torch.randn(vocab, generator=generator, dtype=torch.float64) if with_bias else None
    targets = torch.randint(0, vocab, (rows,), generator=generator)
    upstream = torch.randn(rows, generator=generator, dtype=torch.float64)  # a different weight per row

    ours_h = hidden.clone().requires_grad_()
    ours = LinearCrossEntropy.apply(ours_h, weight, bias, targets, temperature, torch.float64, True)
    (ours.double() * upstream).sum().backward()
    theirs_h = hidden.clone().requires_grad_()
    theirs = F.cross_entropy(F.linear(theirs_h, weight, bias) / temperature, targets, reduction="none")
    (theirs * upstream).sum().backward()

    assert torch.allclose(ours.double(), theirs, rtol=1e-6, atol=1e-6)
    assert torch.allclose(ours_h.grad, theirs_h.grad, rtol=1e-6, atol=1e-9)


def test_chunked_cross_entropy_under_bf16_autocast_matches_the_full_path():
    """Under autocast the projection runs in bf16 and the softmax in float32, as the model's head and
    transformers' loss do; what remains is the rounding of bf16 logits."""
    vocab, width, rows = 311, 32, 40
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(rows, width, generator=generator)
    weight = torch.randn(vocab, width, generator=generator) * 0.2
    targets = torch.randint(0, vocab, (rows,), generator=generator)
    ours_h, theirs_h = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = LinearCrossEntropy.apply(ours_h, weight, None, targets, 1.0, torch.bfloat16, True)
        theirs = F.cross_entropy(F.linear(theirs_h, weight).float(), targets, reduction="none")
    ours.mean().backward()
    theirs.mean().backward()
    assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-4)
    assert torch.allclose(ours_h.grad, theirs_h.grad, rtol=2e-2, atol=2e-4)


def _lora_model(model_dir, targets):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))


def _padded_batch(pad_id: int = 0) -> dict:
    """Three rows: prompt tokens without labels, completions with labels, right padding."""
    rows = [([5, 6, 7], [8, 9, 10, 11]), ([12, 13], [14]), ([15, 16, 17, 18, 19], [20, 21])]
    width = max(len(p) + len(c) for p, c in rows)
    ids, mask, labels = [], [], []
    for prompt, completion in rows:
        pad = width - len(prompt) - len(completion)
        ids.append(prompt + completion + [pad_id] * pad)
        mask.append([1] * (len(prompt) + len(completion)) + [0] * pad)
        labels.append([IGNORE] * len(prompt) + completion + [IGNORE] * pad)
    return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask), "labels": torch.tensor(labels)}


def _packed(batch: dict) -> dict:
    """The padded rows as transformers' packing lays them out: one row, positions restarting per example."""
    from finetune.tasks.text2text import PackedCollator

    rows = []
    for ids, mask, labels in zip(batch["input_ids"], batch["attention_mask"], batch["labels"]):
        n = int(mask.sum())
        rows.append({"input_ids": ids[:n].tolist(), "labels": labels[:n].tolist()})
    return PackedCollator()(rows)


def _lora_grads(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(("kind", "targets"), [("gpt2", ["c_attn", "c_fc"]), ("llama", ["q_proj", "v_proj"])])
@pytest.mark.parametrize("packed", [False, True])
def test_sft_loss_and_gradients_equal_the_models_own(tiny_models, kind, targets, packed):
    model = _lora_model(tiny_models[kind], targets)
    model.eval()  # no dropout: both sides run the same network
    batch = _padded_batch()
    if packed:
        batch = _packed(batch)
    assert plain_head(model, batch["input_ids"]) is not None  # the chunked path is the one under test

    ours = Objective(PreferenceSection(), encoder_decoder=False).step(model, batch).loss
    ours.backward()
    ours_grads = _lora_grads(model)
    model.zero_grad()
    theirs = model(**batch).loss
    theirs.backward()
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-6)
    for name, grad in _lora_grads(model).items():
        assert torch.allclose(ours_grads[name], grad, rtol=1e-5, atol=1e-7), name


def test_log_probabilities_equal_log_softmax_of_the_full_logits(tiny_models):
    """What DPO, KTO and GRPO score (GRPO at its sampling temperature)."""
    model = _lora_model(tiny_models["llama"], ["q_proj", "v_proj"])
    model.eval()
    batch = _padded_batch()
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    ours, mask = next_token_logps(model, inputs, batch["labels"], temperature=0.7)
    logits = model(**inputs).logits[:, :-1].float() / 0.7
    targets = batch["labels"][:, 1:]
    expected = torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    assert torch.equal(mask, targets != IGNORE)
    assert torch.allclose(ours[mask], expected[mask], atol=1e-6)
    assert (ours[~mask] == 0).all()


def test_soft_capped_logits_are_scored_from_the_models_own(tmp_path):
    """Gemma 2 soft-caps its logits after the head: the probe sees it, and the loss is still the model's."""
    from transformers import AutoModelForCausalLM, Gemma2Config

    torch.manual_seed(0)
    config = Gemma2Config(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        final_logit_softcapping=2.0,
    )
    model = AutoModelForCausalLM.from_config(config).eval().requires_grad_(False)  # a frozen head, as under LoRA
    with torch.no_grad():  # logits of a few units, so that the cap changes them (a tiny model's are ~0.01)
        model.get_output_embeddings().weight.mul_(50)
    batch = _padded_batch()
    assert plain_head(model, batch["input_ids"]) is None
    ours = Objective(PreferenceSection(), encoder_decoder=False).step(model, batch).loss
    assert ours.item() == pytest.approx(model(**batch).loss.item(), rel=1e-6)
    logps, mask = next_token_logps(model, {k: batch[k] for k in ("input_ids", "attention_mask")}, batch["labels"])
    expected = torch.log_softmax(model(**batch).logits[:, :-1].float(), -1)
    expected = expected.gather(-1, batch["labels"][:, 1:].clamp(min=0).unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(logps[mask], expected[mask], atol=1e-6)


def test_no_vocabulary_sized_activation_is_kept_for_the_backward(tiny_models):
    """The largest tensors of a decoder's training step were its float32 logits and their log-softmax, [rows x
    width x vocabulary], kept until the backward pass. Now only the one position transformers projects
    (logits_to_keep=1, unused) is; the model's own loss, measured the same way, keeps the whole of them."""
    model = _lora_model(tiny_models["gpt2"], ["c_attn", "c_fc"])
    vocab = model.get_output_embeddings().weight.shape[0]
    batch = _padded_batch()

    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def largest_vocabulary_rows(loss_of) -> int:
        """Rows of the largest vocabulary-wide tensor saved for the backward pass (the head's own weight, saved
        as an expanded view, is no activation)."""
        rows = [0]

        def pack(tensor):
            storage = tensor.untyped_storage()
            if tensor.dim() and tensor.shape[-1] == vocab and storage.data_ptr() not in weights:
                rows.append(storage.nbytes() // tensor.element_size() // vocab)
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss_of()
        return max(rows)

    objective = Objective(PreferenceSection(), encoder_decoder=False)
    ours = largest_vocabulary_rows(lambda: objective.step(model, batch).loss)
    theirs = largest_vocabulary_rows(lambda: model(**batch).loss)
    rows = batch["input_ids"].shape[0]
    assert theirs >= batch["input_ids"].numel()  # the check sees the full logits where they are kept
    assert ours <= rows


def test_the_models_own_head_copy_is_freed_before_the_chunks_make_theirs(tiny_models, monkeypatch):
    """Under bf16 autocast the model's one position of logits keeps a bf16 copy of the head's weight for its
    backward pass; `next_token_logps` drops that output before `LinearCrossEntropy` casts the weight again, so the
    two vocabulary x hidden copies never coexist at the step's peak (the end of the forward pass)."""
    import weakref

    model = _lora_model(tiny_models["llama"], ["q_proj", "v_proj"])
    weight = model.get_output_embeddings().weight
    copies: list[weakref.ref] = []  # every bf16 copy of the head weight saved for a backward pass

    def pack(tensor):
        # (saved as the transposed view the matmul reads)
        if tensor.shape in (weight.shape, weight.t().shape) and tensor.dtype == torch.bfloat16:
            copies.append(weakref.ref(tensor))
        return tensor

    alive_at_chunks: list[int] = []
    forward = LinearCrossEntropy.forward

    def watched(ctx, *args):
        alive_at_chunks.append(sum(ref() is not None for ref in copies))
        return forward(ctx, *args)

    monkeypatch.setattr(LinearCrossEntropy, "forward", staticmethod(watched))
    batch = _padded_batch()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), torch.autocast("cpu", torch.bfloat16):
        loss = Objective(PreferenceSection(), encoder_decoder=False).step(model, batch).loss
    assert copies  # the model's head did keep one (the check sees it)
    assert alive_at_chunks == [0]
    loss.backward()
