"""A large classification JSONL shaped unlike our demo data: long and short documents, 40 imbalanced labels.

    python bench/make_scale_data.py ROWS OUT.jsonl [--seed 0]

Documents are sentences from a 6,000-word vocabulary with a few topic words per label, 40-2,000
characters (median about 500), labels Zipf-distributed (the rarest classes have a handful of rows at
20k). Deterministic for a seed; ~600 bytes per row, so 200,000 rows is about 120 MB.
"""

from __future__ import annotations

import argparse
import json
import random
import string

LABELS = 40


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 9)))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("rows", type=int)
    parser.add_argument("out")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    vocabulary = [_word(rng) for _ in range(6000)]
    topic_words = [[_word(rng) for _ in range(12)] for _ in range(LABELS)]
    weights = [1 / (k + 1) ** 1.3 for k in range(LABELS)]
    with open(args.out, "w", encoding="utf-8") as out:
        for index in range(args.rows):
            label = rng.choices(range(LABELS), weights)[0]
            sentences = []
            target = min(2000, max(40, int(rng.lognormvariate(6.2, 0.6))))
            length = 0
            while length < target:
                words = [
                    rng.choice(topic_words[label]) if rng.random() < 0.15 else rng.choice(vocabulary)
                    for _ in range(rng.randint(5, 16))
                ]
                sentence = " ".join(words).capitalize() + rng.choice([".", ".", ".", "?", "!"])
                sentences.append(sentence)
                length += len(sentence) + 1
            row = {"id": index, "text": " ".join(sentences), "label": f"topic_{label:02d}"}
            out.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
