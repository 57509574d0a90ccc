"""Issue 17's measurement on one GPU: a Llama-2-shaped model with random weights written to
disk as safetensors (with fewer blocks where the disk requires it), quantized end to end with
block streaming (cbq_ptq.blockstream) at a weight-only setting: peak GPU and host memory,
seconds per window, and the projection to the real number of blocks. One JSON line.

    python scripts/scale_run.py --shape llama2-70b --layers 8 --setting W4A16g128 \
        --n-calib 32 --steps 32 --out /tmp/scale --results scale.jsonl
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SHAPES = {  # hidden, intermediate, heads, kv heads, blocks of the real model
    "llama2-7b": (4096, 11008, 32, 32, 32),
    "llama2-13b": (5120, 13824, 40, 40, 40),
    "llama2-70b": (8192, 28672, 64, 8, 80),
    "tiny": (256, 688, 4, 4, 4),  # a smoke run on the CPU (--device cpu)
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shape", default="llama2-70b", choices=sorted(SHAPES))
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--setting", default="W4A16g128")
    ap.add_argument("--n-calib", type=int, default=32)
    ap.add_argument("--calib-len", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--out", default="/tmp/scale")
    ap.add_argument("--results", default=None)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--make-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM

    from benchmarks.common import Environment
    from cbq_ptq.blockstream import load_streamed
    from cbq_ptq.config import CBQConfig, parse_setting, recipe
    from cbq_ptq.io import ShardWriter
    from cbq_ptq.pipeline import quantize

    hidden, inter, heads, kv, real = SHAPES[args.shape]
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    out = Path(args.out)
    src = out / "fp"
    if not (src / "config.json").is_file():  # random weights, built on the device, then to disk
        if not args.make_only:
            # by a child process, so that this process's peak host memory (ru_maxrss) is the
            # quantization's alone (the first H200 run, ad8bc8c, built it in-process: its
            # 10.3 GiB host peak includes the 7.9 GB save)
            import subprocess

            subprocess.run([sys.executable, __file__, *sys.argv[1:], "--make-only"], check=True)
        else:
            config = LlamaConfig(hidden_size=hidden, intermediate_size=inter,
                                 num_attention_heads=heads, num_key_value_heads=kv,
                                 num_hidden_layers=args.layers, vocab_size=32000,
                                 max_position_embeddings=4096)  # fmt: skip
            with torch.device(args.device):
                model = LlamaForCausalLM(config).to(dtype)
            model.save_pretrained(src, max_shard_size="5GB")
    if args.make_only:
        return
    cuda = args.device.startswith("cuda")
    settings = parse_setting(args.setting)
    fields = recipe(settings, "cuda" if cuda else "cpu")
    fields["steps"] = args.steps
    config = CBQConfig(settings=settings, **fields)
    ids = torch.randint(3, 32000, (args.n_calib, args.calib_len),
                        generator=torch.Generator().manual_seed(0))  # fmt: skip
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    model, _ = load_streamed(str(src), dtype=dtype, device=args.device)
    writer = ShardWriter(out / "model")
    model, log = quantize(model, config, ids, progress=True, writer=writer)
    writer.finish(model)
    seconds = time.time() - t0
    per_window = [e["seconds"] for e in log]
    env = Environment.detect()
    row = {"shape": args.shape, "layers": args.layers, "real_layers": real,
           "setting": args.setting, "n_calib": args.n_calib, "calib_len": args.calib_len,
           "steps": args.steps, "windows": len(log), "seconds": round(seconds, 1),
           "seconds_per_window": round(sum(per_window) / len(per_window), 1),
           "projected_seconds_all_blocks": round(sum(per_window) / len(per_window) * (real - 1), 1),
           "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
           "peak_host_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
           "blocks_resident_max": max(e.get("blocks_resident", 0) for e in log),
           "phase_seconds_per_window": [e.get("phase_seconds") for e in log],
           "gpu": env.gpu, "torch": env.torch, "commit": env.commit}  # fmt: skip
    print(json.dumps(row), flush=True)
    if args.results:
        with open(args.results, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
