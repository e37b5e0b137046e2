"""Loss curves as PNG files: one job's train and validation loss, and a whole campaign's (with its eval set's loss),
by global step.

matplotlib is imported inside the functions, never at module level, so that the CLIs that import this
module stay light. Figures are drawn with matplotlib's object API on an Agg canvas: no display, no pyplot
global state (safe in a worker thread and in a host process that already uses pyplot with another backend).
Every file is written atomically: rendered into a temporary file beside it, then renamed over it.
"""

from __future__ import annotations

import contextlib
import json
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
EVAL_COLORS = ("tab:green", "tab:purple", "tab:red", "tab:brown")  # one per eval set a campaign had

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


def campaign_plot_data(jobs: Iterable[dict]) -> dict:
    """What a campaign's plot shows, as data: every series against the global step, and where jobs hand over.

    Args:
        jobs: the campaign's jobs in training order, each a dict with ``id`` and its histories as stored in the
            job's metadata: ``loss_history`` and ``val_history`` (``[[global_step, loss], ...]``) and
            ``eval_history`` (``[{"step", "loss", "eval_set", ...}, ...]``: the campaign's eval set); a job without
            any history is left out.

    Returns:
        ``{"jobs": [{"id", "first_step", "last_step"}], "boundaries": [step, ...], "series": {name: [[step, loss],
        ...]}}``. Series: ``train``, ``validation`` (each job's own split) and ``eval <sha12>`` (the campaign's eval
        set, one series per set, across jobs). A boundary is the step where a job took over (the previous job's
        last step).
    """
    kept = [j for j in jobs if j.get("loss_history") or j.get("val_history") or j.get("eval_history")]
    series: dict[str, list[list[float]]] = {"train": [], "validation": []}
    spans, boundaries = [], []
    for job in kept:
        train = [[p[0], p[1]] for p in job.get("loss_history") or []]
        val = [[p[0], p[1]] for p in job.get("val_history") or []]
        evals = job.get("eval_history") or []
        steps = [p[0] for p in [*train, *val]] + [p["step"] for p in evals]
        if spans:
            boundaries.append(spans[-1]["last_step"])
        spans.append({"id": job.get("id"), "first_step": min(steps), "last_step": max(steps)})
        series["train"] += train
        series["validation"] += val
        for point in evals:
            series.setdefault(f"eval {str(point.get('eval_set', ''))[:12]}", []).append([point["step"], point["loss"]])
    return {"jobs": spans, "boundaries": boundaries, "series": series}


def write_campaign_plot(path: Path, jobs: Iterable[dict], title: str | None = None) -> Path:
    """Plot a campaign's train loss, each job's validation loss and the campaign's eval set loss against the global
    step, across all its jobs, with a faint vertical line where each job hands over.

    The data drawn is written beside the PNG (``campaign.json`` for ``campaign.png``; see
    :func:`campaign_plot_data`).

    Args:
        path: the PNG to write (its folder is created; an existing file is replaced atomically).
        jobs: see :func:`campaign_plot_data`.
        title: the figure's title; default ``campaign loss (N jobs)``.

    Returns:
        ``path``.
    """
    data = campaign_plot_data(jobs)
    n = len(data["jobs"])
    figure, axes = _new_figure(title or f"campaign loss ({n} job{'s' if n != 1 else ''})")
    for step in data["boundaries"]:
        axes.axvline(step, color=BOUNDARY_COLOR, alpha=0.5, linewidth=0.8, linestyle="--", zorder=0)
    drawn = False
    for span in data["jobs"]:  # one train line per job: no segment drawn across a boundary
        inside = [p for p in data["series"]["train"] if span["first_step"] <= p[0] <= span["last_step"]]
        drawn |= _draw_series(axes, inside, [], train_label="train" if span is data["jobs"][0] else None,
                              val_label=None)
    drawn |= _draw_series(axes, [], data["series"]["validation"], train_label=None, val_label="validation (job split)")
    for index, (name, points) in enumerate(s for s in data["series"].items() if s[0].startswith("eval ")):
        xs, ys = _finite(points)
        if xs:
            color = EVAL_COLORS[index % len(EVAL_COLORS)]
            axes.plot(xs, ys, color=color, linewidth=1.8, marker="s", markersize=4, label=f"campaign {name}")
            drawn = True
    if len(data["jobs"]) > 1:
        axes.plot([], [], color=BOUNDARY_COLOR, linewidth=0.8, linestyle="--", label="job boundary")
    _finish_axes(axes, drawn)
    _write_json_atomically(Path(path).with_suffix(".json"), data)
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


def _write_json_atomically(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=1)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


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
