"""Loss plots: real PNG files, written atomically, and a module that imports nothing heavy."""

import json
import math
import random
import struct
import subprocess
import sys

import pytest

from jobs.plots import FIGURE_DPI, FIGURE_SIZE_IN, write_campaign_plot, write_loss_plot
from tests.services import REPO

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _history(start: int, steps: int, seed: int, eval_every: int = 10):
    """A plausible (decaying, noisy) train history from ``start + 1`` and a validation point every few steps."""
    rng = random.Random(seed)
    train = [[s, 2.0 + 6.0 * math.exp(-s / 40) + rng.uniform(-0.3, 0.3)] for s in range(start + 1, start + steps + 1)]
    val = [[s, 2.2 + 6.0 * math.exp(-s / 40)] for s in range(start + eval_every, start + steps + 1, eval_every)]
    return train, val


def _png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the IHDR chunk, the first one after the signature."""
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def _assert_plausible_png(path):
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC)
    assert 10_000 < len(data) < 2_000_000, len(data)
    assert _png_size(data) == (int(FIGURE_SIZE_IN[0] * FIGURE_DPI), int(FIGURE_SIZE_IN[1] * FIGURE_DPI))
    assert data.endswith(b"IEND\xaeB`\x82")  # complete: the file ends with the IEND chunk


def test_loss_plot_is_a_complete_png_and_leaves_no_temporary_file(tmp_path):
    train, val = _history(0, 120, seed=1)
    path = tmp_path / "plots" / "job.png"  # the folder does not exist yet
    assert write_loss_plot(path, train, val, title="job-1 (main-tiny-qwen3)") == path
    _assert_plausible_png(path)
    assert [p.name for p in path.parent.iterdir()] == ["job.png"]


def test_loss_plot_takes_tuples_json_lists_and_skips_non_finite_losses(tmp_path):
    train = [(1, 8.0), (2, float("nan")), (3, float("inf")), (4, 6.5)]
    path = write_loss_plot(tmp_path / "a.png", train, [[4, 7.0]], title="t")
    _assert_plausible_png(path)


def test_loss_plot_without_any_history_is_still_written(tmp_path):
    _assert_plausible_png(write_loss_plot(tmp_path / "empty.png", [], [], title="nothing trained"))


def test_a_failed_render_keeps_the_previous_plot(tmp_path, monkeypatch):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    path = write_loss_plot(tmp_path / "job.png", *_history(0, 30, seed=2), title="first")
    before = path.read_bytes()

    def broken(self, fh, *args, **kwargs):
        fh.write(b"\x89PNG half a file")
        raise OSError("disk full")

    monkeypatch.setattr(FigureCanvasAgg, "print_png", broken)
    with pytest.raises(OSError, match="disk full"):
        write_loss_plot(path, *_history(0, 60, seed=3), title="second")
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["job.png"]


def test_campaign_plot_spans_every_job(tmp_path):
    jobs = []
    start = 0
    for index, steps in enumerate((80, 50, 0, 70)):  # the third job has no history (failed before step 1)
        train, val = _history(start, steps, seed=index)
        jobs.append({"id": f"job-{index}", "loss_history": train, "val_history": val})
        start += steps
    # As read back from the job records in Redis: JSON lists.
    jobs = json.loads(json.dumps(jobs))
    path = write_campaign_plot(tmp_path / "plots" / "campaign.png", jobs)
    assert path == tmp_path / "plots" / "campaign.png"
    _assert_plausible_png(path)


def test_campaign_plot_of_no_jobs_is_still_written(tmp_path):
    _assert_plausible_png(write_campaign_plot(tmp_path / "campaign.png", []))


def test_importing_the_module_imports_neither_matplotlib_nor_torch():
    code = ("import json, sys, jobs.plots; "
            "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & {'matplotlib', 'torch', 'numpy'})))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == []
