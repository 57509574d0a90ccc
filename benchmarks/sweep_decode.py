"""Split-K sweep of the CUDA decode GEMM (csrc/gemm_decode.cu): time per number of K splits
at M = 1 (and --ms; M = 17..32 as one launch of two m-tiles) for Llama-2 shapes (or NxK, e.g.
33792x8192), W4A16 g128, W4A8 per channel and W2A16 g128, beside the choice of
cbq_kernels.gemm_decode.default_splits, with the weight bytes (codes, scales, zero points) read
per second at the best split. CUDA-graph replays, median.

    python benchmarks/sweep_decode.py [--ms 1,16] [--shapes 70b_gate_up,33792x8192]
"""

import argparse
import sys
from pathlib import Path

import torch
from triton.testing import do_bench_cudagraph

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_gemm import weight
from cbq_kernels import gemm_decode
from cbq_kernels.act_quant import act_quant
from cbq_kernels.gemm_decode import DECODE_MAX_M
from cbq_kernels.testing import LLAMA_LINEAR_SHAPES

SPLITS = (1, 2, 3, 4, 6, 8, 12, 16, 24)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--ms", default="1")
    ap.add_argument("--shapes",
                    default="7b_qkvo,7b_gate_up,7b_down,13b_down,70b_kv,70b_gate_up,70b_down")
    args = ap.parse_args()
    g = torch.Generator(device="cuda").manual_seed(0)
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}; time in us (median)")
    print("shape kind M default | " + " ".join(f"S={s}" for s in SPLITS) + " | best | GB/s")
    for name in args.shapes.split(","):
        if "x" in name:
            n, k = (int(v) for v in name.split("x"))
        else:
            model, layer = name.split("_", 1)
            n, k = LLAMA_LINEAR_SHAPES[model][layer]
        ws = {"w4a16_g128": weight(n, k, 4, 128, g)[0], "w4a8": weight(n, k, 4, None, g)[0],
              "w2a16_g128": weight(n, k, 2, 128, g)[0]}  # the served layout  # fmt: skip
        for m in (int(v) for v in args.ms.split(",")):
            # M = 17..32: the served policy's one launch of two m-tiles (GemmPolicy.decode_mtiles)
            mtiles = 2 if DECODE_MAX_M < m <= 2 * DECODE_MAX_M else 1
            x = torch.randn(m, k, generator=g, device="cuda").to(torch.bfloat16)
            xq, xs = act_quant(x, 8)
            for kind, w in ws.items():
                dw = w.decode
                a, sc = (xq, xs) if kind == "w4a8" else (x, None)
                default = gemm_decode.default_splits(dw.words.shape[0], dw.words.shape[1],
                                                     x.device, m, kind == "w4a8")  # fmt: skip
                times = []
                for s in SPLITS:
                    if s > max(1, dw.words.shape[1] // 2):
                        times.append(float("nan"))
                        continue
                    fn = lambda s=s, a=a, sc=sc, dw=dw, mt=mtiles: (  # noqa: E731
                        gemm_decode.launch(a, sc, dw, None, torch.bfloat16, splits=s, mtiles=mt))
                    fn()
                    torch.cuda.synchronize()
                    times.append(1000 * do_bench_cudagraph(fn, rep=20))
                best = min((t, s) for t, s in zip(times, SPLITS, strict=True) if t == t)
                byts = sum(t.numel() * t.element_size() for t in (dw.words, dw.scales, dw.zeros))
                print(f"{name} {kind} {m} {default} | " + " ".join(f"{t:6.1f}" for t in times)
                      + f" | S={best[1]} {best[0]:.1f} | {byts / best[0] / 1e3:.0f}",
                      flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
