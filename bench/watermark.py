"""The watermark as judged: marked generations detected, human references not flagged, and the quality cost.

    python bench/watermark.py RECIPE [recipe overrides ...] [--key 31337] [--run DIR] [--watermark "{...}"]

Trains RECIPE with `eval.watermark` on (or takes an existing watermarked `--run`), evaluates the same adapter
unmarked (`finetune eval RUN eval.watermark=null`), and runs `finetune detect` on the marked generations, the
unmarked generations and the human references. Reports, for generations that reached `eval.max_new_tokens` and
for all: the fraction detected; the fraction of references and unmarked generations flagged; ROUGE-L marked vs
unmarked. Results go to bench/results/<time>-watermark.json. Everything runs through the `finetune` CLI.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

BENCH = Path(__file__).resolve().parent
FINETUNE = [sys.executable, "-m", "finetune"]


def finetune(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([*FINETUNE, *args], capture_output=True, text=True)
    if result.returncode not in (0, 4):  # 4: a quality gate failed, the outputs are still written
        sys.exit(f"finetune {' '.join(args)} exited {result.returncode}:\n{result.stderr[-3000:]}")
    return result


def detect(run: Path, predictions: Path, field: str) -> list[dict]:
    result = finetune("detect", str(run), "--input", str(predictions), "--field", field, "--json")
    return json.loads(result.stdout)["rows"]


def rate(rows: list[dict]) -> dict:
    flagged = sum(bool(r["watermarked"]) for r in rows)
    return {"rows": len(rows), "flagged": flagged, "fraction": flagged / len(rows) if rows else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", nargs="?", help="the recipe to train (not needed with --run)")
    parser.add_argument("overrides", nargs="*", help="recipe overrides, key=value")
    parser.add_argument("--key", type=int, default=31337)
    parser.add_argument("--watermark", default=None, help="the eval.watermark mapping (default: {key: KEY})")
    parser.add_argument("--run", type=Path, help="an existing watermarked run instead of training one")
    args = parser.parse_args()

    started = time.strftime("%Y%m%d-%H%M%S")
    if args.run is None:
        if args.recipe is None:
            parser.error("give a recipe to train, or --run")
        run = BENCH / ".runs" / f"watermark-{started}"
        watermark = args.watermark or f"{{key: {args.key}}}"
        finetune("run", args.recipe, *args.overrides, f"eval.watermark={watermark}", f"output.dir={run}")
    else:
        run = args.run
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    max_new_tokens = recipe["eval"]["max_new_tokens"]

    before = set((run / "evals").glob("*")) if (run / "evals").is_dir() else set()
    finetune("eval", str(run), "eval.watermark=null")
    unmarked_dir = max(set((run / "evals").glob("*")) - before)

    marked = detect(run, run / "predictions.jsonl", "prediction")
    unmarked = detect(run, unmarked_dir / "predictions.jsonl", "prediction")
    references = detect(run, run / "predictions.jsonl", "completion")
    # A generation that reached the token limit (re-tokenising its text may shift the count by a token or two).
    full = [r for r in marked if r["text_tokens"] >= max_new_tokens - 2]
    metrics = json.loads((run / "metrics.json").read_text())["metrics"]
    unmarked_metrics = json.loads((unmarked_dir / "metrics.json").read_text())["metrics"]
    report = {
        "run": str(run),
        "watermark": recipe["eval"]["watermark"],
        "max_new_tokens": max_new_tokens,
        "detected_full_length": rate(full),
        "detected_all": rate(marked),
        "flagged_references": rate(references),
        "flagged_unmarked": rate(unmarked),
        "rougeL_marked": metrics.get("rougeL"),
        "rougeL_unmarked": unmarked_metrics.get("rougeL"),
        "z_marked": sorted(round(r["z_score"], 2) for r in marked if r["z_score"] is not None),
        "z_references_max": max((r["z_score"] for r in references if r["z_score"] is not None), default=None),
    }
    out = BENCH / "results" / f"{started}-watermark.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "z_marked"}, indent=2))
    print(f"written: {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
