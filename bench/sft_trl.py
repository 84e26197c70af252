"""Generative SFT: finetune against TRL's SFTTrainer + peft, side by side, in one invocation.

Both contenders train the same model on the same rows with the same recipe settings (by default the shipped
SmolLM2 generative QA recipe for 1 epoch: batch 8, max_length 256, LoRA on all linear layers), each as a fresh
process so that its peak resident memory is its own, alternating the order round by round so drift on a noisy
machine hits both. finetune runs its whole command (`finetune run`: data report, training, held-out evaluation
with generation, the run directory); the peer trains only (`bench/peer_sft_trl.py`). Reported per contender:
whole-process wall time, training seconds and real (non-padding) training tokens/s, peak RSS; and the ratios
finetune / peer; MFU against the 2048² bf16/fp32 peak and, for finetune, against the model's shape limit (its own
training matmuls at their real shapes, timed alone: bench/shapes.py). `--variant LABEL=DIR` also runs finetune from
another source tree (e.g. the code before a change, `DIR/finetune`), in the same rounds, so a before/after pair is
measured beside the same peer. Written to `bench/results/<time>-sft-trl.json` with the machine's description.

    python bench/sft_trl.py [--recipe R] [--rounds N] [--variant LABEL=DIR ...] [KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shapes import shape_limit

from bench import device_description, measure, measured_peak_flops

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
RECIPE = "recipes/qa/smollm2-faq-generative.yaml"
# The judged setting: one pass over the rows (the shipped recipe trains two).
DEFAULTS = ["train.epochs=1"]


def run_finetune(recipe: str, overrides: list[str], scratch: Path, source: str | None = None) -> dict:
    out = scratch / "finetune-run"
    # `source`: a directory holding another `finetune` package, imported first (PYTHONPATH beats the editable install).
    # `-P` keeps `python -m` from putting the working directory (this repository, where `measure` runs it) ahead of
    # PYTHONPATH: without it every variant imported this tree's `finetune`, not its own.
    env = None if source is None else {**os.environ, "PYTHONPATH": source}
    safe_path = [] if source is None else ["-P"]
    # --overwrite: every round replaces the previous round's scratch run.
    wall, rss, _ = measure(
        [sys.executable, *safe_path, "-m", "finetune", "run", recipe, *overrides, f"output.dir={out}", "--overwrite"],
        env,
    )
    document = json.loads((out / "metrics.json").read_text())
    training = document["training"]
    return {
        "process_seconds": wall,
        "peak_rss_mib": rss,
        "train_seconds": training["train_seconds"],
        "tokens_per_s": training["tokens_per_s"],
        "final_loss": training["final_loss"],
        "metrics": document["metrics"],
    }


def run_peer(recipe: str, overrides: list[str], precision: str = "default") -> dict:
    environment = {**os.environ, "PEER_PRECISION": precision}
    wall, rss, stdout = measure(
        [sys.executable, str(ROOT / "bench" / "peer_sft_trl.py"), recipe, *overrides], env=environment
    )
    report = json.loads(stdout.strip().splitlines()[-1])
    return {
        "process_seconds": wall,
        "peak_rss_mib": rss,
        "train_seconds": report["train_seconds"],
        "tokens_per_s": report["tokens_per_s"],
        "final_loss": report["final_loss"],
        "precision": report["precision"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default=RECIPE)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--variant", action="append", default=[], help="LABEL=DIR: also run finetune from DIR/finetune (repeatable)"
    )
    parser.add_argument(
        "--peer-precision",
        choices=("default", "fp32"),
        default="default",
        help="default: TRL's own (bf16 autocast, emulated on a CPU without native bf16); fp32: TRL told fp32",
    )
    parser.add_argument("overrides", nargs="*", help="section.key=value, applied to both contenders")
    args = parser.parse_args()
    overrides = [*DEFAULTS, *args.overrides]

    from finetune.flows.resolve import resolve
    from finetune.outputs.manifest import library_versions

    precision = resolve(args.recipe, overrides).precision
    variants = dict(v.split("=", 1) for v in args.variant)
    finetunes = ["finetune", *variants]
    peak = measured_peak_flops("bf16" if precision == "bf16" else "fp32")
    rounds = []
    with tempfile.TemporaryDirectory() as scratch:
        for number in range(args.rounds):
            order = [*finetunes, "peer"] if number % 2 == 0 else ["peer", *finetunes[::-1]]
            results = {}
            for name in order:
                results[name] = (
                    run_peer(args.recipe, overrides, args.peer_precision)
                    if name == "peer"
                    else run_finetune(args.recipe, overrides, Path(scratch), variants.get(name))
                )
                print(f"round {number + 1} {name}: {json.dumps(results[name])}", flush=True)
            rounds.append(results)

    # The model's own training matmuls at their real shapes, timed alone: the limit MFU is also reported against.
    # Measured after the rounds, so that the parent holds no model while the contenders' memory is measured.
    limit = shape_limit(args.recipe, overrides)
    per_token = limit["model"]["flops_per_token"]
    numeric = ("process_seconds", "peak_rss_mib", "train_seconds", "tokens_per_s", "final_loss")
    names = [*finetunes, "peer"]
    summary = {name: {key: statistics.median(r[name][key] for r in rounds) for key in numeric} for name in names}
    for name in names:
        achieved = per_token * summary[name]["tokens_per_s"]
        summary[name]["mfu_peak_2048"] = achieved / peak
        if name != "peer":  # the shapes are finetune's steps (its batches, precision and head)
            summary[name]["mfu_shape_limit"] = achieved / limit["shape_limit_flops"]
    ratios = {}
    for name in finetunes:
        per_round = [r[name]["tokens_per_s"] / r["peer"]["tokens_per_s"] for r in rounds]
        ratios[name] = {
            "train_tokens_per_s_ratio": summary[name]["tokens_per_s"] / summary["peer"]["tokens_per_s"],
            "train_tokens_per_s_ratio_per_round": {"min": min(per_round), "max": max(per_round)},
            "peak_rss_ratio": summary[name]["peak_rss_mib"] / summary["peer"]["peak_rss_mib"],
            "process_speedup": summary["peer"]["process_seconds"] / summary[name]["process_seconds"],
        }
    document = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "recipe": args.recipe,
        "overrides": overrides,
        "precision": {"finetune": precision, "peer": rounds[0]["peer"]["precision"]},
        "variants": variants,
        "measured_peak_flops": peak,
        "shape_limit": limit,
        "contenders": {
            "finetune": "finetune run (whole command: training, held-out evaluation with generation, run directory)",
            "peer": "TRL SFTTrainer + peft LoraConfig(all-linear), prompt-completion rows (bench/peer_sft_trl.py)",
        },
        "device": device_description(),
        "versions": {**library_versions(), "trl": metadata.version("trl")},
        "rounds": rounds,
        "median": summary,
        "ratios": ratios,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    target = RESULTS / f"{datetime.now().strftime('%Y%m%d-%H%M%S')}-sft-trl.json"
    target.write_text(json.dumps(document, indent=2) + "\n")
    print(json.dumps({"median": summary, "ratios": ratios}, indent=2))
    print(f"written to {target.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
