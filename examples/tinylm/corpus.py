"""A text corpus generated locally from a seeded grammar: no downloads, the same
bytes on every machine. Sentences have structure a small model can learn (agreement,
word order, recurring phrases) and enough variety that the loss keeps falling."""

from __future__ import annotations

import random

SUBJECTS = [
    ("the", "cat", "s"), ("the", "dog", "s"), ("a", "bird", "s"), ("the", "farmer", "s"), ("my", "sister", "s"),
    ("the", "children", "p"), ("our", "neighbours", "p"), ("the", "old", "s"), ("two", "wolves", "p"),
    ("the", "engineer", "s"), ("every", "student", "s"), ("the", "sailors", "p"), ("a", "stranger", "s"),
]
VERBS = {
    "s": ["sees", "likes", "follows", "paints", "carries", "finds", "watches", "remembers", "builds", "chases"],
    "p": ["see", "like", "follow", "paint", "carry", "find", "watch", "remember", "build", "chase"],
}
ADJECTIVES = ["red", "quiet", "small", "ancient", "bright", "heavy", "curious", "broken", "golden", "distant"]
OBJECTS = ["house", "river", "lantern", "garden", "letter", "mountain", "boat", "window", "song", "machine"]
PLACES = ["near the sea", "in the morning", "under the bridge", "after the storm", "behind the hill", "at night"]
CONNECTIVES = ["and then", "because", "while", "although", "so"]


def _clause(rng: random.Random) -> str:
    det, noun, number = rng.choice(SUBJECTS)
    verb = rng.choice(VERBS[number])
    words = [det, noun, verb, "the"]
    if rng.random() < 0.6:
        words.append(rng.choice(ADJECTIVES))
    words.append(rng.choice(OBJECTS))
    if rng.random() < 0.4:
        words.append(rng.choice(PLACES))
    return " ".join(words)


def sentence(rng: random.Random) -> str:
    text = _clause(rng)
    if rng.random() < 0.35:
        text += " " + rng.choice(CONNECTIVES) + " " + _clause(rng)
    return text[0].upper() + text[1:] + "."


def generate(n_chars: int, seed: int) -> str:
    rng = random.Random(seed)
    parts: list[str] = []
    size = 0
    while size < n_chars:
        s = sentence(rng)
        parts.append(s)
        size += len(s) + 1
    return " ".join(parts)[:n_chars]


ALPHABET = sorted(set(generate(200_000, 0)) | set(" ."))
