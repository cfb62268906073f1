"""The study's report: a summary computed from the runs, PNG plots and REPORT.md, all from results.json.

Nothing here measures anything: `summarize` aggregates the rows `run_study` wrote (mean and spread over
seeds), `write_report` draws and writes. ``python -m benchmarks.transfer.run --report-only`` regenerates
the report from a results file, so every number in REPORT.md can be traced to a row.
"""

from __future__ import annotations

import itertools
import math
import os
import statistics
from collections import defaultdict
from pathlib import Path

# Targets from the issue.
LORA_SHARE_OF_FULL_EM = 0.90
LORA_MAX_PARAM_FRACTION = 0.02
# "A clear margin": at least this much exact match, and more than twice the larger seed spread.
CLEAR_MARGIN_EM = 0.10

PLOTS = {
    "strategies": "strategies.png",
    "rank": "rank.png",
    "layers": "layers.png",
    "data_budget": "data_budget.png",
    "forgetting": "forgetting.png",
    "negative_transfer": "negative_transfer.png",
}


# ----------------------------------------------------------------------------------------------- summary


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


def _mean(s: dict | None) -> float | None:
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
            em_p, em_r = _mean(pre["exact_match"]), _mean(rand["exact_match"])
            loss_p, loss_r = _mean(pre["loss"]), _mean(rand["loss"])
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
    if full is None or _mean(full["exact_match"]) is None or not summary["rank"]:
        return {"task": task, "met": None, "why": "the study ran no full fine-tuning or no rank sweep"}
    full_em, full_params = full["exact_match"]["mean"], full["trainable_parameters"]
    candidates = []
    for rank_key, s in summary["rank"].items():
        em = _mean(s["exact_match"])
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
    best_strategy, best = max(rivals.items(), key=lambda kv: _mean(kv[1]["exact_match"]) or 0.0)
    em_p, em_r = _mean(smallest["exact_match"]), _mean(best["exact_match"])
    margin = None if em_p is None or em_r is None else em_p - em_r
    spread = max(smallest["exact_match"]["std"] or 0.0, best["exact_match"]["std"] or 0.0)
    loss_p = _mean(smallest["loss"])
    # On loss the rival is the random start with the lowest loss, which need not be the best on EM.
    loss_strategy, loss_best = min(rivals.items(), key=lambda kv: _mean(kv[1]["loss"]) or math.inf)
    loss_r = _mean(loss_best["loss"])
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


# ----------------------------------------------------------------------------------------------- plots


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.tight_layout()
    fig.savefig(tmp, dpi=100)
    _plt().close(fig)
    os.replace(tmp, path)


def _ms(s: dict, key: str = "exact_match") -> tuple[float, float]:
    st = s[key]
    return (st["mean"] if st["mean"] is not None else float("nan"), st["std"] or 0.0)


def plot_strategies(summary: dict, path: Path) -> None:
    plt = _plt()
    tasks = list(summary["strategies"])
    strategies = list(dict.fromkeys(s for t in tasks for s in summary["strategies"][t]))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(tasks) * len(strategies) / 3), 4))
    width = 0.8 / max(1, len(strategies))
    for i, strategy in enumerate(strategies):
        xs, ms, ss = [], [], []
        for j, task in enumerate(tasks):
            if strategy in summary["strategies"][task]:
                m, s = _ms(summary["strategies"][task][strategy])
                xs.append(j + (i - (len(strategies) - 1) / 2) * width)
                ms.append(m)
                ss.append(s)
        ax.bar(xs, ms, width, yerr=ss, capsize=2, label=strategy)
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_ylabel("held-out exact match (mean ± sd over seeds)")
    ax.set_ylim(0, 1.05)
    ax.set_title("Strategies side by side")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(axis="y", alpha=0.3)
    _save(fig, path)


def plot_rank(summary: dict, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ranks = summary["rank"]
    xs = [s["trainable_parameters"] for s in ranks.values()]
    ms, ss = zip(*(_ms(s) for s in ranks.values()), strict=True) if ranks else ((), ())
    ax.errorbar(xs, ms, yerr=ss, marker="o", capsize=3, label="LoRA")
    for x, m, r in zip(xs, ms, ranks, strict=True):
        ax.annotate(f"r={r}", (x, m), textcoords="offset points", xytext=(4, 6), fontsize=8)
    target = summary["targets"]["lora_vs_full"]
    if target.get("full_exact_match") is not None:
        full_em = target["full_exact_match"]
        ax.axhline(full_em, color="tab:red", ls="--", label=f"full fine-tuning ({full_em:.2f})")
        ax.axhline(LORA_SHARE_OF_FULL_EM * full_em, color="tab:red", ls=":", label="90% of full FT")
        ax.axvline(
            LORA_MAX_PARAM_FRACTION * target["full_trainable_parameters"],
            color="gray",
            ls=":",
            label="2% of full FT's parameters",
        )
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel("held-out exact match")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title(f"LoRA rank sweep ({target.get('task')})")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _save(fig, path)


def plot_layers(summary: dict, path: Path) -> None:
    plt = _plt()
    names = list(summary["layers"])
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(8, 3.5))
    ems = [_ms(summary["layers"][n]) for n in names]
    a1.bar(names, [m for m, _ in ems], yerr=[s for _, s in ems], capsize=3, color="tab:blue")
    a1.set_ylabel("held-out exact match")
    a1.set_ylim(0, 1.05)
    a1.set_title("target task")
    forg = [_ms(summary["layers"][n], "forgetting") for n in names]
    a2.bar(names, [m for m, _ in forg], yerr=[s for _, s in forg], capsize=3, color="tab:orange")
    a2.set_ylabel("source loss increase over the base")
    a2.set_title("forgetting")
    for a in (a1, a2):
        a.grid(axis="y", alpha=0.3)
    fig.suptitle("LoRA on the lower, upper or all layers")
    _save(fig, path)


def _curves(ax, groups: dict, key: str) -> None:
    for strategy, points in groups.items():
        pts = [p for p in points.values() if p[key]["mean"] is not None]
        if not pts:
            continue
        xs = [p["n_train"] for p in pts]
        ms = [p[key]["mean"] for p in pts]
        ss = [p[key]["std"] or 0.0 for p in pts]
        line = ax.plot(xs, ms, marker="o", label=strategy)[0]
        ax.fill_between(
            xs,
            [m - s for m, s in zip(ms, ss, strict=True)],
            [m + s for m, s in zip(ms, ss, strict=True)],
            color=line.get_color(),
            alpha=0.15,
        )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("training examples")
    ax.grid(alpha=0.3)


def plot_data_budget(summary: dict, path: Path) -> None:
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.8))
    _curves(a1, summary["data_budget"], "exact_match")
    a1.set_ylabel("held-out exact match")
    a1.set_ylim(-0.05, 1.05)
    _curves(a2, summary["data_budget"], "loss")
    a2.set_ylabel("held-out loss")
    a1.legend(fontsize=8)
    fig.suptitle("Learning curves: pretrained start vs random start")
    _save(fig, path)


def plot_forgetting(summary: dict, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    markers = "osD^v<>"
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    strategies = list(dict.fromkeys(x for g in summary["strategies"].values() for x in g if x != "zero-shot"))
    for t_i, groups in enumerate(summary["strategies"].values()):
        for strategy, s in groups.items():
            f, e = _mean(s["forgetting"]), _mean(s["exact_match"])
            if f is None or e is None or strategy == "zero-shot":
                continue
            color = colors[strategies.index(strategy) % len(colors)]
            ax.scatter(f, e, s=40, color=color, marker=markers[t_i % len(markers)], alpha=0.8)
    for strategy in strategies:
        color = colors[strategies.index(strategy) % len(colors)]
        ax.scatter([], [], color=color, marker="o", label=strategy)
    for t_i, task in enumerate(summary["strategies"]):
        ax.scatter([], [], color="black", marker=markers[t_i % len(markers)], facecolors="none", label=task)
    for rank, s in summary["rank"].items():
        f, e = _mean(s["forgetting"]), _mean(s["exact_match"])
        if f is not None and e is not None:
            ax.scatter(f, e, marker="x", color="gray")
            ax.annotate(
                f"r={rank}", (f, e), fontsize=7, color="gray", xytext=(3, -9), textcoords="offset points"
            )
    ax.scatter([], [], marker="x", color="gray", label="LoRA rank sweep")
    ax.axvline(0, color="black", lw=0.8)
    ax.set_xlabel("source-corpus loss increase over the base (forgetting)")
    ax.set_ylabel("target exact match (learning)")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title("Learns vs forgets")
    ax.legend(fontsize=7, loc="center right")
    ax.grid(alpha=0.3)
    _save(fig, path)


def plot_negative_transfer(summary: dict, path: Path) -> None:
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.8))
    groups = {k: v for k, v in summary["negative_transfer"].items() if k != "zero-shot"}
    _curves(a1, groups, "exact_match")
    _curves(a2, groups, "loss")
    zero = summary["negative_transfer"].get("zero-shot")
    if zero:
        z = next(iter(zero.values()))
        if z["loss"]["mean"] is not None:
            a2.axhline(z["loss"]["mean"], color="black", ls="--", lw=0.8, label="base, zero-shot")
    a1.set_ylabel("held-out exact match")
    a1.set_ylim(-0.05, 1.05)
    a2.set_ylabel("held-out loss (log scale)")
    a2.set_yscale("log")
    a1.legend(fontsize=8)
    a2.legend(fontsize=8)
    fig.suptitle("Far-from-source task (substitution cipher)")
    _save(fig, path)


# ----------------------------------------------------------------------------------------------- REPORT.md


def _f(x, digits: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _pm(s: dict, digits: int = 2) -> str:
    if s is None or s["mean"] is None:
        return "n/a"
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _verdict(met) -> str:
    return {True: "**met**", False: "**missed**", None: "**undecided**"}[met]


def _forgetting_finding(s: dict, cfg: dict) -> str:
    """One sentence comparing LoRA's and full fine-tuning's forgetting, read off the summary."""

    def avg(strategy: str, key: str) -> float | None:
        vals = [_mean(g[strategy][key]) for g in s["strategies"].values() if strategy in g]
        vals = [v for v in vals if v is not None]
        return statistics.fmean(vals) if vals else None

    lora_f, full_f = avg("lora", "forgetting"), avg("full", "forgetting")
    lora_em, full_em = avg("lora", "exact_match"), avg("full", "exact_match")
    if lora_f is None or full_f is None:
        return "The study ran no LoRA/full fine-tuning pair to compare forgetting."
    ratio = cfg["learning_rates"]["lora"] / cfg["learning_rates"]["full"]
    if lora_f < full_f:
        return (
            f"Averaged over the target tasks, LoRA forgot less than full fine-tuning ({lora_f:.3f} vs "
            f"{full_f:.3f} nats of source loss) at exact match {_f(lora_em)} vs {_f(full_em)}, as Biderman "
            "et al. found."
        )
    text = (
        f"Averaged over the target tasks, LoRA forgot *more* than full fine-tuning ({lora_f:.3f} vs "
        f"{full_f:.3f} nats of source loss) at exact match {_f(lora_em)} vs {_f(full_em)}: the opposite of "
        f"Biderman et al. LoRA's learning rate here is {ratio:.0f}x full fine-tuning's (each "
        "chosen so that the method learns the task within the step budget, see `StudyConfig`); at that "
        "rate its low-rank update moves the base's behaviour on the source text far more than full "
        "fine-tuning's small steps spread over every weight. The comparison is at each method's working "
        "rate, not at matched rates."
    )
    ranks = sorted(s["rank"].values(), key=lambda g: g["rank"])
    forgets = [_mean(g["forgetting"]) for g in ranks]
    if len(ranks) > 2 and None not in forgets and all(a <= b for a, b in itertools.pairwise(forgets)):
        text += (
            f" In the rank sweep forgetting grows with every step up in rank ({forgets[0]:.3f} at rank "
            f"{ranks[0]['rank']} to {forgets[-1]:.3f} at rank {ranks[-1]['rank']})."
        )
    return text


def render_markdown(results: dict) -> str:
    """REPORT.md's text, every figure taken from ``results`` (and its ``summary``)."""
    s, cfg, base = results["summary"], results["config"], results["base"]
    env = results["environment"]
    lines: list[str] = []
    add = lines.append
    lora_full, pre_rand = s["targets"]["lora_vs_full"], s["targets"]["pretrained_vs_random"]

    add("# Transfer-learning study")
    add("")
    add(
        "Generated by `python -m benchmarks.transfer.run` from `results.json` "
        f"(started {results['started']}, {results['wall_seconds'] / 60:.1f} min on {env['cpu_count']} "
        f"CPU cores, {env.get('jobs', 1)} run(s) at a time with {env['torch_threads']} torch thread(s) "
        f"each, torch {env['torch']}). "
        "Do not edit by hand: rerun the study or "
        "`python -m benchmarks.transfer.run --report-only`."
    )
    add("")
    add(
        f"Base: `{base['name']}` ({base['parameters']:,} parameters, {base['layers']} layers, "
        f"{base['fingerprint'][:19]}…), held-out source-corpus loss {base['source_loss']:.3f}. "
        f"Budget per run: {cfg['steps']} optimizer steps of batch {cfg['batch_size']}; "
        f"{cfg['seeds']} seed(s) (a seed changes the train/eval split, the initialisation and the batch "
        "order); figures are mean ± sample standard deviation over seeds. Exact match is greedy decoding "
        "against the held-out answers (facts never seen in question form during training)."
    )
    add("")

    lrs = ", ".join(f"{k} {v:g}" for k, v in cfg["learning_rates"].items())
    add("How it was measured:")
    add("")
    add(
        f"- Every run: AdamW, {cfg['lr_scheduler']} learning rate ({lrs}; picked on capitals at this "
        "budget, see `StudyConfig`; a random start uses its method's rate), the trainer's batching, "
        "loss on the answer tokens only, gradient clipping at 1.0. "
        f"LoRA: rank {cfg['rank']} unless swept, alpha = 2 x rank, no dropout, every linear layer "
        "(peft `all-linear`)."
    )
    add(
        "- Each seed splits each task once into a train pool and a held-out eval set (the trainer's "
        "`train_eval_split`); every strategy and data budget of that seed is scored on the same eval set."
    )
    add(
        "- Forgetting: held-out source-corpus loss (documents the pretraining never saw) with the trained "
        "weights applied, minus the base's. QLoRA adapters are scored on the float32 base, as served."
    )
    add(
        "- Random start: the base's own config, initialised by its architecture (`from_config`) with the "
        "run's seed, same tokenizer; never pretrained."
    )
    add("")
    add("## Targets")
    add("")
    best = lora_full.get("best_within_budget")
    if best is not None and lora_full.get("full_exact_match") is not None:
        add(
            f"- LoRA ≥ {LORA_SHARE_OF_FULL_EM:.0%} of full fine-tuning's exact match with ≤ "
            f"{LORA_MAX_PARAM_FRACTION:.0%} of its trainable parameters ({lora_full['task']}): "
            f"{_verdict(lora_full['met'])}. Best rank within the parameter budget: r={best['rank']} "
            f"({best['trainable_parameters']:,} parameters = {_pct(best['fraction_of_full_params'])} of full "
            f"FT's {lora_full['full_trainable_parameters']:,}) scores {_f(best['exact_match'])} against full "
            f"FT's {_f(lora_full['full_exact_match'])} = {_pct(best['share_of_full_em'])}."
        )
    else:
        add(f"- LoRA vs full fine-tuning: {_verdict(lora_full.get('met'))} ({lora_full.get('why', '')}).")
    if pre_rand.get("n_train") is not None:
        add(
            "- Pretrained start beats random start by a clear margin "
            f"(≥ {CLEAR_MARGIN_EM:.2f} exact match and more than twice the seed spread) at the smallest "
            f"data budget ({pre_rand['n_train']} examples): "
            f"{_verdict(pre_rand['met'])}. LoRA on the pretrained base {_f(pre_rand['pretrained_em'])} vs "
            f"{pre_rand['random_strategy']} {_f(pre_rand['random_em'])} (margin {_f(pre_rand['em_margin'])}, "
            f"spread {_f(pre_rand['spread'])}). On held-out loss the margin is "
            f"{'clear' if pre_rand.get('met_on_loss') else 'not clear'}: {_f(pre_rand['pretrained_loss'])} "
            f"vs {pre_rand.get('random_loss_strategy', '')} {_f(pre_rand['random_loss'])} (margin "
            f"{_f(pre_rand.get('loss_margin'))}, spread {_f(pre_rand.get('loss_spread'))})."
        )
    else:
        add(f"- Pretrained vs random start: {_verdict(None)} ({pre_rand.get('why', '')}).")
    w = s["warning"]
    add(
        f"- Negative-transfer warning: fired in {w['fired']} of {w['n']} checked runs; it agreed with an "
        f"independent `adapterhub eval` of the saved adapter in {w['agree']} of {w['n']}; it fired in "
        f"{w['control_fired']} of {w['control_runs']} positive-control runs (an adapter overfitted to a "
        "handful of source-corpus documents, which must do worse than the base on held-out source text)."
    )
    if s["failures"]:
        add(f"- **{len(s['failures'])} run(s) failed**: " + "; ".join(f"`{f['id']}`" for f in s["failures"]))
    add("")

    add("## Strategies side by side")
    add("")
    add(f"![strategies]({PLOTS['strategies']})")
    add("")
    add("Held-out exact match (and loss) per target task. Trainable parameters as a share of the base's.")
    add("")
    tasks = list(s["strategies"])
    add(
        "| strategy | trainable | "
        + " | ".join(tasks)
        + " | forgetting (source loss +) | train time per run (s) |"
    )
    add("|---|---|" + "---|" * len(tasks) + "---|---|")
    strategies = list(dict.fromkeys(x for t in tasks for x in s["strategies"][t]))
    for strategy in strategies:
        cells, forg, secs, trainable = [], [], [], ""
        for t in tasks:
            g = s["strategies"][t].get(strategy)
            if g is None:
                cells.append("")
                continue
            trainable = f"{g['trainable_parameters']:,} ({_pct(g['trainable_fraction'])})"
            cells.append(f"{_pm(g['exact_match'])} (loss {_f(_mean(g['loss']))})")
            if _mean(g["forgetting"]) is not None:
                forg.append(_mean(g["forgetting"]))
            if _mean(g.get("train_seconds")) is not None:
                secs.append(_mean(g["train_seconds"]))
        forg_txt = _f(statistics.fmean(forg), 3) if forg else "n/a (not the base's weights)"
        secs_txt = _f(statistics.fmean(secs), 1) if secs else "n/a"
        add(f"| {strategy} | {trainable} | " + " | ".join(cells) + f" | {forg_txt} | {secs_txt} |")
    add("")
    add("What each strategy is:")
    add("")
    for name, what in results["strategies"].items():
        if name in strategies:
            add(f"- `{name}`: {what}.")
    add(
        "- The output-head-only probe: the embedded base ties its output head to its input embeddings, so "
        "training that matrix would also move every input embedding (no longer feature extraction). The "
        "probe trains an untied copy of the head on the frozen body's final hidden state instead, and is "
        "scored by the same greedy exact match as every other strategy."
    )
    add("")

    add("## Rank: trainable parameters vs score")
    add("")
    add(f"![rank]({PLOTS['rank']})")
    add("")
    add(
        "| rank | trainable | share of full FT's parameters | exact match | share of full FT's EM "
        "| forgetting |"
    )
    add("|---|---|---|---|---|---|")
    for c in lora_full.get("candidates", []):
        g = s["rank"][str(c["rank"])]
        add(
            f"| {c['rank']} | {c['trainable_parameters']:,} | {_pct(c['fraction_of_full_params'])} | "
            f"{_pm(g['exact_match'])} | {_pct(c['share_of_full_em'])} | {_pm(g['forgetting'], 3)} |"
        )
    add("")

    add("## Layers (lower only, upper only, all)")
    add("")
    add(f"![layers]({PLOTS['layers']})")
    add("")
    add("| layers adapted | trainable | exact match | loss | forgetting |")
    add("|---|---|---|---|---|")
    for name, g in s["layers"].items():
        which = "all" if g["layers"] is None else ", ".join(map(str, g["layers"]))
        add(
            f"| {name} ({which}) | {g['trainable_parameters']:,} | {_pm(g['exact_match'])} | "
            f"{_pm(g['loss'])} | {_pm(g['forgetting'], 3)} |"
        )
    add("")

    add("## Data budget: learning curves")
    add("")
    add(f"![data budget]({PLOTS['data_budget']})")
    add("")
    budgets = sorted({p["n_train"] for v in s["data_budget"].values() for p in v.values()})
    add("| strategy | " + " | ".join(f"{n} examples" for n in budgets) + " |")
    add("|---|" + "---|" * len(budgets))
    for strategy, points in s["data_budget"].items():
        cells = [_pm(points[str(n)]["exact_match"]) if str(n) in points else "" for n in budgets]
        add(f"| {strategy} | " + " | ".join(cells) + " |")
    add("")

    add("## Forgetting")
    add("")
    add(f"![forgetting]({PLOTS['forgetting']})")
    add("")
    add(
        f"Held-out source-corpus loss with the adapter applied (base alone: {base['source_loss']:.3f}); "
        "positive = the adapted model is worse at the pretraining task."
    )
    add("")
    add("| task | strategy | source loss | increase over the base |")
    add("|---|---|---|---|")
    for t in tasks:
        for strategy, g in s["strategies"][t].items():
            if g["source_loss"]["mean"] is not None and strategy != "zero-shot":
                add(f"| {t} | {strategy} | {_pm(g['source_loss'], 3)} | {_pm(g['forgetting'], 3)} |")
    add("")
    add(_forgetting_finding(s, cfg))
    add("")

    add("## Negative transfer: a task far from the source corpus")
    add("")
    add(f"![negative transfer]({PLOTS['negative_transfer']})")
    add("")
    add(
        "The task: a fixed letter-substitution cipher over random letter strings "
        "(`adapterhub_lite/transfer/cipher.py`), nothing like the source corpus's English prose. "
        "Pretrained start minus random start, per method and budget:"
    )
    add("")
    add(
        "| method | examples | EM pretrained | EM random | EM gap | loss pretrained | loss random "
        "| pretrained hurts? |"
    )
    add("|---|---|---|---|---|---|---|---|")
    for c in s["pretrained_vs_random_far_task"]:
        add(
            f"| {c['method']} | {c['n_train']} | {_f(c['pretrained_em'])} | {_f(c['random_em'])} | "
            f"{_f(c['em_gap'])} | {_f(c['pretrained_loss'])} | {_f(c['random_loss'])} | "
            f"{'yes' if c['pretrained_hurts'] else 'no'} |"
        )
    add("")
    hurts = [c for c in s["pretrained_vs_random_far_task"] if c["pretrained_hurts"]]
    if hurts:
        add(
            "The pretrained start hurts (lower exact match beyond the seed spread, or higher held-out "
            "loss, than the same method from a random start) for: "
            + ", ".join(f"{c['method']} at {c['n_train']} examples" for c in hurts)
            + "."
        )
    else:
        add("The pretrained start did not hurt at any budget measured here.")
    add("")
    add(
        "The trainer's warning compares the adapter with *its own base*, so it cannot see this kind of "
        "negative transfer (that needs the random-init control); it catches an adapter that makes its base "
        "worse."
    )
    add("")
    add("Where the warning fired (every checked run, with the independent `adapterhub eval` verdict):")
    add("")
    add("| run | fired | record | eval | adapter loss | base loss | adapter EM | base EM |")
    add("|---|---|---|---|---|---|---|---|")
    for c in w["checks"]:
        add(
            f"| `{c['id']}` | {c['fired']} | {c['record_says']} | {c['eval_says']} | "
            f"{_f(c['adapter_loss'], 3)} | {_f(c['base_loss'], 3)} | {_f(c['adapter_em'])} | "
            f"{_f(c['base_em'])} |"
        )
    add("")
    add("## Reproduce")
    add("")
    add("```")
    smoke = " --smoke" if cfg.get("preset") == "smoke" else ""
    add(f"python -m benchmarks.transfer.run{smoke} --seeds {cfg['seeds']} --steps {cfg['steps']}")
    add("```")
    add("")
    return "\n".join(lines)


def write_report(results: dict, out_dir: Path) -> Path:
    """Draw the PNG plots and write REPORT.md next to results.json; return REPORT.md's path."""
    s = results["summary"]
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_strategies(s, out_dir / PLOTS["strategies"])
    plot_rank(s, out_dir / PLOTS["rank"])
    plot_layers(s, out_dir / PLOTS["layers"])
    plot_data_budget(s, out_dir / PLOTS["data_budget"])
    plot_forgetting(s, out_dir / PLOTS["forgetting"])
    plot_negative_transfer(s, out_dir / PLOTS["negative_transfer"])
    path = out_dir / "REPORT.md"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(render_markdown(results), encoding="utf-8")
    os.replace(tmp, path)
    return path
