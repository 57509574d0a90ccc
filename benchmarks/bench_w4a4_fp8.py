"""Experiment (issue 13, prefill): W4A4 on fp8 e4m3 tensor cores. int4 activation codes
(-8..7) and weight codes minus zero point (-15..15) are exact in e4m3, their products (<= 120)
and fp32 sums (< 2^24 for K < 139810) too, so torch._scaled_mm (cuBLAS fp8, rowwise scales)
can run W4A4 with the exact-int32 contract. Measured: the expansion of the packed weight and
activations to fp8 (cbq_kernels.gemm_triton._expand), _scaled_mm alone and both, against
cuBLAS bf16, fp8 _scaled_mm on pre-cast operands and cbq's W4A4 as dispatched today (int8
expansion + Triton int8 GEMM); then the exactness check against an int64 reference.

    python benchmarks/bench_w4a4_fp8.py [--out DIR]
"""

# ruff: noqa: B023 - every closure is timed at once, inside its loop iteration

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_gemm import timed, weight
from cbq_kernels.act_quant import act_quant
from cbq_kernels.gemm import gemm_w4a4
from cbq_kernels.gemm_triton import _expand
from cbq_kernels.testing import LLAMA_LINEAR_SHAPES

FP8 = torch.float8_e4m3fn


def main() -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}; p50 ms (CUDA graphs)")
    print("shape | bf16 | fp8 | w4a4 now | fp8 path (expand w + x, scaled_mm) | scaled_mm "
          "only | expand only | speedup vs bf16 (now -> fp8 path) | vs fp8")
    for name in ("7b_gate_up", "7b_down", "70b_gate_up", "70b_down"):
        model, layer = name.split("_", 1)
        n, k = LLAMA_LINEAR_SHAPES[model][layer]
        w = weight(n, k, 4, None, g)[1]  # the canonical words, as at 053a7b8
        for m in (2048, 4096, 8192):
            x = torch.randn(m, k, generator=g, device="cuda").to(torch.bfloat16)
            wb = torch.randn(n, k, generator=g, device="cuda").to(torch.bfloat16)
            xq4, xs4 = act_quant(x, 4)
            x8, w8 = x.to(FP8), wb.to(FP8)
            one = torch.ones((), device="cuda")
            t_bf16 = timed(lambda: F.linear(x, wb)).p50_ms
            t_fp8 = timed(lambda: torch._scaled_mm(x8, w8.t(), scale_a=one, scale_b=one,
                                                   out_dtype=torch.bfloat16)).p50_ms
            t_now = timed(lambda: gemm_w4a4(xq4, xs4, w)).p50_ms
            ws = w.scales.reshape(1, n).float()
            xs = xs4.reshape(m, 1).float()

            def expand():
                wf = _expand(w.words, n, k, 4, 1, n, w.zeros, w.kernel_group, dtype=FP8)
                xf = _expand(xq4, m, k, 4, xq4.shape[1], 1, None, k, z_const=8, dtype=FP8)
                return wf, xf

            wf, xf = expand()

            def path():
                a, b = expand()
                return torch._scaled_mm(b, a.t(), scale_a=xs, scale_b=ws,
                                        out_dtype=torch.bfloat16)

            t_path = timed(path).p50_ms
            t_mm = timed(lambda: torch._scaled_mm(xf, wf.t(), scale_a=xs, scale_b=ws,
                                                  out_dtype=torch.bfloat16)).p50_ms
            t_exp = timed(expand).p50_ms
            print(f"{name} {m}x{n}x{k} | {t_bf16:.4f} | {t_fp8:.4f} | {t_now:.4f} | "
                  f"{t_path:.4f} | {t_mm:.4f} | {t_exp:.4f} | {t_bf16 / t_now:.2f} -> "
                  f"{t_bf16 / t_path:.2f} | {t_fp8 / t_path:.2f}", flush=True)
        # exactness: the fp8 GEMM with unit scales against integer arithmetic
        rows = 256
        raw = torch._scaled_mm(xf[:rows], wf.t(), scale_a=one, scale_b=one,
                               out_dtype=torch.float32)
        ref = xf[:rows].float().double() @ wf.float().double().t()
        print(f"{name}: fp8 path exact vs int64 reference on {rows} rows: "
              f"{bool(torch.equal(raw.double(), ref))} (max |diff| "
              f"{(raw.double() - ref).abs().max().item():g})", flush=True)


if __name__ == "__main__":
    main()
