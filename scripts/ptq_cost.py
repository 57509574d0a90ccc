"""Calibration cost of one CBQ window at a real model's shapes (issues 5 and 11).

Builds a Llama model of SHAPE with two blocks of random weights (Hugging Face's init), draws
N random calibration windows of T tokens, and runs :func:`cbq_ptq.quantize` with K = 2, O = 1
and the setting's default recipe (cbq_ptq.config.recipe, unless --epochs / --steps): one
window of two blocks, CFP, the start (GPTQ), training, hardening. Prints and appends to OUT
(JSON lines) the window's wall time by phase and the peak GPU memory, and projects the whole
model's calibration time (windows = blocks - 1 for K = 2, O = 1; every window costs the same).

    python scripts/ptq_cost.py --shape llama2-7b --n 128 --t 2048 --out cost.jsonl
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cbq_ptq.config import CBQConfig, parse_setting, recipe
from cbq_ptq.pipeline import quantize

# hidden, intermediate, heads, kv heads, blocks of the full model
SHAPES = {
    "llama2-7b": (4096, 11008, 32, 32, 32),
    "llama-65b": (8192, 22016, 64, 64, 80),
    "llama2-70b": (8192, 28672, 64, 8, 80),
    "smollm2-135m": (576, 1536, 9, 3, 30),
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--shape", default="llama2-7b", choices=sorted(SHAPES))
    p.add_argument("--n", type=int, default=128, help="calibration windows")
    p.add_argument("--t", type=int, default=2048, help="tokens per window")
    p.add_argument("--epochs", type=int, default=None, help="instead of the recipe's steps")
    p.add_argument("--steps", type=int, default=None, help="instead of the recipe's steps")
    p.add_argument("--setting", default="W4A16")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--offload", choices=["auto", "yes", "no"], default="auto")
    p.add_argument("--out", default=None, help="append the result (JSON line) here")
    p.add_argument("--profile", default=None,
                   help="write torch.profiler's table of GPU time per op to this file")  # fmt: skip
    args = p.parse_args()

    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, inter, heads, kv, n_blocks = SHAPES[args.shape]
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads,
                      num_key_value_heads=kv, num_hidden_layers=2, vocab_size=32000,
                      max_position_embeddings=max(4096, args.t))  # fmt: skip
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    model.eval()
    ids = torch.randint(
        3, cfg.vocab_size, (args.n, args.t), generator=torch.Generator().manual_seed(1)
    )
    settings = parse_setting(args.setting)
    fields = recipe(settings, "cuda" if torch.cuda.is_available() else "cpu")
    if args.epochs is not None:
        fields.update(epochs=args.epochs, steps=None)
    if args.steps is not None:
        fields["steps"] = args.steps
    if args.batch_size is not None:
        fields["batch_size"] = args.batch_size
    config = CBQConfig(settings=settings, window=2, overlap=1, **fields)
    offload = {"auto": None, "yes": True, "no": False}[args.offload]
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        with profile(activities=acts) as prof:
            _, log = quantize(model, config, ids, progress=False, offload=offload)
        key = "cuda_time_total" if device == "cuda" else "cpu_time_total"
        Path(args.profile).write_text(prof.key_averages().table(sort_by=key, row_limit=40))
    else:
        _, log = quantize(model, config, ids, progress=False, offload=offload)
    total = time.perf_counter() - t0
    gpu = device == "cuda"
    (entry,) = log
    steps = max(entry.get("steps", 0), 1)
    windows = n_blocks - 1
    result = {
        "shape": args.shape, "setting": args.setting, "dtype": args.dtype,
        "calibration": [args.n, args.t], "steps": entry.get("steps"),
        "batch_size": config.batch_size, "init": config.init,
        "window_seconds": entry["seconds"], "phase_seconds": entry["phase_seconds"],
        "train_step_ms": round(1000 * entry["phase_seconds"]["train"] / steps, 1),
        "call_seconds": round(total, 1), "offload": entry["offload"],
        "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if gpu else None,
        "projected_windows": windows,
        "projected_hours": round(windows * entry["seconds"] / 3600, 2),
        "gpu": torch.cuda.get_device_name() if device == "cuda" else platform.processor(),
        "torch": torch.__version__,
    }  # fmt: skip
    line = json.dumps(result)
    print(line, flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
