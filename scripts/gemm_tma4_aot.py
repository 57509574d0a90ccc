"""cbq_kernels.gemm_tma4 and cbq_kernels.gemm_gluon compiled ahead of time for sm_90a without a
GPU: per configuration (gemm_tma4: per form too, int8 activations and W4A4 codes as fp8 e4m3;
gemm_gluon: its int8 GEMM and its split-nibble kernel, W4A8 per channel and two-level and W4A16,
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
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cbq_kernels.gemm_tma4 import CONFIGS, _w4_split_kernel


def compile_one(cfg: triton.Config, fp8: bool, ptxas: str) -> str:
    bn, bm, bh = cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_H"]
    sig = {"a_desc": f"tensordesc<{'fp8e4nv' if fp8 else 'i8'}[{bm}, {bh}]>",
           "w_desc": f"tensordesc<u8[{bn}, {bh}]>", "wz_ptr": "*i32", "xs_ptr": "*fp32",
           "ws_ptr": "*fp32", "bias_ptr": "*fp32", "out_ptr": "*bf16", "M": "i32", "N": "i32",
           "K": "i32", "H": "i32"}  # fmt: skip
    const = {"HAS_Z": True, "HAS_BIAS": False, "DEBUG": False, "NUM_PROGRAMS": 132,
             "BLOCK_N": bn, "BLOCK_M": bm, "BLOCK_H": bh, "GROUP_M": 8, "FP8": fp8}  # fmt: skip
    sig.update(dict.fromkeys(const, "constexpr"))
    k = triton.compile(ASTSource(fn=_w4_split_kernel, signature=sig, constexprs=const),
                       target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": cfg.num_warps,
                                "num_stages": cfg.num_stages})  # fmt: skip
    waits = Counter(re.findall(r"pendings = (\d+)", k.asm["ttgir"]))
    return (f"{'fp8 ' if fp8 else 'int8'} {bn}x{bm}x{bh} w{cfg.num_warps} s{cfg.num_stages}: "
            f"{_ptxas(k.asm['ptx'], ptxas)}, shared {k.metadata.shared} B, waits "
            f"{dict(sorted(waits.items()))}")  # fmt: skip


def compile_gluon(config: tuple, ptxas: str) -> str:
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon._runtime import GluonASTSource

    from cbq_kernels.gemm_gluon import _int8_gluon_kernel

    bm, bn, bk, stages, warps = config
    a_layout = gl.NVMMASharedLayout.get_default_for([bm, bk], gl.int8)
    b_layout = gl.NVMMASharedLayout.get_default_for([bn, bk], gl.int8)
    sig = {"a_desc": f"tensordesc<i8[{bm}, {bk}],{a_layout!r}>",
           "b_desc": f"tensordesc<i8[{bn}, {bk}],{b_layout!r}>", "xs_ptr": "*fp32",
           "ws_ptr": "*fp32", "bias_ptr": "*fp32", "out_ptr": "*bf16", "M": "i32", "N": "i32",
           "K": "i32", "HAS_BIAS": "constexpr", "DEBUG": "constexpr",
           "NUM_STAGES": "constexpr", "num_warps": "constexpr"}  # fmt: skip
    const = {"HAS_BIAS": False, "DEBUG": False, "NUM_STAGES": stages, "num_warps": warps}
    k = triton.compile(GluonASTSource(fn=_int8_gluon_kernel, signature=sig, constexprs=const),
                       target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})  # fmt: skip
    waits = Counter(re.findall(r"wgmma\.wait_group\.sync\.aligned (\d+)", k.asm["ptx"]))
    return (f"gluon int8 {bm}x{bn}x{bk} stages {stages} w{warps}: {_ptxas(k.asm['ptx'], ptxas)}, "
            f"shared {k.metadata.shared} B, wgmma.wait_group {dict(sorted(waits.items()))}")


def compile_gluon_split(config: tuple, ptxas: str, mode: int = 0) -> str:
    """gemm_gluon's split-nibble kernel: MODE 0 per-channel W4A8, 1 two-level grouped W4A8,
    2 weight-only W4A16 (bf16 activations)."""
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon._runtime import GluonASTSource

    from cbq_kernels.gemm_gluon import _w4_split_gluon_kernel

    bn, bm, bh, stages, warps = config
    xdt, xsig = (gl.bfloat16, "bf16") if mode == 2 else (gl.int8, "i8")
    lay = gl.NVMMASharedLayout.get_default_for
    sig = {"x_desc": f"tensordesc<{xsig}[{bm}, {bh}],{lay([bm, bh], xdt)!r}>",
           "w_desc": f"tensordesc<u8[{bn}, {bh}],{lay([bn, bh], gl.uint8)!r}>",
           "p_desc": f"tensordesc<u8[{bn}, 16],{lay([bn, 16], gl.uint8)!r}>", "z_ptr": "*i32",
           "xsum_ptr": "*i32", "xs_ptr": "*fp32", "ws_ptr": "*fp32", "bias_ptr": "*fp32",
           "out_ptr": "*bf16", "M": "i32", "N": "i32", "H": "i32"}  # fmt: skip
    const = {"HAS_Z": mode == 0, "HAS_BIAS": False, "DEBUG": False, "MODE": mode, "GROUP_M": 8,
             "NUM_STAGES": stages, "num_warps": warps}  # fmt: skip
    sig.update(dict.fromkeys(const, "constexpr"))
    k = triton.compile(GluonASTSource(fn=_w4_split_gluon_kernel, signature=sig,
                                      constexprs=const),
                       target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})  # fmt: skip
    ptx = k.asm["ptx"]
    waits = Counter(re.findall(r"wgmma\.wait_group\.sync\.aligned (\d+)", ptx))
    form = ("w4a8", "w4a8 two-level", "w4a16")[mode]
    return (f"gluon split {form} {bn}x{bm}x{bh} stages {stages} w{warps}: "
            f"{_ptxas(ptx, ptxas)}, shared {k.metadata.shared} B, wgmma.wait_group "
            f"{dict(sorted(waits.items()))}, wgmma {ptx.count('wgmma.mma_async')}")


def _ptxas(ptx: str, ptxas: str) -> str:
    """'R registers, S B spilled' of ``ptxas -v`` on the PTX (its version lowered)."""
    ptx = re.sub(r"^\.version \d+\.\d+", ".version 8.7", ptx, flags=re.M)
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        r = subprocess.run([ptxas, "-arch=sm_90a", "-v", str(src), "-o", str(Path(d) / "k.o")],
                           capture_output=True, text=True, check=True)  # fmt: skip
    regs = re.search(r"Used (\d+) registers", r.stderr).group(1)
    spill = re.search(r"(\d+) bytes spill stores", r.stderr).group(1)
    # ptxas serialises wgmma (waits after each one) where it cannot prove the register
    # operands safe, and says so: "Potential Performance Loss: wgmma.mma_async instructions
    # are serialized due to ..."
    why = re.findall(r"serialized due to ([^\n.]*)", r.stderr)
    return (f"{regs} registers, {spill} B spilled"
            + (f", wgmma SERIALIZED: {sorted(set(why))}" if why else ""))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--ptxas", default=None,
                   help="default: the ptxas this Triton bundles and compiles with (the GPU "
                        "machine's)")  # fmt: skip
    args = p.parse_args()
    if args.ptxas is None:
        from triton.backends.nvidia.compiler import get_ptxas

        args.ptxas = get_ptxas(90).path
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
    for config in gemm_gluon.W4A16_CONFIGS:
        print(compile_gluon_split(config, args.ptxas, mode=2), flush=True)


if __name__ == "__main__":
    main()
