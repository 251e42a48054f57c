"""Regenerates the bundled demo dataset (hydra_edge/demo/*.jsonl) from a fixed seed.

Four task families, each a lookup a small model can learn from the words of the prompt:
sentiment, antonyms, capitals and number words. The held-out split pairs every key with
phrasings it was never trained with (each phrasing is still seen with other keys), so
exact-match on it measures generalisation across phrasings, not memorised rows.

    python scripts/make_demo_data.py     # rewrites hydra_edge/demo/{train,eval}.jsonl
"""

import json
import random
from pathlib import Path

SEED = 1234
OUT = Path(__file__).resolve().parent.parent / "hydra_edge" / "demo"

SENTIMENT_TEMPLATES = [
    "Is this review positive or negative? {s}",
    "Classify the sentiment of this review: {s}",
    "Review: {s} Is the sentiment positive or negative?",
    "What is the sentiment of the following review? {s}",
    "Tell me if this review is positive or negative: {s}",
]
NOUNS = ["movie", "book", "meal", "hotel", "phone", "concert", "game", "service", "show", "car"]
POSITIVE = ["wonderful", "excellent", "amazing", "delightful", "great", "fantastic", "lovely", "superb"]
NEGATIVE = ["terrible", "awful", "boring", "horrible", "dreadful", "poor", "disappointing", "bad"]
SENTENCES = ["The {n} was {a}.", "This {n} is {a}.", "What a {a} {n}!", "I found the {n} {a}."]

ANTONYM_TEMPLATES = [
    "What is the opposite of {w}?",
    "Give the antonym of the word {w}.",
    "Name a word that means the opposite of {w}.",
    "Antonym of {w}?",
    "Which word is the opposite of {w}?",
]
ANTONYMS = [
    ("hot", "cold"),
    ("big", "small"),
    ("fast", "slow"),
    ("happy", "sad"),
    ("up", "down"),
    ("light", "dark"),
    ("open", "closed"),
    ("early", "late"),
    ("rich", "poor"),
    ("strong", "weak"),
    ("young", "old"),
    ("wet", "dry"),
]

CAPITAL_TEMPLATES = [
    "What is the capital of {c}?",
    "Name the capital city of {c}.",
    "Which city is the capital of {c}?",
    "The capital of {c} is which city?",
    "Tell me the capital of {c}.",
]
CAPITALS = [
    ("France", "Paris"),
    ("Japan", "Tokyo"),
    ("Italy", "Rome"),
    ("Spain", "Madrid"),
    ("Germany", "Berlin"),
    ("Egypt", "Cairo"),
    ("Canada", "Ottawa"),
    ("Peru", "Lima"),
    ("Kenya", "Nairobi"),
    ("Norway", "Oslo"),
    ("Greece", "Athens"),
    ("Chile", "Santiago"),
]

NUMBER_TEMPLATES = [
    "Write the number {w} in digits.",
    "Convert the word {w} to a number.",
    "How do you write {w} as a numeral?",
    "Spell {w} with digits.",
    "What digits stand for {w}?",
]
NUMBER_WORDS = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
]


def row(prompt, answer, task):
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}], "task": task}


def split_lookup(rng, keys_answers, templates, task, eval_per_key=1):
    """Every key gets `eval_per_key` held-out phrasings; the rest of its phrasings train."""
    train, held = [], []
    for key, answer in keys_answers:
        order = rng.sample(range(len(templates)), len(templates))
        for rank, t in enumerate(order):
            target = held if rank < eval_per_key else train
            target.append(row(templates[t].format(w=key, c=key), answer, task))
    return train, held


def sentiment_rows(rng):
    combos = [
        (s, n, a, lab)
        for s in SENTENCES
        for n in NOUNS
        for lab, adjs in (("positive", POSITIVE), ("negative", NEGATIVE))
        for a in adjs
    ]
    rng.shuffle(combos)
    rows = []
    for s, n, a, lab in combos:
        sentence = s.format(n=n, a=a)
        sentence = sentence[0].upper() + sentence[1:]
        rows.append(row(rng.choice(SENTIMENT_TEMPLATES).format(s=sentence), lab, "sentiment"))
    return rows[:200], rows[200:230]


def main():
    rng = random.Random(SEED)
    train, held = [], []
    for tr, he in (
        sentiment_rows(rng),
        split_lookup(rng, ANTONYMS + [(b, a) for a, b in ANTONYMS], ANTONYM_TEMPLATES, "antonym"),
        split_lookup(rng, CAPITALS, CAPITAL_TEMPLATES, "capital"),
        split_lookup(rng, [(w, str(i)) for i, w in enumerate(NUMBER_WORDS)], NUMBER_TEMPLATES, "number"),
    ):
        train += tr
        held += he
    rng.shuffle(train)
    rng.shuffle(held)
    OUT.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train.jsonl", train), ("eval.jsonl", held)):
        with open(OUT / name, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"train {len(train)} rows, eval {len(held)} rows -> {OUT}")


if __name__ == "__main__":
    main()
