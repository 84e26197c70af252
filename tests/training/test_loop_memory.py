"""The training loop's memory measures change no number: `MaskedDropout` draws the same masks as `nn.Dropout` and
gives the same outputs and gradients, bit for bit, while keeping a 1-byte mask for the backward pass where PyTorch
keeps noise in the input's dtype (a quarter of the bytes in float32); `recast_frozen_weights` gives autocast's
outputs and gradients, bit for bit, without keeping a low-precision copy of any frozen weight for the backward pass."""

from __future__ import annotations

import math
import os

import pytest
import torch

from finetune.training.loop import MaskedDropout, masked_dropouts, recast_frozen_weights


def _saved_bytes(run) -> int:
    seen: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = run()
    return out, sum(seen.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masked_dropout_is_nn_dropout_bit_for_bit_with_a_quarter_of_the_memory(dtype):
    x = torch.randn(8, 33, 64).to(dtype)
    upstream = torch.randn(8, 33, 64).to(dtype)
    results = []
    for module in (torch.nn.Dropout(0.05), MaskedDropout(0.05)):
        torch.manual_seed(123)
        leaf = x.clone().requires_grad_()
        out, saved = _saved_bytes(lambda: module(leaf))  # noqa: B023
        out.backward(upstream)
        results.append((out.detach(), leaf.grad, saved, torch.rand(1)))
    (ref_out, ref_grad, ref_saved, ref_next), (out, grad, saved, next_draw) = results
    assert torch.equal(out, ref_out) and torch.equal(grad, ref_grad)
    assert torch.equal(next_draw, ref_next)  # the generator moved on exactly as far
    assert saved * x.element_size() <= ref_saved  # a 1-byte mask where PyTorch keeps noise in x's dtype
    assert torch.equal(MaskedDropout(0.05).eval()(x), x)


def test_masked_dropouts_swap_lora_dropout_while_training_and_put_it_back(tiny_models):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    def lora_grads(swap: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"])
        config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3, target_modules="all-linear", init_lora_weights=False)
        model = get_peft_model(model, config).train()
        ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(1))
        torch.manual_seed(7)
        if swap:
            with masked_dropouts(model):
                assert {type(m) for m in model.modules() if isinstance(m, (torch.nn.Dropout, MaskedDropout))} == {
                    MaskedDropout
                }
                model(input_ids=ids, labels=ids).loss.backward()
            assert not any(isinstance(m, MaskedDropout) for m in model.modules())  # put back
        else:
            model(input_ids=ids, labels=ids).loss.backward()
        return {name: p.grad for name, p in model.named_parameters() if p.requires_grad}

    plain, masked = lora_grads(False), lora_grads(True)
    assert plain.keys() == masked.keys()
    assert all(torch.equal(plain[name], masked[name]) for name in plain)


def test_recast_frozen_weights_is_autocast_bit_for_bit_without_its_weight_copies(tiny_models):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"])
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", init_lora_weights=False)
    model = get_peft_model(model, config).train()
    frozen = [m.weight for m in model.modules() if type(m) is torch.nn.Linear and not m.weight.requires_grad]
    shapes = {tuple(w.shape) for w in frozen} | {tuple(w.t().shape) for w in frozen}
    ids = torch.randint(3, 100, (3, 14), generator=torch.Generator().manual_seed(1))

    def step(recast: bool):
        model.zero_grad(set_to_none=True)
        copies = []

        def pack(tensor):
            if tensor.dtype == torch.bfloat16 and tuple(tensor.shape) in shapes:
                copies.append(tuple(tensor.shape))
            return tensor

        with recast_frozen_weights(model, recast), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
        return loss.detach(), grads, copies

    plain_loss, plain_grads, plain_copies = step(False)
    loss, grads, copies = step(True)
    assert plain_copies  # autocast keeps bf16 copies of the frozen weights (the check sees them)
    assert copies == []
    assert torch.equal(loss, plain_loss)
    assert plain_grads.keys() == grads.keys() and all(torch.equal(plain_grads[n], grads[n]) for n in grads)
    assert all("forward" not in vars(m) for m in model.modules())  # put back


def test_train_recasts_frozen_weights_so_no_bf16_weight_copy_is_kept(tiny_models):
    """The loop itself enters `recast_frozen_weights`: under bf16 autocast on a CPU, no training step keeps a
    low-precision copy of a frozen weight for its backward pass (each would be one of the shapes seen below)."""
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from finetune.recipe.schema import TrainSection
    from finetune.training.loop import make_accelerator, train

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"])
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules="all-linear")
    model = get_peft_model(model, config)
    frozen = [m.weight for m in model.modules() if type(m) is torch.nn.Linear and not m.weight.requires_grad]
    shapes = {tuple(w.shape) for w in frozen} | {tuple(w.t().shape) for w in frozen}
    generator = torch.Generator().manual_seed(1)
    rows = [{"input_ids": torch.randint(3, 100, (10,), generator=generator).tolist()} for _ in range(8)]
    features = Dataset.from_list([{**r, "attention_mask": [1] * 10, "labels": r["input_ids"]} for r in rows])

    def collate(batch: list[dict]) -> dict:
        return {k: torch.tensor([r[k] for r in batch]) for k in ("input_ids", "attention_mask", "labels")}

    seen: list[tuple[int, ...]] = []

    def pack(tensor):
        if tensor.dtype == torch.bfloat16 and tuple(tensor.shape) in shapes:
            seen.append(tuple(tensor.shape))
        return tensor

    settings = TrainSection(epochs=1, batch_size=4, lr=1e-3, seed=0)
    accelerator = make_accelerator(settings, "bf16")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = train(model, features, collate, settings, accelerator, None)
    assert result.steps == 2 and math.isfinite(result.final_loss)
    assert seen == []
    assert all("forward" not in vars(m) for m in model.modules() if type(m) is torch.nn.Linear)  # put back


def test_return_freed_memory_gives_the_free_heap_back():
    """Tensors freed in the heap stay resident (glibc keeps them for later allocations) until
    `return_freed_memory` hands them back: RSS falls by most of what was freed; a collection alone does not."""
    import ctypes
    import gc

    from finetune.training.loop import return_freed_memory

    try:
        ctypes.CDLL(None).malloc_trim  # noqa: B018
    except AttributeError:
        pytest.skip("not glibc: no malloc_trim")

    def rss_mib() -> float:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    return_freed_memory()
    # 64 KiB blocks: below glibc's smallest mmap threshold, so they live in the heap; the last one stays alive at
    # the heap's top, so free() cannot shrink the heap on its own.
    blocks = [torch.ones(16384) for _ in range(3200)]  # 200 MiB, touched
    keep = blocks.pop()
    held = rss_mib()
    del blocks
    gc.collect()
    after_collect = rss_mib()
    return_freed_memory()
    after_return = rss_mib()
    assert held - after_collect < 50  # freed, yet still resident
    assert after_collect - after_return > 150  # given back
    del keep
