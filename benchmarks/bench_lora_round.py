"""LoRA-Rounding forward + backward (target: >= 3x eager; extra memory O((N + K) r)).

4096x11008 and 11008x4096 bf16 weights, 4-bit, rank 8 and 32, per channel. Providers: the
fused Triton op with autograd ("cbq"), the eager reference with autograd ("eager_ref") and
torch.compile of it ("compiled_ref"); peak extra memory of each is reported in the note.

    python benchmarks/bench_lora_round.py --out benchmarks/results/h100
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import Environment, Table, bench, cli, write_report
from cbq_kernels.lora_round import lora_round, lora_round_params, lora_round_ref


def peak_extra_mb(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def main() -> None:
    out = cli(__doc__)
    torch.manual_seed(0)
    table = Table(Environment.detect())
    notes = []
    for n, k in ((4096, 11008), (11008, 4096)):
        w = (torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16)
        s, z = lora_round_params(w, 4, None)
        dy = torch.randn(n, k, device="cuda").to(torch.bfloat16)
        for r in (8, 32):
            a = (torch.randn(n, r, device="cuda") * 0.3).requires_grad_()
            b = (torch.randn(r, k, device="cuda") * 0.3).requires_grad_()

            def step(fn, a=a, b=b, s=s, z=z, w=w, dy=dy):
                def run():
                    y, reg = fn(w, a, b, s, z, 4, None, 2.0)
                    return torch.autograd.grad((y, reg), [a, b], (dy, torch.ones_like(reg)))

                return run

            name, shape = f"lora_round_r{r}", f"{n}x{k}"
            compiled = torch.compile(lora_round_ref, dynamic=False)
            eager = bench(step(lora_round_ref))
            table.add(name, "eager_ref", shape, "bf16", eager)
            comp = bench(step(compiled))
            table.add(name, "compiled_ref", shape, "bf16", comp, baseline=eager,
                      baseline_name="eager_ref")  # fmt: skip
            ours = bench(step(lora_round))
            table.add(name, "cbq", shape, "bf16", ours, baseline=eager, baseline_name="eager_ref")
            mem = {p: peak_extra_mb(step(f)) for p, f in
                   (("eager_ref", lora_round_ref), ("cbq", lora_round))}  # fmt: skip
            out_mb = n * k * 2 / 2**20
            notes.append(
                f"{name} {shape}: peak extra memory eager {mem['eager_ref']:.0f} MiB, "
                f"cbq {mem['cbq']:.0f} MiB (output alone {out_mb:.0f} MiB)"
            )
    columns = ("op", "provider", "shape", "p50_ms", "speedup")
    print(write_report(table, out, "bench_lora_round", "LoRA-Rounding forward + backward",
                       "benchmarks/bench_lora_round.py", columns,
                       [f"- {line}" for line in notes]))  # fmt: skip


if __name__ == "__main__":
    main()
