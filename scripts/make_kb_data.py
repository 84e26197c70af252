"""Write data/kb/{passages,train,test}.jsonl: a knowledge base of help-centre passages, and question -> answer rows.

Built from the same made-up insurance and utility companies as data/faq_paragraphs: one passage per company
and topic (title "Company: topic"), 200 passages. Each row asks a topic question about one company; its answer
is the passage's first sentence, so it must be read from the right passage among retrieved ones. Test rows ask
about companies never asked about in training (their passages are in the base, as in real use). Deterministic.
Run: python scripts/make_kb_data.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from make_paragraph_faq_data import COMPANIES, TOPICS, paragraph

TOPIC_NAMES = [
    "claims",
    "billing",
    "cancelling a contract",
    "emergencies",
    "moving house",
    "premium discounts",
    "personal data",
    "missed payments",
    "complaints",
    "travel cover",
]


def main() -> None:
    rng = random.Random(3)
    passages, rows = [], {"train": [], "test": []}
    for c, company in enumerate(COMPANIES):
        split = "train" if c < 14 else "test"
        for t, (topic, name) in enumerate(zip(TOPICS, TOPIC_NAMES)):
            text = paragraph(topic, rng)
            passage_id = f"{company.lower().replace(' ', '-')}-{t}"
            passages.append({"id": passage_id, "title": f"{company}: {name}", "text": text})
            answer = text.split(". ")[0].rstrip(".") + "."
            question = rng.choice(topic[0]).rstrip("?")
            rows[split].append({"id": passage_id, "question": f"{question} with {company}?", "answer": answer})
    target = Path(__file__).resolve().parents[1] / "data" / "kb"
    target.mkdir(parents=True, exist_ok=True)
    for name, items in (("passages", passages), *rows.items()):
        if name != "passages":
            rng.shuffle(items)
        with open(target / f"{name}.jsonl", "w", encoding="utf-8") as handle:
            for item in items:
                handle.write(json.dumps(item) + "\n")


if __name__ == "__main__":
    main()
