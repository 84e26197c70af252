"""Write data/copy/{train,test}.jsonl: marketing briefs -> short product copy, made up for this project.

Test products never appear in training, so the score measures the style
learnt, not memorised names. Deterministic: same output every run.
Run: python scripts/make_copy_data.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

PRODUCTS = [
    ("Lumen", "desk lamp", "gives warm, even light without glare", "stays cool to the touch"),
    ("Drift", "travel pillow", "keeps your neck supported on long trips", "folds flat into any bag"),
    ("Brewline", "pour-over kettle", "pours a steady, precise stream", "heats water in three minutes"),
    ("Stride", "running shoe", "cushions every step on hard roads", "weighs less than a banana"),
    ("Nook", "reading chair", "hugs your back through long chapters", "fits small apartments"),
    ("Tidy", "cable organiser", "ends the tangle behind your desk", "sticks to any surface"),
    ("Crisp", "salad spinner", "dries greens in seconds", "stacks neatly in the cupboard"),
    ("Pulse", "fitness tracker", "tracks heart rate and sleep", "runs a week on one charge"),
    ("Harbor", "rain jacket", "keeps you dry in a downpour", "packs into its own pocket"),
    ("Sprout", "herb planter", "grows fresh herbs on a windowsill", "waters itself for two weeks"),
    ("Echo", "wireless speaker", "fills a room with clear sound", "survives a splash"),
    ("Ember", "cast-iron pan", "sears evenly and holds heat", "lasts for generations"),
    ("Quill", "fountain pen", "glides smoothly across the page", "refills in seconds"),
    ("Nimbus", "air purifier", "clears dust and pollen from the air", "runs almost silently"),
    ("Trail", "hiking backpack", "carries a full day's gear comfortably", "has a hidden rain cover"),
    ("Bloom", "face serum", "leaves skin soft and bright", "absorbs in moments"),
    ("Anchor", "phone stand", "holds your phone at eye level", "folds to the size of a card"),
    ("Glow", "night light", "lights the hallway softly at night", "switches on by itself"),
    ("Frost", "insulated bottle", "keeps drinks cold for a full day", "never sweats in your bag"),
    ("Pebble", "power bank", "charges a phone twice", "fits in a coin pocket"),
    ("Canvas", "tote bag", "carries groceries and laptops alike", "washes like new"),
    ("Haven", "weighted blanket", "calms you into deeper sleep", "stays cool all night"),
    ("Spark", "electric toothbrush", "cleans gently but thoroughly", "lasts a month per charge"),
    ("Orbit", "robot vacuum", "cleans the floors while you are out", "maps every room"),
    ("Meadow", "scented candle", "fills your home with a fresh scent", "burns for fifty hours"),
    ("Atlas", "travel adapter", "works in over 150 countries", "charges four devices at once"),
    ("Ripple", "water filter jug", "makes tap water taste clean", "filters a litre in a minute"),
    ("Summit", "trekking poles", "takes the strain off your knees", "collapses to a third of its length"),
    ("Flint", "fire starter", "lights a campfire in any weather", "strikes thousands of times"),
    ("Loom", "knitting kit", "teaches you to knit your first scarf", "includes soft merino yarn"),
    ("Basil", "meal planner app", "plans a week of dinners in minutes", "builds the shopping list for you"),
    ("Vesper", "sleep mask", "blocks out every bit of light", "never presses on your eyes"),
    ("Cadence", "metronome", "keeps your practice perfectly in time", "clips onto any music stand"),
    ("Shore", "beach towel", "dries quickly in the sun", "shakes off sand easily"),
    ("Tally", "budget notebook", "shows where your money goes", "takes five minutes a week"),
    ("Fable", "kids' audiobook player", "tells bedtime stories without a screen", "is built for small hands"),
]
AUDIENCES = [
    ("students", "study late"),
    ("busy parents", "never stop"),
    ("remote workers", "work from anywhere"),
    ("frequent travellers", "live out of a suitcase"),
    ("home cooks", "love a good meal"),
    ("outdoor lovers", "head out every weekend"),
    ("new homeowners", "are making a house a home"),
]
TONES = ["playful", "professional", "warm"]


def copy_for(name, category, benefit, extra, audience, habit, tone) -> str:
    if tone == "playful":
        return f"Meet {name}, the {category} that {benefit}. Made for {audience} who {habit}, and it {extra}. What's not to love?"
    if tone == "professional":
        return f"{name} is a {category} that {benefit}. Designed for {audience}, it {extra}. Discover {name} today."
    return f"Say hello to {name}. This {category} {benefit}, and it {extra}. A small joy for {audience} who {habit}."


def brief_for(name, category, benefit, extra, audience, tone) -> str:
    return (
        f"Product: {name}, a {category}. Audience: {audience}. Key benefit: it {benefit}. "
        f"Also: it {extra}. Tone: {tone}."
    )


def rows_for(products, rng, per_product) -> list[dict]:
    rows = []
    for name, category, benefit, extra in products:
        for audience, habit in rng.sample(AUDIENCES, per_product):
            tone = rng.choice(TONES)
            rows.append(
                {
                    "brief": brief_for(name, category, benefit, extra, audience, tone),
                    "copy": copy_for(name, category, benefit, extra, audience, habit, tone),
                }
            )
    rng.shuffle(rows)
    return rows


def main() -> None:
    rng = random.Random(7)
    products = PRODUCTS[:]
    rng.shuffle(products)
    test_products, train_products = products[:8], products[8:]
    out = Path(__file__).resolve().parents[1] / "data" / "copy"
    out.mkdir(parents=True, exist_ok=True)
    for split, chosen, per in (("train", train_products, 6), ("test", test_products, 4)):
        rows = rows_for(chosen, rng, per)
        (out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        print(f"{split}: {len(rows)} rows")


if __name__ == "__main__":
    main()
