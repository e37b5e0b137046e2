"""The engine of the fleet benchmark's workers (``GUILD_ENGINE_FACTORY=bench.fleet_engine:engine``): no torch.

:class:`tasks.engines.StandInEngine` (sleeps through its steps, writes small JSON checkpoints), plus an event log:
one JSON line when a run starts and one when it returns, appended to ``$GUILD_FLEET_EVENTS/<pid>.jsonl`` with a
single ``write`` on an ``O_APPEND`` file (a ``kill -9`` loses nothing already written). The benchmark reads these
intervals to check that no campaign trains on two workers at once and that every job trains to its end once.

Environment (read here because a worker builds its engine from the settings only):
    GUILD_FLEET_STEP_S: seconds per step (default 0.05).
    GUILD_FLEET_EVENTS: the folder of the event logs (required).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from tasks.engines import StandInEngine


class FleetEngine(StandInEngine):
    """A stand-in that records when each run starts and ends, in which process."""

    def __init__(self, settings=None, step_s: float = 0.05, events_dir: Path | None = None):
        super().__init__(settings, step_s=step_s)
        self.events_dir = Path(events_dir) if events_dir else None

    def run_job(self, dataset_path, config, on_progress, should_stop, *, model_path, checkpoint_dir, resume_from,
                run_id, enable_packing, chat=None, evaluation=None, on_eval=None):
        self._event({"event": "start", "job": run_id, "resume_from": str(resume_from) if resume_from else None})
        result = super().run_job(dataset_path, config, on_progress, should_stop, model_path=model_path,
                                 checkpoint_dir=checkpoint_dir, resume_from=resume_from, run_id=run_id,
                                 enable_packing=enable_packing, chat=chat, evaluation=evaluation, on_eval=on_eval)
        self._event({"event": "end", "job": run_id, "status": result.status, "start_step": result.start_step,
                     "final_step": result.final_step, "total_steps": result.total_steps})
        return result

    def _event(self, record: dict) -> None:
        if self.events_dir is None:
            return
        line = json.dumps({**record, "t": time.time(), "pid": os.getpid(), "ppid": os.getppid()}) + "\n"
        fd = os.open(self.events_dir / f"{os.getpid()}.jsonl", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)


def engine(settings) -> FleetEngine:
    """The factory named by ``GUILD_ENGINE_FACTORY``."""
    events = os.environ.get("GUILD_FLEET_EVENTS")
    if not events:
        raise RuntimeError("GUILD_FLEET_EVENTS is not set: bench/fleet.py sets it for its workers")
    Path(events).mkdir(parents=True, exist_ok=True)
    return FleetEngine(settings, step_s=float(os.environ.get("GUILD_FLEET_STEP_S", "0.05")), events_dir=Path(events))
