"""The prefill int8 x int8 GEMM in Gluon (Triton's lower-level dialect) with its MMAs kept in
flight. Experimental, written without a GPU (2026-12-06): not in the served dispatch; the GPU
test and bench_gemm's ``w4a8_gluon`` rows are ``gpu_lease.sh OUT split``.

Why: Triton never keeps an MMA with an int32 accumulator in flight (its WGMMA pipeliner,
``dotCanBeProperlyAsync``, "Rule 2.1"; scripts/wgmma_async_check.py): each int8 MMA of the TMA
kernel (:mod:`cbq_kernels.gemm_tma`) is waited on before the next one is issued, and Nsight
Compute read its tensor pipe busy 68% of the time against cuBLAS fp8's 91% (H100, 2048 x 28672
x 8192). Gluon leaves the wait to the kernel: here each K step issues its MMA asynchronously
and waits only until one MMA is outstanding (the previous step's), so the tensor core always
has the next MMA queued, and a ring of NUM_STAGES shared-memory buffers filled by TMA (one
mbarrier each) runs NUM_STAGES - 1 tiles ahead. A stage is refilled only after the MMA that
read it has completed (the wait above), so no copy overwrites a tile still being read.

Same contract as gemm_tma: x (M, K) int8 codes, w (N, K) int8 (the expanded ``q - z``), out =
``(acc * s_w[n]) * s_x[m]`` (+ bias) in the output dtype, the same two fp32 products in the
same order, so the same bits on the exact int32 sums. Needs Hopper (wgmma) and K % 16 == 0.
"""

from __future__ import annotations

import torch
import triton
from torch import Tensor

from cbq_kernels.gemm_tma import tma_operand

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    # the TMA load's name: async_copy_global_to_shared in Triton 3.6 (the GPU machine's),
    # async_load from 3.7 on (3.9 raises on the old name)
    _tma_load = tma.async_load if hasattr(tma, "async_load") else tma.async_copy_global_to_shared
except ImportError:  # pragma: no cover - a Triton without Gluon: gemm_tma serves
    gluon = None

# int8 wgmma instruction widths (n) the hardware takes
_INT8_N = (224, 208, 192, 176, 160, 144, 128, 112, 96, 80, 64, 48, 32, 24, 16, 8)


def available(x: Tensor) -> bool:
    """Gluon present, a Hopper GPU, int8 activations a TMA descriptor can address."""
    return (gluon is not None and x.device.type == "cuda" and x.dtype == torch.int8
            and x.dim() == 2 and tma_operand(x)
            and torch.cuda.get_device_capability(x.device)[0] == 9)  # fmt: skip


if gluon is not None:

    @gluon.constexpr_function
    def _warps_per_cta(block_m, num_warps):
        w = [4, 1]
        while w[0] * w[1] != num_warps:
            if block_m > 16 * w[0]:
                w[0] *= 2
            else:
                w[1] *= 2
        return w

    @gluon.constexpr_function
    def _instr_n(block_m, block_n, num_warps):
        m_reps = -(-block_m // 16)
        n_reps = -(-num_warps // m_reps)
        max_n = max(block_n // n_reps, 8)
        return next(n for n in _INT8_N if n <= max_n and block_n % n == 0)

    @gluon.jit
    def _int8_gluon_kernel(a_desc, b_desc, xs_ptr, ws_ptr, bias_ptr, out_ptr, M, N, K,
                           HAS_BIAS: gl.constexpr, DEBUG: gl.constexpr,
                           NUM_STAGES: gl.constexpr, num_warps: gl.constexpr):  # fmt: skip
        BLOCK_M: gl.constexpr = a_desc.block_type.shape[0]
        BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
        BLOCK_N: gl.constexpr = b_desc.block_type.shape[0]
        off_m = gl.program_id(0) * BLOCK_M
        off_n = gl.program_id(1) * BLOCK_N
        mma: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=_warps_per_cta(BLOCK_M, num_warps),
            instr_shape=[16, _instr_n(BLOCK_M, BLOCK_N, num_warps), 32])  # fmt: skip
        a_bufs = gl.allocate_shared_memory(a_desc.dtype, [NUM_STAGES, BLOCK_M, BLOCK_K],
                                           a_desc.layout)  # fmt: skip
        b_bufs = gl.allocate_shared_memory(b_desc.dtype, [NUM_STAGES, BLOCK_N, BLOCK_K],
                                           b_desc.layout)  # fmt: skip
        bars = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(NUM_STAGES):
            mbarrier.init(bars.index(i), count=1)
        nbytes: gl.constexpr = a_desc.block_type.nbytes + b_desc.block_type.nbytes
        k_tiles = gl.cdiv(K, BLOCK_K)
        for i in gl.static_range(NUM_STAGES - 1):  # the first NUM_STAGES - 1 tiles
            p = i < k_tiles
            mbarrier.expect(bars.index(i), nbytes, pred=p)
            _tma_load(a_desc, [off_m, i * BLOCK_K], bars.index(i), a_bufs.index(i), pred=p)
            _tma_load(b_desc, [off_n, i * BLOCK_K], bars.index(i), b_bufs.index(i), pred=p)
        acc = gl.zeros((BLOCK_M, BLOCK_N), dtype=gl.int32, layout=mma)
        for kt in range(k_tiles):
            s = kt % NUM_STAGES
            mbarrier.wait(bars.index(s), (kt // NUM_STAGES) & 1)
            acc = warpgroup_mma(a_bufs.index(s), b_bufs.index(s).permute((1, 0)), acc,
                                is_async=True)  # fmt: skip
            # at most this MMA outstanding: the previous one has read its stage, refill it
            acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
            nk = kt + NUM_STAGES - 1
            ns = nk % NUM_STAGES
            p = nk < k_tiles
            mbarrier.expect(bars.index(ns), nbytes, pred=p)
            _tma_load(a_desc, [off_m, nk * BLOCK_K], bars.index(ns), a_bufs.index(ns),
                      pred=p)  # fmt: skip
            _tma_load(b_desc, [off_n, nk * BLOCK_K], bars.index(ns), b_bufs.index(ns),
                      pred=p)  # fmt: skip
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        for i in gl.static_range(NUM_STAGES):
            mbarrier.invalidate(bars.index(i))
        rm = off_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, mma))
        rn = off_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, mma))
        mm = rm < M
        mn = rn < N
        mo = mm[:, None] & mn[None, :]
        ptrs = out_ptr + rm.to(gl.int64)[:, None] * N + rn[None, :]
        if DEBUG:
            gl.store(ptrs, acc, mask=mo)
        else:
            out = acc.to(gl.float32) * gl.load(ws_ptr + rn, mask=mn, other=0.0)[None, :]
            out = out * gl.load(xs_ptr + rm, mask=mm, other=0.0)[:, None]
            if HAS_BIAS:
                out += gl.load(bias_ptr + rn, mask=mn, other=0.0).to(gl.float32)[None, :]
            gl.store(ptrs, out.to(out_ptr.dtype.element_ty), mask=mo)


# (BLOCK_M, BLOCK_N, BLOCK_K, NUM_STAGES, num_warps): 8 warps as two warpgroups along M
CONFIGS = ((128, 256, 128, 3, 8), (128, 128, 128, 4, 8), (128, 256, 64, 4, 8),
           (64, 256, 128, 4, 4))  # fmt: skip


def gemm_int8_gluon(x: Tensor, xs: Tensor, w: Tensor, ws: Tensor, bias: Tensor | None,
                    out_dtype: torch.dtype, config: tuple | None = None,
                    debug: bool = False) -> Tensor:  # fmt: skip
    """(M, N) = ((x @ w^T) * ws[n]) * xs[m] (+ bias): x (M, K) int8, w (N, K) int8, xs (M,),
    ws (N,) fp32; ``debug``: the int32 sums. ``config``: one of :data:`CONFIGS` (default the
    first)."""
    if not available(x):
        raise ValueError(f"gemm_int8_gluon needs Triton's Gluon, a Hopper GPU and int8 x (M, K) "
                         f"contiguous with K % 16 == 0, got {x.dtype} {tuple(x.shape)} on "
                         f"{x.device}")  # fmt: skip
    if w.dtype != torch.int8 or w.dim() != 2 or w.shape[1] != x.shape[1] or not tma_operand(w):
        raise ValueError(f"gemm_int8_gluon needs an int8 weight (N, {x.shape[1]}), contiguous, "
                         f"got {w.dtype} {tuple(w.shape)}")  # fmt: skip
    m, k = x.shape
    n = w.shape[0]
    out = torch.empty((m, n), dtype=torch.int32 if debug else out_dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    bm, bn, bk, stages, warps = config if config is not None else CONFIGS[0]
    a_layout = gl.NVMMASharedLayout.get_default_for([bm, bk], gl.int8)
    b_layout = gl.NVMMASharedLayout.get_default_for([bn, bk], gl.int8)
    a = TensorDescriptor(x, list(x.shape), list(x.stride()), [bm, bk], a_layout)
    b = TensorDescriptor(w, list(w.shape), list(w.stride()), [bn, bk], b_layout)
    xs, ws = xs.float().contiguous(), ws.float().contiguous()
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    _int8_gluon_kernel[grid](a, b, xs, ws, bias if bias is not None else ws, out, m, n, k,
                             HAS_BIAS=bias is not None, DEBUG=debug, NUM_STAGES=stages,
                             num_warps=warps)  # fmt: skip
    return out
