"""Preference tuning against supervised tuning on the same rows, side by side, in one invocation.

The same recipe runs twice as fresh processes: once as `train.objective=sft` on prompt -> chosen, once with the
preference objective (DPO by default) on prompt, chosen, rejected, with the same epochs, batch size and model.
Reported: whole-process wall time, training seconds (metrics.json), peak resident memory of each process, and the
ratios preference / sft. Targets (issue 30): peak memory <= 1.25x, wall time <= 3x.

    python bench/preference.py [--recipe R] [--objective dpo] [KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"

# Peak RSS of one child process: it runs under a tiny wrapper that reports its own ru_maxrss.
WRAPPER = (
    "import resource, runpy, sys, json;"
    "sys.argv = ['finetune'] + sys.argv[1:];"
    "code = 0\n"
    "try:\n"
    "    runpy.run_module('finetune', run_name='__main__')\n"
    "except SystemExit as exit:\n"
    "    code = exit.code or 0\n"
    "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
    "sys.exit(code)"
)


def run_one(recipe: str, overrides: list[str], out: Path) -> dict:
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", WRAPPER, "run", recipe, f"output.dir={out}", "--overwrite", *overrides],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"},
    )
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"run failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    peak = next(int(line.split()[1]) for line in proc.stderr.splitlines() if line.startswith("PEAK_RSS_KB"))
    metrics = json.loads((out / "metrics.json").read_text())
    return {
        "wall_s": round(wall, 1),
        "train_s": metrics["training"]["train_seconds"],
        "peak_rss_mb": round(peak / 1024, 1),
        "metrics": metrics["metrics"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="recipes/copywriting/smollm2-dpo.yaml")
    parser.add_argument("--objective", default="dpo", choices=["dpo", "orpo", "kto"])
    parser.add_argument("overrides", nargs="*", help="recipe overrides applied to both runs (KEY=VALUE)")
    args = parser.parse_args()
    # Generation is the same work for both; only training is compared, so each run scores without generating.
    common = ["eval.every=null", "eval.max_new_tokens=1", "eval.gates={}", *args.overrides]
    with tempfile.TemporaryDirectory() as tmp:
        sft = run_one(
            args.recipe, ["train.objective=sft", "data.columns.completion=chosen", *common], Path(tmp) / "sft"
        )
        preference = run_one(args.recipe, [f"train.objective={args.objective}", *common], Path(tmp) / "pref")
    result = {
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "recipe": args.recipe,
        "overrides": common,
        "sft": sft,
        args.objective: preference,
        "ratios": {
            "peak_rss": round(preference["peak_rss_mb"] / sft["peak_rss_mb"], 3),
            "wall": round(preference["wall_s"] / sft["wall_s"], 3),
            "train": round(preference["train_s"] / sft["train_s"], 3),
        },
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"preference-{args.objective}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["ratios"]), f"-> {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
