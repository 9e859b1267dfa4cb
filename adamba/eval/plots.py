"""Drawing measured bpb for the reports: every point with its bootstrap interval, and labels that do not overlap.

Without the intervals, differences far inside the noise fill the whole y axis and read as decisive."""

from __future__ import annotations

from matplotlib.axes import Axes

from .bpb import BpbEstimate

LABEL_GAP_POINTS = 3


def plot_intervals(ax: Axes, xs: list[float], estimates: list[BpbEstimate], labels: list[str] | None = None,
                   band: bool = False, **style) -> None:
    """bpb against `xs` with 95% bootstrap intervals, as error bars or (`band`, for curves sorted by x that share
    an axis with others) a shaded band; each label sits above its interval."""
    ys = [e.bpb for e in estimates]
    lows, highs = zip(*(e.interval() for e in estimates), strict=True) if estimates else ((), ())
    if band:
        (line,) = ax.plot(xs, ys, **style)
        ax.fill_between(xs, lows, highs, color=line.get_color(), alpha=0.15, linewidth=0)
    else:
        ax.errorbar(xs, ys, yerr=[[y - low for y, low in zip(ys, lows, strict=True)],
                                  [high - y for y, high in zip(ys, highs, strict=True)]], capsize=3, **style)
    if labels:
        place_labels(ax, xs, list(highs), labels)


def place_labels(ax: Axes, xs: list[float], ys: list[float], labels: list[str], fontsize: float = 8) -> None:
    """Annotate (x, y) with each label centred above it (moved sideways to stay inside the axes), lifting a label
    until it clears the ones already placed; if the stack rises past the top, the y axis grows to hold it.
    Positions are checked in display space, so the layout is fixed first."""
    ax.margins(y=0.2)  # room above the highest point for its label
    ax.figure.tight_layout()
    texts = _stack_labels(ax, xs, ys, labels, fontsize)
    renderer = ax.figure.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    overflow = max(t.get_window_extent(renderer).y1 for t in texts) + 2 - frame.y1  # 2 px clear of the frame
    if overflow > 0:  # grow the y axis by the overflow (and a little), then place them again
        low, high = ax.get_ylim()
        ax.set_ylim(low, high + (high - low) * 1.1 * overflow / max(frame.height - overflow, 1.0))
        for text in texts:
            text.remove()
        _stack_labels(ax, xs, ys, labels, fontsize)


def _stack_labels(ax: Axes, xs, ys, labels, fontsize: float) -> list:
    renderer = ax.figure.canvas.get_renderer()
    points_per_pixel = 72 / ax.figure.dpi
    frame = ax.get_window_extent(renderer)
    placed, texts = [], []
    for x, y, label in sorted(zip(xs, ys, labels, strict=True)):
        text = ax.annotate(label, (x, y), textcoords="offset points", xytext=(0, LABEL_GAP_POINTS), ha="center",
                           va="bottom", fontsize=fontsize)
        box = text.get_window_extent(renderer)
        inward = max(frame.x0 - box.x0, 0) - max(box.x1 - frame.x1, 0)
        text.xyann = (inward * points_per_pixel, LABEL_GAP_POINTS)
        box = text.get_window_extent(renderer)
        while any(box.overlaps(other) for other in placed):
            text.xyann = (text.xyann[0], text.xyann[1] + (box.height + 1) * points_per_pixel)
            box = text.get_window_extent(renderer)
        placed.append(box.padded(8, 0))  # about a space between neighbours on a line, so they read as two
        texts.append(text)
    return texts
