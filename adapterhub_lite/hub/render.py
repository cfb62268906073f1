"""What the catalog shows from a bundle: the card as safe HTML, and the loss curve as an inline SVG.

A card is text from whoever published it. It is rendered by markdown-it with raw HTML off (a `<script>`
or any tag shows as text) and only http(s)/mailto/relative links kept; Jinja2 autoescapes the rest.
"""

from __future__ import annotations

from typing import Any

from markdown_it import MarkdownIt
from markupsafe import Markup, escape

_SAFE_SCHEMES = ("http://", "https://", "mailto:", "#", "/")
_MAX_POINTS = 400


def _validate_link(url: str) -> bool:
    u = url.strip().lower()
    if ":" not in u.split("/", 1)[0]:
        return True  # relative
    return u.startswith(_SAFE_SCHEMES)


def _md() -> MarkdownIt:
    md = MarkdownIt("commonmark", {"html": False, "linkify": False, "typographer": False})
    md.enable("table")
    md.validateLink = _validate_link
    return md


_MARKDOWN = _md()


def card_html(card: str) -> Markup:
    """The card (README.md, its YAML front matter dropped) as HTML that cannot run anything."""
    text = card
    if text.startswith("---\n"):
        end = text.find("\n---\n", 4)
        if end != -1:
            text = text[end + 5 :]
    # The card's metadata block repeats the manifest, which the page shows itself.
    text = text.split("<details>", 1)[0]
    return Markup(_MARKDOWN.render(text))


def loss_history(training: dict[str, Any] | None) -> list[tuple[float, float]]:
    """(step, loss) pairs a training record carries (`losses` or `loss_history`), bounded and cleaned."""
    if not isinstance(training, dict):
        return []
    raw = training.get("losses", training.get("loss_history"))
    if not isinstance(raw, list):
        return []
    points = []
    for item in raw[:100_000]:
        if (
            isinstance(item, (list, tuple))
            and len(item) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in item)
            and all(abs(v) < 1e12 and v == v for v in item)
        ):
            points.append((float(item[0]), float(item[1])))
    if len(points) > _MAX_POINTS:
        stride = len(points) / _MAX_POINTS
        points = [points[int(i * stride)] for i in range(_MAX_POINTS)] + [points[-1]]
    return points


def loss_svg(points: list[tuple[float, float]], eval_losses: dict[str, float] | None = None) -> Markup:
    """A loss-per-step line chart with the held-out losses as dashed lines, as an inline SVG."""
    w, h, pad = 640, 280, 44
    evals = {k: v for k, v in (eval_losses or {}).items() if isinstance(v, (int, float)) and v == v}
    # The legend sits under the plot, where no line can cross it (inside, a held-out line at the
    # height of a label struck it through).
    legend_y = h + 2
    total_h = h + 16 * len(evals) + (6 if evals else 0)
    ys = [y for _, y in points] + list(evals.values())
    if not ys:
        return Markup("")
    xs = [x for x, _ in points] or [0.0, 1.0]  # no per-step history: the held-out lines alone
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)

    def sx(x: float) -> float:
        return pad + (x - x0) / (x1 - x0) * (w - 2 * pad)

    def sy(y: float) -> float:
        return h - pad - (y - y0) / (y1 - y0) * (h - 2 * pad)

    line = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in points)
    parts = [
        f'<svg class="loss-curve" role="img" aria-label="training loss per step" '
        f'viewBox="0 0 {w} {total_h}" width="{w}" height="{total_h}" xmlns="http://www.w3.org/2000/svg">',
        f'<rect x="{pad}" y="{pad}" width="{w - 2 * pad}" height="{h - 2 * pad}" fill="#fafafa" '
        'stroke="#ccc"/>',
        f'<polyline fill="none" stroke="#1f77b4" stroke-width="1.5" points="{line}"/>' if points else "",
        f'<text x="{pad}" y="{h - 12}" font-size="11">step {x0:g}</text>',
        f'<text x="{w - pad}" y="{h - 12}" font-size="11" text-anchor="end">step {x1:g}</text>',
        f'<text x="4" y="{pad + 4}" font-size="11">{y1:.3g}</text>',
        f'<text x="4" y="{h - pad}" font-size="11">{y0:.3g}</text>',
    ]
    colors = {"base": "#d62728", "adapter": "#2ca02c"}
    for i, (who, v) in enumerate(sorted(evals.items())):
        c = colors.get(who, "#777")
        parts.append(
            f'<line x1="{pad}" x2="{w - pad}" y1="{sy(v):.1f}" y2="{sy(v):.1f}" stroke="{c}" '
            'stroke-dasharray="5,4"/>'
        )
        y = legend_y + 16 * (i + 1)
        parts.append(
            f'<line x1="{pad}" x2="{pad + 24}" y1="{y - 4}" y2="{y - 4}" stroke="{c}" '
            'stroke-dasharray="5,4"/>'
        )
        parts.append(
            f'<text x="{pad + 30}" y="{y}" font-size="11" fill="{c}">'
            f"held-out loss, {escape(who)}: {v:.3f}</text>"
        )
    parts.append("</svg>")
    return Markup("".join(parts))
