"""The Triton GEMM kernels behind :mod:`cbq_kernels.gemm` (its docstring describes the
paths, the arithmetic and the prepared layout): the kernel that unpacks codes in the K loop,
the int8 expansion / dequantization pass, the autotuner configurations and the launch, which
follows the dispatch policy (:class:`cbq_kernels.gemm_policy.GemmPolicy`, re-exported here).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl
from torch import Tensor

from cbq_kernels import formats, gemm_decode, gemm_gluon, gemm_tma
from cbq_kernels._validate import FLOAT_DTYPES, check_tensor, describe
from cbq_kernels.autotune import AUTOTUNE_CACHE, tune_bench
from cbq_kernels.fake_quant import _to_store  # bf16 rounding that the interpreter gets right
from cbq_kernels.gemm_policy import DEFAULT_POLICY, GemmPolicy
from cbq_kernels.gemm_tma import grouped_tile

if TYPE_CHECKING:
    from cbq_kernels.gemm_weight import PreparedWeight

_A_INT8, _A_INT4, _A_FLOAT = 0, 1, 2
OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)



# ------------------------------------------------------------------------------ kernel


@triton.jit
def _gemm_kernel(x_ptr, xs_ptr, w_ptr, ws_ptr, wz_ptr, bias_ptr, out_ptr, M, N, K, KW_X, KW_W,
                 WS_N, WS_G, GS, A_MODE: tl.constexpr, W_BITS: tl.constexpr, GROUPED: tl.constexpr,
                 HAS_BIAS: tl.constexpr, DEBUG: tl.constexpr, SPLIT_K: tl.constexpr,
                 DOT_F32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, SWAP: tl.constexpr):  # fmt: skip
    """out (M, N) = x (M, K) @ W^T, W as prepared words (KW_W, N) int32. See the module
    docstring. Scales and zero points (N, G): element (n, g) at n * WS_N + g * WS_G (both
    tensors: contiguous, or transposed views of the decode layout's (G, N_pad)).

    SPLIT_K > 1: out_ptr is an fp32 (SPLIT_K, M, N) buffer of partials (bias not added).
    DEBUG: out_ptr is int32 (M, N), the raw accumulator.
    SWAP: compute the transposed tile W x^T (BLOCK_N, BLOCK_M): the unpacked weight is the
    first operand of the MMA (on Hopper it can stay in registers instead of going through
    shared memory) and M = 1..16 fills the MMA's narrow N side instead of its 64-row M side."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    # Grouped ordering: GROUP_M row blocks share the weight tiles they read (L2 reuse).
    pid_m, pid_n = grouped_tile(pid, num_m, num_n, GROUP_M)

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mm, mn = rm < M, rn < N
    rm64, rn64 = rm.to(tl.int64), rn.to(tl.int64)
    PER_W: tl.constexpr = 32 // W_BITS  # codes per word (W_BITS 2, 4; 8 = expanded int8)
    W_MASK: tl.constexpr = (1 << W_BITS) - 1
    INT_PATH: tl.constexpr = A_MODE != 2

    # Accumulators are (BLOCK_M, BLOCK_N), or (BLOCK_N, BLOCK_M) when SWAP.
    if SWAP:
        acc_i = tl.zeros((BLOCK_N, BLOCK_M), tl.int32)
        acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
    else:
        acc_i = tl.zeros((BLOCK_M, BLOCK_N), tl.int32)
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    if not GROUPED and W_BITS != 8:  # one zero point (and scale) per output channel
        z_n = tl.load(wz_ptr + rn64 * WS_N, mask=mn, other=0)

    k_step = BLOCK_K * SPLIT_K
    for k0 in range(split * BLOCK_K, K, k_step):
        rk = k0 + tl.arange(0, BLOCK_K)
        mk = rk < K
        # ---- activation tile (BLOCK_M, BLOCK_K)
        if A_MODE == 0:
            a = tl.load(x_ptr + rm64[:, None] * K + rk[None, :], mask=mm[:, None] & mk[None, :],
                        other=0)  # fmt: skip
        elif A_MODE == 1:
            # Whole words (coalesced along K), split into nibbles in registers: code j of
            # word w is column 8 w + j, so a row-major reshape puts every code in place.
            rxw = k0 // 8 + tl.arange(0, BLOCK_K // 8)
            xw = tl.load(x_ptr + rm64[:, None] * KW_X + rxw[None, :],
                         mask=mm[:, None] & (rxw[None, :] < KW_X), other=0)  # fmt: skip
            a3 = (xw[:, :, None] >> (tl.arange(0, 8) * 4)[None, None, :]) & 0xF
            a4 = tl.reshape(a3, (BLOCK_M, BLOCK_K)) - 8
            a = tl.where(mk[None, :], a4, 0).to(tl.int8)
        else:
            a = tl.load(x_ptr + rm64[:, None] * K + rk[None, :], mask=mm[:, None] & mk[None, :],
                        other=0.0)  # fmt: skip
        # ---- weight tile (BLOCK_K, BLOCK_N): unpack, subtract the zero point
        # Prepared layout: words (KW_W, N), word row kw holds codes kw*C .. kw*C + C-1 of every
        # column (N contiguous, so every load is coalesced along N).
        if W_BITS == 8:
            # Expanded weight (see _expand): int8 (N, K) codes minus zero points, K-major.
            wq = tl.load(w_ptr + rn64[None, :] * K + rk[:, None], mask=mk[:, None] & mn[None, :],
                         other=0)  # fmt: skip
        else:
            # Each word loaded once (N contiguous: coalesced), split into (words, C, BLOCK_N)
            # codes, the first two dims merged by a reshape. (Loading one word per code and
            # shifting by row, or the canonical (N, words) layout, measured 1.2-2x slower on
            # the H100: benchmarks/results/h100/sweep_gemm_*.txt.)
            rkw = k0 // PER_W + tl.arange(0, BLOCK_K // PER_W)
            ww = tl.load(w_ptr + rkw.to(tl.int64)[:, None] * N + rn64[None, :],
                         mask=(rkw < KW_W)[:, None] & mn[None, :], other=0)  # fmt: skip
            q3 = (ww[:, None, :] >> (tl.arange(0, PER_W) * W_BITS)[None, :, None]) & W_MASK
            q = tl.reshape(q3, (BLOCK_K, BLOCK_N))
        if GROUPED:
            g = k0 // GS  # BLOCK_K divides GS: one group per tile
            s_w = tl.load(ws_ptr + rn64 * WS_N + g * WS_G, mask=mn, other=0.0)
            if W_BITS != 8:
                z = tl.load(wz_ptr + rn64 * WS_N + g * WS_G, mask=mn, other=0)
                wq = tl.where(mk[:, None], q - z[None, :], 0)
            # the per-channel scale broadcast against the accumulator
            s_acc = s_w[:, None] if SWAP else s_w[None, :]
        elif W_BITS != 8:
            wq = tl.where(mk[:, None], q - z_n[None, :], 0)
        # ---- multiply: (BLOCK_M, BLOCK_K) x (BLOCK_K, BLOCK_N), or swapped
        if INT_PATH:
            b = wq.to(tl.int8)
            lhs = tl.trans(b) if SWAP else a
            rhs = tl.trans(a) if SWAP else b
            if GROUPED and not DEBUG:
                part = tl.dot(lhs, rhs, out_dtype=tl.int32)
                acc += part.to(tl.float32) * s_acc
            else:
                acc_i = tl.dot(lhs, rhs, acc_i, out_dtype=tl.int32)
        else:
            if DOT_F32:
                b = wq.to(tl.float32)
                a = a.to(tl.float32)
            else:
                b = wq.to(a.dtype)
            lhs = tl.trans(b) if SWAP else a
            rhs = tl.trans(a) if SWAP else b
            if DOT_F32:
                part = tl.dot(lhs, rhs, input_precision="ieee")
            else:
                part = tl.dot(lhs, rhs)
            if GROUPED:
                acc += part * s_acc
            else:
                acc += part

    if SWAP:  # back to (BLOCK_M, BLOCK_N) for the epilogue
        acc = tl.trans(acc)
        acc_i = tl.trans(acc_i)
    # ---- epilogue
    mo = mm[:, None] & mn[None, :]
    if DEBUG:
        tl.store(out_ptr + rm64[:, None] * N + rn64[None, :], acc_i, mask=mo)
    else:
        if INT_PATH:
            if not GROUPED:
                s_n = tl.load(ws_ptr + rn64 * WS_N, mask=mn, other=0.0)
                acc = acc_i.to(tl.float32) * s_n[None, :]
            acc = acc * tl.load(xs_ptr + rm64, mask=mm, other=0.0)[:, None]
        elif not GROUPED:
            acc = acc * tl.load(ws_ptr + rn64 * WS_N, mask=mn, other=0.0)[None, :]
        if SPLIT_K > 1:
            tl.store(out_ptr + split.to(tl.int64) * M * N + rm64[:, None] * N + rn64[None, :],
                     acc, mask=mo)  # fmt: skip
        else:
            if HAS_BIAS:
                acc += tl.load(bias_ptr + rn64, mask=mn, other=0.0).to(tl.float32)[None, :]
            tl.store(out_ptr + rm64[:, None] * N + rn64[None, :], _to_store(acc, out_ptr),
                     mask=mo)  # fmt: skip


@triton.jit
def _expand_kernel(w_ptr, z_ptr, s_ptr, out_ptr, R, K, KW, SZ_R, SZ_G, GS, S_R, S_KW, Z_CONST,
                   W_BITS: tl.constexpr, HAS_Z: tl.constexpr, SCALED: tl.constexpr,
                   BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """out (R, K) int8 = codes - zero point, from packed words: word (r, kw) at
    w_ptr + r * S_R + kw * S_KW holds codes kw*C .. kw*C + C - 1 of row r. Zero points
    z (R, G) int32 per group of GS, or the constant Z_CONST. SCALED: (codes - z) * s with
    fp32 scales s (R, G), one rounding to out's float dtype (the dequantized weight), or
    int8 where s are integer steps (a two-level weight's s2 (q - z), in int8). z and s
    share their strides: element (r, g) at r * SZ_R + g * SZ_G."""
    PER_W: tl.constexpr = 32 // W_BITS
    W_MASK: tl.constexpr = (1 << W_BITS) - 1
    rr = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rkw = tl.program_id(1) * (BLOCK_K // PER_W) + tl.arange(0, BLOCK_K // PER_W)
    rr64 = rr.to(tl.int64)
    mr = rr < R
    ww = tl.load(w_ptr + rr64[:, None] * S_R + rkw.to(tl.int64)[None, :] * S_KW,
                 mask=mr[:, None] & (rkw < KW)[None, :], other=0)  # fmt: skip
    q3 = (ww[:, :, None] >> (tl.arange(0, PER_W) * W_BITS)[None, None, :]) & W_MASK
    q = tl.reshape(q3, (BLOCK_R, BLOCK_K))
    rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mo = mr[:, None] & (rk < K)[None, :]
    # One group per tile (the host picks BLOCK_K dividing GS, or GS >= K): the zero points
    # and scales are one (BLOCK_R,) vector per tile. (Gathering them per element, rows
    # G words apart, made the grouped dequantization ~10x slower on the H200.)
    gidx = rr64 * SZ_R + ((tl.program_id(1) * BLOCK_K) // GS) * SZ_G
    if HAS_Z:
        q -= tl.load(z_ptr + gidx, mask=mr, other=0)[:, None]
    else:
        q -= Z_CONST
    if SCALED:
        v = q.to(tl.float32) * tl.load(s_ptr + gidx, mask=mr, other=0.0)[:, None]
        tl.store(out_ptr + rr64[:, None] * K + rk[None, :], _to_store(v, out_ptr), mask=mo)
    elif out_ptr.dtype.element_ty == tl.int8:
        tl.store(out_ptr + rr64[:, None] * K + rk[None, :], q.to(tl.int8), mask=mo)
    else:  # fp8 e4m3: integers up to 16 are exact (int4 operands on fp8 tensor cores)
        tl.store(out_ptr + rr64[:, None] * K + rk[None, :],
                 q.to(tl.float32).to(out_ptr.dtype.element_ty), mask=mo)  # fmt: skip


def _expand(words: Tensor, rows: int, k: int, bits: int, s_r: int, s_kw: int,
            zeros: Tensor | None, group_size: int, z_const: int = 0,
            scales: Tensor | None = None,
            dtype: torch.dtype = torch.int8) -> Tensor:  # fmt: skip
    """(rows, K) int8 signed codes from packed words, or with ``scales`` the dequantized
    (rows, K) ``dtype`` weight (see _expand_kernel)."""
    out = torch.empty((rows, k), dtype=dtype, device=words.device)
    if rows == 0 or k == 0:
        return out
    br, bk = (16, 32) if words.device.type == "cpu" else (32, 256)
    if group_size < k:  # one group per tile: BLOCK_K a power of two dividing the group
        while group_size % bk:
            bk //= 2
    kw = formats.packed_words(k, bits)
    grid = (triton.cdiv(rows, br), triton.cdiv(k, bk))
    sz = zeros.stride() if zeros is not None else (1, 1)
    if scales is not None and zeros is not None and scales.stride() != sz:
        raise ValueError(f"scales and zeros must share their strides, got {scales.stride()} "
                         f"and {sz}")  # fmt: skip
    _expand_kernel[grid](words, zeros if zeros is not None else words,
                         scales if scales is not None else out, out, rows, k, kw, sz[0], sz[1],
                         group_size, s_r, s_kw, z_const, W_BITS=formats.container_bits(bits),
                         HAS_Z=zeros is not None, SCALED=scales is not None, BLOCK_R=br,
                         BLOCK_K=bk)  # fmt: skip
    return out


# ------------------------------------------------------------------------------ configs

def _cfg(bm: int, bn: int, bk: int, warps: int, stages: int, swap: bool) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8,
                          "SWAP": swap}, num_warps=warps, num_stages=stages)  # fmt: skip


# Chosen from the H100 sweep (benchmarks/sweep_gemm.py, results/h100/sweep_gemm_*.txt).
# Large M, codes unpacked in the K loop (weight-only, and integer GEMMs below expand_min_m):
# the swapped kernel (W x^T) with wide tiles won. Expanded int8 weights (M >= expand_min_m):
# plain int8 GEMM tiles, and 64-row tiles for M ~ 64 on narrow layers (N = 1024 left 4
# programs with 128 x 256 tiles). Small M (decode): one 16-row tile, split-K chosen on the host. For
# grouped weights the pruning below keeps the configs whose BLOCK_K divides the group size
# (each list has a BLOCK_K = 32 config: prepare_weight requires groups of a multiple of 32).
_LARGE_CONFIGS = [
    _cfg(256, 128, 128, 8, 3, True), _cfg(128, 128, 128, 8, 3, True),
    _cfg(128, 128, 64, 8, 3, True), _cfg(64, 128, 128, 4, 4, True),
    _cfg(128, 256, 64, 8, 3, False), _cfg(64, 64, 64, 4, 4, False),
    _cfg(64, 128, 32, 4, 4, True),
]  # fmt: skip
_EXPANDED_CONFIGS = [
    _cfg(128, 256, 128, 8, 3, False), _cfg(256, 128, 128, 8, 3, True),
    _cfg(128, 128, 64, 4, 4, False), _cfg(128, 128, 128, 8, 4, True),
    _cfg(128, 128, 32, 4, 4, False), _cfg(64, 64, 128, 4, 4, False),
    _cfg(64, 128, 128, 4, 4, False),
]  # fmt: skip
_SMALL_CONFIGS = [
    _cfg(16, 128, 64, 4, 4, False), _cfg(16, 128, 128, 4, 3, False),
    _cfg(16, 64, 128, 4, 4, True), _cfg(16, 128, 64, 4, 4, True),
    _cfg(16, 64, 32, 4, 4, False),
]  # fmt: skip


def _prune(configs, named_args, **kwargs):
    gs = named_args["GS"]
    grouped = kwargs.get("GROUPED", named_args.get("GROUPED"))
    return [c for c in configs if not grouped or gs % c.kwargs["BLOCK_K"] == 0]


def _tuned(configs):
    return triton.autotune(
        configs=configs,
        key=["M_BUCKET", "N", "K", "A_MODE", "W_BITS", "GROUPED", "SPLIT_K"],
        prune_configs_by={"early_config_prune": _prune},
        do_bench=tune_bench,
        **AUTOTUNE_CACHE,
    )


@triton.jit
def _gemm_entry(x_ptr, xs_ptr, w_ptr, ws_ptr, wz_ptr, bias_ptr, out_ptr, M, N, K, KW_X, KW_W,
                WS_N, WS_G, GS, M_BUCKET, A_MODE: tl.constexpr, W_BITS: tl.constexpr,
                GROUPED: tl.constexpr, HAS_BIAS: tl.constexpr, DEBUG: tl.constexpr,
                SPLIT_K: tl.constexpr, DOT_F32: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                SWAP: tl.constexpr):  # fmt: skip
    """The kernel with an M bucket argument, the autotuning key (tuning once per bucket)."""
    _gemm_kernel(x_ptr, xs_ptr, w_ptr, ws_ptr, wz_ptr, bias_ptr, out_ptr, M, N, K, KW_X, KW_W,
                 WS_N, WS_G, GS, A_MODE, W_BITS, GROUPED, HAS_BIAS, DEBUG, SPLIT_K, DOT_F32,
                 BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, SWAP)  # fmt: skip


_gemm_large = _tuned(_LARGE_CONFIGS)(_gemm_entry)
_gemm_expanded = _tuned(_EXPANDED_CONFIGS)(_gemm_entry)
_gemm_small = _tuned(_SMALL_CONFIGS)(_gemm_entry)

# The interpreter (CPU tests) runs one small fixed configuration instead of autotuning.
_CPU_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4, "SWAP": False}


def _m_bucket(m: int) -> int:
    return min(triton.next_power_of_2(max(m, 1)), 8192)


# ------------------------------------------------------------------------------ launch


def _check_out_dtype(out_dtype: torch.dtype) -> None:
    if out_dtype not in OUT_DTYPES:
        raise TypeError(f"out_dtype must be bfloat16, float16 or float32, got {out_dtype}")


def _check_bias(bias: Tensor | None, n: int, device: torch.device) -> None:
    if bias is None:
        return
    check_tensor(bias, "bias", FLOAT_DTYPES, 1, "N")
    if bias.shape[0] != n or bias.device != device:
        raise ValueError(f"bias must be (N,) = ({n},) on {device}, got {describe(bias)}")


def _split_k(m: int, n: int, k: int, device: torch.device,
             policy: GemmPolicy = DEFAULT_POLICY) -> int:  # fmt: skip
    """Slices of K for the decode path: enough programs (about 4 per SM with 128-wide N
    tiles, the best split in the H100 sweep) to stream the weight at full bandwidth; 1 for
    large M."""
    if m > policy.small_m or device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    tiles = triton.cdiv(n, 128)
    split = 1
    while tiles * split < 4 * sms and k // (split * 2) >= 512:
        split *= 2
    return split


def _launch(x: Tensor, x_scales: Tensor | None, a_mode: int, weight: PreparedWeight,
            bias: Tensor | None, out_dtype: torch.dtype, debug: bool,
            split_k: int | None, config: dict | None = None,
            expand: bool | None = None,
            policy: GemmPolicy = DEFAULT_POLICY) -> Tensor:  # fmt: skip
    """Launch the kernel. ``config`` (BLOCK_M/N/K, GROUP_M, SWAP, num_warps, num_stages)
    bypasses the autotuner: for the configuration sweep (benchmarks/sweep_gemm.py) and the
    GPU tests that check every configuration.
    ``expand`` (integer GEMMs; default: M >= policy.expand_min_m) first expands the 4-bit
    codes to an int8 scratch copy (and packed int4 activations to int8), then runs the int8 x
    int8 kernel without unpacking in the K loop."""
    m, n, k = x.shape[0], weight.n, weight.k
    device = x.device
    if debug and a_mode == _A_FLOAT:
        raise ValueError("debug (raw int32 accumulator) exists for the integer GEMMs only")
    if weight.device != device:
        raise ValueError(f"weight is on {weight.device} but x is on {device}")
    _check_bias(bias, n, device)
    _check_out_dtype(out_dtype)
    split = _split_k(m, n, k, device, policy) if split_k is None else split_k
    if debug:
        split = 1
    if m == 0 or n == 0:
        return torch.zeros((m, n), dtype=torch.int32 if debug else out_dtype, device=device)
    xs = x_scales if x_scales is not None else weight.scales
    kw_x = x.shape[1]
    w_words, w_bits = weight.words, weight.container_bits
    if expand is None:  # a weight kept in the decode layout alone is always expanded here
        expand = m >= policy.expand_min_m or weight.words is None
    w_scales, gs = weight.scales, weight.kernel_group
    if expand and a_mode != _A_FLOAT:
        two_level = weight.steps is not None
        w_words, w_bits = expand_weight(weight, steps=two_level), 8
        if two_level:  # int8 s2 (q - z) over whole rows: a per-channel product, scaled by s1
            w_scales, gs = weight.channel_scales[:, None], k
        if a_mode == _A_INT4:
            x, a_mode = _expand(x, m, k, 4, kw_x, 1, None, k, z_const=8), _A_INT8
    grouped = gs < k
    if (expand and a_mode == _A_INT8 and 0 < policy.gluon_min_m <= m <= policy.gluon_max_m
            and m * n >= policy.gluon_min_mn and split == 1 and not grouped
            and gemm_gluon.available(x) and gemm_tma.tma_operand(w_words)):  # fmt: skip
        return gemm_gluon.gemm_int8_gluon(x, xs, w_words, w_scales[:, 0], bias, out_dtype,
                                          debug=debug)  # fmt: skip
    if (expand and a_mode == _A_INT8 and 0 < policy.tma_min_m <= m and split == 1
            and not grouped and gemm_tma.takes(x, w_words)):  # fmt: skip
        return gemm_tma.gemm_int8_tma(x, xs, w_words, w_scales[:, 0], bias, out_dtype,
                                      debug=debug)  # fmt: skip
    if debug:
        out = torch.empty((m, n), dtype=torch.int32, device=device)
    elif split > 1:
        out = torch.empty((split, m, n), dtype=torch.float32, device=device)
    else:
        out = torch.empty((m, n), dtype=out_dtype, device=device)
    if w_words is None:
        raise ValueError(
            f"this weight keeps only the decode layout (prepare_weight(layout='auto') on a GPU "
            f"with the extension); the Triton kernel at M = {m} (forced split_k, or "
            f"policy.cuda_decode=False) reads the canonical one: prepare it with layout='both'"
        )
    args = (x, xs, w_words, w_scales, weight.zeros, bias if bias is not None else xs,
            out, m, n, k, kw_x, w_words.shape[0], *w_scales.stride(), gs)  # fmt: skip
    consts = {"A_MODE": a_mode, "W_BITS": w_bits, "GROUPED": grouped,
              "HAS_BIAS": bias is not None, "DEBUG": debug, "SPLIT_K": split}  # fmt: skip
    # fp32 activations multiply in IEEE fp32 (tl.dot would use tf32); on the CPU the
    # interpreter gets bf16 arithmetic wrong, so it multiplies in fp32 too.
    dot_f32 = device.type == "cpu" or x.dtype == torch.float32
    if device.type == "cpu" or config is not None:  # Triton's interpreter, or a fixed config
        meta = dict(config if config is not None else _CPU_CONFIG)
        fixed_grid = (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), split)
        _gemm_kernel[fixed_grid](*args, **consts, DOT_F32=dot_f32, **meta)
    else:
        kernel = _gemm_small if m <= policy.small_m else _gemm_large
        kernel = _gemm_expanded if w_bits == 8 and m > policy.small_m else kernel

        def grid(meta):
            return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), split)

        kernel[grid](*args, _m_bucket(m), **consts, DOT_F32=dot_f32)
    if split > 1 and not debug:
        total = out.sum(0)
        if bias is not None:
            total += bias.float()
        return total.to(out_dtype)
    return out


def expand_weight(weight: PreparedWeight, dtype: torch.dtype = torch.int8,
                  scaled: bool = False, steps: bool = False) -> Tensor:  # fmt: skip
    """(N, K) ``q - z`` in int8 (or fp8 e4m3, where these integers are exact), or with
    ``scaled`` the dequantized ``(q - z) * s`` in ``dtype``, or with ``steps`` (a two-level
    weight: prepare_weight's channel_scales) the int8 values ``s2 (q - z)`` (Triton), from
    whichever layout the weight keeps (the canonical words, else the decode layout)."""
    if steps and (weight.steps is None or dtype != torch.int8 or scaled):
        raise ValueError("steps: the int8 expansion of a two-level weight (prepare_weight's "
                         "channel_scales)")  # fmt: skip
    if weight.words is None:
        # steps: a transposed view of a (G, N_pad) tensor from column 0, as the scales
        return gemm_decode.expand(weight.decode, dtype, scaled=scaled or steps,
                                  scales=weight.steps.t() if steps else None)  # fmt: skip
    scales = weight.steps if steps else weight.scales if scaled else None
    return _expand(weight.words, weight.n, weight.k, weight.bits, 1, weight.n, weight.zeros,
                   weight.kernel_group, scales=scales, dtype=dtype)  # fmt: skip


def fp8_available(device: torch.device) -> bool:
    """fp8 e4m3 tensor cores (compute capability 8.9 and later) and torch's fp8 GEMM."""
    return (device.type == "cuda" and hasattr(torch, "float8_e4m3fn")
            and torch.cuda.get_device_capability(device) >= (8, 9))  # fmt: skip


@triton.jit
def _scale_out_kernel(raw_ptr, xs_ptr, ws_ptr, out_ptr, M, N, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr):  # fmt: skip
    """out = (raw * ws[n]) * xs[m] in fp32, stored once in out's dtype: the int8 path's
    epilogue (_gemm_kernel, same order of the two products) on an fp32 product."""
    rm = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mm, mn = rm < M, rn < N
    mo = mm[:, None] & mn[None, :]
    acc = tl.load(raw_ptr + rm[:, None] * N + rn[None, :], mask=mo, other=0.0)
    acc = acc * tl.load(ws_ptr + rn, mask=mn, other=0.0)[None, :]
    acc = acc * tl.load(xs_ptr + rm, mask=mm, other=0.0)[:, None]
    tl.store(out_ptr + rm[:, None] * N + rn[None, :], _to_store(acc, out_ptr), mask=mo)


def scale_out(raw: Tensor, xs: Tensor, ws: Tensor, dtype: torch.dtype) -> Tensor:
    """(M, N) fp32 ``raw`` times per-row ``xs`` and per-column ``ws`` (fp32), one rounding to
    ``dtype``: the epilogue of :func:`launch_w4a4_fp8`, as a separate pass."""
    m, n = raw.shape
    out = torch.empty((m, n), dtype=dtype, device=raw.device)
    if m and n:
        grid = (triton.cdiv(m, 32), triton.cdiv(n, 128))
        _scale_out_kernel[grid](raw, xs.float().contiguous(), ws.float().contiguous(), out, m,
                                n, BLOCK_M=32, BLOCK_N=128, num_warps=4)  # fmt: skip
    return out


def launch_w4a4_fp8(x_packed: Tensor, xs: Tensor, weight: PreparedWeight) -> Tensor:
    """W4A4 on fp8 tensor cores (GemmPolicy.fp8_w4a4_min_m): the packed weight (codes minus
    zero point, -15..15) and the packed int4 activations (-8..7) are expanded to fp8 e4m3,
    where they are exact, then ``torch._scaled_mm`` multiplies them with unit scales into
    fp32 (exact: |sum| <= 120 K < 2^24 for K < 139810, and cuBLAS' tensorwise fp8 GEMM keeps
    the sums exact: 0 of 8.4M inexact on the H200), then :func:`scale_out` applies the
    per-token and per-channel scales and rounds once to bf16, as the int8 path's epilogue.
    Not ``_scaled_mm``'s rowwise scales: that kernel's bf16 output was beyond one rounding of
    the exact product for 3233 of 8.4M outputs, by up to 256 half-ulps (H200, f30d25d and
    0d500ea, 2048 x 4096 x 4096: its fp8 sums are not exact). The fp32 pass costs M x N x 6
    bytes more traffic. Per-channel weights only (one scale per output column)."""
    m, n, k = x_packed.shape[0], weight.n, weight.k
    fp8 = torch.float8_e4m3fn
    w8 = expand_weight(weight, fp8)
    x8 = _expand(x_packed, m, k, 4, x_packed.shape[1], 1, None, k, z_const=8, dtype=fp8)
    one = torch.ones((), device=x_packed.device)
    raw = torch._scaled_mm(x8, w8.t(), scale_a=one, scale_b=one, out_dtype=torch.float32)
    return scale_out(raw, xs.reshape(m), weight.scales.reshape(n), torch.bfloat16)
