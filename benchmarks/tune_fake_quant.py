"""Launch-configuration sweep of the fake-quantization kernels (forward and backward alone).

Prints, per case, the time and fraction of copy bandwidth of each (BLOCK_S, BLOCK_E,
num_warps); the defaults of ``_grid_config`` come from this sweep (docs/DECISIONS.md).

    python benchmarks/tune_fake_quant.py [--out DIR]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import bench, cli
from cbq_kernels.fake_quant import _fake_quant_bwd_kernel, _fake_quant_fwd_kernel, _Plan

CASES = (
    # name, shape, bits, group_size, symmetric, shared factor
    ("w4_perchannel", (4096, 11008), 4, None, False, False),
    ("w4_g128", (4096, 11008), 4, 128, False, False),
    ("w2_g128", (11008, 4096), 2, 128, False, False),
    ("a8_pertoken", (16384, 4096), 8, None, True, True),
    ("w4_perchannel_k4096", (11008, 4096), 4, None, False, False),
)


def configs(gs: int):
    full = triton_next(gs)
    for be in sorted({min(full, b) for b in (128, 256, 512, 1024, 2048, 4096, 8192, 16384)}):
        if gs > 128 and be < 512:
            continue
        for elems in (2048, 4096, 8192, 16384):
            bs = max(1, elems // be)
            if bs * be != elems and bs > 1:
                continue
            for w in (4, 8, 16):
                if bs * be // (32 * w) < 4:
                    continue
                yield bs, be, w


def triton_next(n: int) -> int:
    p = 1
    while p < n:
        p *= 2
    return p


def measure(plan, cfg, x, y, dy, dx, fa, fb, dfa, dfb, copy, lines):
    bs, be, w = cfg
    meta = dict(SYM=plan.symmetric, FACTOR=plan.mode, BLOCK_S=bs, BLOCK_E=be,
                ONE_TILE=be >= plan.gs, num_warps=w, enable_fp_fusion=False)  # fmt: skip
    grid = (-(-plan.n_seg // bs),)

    def fwd():
        _fake_quant_fwd_kernel[grid](x, y, fa, fb, *plan.scalars(), **meta)

    def bwd():
        _fake_quant_bwd_kernel[grid](x, dy, dx, fa, fb, dfa, dfb, *plan.scalars(), **meta)

    try:
        tf, tb = bench(fwd, 10, 60).p50_ms, bench(bwd, 10, 60).p50_ms
    except Exception as exc:  # a configuration may not compile (registers, shared memory)
        lines.append(f"{bs}x{be} w{w}: {type(exc).__name__}")
        return None
    gb = x.numel() * 2 / 1e6
    return (tf + tb, bs, be, w, tf, tb, 2 * gb / tf / copy, 3 * gb / tb / copy)


def main() -> None:
    out = cli(__doc__)
    torch.manual_seed(0)
    n0 = 4096 * 11008
    src = torch.randn(n0, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    copy = 4 * n0 / bench(lambda: dst.copy_(src)).p50_ms / 1e6
    lines = [f"copy bandwidth {copy:.0f} GB/s ({torch.cuda.get_device_name()})"]
    for name, shape, bits, gs, sym, shared in CASES:
        x = (torch.randn(shape, device="cuda") * 0.05).to(torch.bfloat16)
        dy = torch.randn(shape, device="cuda").to(torch.bfloat16)
        n, k = shape
        groups = 1 if gs is None else -(-k // gs)
        fshape = (1,) if shared else (n * groups,)
        fa = torch.rand(fshape, device="cuda") * 0.3 + 0.7
        fb = fa if sym else torch.rand(fshape, device="cuda") * 0.3 + 0.7
        plan = _Plan(x, gs, bits, sym, fa)
        y, dx = torch.empty_like(x), torch.empty_like(x)
        dfa = torch.empty(plan.n_seg, device="cuda")
        dfb = torch.empty(plan.n_seg, device="cuda")
        default = (plan.block_s, plan.block_e, plan.warps)
        rows = [
            r
            for cfg in configs(plan.gs)
            if (r := measure(plan, cfg, x, y, dy, dx, fa, fb, dfa, dfb, copy, lines))
        ]
        rows.sort()
        lines.append(f"\n{name} {shape} bits={bits} gs={gs} sym={sym} default={default}")
        lines.append("BLOCK_S BLOCK_E warps  fwd_ms  bwd_ms  fwd_frac  bwd_frac  total_frac")
        for tot, bs, be, w, tf, tb, ff, fb_ in rows[:12] + [
            r for r in rows[12:] if (r[1], r[2], r[3]) == default
        ]:
            mark = " *" if (bs, be, w) == default else ""
            tfrac = 5 * x.numel() * 2 / 1e6 / tot / copy
            lines.append(
                f"{bs:7d} {be:7d} {w:5d}  {tf:6.3f}  {tb:6.3f}  {ff:8.2f}  {fb_:8.2f}"
                f"  {tfrac:10.2f}{mark}"
            )
    text = "\n".join(lines)
    print(text)
    if out:
        (Path(out) / "tune_fake_quant.txt").write_text(text + "\n")


if __name__ == "__main__":
    main()
