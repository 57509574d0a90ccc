"""Every (rows per program, warps) launch of the fused Hadamard + per-token quantization
kernel against the reference, per configuration rather than stopping at the first failure as
the GPU test does: how many codes differ, by how many levels, and the worst scale error.

    python scripts/hadamard_configs.py [--widths 28672] [--warps 4,8,16] [--rows 64] \
        [--per-program 1,2]
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cbq_kernels import hadamard
from cbq_kernels.hadamard_quant import _launch, _tile, hadamard_act_quant_ref
from cbq_kernels.packing import unpack


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--widths", default="28672")
    ap.add_argument("--warps", default="4,8,16")
    ap.add_argument("--rows", type=int, default=64, help="tokens")
    ap.add_argument("--per-program", default="1", help="rows per program")
    args = ap.parse_args()
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("width bits rows_per_program warps | codes off (of all) | max levels off | "
          "max scale rel err")
    for n in (int(v) for v in args.widths.split(",")):
        g = torch.Generator(device="cuda").manual_seed(7)
        x = torch.randn(args.rows, n, generator=g, device="cuda") * 2
        x[:, 5] *= 300.0
        x = x.to(torch.bfloat16)
        signs = hadamard.random_signs(n, 5).cuda()
        print(f"# {n}: tile (m_pad, p1, p2) = {_tile(n)}")
        for bits in (8, 4):
            want, want_s = hadamard_act_quant_ref(x, bits, signs, 1.0)
            ref = want.long() if bits == 8 else unpack(want, 4, n).long()
            for rows in (int(r) for r in args.per_program.split(",")):
                for warps in (int(w) for w in args.warps.split(",")):
                    try:
                        codes, s = _launch(x, bits, signs, 1.0, rows, warps)
                        torch.cuda.synchronize()
                    except Exception as e:  # report it and go on to the next configuration
                        print(f"{n} {bits} {rows} {warps} | {type(e).__name__}: "
                              f"{str(e).splitlines()[0][:80]}")
                        continue
                    got = codes.long() if bits == 8 else unpack(codes, 4, n).long()
                    d = (got - ref).abs()
                    rel = float(((s - want_s).abs() / want_s).max())
                    print(f"{n} {bits} {rows} {warps} | {int((d > 0).sum())} ({d.numel()}) | "
                          f"{int(d.max())} | {rel:.2e}", flush=True)


if __name__ == "__main__":
    main()
