"""Prefill GEMMs in Gluon (Triton's lower-level dialect) with their MMAs kept in flight: the
int8 x int8 GEMM (:func:`gemm_int8_gluon`), and the split-nibble kernel that reads the 4-bit
weight itself, unpacking it in the K loop (no expansion pass): W4A8 per channel and two-level
grouped (:func:`gemm_w4a8_split_gluon`).
Written without a GPU (sessions 10 and 11, 2026-12-06). The int8 GEMM serves the integer
path after expansion at ``GemmPolicy.gluon_min_m`` .. ``gluon_max_m`` (measured: the
policy's comment); the split-nibble kernel is experimental, not in the served dispatch. The
GPU tests and bench_gemm's ``int8_gluon`` / ``w4a8_split_gluon`` / ``w4a8_2lvl_gluon`` /
``w4a8_gluon`` rows are ``gpu_lease.sh OUT split`` / ``gtable``. (Its weight-only W4A16 form ran at
0.48-0.51x cuBLAS bf16 on the H100 and was removed: docs/DECISIONS.md, "The Gluon prefill
kernels measured".)

Why: Triton never keeps an MMA with an int32 accumulator in flight (its WGMMA pipeliner,
``dotCanBeProperlyAsync``, "Rule 2.1"; scripts/wgmma_async_check.py): each int8 MMA of the TMA
kernel (:mod:`cbq_kernels.gemm_tma`) is waited on before the next one is issued, and Nsight
Compute read its tensor pipe busy 68% of the time against cuBLAS fp8's 91% (H100, 2048 x 28672
x 8192). Gluon leaves the wait to the kernel: here each K step issues its MMA asynchronously
and waits only until one MMA is outstanding (the previous step's), so the tensor core always
has the next MMA queued, and a ring of NUM_STAGES shared-memory buffers filled by TMA (one
mbarrier each) runs NUM_STAGES - 1 tiles ahead. A stage is refilled only after the MMA that
read it has completed (the wait above), so no copy overwrites a tile still being read.

The int8 GEMM has gemm_tma's contract: x (M, K) int8 codes, w (N, K) int8 (the expanded ``q -
z``), out = ``(acc * s_w[n]) * s_x[m]`` (+ bias) in the output dtype, the same two fp32
products in the same order, so the same bits on the exact int32 sums. Needs Hopper (wgmma)
and K % 16 == 0. The split kernel's forms: their functions' docstrings.
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
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    # the TMA load's name: async_copy_global_to_shared in Triton 3.6 (the GPU machine's),
    # async_load from 3.7 on (3.9 raises on the old name)
    _tma_load = tma.async_load if hasattr(tma, "async_load") else tma.async_copy_global_to_shared
    # the CTA barrier: gl.thread_barrier in Triton 3.6, gl.barrier in 3.9
    _cta_barrier = gl.barrier if hasattr(gl, "barrier") else gl.thread_barrier
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

    @gluon.jit
    def _split_load(w_desc, x_desc, p_desc, bars, w_bufs, lo_bufs, hi_bufs, p_bufs, t, p, off_n,
                    off_m, H, MODE: gl.constexpr, NUM_STAGES: gl.constexpr):  # fmt: skip
        """K step t's weight bytes, its two activation tiles (and MODE 1: its 16 bytes of
        group parameters per row) into stage t % NUM_STAGES (if p)."""
        BLOCK_H: gl.constexpr = w_desc.block_type.shape[1]
        nbytes: gl.constexpr = (w_desc.block_type.nbytes + 2 * x_desc.block_type.nbytes
                                + (p_desc.block_type.nbytes if MODE != 0 else 0))  # fmt: skip
        s = t % NUM_STAGES
        mbarrier.expect(bars.index(s), nbytes, pred=p)
        _tma_load(w_desc, [off_n, t * BLOCK_H], bars.index(s), w_bufs.index(s), pred=p)
        _tma_load(x_desc, [off_m, t * BLOCK_H], bars.index(s), lo_bufs.index(s), pred=p)
        _tma_load(x_desc, [off_m, H + t * BLOCK_H], bars.index(s), hi_bufs.index(s), pred=p)
        if MODE != 0:
            _tma_load(p_desc, [off_n, t * 16], bars.index(s), p_bufs.index(s), pred=p)

    @gluon.jit
    def _param_words(p_bufs, s, rows: gl.constexpr, num_warps: gl.constexpr):
        """Step s's 16 parameter bytes per row as four 32-bit words, in the layout ``rows``:
        read one row per thread, then moved (read in the unpack layout itself, replicated
        along the row, or from global memory in the loop, they made ptxas serialise every
        wgmma: scripts/gemm_tma4_aot.py)."""
        prow: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 16], threads_per_warp=[32, 1],
                                              warps_per_cta=[num_warps, 1], order=[1, 0])
        pt = p_bufs.index(s).load(prow).to(gl.int32)
        col = gl.arange(0, 16, layout=gl.SliceLayout(0, prow))[None, :]
        pt = pt << (8 * (col % 4))  # byte b of word j at bits 8 b
        w0 = gl.convert_layout(gl.sum(gl.where(col < 4, pt, 0), axis=1), rows)
        w1 = gl.convert_layout(gl.sum(gl.where((col >= 4) & (col < 8), pt, 0), axis=1), rows)
        w2 = gl.convert_layout(gl.sum(gl.where((col >= 8) & (col < 12), pt, 0), axis=1), rows)
        w3 = gl.convert_layout(gl.sum(gl.where(col >= 12, pt, 0), axis=1), rows)
        return w0, w1, w2, w3

    @gluon.jit
    def _split_step(w_bufs, lo_bufs, hi_bufs, p_bufs, a_lo, a_hi, bars, acc,
                    unpack: gl.constexpr, t, MODE: gl.constexpr,
                    NUM_STAGES: gl.constexpr):  # fmt: skip
        """K step t: its weight bytes (shared -> registers, 16 per thread) -> low and high
        operand tiles -> the A buffers of parity t % 2 in shared memory; two asynchronous
        MMAs; then wait until only they are in flight: step t - 1's MMAs are done, so its
        stage may be refilled, and the A buffers step t + 1 writes (parity of t - 1) are no
        longer read. MODE 0: the codes, one AND (low), a shift and an AND (high), four per
        instruction. MODE 1 (two-level): then times the group's integer scale s2 (one 32-bit
        multiply per four codes: q s2 <= 240 stays in its byte) plus (256 - s2 z) mod 256
        bytewise (an add with the carries cut at the byte borders), which is s2 (q - z) as a
        signed byte (|s2 (q - z)| <= 127 by the format, two_level_params)."""
        s = t % NUM_STAGES
        mbarrier.wait(bars.index(s), (t // NUM_STAGES) & 1)
        wb = w_bufs.index(s).load(unpack)
        rows: gl.constexpr = gl.SliceLayout(1, unpack)
        if MODE == 1:
            # bytes 0-3 of the row's parameters: s2 and (256 - s2 z) mod 256 of the low tile's
            # group, then of the high tile's
            w0, _w1, _w2, _w3 = _param_words(p_bufs, s, rows, gl.num_warps())
            s_lo = w0 & 255
            c_lo = ((w0 >> 8) & 255) * 0x01010101
            s_hi = (w0 >> 16) & 255
            c_hi = ((w0 >> 24) & 255) * 0x01010101
            zero = gl.zeros(wb.shape, gl.int32, layout=unpack)
            # 32-bit operands: four registers each with pack = 4 (the same value; $3, $7, $11,
            # $15 are read)
            lo, hi = gl.inline_asm_elementwise(
                "{\n\t.reg .b32 a, m, c;\n\t"
                "and.b32 a, $2, 0x0F0F0F0F;\n\tmul.lo.u32 a, a, $3;\n\t"
                "xor.b32 c, a, $7;\n\tand.b32 c, c, 0x80808080;\n\tand.b32 a, a, 0x7F7F7F7F;\n\t"
                "and.b32 m, $7, 0x7F7F7F7F;\n\tadd.u32 a, a, m;\n\txor.b32 $0, a, c;\n\t"
                "shr.u32 a, $2, 4;\n\tand.b32 a, a, 0x0F0F0F0F;\n\tmul.lo.u32 a, a, $11;\n\t"
                "xor.b32 c, a, $15;\n\tand.b32 c, c, 0x80808080;\n\tand.b32 a, a, 0x7F7F7F7F;\n\t"
                "and.b32 m, $15, 0x7F7F7F7F;\n\tadd.u32 a, a, m;\n\txor.b32 $1, a, c;\n\t}",
                "=r,=r,r" + ",r" * 16,
                [wb, zero + s_lo[:, None], zero + c_lo[:, None], zero + s_hi[:, None],
                 zero + c_hi[:, None]], dtype=(gl.int8, gl.int8), is_pure=True,
                pack=4)  # fmt: skip
        else:
            lo, hi = gl.inline_asm_elementwise(
                "and.b32 $0, $2, 0x0F0F0F0F;\n\tshr.u32 $1, $2, 4;\n\t"
                "and.b32 $1, $1, 0x0F0F0F0F;", "=r,=r,r", [wb], dtype=(gl.int8, gl.int8),
                is_pure=True, pack=4)  # fmt: skip
        b = t % 2
        a_lo.index(b).store(lo)
        a_hi.index(b).store(hi)
        fence_async_shared()  # the generic-proxy stores, visible to the MMAs (async proxy)
        _cta_barrier()  # every warp's rows written
        acc = warpgroup_mma(a_lo.index(b), lo_bufs.index(s).permute((1, 0)), acc, is_async=True)
        acc = warpgroup_mma(a_hi.index(b), hi_bufs.index(s).permute((1, 0)), acc, is_async=True)
        return warpgroup_mma_wait(num_outstanding=2, deps=(acc,))

    @gluon.jit
    def _w4_split_gluon_kernel(x_desc, w_desc, p_desc, z_ptr, xsum_ptr, xs_ptr, ws_ptr,
                               bias_ptr, out_ptr, M, N, H, HAS_Z: gl.constexpr,
                               HAS_BIAS: gl.constexpr, DEBUG: gl.constexpr,
                               MODE: gl.constexpr, GROUP_M: gl.constexpr,
                               NUM_STAGES: gl.constexpr, num_warps: gl.constexpr):  # fmt: skip
        """out^T = q x^T, swapped so that the weight rows are the MMA's M side (BLOCK_N a
        multiple of 16 num_warps; warpgroups of 64 rows) and the activation rows its N side
        (up to 256 per tile): per K
        step, TMA brings BLOCK_H split-nibble bytes per weight row and two activation tiles
        (columns j.. and H + j..) into a ring of NUM_STAGES stages; the bytes are unpacked in
        registers into two int8 code tiles stored in shared memory as the A operands (wgmma
        with A in registers is what would skip that store, but ptxas serialised every such
        wgmma here: Triton cannot keep int8 register operands alive across the wait,
        "Unexpected bitwidth in WGMMAWaitGroupOp: 8", Triton 3.6 and 3.9). The zero points
        leave after the K loop, ``acc - z[n] * sum_k x[m, k]`` (exact in int32), so padding
        codes are 0 and nothing in the loop is masked: the bytes past H and the activation
        columns past K are TMA's zero fill, and split_nibbles writes code 0 where H + j >= K.
        MODE 1, two-level (grouped W4A8 without a float rescale in the loop): the codes become
        s2 (q - z) per group of 64 in the unpack (p_desc: two_level_params, 16 bytes per row
        and K step); BLOCK_H = 64 and K % 128 == 0, so each tile is one group and no tile
        reaches past H."""
        BLOCK_N: gl.constexpr = w_desc.block_type.shape[0]
        BLOCK_H: gl.constexpr = w_desc.block_type.shape[1]
        BLOCK_M: gl.constexpr = x_desc.block_type.shape[0]
        # grouped order (gemm_tma.grouped_tile): GROUP_M activation row tiles share each weight
        # tile while it is in L2
        num_m = gl.cdiv(M, BLOCK_M)
        num_n = gl.cdiv(N, BLOCK_N)
        tile = gl.program_id(0)
        in_group = GROUP_M * num_n
        first_m = (tile // in_group) * GROUP_M
        size_m = gl.minimum(num_m - first_m, GROUP_M)
        off_m = (first_m + (tile % in_group) % size_m) * BLOCK_M
        off_n = ((tile % in_group) // size_m) * BLOCK_N
        mma: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=_warps_per_cta(BLOCK_N, num_warps),
            instr_shape=[16, _instr_n(BLOCK_N, BLOCK_M, num_warps), 32])  # fmt: skip
        # the byte tile in registers: 16 consecutive bytes of one row per thread
        unpack: gl.constexpr = gl.BlockedLayout(
            size_per_thread=[1, 16], threads_per_warp=[32 * 16 // BLOCK_H, BLOCK_H // 16],
            warps_per_cta=[num_warps, 1], order=[1, 0])  # fmt: skip
        w_bufs = gl.allocate_shared_memory(w_desc.dtype, [NUM_STAGES, BLOCK_N, BLOCK_H],
                                           w_desc.layout)  # fmt: skip
        lo_bufs = gl.allocate_shared_memory(x_desc.dtype, [NUM_STAGES, BLOCK_M, BLOCK_H],
                                            x_desc.layout)  # fmt: skip
        hi_bufs = gl.allocate_shared_memory(x_desc.dtype, [NUM_STAGES, BLOCK_M, BLOCK_H],
                                            x_desc.layout)  # fmt: skip
        a_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_H],
                                                                      gl.int8)  # fmt: skip
        p_bufs = gl.allocate_shared_memory(p_desc.dtype, [NUM_STAGES if MODE != 0 else 1,
                                                          BLOCK_N, 16], p_desc.layout)  # fmt: skip
        a_lo = gl.allocate_shared_memory(gl.int8, [2, BLOCK_N, BLOCK_H], a_layout)
        a_hi = gl.allocate_shared_memory(gl.int8, [2, BLOCK_N, BLOCK_H], a_layout)
        bars = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(NUM_STAGES):
            mbarrier.init(bars.index(i), count=1)
        h_tiles = gl.cdiv(H, BLOCK_H)
        for i in gl.static_range(NUM_STAGES - 1):
            _split_load(w_desc, x_desc, p_desc, bars, w_bufs, lo_bufs, hi_bufs, p_bufs, i,
                        i < h_tiles, off_n, off_m, H, MODE, NUM_STAGES)  # fmt: skip
        acc = gl.zeros((BLOCK_N, BLOCK_M), dtype=gl.int32, layout=mma)
        for t in range(h_tiles):
            acc = _split_step(w_bufs, lo_bufs, hi_bufs, p_bufs, a_lo, a_hi, bars, acc, unpack, t,
                              MODE, NUM_STAGES)  # fmt: skip
            _split_load(w_desc, x_desc, p_desc, bars, w_bufs, lo_bufs, hi_bufs, p_bufs,
                        t + NUM_STAGES - 1, t + NUM_STAGES - 1 < h_tiles, off_n, off_m, H,
                        MODE, NUM_STAGES)  # fmt: skip
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        for i in gl.static_range(NUM_STAGES):
            mbarrier.invalidate(bars.index(i))
        # the transposed tile to a layout whose threads run along n (16-byte stores of
        # consecutive output columns) before the epilogue's loads and the store
        st: gl.constexpr = gl.BlockedLayout(size_per_thread=[8, 1], threads_per_warp=[16, 2],
                                            warps_per_cta=[1, num_warps], order=[0, 1])
        acc = gl.convert_layout(acc, st)
        rn = off_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, st))
        rm = off_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, st))
        mn = rn < N
        mm = rm < M
        if HAS_Z:
            z = gl.load(z_ptr + rn, mask=mn, other=0)
            acc = acc - z[:, None] * gl.load(xsum_ptr + rm, mask=mm, other=0)[None, :]
        mo = mn[:, None] & mm[None, :]
        ptrs = out_ptr + rm.to(gl.int64)[None, :] * N + rn[:, None]
        if DEBUG:
            gl.store(ptrs, acc, mask=mo)
        else:
            out = acc.to(gl.float32) * gl.load(ws_ptr + rn, mask=mn, other=0.0)[:, None]
            out = out * gl.load(xs_ptr + rm, mask=mm, other=0.0)[None, :]
            if HAS_BIAS:
                out += gl.load(bias_ptr + rn, mask=mn, other=0.0).to(gl.float32)[:, None]
            gl.store(ptrs, out.to(out_ptr.dtype.element_ty), mask=mo)


# (BLOCK_M, BLOCK_N, BLOCK_K, NUM_STAGES, num_warps): 8 warps as two warpgroups along M
# (shared memory: 96-192 KB of the H100's 227; the 128 x 256 int32 accumulator 128 registers
# a thread)
CONFIGS = ((128, 256, 128, 3, 8), (128, 128, 128, 4, 8), (128, 256, 64, 4, 8),
           (64, 256, 128, 4, 4), (128, 256, 128, 4, 8), (256, 128, 128, 3, 8))  # fmt: skip


def gemm_int8_gluon(x: Tensor, xs: Tensor, w: Tensor, ws: Tensor, bias: Tensor | None,
                    out_dtype: torch.dtype, config: tuple | None = None,
                    debug: bool = False) -> Tensor:  # fmt: skip
    """(M, N) = ((x @ w^T) * ws[n]) * xs[m] (+ bias): x (M, K) int8, w (N, K) int8, xs (M,),
    ws (N,) fp32; ``debug``: the int32 sums. ``config``: one of :data:`CONFIGS`; None: the
    fastest of them at this (M bucket, N, K), timed once per process (:func:`_chosen`)."""
    if not available(x):
        raise ValueError(f"gemm_int8_gluon needs Triton's Gluon, a Hopper GPU and int8 x (M, K) "
                         f"contiguous with K % 16 == 0, got {x.dtype} {tuple(x.shape)} on "
                         f"{x.device}")  # fmt: skip
    if w.dtype != torch.int8 or w.dim() != 2 or w.shape[1] != x.shape[1] or not tma_operand(w):
        raise ValueError(f"gemm_int8_gluon needs an int8 weight (N, {x.shape[1]}), contiguous, "
                         f"got {w.dtype} {tuple(w.shape)}")  # fmt: skip
    m, n = x.shape[0], w.shape[0]
    out = torch.empty((m, n), dtype=torch.int32 if debug else out_dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    xs, ws = xs.float().contiguous(), ws.float().contiguous()
    args = (x, xs, w, ws, bias, out, debug)
    _launch_int8(*args, config if config is not None else _chosen(*args))
    return out


def _launch_int8(x: Tensor, xs: Tensor, w: Tensor, ws: Tensor, bias: Tensor | None, out: Tensor,
                 debug: bool, config: tuple) -> None:  # fmt: skip
    bm, bn, bk, stages, warps = config
    a_layout = gl.NVMMASharedLayout.get_default_for([bm, bk], gl.int8)
    b_layout = gl.NVMMASharedLayout.get_default_for([bn, bk], gl.int8)
    a = TensorDescriptor(x, list(x.shape), list(x.stride()), [bm, bk], a_layout)
    b = TensorDescriptor(w, list(w.shape), list(w.stride()), [bn, bk], b_layout)
    (m, k), n = x.shape, w.shape[0]
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    _int8_gluon_kernel[grid](a, b, xs, ws, bias if bias is not None else ws, out, m, n, k,
                             HAS_BIAS=bias is not None, DEBUG=debug, NUM_STAGES=stages,
                             num_warps=warps)  # fmt: skip


# The configuration chosen per (device, M bucket, N, K): the first call at a new key times
# each of CONFIGS (autotune.tune_bench: ~10 ms each) and keeps the fastest. Chosen on the
# host rather than by triton.autotune because a Gluon descriptor's shared-memory layout
# follows its block shape, so each configuration needs its descriptors rebuilt (gemm_tma's
# pre-hook only resets block_shape); an autotuner pre-hook that rebuilds them was not tried.
# Triton's own Gluon / TLX GEMM tutorials also pick configurations on the host (a heuristic
# function of M, N, K). Session 12's H100 table ran CONFIGS[0] alone: 0.764 ms on 70b gate/up at M
# = 2048 (cuBLAS fp8 0.769), but 3.443 ms at M = 8192, where the served W4A8 (the expansion,
# then the TMA kernel's autotuned pick) took 3.493
# (benchmarks/results/h100/bench_gemm_prefill_gluon_8adb999.md).
_CHOICE: dict[tuple, tuple] = {}


def _chosen(x: Tensor, xs: Tensor, w: Tensor, ws: Tensor, bias: Tensor | None, out: Tensor,
            debug: bool) -> tuple:  # fmt: skip
    """The fastest of :data:`CONFIGS` at this shape (timed at the first call; CONFIGS[0]
    while a CUDA graph is being captured, where nothing can be timed, without keeping it)."""
    from cbq_kernels.autotune import tune_bench

    m, k = x.shape
    key = (x.device.index, min(triton.next_power_of_2(m), 8192), w.shape[0], k)
    if key not in _CHOICE:
        if torch.cuda.is_current_stream_capturing():
            return CONFIGS[0]
        args = (x, xs, w, ws, bias, out, debug)
        times = [tune_bench(lambda c=c: _launch_int8(*args, c), None) for c in CONFIGS]
        _CHOICE[key] = CONFIGS[times.index(min(times))]
    return _CHOICE[key]


# (BLOCK_N, BLOCK_M, BLOCK_H, NUM_STAGES, num_warps) of the split-nibble kernel: BLOCK_N weight
# rows are the MMA's M side (16 per warp, the warps stacked along it), BLOCK_M activation rows
# its N side; BLOCK_H bytes = 2 BLOCK_H codes per K step (two MMAs of K = BLOCK_H)
SPLIT_CONFIGS = ((128, 256, 64, 4, 8), (128, 128, 64, 4, 8), (128, 128, 128, 3, 8),
                 (256, 128, 64, 4, 8))  # fmt: skip


def two_level_params(s2: Tensor, z: Tensor) -> Tensor:
    """The two-level format's group parameters as the TWO_LEVEL kernel reads them: (N, K / 8)
    uint8, 16 bytes per row and K step of 128 codes (group t of the low half, group G / 2 +
    t of the high half of the split-nibble row): s2 and (256 - s2 z) mod 256 of the low
    group, then of the high one, then 12 bytes of padding (TMA reads 16-byte rows). s2 (N, G)
    integer group scales in 1..16, z (N, G) zero points in 0..15, G = K / 64 even."""
    if s2.shape != z.shape or s2.dim() != 2 or s2.shape[1] % 2:
        raise ValueError(f"s2 and z must be (N, G) with G even, got {tuple(s2.shape)} and "
                         f"{tuple(z.shape)}")  # fmt: skip
    s2, z = s2.to(torch.int32), z.to(torch.int32)
    if s2.min() < 1 or s2.max() > 16 or z.min() < 0 or z.max() > 15:
        raise ValueError("two-level group scales must be in 1..16 and zero points in 0..15")
    n, g = s2.shape
    nz = (256 - s2 * z) % 256
    out = torch.zeros((n, g // 2, 16), dtype=torch.uint8, device=s2.device)
    out[:, :, 0] = s2[:, : g // 2].to(torch.uint8)
    out[:, :, 1] = nz[:, : g // 2].to(torch.uint8)
    out[:, :, 2] = s2[:, g // 2 :].to(torch.uint8)
    out[:, :, 3] = nz[:, g // 2 :].to(torch.uint8)
    return out.view(n, g * 8)


def gemm_w4a8_split_gluon(x: Tensor, xs: Tensor, w_split: Tensor, k: int, zeros: Tensor | None,
                          ws: Tensor, bias: Tensor | None = None,
                          out_dtype: torch.dtype = torch.bfloat16, config: tuple | None = None,
                          debug: bool = False, xsum: Tensor | None = None,
                          group_params: Tensor | None = None) -> Tensor:  # fmt: skip
    """(M, N) = ((x @ (q - z)^T) * ws[n]) * xs[m] (+ bias), the contract of
    :func:`cbq_kernels.gemm_tma4.gemm_w4a8_split` (int8 activation codes; W4A4 codes as int8
    too): ``w_split`` (N, H) from ``split_nibbles`` of the codes q (N, k), ``zeros`` (N,) or
    None, ``xsum`` the int32 row sums of x (computed here when None and zeros are given: the
    activation quantizer can hand them over). ``group_params`` from :func:`two_level_params`:
    the two-level grouped format instead, the weight s2[n, g] (q - z[n, g]) per group of 64
    (an int8 value) times ws[n]; needs K % 128 == 0 and ``zeros`` None. ``config``: one of
    :data:`SPLIT_CONFIGS` (default the first; two-level: BLOCK_H = 64). ``debug``: the int32
    sums."""
    from cbq_kernels.gemm_tma4 import half_width

    m, kx = x.shape
    n, h = w_split.shape
    if kx != k or h != half_width(k):
        raise ValueError(f"x (M, {kx}) and a split weight of {h}-byte rows do not make K = {k} "
                         f"(split_nibbles gives {half_width(k)}-byte rows)")  # fmt: skip
    if not available(x) or w_split.dtype != torch.uint8 or not tma_operand(w_split):
        raise ValueError(f"gemm_w4a8_split_gluon needs Triton's Gluon, a Hopper GPU, int8 x (M, "
                         f"K) contiguous with K % 16 == 0 and a contiguous uint8 split weight, "
                         f"got x {x.dtype} {tuple(x.shape)} on {x.device}, weight "
                         f"{w_split.dtype}")  # fmt: skip
    two_level = group_params is not None
    if two_level and (k % 128 or zeros is not None or group_params.dtype != torch.uint8
                      or tuple(group_params.shape) != (n, k // 8)):  # fmt: skip
        raise ValueError(f"the two-level form needs K % 128 == 0 (got {k}), no separate zero "
                         f"points, and group_params uint8 ({n}, {k // 8}) from "
                         f"two_level_params")  # fmt: skip
    out = torch.empty((m, n), dtype=torch.int32 if debug else out_dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    bn, bm, bh, stages, warps = config if config is not None else SPLIT_CONFIGS[0]
    if two_level and bh != 64:
        raise ValueError(f"the two-level form needs BLOCK_H = 64 (one group per tile), got {bh}")
    x_layout = gl.NVMMASharedLayout.get_default_for([bm, bh], gl.int8)
    w_layout = gl.NVMMASharedLayout.get_default_for([bn, bh], gl.uint8)
    p_layout = gl.NVMMASharedLayout.get_default_for([bn, 16], gl.uint8)
    xd = TensorDescriptor(x, list(x.shape), list(x.stride()), [bm, bh], x_layout)
    wd = TensorDescriptor(w_split, list(w_split.shape), list(w_split.stride()), [bn, bh],
                          w_layout)  # fmt: skip
    gp = group_params.contiguous() if two_level else w_split
    pd = TensorDescriptor(gp, list(gp.shape), list(gp.stride()), [bn, 16], p_layout)
    xs, ws = xs.float().contiguous(), ws.float().contiguous()
    if zeros is not None:
        z = zeros.to(torch.int32).contiguous()
        xsum = (x.sum(1, dtype=torch.int32) if xsum is None else xsum.to(torch.int32)).contiguous()
    else:
        z = xsum = ws
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    _w4_split_gluon_kernel[grid](xd, wd, pd, z, xsum, xs, ws, bias if bias is not None else ws,
                                 out, m, n, h, HAS_Z=zeros is not None,
                                 HAS_BIAS=bias is not None, DEBUG=debug, MODE=int(two_level),
                                 GROUP_M=8, NUM_STAGES=stages, num_warps=warps)  # fmt: skip
    return out
