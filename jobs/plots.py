"""Loss curves as PNG files: one job's train and validation loss, and a whole campaign's, by global step.

matplotlib is imported inside the functions, never at module level, so that the CLIs that import this
module stay light. Figures are drawn with matplotlib's object API on an Agg canvas: no display, no pyplot
global state (safe in a worker thread and in a host process that already uses pyplot with another backend).
Every file is written atomically: rendered into a temporary file beside it, then renamed over it.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

FIGURE_SIZE_IN = (10.0, 5.0)
FIGURE_DPI = 100  # 1000 x 500 pixels
TRAIN_COLOR = "tab:blue"
VAL_COLOR = "tab:orange"
BOUNDARY_COLOR = "0.6"  # matplotlib grey level

Points = Sequence[Sequence[float]]  # [(global step, loss), ...]; JSON gives lists of two numbers


def write_loss_plot(path: Path, train: Points, val: Points, title: str) -> Path:
    """Plot one job's train and validation loss against the campaign's global step.

    Args:
        path: the PNG to write (its folder is created; an existing file is replaced atomically).
        train: ``(global_step, loss)`` for each optimizer step.
        val: ``(global_step, val_loss)`` for each evaluation.
        title: the figure's title, e.g. the job id and its campaign.

    Returns:
        ``path``.
    """
    figure, axes = _new_figure(title)
    drawn = _draw_series(axes, train, val, train_label="train", val_label="validation")
    _finish_axes(axes, drawn)
    return _save_atomically(figure, Path(path))


def write_campaign_plot(path: Path, jobs: Iterable[dict], title: str | None = None) -> Path:
    """Plot the cumulative loss of a campaign's jobs, with a faint vertical line where each job hands over.

    Args:
        path: the PNG to write (its folder is created; an existing file is replaced atomically).
        jobs: the campaign's jobs in training order, each a dict with ``id``, ``loss_history`` and
            ``val_history`` (``[[global_step, loss], ...]``, as stored in the job's metadata); a job without
            history is left out.
        title: the figure's title; default ``campaign loss (N jobs)``.

    Returns:
        ``path``.
    """
    jobs = [j for j in jobs if j.get("loss_history") or j.get("val_history")]
    figure, axes = _new_figure(title or f"campaign loss ({len(jobs)} job{'s' if len(jobs) != 1 else ''})")
    drawn = False
    previous_end = None
    for index, job in enumerate(jobs):
        train, val = job.get("loss_history") or [], job.get("val_history") or []
        if previous_end is not None:
            # The boundary is where this job took over: the previous job's last step (= this job's start step).
            axes.axvline(previous_end, color=BOUNDARY_COLOR, alpha=0.5, linewidth=0.8, linestyle="--", zorder=0)
        previous_end = max(point[0] for point in [*train, *val])
        first = index == 0  # one legend entry per series, not one per job
        drawn |= _draw_series(axes, train, val, train_label="train" if first else None,
                              val_label="validation" if first else None)
    if len(jobs) > 1:
        axes.plot([], [], color=BOUNDARY_COLOR, linewidth=0.8, linestyle="--", label="job boundary")
    _finish_axes(axes, drawn)
    return _save_atomically(figure, Path(path))


# ------------------------------------------------------------------------------------------------ drawing


def _new_figure(title: str):
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=FIGURE_SIZE_IN, dpi=FIGURE_DPI, layout="constrained")
    axes = figure.add_subplot()
    axes.set_title(title, fontsize=11)
    axes.set_xlabel("global step")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers, even on a 4-step job
    axes.set_ylabel("loss")
    axes.grid(True, alpha=0.3)
    return figure, axes


def _finite(points: Points) -> tuple[list[float], list[float]]:
    """The points as two lists (steps, losses), without NaN or infinite losses (a diverged step)."""
    kept = [(float(p[0]), float(p[1])) for p in points if p[1] is not None and math.isfinite(float(p[1]))]
    return [s for s, _ in kept], [v for _, v in kept]


def _draw_series(axes, train: Points, val: Points, train_label: str | None, val_label: str | None) -> bool:
    """Draw a train line and validation markers; True when anything was drawn."""
    train_x, train_y = _finite(train)
    val_x, val_y = _finite(val)
    if train_x:
        axes.plot(train_x, train_y, color=TRAIN_COLOR, linewidth=1.0, alpha=0.85, label=train_label)
    if val_x:
        axes.plot(val_x, val_y, color=VAL_COLOR, linewidth=1.5, marker="o", markersize=4, label=val_label)
    return bool(train_x or val_x)


def _finish_axes(axes, drawn: bool) -> None:
    if drawn:
        axes.legend(loc="upper right", fontsize=9)
    else:
        axes.text(0.5, 0.5, "no loss recorded", transform=axes.transAxes, ha="center", va="center", color="0.4")


def _save_atomically(figure, path: Path) -> Path:
    """Render ``figure`` as PNG into a temporary file in ``path``'s folder, then rename it over ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    path.parent.mkdir(parents=True, exist_ok=True)
    canvas = FigureCanvasAgg(figure)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            canvas.print_png(fh)
            fh.flush()
            os.fsync(fh.fileno())  # the data is on disk before the rename makes it visible
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the plot is for anyone who can read the campaign
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    logger.debug("wrote %s", path)
    return path
