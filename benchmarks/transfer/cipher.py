"""The far-from-source target task of the transfer study: a letter substitution cipher.

The source corpus is English prose about a small world; this task has none of it: random letter strings,
spelled out one letter at a time, each letter replaced by a fixed secret letter. Nothing the base learned
helps to predict the answer, so it is where the pretrained start can fail to help, or hurt (negative
transfer). Deterministic: the same key and examples for the same seed.
"""

from __future__ import annotations

import random
import string

PROMPT = "Encode: {plain}\nCode:"
# Ten letters: few enough pairs for a small training budget to be able to learn the mapping at all.
ALPHABET = string.ascii_lowercase[:10]


def cipher_key(seed: int = 0, alphabet: str = ALPHABET) -> dict[str, str]:
    """A random permutation of ``alphabet`` with no fixed point (no letter encodes to itself)."""
    r = random.Random(seed)
    letters = list(alphabet)
    while True:
        shuffled = letters[:]
        r.shuffle(shuffled)
        if all(a != b for a, b in zip(letters, shuffled, strict=True)):
            return dict(zip(letters, shuffled, strict=True))


def cipher_examples(
    n: int, *, seed: int = 0, min_len: int = 3, max_len: int = 5, alphabet: str = ALPHABET
) -> list[dict]:
    """``n`` distinct prompt/completion records ``Encode: b j c\\nCode:`` -> `` f a h``."""
    key = cipher_key(seed, alphabet)
    r = random.Random(seed + 1)
    seen: set[str] = set()
    rows = []
    while len(rows) < n:
        word = "".join(r.choice(alphabet) for _ in range(r.randint(min_len, max_len)))
        if word in seen:
            continue
        seen.add(word)
        rows.append(
            {
                "prompt": PROMPT.format(plain=" ".join(word)),
                "completion": " " + " ".join(key[c] for c in word),
            }
        )
    return rows
