"""Run the prefill GEMMs once each at one shape, for Nsight Compute (issue 13's prefill
misses: what limits the served W4A8 / W4A16 path against cuBLAS bf16 and fp8):
    ncu --profile-from-start off --section SpeedOfLight ... python scripts/ncu_prefill.py M N K
Everything is run twice first (Triton autotuning, cuBLAS heuristics) outside the profiled
range; then, one NVTX range each: cuBLAS bf16, fp8 _scaled_mm (unit scales), served W4A8 (the
weight's int8 expansion, then the int8 kernel), served W4A8 g128, served W4A16 g128 (the bf16
dequantization, then cuBLAS), served W4A4, W4A8 with the TMA kernel (GemmPolicy.tma_min_m,
Gluon off)."""

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_gemm import bf16_weight, weight
from cbq_kernels.act_quant import act_quant
from cbq_kernels.gemm import GemmPolicy, gemm_w4a4, gemm_w4a8, gemm_wonly

m, n, k = (int(v) for v in (sys.argv[1:] or ["2048", "28672", "8192"]))
g = torch.Generator(device="cuda").manual_seed(0)
x = torch.randn(m, k, generator=g, device="cuda").to(torch.bfloat16)
wb = bf16_weight(n, k, g)
wf8 = wb.to(torch.float8_e4m3fn).t()
xf8 = x.to(torch.float8_e4m3fn)
one = torch.ones((), device="cuda")
w4, w4g = (weight(n, k, 4, gs, g, canonical=False)[0] for gs in (None, 128))
xq8, xs8 = act_quant(x, 8)
xq4, xs4 = act_quant(x, 4)
fns = (
    ("cublas_bf16", lambda: F.linear(x, wb)),
    ("scaled_mm", lambda: torch._scaled_mm(xf8, wf8, one, one, out_dtype=torch.bfloat16)),
    ("w4a8", lambda: gemm_w4a8(xq8, xs8, w4)),
    ("w4a8_g128", lambda: gemm_w4a8(xq8, xs8, w4g)),
    ("w4a16_g128", lambda: gemm_wonly(x, w4g)),
    ("w4a4", lambda: gemm_w4a4(xq4, xs4, w4)),
    # the TMA kernel itself (gluon_min_m=0: the default policy takes the Gluon kernel at
    # M = 256..4096, so before session 14 this range timed Gluon twice at M = 2048)
    ("w4a8_tma", lambda: gemm_w4a8(xq8, xs8, w4, policy=GemmPolicy(tma_min_m=1, gluon_min_m=0))),
)
for _, fn in fns + fns:
    fn()
torch.cuda.synchronize()
torch.cuda.profiler.start()
for name, fn in fns:
    with torch.cuda.nvtx.range(name):
        fn()
torch.cuda.synchronize()
torch.cuda.profiler.stop()
print("ok", m, n, k)
