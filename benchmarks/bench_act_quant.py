"""Activation quantization, 8192 tokens x 4096, bf16 in (target: >= 80% of copy bandwidth).

Per-token int8 and packed int4, plain and fused with RMSNorm; against the eager reference
and torch.compile of it. Bytes: x read (2 B/element), codes written (1 or 0.5 B/element),
scales written, RMSNorm weight read.

    python benchmarks/bench_act_quant.py --out benchmarks/results/h100
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import Environment, Table, bench, cli, write_report
from cbq_kernels.act_quant import act_quant, act_quant_ref


def main() -> None:
    out = cli(__doc__)
    torch.manual_seed(0)
    t, k = 8192, 4096
    table = Table(Environment.detect())
    x = (torch.randn(t, k, device="cuda") * 2).to(torch.bfloat16)
    dst = torch.empty_like(x)
    copy_t = bench(lambda: dst.copy_(x))
    copy_gbps = 4 * x.numel() / copy_t.p50_ms / 1e6
    table.add("copy", "torch.copy_", f"{t}x{k}", "bf16", copy_t, nbytes=4 * x.numel(),
              copy_gbps=copy_gbps)  # fmt: skip
    w = torch.rand(k, device="cuda") + 0.5
    for bits in (8, 4):
        for norm in (None, w):
            name = f"act_quant_int{bits}" + ("_rmsnorm" if norm is not None else "")
            nbytes = (
                x.numel() * 2 + x.numel() * bits // 8 + t * 4 + (k * 4 if norm is not None else 0)
            )
            compiled = torch.compile(act_quant_ref, dynamic=False)
            eager = bench(lambda b=bits, n=norm: act_quant_ref(x, b, 1.0, n))
            table.add(name, "eager_ref", f"{t}x{k}", "bf16", eager, nbytes=nbytes,
                      copy_gbps=copy_gbps)  # fmt: skip
            comp = bench(lambda b=bits, n=norm, c=compiled: c(x, b, 1.0, n))
            table.add(name, "compiled_ref", f"{t}x{k}", "bf16", comp, nbytes=nbytes,
                      copy_gbps=copy_gbps, baseline=eager, baseline_name="eager_ref")  # fmt: skip
            ours = bench(lambda b=bits, n=norm: act_quant(x, b, norm_weight=n))
            table.add(name, "cbq", f"{t}x{k}", "bf16", ours, nbytes=nbytes,
                      copy_gbps=copy_gbps, baseline=eager, baseline_name="eager_ref")  # fmt: skip
    note = f"Target: >= 80% of copy bandwidth ({copy_gbps:.0f} GB/s)."
    columns = ("op", "provider", "p50_ms", "gbps", "frac_copy_bw", "speedup")
    print(write_report(table, out, "bench_act_quant", "Activation quantization",
                       "benchmarks/bench_act_quant.py", columns, [note]))  # fmt: skip


if __name__ == "__main__":
    main()
