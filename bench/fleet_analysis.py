"""The fleet benchmark's invariants and figures, computed from what the run left behind (pure functions).

Three sources, all timestamped by the same clock:

- the **job records and histories** in Redis: every transition with its time (ms) and worker;
- the **worker logs** (Celery): when a worker received each message (``Task guild.train[ID] received``) and when
  it was done with it (``... succeeded in Xs: {'action': ...}``), so when each worker was busy, and with what;
- the **engine's event log** (:mod:`bench.fleet_engine`): when each training run started and ended, in which process.

Definitions (printed with the figures):

- A job's *queued episode* runs from the moment it entered ``queued`` (enqueued, or requeued) to its next claim.
  It is **eligible** from ``E = max(entered queued, last time its campaign's previous run left processing)``: from
  then on nothing but a free worker stands between it and training (its campaign is idle and it is the campaign's
  next job: jobs of a campaign run one at a time, in queue order).
- **Strict priority** is violated when a worker takes a message (the Celery ``received`` time ``t``) and claims a
  job while a job of higher priority had been eligible since ``t - tolerance`` and was not yet taken by any worker
  (its claiming delivery was received after ``t``). The tolerance covers a message in flight: a job whose campaign
  frees up gets its message from the ending run (or the sweep) at the head of its queue, but a worker may have taken
  another message a moment before.
- **Dispatch latency** of a claim: from ``max(E, the claiming worker's previous training task done, the last claim
  of a job ahead of it in queue order)`` (a worker was free and the job was the next eligible) to the claim.
  **Pick-up** is the part from the worker receiving the message to the claim.
"""

from __future__ import annotations

import ast
import json
import re
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np

TRAINING_ACTIONS = ("completed", "failed", "skipped", "cancelled", "requeued")  # a run happened in that task
_LINE = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}): (\w+)/([\w-]+)\] (.*)$")
_RECEIVED = re.compile(r"Task guild\.train\[([^\]]+)\] received")
_SUCCEEDED = re.compile(r"Task guild\.train\[([^\]]+)\] succeeded in [\d.e-]+s: (.*)$")
_RAISED = re.compile(r"Task guild\.train\[([^\]]+)\] raised")
_REJECTED = re.compile(r"Task guild\.train\[([^\]]+)\] reject")  # a delivery Redis broke: its message given back
_IGNORED = re.compile(r"Task guild\.train\[([^\]]+)\] ignored")  # a delivery that parked its job (jobs/waiting.py)
_READY = re.compile(r"(\S+) ready\.$")


# ------------------------------------------------------------------------------------------------- inputs


@dataclass
class Task:
    """One delivery of a message to a worker, from its Celery log."""

    worker: str
    incarnation: int
    job: str
    received: float
    done: float | None = None
    action: str | None = None  # completed | waiting | deferred | dropped | requeued | ... | error (raised)


@dataclass
class WorkerLog:
    worker: str
    incarnation: int
    ready: float | None
    tasks: list[Task]


@dataclass
class Run:
    """One training run of a job, from the engine's event log; ``end`` is None when its process was killed."""

    job: str
    pid: int
    ppid: int
    start: float
    end: float | None = None
    status: str | None = None
    start_step: int | None = None
    final_step: int | None = None
    total_steps: int | None = None


@dataclass
class Transition:
    at: float
    source: str | None
    target: str
    worker: str | None
    reason: str


@dataclass
class JobFacts:
    id: str
    priority: str
    rank: int
    campaign: str
    seq: int
    status: str
    attempts: int
    transitions: list[Transition] = field(default_factory=list)


def _log_time(date: str, ms: str) -> float:
    return time.mktime(time.strptime(date, "%Y-%m-%d %H:%M:%S")) + int(ms) / 1000


def parse_worker_log(text: str, worker: str, incarnation: int) -> WorkerLog:
    """The deliveries a worker handled, in order, from its Celery log (INFO level)."""
    ready, tasks, open_tasks = None, [], {}
    for line in text.splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        at, message = _log_time(m.group(1), m.group(2)), m.group(5)
        if (r := _RECEIVED.search(message)) is not None:
            for other in open_tasks.values():  # one task at a time: an earlier one ended, unlogged (a broken delivery)
                other.done, other.action = at, "unlogged"
            open_tasks.clear()
            task = Task(worker, incarnation, r.group(1), at)
            tasks.append(task)
            open_tasks[r.group(1)] = task
        elif (r := _SUCCEEDED.search(message)) is not None:
            task = open_tasks.pop(r.group(1), None)
            if task is not None:
                task.done, task.action = at, _action(r.group(2))
        elif (r := _RAISED.search(message)) is not None:
            task = open_tasks.pop(r.group(1), None)
            if task is not None:
                task.done, task.action = at, "error"
        elif (r := _REJECTED.search(message)) is not None:
            task = open_tasks.pop(r.group(1), None)
            if task is not None:
                task.done, task.action = at, "rejected"
        elif (r := _IGNORED.search(message)) is not None:
            task = open_tasks.pop(r.group(1), None)
            if task is not None:
                task.done, task.action = at, "waiting"
        elif ready is None and (r := _READY.search(message)) is not None:
            ready = at
    return WorkerLog(worker, incarnation, ready, tasks)


def _action(result: str) -> str:
    try:
        return str(ast.literal_eval(result).get("action"))
    except (ValueError, SyntaxError, AttributeError):
        found = re.search(r"'action': '(\w+)'", result)
        return found.group(1) if found else "unknown"


def read_runs(events_dir: Path) -> list[Run]:
    """Training runs from the engine's event logs (one file per worker process)."""
    runs: list[Run] = []
    for path in sorted(Path(events_dir).glob("*.jsonl")):
        open_runs: dict[str, Run] = {}
        for line in path.read_text().splitlines():
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill -9
            if event["event"] == "start":
                run = Run(event["job"], event["pid"], event["ppid"], event["t"])
                runs.append(run)
                open_runs[event["job"]] = run
            elif event["event"] == "end" and event["job"] in open_runs:
                run = open_runs.pop(event["job"])
                run.end, run.status = event["t"], event["status"]
                run.start_step, run.final_step = event["start_step"], event["final_step"]
                run.total_steps = event["total_steps"]
    return runs


def iso_time(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def job_facts(job, history: list[dict], rank: dict[str, int]) -> JobFacts:
    """From a :class:`jobs.job.Job` and its history entries."""
    transitions = [Transition(iso_time(h["at"]), h.get("from"), h["to"], h.get("worker"), h.get("reason", ""))
                   for h in history]
    return JobFacts(job.id, job.priority, rank[job.priority], job.campaign_id, int(job.metadata.get("seq", 0)),
                    job.status.value, job.attempts, transitions)


# -------------------------------------------------------------------------------------- endings (exactly once)


def endings(jobs: dict[str, JobFacts], submitted: list[str], runs: list[Run], campaigns: dict[str, dict],
            steps: int) -> dict:
    """Every submitted job completed exactly once; nothing lost, nothing extra, nothing trained twice.

    Args:
        campaigns: campaign id → ``{"current_step", "job_ids"}`` as on disk.
        steps: the steps of every job (each job advances its campaign by exactly that much).
    """
    completions = {j.id: sum(1 for t in j.transitions if t.target == "completed") for j in jobs.values()}
    after_final = [j.id for j in jobs.values() if _moved_after_final(j)]
    runs_by_job: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        runs_by_job[run.job].append(run)
    # A run that trained at least one step and reached the end: more than one per job is a job trained twice.
    full = {job: sum(1 for r in rs if r.status == "completed" and r.final_step == r.total_steps
                     and (r.start_step or 0) < (r.total_steps or 0)) for job, rs in runs_by_job.items()}
    per_campaign: dict[str, list[str]] = defaultdict(list)
    for j in jobs.values():
        per_campaign[j.campaign].append(j.id)
    campaign_problems = []
    for cid, ids in sorted(per_campaign.items()):
        record = campaigns.get(cid)
        if record is None:
            campaign_problems.append(f"{cid}: no campaign record")
            continue
        if record["current_step"] != steps * len(ids):
            campaign_problems.append(f"{cid}: current_step {record['current_step']} != {steps} x {len(ids)} jobs")
        if sorted(record["job_ids"]) != sorted(ids):
            campaign_problems.append(f"{cid}: job_ids differ from its jobs ({len(record['job_ids'])} vs {len(ids)})")
    submitted_set = set(submitted)
    result = {
        "submitted": len(submitted),
        "in_store": len(jobs),
        "completed": sum(1 for j in jobs.values() if j.status == "completed"),
        "lost": sorted(submitted_set - {i for i, j in jobs.items() if j.status == "completed"}),
        "unknown": sorted(set(jobs) - submitted_set),
        "completed_twice": sorted(i for i, n in completions.items() if n > 1),
        "moved_after_final": sorted(after_final),
        "trained_to_the_end_twice": sorted(i for i, n in full.items() if n > 1),
        "never_ran": sorted(i for i in submitted_set if i not in runs_by_job),
        "campaign_problems": campaign_problems,
        "attempts": histogram(j.attempts for j in jobs.values()),
        "runs_per_job": histogram(len(runs_by_job.get(i, [])) for i in submitted_set),
        "claims_per_job": histogram(sum(1 for t in j.transitions if t.target == "processing")
                                     for j in jobs.values()),
    }
    result["ok"] = not any(result[k] for k in ("lost", "unknown", "completed_twice", "moved_after_final",
                                                "trained_to_the_end_twice", "never_ran", "campaign_problems"))
    return result


def _moved_after_final(job: JobFacts) -> bool:
    seen_final = False
    for t in job.transitions:
        if seen_final:
            return True
        seen_final = t.target in ("completed", "skipped")
    return False


def histogram(values) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for v in values:
        counts[str(v)] += 1
    return dict(sorted(counts.items(), key=lambda kv: int(kv[0])))


# ----------------------------------------------------------------------------------- one campaign, one worker


def overlaps(intervals: dict[str, list[tuple[float, float, str]]]) -> dict:
    """Per campaign, pairs of training intervals ``(start, end, who)`` that overlap in time (should be none)."""
    found, total_s = [], 0.0
    for campaign, spans in intervals.items():
        spans = sorted(spans)
        latest_end, latest_who = float("-inf"), ""
        for start, end, who in spans:
            if start < latest_end:
                total_s += min(latest_end, end) - start
                found.append({"campaign": campaign, "a": latest_who, "b": who, "seconds": round(latest_end - start, 3)})
            if end > latest_end:
                latest_end, latest_who = end, who
    return {"count": len(found), "seconds": round(total_s, 3), "examples": found[:10]}


def engine_intervals(runs: list[Run], jobs: dict[str, JobFacts], killed_at: dict[int, float],
                     horizon: float) -> dict[str, list[tuple[float, float, str]]]:
    """Training intervals per campaign from the engine's log. A run without an end was killed with its worker:
    it ends when its worker process group was killed (``killed_at`` by worker pid = the run's ppid), else at
    ``horizon`` (counted as running to the end, the pessimistic reading)."""
    by_campaign: dict[str, list[tuple[float, float, str]]] = defaultdict(list)
    for run in runs:
        if run.job not in jobs:
            continue
        end = run.end if run.end is not None else killed_at.get(run.ppid, horizon)
        by_campaign[jobs[run.job].campaign].append((run.start, end, f"{run.job}@pid{run.pid}"))
    return by_campaign


def store_intervals(jobs: dict[str, JobFacts]) -> dict[str, list[tuple[float, float, str]]]:
    """Processing intervals per campaign from the histories: each claim to the transition that left processing."""
    by_campaign: dict[str, list[tuple[float, float, str]]] = defaultdict(list)
    for j in jobs.values():
        claim = None
        for t in j.transitions:
            if t.target == "processing":
                claim = t
            elif claim is not None and t.source == "processing":
                by_campaign[j.campaign].append((claim.at, t.at, f"{j.id}@{claim.worker}"))
                claim = None
    return by_campaign


# --------------------------------------------------------------------------------- episodes, priority, latency


@dataclass
class Episode:
    job: str
    rank: int
    seq: int
    campaign: str
    queued_at: float
    eligible_at: float
    claimed_at: float  # inf: never claimed
    worker: str | None
    received_at: float | None = None  # when the claiming worker took the message
    free_at: float | None = None  # when that worker's previous training task was done (or it was ready)


def episodes(jobs: dict[str, JobFacts], logs: list[WorkerLog]) -> list[Episode]:
    """Every queued episode, with when it became eligible, when it was claimed, and by which delivery."""
    exits: dict[str, list[float]] = defaultdict(list)  # campaign → times a run of it left processing
    for j in jobs.values():
        exits[j.campaign].extend(t.at for t in j.transitions if t.source == "processing")
    for times in exits.values():
        times.sort()
    tasks_by_worker: dict[str, list[Task]] = defaultdict(list)
    ready_by_worker: dict[str, list[float]] = defaultdict(list)
    for log in logs:
        tasks_by_worker[log.worker].extend(log.tasks)
        if log.ready is not None:
            ready_by_worker[log.worker].append(log.ready)
    for tasks in tasks_by_worker.values():
        tasks.sort(key=lambda t: t.received)

    found = []
    for j in jobs.values():
        queued_at = None
        for t in j.transitions:
            if t.target == "queued":
                queued_at = t.at
            elif t.target == "processing" and queued_at is not None:
                found.append(_episode(j, queued_at, t, exits[j.campaign], tasks_by_worker, ready_by_worker))
                queued_at = None
        if queued_at is not None:
            found.append(Episode(j.id, j.rank, j.seq, j.campaign, queued_at,
                                 _eligible(queued_at, float("inf"), exits[j.campaign]), float("inf"), None))
    return found


def _eligible(queued_at: float, claimed_at: float, campaign_exits: list[float]) -> float:
    before = [x for x in campaign_exits if x < claimed_at]
    return max([queued_at, *before[-1:]])


def _episode(j: JobFacts, queued_at: float, claim: Transition, campaign_exits: list[float],
             tasks_by_worker: dict[str, list[Task]], ready_by_worker: dict[str, list[float]]) -> Episode:
    ep = Episode(j.id, j.rank, j.seq, j.campaign, queued_at, _eligible(queued_at, claim.at, campaign_exits),
                 claim.at, claim.worker)
    tasks = tasks_by_worker.get(claim.worker or "", [])
    delivery = next((t for t in reversed(tasks) if t.job == j.id and t.received <= claim.at + 1e-3), None)
    if delivery is not None:
        ep.received_at = delivery.received
        previous = [t.done for t in tasks if t.done is not None and t.done <= delivery.received
                    and t.action in TRAINING_ACTIONS]
        readies = [r for r in ready_by_worker.get(claim.worker or "", []) if r <= delivery.received]
        ep.free_at = max(previous[-1:] + readies[-1:], default=None)
    return ep


def priority_violations(eps: list[Episode], tolerance_s: float,
                        recovery: list[tuple[float, float]] = ()) -> dict:
    """Claims of a job while a job of higher priority had been eligible for ``tolerance_s`` and no worker had taken
    its message yet (see the module's definitions).

    Args:
        recovery: time windows after a fault (a killed worker or Redis, until the sweep has sent every lost message
            again): a higher job whose message died with the fault waits for the sweep, by design; violations there
            are counted apart (``during_recovery``), not in ``count``.
    """
    claimed = [e for e in eps if e.received_at is not None]
    ranks = np.array([e.rank for e in eps])
    eligible = np.array([e.eligible_at for e in eps])
    taken = np.array([e.received_at if e.received_at is not None else e.claimed_at for e in eps])
    ids = [e.job for e in eps]
    found = []
    for e in claimed:
        if e.rank == 0:
            continue
        t = e.received_at
        mask = (ranks < e.rank) & (eligible <= t - tolerance_s) & (taken > t)
        if mask.any():
            waited = float(np.max(t - eligible[mask]))
            first = int(np.argmax(np.where(mask, t - eligible, -np.inf)))
            found.append({"claimed": e.job, "at": round(t, 3), "waiting": ids[first], "waited_s": round(waited, 3)})
    during = [f for f in found if any(a <= f["at"] <= b for a, b in recovery)]
    found = [f for f in found if f not in during]
    waits = [f["waited_s"] for f in found]
    return {"tolerance_s": tolerance_s, "count": len(found), "claims_checked": len(claimed),
            "max_waited_s": max(waits, default=0.0), "examples": sorted(found, key=lambda f: -f["waited_s"])[:10],
            "during_recovery": len(during)}


def dispatch_latencies(eps: list[Episode]) -> dict:
    """Dispatch latency and pick-up of every claim (seconds), with percentiles."""
    claimed = sorted((e for e in eps if e.received_at is not None), key=lambda e: e.claimed_at)
    order = np.array([e.rank * 1e9 + e.seq for e in claimed])
    claims = np.array([e.claimed_at for e in claimed])
    latency, pickup = [], []
    for e in claimed:
        ahead = (order < e.rank * 1e9 + e.seq) & (claims > e.eligible_at) & (claims < e.claimed_at)
        last_ahead = float(claims[ahead].max()) if ahead.any() else float("-inf")
        ready = max(e.eligible_at, e.free_at if e.free_at is not None else float("-inf"), last_ahead)
        latency.append(max(e.claimed_at - ready, 0.0))
        pickup.append(max(e.claimed_at - e.received_at, 0.0))
    return {"claims": len(claimed), "dispatch_s": percentiles(latency), "pickup_s": percentiles(pickup)}


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    arr = np.array(values)
    return {"n": len(values), "p50": round(float(np.percentile(arr, 50)), 4),
            "p90": round(float(np.percentile(arr, 90)), 4), "p99": round(float(np.percentile(arr, 99)), 4),
            "max": round(float(arr.max()), 4), "mean": round(float(arr.mean()), 4)}


# ---------------------------------------------------------------------------------------------- worker time


def worker_time(logs: list[WorkerLog], ends: dict[tuple[str, int], float]) -> dict:
    """How the workers spent their time from ready to ``ends[(worker, incarnation)]``: training tasks, deferrals,
    dropped duplicates, and idle (waiting for a message)."""
    totals: dict[str, float] = defaultdict(float)
    life = 0.0
    deliveries: dict[str, int] = defaultdict(int)
    for log in logs:
        end = ends.get((log.worker, log.incarnation))
        if log.ready is None or end is None:
            continue
        life += max(end - log.ready, 0.0)
        for task in log.tasks:
            stop = min(task.done if task.done is not None else end, end)
            kind = "training" if task.action in TRAINING_ACTIONS else (task.action or "in hand at the end")
            totals[kind] += max(stop - task.received, 0.0)
            deliveries[kind] += 1
    busy = sum(totals.values())
    shares = {k: round(v / life, 4) for k, v in sorted(totals.items())} if life else {}
    shares["idle"] = round(max(life - busy, 0.0) / life, 4) if life else 0.0
    return {"worker_seconds": round(life, 1), "share": shares, "deliveries": dict(deliveries),
            "deferral_s_median": statistics.median(
                [t.done - t.received for log in logs for t in log.tasks
                 if t.action == "deferred" and t.done is not None] or [0.0])}
