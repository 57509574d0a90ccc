"""Per-token dynamic activation quantization to int8 codes or packed int4 (METHOD.md 1, 6).

For each token (row) t of x (T, K), with optional fused RMSNorm ``y = x / sqrt(mean(x^2) +
eps) * w`` (the input of q/k/v and gate/up in Llama blocks) and optional CrossQuant channel
factors ``f_k = c_k^(1 - alpha)`` (c_k: per-channel maxima from calibration; the factors are
folded into the weight columns, so the GEMM keeps one scale per token)::

    r_t = max_k |y_tk|,   s_t = max(ratio * r_t^alpha / P, floor),   P = 2^(b-1) - 1
    q_tk = clamp(round((y_tk * (1 / f_k)) * (1 / s_t)), -P - 1, P)

so that ``y_tk ~= q_tk * s_t * f_k``; ``floor = max(2^-20 * r_t^alpha, 1e-8)``
(:func:`cbq_kernels.quant_math.act_step`, the one definition of the step). With alpha = 1
and no factors this is plain per-token symmetric quantization with clipping ratio ``ratio``.

Outputs: codes and ``s`` (fp32, (T,)). For 8 bits the codes are int8 (T, K). For 4 bits they
are stored in the packed format of :mod:`cbq_kernels.formats` (signed values offset by 8,
8 codes per little-endian int32 word along K): (T, ceil(K / 8)) int32, identical to
``pack(q + 8, 4)``.

With ``glu`` the input is a fused gate / up output (T, 2K) and the quantized values are
``y = silu(g) * u = g / (1 + exp(-g)) * u`` (g the first K columns, u the last K): the SwiGLU of
a Llama MLP and the quantizer of its down projection in one kernel, in fp32 without rounding
``y`` to the input dtype first (so, as with the RMSNorm, a code may move by one level against
a model that rounds ``y`` to bf16).

Divisions are by reciprocals computed once (correctly rounded) per token, per channel, or per
row of the RMSNorm, in the kernel and the reference alike: one IEEE division per element made
the kernel ALU-bound. Exactness: without RMSNorm and with alpha = 1 the kernel equals the
reference bit for bit (no FMA contraction). The RMSNorm's sum of squares and ``r^alpha`` are
computed in another order / with other math functions than PyTorch, so there codes may differ
by one level for elements within an ulp of a rounding boundary (tests bound how many).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from cbq_kernels._validate import FLOAT_DTYPES, check_tensor, use_triton
from cbq_kernels.formats import packed_words
from cbq_kernels.pdl import launch as pdl_launch
from cbq_kernels.pdl import prologue as pdl_prologue
from cbq_kernels.quant_math import act_step, quantize_act, reciprocal

__all__ = ["act_quant", "act_quant_ref", "dequantize_act_ref", "quant_kernel_fraction"]

_MAX_K = 65536  # one row lives in registers


@triton.jit
def _act_step(r, ratio, P):
    """The per-token step of a row maximum r (cbq_kernels.quant_math.act_step)."""
    return tl.maximum(tl.math.div_rn(ratio * r, P), tl.maximum(r * 9.5367431640625e-07, 1e-8))


@triton.jit
def _round(u, P):
    """Codes in [-P - 1, P] of y / s (round half to even, as torch.round)."""
    u = tl.minimum(tl.maximum(u, -4194304.0), 4194304.0)  # keeps the rounding trick valid
    return tl.minimum(tl.maximum((u + 12582912.0) - 12582912.0, -P - 1.0), P)


@triton.jit
def _round_store(u, m, row, K, P, q_ptr, BITS: tl.constexpr, PER_WORD: tl.constexpr,
                 BLOCK_K: tl.constexpr):  # fmt: skip
    """Round y / s (u, (BLOCK_K,), lanes m valid) to codes in [-P - 1, P] and store row ``row``
    of them: int8 bytes, or whole int32 words (4 int8 codes, or 8 int4 codes offset by 8)."""
    q = _round(u, P)
    if BITS == 8 and K % 4 != 0:
        k = tl.arange(0, BLOCK_K)
        tl.store(q_ptr + row * K + k, q.to(tl.int32).to(tl.int8), mask=m)
    else:
        # Whole int32 words: 4 int8 codes (two's complement bytes) or 8 int4 codes (offset by
        # 8), code j of a word at bit CODE_BITS * j, little endian; padding codes are 0.
        if BITS == 8:
            code = q.to(tl.int32) & 0xFF
        else:
            code = tl.where(m, q.to(tl.int32) + 8, 0)
        words = tl.reshape(code, (BLOCK_K // PER_WORD, PER_WORD))
        shifts = tl.arange(0, PER_WORD) * (32 // PER_WORD)
        packed = tl.sum(words << shifts[None, :], axis=1)  # disjoint bits: sum == or
        n_words = (K + PER_WORD - 1) // PER_WORD
        w_idx = tl.arange(0, BLOCK_K // PER_WORD)
        tl.store(q_ptr + row * n_words + w_idx, packed, mask=w_idx < n_words)


@triton.jit
def _round_store_rows(u, m, rows, row_ok, K, P, q_ptr, BITS: tl.constexpr,
                      PER_WORD: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """:func:`_round_store` for a block of rows (u, m: (R, BLOCK_K); rows: (R,) int64, those
    with row_ok stored), K a multiple of 4 (whole words): the fused Hadamard kernel's store.
    (The one-row form stays separate: with its row as a (1, BLOCK_K) block the act_quant
    kernel took 0.166 ms at 8192 x 11008 int8 on the H200 (2d9c58b) against 0.120 ms in its
    one-row form (ed30008), two runs of benchmarks/bench_hadamard.py.)"""
    q = _round(u, P)
    if BITS == 8:
        code = q.to(tl.int32) & 0xFF
    else:
        code = tl.where(m, q.to(tl.int32) + 8, 0)
    words = tl.reshape(code, (u.shape[0], BLOCK_K // PER_WORD, PER_WORD))
    shifts = tl.arange(0, PER_WORD) * (32 // PER_WORD)
    packed = tl.sum(words << shifts[None, None, :], axis=2)  # disjoint bits: sum == or
    n_words = (K + PER_WORD - 1) // PER_WORD
    w_idx = tl.arange(0, BLOCK_K // PER_WORD)
    tl.store(q_ptr + rows[:, None] * n_words + w_idx[None, :], packed,
             mask=row_ok[:, None] & (w_idx < n_words)[None, :])  # fmt: skip


@triton.jit
def _act_quant_kernel(x_ptr, w_ptr, f_ptr, q_ptr, s_ptr, K, ratio, alpha, norm_eps, P,
                      BITS: tl.constexpr, NORM: tl.constexpr, FACTORS: tl.constexpr,
                      POW: tl.constexpr, PER_WORD: tl.constexpr, GLU: tl.constexpr,
                      BLOCK_K: tl.constexpr, GDC: tl.constexpr):  # fmt: skip
    pdl_prologue(GDC)  # act_quant's ``pdl``: the decode GEMM behind may launch now
    row = tl.program_id(0).to(tl.int64)
    k = tl.arange(0, BLOCK_K)
    m = k < K
    if GLU:  # x is (T, 2K): silu(gate) * up
        g = tl.load(x_ptr + row * 2 * K + k, mask=m, other=0.0).to(tl.float32)
        u = tl.load(x_ptr + row * 2 * K + K + k, mask=m, other=0.0).to(tl.float32)
        y = tl.math.div_rn(g, 1.0 + tl.exp(-g)) * u
    else:
        y = tl.load(x_ptr + row * K + k, mask=m, other=0.0).to(tl.float32)
    if NORM:
        ms = tl.math.div_rn(tl.sum(y * y, axis=0), K.to(tl.float32))
        w = tl.load(w_ptr + k, mask=m, other=0.0).to(tl.float32)
        y = (y * tl.math.div_rn(1.0, tl.sqrt_rn(ms + norm_eps))) * w
    r = tl.max(tl.abs(y), axis=0)
    if POW:  # CrossQuant: r^alpha (r = 0 gives 0)
        r = tl.where(r > 0, tl.exp2(alpha * tl.log2(r)), 0.0)
    s = _act_step(r, ratio, P)
    inv_s = tl.math.div_rn(1.0, s)
    if FACTORS:  # f_ptr holds 1 / f, computed once by the caller
        y = y * tl.load(f_ptr + k, mask=m, other=1.0)
    tl.store(s_ptr + row, s)
    _round_store(y * inv_s, m, row, K, P, q_ptr, BITS, PER_WORD, BLOCK_K)


def _width(x: Tensor, glu: bool) -> int:
    """K, the quantized width: x's columns, or half of them for a gate | up input (glu)."""
    return x.shape[1] // (2 if glu else 1)


def _check(x, bits, clip_ratio, norm_weight, norm_eps, channel_factor, alpha,
           glu=False) -> None:  # fmt: skip
    check_tensor(x, "x", FLOAT_DTYPES, 2, "tokens, K")
    assert isinstance(x, Tensor)
    if glu and x.shape[1] % 2:
        raise ValueError(f"glu takes a (tokens, 2K) gate | up input, got an odd width "
                         f"{x.shape[1]}")  # fmt: skip
    if glu and norm_weight is not None:
        raise ValueError("glu and norm_weight do not combine (a SwiGLU output has no RMSNorm)")
    if _width(x, glu) > _MAX_K:
        raise ValueError(f"K = {x.shape[1]} exceeds the supported {_MAX_K}")
    if bits not in (4, 8) or isinstance(bits, bool):
        raise ValueError(f"bits must be 4 or 8 (int8 codes or packed int4), got {bits!r}")
    if not 0.0 < clip_ratio <= 1.0:
        raise ValueError(f"clip_ratio must be in (0, 1], got {clip_ratio}")
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    if norm_eps <= 0:
        raise ValueError(f"norm_eps must be > 0, got {norm_eps}")
    k = _width(x, glu)
    for name, t in (("norm_weight", norm_weight), ("channel_factor", channel_factor)):
        if t is None:
            continue
        if not isinstance(t, Tensor) or t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be a float tensor, got {type(t).__name__}")
        if tuple(t.shape) != (k,):
            raise ValueError(f"{name} must have shape (K,) = ({k},), got {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if alpha != 1.0 and channel_factor is None:
        raise ValueError("CrossQuant (alpha < 1) needs channel_factor = c^(1 - alpha)")


def _out_shapes(x: Tensor, bits: int, glu: bool = False) -> tuple[tuple[int, int], torch.dtype]:
    t, k = x.shape[0], _width(x, glu)
    return ((t, k), torch.int8) if bits == 8 else ((t, packed_words(k, 4)), torch.int32)


def _act_quant_impl(
    x: Tensor,
    bits: int,
    clip_ratio: float,
    norm_weight: Tensor | None,
    norm_eps: float,
    channel_factor: Tensor | None,
    alpha: float,
    glu: bool = False,
    pdl: bool = False,
) -> tuple[Tensor, Tensor]:
    _check(x, bits, clip_ratio, norm_weight, norm_eps, channel_factor, alpha, glu)
    if not use_triton(_act_quant_kernel, x.device):
        return act_quant_ref(x, bits, clip_ratio, norm_weight, norm_eps, channel_factor, alpha,
                             glu)  # fmt: skip
    shape, dtype = _out_shapes(x, bits, glu)
    codes = torch.empty(shape, dtype=dtype, device=x.device)
    scales = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    k = _width(x, glu)
    if x.numel():
        block_k = max(triton.next_power_of_2(k), 16)
        w = x if norm_weight is None else norm_weight.float().contiguous()
        f = x if channel_factor is None else reciprocal(channel_factor.float()).contiguous()
        # int8 codes are written as int32 words of 4 when K allows (full-width stores).
        out = codes.view(torch.int32) if bits == 8 and k % 4 == 0 else codes
        args = (x, w, f, out, scales, k, float(clip_ratio), float(alpha), float(norm_eps),
                float((1 << (bits - 1)) - 1))  # fmt: skip
        meta = dict(BITS=bits, NORM=norm_weight is not None, FACTORS=channel_factor is not None,
                    POW=alpha != 1.0, PER_WORD=4 if bits == 8 else 8, GLU=glu, BLOCK_K=block_k,
                    num_warps=min(16, max(1, block_k // 512)),
                    enable_fp_fusion=False)  # fmt: skip
        pdl_launch(_act_quant_kernel, (x.shape[0],), args, meta, pdl, x.device)
    return codes, scales


_act_quant_op = torch.library.custom_op("cbq::act_quant", mutates_args=())(_act_quant_impl)


@_act_quant_op.register_fake
def _(x, bits, clip_ratio, norm_weight, norm_eps, channel_factor, alpha, glu=False, pdl=False):
    _check(x, bits, clip_ratio, norm_weight, norm_eps, channel_factor, alpha, glu)
    shape, dtype = _out_shapes(x, bits, glu)
    return x.new_empty(shape, dtype=dtype), x.new_empty(x.shape[0], dtype=torch.float32)


def act_quant(
    x: Tensor,
    bits: int = 8,
    *,
    clip_ratio: float | Tensor = 1.0,
    norm_weight: Tensor | None = None,
    norm_eps: float = 1e-6,
    channel_factor: Tensor | None = None,
    alpha: float = 1.0,
    glu: bool = False,
    pdl: bool = False,
) -> tuple[Tensor, Tensor]:
    """Quantize activations per token (see the module docstring).

    Args:
        x: (..., K) float32/float16/bfloat16, contiguous; leading dims are tokens.
        bits: 8 (int8 codes) or 4 (packed int4 codes).
        clip_ratio: clipping ratio in (0, 1] (a learned one: ``sigmoid(logit)``).
        norm_weight: (K,) RMSNorm weight to apply first, or None.
        norm_eps: RMSNorm epsilon.
        channel_factor: (K,) CrossQuant factors ``c^(1 - alpha)``, or None.
        alpha: CrossQuant exponent in (0, 1]; 1 is plain per-token quantization.
        glu: x is (..., 2K), a gate | up output; ``silu(gate) * up`` is quantized.
        pdl: on a GPU of compute capability >= 9.0, launch with programmatic dependent launch
            and let the next kernel launch at once (``cbq_kernels.gemm.linear`` asks for it
            under GemmPolicy.prologue_pdl): a decode GEMM launched so too (GemmPolicy.decode_pdl)
            then prefetches its weight while this kernel runs. The same bits either way;
            ignored off such a GPU.

    Returns:
        (codes, scales): codes (T, K) int8 or (T, ceil(K/8)) int32, scales (T,) fp32, T the
        product of the leading dims.
    """
    if isinstance(clip_ratio, Tensor):
        clip_ratio = float(clip_ratio)
    if not isinstance(x, Tensor) or x.dim() < 1:
        raise TypeError("x must be a tensor of shape (..., K)")
    return _act_quant_op(x.reshape(-1, x.shape[-1]), bits, float(clip_ratio), norm_weight,
                         float(norm_eps), channel_factor, float(alpha), bool(glu),
                         bool(pdl))  # fmt: skip


def act_quant_ref(
    x: Tensor,
    bits: int = 8,
    clip_ratio: float = 1.0,
    norm_weight: Tensor | None = None,
    norm_eps: float = 1e-6,
    channel_factor: Tensor | None = None,
    alpha: float = 1.0,
    glu: bool = False,
) -> tuple[Tensor, Tensor]:
    """Plain PyTorch :func:`act_quant` on (T, K) input (fp32 inside); with ``glu`` on (T, 2K)
    input, ``silu(gate) * up`` as ``gate / (1 + exp(-gate)) * up``."""
    from cbq_kernels.packing import pack_ref

    y = x.float()
    if glu:
        g, u = y.chunk(2, dim=1)
        y = g / (1.0 + torch.exp(-g)) * u
    k = y.shape[1]
    if norm_weight is not None:
        y = rms_norm_fp32(y, norm_weight, norm_eps)
    if k:  # the arithmetic of cbq_kernels.quant_math, which the kernel repeats
        q, s = quantize_act(y, bits, clip_ratio, channel_factor, alpha)
    else:
        q, s = y, act_step(y.new_zeros(y.shape[0], 1), bits, clip_ratio)
    codes = q.to(torch.int8) if bits == 8 else pack_ref((q + 8).to(torch.uint8), 4)
    return codes, s.reshape(-1)


def rms_norm_fp32(y: Tensor, weight: Tensor, eps: float) -> Tensor:
    """The RMSNorm :func:`act_quant` applies in fp32 before quantizing, as the kernel computes
    it: ``(y * (1 / sqrt(sum(y^2) / K + eps))) * w``, no rounding to the compute dtype between
    (transformers writes ``y * rsqrt(mean + eps)``, rounded, then ``w *``: a few fp32 units
    apart; scripts/a8_sensitivity.py measures what that does to the codes)."""
    # divide by a tensor: CUDA divides by Python scalars via reciprocals
    ms = (y * y).sum(1, keepdim=True) / torch.full_like(y[:, :1], y.shape[1])
    return (y * reciprocal(torch.sqrt(ms + eps))) * weight.float()


def dequantize_act_ref(
    codes: Tensor, scales: Tensor, bits: int, k: int, channel_factor: Tensor | None = None
) -> Tensor:
    """fp32 (T, K) values ``q * s_t * f_k`` of codes produced by :func:`act_quant`."""
    from cbq_kernels.packing import unpack_ref

    q = codes.float() if bits == 8 else unpack_ref(codes, 4, k).float() - 8
    y = q * scales.float()[:, None]
    return y if channel_factor is None else y * channel_factor.float()[None, :]


def quant_kernel_fraction(x: Tensor, bits: int = 8, **kwargs) -> float:
    """Fraction of the non-zero elements of x whose quantized code is 0 (CrossQuant's
    "quantization kernel"); keyword arguments as for :func:`act_quant`."""
    from cbq_kernels.packing import unpack_ref

    x2 = x.reshape(-1, x.shape[-1])
    codes, _ = act_quant(x2, bits, **kwargs)
    q = codes if bits == 8 else unpack_ref(codes, 4, x2.shape[1]).to(torch.int16) - 8
    nonzero = x2 != 0
    total = int(nonzero.sum())
    return float(((q == 0) & nonzero).sum()) / total if total else 0.0
