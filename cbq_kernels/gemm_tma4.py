"""A prefill W4A8 / W4A4 GEMM that reads the 4-bit weight itself (no expansion pass), with TMA
loads (Hopper). Experimental, written without a GPU (2026-12-06): bench_gemm's ``w4a8_split``
and ``w4a4_split8`` rows time it, ``gpu_lease.sh OUT split`` tests and times it; the served
dispatch does not call it yet.

Why: the served W4A8 prefill expands the 4-bit codes to an int8 copy of ``q - z`` before the
int8 GEMM (:mod:`cbq_kernels.gemm_tma`). Nsight Compute (H100, 79084c1, 2048 x 28672 x 8192):
the expansion is 184 us of a 1.08 ms call, and the issue's 1.7x bf16 target leaves no room for
it. The pointer kernel that unpacks in its K loop (``w4a8_inloop``) was 1.85x slower than
expansion + GEMM at M = 4096 (3.36 vs 1.81 ms): it loads words with per-thread addresses,
interleaves the two nibbles of a byte into neighbouring K positions with ``tl.reshape`` (a
layout conversion through shared memory), and the unpacked tile is the MMA's B operand, which
a Hopper wgmma reads from shared memory only.

This kernel avoids all three:

* **The split-nibble layout** (:func:`split_nibbles`): row n's byte j holds code k = j in its
  low nibble and code k = H + j in its high nibble, H = ceil(K / 2) rounded up to a multiple
  of 16 (TMA's 16-byte rows, and the activation tile at column H + j starts 16-byte
  aligned). A byte tile then unpacks into two code tiles of the same shape with one AND and one
  shift, each the partner of a contiguous activation tile (columns j.. and H + j..): no
  interleave, no reshape.
* **Operands swapped**: the kernel computes out^T = (q - z) x^T, so the unpacked weight is
  the MMA's A operand, which wgmma can take from registers; the activation tile goes from TMA
  to shared memory as the B operand. The output tile is stored transposed.
* **TMA loads in a persistent grid**, as gemm_tma.

* **W4A4 on fp8 MMAs** (activation codes given as fp8 e4m3): Triton keeps no int32-accumulator
  MMA in flight (scripts/wgmma_async_check.py: every int8 MMA is waited on before the next is
  issued), but it does keep fp8 ones with fp32 accumulators; int4 codes and ``q - z`` are
  exact in e4m3, but their sums are **not** exact: measured on an H100 (2026-12-06,
  benchmarks/results/h100/pytest_gluon_8adb999.txt) the int32-contract test at 200 x 1000 x
  8192 was off by hundreds in sums of ~30000, as Hopper's fp8 MMA keeps fewer accumulator
  bits than fp32. So this form is a speed measurement only (bench row ``w4a4_split8``), not
  a W4A4 kernel. Compiled for sm_90 here (Triton 3.9): the fp8 form's MMAs are asynchronous
  (``pendings = 3``), the int8 form's are not.

The int32 sums are exact (int8 x int8 products; codes and zero points in 0..15); the epilogue
is the other kernels' two fp32 products in the same order, ``(acc * s_w[n]) * s_x[m]``, so the
output bits equal theirs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from cbq_kernels.autotune import AUTOTUNE_CACHE, tune_bench
from cbq_kernels.fake_quant import _to_store
from cbq_kernels.gemm_tma import (
    TensorDescriptor,
    _programs,
    grouped_tile,
    tma_device,
    tma_operand,
)


def split_nibbles(codes: Tensor) -> Tensor:
    """(N, K) 4-bit codes (uint8, 0..15) -> (N, H) uint8 in the split-nibble layout: byte j
    = codes[:, j] | codes[:, H + j] << 4 with H = ceil(K / 2) rounded up to a multiple of 16
    (:func:`half_width`), a missing code 0."""
    if codes.dim() != 2 or codes.dtype != torch.uint8:
        raise ValueError(f"codes must be a 2-D uint8 tensor, got {codes.dtype} "
                         f"{tuple(codes.shape)}")  # fmt: skip
    n, k = codes.shape
    h = half_width(k)
    out = torch.zeros((n, h), dtype=torch.uint8, device=codes.device)
    out[:, : min(h, k)] = codes[:, :h]
    if k > h:
        out[:, : k - h] |= codes[:, h:] << 4
    return out


def half_width(k: int) -> int:
    """Bytes per row of the split-nibble layout for K codes: ceil(K / 2) rounded up to 16."""
    return -(-((k + 1) // 2) // 16) * 16


def takes(x: Tensor, w_split: Tensor) -> bool:
    """int8 (or fp8 e4m3) activation codes with 16-byte rows and base, a uint8 split weight, on
    a GPU with TMA or in the interpreter."""
    if (TensorDescriptor is None or x.dtype not in (torch.int8, torch.float8_e4m3fn)
            or w_split.dtype != torch.uint8):
        return False
    return tma_operand(x) and tma_operand(w_split) and tma_device(x.device)


def _set_blocks(nargs):
    nargs["a_desc"].block_shape = [nargs["BLOCK_M"], nargs["BLOCK_H"]]
    nargs["w_desc"].block_shape = [nargs["BLOCK_N"], nargs["BLOCK_H"]]


def _cfg(bn: int, bm: int, bh: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_N": bn, "BLOCK_M": bm, "BLOCK_H": bh, "GROUP_M": 8},
                         num_warps=warps, num_stages=stages, pre_hook=_set_blocks)  # fmt: skip


# BLOCK_N rows of weight are the wgmma's M side (64 per warpgroup), BLOCK_M activation rows its
# N side (8..256); BLOCK_H bytes = 2 x BLOCK_H codes per K step (int8 wgmma needs K >= 32).
CONFIGS = [
    _cfg(128, 128, 64, 8, 4), _cfg(128, 256, 64, 8, 3), _cfg(256, 128, 64, 8, 3),
    _cfg(128, 128, 128, 8, 3), _cfg(128, 64, 64, 4, 4), _cfg(64, 128, 64, 4, 4),
]  # fmt: skip


@triton.jit
def _w4_split_kernel(a_desc, w_desc, wz_ptr, xs_ptr, ws_ptr, bias_ptr, out_ptr, M, N, K, H,
                     HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, DEBUG: tl.constexpr,
                     NUM_PROGRAMS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_H: tl.constexpr, GROUP_M: tl.constexpr,
                     FP8: tl.constexpr = False):  # fmt: skip
    """Persistent over (m, n) tiles in grouped order (GROUP_M row tiles share a weight tile in
    L2). Per K step: one byte tile of the weight (BLOCK_N x BLOCK_H) -> low and high code
    tiles, minus the zero point; two activation tiles (columns j.. and H + j..; TMA zero-fills
    past K); two MMAs into the transposed accumulator. Bytes past H (zero-filled) and codes
    past K (padding) would be -z with a zero point, so they are masked. FP8: the activation
    tiles are fp8 e4m3 (int4 codes, exact there), the weight codes go to e4m3 too (|q - z|
    <= 15: exact) and the MMAs accumulate in fp32: wgmma with an fp32 accumulator is one
    Triton keeps in flight, the int32 one it is not (scripts/wgmma_async_check.py). The sums
    are not exact (measured, module docstring): Hopper's fp8 MMA adds into its accumulator
    with fewer bits kept (DeepSeek-V3 reports ~14), and Triton's promotion to CUDA-core adds
    (``max_num_imprecise_acc``) is off by default on sm_90 and reset to off when it splits a
    register-operand dot (compiled TTGIR: maxNumImpreciseAcc = 2^30 whatever is passed)."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    h_tiles = tl.cdiv(H, BLOCK_H)
    for tile in tl.range(tl.program_id(0), num_m * num_n, NUM_PROGRAMS):
        pm, pn = grouped_tile(tile, num_m, num_n, GROUP_M)
        off_m = pm * BLOCK_M
        off_n = pn * BLOCK_N
        rn = off_n + tl.arange(0, BLOCK_N)
        mn = rn < N
        if HAS_Z:
            z = tl.load(wz_ptr + rn, mask=mn, other=0).to(tl.int8)
        if FP8:  # one dot per iteration, low then high half of each byte tile: a dot whose
            # result feeds another dot in the same iteration is waited on at once by Triton's
            # pipeliner (dotCanBeProperlyAsync, rule 2), and a second accumulator spills
            acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
            for s in range(2 * h_tiles):
                t = s // 2
                half = s % 2
                wb = w_desc.load([off_n, t * BLOCK_H])
                code = ((wb >> (4 * half)) & 15).to(tl.int8)
                if HAS_Z:
                    cols = t * BLOCK_H + tl.arange(0, BLOCK_H)
                    ok = (cols < H) & (half * H + cols < K)
                    code = tl.where(ok[None, :], code - z[:, None], 0).to(tl.int8)
                a = a_desc.load([off_m, half * H + t * BLOCK_H])
                acc = tl.dot(code.to(tl.float16).to(tl.float8e4nv), a.T, acc)
        else:
            acc = tl.zeros((BLOCK_N, BLOCK_M), tl.int32)
            for t in range(h_tiles):
                wb = w_desc.load([off_n, t * BLOCK_H])
                lo = (wb & 15).to(tl.int8)
                hi = (wb >> 4).to(tl.int8)
                if HAS_Z:
                    cols = t * BLOCK_H + tl.arange(0, BLOCK_H)
                    lo = tl.where(((cols < H) & (cols < K))[None, :], lo - z[:, None],
                                  0).to(tl.int8)  # fmt: skip
                    hi = tl.where((cols + H < K)[None, :], hi - z[:, None], 0).to(tl.int8)
                a_lo = a_desc.load([off_m, t * BLOCK_H])
                a_hi = a_desc.load([off_m, H + t * BLOCK_H])
                acc = tl.dot(lo, a_lo.T, acc, out_dtype=tl.int32)
                acc = tl.dot(hi, a_hi.T, acc, out_dtype=tl.int32)
        rm = (off_m + tl.arange(0, BLOCK_M)).to(tl.int64)
        mm = rm < M
        mo = mn[:, None] & mm[None, :]
        ptrs = out_ptr + rm[None, :] * N + rn.to(tl.int64)[:, None]
        if DEBUG:
            tl.store(ptrs, acc.to(tl.int32), mask=mo)
        else:
            out = acc.to(tl.float32) * tl.load(ws_ptr + rn, mask=mn, other=0.0)[:, None]
            out = out * tl.load(xs_ptr + rm, mask=mm, other=0.0)[None, :]
            if HAS_BIAS:
                out += tl.load(bias_ptr + rn, mask=mn, other=0.0).to(tl.float32)[:, None]
            tl.store(ptrs, _to_store(out, out_ptr), mask=mo)


@triton.jit
def _w4_split_entry(a_desc, w_desc, wz_ptr, xs_ptr, ws_ptr, bias_ptr, out_ptr, M, N, K, H,
                    M_BUCKET, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, DEBUG: tl.constexpr,
                    NUM_PROGRAMS: tl.constexpr, FP8: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr,
                    GROUP_M: tl.constexpr):  # fmt: skip
    """The kernel with an M bucket argument, the autotuning key."""
    _w4_split_kernel(a_desc, w_desc, wz_ptr, xs_ptr, ws_ptr, bias_ptr, out_ptr, M, N, K, H,
                     HAS_Z, HAS_BIAS, DEBUG, NUM_PROGRAMS, BLOCK_N, BLOCK_M, BLOCK_H,
                     GROUP_M, FP8)  # fmt: skip


_w4_split_tuned = triton.autotune(configs=CONFIGS, key=["M_BUCKET", "N", "K", "FP8"],
                                  do_bench=tune_bench,
                                  **AUTOTUNE_CACHE)(_w4_split_entry)  # fmt: skip

_CPU_CONFIG = {"BLOCK_N": 32, "BLOCK_M": 16, "BLOCK_H": 16, "GROUP_M": 4}


def gemm_w4a8_split(x: Tensor, xs: Tensor, w_split: Tensor, k: int, zeros: Tensor | None,
                    ws: Tensor, bias: Tensor | None = None,
                    out_dtype: torch.dtype = torch.bfloat16, config: dict | None = None,
                    debug: bool = False) -> Tensor:  # fmt: skip
    """(M, N) = ((x @ (q - z)^T) * ws[n]) * xs[m] (+ bias): x (M, K) int8 codes, or int4
    codes held as fp8 e4m3 (the W4A4 form: fp8 MMAs with fp32 sums), ``w_split`` (N, H) from
    :func:`split_nibbles` of codes q (N, k), ``zeros`` (N,) per-channel zero points or None,
    xs (M,), ws (N,) fp32. ``debug``: the int32 sums. ``config`` bypasses the autotuner (the
    GPU test of every configuration)."""
    m, kx = x.shape
    n, h = w_split.shape
    if kx != k or h != half_width(k):
        raise ValueError(f"x (M, {kx}) and a split weight of {h}-byte rows do not make K = {k} "
                         f"(split_nibbles gives {half_width(k)}-byte rows)")  # fmt: skip
    if not takes(x, w_split):
        raise ValueError("gemm_w4a8_split needs int8 or fp8 e4m3 x with K % 16 == 0 (TMA) and "
                         "a uint8 split weight on a GPU of compute capability >= 9.0")  # fmt: skip
    out = torch.empty((m, n), dtype=torch.int32 if debug else out_dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    xs, ws = xs.float().contiguous(), ws.float().contiguous()
    z_arg = zeros.to(torch.int32).contiguous() if zeros is not None else ws
    bias_arg = bias if bias is not None else ws
    fp8 = x.dtype == torch.float8_e4m3fn
    flags = {"HAS_Z": zeros is not None, "HAS_BIAS": bias is not None, "DEBUG": debug,
             "FP8": fp8}  # fmt: skip
    if x.device.type == "cpu" or config is not None:
        meta = dict(config if config is not None else _CPU_CONFIG)
        launch = {key: meta.pop(key) for key in ("num_warps", "num_stages") if key in meta}
        a = TensorDescriptor.from_tensor(x, [meta["BLOCK_M"], meta["BLOCK_H"]])
        w = TensorDescriptor.from_tensor(w_split, [meta["BLOCK_N"], meta["BLOCK_H"]])
        tiles = triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"])
        programs = min(tiles, _programs(x.device))
        _w4_split_kernel[(programs,)](a, w, z_arg, xs, ws, bias_arg, out, m, n, k, h,
                                      NUM_PROGRAMS=programs, **flags, **meta,
                                      **launch)  # fmt: skip
        return out
    a = TensorDescriptor.from_tensor(x, [128, 64])  # block shapes set by the pre-hook
    w = TensorDescriptor.from_tensor(w_split, [128, 64])
    programs = _programs(x.device)
    _w4_split_tuned[(programs,)](a, w, z_arg, xs, ws, bias_arg, out, m, n, k, h,
                                 min(triton.next_power_of_2(m), 8192), NUM_PROGRAMS=programs,
                                 **flags)  # fmt: skip
    return out
