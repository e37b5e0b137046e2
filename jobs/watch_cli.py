"""Following jobs to their end: a live progress bar on a terminal, plain lines otherwise."""

from __future__ import annotations

import sys
import time

from jobs.cli_format import job_view
from jobs.job import TERMINAL, JobStatus
from jobs.store import JobStore


def watch_jobs(store: JobStore, job_ids: list[str], poll_s: float = 0.5, timeout_s: float | None = None,
               quiet_ids: bool = False, stream=None) -> int:
    """Follow ``job_ids`` one after another until each ends; print each final record.

    Returns:
        0 when every job completed, 1 otherwise (failed, skipped, cancelled, or timed out).
    """
    stream = stream or sys.stdout
    ok = True
    for job_id in job_ids:
        ok = _watch_one(store, job_id, poll_s, timeout_s, stream) and ok
    return 0 if ok else 1


def _watch_one(store: JobStore, job_id: str, poll_s: float, timeout_s: float | None, stream) -> bool:
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    tty = stream.isatty()
    bar = None
    last_line = ""
    last_plain = 0.0
    while True:
        job = store.get(job_id)
        p = job.progress or {}
        if tty and p.get("total_steps"):
            if bar is None:
                from tqdm import tqdm

                bar = tqdm(total=p["total_steps"], desc=job_id[:40], unit="step", file=stream, dynamic_ncols=True)
                bar.n = p.get("step", 0)
            bar.total = p["total_steps"]
            bar.n = p.get("step", 0)
            bar.set_postfix(loss=f"{p.get('loss') or 0:.4f}", tok_s=f"{p.get('tokens_per_sec') or 0:.0f}",
                            eta=f"{p.get('eta_s') or 0:.0f}s", refresh=False)
            bar.refresh()
        elif not tty:
            line = f"{job_id}: {job.status.value}"
            if p:
                line += (f" step {p.get('step')}/{p.get('total_steps')} loss {p.get('loss') or 0:.4f} "
                         f"{p.get('tokens_per_sec') or 0:.0f} tok/s eta {p.get('eta_s') or 0:.0f}s")
            now = time.monotonic()
            if line != last_line and (now - last_plain >= 2.0 or job.status in TERMINAL or not last_line):
                print(line, file=stream, flush=True)
                last_line, last_plain = line, now
        if job.status in TERMINAL:
            break
        if deadline is not None and time.monotonic() > deadline:
            if bar is not None:
                bar.close()
            print(f"{job_id}: still {job.status.value} after {timeout_s:.0f} s; stopped watching", file=stream)
            return False
        time.sleep(poll_s)
    if bar is not None:
        bar.close()
    print(job_view(job), file=stream, flush=True)
    return job.status == JobStatus.COMPLETED
