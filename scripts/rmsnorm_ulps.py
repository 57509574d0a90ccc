"""How far cbq_kernels.rmsnorm is from transformers' LlamaRMSNorm on the GPU, in units in the
last place: the output's, and the intermediate normalized value's (eager rounds x * rsqrt to
the dtype, then multiplies by the weight and rounds again).
    python scripts/rmsnorm_ulps.py"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cbq_kernels.rmsnorm import rms_norm
from tests.kernels.test_rmsnorm import ulps

for dtype in (torch.bfloat16, torch.float16):
    for t, k in ((1, 4096), (32, 8192), (8192, 4096), (7, 576)):
        g = torch.Generator(device="cuda").manual_seed(k)
        x = (torch.randn(t, k, generator=g, device="cuda") * 3).to(dtype)
        w = (torch.rand(k, generator=g, device="cuda") + 0.5).to(dtype)
        xf = x.float()
        h = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype)
        want = w * h
        got = rms_norm(x, w, 1e-5)
        d = ulps(got, want)
        # the same product on the kernel's side: which h would give `got` (one ulp of h moves
        # w * h by up to 2w ulps of the output when w < 1 puts it in the binade below)
        two = d >= 2
        print(f"{str(dtype)[6:]:9s} {t:5d} x {k:5d}: max {int(d.max())} ulp, differ "
              f"{float((d > 0).float().mean()):.5f}, >= 2 ulp {int(two.sum())} "
              f"(weight < 1 at all of them: {bool((w.expand_as(x)[two] < 1).all())})")
