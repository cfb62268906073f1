"""Train every example adapter (adapters/) on the embedded base; print metrics.

    .venv/bin/python scripts/train_examples.py [--method lora|qlora] [--only capitals,antonyms] [--out runs]

Each adapter goes to ``<out>/<name>`` (a previous run there is replaced); the table and a JSON summary
(``<out>/examples_summary.json``) show held-out loss and exact match of the base and of the adapter.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from adapterhub_lite.examples import EXAMPLES_DIR
from adapterhub_lite.training import load_recipe, train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", choices=["lora", "qlora"], default=None, help="default: each recipe's own")
    ap.add_argument("--only", default=None, help="comma-separated example names")
    ap.add_argument("--out", type=Path, default=Path("runs"))
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args()
    recipes = sorted(EXAMPLES_DIR.glob("*/recipe.yaml"))
    if args.only:
        wanted = set(args.only.split(","))
        recipes = [r for r in recipes if r.parent.name in wanted]
    rows = []
    for path in recipes:
        recipe = load_recipe(path, {"method": args.method, "output_dir": args.out / path.parent.name})
        t0 = time.time()
        rec = train(recipe, progress=not args.no_progress, overwrite=True).record
        m = rec["metrics"]
        rows.append(
            {
                "name": recipe.name,
                "method": rec["method"],
                "format": rec["dataset"]["format"],
                "train_examples": rec["dataset"]["train_examples"],
                "eval_examples": rec["dataset"]["eval_examples"],
                "steps": rec["steps"],
                "train_seconds": rec["train_seconds"],
                "wall_seconds": round(time.time() - t0, 1),
                "base": m["base"],
                "adapter": m["adapter"],
                "transfer_gain": m["transfer_gain"],
                "negative_transfer": rec["negative_transfer"],
            }
        )

    def em(x):
        return "  n/a" if x is None else f"{x:5.2f}"

    print(
        f"\n{'example':<14} {'method':<6} {'steps':>5} {'train s':>7} {'base loss':>9} {'adapter loss':>12} "
        f"{'base EM':>7} {'adapter EM':>10}"
    )
    for r in rows:
        print(
            f"{r['name']:<14} {r['method']:<6} {r['steps']:>5} {r['train_seconds']:>7.1f} "
            f"{r['base']['loss']:>9.3f} {r['adapter']['loss']:>12.3f} {em(r['base']['exact_match']):>7} "
            f"{em(r['adapter']['exact_match']):>10}"
            + ("  NEGATIVE TRANSFER" if r["negative_transfer"] else "")
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "examples_summary.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
