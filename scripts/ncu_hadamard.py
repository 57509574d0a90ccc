"""One launch of each CUDA Hadamard + int8 quantization kernel for Nsight Compute: the
register kernels (csrc/hadamard_quant_reg.cu, variants 1 and 3; hadamard_quant_xch.cu,
variant 2; each where it applies) and the shared-memory one (hadamard_quant.cu) on 8192 x n
bf16 rows, n in 28672 (28 x 1024) and 11008 (172 x 64). Run under ncu
(scripts/gpu_gemm.sh step hncu):

    ncu -k regex:hadamard_quant -c 4 --section ... python3 scripts/ncu_hadamard.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cbq_kernels import hadamard
from cbq_kernels.hadamard_quant import _launch_cuda, _reg_takes, _use_cuda


def main() -> None:
    torch.manual_seed(0)
    for n in (28672, 11008):
        x = (torch.randn(8192, n, device="cuda") * 2).to(torch.bfloat16)
        signs = hadamard.random_signs(n, 0).cuda()
        kernels = (("register 1", True, 1), ("register 2", True, 2), ("register 3", True, 3),
                   ("shared-memory", False, 0))
        for name, reg, variant in kernels:
            if not (_reg_takes(x, 8, variant) if reg else _use_cuda(x)):
                print(f"{n}: {name} kernel not taken")
                continue
            _launch_cuda(x, 8, signs, 1.0, reg=reg, variant=variant)
            torch.cuda.synchronize()
            print(f"{n}: {name} kernel launched")


if __name__ == "__main__":
    main()
