"""Run the CUDA decode GEMM a few times at one shape, for Nsight Compute:
    ncu -k regex:decode_kernel -c 4 --set detailed python scripts/ncu_decode.py [M] [N] [K]
Launch order: W4A16 g128, W4A8 per channel, W2A16 g128, W4A4 per channel (one launch each)."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_gemm import weight
from cbq_kernels.act_quant import act_quant
from cbq_kernels.gemm import gemm_w4a4, gemm_w4a8, gemm_wonly

m, n, k = (int(v) for v in (sys.argv[1:] or ["1", "28672", "8192"]))
g = torch.Generator(device="cuda").manual_seed(0)
x = torch.randn(m, k, generator=g, device="cuda").to(torch.bfloat16)
w4g, w4, w2g = (weight(n, k, b, gs, g)[0] for b, gs in ((4, 128), (4, None), (2, 128)))
xq8, xs8 = act_quant(x, 8)
xq4, xs4 = act_quant(x, 4)
for fn in (lambda: gemm_wonly(x, w4g), lambda: gemm_w4a8(xq8, xs8, w4),
           lambda: gemm_wonly(x, w2g), lambda: gemm_w4a4(xq4, xs4, w4)):  # fmt: skip
    fn()
torch.cuda.synchronize()
print("ok")
