"""Generate the demo's support-ticket topic data (data/tickets/*.jsonl), reproducibly.

    python scripts/make_ticket_data.py

Six topics, imbalanced, tickets of one to four sentences built from per-topic
situations mixed with openers and closers shared by all topics, so that a
model has to read the situation rather than a fixed phrase. A ticket that
repeats an earlier one (in either file), exactly or nearly (word 3-shingle
Jaccard at or above NEAR, the data report's threshold with a margin), is drawn
again: `finetune data` finds no duplicates and no train/test overlap.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

NEAR = 0.7  # the data report calls texts near-duplicates from a word 3-shingle Jaccard of 0.8

OPENERS = [
    "Hi team,",
    "Hello,",
    "Good morning.",
    "Hey there!",
    "To whom it may concern,",
    "",
    "",
    "",
    "I hope someone can help.",
    "Quick question.",
    "Not happy right now.",
    "Hi, long time customer here.",
]
CLOSERS = [
    "Thanks in advance.",
    "Please advise.",
    "Any update would be appreciated.",
    "",
    "",
    "",
    "This is urgent for me.",
    "Cheers.",
    "Let me know what you need from me.",
    "Regards, Sam",
    "I have attached a screenshot.",
    "My order number is in the account notes.",
]

TOPICS = {
    "billing": (
        0.26,
        [
            "I was charged twice for my {plan} subscription this month.",
            "My invoice shows a fee I don't recognise, {amount} on the {day}.",
            "Can you refund the {amount} that was taken after I cancelled?",
            "The card on file expired and now my payment keeps failing.",
            "Why did the price of my {plan} plan go up without notice?",
            "I need a VAT invoice for my company for last quarter.",
            "The discount code {code} was not applied at checkout and I paid full price.",
            "How do I switch from monthly to yearly billing?",
            "My bank statement shows a pending charge from you that never went through.",
            "Please stop the automatic renewal, I only wanted one month.",
        ],
    ),
    "shipping": (
        0.22,
        [
            "My parcel has been stuck in transit for {n} days.",
            "The tracking number you sent does not work on the courier's site.",
            "The package was marked delivered but nothing arrived at my door.",
            "Can I change the delivery address for order {code}? I moved last week.",
            "Do you ship to {country}, and how long does it take?",
            "The box arrived crushed and the {item} inside is damaged.",
            "Only part of my order came, the {item} is missing.",
            "The courier left a note but I was home all day.",
            "Is express delivery available before the {day}?",
            "My order still says 'preparing' after {n} days.",
        ],
    ),
    "technical": (
        0.2,
        [
            "The app crashes every time I open the {screen} screen.",
            "I get error {errno} when I try to sync my {item}.",
            "Since the last update the {screen} page is blank on my phone.",
            "The website will not load in {browser}, it just spins.",
            "Notifications stopped working after I updated to version {version}.",
            "Uploading a file larger than {n} MB fails with a timeout.",
            "The export to CSV produces an empty file.",
            "The {screen} screen is extremely slow, it takes a minute to respond.",
            "Your API returns a 500 error for the {screen} endpoint.",
            "Dark mode makes the text on the {screen} page unreadable.",
        ],
    ),
    "account": (
        0.14,
        [
            "I can't log in, it says my password is wrong but I just reset it.",
            "Please delete my account and all my personal data.",
            "How do I change the email address on my profile?",
            "I never received the verification email.",
            "Someone else may have accessed my account, I see a login from {country}.",
            "Two-factor authentication codes are not arriving by SMS.",
            "How can I add a second user to my {plan} account?",
            "My username was changed and I did not do it.",
        ],
    ),
    "returns": (
        0.1,
        [
            "I would like to return the {item}, it does not fit.",
            "How do I get a return label for order {code}?",
            "I sent the {item} back {n} days ago and have not heard anything.",
            "Can I exchange the {item} for a different size instead of a refund?",
            "The return window says 30 days but the portal will not let me start one.",
            "The {item} I received is not what I ordered, I want to send it back.",
        ],
    ),
    "feedback": (
        0.08,
        [
            "Just wanted to say the new {screen} design is great.",
            "Your support agent was really helpful yesterday, thank you.",
            "It would be nice if the {screen} page had a search box.",
            "I love the {item}, could you make it in more colours?",
            "Suggestion: let us pick the delivery day at checkout.",
        ],
    ),
}

FILL = {
    "plan": ["Basic", "Pro", "Team", "Family", "Premium"],
    "amount": ["$9.99", "$49", "EUR 120", "$15.50", "GBP 30"],
    "day": ["3rd", "15th", "28th", "weekend", "Friday"],
    "code": ["SPRING20", "A-10293", "#88412", "WELCOME", "ZX-4410"],
    "n": ["3", "5", "10", "12", "21"],
    "country": ["Canada", "Germany", "Brazil", "Japan", "Kenya", "Australia"],
    "item": ["jacket", "headphones", "blender", "backpack", "phone case", "lamp", "contacts"],
    "screen": ["settings", "dashboard", "checkout", "reports", "calendar", "profile"],
    "errno": ["E102", "0x80070005", "403", "SYNC_FAILED", "-32"],
    "browser": ["Safari", "Firefox", "Chrome", "Edge"],
    "version": ["4.2.1", "5.0", "3.9.8"],
}


def ticket(rng: random.Random, situations: list[str], others: list[str]) -> str:
    parts = [rng.choice(OPENERS)]
    chosen = rng.sample(situations, k=rng.choice([1, 1, 1, 2]))
    parts += [s.format(**{k: rng.choice(v) for k, v in FILL.items()}) for s in chosen]
    if rng.random() < 0.15:  # a passing mention of something else, as real tickets have
        parts.append("Also, " + rng.choice(others).format(**{k: rng.choice(v) for k, v in FILL.items()}).lower())
    parts.append(rng.choice(CLOSERS))
    return " ".join(p for p in parts if p)


def shingles(text: str) -> frozenset[str]:
    """Word 3-shingles of the text normalised as the data report normalises it."""
    words = re.sub(r"[^\w\s]", "", text.lower()).split()
    return frozenset(" ".join(words[i : i + 3]) for i in range(max(len(words) - 2, 1)))


def is_repeat(candidate: frozenset[str], kept: list[frozenset[str]]) -> bool:
    return any(len(candidate & other) / len(candidate | other) >= NEAR for other in kept)


def main(train_rows: int = 480, test_rows: int = 160, seed: int = 7) -> None:
    rng = random.Random(seed)
    names = list(TOPICS)
    weights = [TOPICS[n][0] for n in names]
    out = Path(__file__).resolve().parents[1] / "data" / "tickets"
    out.mkdir(parents=True, exist_ok=True)
    kept: list[frozenset[str]] = []
    for split, count in (("train", train_rows), ("test", test_rows)):
        with open(out / f"{split}.jsonl", "w", encoding="utf-8") as handle:
            written = 0
            while written < count:
                topic = rng.choices(names, weights)[0]
                others = [s for n in names if n != topic for s in TOPICS[n][1]]
                body = ticket(rng, TOPICS[topic][1], others)
                if is_repeat(shingles(body), kept):
                    continue
                kept.append(shingles(body))
                handle.write(json.dumps({"body": body, "topic": topic}) + "\n")
                written += 1


if __name__ == "__main__":
    main()
