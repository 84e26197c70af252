"""How fast the learned watermark learns on the tests' tiny decoder, under the real loop's optimizer and schedule.

The measurement behind docs/watermarks.md. Each variant trains the
watermark's modules alone (the decoder is frozen, as the base model is; a LoRA would sit in its own param group,
which AdamW updates independently) for `--steps` steps through the loop's make_optimizer with the recipe's linear
schedule (10% warmup), loss weights and noise, and reports the training batches' bit accuracy and greedy bit
accuracy on fresh prompts with fresh messages. `--width` builds a wider decoder (SmolLM2-135M is 576 wide) and
`--sharpen` scales its head until it is as sure of its tokens as a tuned model.
Run: .venv/bin/python bench/watermark_learned.py [--steps 30] [--seeds 5] [--width 256 --sharpen 2.5]
     [--variants "NAME={'lr': 1e-2, 'bits': 16};..."]   (WatermarkSection settings over RECIPE below)
"""

from __future__ import annotations

import argparse
import ast
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))  # the repository root: run as a script

from finetune.recipe.schema import PreferenceSection, TrainSection
from finetune.training.loop import make_optimizer
from finetune.training.objectives import Objective
from finetune.training.watermark_objective import LearnedWatermarkObjective
from finetune.watermark import learned
from tests.watermark.test_learned import VOCAB, batch, settings, tiny_decoder

# The shipped recipe's settings (recipes/copywriting/smollm2-learned-watermark.yaml) then, at the tiny decoder's
# size, with 8 bits (the recipe's 16 learn far slower: docs/watermarks.md).
RECIPE = {"bits": 8, "extractor_width": 32, "embedder_layers": 2, "extractor_layers": 2, "kl_weight": 0.1, "noise": 0.1}


def greedy_accuracy(model, watermark, rows: int = 32, tokens: int = 16) -> float:
    """Bits read back from greedy generations of fresh prompts, each marked with a fresh message."""
    state = torch.get_rng_state()
    torch.manual_seed(11)
    hits = []
    for _ in range(rows // 4):
        message = torch.randint(0, 2, (watermark.layout.bits,))
        with watermark.messages(message), torch.no_grad():
            prompts = torch.randint(3, VOCAB, (4, 4))
            text = model.generate(prompts, max_new_tokens=tokens, do_sample=False, pad_token_id=0)[:, 4:]
            bits = watermark.read_ids(text, torch.ones_like(text, dtype=torch.bool)) > 0
        hits.append((bits == message.bool()).float().mean())
    torch.set_rng_state(state)
    return float(torch.stack(hits).mean())


def decoder(seed: int, sharpen: float, width: int):
    """The tests' tiny decoder, or one as wide as `width` (SmolLM2-135M: 576), to see how the step sizes scale."""
    if width == 32:
        return tiny_decoder(seed=seed, sharpen=sharpen)
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=2,
        num_attention_heads=max(2, width // 64),
        num_key_value_heads=1,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    model = AutoModelForCausalLM.from_config(config).eval()
    model.lm_head.weight.data *= sharpen
    model.requires_grad_(False)
    return model


def run(variant: dict, seed: int, steps: int, sharpen: float, lora_lr: float, rows: int, width: int) -> dict:
    model = decoder(seed, sharpen, width)
    variant = dict(variant)
    open_gate = variant.pop("open_gate", None)
    mark = settings(**{**RECIPE, **variant})
    torch.manual_seed(seed)
    watermark = learned.fresh(model, mark, "10110010")
    if open_gate is not None:  # closed by a zero output projection instead of a zero gate
        for block in watermark.blocks:
            assert isinstance(block, learned.GatedCrossAttention)
            block.attention.out_proj.weight.data.zero_()
            block.attention.out_proj.bias.data.zero_()
            block.gate.data.fill_(open_gate)
    objective = LearnedWatermarkObjective(Objective(PreferenceSection(), encoder_decoder=False), mark)
    t = TrainSection(lr=lora_lr, max_steps=steps, warmup=0.1)
    optimizer = make_optimizer(model, t)
    from transformers import get_scheduler

    scheduler = get_scheduler(
        "linear", optimizer, num_warmup_steps=max(1, round(0.1 * steps)), num_training_steps=steps
    )
    accuracy, gates = [], []
    torch.manual_seed(100 + seed)
    for _ in range(steps):
        step = objective.step(model, batch(rows, completion=16))
        optimizer.zero_grad()
        step.loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        scheduler.step()
        accuracy.append(step.stats["watermark_bit_accuracy"])
        gates.append(step.stats["watermark_gate"])
    first = next((i + 1 for i in range(steps) if statistics.mean(accuracy[max(0, i - 4) : i + 1]) >= 0.8), None)
    return {
        "train_last10": statistics.mean(accuracy[-10:]),
        "steps_to_0.8": first,
        "gate": gates[-1],
        "kl": float(step.stats["watermark_kl"]),
        "greedy": greedy_accuracy(model, watermark),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=42)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--sharpen", type=float, default=10.0)
    parser.add_argument("--lora-lr", type=float, default=2e-3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--width", type=int, default=32, help="the decoder's hidden width (the tests': 32)")
    parser.add_argument("--variants", default="", help="NAME={settings};... (Python dict literals)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    variants: dict[str, dict] = {
        "before: one group (lr 2e-3), kl 0.1": {"lr": None},
        "watermark lr 1e-2, kl 0.1": {"lr": 1e-2},
        "one group (lr 2e-3), kl 0.01": {"kl_weight": 0.01, "lr": None},
        "watermark lr 1e-2, kl 0.01": {"lr": 1e-2, "kl_weight": 0.01},
        "watermark lr 3e-2, kl 0.01": {"lr": 3e-2, "kl_weight": 0.01},
    }
    if args.variants:
        variants = {name: ast.literal_eval(spec) for name, spec in (v.split("=", 1) for v in args.variants.split(";"))}
    for name, variant in variants.items():
        start = time.perf_counter()
        results = [
            run(variant, seed, args.steps, args.sharpen, args.lora_lr, args.batch, args.width)
            for seed in range(args.seeds)
        ]
        reached = [r["steps_to_0.8"] for r in results]
        print(
            f"{name:45s} train acc (last 10) {statistics.mean(r['train_last10'] for r in results):.3f}  "
            f"greedy {statistics.mean(r['greedy'] for r in results):.3f} "
            f"[{' '.join(format(r['greedy'], '.2f') for r in results)}]  steps to 0.8 {reached}  "
            f"gate {statistics.mean(r['gate'] for r in results):.3f}  kl {statistics.mean(r['kl'] for r in results):.4f}"
            f"  ({time.perf_counter() - start:.0f} s)",
            flush=True,
        )


if __name__ == "__main__":
    main()
