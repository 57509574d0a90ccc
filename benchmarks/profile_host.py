"""Host-side cost of the calibration ops: time per call on tiny inputs (where the GPU work is
a few microseconds, so the time is what the CPU spends: checks, dispatch, autograd,
allocations, Triton's launcher), and a cProfile of the forward + backward of fake_quant.

    python benchmarks/profile_host.py [--out DIR]
"""

from __future__ import annotations

import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import cli
from cbq_kernels.act_quant import act_quant
from cbq_kernels.fake_quant import fake_quant
from cbq_kernels.lora_round import lora_round, lora_round_params


def per_call_us(fn, n=300) -> float:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e6


def main() -> None:
    out = cli(__doc__)
    dev = "cuda"
    x = (torch.randn(64, 256, device=dev) * 0.1).to(torch.bfloat16).requires_grad_()
    dy = torch.randn(64, 256, device=dev).to(torch.bfloat16)
    fa = torch.full((64, 2), 0.9, device=dev, requires_grad=True)
    fb = torch.full((64, 2), 0.9, device=dev, requires_grad=True)

    def fq_step():
        y = fake_quant(x, 4, 128, fa, fb, False)
        torch.autograd.grad(y, [x, fa, fb], dy)

    def fq_fwd():
        with torch.no_grad():
            fake_quant(x, 4, 128, fa, fb, False)

    w = (torch.randn(64, 256, device=dev) * 0.02).to(torch.bfloat16)
    s, z = lora_round_params(w, 4, None)
    a = torch.randn(64, 8, device=dev, requires_grad=True)
    b = torch.randn(8, 256, device=dev, requires_grad=True)

    def lr_step():
        y, reg = lora_round(w, a, b, s, z, 4)
        torch.autograd.grad((y, reg), [a, b], (dy, torch.ones_like(reg)))

    xa = torch.randn(64, 256, device=dev, dtype=torch.bfloat16)
    lines = [f"host time per call, tiny inputs ({torch.cuda.get_device_name()}):"]
    for name, fn in (("fake_quant fwd (no grad)", fq_fwd), ("fake_quant fwd+bwd", fq_step),
                     ("lora_round fwd+bwd", lr_step),
                     ("act_quant int8", lambda: act_quant(xa, 8)),
                     ("empty_like (floor)", lambda: torch.empty_like(xa))):  # fmt: skip
        lines.append(f"  {name}: {per_call_us(fn):.1f} us")
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(200):
        fq_step()
    torch.cuda.synchronize()
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(25)
    lines.append("\ncProfile of 200 fake_quant fwd+bwd steps (sorted by own time):")
    lines.append(buf.getvalue())
    text = "\n".join(lines)
    print(text)
    (Path(out) / "profile_host.txt").write_text(text + "\n")


if __name__ == "__main__":
    main()
