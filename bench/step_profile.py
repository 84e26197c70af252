"""Where a recipe's training step spends its time, and what two levers do to it, in one process.

The recipe's own session, batches (`LengthGroupedBatches`, as the loop draws them), accelerator (its autocast) and
`masked_dropouts`, as `finetune run` trains; two warm-up steps, then:

- `profile`: `torch.profiler` over `--steps` steps (with `recast_frozen_weights`, as the loop runs), self CPU time
  by operator (top 25), as JSON rows;
- `compile`: each transformer block compiled (`torch.compile(dynamic=True)`), the first step's time (compilation
  included) and `--steps` steps against the same steps eager, in the same process;
- `bf16-frozen`: every frozen `nn.Linear` of the base (not the embeddings or a head tied to them) stored in bf16
  instead of being cast by autocast at each forward: the loss and every LoRA gradient on one batch and seed
  compared with the autocast run's (the maximum absolute difference), and the time of `--steps` steps of each.

    python bench/step_profile.py --recipe R [--mode profile|compile|bf16-frozen] [--steps N] [KEY=VALUE ...]

Prints one JSON document (and writes it with `--output F`). Times on a shared machine are loose; compare the two
halves of one invocation only.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def timed(step, model, batches: list[dict]) -> float:
    start = time.perf_counter()
    for batch in batches:
        step(batch)
        model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def frozen_linears_to_bf16(model: torch.nn.Module) -> int:
    tied = {m.weight.data_ptr() for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    converted = 0
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(module, torch.nn.Linear) or weight is None or weight.requires_grad or "lora_" in name:
            continue
        if weight.data_ptr() in tied:
            continue
        module.weight.data = weight.data.to(torch.bfloat16)
        if module.bias is not None:
            module.bias.data = module.bias.data.to(torch.bfloat16)
        converted += 1
    return converted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--mode", choices=("profile", "compile", "bf16-frozen"), default="profile")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--output", type=Path)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    from shapes import TrainingStep  # bench/shapes.py, beside this file

    from finetune.training.loop import masked_dropouts

    step = TrainingStep(args.recipe, args.overrides)
    model, batches, precision = step.model, step.batches, step.resolved.precision
    warm, measured = batches[:2], batches[2 : 2 + args.steps]
    report: dict = {"recipe": args.recipe, "overrides": args.overrides, "precision": precision, "mode": args.mode}
    report["batches"] = [list(b["input_ids"].shape) for b in measured]
    with masked_dropouts(model):
        timed(step, model, warm)
        if args.mode == "profile":
            from torch.profiler import ProfilerActivity, profile

            from finetune.training.loop import recast_frozen_weights

            with recast_frozen_weights(model), profile(activities=[ProfilerActivity.CPU]) as prof:  # as `train` runs
                timed(step, model, measured)
            events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
            total = sum(e.self_cpu_time_total for e in events)
            report["self_cpu_seconds"] = total / 1e6
            report["operators"] = [
                {"name": e.key, "self_share": round(e.self_cpu_time_total / total, 4), "calls": e.count}
                for e in events[:25]
            ]
        elif args.mode == "compile":
            report["eager_seconds"] = timed(step, model, measured)
            blocks = getattr(model.get_base_model(), "_no_split_modules", None) or []
            compiled = 0
            for module in model.modules():
                if type(module).__name__ in blocks:
                    module.compile(dynamic=True)
                    compiled += 1
            report["compiled_blocks"] = compiled
            report["first_compiled_step_seconds"] = timed(step, model, warm[:1])
            report["compiled_seconds"] = timed(step, model, measured)
        else:
            first = batches[0]
            torch.manual_seed(0)
            loss_cast = step(first)
            grads_cast = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            model.zero_grad(set_to_none=True)
            report["autocast_seconds"] = timed(step, model, measured)
            report["converted_linears"] = frozen_linears_to_bf16(model)
            torch.manual_seed(0)
            loss_stored = step(first)
            grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
            report["loss"] = {"autocast": loss_cast, "bf16_stored": loss_stored}
            report["max_gradient_difference"] = max(float((grads_cast[n] - g).abs().max()) for n, g in grads.items())
            report["gradient_tensors"] = len(grads)
            model.zero_grad(set_to_none=True)
            report["bf16_stored_seconds"] = timed(step, model, measured)
    text = json.dumps(report, indent=2)
    print(text)
    if args.output:
        args.output.write_text(text + "\n")


if __name__ == "__main__":
    main()
