"""Following jobs to their end: a live progress bar on a terminal, plain lines otherwise.

What is shown comes from the job's own record: its step within this job, loss, tokens/s and the ETA the worker
computes (a bar's own rate would count from whenever the watch started). A queued job shows that it is queued,
what it waits for when it is parked (the job ahead in its campaign, its retry backoff) and its place in the queue.
Ctrl-C stops watching, never the job: it says how to follow or cancel it.
"""

from __future__ import annotations

import json
import sys
import time

from jobs.cli_format import duration_text, job_view
from jobs.job import TERMINAL, Job, JobStatus
from jobs.store import JobStore

EXIT_INTERRUPTED = 130  # the shell's code for a command stopped by Ctrl-C
QUEUE_POSITION_EVERY_S = 2.0  # reading the queue order is one round trip over every queued id: not every poll
PLAIN_LINE_EVERY_S = 2.0


def watch_jobs(store: JobStore, job_ids: list[str], poll_s: float = 0.5, timeout_s: float | None = None,
               as_json: bool = False, stream=None) -> int:
    """Follow ``job_ids`` one after another until each ends, then show each final record.

    Args:
        as_json: stdout gets only the final records, as one JSON list; progress goes to stderr.
        stream: where progress and (without ``as_json``) the final records go; stdout by default.

    Returns:
        0 when every job completed, 1 otherwise (failed, skipped, cancelled, or timed out), 130 on Ctrl-C.
    """
    stream = stream or (sys.stderr if as_json else sys.stdout)
    ok, finals = True, []
    for n, job_id in enumerate(job_ids):
        try:
            job, done = _watch_one(store, job_id, poll_s, timeout_s, stream)
        except KeyboardInterrupt:
            _say_still_running(store, job_ids[n:], stream)
            return EXIT_INTERRUPTED
        finals.append(job)
        ok = ok and done and job.status == JobStatus.COMPLETED
        if not as_json and done:
            print(job_view(job), file=stream, flush=True)
    if as_json:
        print(json.dumps([j.to_dict() for j in finals], indent=2), flush=True)
    return 0 if ok else 1


def _watch_one(store: JobStore, job_id: str, poll_s: float, timeout_s: float | None, stream) -> tuple[Job, bool]:
    """Follow one job; returns its last record and whether it ended (False: timed out)."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    view = _Progress(store, job_id, stream)
    try:
        while True:
            job = store.get(job_id)
            view.show(job)
            if job.status in TERMINAL:
                return job, True
            if deadline is not None and time.monotonic() > deadline:
                view.close()
                print(f"{job_id}: still {job.status.value} after {timeout_s:.0f} s; stopped watching (the job goes "
                      f"on: python -m jobs watch {job_id})", file=stream, flush=True)
                return job, False
            time.sleep(poll_s)
    finally:
        view.close()


class _Progress:
    """One job's progress on ``stream``: a bar on a terminal, a line every few seconds otherwise."""

    def __init__(self, store: JobStore, job_id: str, stream):
        self.store, self.job_id, self.stream = store, job_id, stream
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self.bar = None
        self._line, self._line_at = "", 0.0
        self._position, self._position_at = "", 0.0

    def show(self, job: Job) -> None:
        p = job.progress or {}
        if job.status == JobStatus.PROCESSING and p.get("total_steps"):
            if self.tty:
                self._bar(job, p)
                return
            line = f"{self.job_id}: processing {_figures(job, p)}"
        elif job.status == JobStatus.QUEUED:
            line = f"{self.job_id}: queued{self._queue_note()}"
        else:
            line = f"{self.job_id}: {job.status.value}"
        self._plain(line, final=job.status in TERMINAL)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.tty and self._line:
            print(file=self.stream, flush=True)  # end the status line rewritten in place
            self._line = ""

    # ------------------------------------------------------------------------------------------ internals

    def _bar(self, job: Job, p: dict) -> None:
        start = job.start_step or 0
        total, step = max(p["total_steps"] - start, 1), max(p.get("step", start) - start, 0)
        # tqdm's own rate and remaining time would count from when this watch began, not from the job's start
        # (a resumed job starts at its checkpoint): the bar shows the figures the worker measures instead.
        bar_format = "{desc} {percentage:3.0f}%|{bar}| " + _figures(job, p).replace("{", "{{").replace("}", "}}")
        if self.bar is None:
            from tqdm import tqdm

            if self._line:
                print(file=self.stream)
                self._line = ""
            self.bar = tqdm(total=total, initial=step, desc=self.job_id[:40], unit="step", file=self.stream,
                            dynamic_ncols=True, bar_format=bar_format)
        self.bar.total, self.bar.n, self.bar.bar_format = total, step, bar_format
        self.bar.refresh()

    def _plain(self, line: str, final: bool) -> None:
        now = time.monotonic()
        if line == self._line or (not final and self._line and now - self._line_at < PLAIN_LINE_EVERY_S):
            return
        if self.tty:  # one status line, rewritten in place
            print(f"\r{line}\033[K", end="", file=self.stream, flush=True)
        else:
            print(line, file=self.stream, flush=True)
        self._line, self._line_at = line, now

    def _queue_note(self) -> str:
        """`` — after job X of campaign C (3 of 7 in the queue)``: what it waits for, and its place."""
        now = time.monotonic()
        if now - self._position_at >= QUEUE_POSITION_EVERY_S:
            self._position_at = now
            try:
                wait = self.store.runtime(self.job_id).waiting
                order = self.store.queued_in_order()
                place = f"{order.index(self.job_id) + 1} of {len(order)} in the queue" if self.job_id in order else ""
                if wait is not None:
                    self._position = f" — {wait.describe()}" + (f" ({place})" if place else "")
                else:
                    self._position = f" ({place})" if place else ""
            except Exception:  # noqa: BLE001 - the position is a courtesy; the status is what matters
                self._position = ""
        return self._position


def _figures(job: Job, p: dict) -> str:
    """``step 112/130 · loss 4.2031 · 3,100 tok/s · ETA 40 s`` from the job's own progress record."""
    eta = p.get("eta_s")
    return (f"step {p.get('step')}/{p.get('total_steps')} · loss {p.get('loss') or 0:.4f} · "
            f"{p.get('tokens_per_sec') or 0:,.0f} tok/s · ETA " + ("?" if eta is None else duration_text(eta)))


def _say_still_running(store: JobStore, job_ids: list[str], stream) -> None:
    """After Ctrl-C: the jobs go on; how to follow or cancel each (stderr, so --json output stays clean)."""
    print(file=stream, flush=True)
    for job_id in job_ids:
        try:
            status = store.get(job_id).status
        except Exception:  # noqa: BLE001 - Redis may be why the user pressed Ctrl-C
            status = None
        if status in TERMINAL:
            continue
        state = f"is still {status.value}" if status is not None else "goes on"
        print(f"stopped watching; job {job_id} {state} (stopping the watch does not stop the job). "
              f"Follow it: python -m jobs watch {job_id} · cancel it: python -m jobs cancel {job_id}",
              file=sys.stderr, flush=True)
