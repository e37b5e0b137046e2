"""GPU benchmark for the device machine: our engine on the Qwen3-0.6B architecture (random init, no download).

bf16, max_length 2048, chat_bench-shaped data (the shipped chat_bench examples, tokenised by the tiny hero's
tokenizer so nothing is downloaded; lengths scaled to a real-SFT median of about 350 tokens). Prints and writes
``$OUT/gpu.json``: useful (non-pad) tokens/s over the timed steps, MFU by 6·N·tokens against a bf16 matmul
measured in the same run, and peak GPU memory. Run beside ../shared/bench/hf_trainer_anchor.py (copied into a
git-ignored folder and carried) for the side-by-side ratio:

    STEPS=30 python bench/gpu.py ; STEPS=30 python .anchor/hf_trainer_anchor.py

``FINETUNE=lora`` (or ``qlora``: needs bitsandbytes) trains a rank-16 adapter on every projection instead, for the
LoRA/QLoRA figures of bench/RESULTS.md (MFU then still counts 6·N over all parameters: compare tokens/s and memory):

    FINETUNE=lora STEPS=30 python bench/gpu.py ; FINETUNE=qlora STEPS=30 python bench/gpu.py

Without CUDA it runs a tiny smoke configuration so the script itself stays tested on a CPU machine.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from config.layers import Layer, resolve  # noqa: E402
from engine.formats import Example  # noqa: E402
from engine.trainer import TrainerEngine  # noqa: E402

CUDA = torch.cuda.is_available()
OUT = Path(os.environ.get("OUT", tempfile.gettempdir()))
STEPS = int(os.environ.get("STEPS", "30" if CUDA else "4"))
WARM = 8 if CUDA else 1
SEQ = 2048 if CUDA else 256
COMPILE = os.environ.get("COMPILE", "1" if CUDA else "0") == "1"
FINETUNE = os.environ.get("FINETUNE", "full")


def matmul_tflops() -> float:
    if not CUDA:
        return float("nan")
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    iters = 50
    for _ in range(iters):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * iters / (time.perf_counter() - t0) / 1e12


def build_model_dir(target: Path) -> Path:
    """Random-init Qwen3-0.6B (same shapes and FLOPs as the real one) with the tiny hero's tokenizer."""
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    from heroes.materialise import ensure_model
    from heroes.profile import load_hero

    tiny = ensure_model(load_hero("tiny-qwen3"), target / "home")
    if CUDA:
        config = Qwen3Config(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                             num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                             rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True)
    else:
        config = Qwen3Config(vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config).to(torch.bfloat16 if CUDA else torch.float32)
    path = target / "qwen3-0.6b-random"
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny).save_pretrained(path)
    return path


def examples(n: int) -> list[Example]:
    """chat_bench rows, repeated to scale: the tiny tokenizer is coarser than Qwen's, lengths stay SFT-like."""
    text = (REPO / "bench" / "data" / "chat_bench.jsonl").read_text()
    rows = [json.loads(line) for line in text.splitlines() if line]
    rng = random.Random(0)
    out = []
    for i in range(n):
        row = rows[i % len(rows)]
        msgs = tuple((m["role"], m["content"]) for m in row["messages"])
        out.append(Example(format="messages", line=i + 1, messages=msgs))
    rng.shuffle(out)
    return out


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="guild-gpu-bench-"))
    try:
        model_path = build_model_dir(work)
        batch = int(os.environ.get("BATCH", "8" if CUDA else "2"))
        sets = {"max_length": str(SEQ), "batch_size": str(batch), "max_steps": str(STEPS + WARM),
                "precision": "bf16" if CUDA else "fp32", "eval_fraction": "0", "save_steps": "100000",
                "learning_rate": "1e-4", "warmup_steps": "0", "finetune": FINETUNE}
        config = resolve([Layer("cli", sets, "bench", from_text=True)]).config
        engine = TrainerEngine(compile=COMPILE)
        marks: list[tuple[float, int]] = []
        tokens_at: list[float] = []

        def on_progress(step, total, loss, lr, tps, eta):
            if CUDA:
                torch.cuda.synchronize()
            marks.append((time.perf_counter(), step))
            tokens_at.append(tps)

        data = examples(4000 if CUDA else 200)
        t0 = time.perf_counter()
        result = engine.run_job(data, config, on_progress, model_path=str(model_path),
                                checkpoint_dir=work / "ckpt", run_id="gpu-bench")
        total_s = time.perf_counter() - t0
        n_params = sum(p.numel() for p in engine._model.parameters()) if engine._model is not None else 0
        # useful tokens over the timed (post-warmup) steps: trained_tokens spread evenly is close enough only if
        # rows are full; the engine packs rows, so tokens per step is nearly constant.
        timed_steps = max(len(marks) - WARM, 1)
        timed_s = marks[-1][0] - marks[WARM - 1][0] if len(marks) > WARM else total_s
        tokens_per_step = result.trained_tokens / max(len(marks), 1)
        tps = tokens_per_step * timed_steps / timed_s
        peak = torch.cuda.max_memory_allocated() / 2**30 if CUDA else float("nan")
        ceiling = matmul_tflops()
        mfu = 6 * n_params * tps / (ceiling * 1e12) if CUDA else float("nan")
        trainable = sum(p.numel() for p in engine._model.parameters() if p.requires_grad) if engine._model else 0
        # heroes/memory.py's estimate for this very run, to calibrate it against the measured peak.
        from heroes.memory import GIB, ModelShape, estimate_memory

        shape = ModelShape.from_hf_config(json.loads((model_path / "config.json").read_text()))
        estimate = estimate_memory(shape, config).total / GIB
        report = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name() if CUDA else "cpu",
                  "finetune": FINETUNE, "trainable_params": trainable,
                  "torch": torch.__version__, "compile": COMPILE, "seq": SEQ, "batch_rows": batch,
                  "params": n_params, "steps_timed": timed_steps, "useful_tokens_per_sec": round(tps, 1),
                  "bf16_matmul_tflops": round(ceiling, 1) if CUDA else None,
                  "mfu_6N": round(mfu, 4) if CUDA else None, "peak_mem_gib": round(peak, 2) if CUDA else None,
                  "estimated_mem_gib": round(estimate, 2),
                  "final_loss": result.final_loss, "status": result.status,
                  "setup_s": round(result.setup_s, 1), "total_s": round(total_s, 1)}
        print(json.dumps(report))
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / ("gpu.json" if FINETUNE == "full" else f"gpu-{FINETUNE}.json")).write_text(json.dumps(report, indent=2))
        if not math.isfinite(result.final_loss or float("nan")):
            raise SystemExit("non-finite loss")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
