"""Asking the demo's server: held-out questions of an example task, and greedy answers through openai."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from adapterhub_lite.examples import EXAMPLES_DIR


def heldout_questions(task: str, limit: int = 8) -> list[tuple[str, str, str]]:
    """(kind, prompt, expected answer) for held-out examples of a task, as the recipe splits them."""
    from adapterhub_lite.data import load_dataset, train_eval_split
    from adapterhub_lite.training import load_recipe

    recipe = load_recipe(EXAMPLES_DIR / task / "recipe.yaml")
    data = load_dataset(recipe.data, recipe.format)
    _, held_out = train_eval_split(data.examples, recipe.eval_fraction, recipe.seed)
    out = []
    for ex in held_out[:limit]:
        if ex.format == "chat":
            out.append(("chat", ex.messages[0]["content"], ex.messages[-1]["content"]))
        else:
            out.append(("completion", ex.prompt, ex.completion))
    return out


def ask(client, model: str, kind: str, prompt: str) -> str:
    """One greedy request through the OpenAI client; returns the answer text."""
    if kind == "chat":
        r = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], max_tokens=8, temperature=0
        )
        return (r.choices[0].message.content or "").strip()
    r = client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0, stop=["\n"])
    return r.choices[0].text.strip()


def accuracy(client, model: str, questions: list[tuple[str, str, str]]) -> tuple[float, list[str]]:
    """Exact-match share of greedy answers to `questions`, and the answers."""
    answers = [ask(client, model, kind, p) for kind, p, _ in questions]
    hits = sum(a == want.strip() for a, (_, _, want) in zip(answers, questions, strict=True))
    return hits / len(questions), answers


def status_of(fn: Callable[[], Any]) -> int:
    """The HTTP status a client call ends with (200 when it succeeds)."""
    import openai

    try:
        fn()
        return 200
    except openai.APIStatusError as exc:
        return exc.status_code
