"""Ahead-of-time compiles for sm_90a without a GPU, the one place that knows the signatures
of the experimental prefill kernels (cbq_kernels.gemm_tma4's split-nibble kernel,
cbq_kernels.gemm_gluon's int8 GEMM and split-nibble kernel): scripts/gemm_tma4_aot.py
reports their registers, spills, waits and ptxas's verdict, and test_gemm_gluon.py checks
them. Not for the served path: nothing here is imported by the kernels.

Call these in a process without ``TRITON_INTERPRET`` (the interpreter's patched operators leak
into an in-process compile).
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget

_TARGET = GPUTarget("cuda", 90, 32)


def compile_tma4(cfg: triton.Config, fp8: bool):
    """gemm_tma4's ``_w4_split_kernel`` at autotuner configuration ``cfg``, int8 activations
    or (``fp8``) W4A4 codes as e4m3."""
    from triton.compiler import ASTSource

    from cbq_kernels.gemm_tma4 import _w4_split_kernel

    bn, bm, bh = cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_H"]
    sig = {"a_desc": f"tensordesc<{'fp8e4nv' if fp8 else 'i8'}[{bm}, {bh}]>",
           "w_desc": f"tensordesc<u8[{bn}, {bh}]>", "wz_ptr": "*i32", "xs_ptr": "*fp32",
           "ws_ptr": "*fp32", "bias_ptr": "*fp32", "out_ptr": "*bf16", "M": "i32", "N": "i32",
           "K": "i32", "H": "i32"}  # fmt: skip
    const = {"HAS_Z": True, "HAS_BIAS": False, "DEBUG": False, "NUM_PROGRAMS": 132,
             "BLOCK_N": bn, "BLOCK_M": bm, "BLOCK_H": bh, "GROUP_M": 8, "FP8": fp8}  # fmt: skip
    sig.update(dict.fromkeys(const, "constexpr"))
    return triton.compile(ASTSource(fn=_w4_split_kernel, signature=sig, constexprs=const),
                          target=_TARGET, options={"num_warps": cfg.num_warps,
                                                   "num_stages": cfg.num_stages})  # fmt: skip


def compile_int8_gluon(config: tuple):
    """gemm_gluon's int8 GEMM at ``config`` (an entry of gemm_gluon.CONFIGS)."""
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon._runtime import GluonASTSource

    from cbq_kernels.gemm_gluon import _int8_gluon_kernel

    bm, bn, bk, stages, warps = config
    lay = gl.NVMMASharedLayout.get_default_for
    sig = {"a_desc": f"tensordesc<i8[{bm}, {bk}],{lay([bm, bk], gl.int8)!r}>",
           "b_desc": f"tensordesc<i8[{bn}, {bk}],{lay([bn, bk], gl.int8)!r}>", "xs_ptr": "*fp32",
           "ws_ptr": "*fp32", "bias_ptr": "*fp32", "out_ptr": "*bf16", "M": "i32", "N": "i32",
           "K": "i32", "HAS_BIAS": "constexpr", "DEBUG": "constexpr",
           "NUM_STAGES": "constexpr", "num_warps": "constexpr"}  # fmt: skip
    const = {"HAS_BIAS": False, "DEBUG": False, "NUM_STAGES": stages, "num_warps": warps}
    return triton.compile(GluonASTSource(fn=_int8_gluon_kernel, signature=sig, constexprs=const),
                          target=_TARGET, options={"num_warps": warps})  # fmt: skip


def compile_split_gluon(config: tuple, mode: int = 0):
    """gemm_gluon's split-nibble kernel at ``config`` (SPLIT_CONFIGS): MODE 0 per-channel
    W4A8, 1 two-level grouped W4A8."""
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon._runtime import GluonASTSource

    from cbq_kernels.gemm_gluon import _w4_split_gluon_kernel

    bn, bm, bh, stages, warps = config
    lay = gl.NVMMASharedLayout.get_default_for
    sig = {"x_desc": f"tensordesc<i8[{bm}, {bh}],{lay([bm, bh], gl.int8)!r}>",
           "w_desc": f"tensordesc<u8[{bn}, {bh}],{lay([bn, bh], gl.uint8)!r}>",
           "p_desc": f"tensordesc<u8[{bn}, 16],{lay([bn, 16], gl.uint8)!r}>", "z_ptr": "*i32",
           "xsum_ptr": "*i32", "xs_ptr": "*fp32", "ws_ptr": "*fp32", "bias_ptr": "*fp32",
           "out_ptr": "*bf16", "M": "i32", "N": "i32", "H": "i32"}  # fmt: skip
    const = {"HAS_Z": mode == 0, "HAS_BIAS": False, "DEBUG": False, "MODE": mode, "GROUP_M": 8,
             "NUM_STAGES": stages, "num_warps": warps}  # fmt: skip
    sig.update(dict.fromkeys(const, "constexpr"))
    return triton.compile(GluonASTSource(fn=_w4_split_gluon_kernel, signature=sig,
                                         constexprs=const),
                          target=_TARGET, options={"num_warps": warps})  # fmt: skip


def wgmma_waits(ptx: str) -> list[int]:
    """The ``wgmma.wait_group`` counts of the PTX, one entry per wait."""
    return [int(v) for v in re.findall(r"wgmma\.wait_group\.sync\.aligned (\d+)", ptx)]


def ttgir_pendings(ttgir: str) -> list[int]:
    """The ``pendings`` of the TTGIR's ``warp_group_dot_wait`` ops (Triton kernels)."""
    return [int(v) for v in re.findall(r"pendings = (\d+)", ttgir)]


def bundled_ptxas() -> str:
    """The ptxas this Triton compiles sm_90 with (what the GPU machine runs)."""
    from triton.backends.nvidia.compiler import get_ptxas

    return get_ptxas(90).path


def ptxas_report(ptx: str, ptxas: str | None = None) -> tuple[int, int, list[str]]:
    """(registers, bytes spilled, why wgmma was serialised: [] when it was not) from ``ptxas
    -v`` on the PTX, its ``.version`` lowered to one every ptxas from 12.8 on reads. ptxas
    serialises wgmma (a wait after each one) where it cannot prove the register operands
    safe, whatever waits the PTX asks for, and says so: "Potential Performance Loss:
    wgmma.mma_async instructions are serialized due to ..."."""
    ptx = re.sub(r"^\.version \d+\.\d+", ".version 8.7", ptx, flags=re.M)
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        r = subprocess.run([ptxas or bundled_ptxas(), "-arch=sm_90a", "-v", str(src), "-o",
                            str(Path(d) / "k.o")], capture_output=True, text=True,
                           check=True)  # fmt: skip
    regs = int(re.search(r"Used (\d+) registers", r.stderr).group(1))
    spill = int(re.search(r"(\d+) bytes spill stores", r.stderr).group(1))
    return regs, spill, sorted(set(re.findall(r"serialized due to ([^\n.]*)", r.stderr)))
