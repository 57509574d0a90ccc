"""Fake-quantization forward + backward (targets: >= 3x eager, >= 80% of copy bandwidth).

Weights 4096x11008 (per channel and g128, 4-bit asymmetric, learnable clipping) and
activations 16384x4096 (per token, 8-bit, learnable ratio), bf16. Providers: the fused
Triton kernels through the autograd op ("cbq"), the two kernels alone ("cbq_kernels"), the
eager PyTorch reference with autograd ("eager_ref"), and torch.compile of that reference
("compiled_ref"). Bytes counted: forward
reads x and writes y, backward reads x and dy and writes dx (10 bytes per bf16 element).

    python benchmarks/bench_fake_quant.py --out benchmarks/results/h100
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import Environment, Table, bench, cli, write_report
from cbq_kernels.fake_quant import _launch_bwd, _launch_fwd, _Plan, fake_quant, fake_quant_ref


def copy_bandwidth(table: Table, numel: int) -> float:
    src = torch.randn(numel, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    t = bench(lambda: dst.copy_(src))
    gbps = 4 * numel / t.p50_ms / 1e6
    table.add("copy", "torch.copy_", str(numel), "bf16", t, nbytes=4 * numel, copy_gbps=gbps)
    return gbps


def case(table: Table, name: str, shape, bits, group_size, symmetric, shared, copy_gbps):
    n, k = shape
    groups = 1 if group_size is None else -(-k // group_size)
    fshape = (1,) if shared else (n, groups)
    x = (torch.randn(shape, device="cuda") * 0.05).to(torch.bfloat16).requires_grad_()
    dy = torch.randn(shape, device="cuda").to(torch.bfloat16)
    fa = (torch.rand(fshape, device="cuda") * 0.3 + 0.7).requires_grad_()
    fb = None if symmetric else (torch.rand(fshape, device="cuda") * 0.3 + 0.7).requires_grad_()
    params = [x, fa] + ([fb] if fb is not None else [])

    def step(fn):
        def run():
            y = fn(x, bits, group_size, fa, fb, symmetric)
            return torch.autograd.grad(y, params, dy)

        return run

    # dynamic=False: after the first recompile Dynamo would make `bits` symbolic.
    compiled = torch.compile(fake_quant_ref, dynamic=False)
    nbytes = 10 * x.numel()
    shape_s = f"{n}x{k}"
    eager = bench(step(fake_quant_ref))
    table.add(name, "eager_ref", shape_s, "bf16", eager, nbytes=nbytes, copy_gbps=copy_gbps)
    comp = bench(step(compiled))
    table.add(name, "compiled_ref", shape_s, "bf16", comp, nbytes=nbytes, copy_gbps=copy_gbps,
              baseline=eager, baseline_name="eager_ref")  # fmt: skip
    ours = bench(step(fake_quant))
    table.add(name, "cbq", shape_s, "bf16", ours, nbytes=nbytes, copy_gbps=copy_gbps,
              baseline=eager, baseline_name="eager_ref")  # fmt: skip
    # The two kernels alone, outputs preallocated: GPU time without the host-side cost of
    # the autograd op (argument checks, torch.library dispatch, allocations).
    xd, fad = x.detach(), fa.detach().float().contiguous()
    fbd = None if fb is None else fb.detach().float().contiguous()
    plan = _Plan(xd, group_size, bits, symmetric, fad)
    y, dx = torch.empty_like(xd), torch.empty_like(xd)
    dfa = torch.empty(plan.n_seg, device="cuda")
    dfb = torch.empty(plan.n_seg, device="cuda")

    def kernels():
        _launch_fwd(plan, xd, y, fad, fbd)
        _launch_bwd(plan, xd, dy, dx, fad, fbd, dfa, dfb)

    table.add(name, "cbq_kernels", shape_s, "bf16", bench(kernels), nbytes=nbytes,
              copy_gbps=copy_gbps, baseline=eager, baseline_name="eager_ref")  # fmt: skip


def main() -> None:
    out = cli(__doc__)
    torch.manual_seed(0)
    table = Table(Environment.detect())
    copy_gbps = copy_bandwidth(table, 4096 * 11008)
    case(table, "fq_w4_perchannel", (4096, 11008), 4, None, False, False, copy_gbps)
    case(table, "fq_w4_g128", (4096, 11008), 4, 128, False, False, copy_gbps)
    case(table, "fq_w2_g128", (11008, 4096), 2, 128, False, False, copy_gbps)
    case(table, "fq_a8_pertoken", (16384, 4096), 8, None, True, True, copy_gbps)
    note = f"Targets: cbq >= 3x eager_ref and >= 80% of copy bandwidth ({copy_gbps:.0f} GB/s)."
    columns = ("op", "provider", "shape", "p50_ms", "gbps", "frac_copy_bw", "speedup")
    print(write_report(table, out, "bench_fake_quant", "Fake-quantization forward + backward",
                       "benchmarks/bench_fake_quant.py", columns, [note]))  # fmt: skip


if __name__ == "__main__":
    main()
