"""Is W4A4 on fp8 tensor cores exact with ``torch._scaled_mm``'s rowwise scales? For int4
activation codes (-8..7) and weight codes minus zero point (-15..15), both exact in e4m3, the
exact output is (integer sum) x s_token x s_channel; count the outputs of (a) the rowwise-
scaled bf16 ``_scaled_mm`` and (b) the unit-scale fp32 product then ``scale_out`` (what
``launch_w4a4_fp8`` runs) beyond one bf16 rounding of it (an exact zero must come out 0).
DECISIONS ("W4A4 prefill on fp8"): the earlier "inexact rowwise" reading compared against an
fp64 reference that leaves ~1e-14 where the integer sum is 0.

    python scripts/fp8_rowwise_check.py [--device cuda] [--shapes 2048x4096x4096,...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cbq_kernels.act_quant import act_quant
from cbq_kernels.gemm import prepare_weight
from cbq_kernels.gemm_triton import _expand, expand_weight, scale_out
from cbq_kernels.packing import pack_ref, unpack_ref


def beyond(out: torch.Tensor, exact: torch.Tensor) -> tuple[int, int]:
    """(outputs beyond one bf16 rounding of exact, exact zeros that did not come out 0)."""
    err = (out.double() - exact).abs()
    return int((err > exact.abs() * 2.0**-8).sum()), int(((exact == 0) & (out != 0)).sum())


def check(m: int, n: int, k: int, device: str) -> str:
    g = torch.Generator(device=device).manual_seed(0)
    codes = torch.randint(0, 16, (n, k), generator=g, device=device, dtype=torch.uint8)
    scales = torch.rand(n, 1, generator=g, device=device) * 0.02 + 0.005
    zeros = torch.randint(0, 16, (n, 1), generator=g, device=device).float()
    w = prepare_weight(pack_ref(codes, 4), 4, k, scales, zeros, None)
    x = (torch.randn(m, k, generator=g, device=device) * 3).to(torch.bfloat16)
    xq, xs = act_quant(x, 4)
    fp8 = torch.float8_e4m3fn
    w8 = expand_weight(w, fp8)
    x8 = _expand(xq, m, k, 4, xq.shape[1], 1, None, k, z_const=8, dtype=fp8)
    w_int = codes.double() - zeros.double()
    x_int = unpack_ref(xq, 4, k).double() - 8
    exact = (x_int @ w_int.t()) * xs.double().reshape(m, 1) * scales.double().reshape(1, n)
    rowwise = torch._scaled_mm(x8, w8.t(), scale_a=xs.float().reshape(m, 1).contiguous(),
                               scale_b=scales.float().reshape(1, n).contiguous(),
                               out_dtype=torch.bfloat16)  # fmt: skip
    one = torch.ones((), device=device)
    raw = torch._scaled_mm(x8, w8.t(), scale_a=one, scale_b=one, out_dtype=torch.float32)
    two_pass = scale_out(raw, xs.reshape(m), scales.reshape(n), torch.bfloat16)
    ra, za = beyond(rowwise, exact)
    rb, zb = beyond(two_pass, exact)
    return (f"{m}x{n}x{k}: rowwise bf16 {ra} beyond one rounding ({za} nonzero exact zeros); "
            f"unit-scale + scale_out {rb} ({zb}); of {exact.numel()} outputs, "
            f"{int((exact == 0).sum())} exact zeros")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--shapes", default="2048x4096x4096,4096x8192x28672,2051x1024x4160")
    args = p.parse_args()
    for shape in args.shapes.split(","):
        m, n, k = (int(v) for v in shape.split("x"))
        print(check(m, n, k, args.device), flush=True)


if __name__ == "__main__":
    main()
