"""Generative SFT: finetune against TRL's SFTTrainer + peft, side by side, in one invocation.

Both contenders train the same model on the same rows with the same recipe settings (by default the shipped
SmolLM2 generative QA recipe for 1 epoch: batch 8, max_length 256, LoRA on all linear layers), each as a fresh
process so that its peak resident memory is its own, alternating the order round by round so drift on a noisy
machine hits both. finetune runs its whole command (`finetune run`: data report, training, held-out evaluation
with generation, the run directory); the peer trains only (`bench/peer_sft_trl.py`). Reported per contender:
whole-process wall time, training seconds and real (non-padding) training tokens/s, peak RSS; and the ratios
finetune / peer. Written to `bench/results/<time>-sft-trl.json` with the machine's description.

    python bench/sft_trl.py [--recipe R] [--rounds N] [KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import device_description, measure

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
RECIPE = "recipes/qa/smollm2-faq-generative.yaml"
# The judged setting: one pass over the rows (the shipped recipe trains two).
DEFAULTS = ["train.epochs=1"]


def run_finetune(recipe: str, overrides: list[str], scratch: Path) -> dict:
    out = scratch / "finetune-run"
    # --overwrite: every round replaces the previous round's scratch run.
    wall, rss, _ = measure(
        [sys.executable, "-m", "finetune", "run", recipe, *overrides, f"output.dir={out}", "--overwrite"]
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


def run_peer(recipe: str, overrides: list[str]) -> dict:
    wall, rss, stdout = measure([sys.executable, str(ROOT / "bench" / "peer_sft_trl.py"), recipe, *overrides])
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
    parser.add_argument("overrides", nargs="*", help="section.key=value, applied to both contenders")
    args = parser.parse_args()
    overrides = [*DEFAULTS, *args.overrides]

    from finetune.flows.resolve import resolve
    from finetune.outputs.manifest import library_versions

    precision = resolve(args.recipe, overrides).precision
    rounds = []
    with tempfile.TemporaryDirectory() as scratch:
        for number in range(args.rounds):
            order = ["finetune", "peer"] if number % 2 == 0 else ["peer", "finetune"]
            results = {}
            for name in order:
                results[name] = (
                    run_finetune(args.recipe, overrides, Path(scratch))
                    if name == "finetune"
                    else run_peer(args.recipe, overrides)
                )
                print(f"round {number + 1} {name}: {json.dumps(results[name])}", flush=True)
            rounds.append(results)

    numeric = ("process_seconds", "peak_rss_mib", "train_seconds", "tokens_per_s", "final_loss")
    summary = {
        name: {key: statistics.median(r[name][key] for r in rounds) for key in numeric} for name in ("finetune", "peer")
    }
    per_round = [r["finetune"]["tokens_per_s"] / r["peer"]["tokens_per_s"] for r in rounds]
    ratios = {
        "train_tokens_per_s_ratio": summary["finetune"]["tokens_per_s"] / summary["peer"]["tokens_per_s"],
        "train_tokens_per_s_ratio_per_round": {"min": min(per_round), "max": max(per_round)},
        "peak_rss_ratio": summary["finetune"]["peak_rss_mib"] / summary["peer"]["peak_rss_mib"],
        "process_speedup": summary["peer"]["process_seconds"] / summary["finetune"]["process_seconds"],
    }
    document = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "recipe": args.recipe,
        "overrides": overrides,
        "precision": {"finetune": precision, "peer": rounds[0]["peer"]["precision"]},
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
