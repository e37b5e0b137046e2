"""TensorBoard logging of a job (tasks/tracking.py): scalars land in an event file, and nothing loads torch."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.services import REPO

_CHILD = """
import json, sys
from pathlib import Path
import tasks.lifecycle, tasks.train  # what a worker process imports before its first job
from tasks.tracking import CampaignTracker
tracker = CampaignTracker(Path(sys.argv[1]), "20261129T120000_fleet")
tracker.log({"train/loss": 1.5, "train/lr": None, "train/tokens_per_sec": 1000.0}, 3)
tracker.log({"train/loss": 1.25, "val/loss": 1.75}, 4)
tracker.close()
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "accelerate", "transformers"))))
"""


def _scalars(run_dir):
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    [path] = run_dir.glob("events.out.tfevents.*")
    found = []
    for event in EventFileLoader(str(path)).Load():
        for value in event.summary.value:
            found.append((event.step, value.tag, round(float(value.simple_value or value.tensor.float_val[0]), 4)))
    return found


def test_a_job_logs_its_scalars_without_loading_torch(tmp_path):
    out = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    # A worker training with a torch-free engine (the stand-in) must not pay torch's import for its TensorBoard logs.
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
    assert _scalars(tmp_path / "tensorboard" / "20261129T120000_fleet") == [
        (3, "train/loss", 1.5), (3, "train/tokens_per_sec", 1000.0), (4, "train/loss", 1.25), (4, "val/loss", 1.75)]


def test_probe_answers_are_logged_as_text_tensorboard_reads(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tasks.tracking import CampaignTracker

    tracker = CampaignTracker(tmp_path, "20261129T120000_probe")
    tracker.log({"eval/loss": 2.5, "samples/probe-1": "**prompt:** hi\n\n**answer:** héllo"}, 6)
    tracker.close()
    events = EventAccumulator(str(tmp_path / "tensorboard" / "20261129T120000_probe"), size_guidance={"tensors": 0})
    events.Reload()
    assert [(s.step, s.value) for s in events.Scalars("eval/loss")] == [(6, 2.5)]
    [text] = events.Tensors("samples/probe-1")
    assert text.step == 6 and text.tensor_proto.string_val == ["**prompt:** hi\n\n**answer:** héllo".encode()]
    assert events.summary_metadata["samples/probe-1"].plugin_data.plugin_name == "text"
