"""Rank functions for tests/test_engine_gang.py: module-level, so the spawned ranks can import them."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path


def all_reduce(ctx, steps: int) -> dict:
    """Each step, all-reduce ``rank + 1`` and report; rank 0 returns what it saw."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    sums = []
    for step in range(steps):
        value = torch.tensor([float(ctx.rank + 1)])
        dist.all_reduce(value)
        sums.append(value.item())
        ctx.report({"step": step + 1, "sum": value.item()})
    return {"rank": ctx.rank, "world": ctx.world_size, "device": str(ctx.device), "sums": sums}


def write_pids(ctx, directory: str) -> None:
    """Rank r writes ``rank<r>.pid``; rank 1 also starts a ``sleep`` child and writes ``grandchild.pid``."""
    import os

    out = Path(directory)
    if ctx.rank == 1:
        child = subprocess.Popen(["sleep", "600"])
        (out / "grandchild.pid").write_text(str(child.pid))
    (out / f"rank{ctx.rank}.pid.tmp").write_text(str(os.getpid()))
    (out / f"rank{ctx.rank}.pid.tmp").rename(out / f"rank{ctx.rank}.pid")


def train_until_killed(ctx, directory: str) -> None:
    """All-reduce and beat forever (a rank is killed from outside)."""
    import torch
    import torch.distributed as dist

    write_pids(ctx, directory)
    while True:
        dist.all_reduce(torch.ones(1))
        ctx.beat()
        time.sleep(0.05)


def rank1_hangs(ctx, directory: str, collective: bool) -> None:
    """Rank 1 sleeps forever without a heartbeat. Rank 0 either beats on its own (the parent's watchdog must catch
    rank 1) or waits for rank 1 in an all-reduce (the process group's timeout must fire in rank 0)."""
    import torch
    import torch.distributed as dist

    write_pids(ctx, directory)
    if ctx.rank == 1:
        time.sleep(3600)
    while True:
        if collective:
            dist.all_reduce(torch.ones(1))
        ctx.beat()
        time.sleep(0.1)


def rank1_raises(ctx) -> None:
    if ctx.rank == 1:
        raise ValueError("bad shard on rank 1")
    ctx.beat()


def stops_when_asked(ctx) -> int:
    """Beat until the parent asks to stop; return how many beats it took."""
    beats = 0
    while not ctx.stop_requested():
        ctx.report({"beat": beats})
        beats += 1
        time.sleep(0.05)
    return beats


_CALLS = {"count": 0}  # module state of a rank: survives between the calls of a warm gang


def count_calls(ctx) -> dict:
    """How many calls this rank process has run, and its pid."""
    import os

    _CALLS["count"] += 1
    ctx.beat()
    return {"calls": _CALLS["count"], "pid": os.getpid()}


def beats_until_stopped(ctx, limit: int) -> int:
    """Beat until a stop request or ``limit`` beats; return how many."""
    beats = 0
    while beats < limit and not ctx.stop_requested():
        ctx.report({"beat": beats})
        beats += 1
        time.sleep(0.02)
    return beats
