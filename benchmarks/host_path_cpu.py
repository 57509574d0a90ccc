"""Host time of fake_quant forward + backward with the kernel launches mocked out (runs on a
CPU): what our Python path, autograd and the op dispatch cost, without any GPU work.

    python benchmarks/host_path_cpu.py
"""

from __future__ import annotations

import platform
import sys
import time
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cbq_kernels.fake_quant as fq


def per_step_us(step, n=500) -> float:
    for _ in range(50):
        step()
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    return (time.perf_counter() - t0) / n * 1e6


def main() -> None:
    x = (torch.randn(64, 256) * 0.1).requires_grad_()
    dy = torch.randn(64, 256)
    fa = torch.full((64, 2), 0.9, requires_grad=True)
    fb = torch.full((64, 2), 0.9, requires_grad=True)

    def eager():
        torch.autograd.grad(fq.fake_quant(x, 4, 128, fa, fb, False), [x, fa, fb], dy)

    def op():
        y = torch.ops.cbq.fake_quant(x, 4, 128, fa, fb, False)
        torch.autograd.grad(y, [x, fa, fb], dy)

    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}")
    with (mock.patch.object(fq, "use_triton", return_value=True),
          mock.patch.object(fq, "_launch_fwd"), mock.patch.object(fq, "_launch_bwd")):  # fmt: skip
        for name, step in (("eager autograd.Function", eager), ("torch.library op", op)):
            print(f"{name}: {per_step_us(step):.0f} us per forward + backward (kernels mocked)")


if __name__ == "__main__":
    main()
