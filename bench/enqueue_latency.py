"""Benchmark: wall time of ``python -m enqueue`` for one small file (target ≤ 0.6 s), and of ``jobs plan``
over 10,000 queued jobs (target ≤ 1 s). Starts its own redis-server on a free loopback port.

    .venv/bin/python bench/enqueue_latency.py
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.services import RedisServer  # noqa: E402


def timed(cmd, env, runs):
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        times.append(time.perf_counter() - t0)
        if out.returncode != 0:
            raise SystemExit(out.stderr)
    return times


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(Path(tmp) / "redis").start()
        try:
            env = {**os.environ, "REDIS_URL": server.url, "GUILD_HOME": str(Path(tmp) / "home")}
            small = Path(tmp) / "small.jsonl"
            small.write_text((REPO / "examples" / "messages.jsonl").read_text())
            enqueue = [sys.executable, "-m", "enqueue", str(small), "--force"]
            timed(enqueue, env, 2)  # warm the page cache and create the default campaign
            enq = timed(enqueue, env, 15)

            # 10,000 queued jobs written straight into the store, then `jobs plan --json`
            sys.path.insert(0, str(REPO))
            import redis

            from jobs.job import Job
            from jobs.store import JobStore

            store = JobStore(redis.Redis.from_url(server.url), Path(env["GUILD_HOME"]))
            for i in range(10_000):
                store.create(Job(id=f"bench-{i}", dataset_path="/x", hero_id="tiny-qwen3", campaign_id="b",
                                 priority=("high", "normal", "low")[i % 3], num_examples=10, estimated_tokens=1000),
                             f"sha-{i}")
            plan = timed([sys.executable, "-m", "jobs", "plan", "--json"], env, 5)
        finally:
            server.stop()
    result = {
        "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()} {os.cpu_count()} cores",
        "enqueue_one_small_file_s": {"median": round(statistics.median(enq), 3), "max": round(max(enq), 3),
                                     "target": 0.6},
        "jobs_plan_10k_queued_s": {"median": round(statistics.median(plan), 3), "max": round(max(plan), 3),
                                   "target": 1.0},
    }
    print(f"enqueue of one small file: median {result['enqueue_one_small_file_s']['median']} s "
          f"(max {result['enqueue_one_small_file_s']['max']} s; target ≤ 0.6 s)")
    print(f"jobs plan over 10,000 queued jobs: median {result['jobs_plan_10k_queued_s']['median']} s "
          f"(target ≤ 1 s)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
