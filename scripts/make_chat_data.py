"""Write data/chat/{train,test}.jsonl: multi-turn copywriting conversations, made up for this project.

Each row is a `messages` list: an optional system turn, a user brief, the assistant's copy, then one or two
follow-up requests (shorter, a headline, a tagline, add a detail, another tone) each answered by a revision:
two or three assistant turns per conversation. Evaluation scores the last assistant turn. Test products never
appear in training, so the score measures the conversational style learnt, not memorised names.
Deterministic: same output every run. Run: python scripts/make_chat_data.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

# name, category, what it does, one more detail, a headline (five words or fewer), a tagline
# fmt: off
PRODUCTS = [
    ("Kestrel", "folding bike", "rides smoothly through city traffic", "folds in ten seconds", "Ride more, carry less.", "Kestrel. The city, folded."),
    ("Marlow", "linen shirt", "stays cool on the hottest days", "softens with every wash", "Cool linen, all summer.", "Marlow. Made for warm days."),
    ("Juniper", "gin glass set", "brings out every botanical note", "is dishwasher safe", "Better glasses, better gin.", "Juniper. Raise a better glass."),
    ("Cobalt", "smart thermostat", "learns when you are home", "cuts heating bills by a fifth", "Warm home, lower bills.", "Cobalt. Comfort that learns."),
    ("Wren", "bird feeder", "brings garden birds to your window", "keeps squirrels out", "Birdsong at your window.", "Wren. Invite the garden in."),
    ("Sable", "makeup brush set", "blends foundation without streaks", "is cruelty free", "Flawless blending, every morning.", "Sable. Soft on skin."),
    ("Tundra", "down sleeping bag", "keeps you warm below freezing", "packs smaller than a loaf", "Warm nights, anywhere.", "Tundra. Sleep warm outside."),
    ("Piper", "kids' recorder", "makes a first instrument easy", "comes with twenty songs", "First notes made easy.", "Piper. Little hands, big music."),
    ("Osprey", "fishing reel", "casts far with little effort", "resists salt water", "Cast further, reel smoother.", "Osprey. Built for the catch."),
    ("Mosaic", "jigsaw puzzle", "turns a quiet evening into a project", "has a thousand thick pieces", "A thousand calm pieces.", "Mosaic. Piece by piece."),
    ("Barley", "bread maker", "bakes a fresh loaf overnight", "has a delay timer", "Fresh bread by breakfast.", "Barley. Wake up to bread."),
    ("Vantage", "monitor arm", "lifts your screen to eye level", "clamps to any desk", "Screen up, shoulders down.", "Vantage. Work at eye level."),
    ("Hollow", "yoga block", "steadies every stretch", "is made of cork", "Steadier stretches, every session.", "Hollow. Balance, supported."),
    ("Quarry", "stone coaster set", "protects tables from rings", "absorbs every drip", "No more table rings.", "Quarry. Set it down."),
    ("Lattice", "pie dish", "bakes an even golden crust", "goes from oven to table", "Golden crust, every time.", "Lattice. Bake it beautiful."),
    ("Fennel", "spice grinder", "grinds seeds in seconds", "cleans with a brush", "Fresh spice in seconds.", "Fennel. Grind it fresh."),
    ("Comet", "kids' scooter", "glides smoothly on pavements", "lights up as it rolls", "Glide, glow, go.", "Comet. Fun on two wheels."),
    ("Harrow", "garden spade", "cuts through clay with ease", "has an oak handle", "Dig deeper, work less.", "Harrow. Built to dig."),
    ("Saffron", "rice cooker", "cooks fluffy rice every time", "keeps it warm for hours", "Perfect rice, every time.", "Saffron. Rice, done right."),
    ("Beacon", "bike light", "makes you seen from far away", "charges by USB", "Be seen after dark.", "Beacon. Ride bright."),
    ("Alder", "wooden cutting board", "stays kind to your knives", "never warps", "Kind to every knife.", "Alder. Cut on wood."),
    ("Tempo", "jump rope", "counts every skip for you", "adjusts to any height", "Every skip counted.", "Tempo. Jump to it."),
    ("Violet", "hand cream", "softens dry hands in minutes", "is never greasy", "Soft hands in minutes.", "Violet. Care in your pocket."),
    ("Granite", "dumbbell set", "adjusts from two to twenty kilos", "takes one corner of a room", "A whole gym, one corner.", "Granite. Lift at home."),
    ("Pixel", "instant camera", "prints photos in seconds", "fits in a jacket pocket", "Photos you can hold.", "Pixel. Keep the moment."),
    ("Cedar", "shoe rack", "keeps the hallway tidy", "holds twelve pairs", "A tidier hallway today.", "Cedar. Every pair in place."),
    ("Morrow", "alarm clock", "wakes you with gentle light", "plays birdsong", "Wake up with light.", "Morrow. Better mornings."),
    ("Tinder", "camping stove", "boils water in three minutes", "runs on any gas canister", "Hot meals on the trail.", "Tinder. Cook anywhere."),
    ("Olive", "oil sprayer", "coats a pan with a fine mist", "uses far less oil", "Less oil, same flavour.", "Olive. A lighter touch."),
    ("Nova", "desk fan", "cools you without the noise", "runs on a laptop port", "Quiet cool at your desk.", "Nova. Calm, cool air."),
    ("Heron", "umbrella", "stands up to strong wind", "opens with one hand", "Stays up in storms.", "Heron. Rain, handled."),
    ("Thistle", "pair of wool socks", "keeps feet warm and dry", "never itches", "Warm feet, all winter.", "Thistle. Cosy underfoot."),
    ("Ledger", "accounting app", "sends invoices in one tap", "reminds late payers for you", "Get paid faster.", "Ledger. Paperwork, done."),
    ("Marble", "rolling pin", "rolls dough evenly", "stays cool for pastry", "Even dough, every bake.", "Marble. Roll like a pro."),
    ("Drizzle", "watering can", "pours a gentle, even shower", "holds five litres", "Gentle water for plants.", "Drizzle. Happy plants."),
    ("Ferris", "kids' globe", "lights up the world at night", "answers questions out loud", "The world, lit up.", "Ferris. Curious minds, lit up."),
    ("Onyx", "chef's knife", "slices cleanly through anything", "stays sharp for months", "Sharp for months.", "Onyx. Cut clean."),
    ("Clover", "picnic blanket", "keeps the damp out", "folds into a shoulder bag", "Dry picnics, anywhere.", "Clover. Sit anywhere."),
    ("Rook", "chess set", "makes every game feel special", "has weighted pieces", "Every game feels special.", "Rook. Your move."),
    ("Sierra", "pair of sunglasses", "cuts the glare on bright days", "floats if dropped", "No glare, no squinting.", "Sierra. See the day clearly."),
]
# fmt: on
AUDIENCES = [
    ("students", "study late"),
    ("busy parents", "never stop"),
    ("remote workers", "work from anywhere"),
    ("frequent travellers", "live out of a suitcase"),
    ("home cooks", "love a good meal"),
    ("outdoor lovers", "head out every weekend"),
    ("new homeowners", "are making a house a home"),
    ("retirees", "finally have time"),
]
SYSTEMS = [
    "You are a copywriter for a small online shop. Keep copy short and concrete.",
    "You write product copy. Answer with the copy only.",
]
BRIEFS = [
    "I need copy for {name}, a {category}, for {audience}. The main point: it {benefit}.",
    "Write a short product description for {name}, our new {category}. It {benefit}. We sell to {audience}.",
    "Can you write copy for {name}? It's a {category} for {audience}, and it {benefit}.",
]


def first_copy(p: dict, audience: str, habit: str) -> str:
    return f"Meet {p['name']}, the {p['category']} that {p['benefit']}. Made for {audience} who {habit}."


# follow-up request -> (user text, reply from the product, the audience and the previous reply)
FOLLOW_UPS = {
    "shorter": ("Make it shorter.", lambda p, a, prev: f"{p['name']}: the {p['category']} that {p['benefit']}."),
    "detail": ("Also mention that it {extra}.", lambda p, a, prev: f"{prev} And it {p['extra']}."),
    "headline": ("Now give me a headline of five words or fewer.", lambda p, a, prev: p["headline"]),
    "tagline": ("And a tagline with the product name?", lambda p, a, prev: p["tagline"]),
    "professional": (
        "Make it sound more professional.",
        lambda p, a, prev: f"{p['name']} is a {p['category']} that {p['benefit']}. Designed for {a}, it {p['extra']}.",
    ),
}


def conversation(p: dict, rng: random.Random) -> dict:
    audience, habit = rng.choice(AUDIENCES)
    messages = []
    if rng.random() < 0.5:
        messages.append({"role": "system", "content": rng.choice(SYSTEMS)})
    messages.append({"role": "user", "content": rng.choice(BRIEFS).format(audience=audience, **p)})
    reply = first_copy(p, audience, habit)
    messages.append({"role": "assistant", "content": reply})
    kinds = rng.sample(sorted(FOLLOW_UPS), rng.choice((1, 2)))
    if "detail" in kinds:  # a detail is added to the copy itself, never to a headline or a reworded version
        kinds.remove("detail")
        kinds.insert(0, "detail")
    for kind in kinds:
        request, answer = FOLLOW_UPS[kind]
        messages.append({"role": "user", "content": request.format(**p)})
        reply = answer(p, audience, reply)
        messages.append({"role": "assistant", "content": reply})
    return {"messages": messages}


def main() -> None:
    rng = random.Random(29)
    keys = ("name", "category", "benefit", "extra", "headline", "tagline")
    products = [dict(zip(keys, row)) for row in PRODUCTS]
    rng.shuffle(products)
    test_products, train_products = products[:8], products[8:]
    out = Path(__file__).resolve().parents[1] / "data" / "chat"
    out.mkdir(parents=True, exist_ok=True)
    for split, chosen, per in (("train", train_products, 3), ("test", test_products, 3)):
        rows = [conversation(p, rng) for p in chosen for _ in range(per)]
        rng.shuffle(rows)
        (out / f"{split}.jsonl").write_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8"
        )
        print(f"{split}: {len(rows)} conversations")


if __name__ == "__main__":
    main()
