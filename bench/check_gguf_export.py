"""How faithful is a run's GGUF export? Next-token agreement with the run's merged checkpoint.

Exports RUN as a plain transformers checkpoint and as GGUF (f16 and q8_0) into a scratch folder, reads the
GGUF back with transformers' GGUF loader, and compares the greedy next token at every position of the run's
evaluation texts (prompt + prediction from predictions.jsonl).

Run: python bench/check_gguf_export.py runs/smollm2-copy [--rows 20]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def export(run: Path, scratch: Path, fmt: str, output: Path, quant: str | None = None) -> None:
    command = [sys.executable, "-m", "finetune", "export", str(run), "--format", fmt, "--output", str(output)]
    subprocess.run(command + (["--quant", quant] if quant else []), check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--rows", type=int, default=20)
    args = parser.parse_args()
    rows = [json.loads(line) for line in (args.run / "predictions.jsonl").read_text().splitlines()][: args.rows]
    texts = [f"{r.get('prompt', '')}{r['prediction']}" for r in rows]
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        export(args.run, scratch, "hf", scratch / "merged")
        merged = AutoModelForCausalLM.from_pretrained(scratch / "merged", dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(scratch / "merged")
        results = {}
        for quant in ("f16", "q8_0"):
            target = scratch / f"model-{quant}.gguf"
            export(args.run, scratch, "gguf", target, quant)
            loaded = AutoModelForCausalLM.from_pretrained(scratch, gguf_file=target.name, dtype=torch.float32).eval()
            same = total = 0
            with torch.no_grad():
                for text in texts:
                    ids = torch.tensor([tokenizer(text)["input_ids"]])
                    want, got = merged(ids).logits[0].argmax(-1), loaded(ids).logits[0].argmax(-1)
                    same += int((want == got).sum())
                    total += ids.shape[1]
            results[quant] = {
                "positions": total,
                "same_next_token": round(same / total, 4),
                "file_mib": round(target.stat().st_size / 2**20, 1),
            }
    print(json.dumps({"run": str(args.run), "rows": len(texts), "agreement": results}, indent=2))


if __name__ == "__main__":
    main()
