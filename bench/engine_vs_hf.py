"""Useful tokens per second: Guild's engine against the Hugging Face Trainer, same model, data and max_length.

Both train the tiny hero (fp32, this machine's CPU or GPU) on the first N examples of chat_bench.jsonl, with the
loss on assistant tokens only:

* HF: ``Trainer`` with its defaults: batches of 8 examples in random order, padded to the longest;
* ours: ``TrainerEngine.run_job``: examples packed into rows of max_length tokens, 8 rows per step.

"Useful" tokens are non-pad input tokens. Each figure is the steady state: tokens of the steps after the first
``--warmup`` ones over their wall time (the first steps pay one-off costs such as torch.compile's, reported apart).

    .venv/bin/python bench/engine_vs_hf.py [--examples 200] [--rounds 2] [--no-compile] [--no-hf]

Prints a table, then the figures as one JSON object on the last line.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# The bench data: the repo's copy (bench/data), else the shared data set beside the repo.
DATA_CANDIDATES = (REPO / "bench" / "data" / "chat_bench.jsonl", REPO.parent / "shared" / "data" / "chat_bench.jsonl")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=200, help="first N examples of the bench data")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the steady-state figure")
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="HF and eager engine runs alternate this many times; the best of each counts",
    )
    parser.add_argument("--no-compile", action="store_true", help="skip the engine run with torch.compile")
    parser.add_argument("--no-hf", action="store_true", help="skip the HF Trainer runs")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
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
    print(
        f"{len(examples)} examples of {data_path}, max_length {args.max_length}, batch {args.batch_size}, "
        f"{device}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        flush=True,
    )

    # Alternating runs share out whatever else the machine is doing; the best run of each kind is the figure.
    runs = []
    for _ in range(args.rounds):
        if not args.no_hf:
            runs.append(timed(bench_hf, model_path, examples, args))
        runs.append(timed(bench_engine, model_path, examples, args, compile=False))
    if not args.no_compile:
        runs.append(timed(bench_engine, model_path, examples, args, compile=True))

    best: dict[str, dict] = {}
    for r in runs:
        if r["name"] not in best or r["useful_tok_s"] > best[r["name"]]["useful_tok_s"]:
            best[r["name"]] = r
    hf = best.get("hf_trainer")
    print(
        f"\n{'run':18} {'useful tok/s':>13} {'per CPU s':>10} {'pad %':>6} {'steps':>6} {'step s':>7} "
        f"{'first s':>8} {'load':>5}"
    )
    for r in runs:
        print(
            f"{r['name']:18} {r['useful_tok_s']:13.0f} {r['useful_cpu_tok_s']:10.0f} {100 * r['pad_fraction']:6.1f} "
            f"{r['steps']:6d} {r['step_s']:7.3f} {r['first_steps_s']:8.1f} {r['load_avg']:5.1f}"
        )
    summary = {
        name: {
            "useful_tok_s": round(r["useful_tok_s"]),
            "ratio_vs_hf": round(r["useful_tok_s"] / hf["useful_tok_s"], 2) if hf else None,
        }
        for name, r in best.items()
    }
    print(
        "best: "
        + ", ".join(f"{name} {v['useful_tok_s']} tok/s ({v['ratio_vs_hf']}x HF)" for name, v in summary.items())
    )
    print(
        json.dumps(
            {
                "examples": len(examples),
                "max_length": args.max_length,
                "batch_size": args.batch_size,
                "device": device,
                "threads": torch.get_num_threads(),
                "best": summary,
                "runs": runs,
            }
        )
    )


def timed(bench, *args, **kwargs) -> dict:
    """Run one bench; note the machine's load, since other processes' work shows up in wall-clock figures."""
    figures = bench(*args, **kwargs)
    figures["load_avg"] = os.getloadavg()[0]
    print(f"  {figures['name']}: {figures['useful_tok_s']:.0f} useful tok/s", flush=True)
    return figures


def steady(
    name: str, ends: list[tuple[float, float]], tokens: list[int], slots: list[int], start: float, warmup: int
) -> dict:
    """Figures from per-step (wall, process CPU) end times and token counts, leaving out the first ``warmup`` steps.

    ``useful_cpu_tok_s`` is per second of this process's CPU time (all its threads): with one thread it is the
    figure that other processes on the machine disturb least.
    """
    warmup = max(1, min(warmup, len(ends) - 1))
    useful = sum(tokens[warmup:])
    seconds = ends[-1][0] - ends[warmup - 1][0]
    cpu_seconds = ends[-1][1] - ends[warmup - 1][1]
    return {
        "name": name,
        "useful_tok_s": useful / seconds,
        "useful_cpu_tok_s": useful / cpu_seconds,
        "pad_fraction": 1 - sum(tokens) / sum(slots),
        "steps": len(ends),
        "step_s": seconds / (len(ends) - warmup),
        "first_steps_s": ends[warmup - 1][0] - start,
        "useful_tokens": sum(tokens),
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
        start = time.perf_counter()
        trainer.train()
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return steady(
        "hf_trainer", ends, [u for u, _ in seen][: len(ends)], [s for _, s in seen][: len(ends)], start, args.warmup
    )


def bench_engine(model_path: str, examples, args, compile: bool) -> dict:
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
        ),
        data=DataConfig(enable_packing=True),
    )
    engine = TrainerEngine(compile=compile)
    prepared_at = time.perf_counter()
    data = engine.prepare(examples, config, model_path=model_path)
    prepare_s = time.perf_counter() - prepared_at
    order = DataOrder(len(data.rows), config.hyperparams.batch_size, config.hyperparams.seed)
    ends: list[tuple[float, float]] = []
    tokens: list[int] = []

    def on_progress(step, *rest):
        ends.append(clock())
        rows = order.micro_batch(step - 1)
        tokens.append(sum(len(data.train[i]) for r in rows for i in data.rows[r]))

    checkpoints = Path(tempfile.mkdtemp(prefix="bench-engine-"))
    try:
        start = time.perf_counter()
        result = engine.run_job(
            data, config, on_progress, model_path=model_path, checkpoint_dir=checkpoints, run_id="bench"
        )
        start += result.setup_s  # the loop's own start: model loading is not training
    finally:
        shutil.rmtree(checkpoints, ignore_errors=True)
    slots = [len(order.micro_batch(s)) * data.row_length for s in range(len(ends))]
    figures = steady("engine_compiled" if compile else "engine", ends, tokens, slots, start, args.warmup)
    figures["prepare_s"] = prepare_s
    return figures


if __name__ == "__main__":
    main()
