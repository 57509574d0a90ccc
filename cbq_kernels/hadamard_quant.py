"""The online rotation of a layer input fused with its per-token activation quantizer:
``codes, scales = act_quant(x @ R, bits)`` with ``R = diag(signs) H_n / sqrt(n)`` (a
randomised Hadamard matrix, cbq_kernels.hadamard), in one pass over x (issue 15: R4 on the
down_proj input of a rotated model).

The kernel holds one token's row as an (m, 2^j) tile (n = m 2^j, m padded to a power of two):
the fast Walsh-Hadamard transform runs along the 2^j axis in j butterfly stages (reshape,
split, join: the same additions in the same order as :func:`cbq_kernels.hadamard.transform`,
so bit-identical), the small factor H_m is one ``tl.dot`` (fp32, IEEE), then the per-token
quantization of :mod:`cbq_kernels.act_quant` (same step, same rounding) writes int8 codes or
packed int4 words and the fp32 scale.

Exactness against the reference (:func:`hadamard_act_quant_ref`, the transform in fp32 then
:func:`cbq_kernels.act_quant.act_quant_ref`): for n a power of two the codes are equal bit for
bit; with a small factor the dot product adds its m terms in another order than PyTorch's
matmul, so a code may differ by one level where x R lies within an ulp of a rounding boundary
(the tests bound how many).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from cbq_kernels import hadamard
from cbq_kernels._validate import FLOAT_DTYPES, check_tensor, use_triton
from cbq_kernels.act_quant import _act_step, _round_store, act_quant_ref
from cbq_kernels.formats import packed_words

__all__ = ["hadamard_act_quant", "hadamard_act_quant_ref"]

_MAX_N = 16384  # one row in registers
_MAX_M_PAD = 64  # the small factor's tile (m padded) for tl.dot


@triton.jit
def _hadamard_quant_kernel(x_ptr, sg_ptr, a_ptr, q_ptr, s_ptr, N, M, ratio, P, inv_sqrt_n,
                           BITS: tl.constexpr, M_PAD: tl.constexpr, PP: tl.constexpr,
                           LOGP: tl.constexpr, SMALL: tl.constexpr,
                           PER_WORD: tl.constexpr):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, M_PAD)[:, None]
    j = tl.arange(0, PP)[None, :]
    idx = i * PP + j  # position in the row: block i of the small factor, element j
    live = (i < M) & (j < PP)
    x = tl.load(x_ptr + row * N + idx, mask=live, other=0.0).to(tl.float32)
    x = x * tl.load(sg_ptr + idx, mask=live, other=0.0)
    # butterflies at distance 2^stage along j (no named constexpr in the loop: the compiler,
    # unlike the interpreter, refuses to reassign one: "h is already defined")
    for stage in tl.static_range(LOGP):
        y = tl.permute(tl.reshape(x, (M_PAD, PP // (2 << stage), 2, 1 << stage)), (0, 1, 3, 2))
        a, b = tl.split(y)
        y = tl.permute(tl.join(a + b, a - b), (0, 1, 3, 2))
        x = tl.reshape(y, (M_PAD, PP))
    if SMALL:  # Y = A^T X with the m x m factor A (rows / columns >= m are zero)
        kk = tl.arange(0, M_PAD)[:, None]
        ii = tl.arange(0, M_PAD)[None, :]
        at = tl.load(a_ptr + ii * M + kk, mask=(kk < M) & (ii < M), other=0.0)
        x = tl.dot(at, x, input_precision="ieee")
    y = tl.reshape(x * inv_sqrt_n, (M_PAD * PP,))
    m = tl.arange(0, M_PAD * PP) < N
    # the per-token quantizer of cbq_kernels.act_quant (plain: no factors, alpha = 1)
    s = _act_step(tl.max(tl.abs(y), axis=0), ratio, P)
    tl.store(s_ptr + row, s)
    _round_store(y * tl.math.div_rn(1.0, s), m, row, N, P, q_ptr, BITS, PER_WORD, M_PAD * PP)


def _check(x, bits, signs, clip_ratio) -> None:
    check_tensor(x, "x", FLOAT_DTYPES, 2, "tokens, N")
    n = x.shape[1]
    if isinstance(n, int):  # (a symbolic width under torch.compile is checked when it runs)
        hadamard.factor(n)  # a clear error for a width without a construction
    if bits not in (4, 8) or isinstance(bits, bool):
        raise ValueError(f"bits must be 4 or 8 (int8 codes or packed int4), got {bits!r}")
    if not 0.0 < clip_ratio <= 1.0:
        raise ValueError(f"clip_ratio must be in (0, 1], got {clip_ratio}")
    if not isinstance(signs, Tensor) or tuple(signs.shape) != (n,):
        raise ValueError(f"signs must be a tensor of shape ({n},), got {signs!r:.60}")
    if signs.device != x.device:
        raise ValueError(f"signs is on {signs.device} but x is on {x.device}")


def _fits(n: int) -> bool:
    """Whether the fused kernel takes width n (else: the transform, then act_quant)."""
    m, p = hadamard.factor(n)
    return n <= _MAX_N and (m == 1 or (triton.next_power_of_2(m) <= _MAX_M_PAD and p >= 16))


def _impl(x: Tensor, bits: int, signs: Tensor, clip_ratio: float) -> tuple[Tensor, Tensor]:
    _check(x, bits, signs, clip_ratio)
    if not use_triton(_hadamard_quant_kernel, x.device) or not _fits(x.shape[1]):
        if x.device.type != "cpu":  # the composition of the two kernels on the GPU
            from cbq_kernels.act_quant import act_quant

            return act_quant(hadamard.apply(x.float(), signs), bits, clip_ratio=clip_ratio)
        return hadamard_act_quant_ref(x, bits, signs, clip_ratio)
    t, n = x.shape
    m, p = hadamard.factor(n)
    m_pad = max(16, triton.next_power_of_2(m)) if m > 1 else 1
    shape = (t, n) if bits == 8 else (t, packed_words(n, 4))
    codes = torch.empty(shape, dtype=torch.int8 if bits == 8 else torch.int32, device=x.device)
    scales = torch.empty(t, dtype=torch.float32, device=x.device)
    if t and n % 4 == 0:
        small = hadamard._small_tensor(m, x.device, torch.float32) if m > 1 else signs
        out = codes.view(torch.int32) if bits == 8 else codes
        _hadamard_quant_kernel[(t,)](
            x.contiguous(), signs.float().contiguous(), small, out, scales, n, m,
            float(clip_ratio), float((1 << (bits - 1)) - 1), 1.0 / math.sqrt(n),
            BITS=bits, M_PAD=m_pad, PP=p, LOGP=p.bit_length() - 1, SMALL=m > 1,
            PER_WORD=4 if bits == 8 else 8, num_warps=min(16, max(1, m_pad * p // 512)),
            enable_fp_fusion=False,
        )  # fmt: skip
    elif t:
        return hadamard_act_quant_ref(x, bits, signs, clip_ratio)
    return codes, scales


_op = torch.library.custom_op("cbq::hadamard_act_quant", mutates_args=())(_impl)


@_op.register_fake
def _(x, bits, signs, clip_ratio):
    _check(x, bits, signs, clip_ratio)
    t, n = x.shape
    shape = (t, n) if bits == 8 else (t, packed_words(n, 4))
    return (x.new_empty(shape, dtype=torch.int8 if bits == 8 else torch.int32),
            x.new_empty(t, dtype=torch.float32))  # fmt: skip


def hadamard_act_quant(x: Tensor, bits: int, signs: Tensor,
                       clip_ratio: float | Tensor = 1.0) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Per-token quantization of ``x @ diag(signs) H_n / sqrt(n)`` (module docstring).

    Args:
        x: (..., N) float32/float16/bfloat16; leading dims are tokens.
        bits: 8 (int8 codes) or 4 (packed int4 codes, offset 8).
        signs: (N,) +-1 (:func:`cbq_kernels.hadamard.random_signs`).
        clip_ratio: clipping ratio in (0, 1].

    Returns:
        (codes, scales) as :func:`cbq_kernels.act_quant.act_quant` gives them for x @ R.
    """
    if isinstance(clip_ratio, Tensor):
        clip_ratio = float(clip_ratio)
    if not isinstance(x, Tensor) or x.dim() < 1:
        raise TypeError("x must be a tensor of shape (..., N)")
    return _op(x.reshape(-1, x.shape[-1]), bits, signs, float(clip_ratio))


def hadamard_act_quant_ref(x: Tensor, bits: int, signs: Tensor,
                           clip_ratio: float = 1.0) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Plain PyTorch: the transform in fp32, then the per-token quantizer's reference."""
    return act_quant_ref(hadamard.transform(x.float(), signs), bits, clip_ratio)
