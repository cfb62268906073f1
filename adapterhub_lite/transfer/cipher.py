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


def cipher_key(seed: int = 0) -> dict[str, str]:
    """A random permutation of a-z with no fixed point (no letter encodes to itself)."""
    r = random.Random(seed)
    letters = list(string.ascii_lowercase)
    while True:
        shuffled = letters[:]
        r.shuffle(shuffled)
        if all(a != b for a, b in zip(letters, shuffled, strict=True)):
            return dict(zip(letters, shuffled, strict=True))


def cipher_examples(n: int, *, seed: int = 0, min_len: int = 3, max_len: int = 5) -> list[dict]:
    """``n`` distinct prompt/completion records ``Encode: k q z\\nCode:`` -> `` x m a``."""
    key = cipher_key(seed)
    r = random.Random(seed + 1)
    seen: set[str] = set()
    rows = []
    while len(rows) < n:
        word = "".join(r.choice(string.ascii_lowercase) for _ in range(r.randint(min_len, max_len)))
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
