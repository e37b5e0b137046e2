"""GPU benchmark, one command for the device machine: Guild's engine on the Qwen3-0.6B architecture against the
Hugging Face Trainer anchor, nothing downloaded.

    OUT=/some/dir python bench/gpu.py            # on a CUDA machine: everything below, ~6-8 minutes on an H200
    python bench/gpu.py --smoke                  # a tiny configuration on the CPU (what the CPU machine runs)

What it does, in order, writing ``$OUT/gpu.json`` after each part (so a run cut short keeps what it measured):

1. the device: name, torch, the spec dense bf16 peak (table below) and a measured bf16 matmul ceiling;
2. correctness in bf16: per-example losses of a packed micro-batch against each example alone, on every attention
   path that runs on the device (flash variable-length, flex, per-document, dense mask);
3. throughput at max_length 2048 and 4096: ``TrainerEngine.run_job`` exactly as a worker runs it (fp32 master
   weights, bf16 autocast, fused AdamW, document attention, chunked or fused cross-entropy, compiled decoder
   layers), on synthetic SFT data shaped like the anchor's (lognormal lengths, median ~350 tokens, loss on every
   token), 8,192 token slots per step (``--tokens-per-step``); useful (non-pad) tokens/s over the steps after
   the warmup ones, MFU (6·N·tokens/s) against the spec peak and against the measured ceiling, peak memory;
4. ``bench/hf_trainer_anchor.py`` (the shared anchor, unchanged) in a subprocess: ``$OUT/gpu_anchor.json``; the
   ratio against its runs lands in ``gpu.json``.

LoRA and QLoRA (issue 14): ``--finetune lora,qlora`` (or ``FINETUNE=lora,qlora``) trains a rank-16 adapter on every
projection over the frozen base (QLoRA: a 4-bit NF4 base through bitsandbytes, CUDA only; skipped with a note
elsewhere) instead of full tuning; each run then records the trainable parameters and heroes/memory.py's estimate
beside the measured peak (MFU still counts 6·N over all parameters: compare tok/s and memory). The one command:

    OUT=/some/dir python bench/gpu.py --finetune lora,qlora --seqs 2048 --no-anchor --no-check   # ~3 min on an H200

writes ``$OUT/gpu-lora-qlora.json`` (``gpu.json`` is full tuning's). ``--finetune full,lora,qlora`` measures all three.

Random-initialised weights (same shapes and FLOPs as Qwen/Qwen3-0.6B); the tokenizer saved beside them is the tiny
hero's (only checkpoints need one). Targets (issue 10): >= 110k useful tok/s at <= 40 GiB on one H200.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

# Dense (no sparsity) bf16 tensor-core peaks from the vendors' data sheets, TFLOP/s; matched by substring.
SPEC_BF16_TFLOPS = {
    "H200": 989.4,
    "H100 SXM": 989.4,
    "H100 80GB HBM3": 989.4,
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "H100": 989.4,
    "GH200": 989.4,
    "B200": 2250.0,
    "A100": 312.0,
    "L40S": 362.1,
    "A10G": 70.0,
    "L4": 121.0,
}
TARGET_TOK_S = 110_000
TARGET_GIB = 40.0
# Token slots per step. Measured on the CPU with this architecture under bf16 autocast (saved-tensor hooks, eager):
# activations take 2.2 MiB per token (81 KiB per token per layer) plus ~1.4 GiB of weight casts and loss buffers;
# with the 8.9 GiB of fp32 weights, gradients and AdamW state, 16,384 tokens a step would peak near 47 GiB,
# 8,192 near 28 GiB. Compiled layers save less (the partitioner recomputes elementwise ops).
TOKENS_PER_STEP = 8_192


def qwen3_06b_config(smoke: bool):
    from transformers import Qwen3Config

    if smoke:
        return Qwen3Config(
            vocab_size=4096,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            tie_word_embeddings=True,
            max_position_embeddings=4096,
        )
    return Qwen3Config(
        vocab_size=151936,
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=40960,
        rope_theta=1e6,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
    )


def spec_peak(name: str) -> float | None:
    for key, tflops in SPEC_BF16_TFLOPS.items():
        if key in name:
            return tflops
    return None


def matmul_ceiling_tflops(cuda: bool) -> float | None:
    """The best of several bf16 8192^3 matmuls: what this GPU delivers on the friendliest shape."""
    if not cuda:
        return None
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    best = 0.0
    for _ in range(5):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(20):
            a @ b
        torch.cuda.synchronize()
        best = max(best, 2 * n**3 * 20 / (time.perf_counter() - t0) / 1e12)
    del a, b
    torch.cuda.empty_cache()
    return best


def build_model_dir(work: Path, smoke: bool) -> Path:
    """Random-init Qwen3-0.6B (fp32 on disk, as a fine-tuning checkpoint would load) with the tiny hero's tokenizer."""
    from transformers import AutoTokenizer, Qwen3ForCausalLM

    from heroes.materialise import ensure_model
    from heroes.profile import load_hero

    tiny = ensure_model(load_hero("tiny-qwen3"), work / "home")
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(qwen3_06b_config(smoke))
    path = work / "qwen3-0.6b-random"
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny).save_pretrained(path)
    return path


def synthetic(n: int, seq: int, vocab: int, seed: int = 0):
    """The anchor's workload as tokenised examples: lognormal lengths (median 350, sigma 0.8) clipped to
    [32, seq], random ids, a target on every token but each example's last."""
    from engine.tokenize import IGNORE_INDEX, TokenizedExample

    rng = random.Random(seed)
    out = []
    for i in range(n):
        length = max(32, min(seq, int(rng.lognormvariate(math.log(350), 0.8))))
        ids = [rng.randrange(1, vocab) for _ in range(length)]
        out.append(TokenizedExample(ids, ids[1:] + [IGNORE_INDEX], i + 1, False))
    return out


def prepared(examples, seq: int):
    from engine.dataset import PreparedDataset
    from engine.packing import pack_best_fit

    return PreparedDataset(
        train=examples,
        val=[],
        rows=pack_best_fit([len(e) for e in examples], seq),
        val_rows=[],
        row_length=seq,
        packed=True,
        pad_id=0,
        num_examples=len(examples),
        num_truncated=0,
        num_dropped=0,
        fingerprint=f"bench-{seq}-{len(examples)}",
    )


# ------------------------------------------------------------------------------------------------ correctness


def correctness(model_path: Path, device: torch.device, smoke: bool, bf16: bool) -> dict:
    """Per-example losses, packed against each example alone (one row, one causal pass), in fp32 or under bf16
    autocast (the engine's precision on a GPU). ``leak_contrast_max_abs_diff`` is what a leak looks like: the same
    rows read as one sequence each."""
    from transformers import AutoModelForCausalLM

    from engine.attention import AttentionPath, flash_varlen_available, install, layout_for
    from engine.loss import per_example_losses
    from engine.packing import collate, pack_best_fit

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).to(device).eval()
    install(model, packed=True)
    seq = 256 if smoke else 2048
    examples = synthetic(64, seq, model.config.vocab_size, seed=1)
    rows = [row for row in pack_best_fit([len(e) for e in examples], seq) if len(row) > 1][:4]  # several per row
    picked = sorted(i for row in rows for i in row)
    cuda = device.type == "cuda"
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    paths = [AttentionPath.PER_DOCUMENT, AttentionPath.SDPA_DENSE, AttentionPath.FLEX]
    if bf16 and flash_varlen_available(device):  # flash kernels take bf16/fp16 only
        paths.insert(0, AttentionPath.FLASH_VARLEN)

    def losses(batch_rows, path):
        batch = collate(batch_rows, examples, 0, seq if path is AttentionPath.FLEX else None)
        batch.layout = layout_for(
            path,
            batch.documents,
            batch.input_ids.shape[1],
            batch.example_index,
            compiled=cuda and path is AttentionPath.FLEX,
        )
        with torch.no_grad(), autocast:
            return per_example_losses(model, batch.to(device))

    report = {"precision": "bf16 autocast" if bf16 else "fp32", "examples": len(picked), "rows": len(rows)}
    alone = {}
    for i in picked:  # the reference: one example per row, per-document attention (one causal SDPA call)
        alone.update(losses([[i]], AttentionPath.PER_DOCUMENT))
    for path in paths:
        try:
            packed = losses(rows, path)
            worst = max(abs(packed[i] - alone[i]) for i in picked)
            report[path.value] = {"max_abs_diff": worst, "mean_loss": sum(packed.values()) / len(packed)}
        except Exception as exc:  # noqa: BLE001 - a path that cannot run here is reported, the bench goes on
            report[path.value] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
    # bf16 rounding differs between batch shapes and kernels; fp32 must agree closely (TF32 is off by default).
    # On the CPU smoke model bf16 noise is ~1e-4 and a leak ~7e-3.
    tolerance = 5e-3 if bf16 else (1e-4 if cuda else 1e-5)
    diffs = [v["max_abs_diff"] for v in report.values() if isinstance(v, dict) and "max_abs_diff" in v]
    # The contrast: the same rows read as one sequence each (what a leak looks like), to show the check can fail.
    batch = collate(rows, examples, 0)
    batch.documents = tuple((sum(r),) for r in batch.documents)
    with torch.no_grad(), autocast:
        leaked = per_example_losses(model, batch.to(device))
    report["leak_contrast_max_abs_diff"] = max(abs(leaked[i] - alone[i]) for i in picked)
    report["tolerance"] = tolerance
    report["ok"] = bool(diffs) and max(diffs) <= tolerance
    report["discriminating"] = report["leak_contrast_max_abs_diff"] > 2 * tolerance  # else a leak could pass
    if cuda:
        torch.cuda.empty_cache()
    return report


# ------------------------------------------------------------------------------------------------- throughput


ADAPTER = {"lora_rank": 16, "lora_alpha": 32, "lora_dropout": 0.0}  # every projection (the schema's default targets)


def throughput(model_path: Path, seq: int, args, work: Path, ceiling: float | None, peak: float | None,
               finetune: str = "full") -> dict:
    from config.schema import DataConfig, FinetuneConfig, Hyperparams, TrainerConfig
    from engine.trainer import TrainerEngine
    from heroes.memory import GIB, ModelShape, estimate_memory

    cuda = torch.cuda.is_available()
    rows = max(1, args.tokens_per_step // seq) if not args.smoke else 2
    steps = args.warmup + args.steps
    vocab = qwen3_06b_config(args.smoke).vocab_size
    # Enough examples for every step, at ~1.05 slots per useful token (best-fit packing) and a margin.
    data = prepared(synthetic(int(rows * seq * steps / 380 * 1.3) + 50, seq, vocab, seed=seq), seq)
    config = TrainerConfig(
        hyperparams=Hyperparams(
            max_length=seq,
            batch_size=rows,
            max_steps=steps,
            learning_rate=1e-4,
            warmup_steps=0,
            precision="bf16" if cuda else "fp32",
            eval_fraction=0.0,
            save_steps=10**9,
            seed=0,
            attention=args.attention,
            loss_kernel=args.loss_kernel,
        ),
        data=DataConfig(enable_packing=True),
        finetune=FinetuneConfig(mode=finetune, **(ADAPTER if finetune != "full" else {})),
    )
    estimate = estimate_memory(ModelShape.from_hf_config(json.loads((model_path / "config.json").read_text())), config)
    engine = TrainerEngine(compile=args.compile)
    marks: list[float] = []
    tokens: list[int] = []
    from engine.batches import DataOrder

    order = DataOrder(len(data.rows), rows, 0)

    def on_progress(step, *rest):
        marks.append(time.perf_counter())
        tokens.append(sum(len(data.train[i]) for r in order.micro_batch(step - 1) for i in data.rows[r]))

    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    checkpoints = Path(tempfile.mkdtemp(prefix="ckpt-", dir=_scratch(work)))
    started = time.perf_counter()
    try:
        result = engine.run_job(
            data, config, on_progress, model_path=str(model_path), checkpoint_dir=checkpoints, run_id=f"bench-{seq}"
        )
    finally:
        shutil.rmtree(checkpoints, ignore_errors=True)
    total_s = time.perf_counter() - started
    n_params = sum(p.numel() for p in engine._model.parameters())
    trainable = sum(p.numel() for p in engine._model.parameters() if p.requires_grad)
    if finetune != "full":  # the base's parameters (4-bit ones are packed two to a byte; the adapter is tiny)
        n_params = ModelShape.from_hf_config(json.loads((model_path / "config.json").read_text())).parameters()
    w = min(args.warmup, len(marks) - 1)
    timed_s = marks[-1] - marks[w - 1] if w >= 1 else total_s
    useful = sum(tokens[w:])
    tok_s = useful / timed_s
    slots = (len(marks) - w) * rows * seq
    flops = 6 * n_params * tok_s / 1e12
    peak_gib = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    report = {
        "finetune": finetune,
        "seq": seq,
        "rows_per_step": rows,
        "steps_timed": len(marks) - w,
        "warmup_steps": w,
        "status": result.status,
        "error": result.error,
        "attention": result.attention,
        "loss_kernel": result.loss_kernel,
        "compile": args.compile,
        "params": n_params,
        "trainable_params": trainable,
        "useful_tok_s": round(tok_s, 1),
        "pad_fraction": round(1 - useful / slots, 4),
        "step_s": round(timed_s / (len(marks) - w), 4),
        "mfu_6N_vs_spec": round(flops / peak, 4) if peak else None,
        "mfu_6N_vs_measured_matmul": round(flops / ceiling, 4) if ceiling else None,
        "peak_mem_gib": round(peak_gib, 2) if peak_gib is not None else None,
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2) if cuda else None,
        "estimated_mem_gib": round(estimate.total / GIB, 2),  # heroes/memory.py, for calibration
        "first_loss": result.loss_history[0][1] if result.loss_history else None,
        "final_loss": result.final_loss,
        "setup_s": round(result.setup_s, 1),
        "total_s": round(total_s, 1),
        "warnings": result.warnings,
    }
    if cuda and finetune == "full":
        report["meets_target"] = tok_s >= TARGET_TOK_S and peak_gib <= TARGET_GIB
    del engine
    if cuda:
        torch.cuda.empty_cache()
    return report


def _scratch(work: Path) -> Path:
    """Checkpoints go to RAM when there is a tmpfs (a 0.6B checkpoint with its optimizer is ~7 GB)."""
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else work


# ------------------------------------------------------------------------------------------------- the anchor


def run_anchor(out: Path, smoke: bool, steps: int) -> dict:
    env = {**os.environ, "OUT": str(out), "STEPS": str(steps)}
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "hf_trainer_anchor.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    report = {
        "returncode": done.returncode,
        "seconds": round(time.perf_counter() - started, 1),
        "tail": (done.stdout + done.stderr)[-3000:],
    }
    anchor_file = out / "gpu_anchor.json"
    if done.returncode == 0 and anchor_file.exists():
        report["result"] = json.loads(anchor_file.read_text())
    return report


# ------------------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny CPU configuration (default when there is no GPU)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per length (default 30; smoke 3)")
    parser.add_argument("--warmup", type=int, default=None, help="steps left out (default 8, compile included)")
    parser.add_argument("--seqs", default=None, help="max_length values, comma-separated (default 2048,4096)")
    parser.add_argument("--tokens-per-step", type=int, default=TOKENS_PER_STEP, help="token slots per step")
    parser.add_argument("--attention", default="auto")
    parser.add_argument("--loss-kernel", default="auto")
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--no-anchor", dest="anchor", action="store_false")
    parser.add_argument("--no-check", dest="check", action="store_false", help="skip the correctness check")
    parser.add_argument("--finetune", default=os.environ.get("FINETUNE", "full"),
                        help="full, lora, qlora or a comma-separated list (default full; env FINETUNE)")
    args = parser.parse_args()
    finetunes = [f.strip() for f in args.finetune.split(",") if f.strip()]
    unknown = [f for f in finetunes if f not in ("full", "lora", "qlora")]
    if unknown or not finetunes:
        parser.error(f"--finetune {args.finetune!r}: use full, lora, qlora or a comma-separated list of them")
    cuda = torch.cuda.is_available()
    args.smoke = args.smoke or not cuda
    args.steps = args.steps or (3 if args.smoke else 30)
    args.warmup = args.warmup or (1 if args.smoke else 8)
    args.compile = args.compile and cuda
    seqs = [int(s) for s in (args.seqs or ("256" if args.smoke else "2048,4096")).split(",")]
    out = Path(os.environ.get("OUT") or tempfile.mkdtemp(prefix="guild-gpu-out-"))
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if cuda else "cpu")

    name = torch.cuda.get_device_name() if cuda else "cpu"
    peak = spec_peak(name) if cuda else None
    report: dict = {
        "date": time.strftime("%Y-%m-%d"),
        "device": name,
        "torch": torch.__version__,
        "smoke": args.smoke,
        "capability": list(torch.cuda.get_device_capability()) if cuda else None,
        "spec_bf16_tflops": peak,
        "targets": {"useful_tok_s": TARGET_TOK_S, "peak_gib": TARGET_GIB},
    }
    import transformers

    report["transformers"] = transformers.__version__

    report["finetune"] = finetunes
    report_name = "gpu.json" if finetunes == ["full"] else f"gpu-{'-'.join(finetunes)}.json"

    def write() -> None:
        (out / report_name).write_text(json.dumps(report, indent=1, default=str))

    report["measured_matmul_tflops"] = ceiling = matmul_ceiling_tflops(cuda)
    print(f"{name}: spec bf16 {peak} TFLOP/s, measured matmul {ceiling and round(ceiling)} TFLOP/s", flush=True)
    write()
    work = Path(tempfile.mkdtemp(prefix="guild-gpu-bench-"))
    try:
        model_path = build_model_dir(work, args.smoke)
        if args.check:
            report["correctness"] = []
            for bf16 in [False, True] if cuda else [False]:
                report["correctness"].append(check := correctness(model_path, device, args.smoke, bf16))
                print(
                    f"correctness (packed vs alone, {check['precision']}): "
                    + ", ".join(
                        f"{k} {v.get('max_abs_diff', v.get('error'))}" for k, v in check.items() if isinstance(v, dict)
                    )
                    + f", leak would be {check['leak_contrast_max_abs_diff']:.3g}"
                    + f" -> {'ok' if check['ok'] else 'FAILED'}",
                    flush=True,
                )
                write()
        report["runs"] = []
        for finetune in finetunes:
            for seq in seqs:
                if finetune == "qlora" and not cuda:
                    run = {"finetune": finetune, "seq": seq, "skipped": "QLoRA needs CUDA and bitsandbytes"}
                else:
                    try:
                        run = throughput(model_path, seq, args, work, ceiling, peak, finetune)
                    except Exception as exc:  # noqa: BLE001 - keep the other runs and the anchor
                        run = {"finetune": finetune, "seq": seq, "error": f"{type(exc).__name__}: {exc}"[:2000]}
                report["runs"].append(run)
                print(json.dumps(run), flush=True)
                write()
        if args.anchor:
            report["anchor"] = anchor = run_anchor(out, args.smoke, 10 if args.smoke else 30)
            hf = {r["name"]: r["useful_tok_s"] for r in anchor.get("result", {}).get("runs", [])}
            for run in report["runs"]:
                if "useful_tok_s" in run and hf:
                    run["ratio_vs_hf"] = {k: round(run["useful_tok_s"] / v, 2) for k, v in hf.items() if v}
            print(f"anchor: rc {anchor['returncode']} in {anchor['seconds']} s: {hf}", flush=True)
            write()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary = [
        f"{r['finetune']} seq {r['seq']}: {r['useful_tok_s']:.0f} useful tok/s, MFU {r['mfu_6N_vs_spec']} of spec / "
        f"{r['mfu_6N_vs_measured_matmul']} of measured, peak {r['peak_mem_gib']} GiB"
        if "useful_tok_s" in r
        else f"{r['finetune']} seq {r['seq']}: {r.get('error') or r.get('skipped')}"
        for r in report["runs"]
    ]
    print(f"gpu bench ({name}): " + "; ".join(summary) + f". Written to {out / report_name}")
    failed = [r for r in report["runs"] if r.get("status") != "completed" and "skipped" not in r]
    if failed or (args.check and not all(c["ok"] for c in report["correctness"])):
        sys.exit(1)


if __name__ == "__main__":
    main()
