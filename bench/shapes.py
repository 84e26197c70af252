"""The shape limit: how fast this machine runs a model's own training matmuls at their real shapes.

The 2048² matmul peak (`bench.measured_peak_flops`) is out of reach for a small model: its matmuls are
[tokens per batch × hidden] by [hidden × hidden, FFN, vocabulary] and, for LoRA, by [hidden × rank], and on
a CPU such thin matmuls run far below the peak. This file measures the limit that matters instead:

1. one real training step of the recipe (its model with LoRA, a batch of its own training data of the median
   padded width, its objective, its precision: bf16 autocast where the recipe resolves to it) runs under
   torch.profiler, which records every matrix product the forward and backward passes execute (`aten::mm`,
   `addmm`, `bmm`, `baddbmm`) with its shapes, strides and dtype;
2. each distinct product is timed again in isolation, on fresh tensors of the same shapes, strides and dtype;
3. the shape limit is the FLOPs of all those products over their summed isolated time: the FLOP/s a step would
   reach if it did nothing but its matmuls, each at the speed this machine gives that shape.

MFU is then reported twice: model FLOP/s (`model_flops_per_token` × real tokens/s) over the 2048² peak, and
over the shape limit. The same step, timed without the profiler, gives the matmul share of a step in-process.

    python bench/shapes.py [--recipe R ...] [KEY=VALUE ...]     (default: the MiniLM and SmolLM2 recipes)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
RECIPES = ("recipes/classification/minilm-topics.yaml", "recipes/qa/smollm2-faq-generative.yaml")

# The matrix products that do a step's FLOPs; linear and matmul dispatch to these, so counting only them counts
# every product once. The value: the operand positions (the rest are a bias or scalars).
MATMUL_OPS = {"aten::mm": (0, 1), "aten::addmm": (1, 2), "aten::bmm": (0, 1), "aten::baddbmm": (1, 2)}
DTYPES = {"float": "float32", "c10::BFloat16": "bfloat16", "c10::Half": "float16", "double": "float64"}


def product_flops(op: str, shapes: list[list[int]]) -> int:
    """2·M·K·N for [M×K]·[K×N] (times the batch for bmm)."""
    a, b = (shapes[i] for i in MATMUL_OPS[op])
    batch = a[0] if len(a) == 3 else 1
    return 2 * batch * a[-2] * a[-1] * b[-1]


def strided(shape: list[int], strides: list[int], dtype) -> object:
    """A random tensor with exactly this shape and these strides (a transposed weight stays transposed)."""
    import torch

    size = 1 + sum((n - 1) * s for n, s in zip(shape, strides)) if all(shape) else 0
    return torch.randn(max(size, 1), dtype=dtype).as_strided(shape, strides)


def time_product(op: str, shapes, strides, dtype_name: str, min_seconds: float = 0.05) -> float:
    """Seconds one call of this product takes on this machine, alone: the fastest of a few timed runs (the limit;
    a busy machine only ever makes a run slower)."""
    import torch

    dtype = getattr(torch, DTYPES[dtype_name])
    args = [
        strided(shapes[i], strides[i], dtype)
        for i in range(len(MATMUL_OPS[op]) + (op in ("aten::addmm", "aten::baddbmm")))
    ]
    function = getattr(torch.ops.aten, op.removeprefix("aten::"))
    for _ in range(3):
        function(*args)
    samples = []
    for _ in range(5):
        calls, start = 0, time.perf_counter()
        while True:
            function(*args)
            calls += 1
            elapsed = time.perf_counter() - start
            if elapsed >= min_seconds / 5:
                break
        samples.append(elapsed / calls)
    return min(samples)


def step_products(events) -> dict[tuple, int]:
    """(op, shapes, strides, dtype) -> how many times the step ran it, from profiler events."""
    products: dict[tuple, int] = {}
    for event in events:
        positions = MATMUL_OPS.get(event.name)
        if positions is None:
            continue
        used = range(len(positions) + (event.name in ("aten::addmm", "aten::baddbmm")))
        key = (
            event.name,
            tuple(tuple(event.input_shapes[i]) for i in used),
            tuple(tuple(event.structured_input_strides[i]) for i in used),
            event.input_dtypes[positions[0]],
        )
        products[key] = products.get(key, 0) + 1
    return products


def model_flops_per_token(session) -> tuple[float, dict]:
    """Training FLOPs per real token: 4 x frozen matmul parameters (forward, and the gradient for their input)
    + 6 x trainable parameters (and their own gradient) + attention (QK^T and AV: 4·T·d forward per token and
    layer, x3 with the backward; T the mean real length). A causal LM's vocabulary head counts only at the
    positions whose next token is scored (labels other than -100): logits elsewhere are work no loss needs, and
    finetune does not make them; a classifier's pooled head counts once a row, which is within rounding."""
    import torch

    from finetune.data.tables import token_lengths

    model = session.model
    dataset = session.features["train"].dataset
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    output = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    head = output.weight.numel() if isinstance(output, torch.nn.Linear) and not output.weight.requires_grad else 0
    frozen = sum(
        m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) and not m.weight.requires_grad
    )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    config = base.config.get_text_config()
    lengths = token_lengths(dataset)
    mean_length = float(lengths.mean())
    scored_share = 1.0
    if head and "labels" in dataset.column_names:
        scored = sum(sum(1 for label in row[1:] if label != -100) for row in dataset["labels"])
        scored_share = scored / float(lengths.sum())
    attention = 12 * config.num_hidden_layers * mean_length * config.hidden_size
    per_token = 4 * (frozen - head) + 4 * head * scored_share + 6 * trainable + attention
    return per_token, {
        "frozen_matmul_params": frozen,
        "vocabulary_head_params": head,
        "scored_token_share": round(scored_share, 4),
        "trainable_params": trainable,
        "mean_tokens_per_example": round(mean_length, 1),
        "flops_per_token": per_token,
    }


class TrainingStep:
    """A recipe's training as `finetune run` sets it up: its session, its batches in the loop's order
    (`LengthGroupedBatches`), the loop's accelerator (its autocast) around the prepared model, and its objective;
    calling it runs one step's forward and backward passes on a batch (no optimizer step) and returns the loss."""

    def __init__(self, recipe: str, overrides: list[str]):
        from finetune.data.tables import token_lengths
        from finetune.flows.resolve import resolve
        from finetune.flows.session import open_session, training_collator
        from finetune.training.loop import LengthGroupedBatches, make_accelerator

        self.resolved = resolve(recipe, overrides)
        self.session = open_session(self.resolved, splits=("train",))
        t = self.session.recipe.train
        features = self.session.features["train"].dataset
        collate = training_collator(self.session)
        window = 64 if t.group_by_length else 1
        sampler = LengthGroupedBatches(token_lengths(features), t.batch_size, t.seed, window=window)
        self.batches = [collate([features[i] for i in rows]) for rows in sampler.batches()]
        self.accelerator = make_accelerator(t, self.resolved.precision)
        self.model = self.accelerator.prepare(self.session.model)  # the loop's autocast around the forward pass
        self.model.train()
        self.objective = self.session.objective

    def __call__(self, batch: dict) -> float:
        total = 0.0
        for part, weight in self.objective.parts(batch):
            loss = self.objective.step(self.model, part).loss * weight
            self.accelerator.backward(loss)
            total += float(loss.detach())
        return total


def shape_limit(recipe: str, overrides: list[str], warmup: int = 2, timed: int = 3) -> dict:
    """The recipe's shape limit (module docstring), with what it was measured on."""
    import torch

    from finetune.training.loop import masked_dropouts, real_tokens

    training = TrainingStep(recipe, overrides)
    resolved, session, model = training.resolved, training.session, training.model
    batch_size = session.recipe.train.batch_size
    batches = [b for b in training.batches if b["input_ids"].shape[0] == batch_size] or training.batches
    batch = sorted(batches, key=lambda b: b["input_ids"].shape[1])[len(batches) // 2]  # the median padded width
    labels = batch.get("labels")
    scored = (
        int((labels[:, 1:] != -100).sum()) if labels is not None and labels.shape == batch["input_ids"].shape else 0
    )

    def step() -> None:
        training(batch)
        model.zero_grad(set_to_none=True)

    with masked_dropouts(model):
        for _ in range(warmup):
            step()
        seconds = []
        for _ in range(timed):
            start = time.perf_counter()
            step()
            seconds.append(time.perf_counter() - start)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
            step()
    products = step_products(prof.events())
    _, facts = model_flops_per_token(session)
    table = []
    for (op, shapes, strides, dtype), count in products.items():
        alone = time_product(op, [list(s) for s in shapes], [list(s) for s in strides], dtype)
        flops = product_flops(op, [list(s) for s in shapes])
        table.append(
            {"op": op, "shapes": shapes, "dtype": DTYPES[dtype], "count": count, "flops": flops, "seconds": alone}
        )
    total_flops = sum(r["flops"] * r["count"] for r in table)
    total_seconds = sum(r["seconds"] * r["count"] for r in table)
    step_seconds = min(seconds)  # as the products: the fastest, the least disturbed by the machine's other work
    tokens = int(real_tokens(batch))
    table.sort(key=lambda r: -r["seconds"] * r["count"])
    return {
        "recipe": recipe,
        "overrides": overrides,
        "precision": resolved.precision,
        "model": facts,
        "batch": {
            "rows": int(batch["input_ids"].shape[0]),
            "padded_width": int(batch["input_ids"].shape[1]),
            "real_tokens": tokens,
            "scored_tokens": scored,
        },
        "matmuls_per_step": sum(r["count"] for r in table),
        "matmul_flops_per_step": total_flops,
        "matmul_seconds_alone": total_seconds,
        "shape_limit_flops": total_flops / total_seconds,
        "shape_limit_tokens_per_s": tokens / total_seconds,
        "step_seconds": step_seconds,
        "step_tokens_per_s": tokens / step_seconds,
        # How much of a step its matmuls would take at their isolated speed: the in-process MFU against the limit.
        "matmul_share_of_step": total_seconds / step_seconds,
        "largest": [
            {**r, "shapes": [list(s) for s in r["shapes"]], "seconds": round(r["seconds"] * r["count"], 5)}
            for r in table[:8]
        ],
    }


def mfu(flops_per_token: float, tokens_per_s: float, peak: float, limit: dict) -> dict:
    """Model FLOP/s over the 2048² peak and over the shape limit."""
    achieved = flops_per_token * tokens_per_s
    return {
        "model_flops_per_s": achieved,
        "mfu_peak_2048": achieved / peak,
        "mfu_shape_limit": achieved / limit["shape_limit_flops"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", action="append", help="a recipe (repeatable); default: the MiniLM and SmolLM2 ones")
    parser.add_argument("overrides", nargs="*", help="section.key=value, applied to every recipe")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench import device_description, measured_peak_flops
    from finetune.files import write_json

    results = []
    peaks: dict[str, float] = {}
    for recipe in args.recipe or RECIPES:
        limit = shape_limit(recipe, args.overrides)
        precision = "bf16" if limit["precision"] == "bf16" else "fp32"
        peaks.setdefault(precision, measured_peak_flops(precision))
        limit["peak_flops_2048"] = peaks[precision]
        # The step timed here, in-process: MFU of that step against both denominators.
        limit["in_process"] = mfu(
            limit["model"]["flops_per_token"], limit["step_tokens_per_s"], peaks[precision], limit
        )
        results.append(limit)
        print(json.dumps({k: v for k, v in limit.items() if k != "largest"}, indent=2), flush=True)
    document = {"device": device_description(), "command": " ".join(sys.argv), "recipes": results}
    stamp = time.strftime("%Y%m%d-%H%M%S")
    write_json(RESULTS / f"{stamp}-shapes.json", document)
    print(f"written to bench/results/{stamp}-shapes.json")


if __name__ == "__main__":
    main()
