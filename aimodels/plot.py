"""The few plotting helpers the chapters share. Every plot labels its axes."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.patches import FancyBboxPatch


def _axes(ax: Axes | None, figsize: tuple[float, float] = (6, 4)) -> Axes:
    if ax is None:
        _, ax = plt.subplots(figsize=figsize)
    return ax


def contour_paths(
    fn: Callable[[np.ndarray], np.ndarray],
    paths: Mapping[str, np.ndarray],
    xlim: tuple[float, float],
    ylim: tuple[float, float],
    ax: Axes | None = None,
    levels: int = 25,
    title: str | None = None,
) -> Axes:
    """Contours of a 2-D function ``fn`` (log-spaced levels) with optimisation paths on top.

    ``paths`` maps a label to an array of points of shape ``[steps, 2]``. The minimum of
    ``fn`` is assumed to be >= 0, as for every test function of Chapter 2.
    """
    ax = _axes(ax)
    xs = np.linspace(*xlim, 300)
    ys = np.linspace(*ylim, 300)
    grid = np.stack(np.meshgrid(xs, ys), axis=-1)
    z = fn(grid)
    lo = max(float(z.min()), 1e-3)
    ax.contour(xs, ys, z, levels=np.geomspace(lo, float(z.max()), levels), cmap="Greys", alpha=0.6)
    for label, path in paths.items():
        path = np.asarray(path)
        ax.plot(path[:, 0], path[:, 1], marker=".", markersize=3, linewidth=1.2, label=label)
    ax.set_xlim(*xlim)
    ax.set_ylim(*ylim)
    ax.set_xlabel("$x_1$")
    ax.set_ylabel("$x_2$")
    if title:
        ax.set_title(title)
    if paths:
        ax.legend(loc="best", fontsize="small")
    return ax


def curves(
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    xlabel: str,
    ylabel: str,
    ax: Axes | None = None,
    logy: bool = True,
    title: str | None = None,
) -> Axes:
    """Several labelled curves on one set of axes; ``series`` maps a label to ``(x, y)``."""
    ax = _axes(ax)
    for label, (x, y) in series.items():
        ax.plot(x, y, label=label)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    return ax


def box_diagram(
    boxes: Mapping[str, tuple[float, float, str]],
    arrows: Sequence[tuple[str, str, str]],
    ax: Axes | None = None,
    box_size: tuple[float, float] = (2.3, 0.9),
    title: str | None = None,
) -> Axes:
    """Draw a block diagram: named boxes at (x, y) with a text, joined by labelled arrows.

    ``boxes`` maps a name to ``(x, y, text)`` (the box centre); ``arrows`` lists
    ``(from_name, to_name, label)``. Arrows run between box edges.
    """
    ax = _axes(ax, figsize=(9, 5))
    w, h = box_size
    for x, y, text in boxes.values():
        ax.add_patch(
            FancyBboxPatch(
                (x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.05",
                facecolor="#e8f0fb", edgecolor="#2f5d9b", linewidth=1.4,
            )
        )
        ax.text(x, y, text, ha="center", va="center", fontsize=9, wrap=True)
    for start, end, label in arrows:
        if start not in boxes or end not in boxes:
            missing = start if start not in boxes else end
            raise KeyError(f"arrow refers to box {missing!r}, which is not in boxes {list(boxes)}")
        (x0, y0, _), (x1, y1, _) = boxes[start], boxes[end]
        a, b = _edge_point(x0, y0, x1, y1, w, h), _edge_point(x1, y1, x0, y0, w, h)
        ax.annotate(
            "", xy=b, xytext=a,
            arrowprops={"arrowstyle": "->", "color": "#333333", "linewidth": 1.2},
        )
        if label:
            mid_x, mid_y = (a[0] + b[0]) / 2, (a[1] + b[1]) / 2
            if abs(b[0] - a[0]) >= abs(b[1] - a[1]):  # mostly horizontal: label above
                ax.text(mid_x, mid_y + 0.08, label, fontsize=8, color="#7a2e0e",
                        ha="center", va="bottom")
            else:  # mostly vertical: label to the right
                ax.text(mid_x + 0.1, mid_y, label, fontsize=8, color="#7a2e0e",
                        ha="left", va="center")
    xs = [x for x, _, _ in boxes.values()]
    ys = [y for _, y, _ in boxes.values()]
    ax.set_xlim(min(xs) - w, max(xs) + w)
    ax.set_ylim(min(ys) - h * 1.2, max(ys) + h * 1.2)
    ax.set_aspect("equal")
    ax.axis("off")
    if title:
        ax.set_title(title)
    return ax


def _edge_point(x0: float, y0: float, x1: float, y1: float, w: float, h: float) -> tuple:
    """Where the segment from box centre (x0, y0) towards (x1, y1) leaves the box."""
    dx, dy = x1 - x0, y1 - y0
    if dx == 0 and dy == 0:
        return (x0, y0)
    scale = min(
        (w / 2 + 0.08) / abs(dx) if dx else np.inf,
        (h / 2 + 0.08) / abs(dy) if dy else np.inf,
    )
    return (x0 + dx * scale, y0 + dy * scale)
