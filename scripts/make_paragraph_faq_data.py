"""Write data/faq_paragraphs/{train,test}.jsonl: extractive QA whose answers are whole paragraphs.

An insurance-and-utilities help centre of made-up companies (another industry than data/faq's shops).
Each answer is a paragraph of 30-80 words; each context holds it among three other paragraphs of the
same company, so most contexts are longer than a 256-token window. Test companies and their values never
appear in training. Deterministic. Checks that span settings come from the data (issue: QA defaults).
Run: python scripts/make_paragraph_faq_data.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

COMPANIES = [
    "Alder Mutual",
    "Beacon Power",
    "Cedar Health",
    "Delta Water",
    "Ember Gas",
    "Falcon Telecom",
    "Garnet Insure",
    "Heron Broadband",
    "Indigo Energy",
    "Jasper Life",
    "Kite Mobile",
    "Lumen Electric",
    "Meridian Home",
    "Northwind Auto",
    "Opal Dental",
    "Prism Fibre",
    "Quill Pension",
    "Raven Travel",
    "Sable Pet Cover",
    "Thistle Solar",
]

# (questions, sentences of the answering paragraph; each sentence formats with the values)
TOPICS = [
    (
        ["How do I make a claim?", "What is the process for filing a claim?"],
        [
            "To make a claim, sign in to your account and open the Claims page, then choose the policy it concerns.",
            "Describe what happened and upload photos or receipts that support the claim.",
            "A claims handler contacts you within {days} working days and may ask for further documents.",
            "Most claims are settled within {weeks} weeks of the day we receive everything we need.",
        ],
    ),
    (
        ["How is my monthly bill calculated?", "Why did my bill change?"],
        [
            "Your monthly bill is the standing charge of {fee} a day plus the units you used at your tariff's rate.",
            "If we could not read your meter, the bill uses an estimate based on your usage in the same month last year.",
            "Submitting a meter reading before the {date} of the month keeps the next bill accurate.",
            "Any credit on your account is taken off the next bill automatically.",
        ],
    ),
    (
        ["Can I pause or cancel my contract?", "How do I end my contract early?"],
        [
            "You can cancel within {days} days of signing without any fee and get a full refund of what you paid.",
            "After that period an early exit fee of {fee} applies for each remaining month of the minimum term.",
            "Pausing is possible once a year for up to {weeks} weeks if you move abroad or into care.",
            "Send the request from the Contract page so that we can confirm the final date in writing.",
        ],
    ),
    (
        ["What should I do in an emergency?", "Who do I call if something goes wrong at night?"],
        [
            "In an emergency call our 24-hour line on {phone} and keep yourself and others safe first.",
            "Do not try to repair gas, water or electrical faults yourself, even if the damage looks small.",
            "An engineer is sent within {hours} hours and the first visit is free for every customer.",
            "Keep receipts for any urgent costs because they can be added to your claim later.",
        ],
    ),
    (
        ["How do I move my service to a new address?", "I am moving house. What do I need to do?"],
        [
            "Tell us your moving date at least {days} days ahead from the Moving page in your account.",
            "We close the account at your old address on that date and send a final bill within {weeks} weeks.",
            "At the new address the service starts on the same day, so there is no gap in cover or supply.",
            "Take a meter reading or a photo of the meter on the day you leave to avoid paying for the next occupant.",
        ],
    ),
    (
        ["How can I lower my premium?", "Are there discounts on my policy?"],
        [
            "Your premium falls if you choose a higher voluntary excess, for example {fee} instead of the standard amount.",
            "Paying yearly instead of monthly saves about {percent} percent because no credit charge applies.",
            "Customers without a claim for {years} years receive a no-claims discount that grows each year.",
            "Combining two policies with us gives a further multi-policy discount on both.",
        ],
    ),
    (
        ["How is my personal data used?", "Do you share my information with anyone?"],
        [
            "We use your personal data only to provide your policy or supply, to prevent fraud and to meet legal duties.",
            "It is never sold, and it is shared with partners only when they work on our behalf under a contract.",
            "You can download everything we hold about you from the Privacy page within {days} days of asking.",
            "Marketing messages stop as soon as you switch them off in your preferences.",
        ],
    ),
    (
        ["What happens if I miss a payment?", "I cannot pay this month. What now?"],
        [
            "If a payment fails we try again after {days} days and send you a reminder by email and text.",
            "A missed payment does not end your cover straight away, but a late fee of {fee} may be added.",
            "If you are struggling, call us on {phone}: we can spread the amount over up to {weeks} weeks.",
            "We never disconnect a supply without writing to you at least three times first.",
        ],
    ),
    (
        ["How do I make a complaint?", "I am unhappy with the service. Who can I talk to?"],
        [
            "Start by replying to the message you received or by calling {phone}, and we aim to fix it on the spot.",
            "If not, your complaint is passed to our customer relations team, who reply within {days} working days.",
            "You receive a final response within {weeks} weeks explaining what we found and what we will do.",
            "If you are still unhappy you can take the complaint to the independent ombudsman free of charge.",
        ],
    ),
    (
        ["Does my policy cover travel abroad?", "Am I covered when I travel?"],
        [
            "Your policy covers trips abroad of up to {days} days each, as long as you live in the country where you bought it.",
            "Medical costs are covered up to {fee}, and lost luggage up to a lower limit shown in your schedule.",
            "Winter sports and cruises need an add-on, which you can buy at any time before you leave.",
            "Call the assistance line on {phone} before paying for treatment so that we can arrange it directly.",
        ],
    ),
]


def values(rng: random.Random) -> dict:
    return {
        "days": rng.choice([3, 5, 7, 10, 14, 21, 30]),
        "weeks": rng.choice([2, 3, 4, 6, 8]),
        "fee": f"${rng.choice([25, 40, 50, 75, 100, 150, 250])}",
        "date": rng.choice(["5th", "10th", "15th", "20th"]),
        "phone": f"0800 {rng.randint(100, 999)} {rng.randint(1000, 9999)}",
        "hours": rng.choice([2, 4, 6, 12]),
        "percent": rng.choice([5, 8, 10, 12, 15]),
        "years": rng.choice([2, 3, 4, 5]),
    }


def paragraph(topic, rng: random.Random) -> str:
    """Three or four of the topic's sentences (30-80 words), first sentence always kept."""
    sentences = topic[1]
    keep = [sentences[0]] + [s for s in sentences[1:] if rng.random() < 0.8]
    return " ".join(keep).format(**values(rng))


def rows(companies: list[str], seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for company in companies:
        texts = [paragraph(topic, rng) for topic in TOPICS]
        for index, topic in enumerate(TOPICS):
            others = rng.sample([i for i in range(len(TOPICS)) if i != index], 3)
            order = others + [index]
            rng.shuffle(order)
            context = "\n\n".join(texts[i] for i in order)
            answer = texts[index]
            out.append(
                {
                    "id": f"{company.lower().replace(' ', '-')}-{index}",
                    "question": rng.choice(topic[0]),
                    "context": context,
                    "answers": {"text": [answer], "answer_start": [context.index(answer)]},
                }
            )
    rng.shuffle(out)
    return out


def main() -> None:
    target = Path(__file__).resolve().parents[1] / "data" / "faq_paragraphs"
    target.mkdir(parents=True, exist_ok=True)
    for name, companies, seed in (("train", COMPANIES[:14], 1), ("test", COMPANIES[14:], 2)):
        with open(target / f"{name}.jsonl", "w", encoding="utf-8") as handle:
            for row in rows(companies, seed):
                handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
