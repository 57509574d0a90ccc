"""Host time of one small GEMM call on the CPU (1 x 64 x 64, the PyTorch paths): the Python
wrappers with and without the custom op's dispatch (cbq_kernels.gemm._eager: outside
torch.compile the GEMMs call their implementations directly).

    python benchmarks/gemm_call_cpu.py
"""

from __future__ import annotations

import platform
import sys
import time
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cbq_kernels import gemm
from cbq_kernels.act_quant import act_quant
from cbq_kernels.packing import pack_ref


def per_call_us(fn, n=3000) -> float:
    for _ in range(200):
        fn()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1e6


def main() -> None:
    torch.manual_seed(0)
    n = k = 64
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    w = gemm.prepare_weight(pack_ref(codes, 4), 4, k, torch.rand(n, 1), torch.full((n, 1), 8.0))
    x = torch.randn(1, k)
    q, s = act_quant(x, 8)
    calls = {"gemm_wonly": lambda: gemm.gemm_wonly(x, w),
             "gemm_w4a8": lambda: gemm.gemm_w4a8(q, s, w),
             "linear(act_bits=8)": lambda: gemm.linear(x, w, 8)}  # fmt: skip
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; us per call (median of 3 runs of 3000)")
    print("| call | through the custom op | direct (the default) |")
    print("|---|---|---|")
    for name, fn in calls.items():
        with mock.patch.object(gemm, "_eager", return_value=False):
            op = sorted(per_call_us(fn) for _ in range(3))[1]
        direct = sorted(per_call_us(fn) for _ in range(3))[1]
        print(f"| {name} | {op:.1f} | {direct:.1f} |", flush=True)


if __name__ == "__main__":
    main()
