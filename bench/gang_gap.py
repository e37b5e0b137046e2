"""The gap between jobs of one campaign on a warm worker: one process (``TrainerEngine``) and a gang of ranks
(``GangTrainer``), on the CPU (gloo) or CUDA (NCCL, one rank per visible GPU).

    python bench/gang_gap.py                      # 1 process and 2 CPU ranks, the tiny hero, 4 jobs each
    python bench/gang_gap.py --ranks 1,2,4 --device cuda --jobs 6

Each job resumes from the checkpoint the one before wrote, as a campaign's next job does on the worker that ran the
last one, so the model, optimizer and (on a gang) the rank processes and process group stay warm. The gap of a job
is the time from ``run_job``'s call to its first optimizer step's progress, less one step's time (the median of the
job's later steps): what a worker spends between jobs beyond training (reading and tokenising the data, finding
the warm model, the first step's data). The first job's figure is the cold start (loading; on a gang, starting
the ranks and the process group), for contrast. Issue 14's target: <= 1 s warm on one GPU.

"1 rank" below is what a one-GPU worker runs (``TrainerEngine`` in the worker's process: no gang at all).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def measure(ranks: int, device: str, jobs: int, hero: Path, work: Path, steps: int) -> dict:
    from engine.formats import read_examples
    from engine.ranks import GangTrainer
    from engine.trainer import TrainerEngine
    from tests.engine_fixtures import small_config

    examples = read_examples(REPO / "examples" / "chat_small.jsonl")
    # global batch 8 = 2 ranks x batch 2 x 2 micro-batches; one process accumulates 4
    config = small_config(batch_size=2, global_batch_size=8, max_steps=steps, save_steps=steps, eval_fraction=0.0,
                          warmup_steps=1)
    engine = TrainerEngine(device=device) if ranks == 1 else GangTrainer(ranks, device, timeout_s=120, grace_s=2)
    rows, resume = [], None
    try:
        for job in range(jobs):
            marks: list[float] = []
            started = time.perf_counter()
            result = engine.run_job(examples[job * 24:(job + 1) * 24], config,
                                    lambda *_, m=marks: m.append(time.perf_counter()), None, model_path=str(hero),
                                    checkpoint_dir=work / f"r{ranks}" / f"job{job}", resume_from=resume,
                                    run_id=f"job{job}")
            assert result.status == "completed", result
            step_s = statistics.median(b - a for a, b in zip(marks[1:], marks[2:])) if len(marks) > 2 else 0.0
            rows.append({"job": job + 1, "first_step_after_s": round(marks[0] - started, 3),
                         "step_s": round(step_s, 3), "gap_s": round(marks[0] - started - step_s, 3),
                         "run_job_s": round(time.perf_counter() - started, 3)})
            resume = Path(result.checkpoint_path)
    finally:
        if ranks > 1:
            engine.close()
    warm = [r["gap_s"] for r in rows[1:]]
    return {"ranks": ranks, "device": device, "cold_gap_s": rows[0]["gap_s"],
            "warm_gap_median_s": round(statistics.median(warm), 3) if warm else None,
            "warm_gap_max_s": max(warm) if warm else None, "jobs": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", default="1,2", help="widths to measure, comma-separated (default 1,2)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--jobs", type=int, default=4, help="jobs per width, the first one cold (default 4)")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per job (default 4)")
    args = parser.parse_args()
    import torch

    from heroes.materialise import ensure_model
    from heroes.profile import load_hero

    torch.set_num_threads(max(1, (os.cpu_count() or 1)))
    work = Path(tempfile.mkdtemp(prefix="guild-gang-gap-"))
    hero = Path(ensure_model(load_hero("tiny-qwen3"), work / "home"))
    load = os.getloadavg()[0]
    results = [measure(int(n), args.device, args.jobs, hero, work, args.steps) for n in args.ranks.split(",")]
    for r in results:
        print(f"{r['ranks']} rank(s) on {r['device']}: cold start {r['cold_gap_s']:.2f} s, warm gap median "
              f"{r['warm_gap_median_s']:.2f} s (max {r['warm_gap_max_s']:.2f} s) over {args.jobs - 1} jobs")
    print(json.dumps({"date": time.strftime("%Y-%m-%d"), "load_1min_at_start": load, "results": results}, indent=1))


if __name__ == "__main__":
    main()
