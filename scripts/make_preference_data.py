"""Write data/copy_preferences/{train,test}.jsonl: product briefs with a preferred and a rejected piece of copy.

Made up for this project. The preferred copy does what a copywriter's reviewer asks for: it names the product,
leads with the brief's benefit, speaks to the audience in the asked tone. Each rejected answer fails the way real
drafts fail, one failure per pair: generic praise with no benefit, the wrong product, shouting hype, a dry spec
list that ignores audience and tone, or rambling filler. Test products never appear in training, so preference
accuracy measures what was learnt about good copy, not names. Deterministic: same output every run.
Run: python scripts/make_preference_data.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

PRODUCTS = [
    ("Kestrel", "pair of binoculars", "brings distant birds close and sharp", "fits in a jacket pocket"),
    ("Marlow", "wool scarf", "keeps the wind off your neck", "never itches"),
    ("Tundra", "sleeping bag", "keeps you warm below freezing", "packs to the size of a loaf"),
    ("Saffron", "spice grinder", "grinds whole spices in seconds", "cleans with one wipe"),
    ("Beacon", "bike light", "makes you visible from half a mile", "charges over USB"),
    ("Willow", "yoga mat", "grips the floor through every pose", "rolls up light"),
    ("Cobalt", "mechanical keyboard", "makes every keystroke crisp and quiet", "works with any computer"),
    ("Juniper", "tea infuser", "brews loose tea without a mess", "goes in the dishwasher"),
    ("Ridge", "trekking pole", "takes the strain off your knees downhill", "folds into three"),
    ("Marigold", "garden kneeler", "saves your knees while you weed", "flips into a seat"),
    ("Sonnet", "bookshelf speaker", "plays warm, detailed sound", "pairs in one tap"),
    ("Ferris", "kids' scooter", "glides smoothly on pavements", "grows with your child"),
    ("Vesper", "sunrise alarm", "wakes you gently with light", "plays birdsong instead of beeps"),
    ("Pioneer", "camping stove", "boils water in four minutes", "runs on standard gas"),
    ("Lark", "baby monitor", "lets you hear every murmur clearly", "needs no app"),
    ("Granite", "chopping board", "stays put while you slice", "resists knife marks"),
    ("Aurora", "desk fan", "cools you without the noise", "tilts in any direction"),
    ("Thimble", "sewing kit", "fixes a loose button anywhere", "fits in a wallet"),
    ("Hearth", "slow cooker", "has dinner ready when you get home", "keeps food warm for hours"),
    ("Compass", "travel wallet", "keeps passports and cards in order", "blocks card skimming"),
    ("Petal", "watering can", "waters seedlings without flooding them", "balances in one hand"),
    ("Summit", "climbing chalk bag", "keeps your grip dry on the wall", "closes without spilling"),
    ("Minnow", "swim goggles", "stay clear and never fog", "seal without pinching"),
    ("Cedar", "shoe rack", "clears the hallway of clutter", "assembles without tools"),
    ("Ripple", "water filter jug", "makes tap water taste clean", "filters a litre in a minute"),
    ("Falcon", "drone", "films smooth aerial video", "holds steady in the wind"),
    ("Maple", "bread bin", "keeps loaves fresh for days", "fits under the cupboards"),
    ("Comet", "kids' torch", "turns bedtime into an adventure", "survives being dropped"),
    ("Basil", "herb keeper", "keeps herbs fresh for two weeks", "fits in the fridge door"),
    ("Orchid", "plant mister", "gives leaves a fine, even mist", "never drips"),
    ("Glacier", "ice cube tray", "releases cubes with one twist", "stacks without spills"),
    ("Tempo", "metronome", "keeps your practice perfectly in time", "runs for months on a battery"),
    ("Sable", "makeup brush set", "blends powder and cream evenly", "keeps its shape wash after wash"),
    ("Wren", "bird feeder", "brings songbirds to your window", "keeps squirrels out"),
    ("Bramble", "berry picker", "gathers fruit without crushing it", "reaches high branches"),
    ("Nova", "reading tablet", "reads like paper in bright sun", "lasts weeks per charge"),
    ("Dune", "beach tent", "shades the family from midday sun", "pitches in a minute"),
    ("Clover", "lunch box", "keeps each food in its place", "seals tight against leaks"),
    ("Echoes", "noise-cancelling earbuds", "shut out the commute", "last all day"),
    ("Topaz", "jewellery box", "keeps necklaces from tangling", "locks with a small key"),
    ("Pine", "firewood rack", "keeps logs dry and tidy", "stands indoors or out"),
    ("Harmony", "ukulele", "stays in tune for beginners", "comes with a soft case"),
    ("Zephyr", "hair dryer", "dries hair fast without frizz", "folds for travel"),
    ("Oakley", "step stool", "reaches the top shelf safely", "folds flat behind a door"),
    ("Bolt", "cordless drill", "drives screws into hardwood easily", "charges in an hour"),
    ("Coral", "snorkel set", "lets you breathe easily face down", "fits every face"),
    ("Hazel", "nut cracker", "cracks shells without crushing nuts", "works with one hand"),
    ("Lumos", "reading light", "lights your page, not the room", "clips onto any book"),
    ("Quarry", "garden spade", "cuts through heavy clay", "has a grip that never blisters"),
    ("Indigo", "denim apron", "keeps the workshop mess off your clothes", "has five deep pockets"),
]

AUDIENCES = [
    "busy parents",
    "students",
    "home cooks",
    "weekend hikers",
    "first-time buyers",
    "retirees",
    "small-flat dwellers",
    "commuters",
    "gift shoppers",
    "outdoor families",
]
TONES = ["warm", "playful", "professional", "calm", "confident"]

OPENERS = {
    "warm": "Say hello to {name}",
    "playful": "Meet {name}, your new favourite thing",
    "professional": "Introducing {name}",
    "calm": "This is {name}",
    "confident": "{name} is here",
}
CLOSERS = {
    "warm": "Made with care for {audience}.",
    "playful": "Go on, treat yourself.",
    "professional": "Built for {audience} who expect more.",
    "calm": "Simple, quiet, and ready when you are.",
    "confident": "Once you try it, there's no going back.",
}


def brief(name, kind, benefit, extra, audience, tone):
    return (
        f"Product: {name}, a {kind}. Audience: {audience}. Key benefit: it {benefit}. Also: it {extra}. Tone: {tone}."
    )


def preferred(rng, name, kind, benefit, extra, audience, tone):
    opener = OPENERS[tone].format(name=name)
    closer = CLOSERS[tone].format(audience=audience)
    shape = rng.randrange(3)
    if shape == 0:
        return f"{opener}: the {kind} that {benefit}. It {extra}, so it suits {audience}. {closer}"
    if shape == 1:
        return f"{opener}. This {kind} {benefit}, and it {extra}. {closer}"
    return f"For {audience}: {name}, a {kind} that {benefit}. Better still, it {extra}. {closer}"


def rejected(rng, failure, name, kind, benefit, extra, audience, tone, others):
    if failure == "generic":
        return rng.choice(
            [
                f"{name} is a great product. Everyone will love it. Buy one today.",
                f"This is the best {kind} you can get. It is really good. Don't miss out.",
                f"{name}. Quality you can trust. Order now.",
            ]
        )
    if failure == "wrong_product":
        other = rng.choice(others)
        return f"Introducing {other[0]}: the {other[1]} that {other[2]}. It {other[3]}. Get yours today."
    if failure == "hype":
        return f"{name.upper()}!!! THE BEST {kind.upper()} EVER MADE!!! BUY NOW BEFORE IT'S GONE!!!"
    if failure == "spec_list":
        return f"{name}. Type: {kind}. Function: {benefit}. Feature: {extra}. Price: see website."
    return (
        f"So, well, there is this thing called {name} and it is a {kind}, and basically, you know, "
        f"it is a {kind} that you might use, or maybe not, depending on things, and it does stuff that "
        f"{kind}s usually do, more or less, if you think about it."
    )


FAILURES = ["generic", "wrong_product", "hype", "spec_list", "rambling"]


def rows_for(products, rng, per_product):
    out = []
    for name, kind, benefit, extra in products:
        others = [p for p in products if p[0] != name]
        # Each of a product's briefs has its own audience and tone: no brief appears twice.
        settings = rng.sample([(a, t) for a in AUDIENCES for t in TONES], per_product)
        for failure, (audience, tone) in zip(rng.sample(FAILURES, per_product), settings):
            out.append(
                {
                    "brief": brief(name, kind, benefit, extra, audience, tone),
                    "chosen": preferred(rng, name, kind, benefit, extra, audience, tone),
                    "rejected": rejected(rng, failure, name, kind, benefit, extra, audience, tone, others),
                    "failure": failure,
                }
            )
    rng.shuffle(out)
    return out


def main() -> None:
    rng = random.Random(7)
    products = list(PRODUCTS)
    rng.shuffle(products)
    test_products, train_products = products[:10], products[10:]
    out = Path(__file__).resolve().parent.parent / "data" / "copy_preferences"
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", rows_for(train_products, rng, 4)), ("test", rows_for(test_products, rng, 3))):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"wrote {len(rows)} rows to {out / name}.jsonl")


if __name__ == "__main__":
    main()
