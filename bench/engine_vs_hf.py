"""Wall-clock useful tokens per second: a real Guild job against the Hugging Face Trainer, same model, data,
max_length and threads.

Both train the tiny hero (fp32, this machine's CPU or GPU) once over the first N examples of chat_bench.jsonl,
loss on assistant tokens only, tokenised beforehand by the same code (tokenising is left out of both figures):

* HF: ``from_pretrained`` + ``Trainer`` with its defaults + ``train()``: batches of 8 examples in random order,
  padded to the longest;
* Guild: ``TrainerEngine.run_job`` as a worker runs it: model load, examples packed into rows of max_length
  tokens, 8 rows a step, document attention, chunked cross-entropy, and the final checkpoint written.

The headline is what a user waits for: useful (non-pad) tokens over the wall time of the whole call. Runs
alternate (HF, Guild, Guild, HF, ...: the order flips every round) so that whatever else the machine does falls
on both; each round gives a ratio, reported with the load average. Steady-state rates (first steps left out) and
tokens per CPU-second are printed as secondary figures.

    .venv/bin/python bench/engine_vs_hf.py [--examples 800] [--max-length 2048] [--rounds 2] [--threads N]

Prints a table and a one-line summary, then the figures as one JSON object on the last line.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# The bench data: the repo's copy (bench/data), else the shared data set beside the repo.
DATA_CANDIDATES = (REPO / "bench" / "data" / "chat_bench.jsonl", REPO.parent / "shared" / "data" / "chat_bench.jsonl")
WARMUP_STEPS = 2  # left out of the steady-state figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=800, help="first N examples of the bench data")
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=8, help="HF: examples per batch; Guild: rows per step")
    parser.add_argument("--rounds", type=int, default=2, help="HF/Guild pairs, run alternately")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--attention", default="auto", help="Guild's hyperparams.attention")
    parser.add_argument("--no-hf", action="store_true", help="Guild runs only")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")

    import torch

    from config.settings import Settings
    from engine.formats import read_examples
    from heroes.materialise import ensure_model
    from heroes.profile import load_hero

    if args.threads:
        torch.set_num_threads(args.threads)
    data_path = args.data or next((p for p in DATA_CANDIDATES if p.exists()), None)
    if data_path is None:
        sys.exit(f"no bench data: put chat_bench.jsonl at one of {[str(p) for p in DATA_CANDIDATES]}")
    home = Settings.from_env().guild_home
    model_path = ensure_model(load_hero("tiny-qwen3", home), home)
    examples = read_examples(data_path)[: args.examples]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    setup = {
        "examples": len(examples),
        "max_length": args.max_length,
        "batch_size": args.batch_size,
        "device": device,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
    }
    print(
        f"{len(examples)} examples of {data_path.name}, max_length {args.max_length}, batch {args.batch_size}, "
        f"{device}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        flush=True,
    )

    # Rounds alternate their order (HF then Guild, Guild then HF, ...): neither side always runs first in the
    # process (a first run can pay for cold caches) or always meets the same moment of the machine's load.
    runs: list[dict] = []
    for round_ in range(args.rounds):
        order = [bench_hf, bench_engine] if round_ % 2 == 0 else [bench_engine, bench_hf]
        for bench in order:
            if bench is bench_hf and args.no_hf:
                continue
            runs.append(timed(bench, model_path, examples, args))

    print(
        f"\n{'run':8} {'wall tok/s':>11} {'wall s':>7} {'steady tok/s':>13} {'per CPU s':>10} {'pad %':>6} "
        f"{'steps':>6} {'load 1m':>12}"
    )
    for r in runs:
        print(
            f"{r['name']:8} {r['wall_tok_s']:11.0f} {r['wall_s']:7.1f} {r['steady_tok_s']:13.0f} "
            f"{r['cpu_tok_s']:10.0f} {100 * r['pad_fraction']:6.1f} {r['steps']:6d} "
            f"{r['load_before']:5.1f}-{r['load_after']:<5.1f}"
        )
    guild = [r for r in runs if r["name"] == "guild"]
    hf = [r for r in runs if r["name"] == "hf"]
    pairs = [g["wall_tok_s"] / h["wall_tok_s"] for h, g in zip(hf, guild)]
    loads = [r["load_before"] for r in runs] + [r["load_after"] for r in runs]
    summary = {
        "guild_wall_tok_s": round(statistics.median(r["wall_tok_s"] for r in guild)),
        "hf_wall_tok_s": round(statistics.median(r["wall_tok_s"] for r in hf)) if hf else None,
        "ratio": round(statistics.median(pairs), 2) if pairs else None,
        "pair_ratios": [round(p, 2) for p in pairs],
        "load_1m": [round(min(loads), 1), round(max(loads), 1)],
    }
    if pairs:
        print(
            f"\nengine_vs_hf: wall-clock useful tok/s Guild {summary['guild_wall_tok_s']} vs HF "
            f"{summary['hf_wall_tok_s']} = {summary['ratio']}x (pairs {', '.join(f'{p:.2f}x' for p in pairs)}; "
            f"load 1m {summary['load_1m'][0]}-{summary['load_1m'][1]} on {os.cpu_count()} CPUs; "
            f"{setup['threads']} threads, {len(examples)} examples, max_length {args.max_length}, {device})"
        )
    else:
        print(f"\nengine_vs_hf: Guild {summary['guild_wall_tok_s']} wall-clock useful tok/s (no HF run)")
    figures = {**setup, "summary": summary, "runs": runs, "date": time.strftime("%Y-%m-%d")}
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))
    print(json.dumps(figures))


def timed(bench, *args) -> dict:
    """Run one bench; note the machine's load around it, since other processes' work shows in wall-clock figures."""
    before = os.getloadavg()[0]
    figures = bench(*args)
    figures["load_before"], figures["load_after"] = before, os.getloadavg()[0]
    print(
        f"  {figures['name']}: {figures['wall_tok_s']:.0f} useful tok/s wall clock ({figures['wall_s']:.1f} s), "
        f"load {before:.1f}",
        flush=True,
    )
    return figures


def figures_of(
    name: str, wall_s: float, ends: list[tuple[float, float]], tokens: list[int], slots: list[int], cpu_s: float
) -> dict:
    """Wall-clock and steady-state figures from per-step (wall, process CPU) end times and token counts."""
    useful = sum(tokens)
    warm = max(1, min(WARMUP_STEPS, len(ends) - 1))
    steady_tokens = sum(tokens[warm : len(ends)])
    steady_s = ends[-1][0] - ends[warm - 1][0] if len(ends) > warm else float("nan")
    return {
        "name": name,
        "useful_tokens": useful,
        "wall_s": wall_s,
        "wall_tok_s": useful / wall_s,
        "steady_tok_s": steady_tokens / steady_s if steady_s > 0 else float("nan"),
        "cpu_tok_s": useful / cpu_s if cpu_s > 0 else float("nan"),
        "pad_fraction": 1 - useful / sum(slots),
        "steps": len(ends),
    }


def clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def bench_hf(model_path: str, examples, args) -> dict:
    import torch
    from torch.utils.data import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

    from engine.tokenize import IGNORE_INDEX, tokenize_examples

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    tokenized = tokenize_examples(examples, tokenizer, args.max_length).examples
    pad_id = tokenizer.pad_token_id
    # HF shifts labels itself: label t is the token at t when it is learnt; our targets are already shifted.
    rows = [{"input_ids": e.input_ids, "labels": [IGNORE_INDEX] + e.targets[:-1]} for e in tokenized]
    seen: list[tuple[int, int]] = []

    class Rows(Dataset):
        def __len__(self):
            return len(rows)

        def __getitem__(self, i):
            return rows[i]

    def pad_collate(batch):
        width = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, b in enumerate(batch):
            n = len(b["input_ids"])
            ids[i, :n] = torch.tensor(b["input_ids"])
            labels[i, :n] = torch.tensor(b["labels"])
            mask[i, :n] = 1
        seen.append((int(mask.sum()), ids.numel()))
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    ends: list[tuple[float, float]] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *a, **k):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            ends.append(clock())

    out = Path(tempfile.mkdtemp(prefix="bench-hf-"))
    started, cpu_started = clock()
    try:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        training_args = TrainingArguments(
            output_dir=str(out),
            per_device_train_batch_size=args.batch_size,
            num_train_epochs=1,
            use_cpu=not torch.cuda.is_available(),
            save_strategy="no",
            report_to=[],
            logging_steps=10**9,
            disable_tqdm=True,
            remove_unused_columns=False,
            dataloader_num_workers=0,
        )
        trainer = Trainer(
            model=model, args=training_args, train_dataset=Rows(), data_collator=pad_collate, callbacks=[Clock()]
        )
        trainer.train()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall_s, cpu_s = (a - b for a, b in zip(clock(), (started, cpu_started)))
    finally:
        shutil.rmtree(out, ignore_errors=True)
    seen = seen[: len(ends)]
    return figures_of("hf", wall_s, ends, [u for u, _ in seen], [s for _, s in seen], cpu_s)


def bench_engine(model_path: str, examples, args) -> dict:
    from config.schema import DataConfig, Hyperparams, TrainerConfig
    from engine.batches import DataOrder
    from engine.trainer import TrainerEngine

    config = TrainerConfig(
        hyperparams=Hyperparams(
            max_length=args.max_length,
            batch_size=args.batch_size,
            epochs=1.0,
            learning_rate=5e-5,
            lr_scheduler="linear",
            warmup_steps=0,
            save_steps=10**9,
            eval_fraction=0.0,
            seed=42,
            attention=args.attention,
        ),
        data=DataConfig(enable_packing=True),
    )
    engine = TrainerEngine()
    data = engine.prepare(examples, config, model_path=model_path)  # tokenising: outside the figure, as for HF
    order = DataOrder(len(data.rows), config.hyperparams.batch_size, config.hyperparams.seed)
    ends: list[tuple[float, float]] = []

    def on_progress(step, *rest):
        ends.append(clock())

    checkpoints = Path(tempfile.mkdtemp(prefix="bench-engine-"))
    started, cpu_started = clock()
    try:
        result = engine.run_job(
            data, config, on_progress, model_path=model_path, checkpoint_dir=checkpoints, run_id="bench"
        )
        wall_s, cpu_s = (a - b for a, b in zip(clock(), (started, cpu_started)))
    finally:
        shutil.rmtree(checkpoints, ignore_errors=True)
    if result.status != "completed":
        sys.exit(f"the Guild run ended {result.status}: {result.error}")
    tokens = [sum(len(data.train[i]) for r in order.micro_batch(s) for i in data.rows[r]) for s in range(len(ends))]
    slots = [len(order.micro_batch(s)) * data.row_length for s in range(len(ends))]
    figures = figures_of("guild", wall_s, ends, tokens, slots, cpu_s)
    assert figures["useful_tokens"] == result.trained_tokens
    figures["attention"] = result.attention
    return figures


if __name__ == "__main__":
    main()
