"""Launch-configuration sweep of the quantized GEMM kernel (cbq_kernels/gemm.py), bypassing
the autotuner: per case, the time of each (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, SWAP,
split-K), next to cuBLAS bf16 and torch._int_mm measured in the same process. The autotuner's
config lists (``_LARGE_CONFIGS``, ``_SMALL_CONFIGS``) are chosen from this sweep
(docs/DECISIONS.md). Every configuration's output is checked against the first one's (a
miscompiled configuration must not win by being fast and wrong).

Times: CUDA-graph replays (``triton.testing.do_bench_cudagraph``), so that the host cost of a
launch (tens of microseconds of Python) does not hide the kernel time at decode sizes; a
served model replays its decode step as a CUDA graph too.

    python benchmarks/sweep_gemm.py [--out DIR] [--cases large,decode] [--kinds w4a8,w4a4]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_gemm import weight
from benchmarks.common import Environment
from cbq_kernels.act_quant import act_quant
from cbq_kernels.gemm_triton import _A_FLOAT, _A_INT4, _A_INT8, _expand, _launch

# (bm, bn, bk, warps, stages); each with SWAP in {False, True} and UNPACK in {0, 1}
LARGE = [(256, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 128, 128, 8, 3), (128, 128, 64, 8, 3),
         (256, 128, 128, 8, 3)]  # fmt: skip
# int8 x int8 after expansion (no unpacking in the K loop)
LARGE_X = [(128, 256, 128, 8, 3), (256, 128, 128, 8, 3), (128, 256, 64, 8, 4), (256, 128, 64, 8, 4),
           (128, 128, 128, 4, 4), (128, 128, 128, 8, 4), (128, 128, 64, 4, 4)]  # fmt: skip
DECODE = [(16, 64, 128, 4, 4), (16, 128, 128, 4, 3), (16, 64, 256, 4, 3), (16, 128, 64, 4, 4)]
SPLITS = (1, 2, 4)


def timed(fn) -> float:
    from triton.testing import do_bench_cudagraph

    fn()
    torch.cuda.synchronize()
    return do_bench_cudagraph(fn, rep=30)


def sweep(name, m, n, k, configs, splits, lines, g, only, path):
    x = torch.randn(m, k, generator=g, device="cuda").to(torch.bfloat16)
    xq8, xs8 = act_quant(x, 8)
    xq4, xs4 = act_quant(x, 4)
    # the canonical words (the Triton kernels' layout)
    w4, w4g = weight(n, k, 4, None, g)[1], weight(n, k, 4, 128, g)[1]
    w2g = weight(n, k, 2, 128, g)[1]
    w_bf16 = torch.randn(n, k, generator=g, device="cuda").to(torch.bfloat16)
    base = timed(lambda: F.linear(x, w_bf16))
    xi = xq8 if m >= 32 else torch.zeros(32, k, dtype=torch.int8, device="cuda")
    w_i8_t = torch.randint(-127, 128, (n, k), generator=g, device="cuda", dtype=torch.int8).t()
    t_int = timed(lambda: torch._int_mm(xi, w_i8_t))
    flops = 2 * m * n * k
    lines.append(f"\n## {name}: M={m} N={n} K={k}; cublas_bf16 {base * 1e3:.1f} us "
                 f"({flops / base / 1e9:.0f} TFLOP/s), int_mm {t_int * 1e3:.1f} us")  # fmt: skip
    t_exp = timed(lambda: _expand(w4.words, n, k, 4, 1, n, w4.zeros, k))
    lines.append(f"expand 4-bit weight to int8 (N, K): {t_exp * 1e3:.1f} us")
    kinds = (
        ("w4a8", xq8, xs8, _A_INT8, w4),
        ("w4a8_g128", xq8, xs8, _A_INT8, w4g),
        ("w4a4", xq4, xs4, _A_INT4, w4),
        ("w4a16_g128", x, None, _A_FLOAT, w4g),
        ("w2a16_g128", x, None, _A_FLOAT, w2g),
        # _x: expanded to int8 first (the expansion is part of the time)
        ("w4a8_x", xq8, xs8, _A_INT8, w4),
        ("w4a8_g128_x", xq8, xs8, _A_INT8, w4g),
        ("w4a4_x", xq4, xs4, _A_INT4, w4),
    )
    for kind, xa, xs, mode, w in kinds:
        if kind not in only:
            continue
        ref = None
        best = (float("inf"), "")
        expand = kind.endswith("_x")
        unpacks = (0,)  # the 2 unpack variants were compared at 0ed169f, the reshape won
        variants = [(c, swap, unpack) for c in (LARGE_X if expand else configs)
                    for swap in (False, True) for unpack in unpacks]  # fmt: skip
        for (bm, bn, bk, warps, stages), swap, unpack in variants:
            if w.group_size is not None and w.group_size % bk:
                continue  # one group per K tile
            for split in splits:
                if split > 1 and k // (bk * split) < 2:
                    continue
                cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8,
                       "SWAP": swap, "num_warps": warps,
                       "num_stages": stages}  # fmt: skip
                label = f"{bm}x{bn}x{bk} w{warps} s{stages} {'swap' if swap else 'plain'} " \
                        f"u{unpack} split{split}"  # fmt: skip
                if expand and m < 256:
                    continue

                def call(cfg=cfg, split=split, xa=xa, xs=xs, mode=mode, w=w, expand=expand):
                    return _launch(xa, xs, mode, w, None, torch.bfloat16, False, split, cfg,
                                   expand)  # fmt: skip

                try:
                    t0 = time.time()
                    out = call()
                    compile_s = time.time() - t0
                    if ref is None:
                        ref = out.float()
                    bad = not torch.allclose(out.float(), ref, rtol=2e-2, atol=1e-2 * float(
                        ref.abs().max()))  # fmt: skip
                    t = timed(call)
                except Exception as exc:  # a failing configuration is reported
                    lines.append(f"{kind:11s} {label:40s} FAILED {str(exc).splitlines()[0][:90]}")
                    continue
                tf = flops / t / 1e9
                flag = "  WRONG" if bad else ""
                lines.append(f"{kind:11s} {label:40s} {t * 1e3:9.1f} us {tf:7.0f} TFLOP/s "
                             f"x{base / t:5.2f} bf16 x{t_int / t:5.2f} int_mm "
                             f"(first call {compile_s:.1f} s){flag}")  # fmt: skip
                if not bad and t < best[0]:
                    best = (t, label)
                print(lines[-1], flush=True)
                path.write_text("\n".join(lines) + "\n")  # a run cut short keeps its lines
        lines.append(f"{kind:11s} BEST {best[1]} {best[0] * 1e3:.1f} us")
        print(lines[-1], flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--cases", default="large,decode")
    parser.add_argument("--kinds", default="w4a8,w4a8_g128,w4a4,w4a16_g128,w2a16_g128")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    env = Environment.detect()
    lines = [f"# GEMM configuration sweep\n\nGPU {env.gpu}; clocks {env.clocks}; torch "
             f"{env.torch}, triton {env.triton}, CUDA {env.cuda}, commit {env.commit}\n"
             f"Command: python benchmarks/sweep_gemm.py --cases {args.cases}"]  # fmt: skip
    g = torch.Generator(device="cuda").manual_seed(0)
    cases, kinds = args.cases.split(","), args.kinds.split(",")
    path = args.out / f"sweep_gemm_{'_'.join(cases)}.txt"
    if "large" in cases:
        sweep("70b_gate_up", 4096, 28672, 8192, LARGE, (1,), lines, g, kinds, path)
    if "decode" in cases:
        for m in (1,):
            sweep("70b_gate_up", m, 28672, 8192, DECODE, SPLITS, lines, g, kinds, path)
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
