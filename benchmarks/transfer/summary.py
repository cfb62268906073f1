"""The study's summary: mean and spread over seeds of the rows `run_study` wrote, and the targets' verdicts.

Nothing here measures anything: `summarize` aggregates results.json's rows, so every number in REPORT.md
can be traced to a row (`plots` draws the summary, `render` writes REPORT.md).
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict

# Targets from the issue.
LORA_SHARE_OF_FULL_EM = 0.90
LORA_MAX_PARAM_FRACTION = 0.02
# "A clear margin": at least this much exact match, and more than twice the larger seed spread.
CLEAR_MARGIN_EM = 0.10


def stats(values: list[float | None]) -> dict:
    """Mean, sample standard deviation, min, max and count of the non-missing values (None if none)."""
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    return {
        "mean": statistics.fmean(vals),
        "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
        "min": min(vals),
        "max": max(vals),
        "n": len(vals),
    }


def _ok(rows: list[dict]) -> list[dict]:
    return [r for r in rows if "error" not in r]


def _tagged(results: dict, experiment: str) -> list[dict]:
    return [r for r in _ok(results["runs"]) if experiment in r.get("experiments", [])]


def _group_stats(rows: list[dict], base_source_loss: float | None) -> dict:
    first = rows[0]
    out = {
        "exact_match": stats([r["exact_match"] for r in rows]),
        "loss": stats([r["loss"] for r in rows]),
        "source_loss": stats([r["source_loss"] for r in rows]),
        "train_seconds": stats([r["train_seconds"] for r in rows]),
        "trainable_parameters": first["trainable_parameters"],
        "trainable_fraction": (
            first["trainable_parameters"] / first["total_parameters"] if first["total_parameters"] else None
        ),
        "seeds": sorted(r["seed"] for r in rows),
    }
    forgot = [
        r["source_loss"] - base_source_loss
        for r in rows
        if r["source_loss"] is not None and base_source_loss is not None
    ]
    out["forgetting"] = stats(forgot)
    return out


def _by(rows: list[dict], key) -> dict:
    groups: dict = defaultdict(list)
    for r in rows:
        groups[key(r)].append(r)
    return groups


def mean_of(s: dict | None) -> float | None:
    """The mean of a `stats` dict (None when absent)."""
    return None if s is None else s.get("mean")


def summarize(results: dict) -> dict:
    """Aggregate the runs over seeds per experiment, and check the issue's targets."""
    base_sl = results["base"]["source_loss"]
    summary: dict = {}

    strategies: dict = defaultdict(dict)
    for (task, strategy), rows in _by(
        _tagged(results, "strategies"), lambda r: (r["task"], r["strategy"])
    ).items():
        strategies[task][strategy] = _group_stats(rows, base_sl)
    summary["strategies"] = dict(strategies)

    rank_rows = [r for r in _tagged(results, "rank")]
    summary["rank"] = {
        str(rank): {**_group_stats(rows, base_sl), "rank": rank}
        for rank, rows in sorted(_by(rank_rows, lambda r: r["rank"]).items())
    }

    layer_rows = _tagged(results, "layers")
    n_layers = results["base"].get("layers") or 0
    summary["layers"] = {}
    for layers, rows in _by(layer_rows, lambda r: tuple(r["layers"]) if r["layers"] else None).items():
        if layers is None:
            name = "all"
        elif max(layers) < n_layers // 2:
            name = "lower"
        elif min(layers) >= n_layers // 2:
            name = "upper"
        else:
            name = "layers " + ",".join(map(str, layers))
        summary["layers"][name] = {**_group_stats(rows, base_sl), "layers": list(layers) if layers else None}

    budget: dict = defaultdict(dict)
    for (strategy, n), rows in _by(
        _tagged(results, "data_budget"), lambda r: (r["strategy"], r["n_train"])
    ).items():
        budget[strategy][str(n)] = {**_group_stats(rows, base_sl), "n_train": n}
    summary["data_budget"] = {
        s: dict(sorted(v.items(), key=lambda kv: kv[1]["n_train"])) for s, v in budget.items()
    }

    neg: dict = defaultdict(dict)
    for (strategy, n), rows in _by(
        _tagged(results, "negative_transfer"), lambda r: (r["strategy"], r["n_train"])
    ).items():
        neg[strategy][str(n)] = {**_group_stats(rows, base_sl), "n_train": n}
    summary["negative_transfer"] = {
        s: dict(sorted(v.items(), key=lambda kv: kv[1]["n_train"])) for s, v in neg.items()
    }
    summary["pretrained_vs_random_far_task"] = _start_comparison(summary["negative_transfer"])

    summary["warning"] = _warning_checks(results)
    summary["targets"] = {
        "lora_vs_full": _lora_vs_full(results, summary),
        "pretrained_vs_random": _pretrained_vs_random(summary["data_budget"]),
    }
    summary["failures"] = [{"id": r["id"], "error": r["error"]} for r in results["runs"] if "error" in r]
    return summary


def _start_comparison(groups: dict) -> list[dict]:
    """Per method and budget on the far task: pretrained start minus random start (EM and loss)."""
    out = []
    for method, random_strategy in (("lora", "lora-random-init"), ("full", "full-random-init")):
        for n, pre in groups.get(method, {}).items():
            rand = groups.get(random_strategy, {}).get(n)
            if rand is None:
                continue
            em_p, em_r = mean_of(pre["exact_match"]), mean_of(rand["exact_match"])
            loss_p, loss_r = mean_of(pre["loss"]), mean_of(rand["loss"])
            em_gap = None if em_p is None or em_r is None else em_p - em_r
            spread = max(pre["exact_match"]["std"] or 0.0, rand["exact_match"]["std"] or 0.0)
            out.append(
                {
                    "method": method,
                    "n_train": pre["n_train"],
                    "pretrained_em": em_p,
                    "random_em": em_r,
                    "em_gap": em_gap,
                    "pretrained_loss": loss_p,
                    "random_loss": loss_r,
                    "loss_gap": None if loss_p is None or loss_r is None else loss_r - loss_p,
                    # Hurts: lower exact match beyond the seed spread, or a higher held-out loss.
                    "pretrained_hurts": bool(
                        (em_gap is not None and em_gap < 0 and -em_gap > spread)
                        or (loss_p is not None and loss_r is not None and loss_p > loss_r)
                    ),
                }
            )
    return out


def _warning_checks(results: dict) -> dict:
    """Did the trainer's negative-transfer warning fire exactly where the adapter is worse than the base?

    The reference is `evaluate_file` (the `adapterhub eval` path) on the adapter reloaded from disk.
    """
    checks = []
    for r in _ok(results["runs"]):
        if r.get("eval_negative_transfer") is None or r.get("warning_fired") is None:
            continue
        checks.append(
            {
                "id": r["id"],
                "task": r["task"],
                "strategy": r["strategy"],
                "seed": r["seed"],
                "n_train": r["n_train"],
                "fired": r["warning_fired"],
                "record_says": r["record_negative_transfer"],
                "eval_says": r["eval_negative_transfer"],
                "adapter_loss": r["loss"],
                "base_loss": r["base_loss"],
                "adapter_em": r["exact_match"],
                "base_em": r["base_exact_match"],
                "source_loss": r["source_loss"],
                "agrees": r["warning_fired"] == r["eval_negative_transfer"] == r["record_negative_transfer"],
            }
        )
    control = [c for c in checks if c["task"] == "source-text"]
    return {
        "checks": checks,
        "n": len(checks),
        "agree": sum(c["agrees"] for c in checks),
        "fired": sum(c["fired"] for c in checks),
        "control_runs": len(control),
        "control_fired": sum(c["fired"] for c in control),
    }


def _lora_vs_full(results: dict, summary: dict) -> dict:
    """LoRA's exact match as a share of full fine-tuning's, among LoRA ranks within the parameter budget."""
    task = results["config"]["sweep_task"]
    full = summary["strategies"].get(task, {}).get("full")
    if full is None or mean_of(full["exact_match"]) is None or not summary["rank"]:
        return {"task": task, "met": None, "why": "the study ran no full fine-tuning or no rank sweep"}
    full_em, full_params = full["exact_match"]["mean"], full["trainable_parameters"]
    candidates = []
    for rank_key, s in summary["rank"].items():
        em = mean_of(s["exact_match"])
        fraction = s["trainable_parameters"] / full_params
        candidates.append(
            {
                "rank": int(rank_key),
                "exact_match": em,
                "trainable_parameters": s["trainable_parameters"],
                "fraction_of_full_params": fraction,
                "share_of_full_em": (em / full_em) if full_em and em is not None else None,
                "within_budget": fraction <= LORA_MAX_PARAM_FRACTION,
            }
        )
    within = [c for c in candidates if c["within_budget"] and c["exact_match"] is not None]
    best = max(within, key=lambda c: c["exact_match"], default=None)
    out = {
        "task": task,
        "full_exact_match": full_em,
        "full_trainable_parameters": full_params,
        "candidates": candidates,
        "best_within_budget": best,
    }
    if best is None:
        out.update(
            met=False, why=f"no LoRA rank in the sweep trains <= {LORA_MAX_PARAM_FRACTION:.0%} of the weights"
        )
    elif not full_em:
        out.update(met=None, why="full fine-tuning scores 0 exact match, so a share of it is undefined")
    else:
        out["met"] = best["share_of_full_em"] >= LORA_SHARE_OF_FULL_EM
    return out


def _pretrained_vs_random(budget: dict) -> dict:
    """At the smallest data budget: pretrained LoRA against the best never-pretrained strategy."""
    pre = budget.get("lora")
    randoms = {s: v for s, v in budget.items() if s in ("lora-random-init", "full-random-init")}
    if not pre or not randoms:
        return {"met": None, "why": "the data-budget experiment ran no pretrained/random pair"}
    smallest = min(pre.values(), key=lambda s: s["n_train"])
    n = smallest["n_train"]
    rivals = {s: v[str(n)] for s, v in randoms.items() if str(n) in v}
    best_strategy, best = max(rivals.items(), key=lambda kv: mean_of(kv[1]["exact_match"]) or 0.0)
    em_p, em_r = mean_of(smallest["exact_match"]), mean_of(best["exact_match"])
    margin = None if em_p is None or em_r is None else em_p - em_r
    spread = max(smallest["exact_match"]["std"] or 0.0, best["exact_match"]["std"] or 0.0)
    loss_p = mean_of(smallest["loss"])
    # On loss the rival is the random start with the lowest loss, which need not be the best on EM.
    loss_strategy, loss_best = min(rivals.items(), key=lambda kv: mean_of(kv[1]["loss"]) or math.inf)
    loss_r = mean_of(loss_best["loss"])
    loss_margin = None if loss_p is None or loss_r is None else loss_r - loss_p
    loss_spread = max(smallest["loss"]["std"] or 0.0, loss_best["loss"]["std"] or 0.0)
    return {
        "n_train": n,
        "pretrained_em": em_p,
        "random_strategy": best_strategy,
        "random_em": em_r,
        "em_margin": margin,
        "spread": spread,
        "pretrained_loss": loss_p,
        "random_loss_strategy": loss_strategy,
        "random_loss": loss_r,
        "loss_margin": loss_margin,
        "loss_spread": loss_spread,
        # The target is judged on exact match, the study's headline metric; loss is reported beside it.
        "met": margin is not None and margin >= CLEAR_MARGIN_EM and margin > 2 * spread,
        "met_on_loss": loss_margin is not None and loss_margin > 2 * loss_spread and loss_margin > 0,
    }
