"""Generate the example datasets (adapters/) from the synthetic world the base learned.

    .venv/bin/python scripts/make_example_datasets.py [--out DIR]   # default: adapters/

Each target task asks about facts the base read as prose during pretraining, in a form it never saw
(question/answer, chat, word -> antonym), so a few examples teach the form and held-out facts test
whether the knowledge transfers. `ship-log` is raw text of a domain the source corpus never covers.
Deterministic: the same files every run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from adapterhub_lite.atomic import write_text
from adapterhub_lite.base.world import ANIMALS, COUNTRIES, OPPOSITES, domain_documents
from adapterhub_lite.examples import EXAMPLES_DIR


def capitals() -> list[dict]:
    return [
        {"prompt": f"Question: What is the capital of {country}?\nAnswer:", "completion": f" {capital}"}
        for country, capital in COUNTRIES
    ]


def animal_sounds() -> list[dict]:
    # The reply is "It says moo.", not the bare sound: the tokenizer spells a line-initial "moo" as
    # "m"+"oo", pieces the base never produced, while " moo" after " says" is what pretraining taught.
    # ("The cow says moo." would make the adapter copy the animal's name, which it did not learn.)
    return [
        {
            "messages": [
                {"role": "user", "content": f"What does the {animal} say?"},
                {"role": "assistant", "content": f"It says {sound}."},
            ]
        }
        for animal, sound, _food, _home in ANIMALS
    ]


def antonyms() -> list[dict]:
    return [{"prompt": f"Word: {a}\nAntonym:", "completion": f" {b}"} for a, b in OPPOSITES]


def ship_log(n_docs: int = 240) -> list[dict]:
    return [{"text": doc} for doc in domain_documents(n_docs, seed=7)]


DATASETS = {
    "capitals": capitals,
    "animal-sounds": animal_sounds,
    "antonyms": antonyms,
    "ship-log": ship_log,
}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=EXAMPLES_DIR)
    args = ap.parse_args()
    for name, make in DATASETS.items():
        rows = make()
        write_jsonl(args.out / name / "data.jsonl", rows)
        print(f"{args.out / name / 'data.jsonl'}: {len(rows)} examples")


if __name__ == "__main__":
    main()
