"""A generated, offline, multi-task dataset for benchmarks/quality.py.

Eight task families read the same kind of input, a short list of common words (and, for two
families, numbers), and differ only in the instruction, so they interfere when one set of
weights learns them all: the setting where HydraLoRA's heads should pay off. Every family is
computed by a rule, so exact-match is well defined, and most need several steps of reasoning
over the input (sort, reverse, count, pick by position), so a 270M model does not saturate
them in a few hundred steps.

Splits: train, validation (learning-rate picks) and test. Every family has 6 phrasings; the
first 4 are used for train and validation, the last 2 for test only, and the test inputs are
fresh word lists: test exact-match measures generalisation to unseen phrasings and inputs.

    python benchmarks/multitask_data.py --out bench-data/multitask   # train/validation/test .jsonl
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

WORDS = (
    "apple river stone cloud tiger piano lemon garden candle rocket window mirror forest "
    "silver pencil button castle dragon jacket island ladder marble needle orange pepper "
    "rabbit saddle tunnel violin wagon yellow zebra anchor bridge carpet desert engine "
    "feather guitar hammer jungle kettle lantern meadow napkin ocean parrot quilt"
).split()

FAMILIES: dict[str, list[str]] = {
    "reverse": [
        "Reverse the order of these words: {w}",
        "Write these words backwards, last one first: {w}",
        "Words: {w}. List them in reverse order.",
        "Give the words in opposite order: {w}",
        "Flip the order of the list {w}",
        "Read this list from the end to the start: {w}",
    ],
    "sort": [
        "Sort these words alphabetically: {w}",
        "Put these words in alphabetical order: {w}",
        "Words: {w}. Sort them from A to Z.",
        "Arrange alphabetically: {w}",
        "Order the list {w} as a dictionary would",
        "Alphabetize the following words: {w}",
    ],
    "count": [
        "How many words are in this list? {w}",
        "Count the words: {w}",
        "Words: {w}. How many are there?",
        "Give the number of words in: {w}",
        "Tell me the length of the list {w}",
        "What is the word count of the following? {w}",
    ],
    "first_letters": [
        "Write the first letter of each word: {w}",
        "Give the initials of these words: {w}",
        "Words: {w}. Join their first letters.",
        "Take the first letter of every word in: {w}",
        "Spell the acronym formed by the list {w}",
        "Which letters start the following words? {w}",
    ],
    "last_word": [
        "What is the last word in this list? {w}",
        "Give the final word: {w}",
        "Words: {w}. Which one comes last?",
        "Name the word at the end of: {w}",
        "Tell me which word closes the list {w}",
        "Return only the final item of the following: {w}",
    ],
    "longest": [
        "Which word in this list is the longest? {w}",
        "Find the longest word: {w}",
        "Words: {w}. Which has the most letters?",
        "Give the longest of these words: {w}",
        "Tell me the word with the greatest length in the list {w}",
        "Return the longest item of the following: {w}",
    ],
    "sum": [
        "Add up these numbers: {n}",
        "What is the sum of {n}?",
        "Numbers: {n}. What is their total?",
        "Compute the total of: {n}",
        "Tell me what the list {n} adds up to",
        "Sum the following values: {n}",
    ],
    "max": [
        "Which number is the largest? {n}",
        "Find the maximum of: {n}",
        "Numbers: {n}. Which is biggest?",
        "Give the greatest of these numbers: {n}",
        "Tell me the highest value in the list {n}",
        "Return the largest item of the following: {n}",
    ],
}
TRAIN_PHRASINGS = 4


def _answer(family: str, words: list[str], numbers: list[int]) -> str:
    if family == "reverse":
        return " ".join(reversed(words))
    if family == "sort":
        return " ".join(sorted(words))
    if family == "count":
        return str(len(words))
    if family == "first_letters":
        return "".join(w[0] for w in words)
    if family == "last_word":
        return words[-1]
    if family == "longest":
        return max(words, key=lambda w: (len(w), w))  # ties: the alphabetically last, stated by the data
    if family == "sum":
        return str(sum(numbers))
    return str(max(numbers))


def _row(family: str, phrasing: str, rng: random.Random) -> dict:
    words = rng.sample(WORDS, rng.randint(3, 6))
    if family == "longest":  # one clear winner, so the answer never depends on a tie-break
        while sorted(len(w) for w in words)[-1] == sorted(len(w) for w in words)[-2]:
            words = rng.sample(WORDS, rng.randint(3, 6))
    numbers = [rng.randint(1, 49) for _ in range(rng.randint(2, 4))]
    prompt = phrasing.format(w=" ".join(words), n=" ".join(map(str, numbers)))
    return {
        "messages": [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": _answer(family, words, numbers)},
        ],
        "task": family,
    }


def make_splits(
    train_per_family: int = 120, validation_per_family: int = 20, test_per_family: int = 30, seed: int = 7
) -> dict[str, list[dict]]:
    """{"train", "validation", "test"}: rows of {"messages", "task"}; test uses held-out phrasings."""
    rng = random.Random(seed)
    splits: dict[str, list[dict]] = {"train": [], "validation": [], "test": []}
    for family, phrasings in FAMILIES.items():
        seen, held_out = phrasings[:TRAIN_PHRASINGS], phrasings[TRAIN_PHRASINGS:]
        for split, count, choices in (
            ("train", train_per_family, seen),
            ("validation", validation_per_family, seen),
            ("test", test_per_family, held_out),
        ):
            splits[split] += [_row(family, rng.choice(choices), rng) for _ in range(count)]
    for rows in splits.values():
        rng.shuffle(rows)
    return splits


def write_splits(out: Path, **sizes) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, rows in make_splits(**sizes).items():
        paths[split] = out / f"{split}.jsonl"
        paths[split].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench-data/multitask"))
    print(write_splits(parser.parse_args().out))
