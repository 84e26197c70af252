"""Write data/faq/{train,test}.jsonl (extractive, SQuAD layout) and data/faq/{train,test}_generative.jsonl
(question + the answering paragraph -> answer).

Customer-support FAQs of made-up shops. Each context is the paragraph that
holds the answer hidden among three other paragraphs of the same shop's FAQ.
Test shops and their values never appear in training. Deterministic.
Run: python scripts/make_faq_data.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SHOPS = [
    "Acme Outdoors",
    "Brightside Books",
    "Cobalt Audio",
    "Dune Coffee",
    "Evergreen Garden",
    "Fjord Knitwear",
    "Granite Tools",
    "Harbor Pets",
    "Iris Beauty",
    "Juniper Kids",
    "Kestrel Bikes",
    "Lantern Home",
    "Maple Music",
    "Nova Phones",
    "Orchid Tea",
    "Pine Furniture",
    "Quarry Climbing",
    "Rowan Toys",
    "Saffron Kitchen",
    "Tidal Surf",
    "Umber Art",
    "Vale Wellness",
    "Willow Baby",
    "Yarrow Herbs",
]

# (questions, paragraph template, answer template, value generator)
FACTS = [
    (
        [
            "How long do I have to return an item?",
            "What is the return window?",
            "How many days do I have to send something back?",
        ],
        "You can return most items within {a} of delivery. Items must be unused and in their original packaging.",
        "{a}",
        lambda r: {"a": f"{r.choice([14, 30, 45, 60, 90])} days"},
    ),
    (
        ["How much does standard shipping cost?", "What do you charge for standard delivery?"],
        "Standard shipping costs {a} per order and is free on orders over {b}.",
        "{a}",
        lambda r: {
            "a": f"${r.choice([3, 4, 5, 6, 7, 8])}.{r.choice(['00', '50', '95', '99'])}",
            "b": f"${r.choice([35, 50, 75, 100])}",
        },
    ),
    (
        ["How long does delivery take?", "When will my order arrive?", "How fast is standard shipping?"],
        "Orders are packed within one day, and standard delivery takes {a}. Express delivery arrives the next day.",
        "{a}",
        lambda r: {"a": r.choice(["2 to 4 business days", "3 to 5 business days", "5 to 7 business days", "one week"])},
    ),
    (
        ["How do I reset my password?", "I forgot my password. What should I do?"],
        "To reset your password, click {a} on the sign-in page and follow the link in the email we send you.",
        "{a}",
        lambda r: {"a": r.choice(["Forgot password", "Reset password", "Need help signing in", "Trouble logging in"])},
    ),
    (
        ["What are your support hours?", "When is customer service open?", "When can I reach your support team?"],
        "Our support team answers chats and calls {a}. Messages sent outside these hours are answered the next morning.",
        "{a}",
        lambda r: {
            "a": r.choice(
                [
                    "Monday to Friday, 9am to 6pm",
                    "every day from 8am to 8pm",
                    "weekdays from 10am to 4pm",
                    "Monday to Saturday, 9am to 5pm",
                ]
            )
        },
    ),
    (
        ["How can I contact support by email?", "What is your support email address?"],
        "You can email our support team at {a} and we reply within one business day.",
        "{a}",
        lambda r: {
            "a": f"{r.choice(['help', 'support', 'care', 'hello'])}@{r.choice(['shopmail', 'store', 'ourshop', 'orders'])}.example"
        },
    ),
    (
        ["Where can I find my invoice?", "How do I download an invoice?"],
        "Invoices for every order are available under {a} in your account, as PDF files.",
        "{a}",
        lambda r: {
            "a": r.choice(["Account > Orders", "Settings > Billing", "My Account > Invoices", "Orders > Documents"])
        },
    ),
    (
        ["Do you ship internationally?", "How many countries do you deliver to?"],
        "Yes, we ship to {a}. Customs fees are paid by the recipient.",
        "{a}",
        lambda r: {"a": f"{r.choice([20, 35, 40, 60, 120])} countries"},
    ),
    (
        ["How do I cancel my subscription?", "Can I stop my subscription?"],
        "You can cancel your subscription at any time from {a}; it stays active until the end of the billing period.",
        "{a}",
        lambda r: {
            "a": r.choice(
                ["the Subscriptions page", "Account > Plan", "Settings > Membership", "the Manage plan screen"]
            )
        },
    ),
    (
        ["What payment methods do you accept?", "How can I pay?"],
        "We accept {a}. Payment is taken when your order ships.",
        "{a}",
        lambda r: {
            "a": r.choice(
                [
                    "Visa, Mastercard and PayPal",
                    "credit cards and bank transfer",
                    "cards, PayPal and gift cards",
                    "Visa, Amex and Apple Pay",
                ]
            )
        },
    ),
    (
        ["Is there a warranty?", "How long is the warranty?", "What warranty do your products have?"],
        "All products come with a {a} warranty that covers manufacturing defects but not accidental damage.",
        "{a}",
        lambda r: {"a": r.choice(["one-year", "two-year", "three-year", "five-year", "lifetime"])},
    ),
    (
        ["Can I change my delivery address?", "How do I update the shipping address of an order?"],
        "You can change the delivery address {a}. After that, contact the courier directly.",
        "{a}",
        lambda r: {
            "a": r.choice(
                [
                    "until the order is packed",
                    "within one hour of ordering",
                    "before the order ships",
                    "up to midnight on the order day",
                ]
            )
        },
    ),
    (
        ["Do you have a loyalty program?", "How do reward points work?"],
        "Members of our loyalty club earn {a} for every dollar spent, redeemable on any future order.",
        "{a}",
        lambda r: {"a": f"{r.choice([1, 2, 5, 10])} points"},
    ),
    (
        ["Where is your store located?", "Do you have a physical shop?"],
        "Our flagship store is at {a}, open daily. You can also collect online orders there.",
        "{a}",
        lambda r: {
            "a": f"{r.randint(2, 250)} {r.choice(['Mill', 'River', 'Station', 'Oak', 'Market', 'Bridge'])} {r.choice(['Street', 'Road', 'Lane', 'Avenue'])}"
        },
    ),
    (
        ["How do I track my order?", "Where can I see where my parcel is?"],
        "Once your order ships, you receive a tracking link by {a}. You can also see the status in your account.",
        "{a}",
        lambda r: {"a": r.choice(["email", "text message", "email and SMS", "push notification"])},
    ),
    (
        ["Can I buy a gift card?", "Do you sell gift cards?"],
        "Gift cards are sold in values from {a} and never expire.",
        "{a}",
        lambda r: {"a": f"${r.choice([10, 20, 25])} to ${r.choice([200, 250, 500])}"},
    ),
    (
        ["Who pays for return shipping?", "Are returns free?"],
        "Returns are {a}. Print the prepaid label from your account and drop the parcel at any post office.",
        "{a}",
        lambda r: {
            "a": r.choice(
                ["free for members", "free within the country", "charged at $4.95", "free on your first return"]
            )
        },
    ),
    (
        ["How long do refunds take?", "When will I get my money back?"],
        "Refunds are issued to the original payment method within {a} of us receiving your return.",
        "{a}",
        lambda r: {"a": f"{r.choice([3, 5, 7, 10, 14])} business days"},
    ),
]


def shop_facts(rng) -> list[tuple[list[str], str, str]]:
    facts = []
    for questions, paragraph, answer, values in FACTS:
        v = values(rng)
        facts.append((questions, paragraph.format(**v), answer.format(**v)))
    return facts


def examples_for(shop: str, rng, per_shop: int) -> list[dict]:
    facts = shop_facts(rng)
    rows = []
    for index in rng.sample(range(len(facts)), per_shop):
        questions, paragraph, answer = facts[index]
        others = rng.sample([f[1] for i, f in enumerate(facts) if i != index], 3)
        paragraphs = others + [paragraph]
        rng.shuffle(paragraphs)
        context = "\n\n".join(paragraphs)
        start = context.index(paragraph) + paragraph.index(answer)
        rows.append(
            {
                "id": f"{shop.lower().replace(' ', '-')}-{index}",
                "question": rng.choice(questions),
                "context": context,
                "answers": {"text": [answer], "answer_start": [start]},
                "paragraph": paragraph,
                "shop": shop,
            }
        )
    return rows


def main() -> None:
    rng = random.Random(11)
    shops = SHOPS[:]
    rng.shuffle(shops)
    out = Path(__file__).resolve().parents[1] / "data" / "faq"
    out.mkdir(parents=True, exist_ok=True)
    for split, chosen, per in (("train", shops[6:], 16), ("test", shops[:6], 10)):
        rows = [row for shop in chosen for row in examples_for(shop, rng, per)]
        rng.shuffle(rows)
        # Generative rows: the question, the one paragraph that answers it (under its shop's name: shops share the
        # wording of their FAQs, and without the name two shops with the same policy would be one row twice), and
        # the answer to write.
        generative = [
            {
                "question": r["question"],
                "context": f"{r.pop('shop')} FAQ. {r.pop('paragraph')}",
                "answer": r["answers"]["text"][0],
            }
            for r in rows
        ]
        (out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        (out / f"{split}_generative.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in generative), encoding="utf-8"
        )
        print(f"{split}: {len(rows)} rows")


if __name__ == "__main__":
    main()
