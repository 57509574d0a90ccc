"""Whether Triton keeps a Hopper wgmma in flight while the next K step is issued, per operand
type, read from the compiled TTGIR without a GPU (``triton.compile`` for sm_90).

One TMA matmul loop (128 x 256 tile, 8 warps, 3 stages), compiled for int8 (int32
accumulator), fp8 e4m3 and fp16 (fp32 accumulator). ``warp_group_dot_wait {pendings = 1}`` in
the loop: the MMA runs while the warpgroup issues the next one; ``pendings = 0`` right after
each dot: the warpgroup waits for every MMA to finish. Triton's WGMMA pipeliner
(lib/Dialect/TritonGPU/Transforms/Pipeliner/WGMMAPipeline.cpp, ``dotCanBeProperlyAsync``,
"Rule 2.1") makes no dot async whose accumulator is not fp32, so every int8 GEMM written in
Triton (cbq_kernels.gemm_tma, gemm_tma4, the pointer kernel) serialises its MMAs.

    python scripts/wgmma_async_check.py
"""

from __future__ import annotations

import re

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


@triton.jit
def _loop(a_desc, b_desc, out_ptr, M, N, K, INT: tl.constexpr, BM: tl.constexpr,
          BN: tl.constexpr, BK: tl.constexpr):  # fmt: skip
    pm = tl.program_id(0)
    pn = tl.program_id(1)
    if INT:
        acc = tl.zeros((BM, BN), tl.int32)
    else:
        acc = tl.zeros((BM, BN), tl.float32)
    for kt in range(tl.cdiv(K, BK)):
        a = a_desc.load([pm * BM, kt * BK])
        b = b_desc.load([pn * BN, kt * BK])
        if INT:
            acc = tl.dot(a, b.T, acc, out_dtype=tl.int32)
        else:
            acc = tl.dot(a, b.T, acc)
    rm = pm * BM + tl.arange(0, BM)
    rn = pn * BN + tl.arange(0, BN)
    tl.store(out_ptr + rm[:, None] * N + rn[None, :], acc.to(tl.float32))


def pendings(dtype: str, block_k: int) -> list[str]:
    sig = {"a_desc": f"tensordesc<{dtype}[128, {block_k}]>",
           "b_desc": f"tensordesc<{dtype}[256, {block_k}]>", "out_ptr": "*fp32", "M": "i32",
           "N": "i32", "K": "i32", "INT": "constexpr", "BM": "constexpr", "BN": "constexpr",
           "BK": "constexpr"}  # fmt: skip
    const = {"INT": dtype == "i8", "BM": 128, "BN": 256, "BK": block_k}
    k = triton.compile(ASTSource(fn=_loop, signature=sig, constexprs=const),
                       target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": 8, "num_stages": 3})  # fmt: skip
    return re.findall(r"pendings = \d+", k.asm["ttgir"])


def main() -> None:
    print(f"Triton {triton.__version__}")
    for dtype, block_k in (("i8", 128), ("fp8e4nv", 128), ("fp16", 64)):
        print(f"{dtype:8s} warp_group_dot_wait: {', '.join(pendings(dtype, block_k))}")


if __name__ == "__main__":
    main()
