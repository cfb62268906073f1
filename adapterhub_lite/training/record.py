"""What a training run leaves next to its adapter: ``training_record.json`` and ``loss_curve.png``."""

from __future__ import annotations

import resource
import sys
from pathlib import Path

from adapterhub_lite.atomic import atomic_open, write_json

RECORD_SCHEMA = 1
MAX_LOSS_POINTS = 1000  # per-step losses kept in a record (and so in a bundle's manifest)


def peak_rss_mb() -> float | None:
    """Peak resident memory of this process so far (VmHWM), in MiB.

    Not ``ru_maxrss``: on Linux it survives exec, so a process started from a large parent (pytest,
    a launcher) would report the parent's peak. ``ru_maxrss`` only where there is no /proc (macOS).
    """
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024, 1)


def loss_points(losses: list[tuple[int, float]], limit: int = MAX_LOSS_POINTS) -> list[list[float]]:
    """The per-step training loss as the record keeps it: `[[step, loss], ...]`, at most `limit` points
    taken evenly over the run (the first and the last always), losses to 5 significant digits."""
    if limit < 2:
        raise ValueError("limit must be at least 2")
    if len(losses) > limit:
        last = len(losses) - 1
        picked = [losses[round(i * last / (limit - 1))] for i in range(limit)]
    else:
        picked = list(losses)
    return [[int(step), float(f"{loss:.5g}")] for step, loss in picked]


def write_json_atomic(path: Path, data: dict) -> None:
    """Write JSON through a temporary file and a rename, so readers never see half a file."""
    write_json(path, data, durable=True)


def plot_loss_curve(
    path: Path, losses: list[tuple[int, float]], *, title: str, eval_losses: dict[str, float] | None = None
) -> None:
    """Training loss per step (and a moving average), with the final eval losses as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if losses:
        steps, values = zip(*losses, strict=True)
        ax.plot(steps, values, lw=0.8, alpha=0.5, label="train loss")
        window = max(1, len(values) // 20)
        if window > 1:
            smooth = [
                sum(values[max(0, i - window + 1) : i + 1]) / len(values[max(0, i - window + 1) : i + 1])
                for i in range(len(values))
            ]
            ax.plot(steps, smooth, lw=1.5, label=f"train loss (mean of {window})")
    styles = {"base": ("tab:red", "--"), "adapter": ("tab:green", ":")}
    for who, value in (eval_losses or {}).items():
        color, ls = styles.get(who, ("gray", "-."))
        ax.axhline(value, color=color, ls=ls, label=f"eval loss, {who}: {value:.3f}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend(loc="upper right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_open(path) as fh:
        fig.savefig(fh, format="png")
    plt.close(fig)
