"""Random token substitution of texts in a JSONL file: the robustness check behind docs/watermarks.md.

Not a test (pytest collects test_*.py only). Each text is tokenised with the run's tokenizer, each token replaced
with probability FRACTION by a uniformly drawn vocabulary token (seeded), and decoded again; the rows are written
with the field replaced, for `finetune detect RUN --input OUT`.
Run: .venv/bin/python bench/substitute_tokens.py RUN/predictions.jsonl OUT.jsonl --tokenizer RUN/adapter
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("input", type=Path)
    parser.add_argument("output", type=Path)
    parser.add_argument("--tokenizer", required=True, help="a directory holding the run's tokenizer (RUN/adapter)")
    parser.add_argument("--field", default="prediction")
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(args.tokenizer))
    generator = random.Random(args.seed)
    rows = [json.loads(line) for line in args.input.read_text(encoding="utf-8").splitlines() if line.strip()]
    with args.output.open("x", encoding="utf-8") as handle:  # never over a file that exists
        for row in rows:
            ids = tokenizer(row[args.field], add_special_tokens=False)["input_ids"]
            noisy = [generator.randrange(len(tokenizer)) if generator.random() < args.fraction else i for i in ids]
            handle.write(json.dumps({**row, args.field: tokenizer.decode(noisy)}) + "\n")


if __name__ == "__main__":
    main()
