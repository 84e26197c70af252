"""Long, noisy support threads for the training-cost benchmark (issue 18's held-out shape: ~1,200 documents
that fill 128 tokens), built from the demo's ticket situations but unlike the demo data.

    python bench/make_long_tickets.py TRAIN_ROWS TEST_ROWS OUT_DIR [--seed 11]

Each document is a thread of 3-7 tickets: most are about the thread's topic, but up to half are about other
topics, so the label is the majority of a long, mixed text, not a phrase. Deterministic for a seed.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from make_ticket_data import TOPICS, ticket


def thread(rng: random.Random, topic: str) -> str:
    names = list(TOPICS)
    count = rng.randint(3, 7)
    off_topic = rng.randint(0, (count - 1) // 2)  # always fewer than the on-topic tickets
    chosen = [topic] * (count - off_topic) + [rng.choice([n for n in names if n != topic]) for _ in range(off_topic)]
    rng.shuffle(chosen)
    return " ".join(ticket(rng, TOPICS[t][1], [s for n in names if n != t for s in TOPICS[n][1]]) for t in chosen)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("train_rows", type=int)
    parser.add_argument("test_rows", type=int)
    parser.add_argument("out")
    parser.add_argument("--seed", type=int, default=11)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    names = list(TOPICS)
    weights = [TOPICS[n][0] for n in names]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for split, rows in (("train", args.train_rows), ("test", args.test_rows)):
        with open(out / f"{split}.jsonl", "w", encoding="utf-8") as handle:
            for _ in range(rows):
                topic = rng.choices(names, weights)[0]
                handle.write(json.dumps({"text": thread(rng, topic), "label": topic}) + "\n")


if __name__ == "__main__":
    main()
