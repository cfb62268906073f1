"""The catalog's loss chart: no line crosses a label (issue 28: the base-loss line struck the adapter's
held-out label through)."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from adapterhub_lite.hub.render import loss_svg

_NS = "{http://www.w3.org/2000/svg}"


def _boxes(
    svg: str,
) -> tuple[list[tuple[float, float, float, float]], list[tuple[float, float, float, float]]]:
    """(label boxes, line segments) of the chart, as (x0, y0, x1, y1)."""
    root = ET.fromstring(svg)
    labels, lines = [], []
    for t in root.iter(f"{_NS}text"):
        x, y, n = float(t.get("x")), float(t.get("y")), len(t.text or "")
        width = 6.5 * n  # 11 px text: at most ~6.5 px per character
        x0 = x - width if t.get("text-anchor") == "end" else x
        labels.append((x0, y - 11, x0 + width, y + 3, t.text or ""))
    for ln in root.iter(f"{_NS}line"):
        lines.append(tuple(float(ln.get(k)) for k in ("x1", "y1", "x2", "y2")))
    for pl in root.iter(f"{_NS}polyline"):
        pts = [tuple(map(float, p.split(","))) for p in pl.get("points").split()]
        lines += [(a[0], a[1], b[0], b[1]) for a, b in zip(pts, pts[1:], strict=False)]
    return labels, lines


def _crosses(box, seg) -> bool:
    x0, y0, x1, y1, _ = box
    sx0, sy0, sx1, sy1 = seg
    if sy0 == sy1:  # horizontal: the held-out lines
        return y0 < sy0 < y1 and min(sx0, sx1) < x1 and max(sx0, sx1) > x0
    # a polyline segment: sample it
    for k in range(21):
        px, py = sx0 + (sx1 - sx0) * k / 20, sy0 + (sy1 - sy0) * k / 20
        if x0 < px < x1 and y0 < py < y1:
            return True
    return False


@pytest.mark.parametrize(
    "evals",
    [
        {"base": 2.9, "adapter": 0.5},  # the base line at the very top, where the labels were
        {"base": 2.85, "adapter": 2.8},
        {"base": 0.41, "adapter": 0.40},
    ],
)
def test_no_line_strikes_a_label(evals):
    history = [(float(s), 2.5 * 0.93**s + 0.4) for s in range(1, 31)]
    labels, lines = _boxes(str(loss_svg(history, evals)))
    legend = [b for b in labels if b[4].startswith("held-out")]
    assert len(legend) == 2
    struck = [(b[4], s) for b in legend for s in lines if _crosses(b, s)]
    assert not struck, struck
