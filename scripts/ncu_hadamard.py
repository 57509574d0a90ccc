"""One launch of each CUDA Hadamard + int8 quantization kernel for Nsight Compute: the
register kernel (csrc/hadamard_quant_reg.cu) and the shared-memory one (hadamard_quant.cu) on
8192 x n bf16 rows, n in 28672 (28 x 1024) and 11008 (172 x 64). Run under ncu
(scripts/gpu_gemm.sh step hncu):

    ncu -k regex:hadamard_quant -c 4 --section ... python3 scripts/ncu_hadamard.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cbq_kernels import hadamard
from cbq_kernels.hadamard_quant import _launch_cuda, _use_cuda, _use_cuda_reg


def main() -> None:
    torch.manual_seed(0)
    for n in (28672, 11008):
        x = (torch.randn(8192, n, device="cuda") * 2).to(torch.bfloat16)
        signs = hadamard.random_signs(n, 0).cuda()
        for reg in (True, False):
            if not (_use_cuda_reg(x, 8) if reg else _use_cuda(x)):
                print(f"{n}: {'register' if reg else 'shared-memory'} kernel not taken")
                continue
            _launch_cuda(x, 8, signs, 1.0, reg=reg)
            torch.cuda.synchronize()
            print(f"{n}: {'register' if reg else 'shared-memory'} kernel launched")


if __name__ == "__main__":
    main()
