"""Time and peak memory of enqueue's dataset check on two hostile files (issue 11, break 5).

    .venv/bin/python bench/dataset_validation.py [--keep]

Writes, under a temp directory, a 2 GiB file of NUL bytes (sparse: no disk used) and 10 million tiny lines
(140 MB), then runs ``jobs.submit.check_files`` on each in a fresh process and prints wall time, peak RSS and the
first line of the verdict; the 10-million-line file also with the examples limit raised (GUILD_MAX_EXAMPLES), to
show the streaming cost of a file that passes. The files are deleted afterwards unless ``--keep``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
_CHILD = """
import json, resource, sys, time
from jobs.submit import BatchRejected, check_files
started = time.perf_counter()
try:
    verdict = f"accepted: {check_files([sys.argv[1]])[0].num_examples} examples"
except BatchRejected as exc:
    verdict = "refused: " + str(exc).splitlines()[0]
print(json.dumps({"s": round(time.perf_counter() - started, 2),
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024, "verdict": verdict}))
"""


def measure(path: Path, env: dict[str, str]) -> dict:
    out = subprocess.run([sys.executable, "-c", _CHILD, str(path)], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=1800, check=True)
    return json.loads(out.stdout)


def main() -> int:
    keep = "--keep" in sys.argv
    work = Path(tempfile.mkdtemp(prefix="guild-bench-datasets-"))
    env = {**os.environ, "GUILD_HOME": str(work / "home")}
    try:
        nul = work / "nul-2g.jsonl"
        with open(nul, "wb") as f:
            f.truncate(2 * 2**30)
        lines = work / "lines-10m.jsonl"
        with open(lines, "wb") as f:
            for _ in range(100):
                f.write(b'{"text": "a"}\n' * 100_000)
        print(f"load average {os.getloadavg()[0]:.1f}, {os.cpu_count()} CPUs")
        for name, path, extra in (("2 GiB of NUL bytes", nul, {}), ("10 M tiny lines", lines, {}),
                                  ("10 M tiny lines, GUILD_MAX_EXAMPLES=20000000", lines,
                                   {"GUILD_MAX_EXAMPLES": "20000000"})):
            result = measure(path, {**env, **extra})
            print(f"{name:48} {result['s']:>8.2f} s {result['peak_rss_mb']:>6} MB  {result['verdict'][:90]}")
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
