"""cbq_kernels.gemm_tma4 and cbq_kernels.gemm_gluon compiled ahead of time for sm_90a without a
GPU: per configuration (gemm_tma4: per form too, int8 activations and W4A4 codes as fp8 e4m3;
gemm_gluon: its int8 GEMM and its split-nibble kernel, W4A8 per channel and two-level,
the ``wgmma.wait_group`` counts of their PTX), the registers and spills ``ptxas -v`` reports, and
whether ptxas serialised the wgmma instructions (its "Potential Performance Loss" note: then
each MMA is waited on whatever the PTX asks), the shared memory, and the
``warp_group_dot_wait`` pendings of the TTGIR (1: the MMAs stay in flight; only 0: each one is
waited on). ptxas: by default the one Triton bundles and compiles with (Triton 3.6: 12.8, what
the GPU machine runs); the toolkit's 13.0 agreed with it on every form compiled with both.

    python scripts/gemm_tma4_aot.py [--ptxas PTXAS]
    PYTHONPATH=DIR python scripts/gemm_tma4_aot.py   # DIR: another Triton, e.g. `pip install
        --no-deps --target DIR triton==3.6.0` (the GPU machine's)

The numbers belong to the Triton and ptxas versions printed first.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections import Counter
from pathlib import Path

import triton

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cbq_kernels import sm90_aot
from cbq_kernels.gemm_tma4 import CONFIGS


def compile_one(cfg: triton.Config, fp8: bool, ptxas: str) -> str:
    bn, bm, bh = cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_H"]
    k = sm90_aot.compile_tma4(cfg, fp8)
    waits = Counter(str(v) for v in sm90_aot.ttgir_pendings(k.asm["ttgir"]))
    return (f"{'fp8 ' if fp8 else 'int8'} {bn}x{bm}x{bh} w{cfg.num_warps} s{cfg.num_stages}: "
            f"{_ptxas(k.asm['ptx'], ptxas)}, shared {k.metadata.shared} B, waits "
            f"{dict(sorted(waits.items()))}")  # fmt: skip


def compile_gluon(config: tuple, ptxas: str) -> str:
    bm, bn, bk, stages, warps = config
    k = sm90_aot.compile_int8_gluon(config)
    waits = Counter(str(v) for v in sm90_aot.wgmma_waits(k.asm["ptx"]))
    return (f"gluon int8 {bm}x{bn}x{bk} stages {stages} w{warps}: {_ptxas(k.asm['ptx'], ptxas)}, "
            f"shared {k.metadata.shared} B, wgmma.wait_group {dict(sorted(waits.items()))}")


def compile_gluon_split(config: tuple, ptxas: str, mode: int = 0) -> str:
    """gemm_gluon's split-nibble kernel: MODE 0 per-channel W4A8, 1 two-level grouped W4A8."""
    bn, bm, bh, stages, warps = config
    k = sm90_aot.compile_split_gluon(config, mode)
    ptx = k.asm["ptx"]
    waits = Counter(str(v) for v in sm90_aot.wgmma_waits(ptx))
    form = ("w4a8", "w4a8 two-level")[mode]
    return (f"gluon split {form} {bn}x{bm}x{bh} stages {stages} w{warps}: "
            f"{_ptxas(ptx, ptxas)}, shared {k.metadata.shared} B, wgmma.wait_group "
            f"{dict(sorted(waits.items()))}, wgmma {ptx.count('wgmma.mma_async')}")


def _ptxas(ptx: str, ptxas: str) -> str:
    regs, spill, why = sm90_aot.ptxas_report(ptx, ptxas)
    return (f"{regs} registers, {spill} B spilled"
            + (f", wgmma SERIALIZED: {why}" if why else ""))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--ptxas", default=None,
                   help="default: the ptxas this Triton bundles and compiles with (the GPU "
                        "machine's)")  # fmt: skip
    args = p.parse_args()
    if args.ptxas is None:
        args.ptxas = sm90_aot.bundled_ptxas()
    version = subprocess.run([args.ptxas, "--version"], capture_output=True, text=True)
    print(f"Triton {triton.__version__}, ptxas {version.stdout.strip().splitlines()[-1]}")
    for fp8 in (False, True):
        for cfg in CONFIGS:
            print(compile_one(cfg, fp8, args.ptxas), flush=True)
    from cbq_kernels import gemm_gluon

    for config in gemm_gluon.CONFIGS:
        print(compile_gluon(config, args.ptxas), flush=True)
    for config in gemm_gluon.SPLIT_CONFIGS:
        print(compile_gluon_split(config, args.ptxas), flush=True)
        if config[2] == 64:
            print(compile_gluon_split(config, args.ptxas, mode=1), flush=True)


if __name__ == "__main__":
    main()
