"""The study's PNG plots, drawn from its summary (see `summary.summarize`)."""

from __future__ import annotations

from pathlib import Path

from adapterhub_lite.atomic import atomic_open
from benchmarks.transfer.summary import LORA_MAX_PARAM_FRACTION, LORA_SHARE_OF_FULL_EM, mean_of

PLOTS = {
    "strategies": "strategies.png",
    "rank": "rank.png",
    "layers": "layers.png",
    "data_budget": "data_budget.png",
    "forgetting": "forgetting.png",
    "negative_transfer": "negative_transfer.png",
}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    with atomic_open(path) as fh:
        fig.savefig(fh, dpi=100, format="png")
    _plt().close(fig)


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
            f, e = mean_of(s["forgetting"]), mean_of(s["exact_match"])
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
        f, e = mean_of(s["forgetting"]), mean_of(s["exact_match"])
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


def write_plots(summary: dict, out_dir: Path) -> None:
    """Draw every plot in `PLOTS` into `out_dir`."""
    plot_strategies(summary, out_dir / PLOTS["strategies"])
    plot_rank(summary, out_dir / PLOTS["rank"])
    plot_layers(summary, out_dir / PLOTS["layers"])
    plot_data_budget(summary, out_dir / PLOTS["data_budget"])
    plot_forgetting(summary, out_dir / PLOTS["forgetting"])
    plot_negative_transfer(summary, out_dir / PLOTS["negative_transfer"])
