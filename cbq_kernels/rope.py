"""Rotary position embedding of the query and key heads in one kernel (the serving path's
RoPE; cbq_ptq.serve.fuse_rope routes a Hugging Face Llama-style attention here).

For q (B, Hq, S, D), k (B, Hk, S, D) and cos / sin (B, S, D), D even, with x1 / x2 the first /
second half of a head's D values::

    out = x * cos + rotate_half(x) * sin,   rotate_half(x) = cat(-x2, x1)

(transformers' ``apply_rotary_pos_emb`` with ``unsqueeze_dim=1``). The kernel rounds as that
eager code does in the input dtype: each product rounded to the dtype, then their sum, so its
outputs equal transformers' bit for bit (tests check it), and fusing changes no number of the
model. Why a kernel: the eager formula is ~10 elementwise kernels per attention layer (two
multiplies, a negation, a concatenation, a multiply and an add, for q and for k), 0.35-0.45
ms of a 7B-shaped decode step on the H200 (bbe9d36 profile: neg 117 us, cat 112 us, and
their share of the bf16 multiplies and adds); one launch per layer reads and writes each
value once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from cbq_kernels._validate import check_float, use_triton
from cbq_kernels.fake_quant import _to_store  # bf16 rounding that the interpreter gets right

__all__ = ["rope", "rope_ref", "rope_takes"]

_MAX_D = 512


@triton.jit
def _round_as(y, ptr):
    """y (fp32) rounded to the element type of ptr (nearest even), kept in fp32 (the store
    rounding of cbq_kernels.fake_quant, which the CPU interpreter gets right for bf16)."""
    return _to_store(y, ptr).to(tl.float32)


@triton.jit
def _rope_kernel(q_ptr, k_ptr, c_ptr, s_ptr, qo_ptr, ko_ptr, S, HQ, HK,
                 qsb, qsh, qss, qsd, ksb, ksh, kss, ksd, csb, css, csd, ssb, sss, ssd,
                 HALF, BLOCK: tl.constexpr):  # fmt: skip
    # one program per (b, s) and head: heads 0..HQ-1 of q, then HQ..HQ+HK-1 of k
    bs = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    b, s = bs // S, bs % S
    i = tl.arange(0, BLOCK)
    m = i < HALF
    c1 = tl.load(c_ptr + b * csb + s * css + i * csd, mask=m, other=0.0).to(tl.float32)
    c2 = tl.load(c_ptr + b * csb + s * css + (i + HALF) * csd, mask=m, other=0.0).to(tl.float32)
    s1 = tl.load(s_ptr + b * ssb + s * sss + i * ssd, mask=m, other=0.0).to(tl.float32)
    s2 = tl.load(s_ptr + b * ssb + s * sss + (i + HALF) * ssd, mask=m, other=0.0).to(tl.float32)
    if head < HQ:
        src = q_ptr + b * qsb + head * qsh + s * qss
        sd = qsd
        dst = qo_ptr + ((b * HQ + head) * S + s) * 2 * HALF  # contiguous (B, HQ, S, D)
    else:
        src = k_ptr + b * ksb + (head - HQ) * ksh + s * kss
        sd = ksd
        dst = ko_ptr + ((b * HK + head - HQ) * S + s) * 2 * HALF
    x1 = tl.load(src + i * sd, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(src + (i + HALF) * sd, mask=m, other=0.0).to(tl.float32)
    # x * cos and rotate_half(x) * sin, each rounded to the dtype, then their sum (eager order)
    lo = _round_as(_round_as(x1 * c1, qo_ptr) + _round_as(-x2 * s1, qo_ptr), qo_ptr)
    hi = _round_as(_round_as(x2 * c2, qo_ptr) + _round_as(x1 * s2, qo_ptr), qo_ptr)
    tl.store(dst + i, lo.to(qo_ptr.dtype.element_ty), mask=m)
    tl.store(dst + HALF + i, hi.to(qo_ptr.dtype.element_ty), mask=m)


def _check(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> None:
    check_float(q, "q")
    for name, t in (("k", k), ("cos", cos), ("sin", sin)):
        check_float(t, name, q, "q")
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must be (batch, heads, seq, head_dim), got {tuple(q.shape)} "
                         f"and {tuple(k.shape)}")  # fmt: skip
    b, _, s, d = q.shape
    if (k.shape[0], k.shape[2], k.shape[3]) != (b, s, d):
        raise ValueError(f"k {tuple(k.shape)} does not match q {tuple(q.shape)} in batch, "
                         "seq or head_dim")  # fmt: skip
    if d % 2 or d > _MAX_D:
        raise ValueError(f"head_dim must be even and at most {_MAX_D}, got {d}")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dim() != 3 or t.shape[1:] != (s, d) or t.shape[0] not in (1, b):
            raise ValueError(f"{name} must be (batch or 1, seq, head_dim) = ({b}, {s}, {d}), "
                             f"got {tuple(t.shape)}")  # fmt: skip
    if k.dtype != q.dtype:
        raise TypeError(f"q and k must have one dtype, got {q.dtype} and {k.dtype}")


def rope_takes(q, k, cos, sin) -> bool:
    """Whether :func:`rope` takes these arguments (instead of raising): a caller that routes
    only some calls here (cbq_ptq.serve.fuse_rope) asks first."""
    try:
        _check(q, k, cos, sin)
    except (TypeError, ValueError):
        return False
    return True


def rope_ref(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """transformers' eager formula (apply_rotary_pos_emb, unsqueeze_dim = 1)."""

    def rotate_half(x: Tensor) -> Tensor:
        h = x.shape[-1] // 2
        return torch.cat((-x[..., h:], x[..., :h]), dim=-1)

    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    return (q * c) + (rotate_half(q) * s), (k * c) + (rotate_half(k) * s)


def _rope_impl(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    _check(q, k, cos, sin)
    if not use_triton(_rope_kernel, q.device) or cos.dtype != q.dtype or sin.dtype != q.dtype:
        return rope_ref(q, k, cos, sin)  # mixed dtypes promote in eager: not this kernel's
    b, hq, s, d = q.shape
    hk = k.shape[1]
    qo = torch.empty((b, hq, s, d), dtype=q.dtype, device=q.device)
    ko = torch.empty((b, hk, s, d), dtype=k.dtype, device=k.device)
    if q.numel() == 0 and k.numel() == 0:
        return qo, ko
    cb = cos.stride(0) if cos.shape[0] > 1 else 0  # a batch of 1 broadcasts
    sb = sin.stride(0) if sin.shape[0] > 1 else 0
    half = d // 2
    _rope_kernel[(b * s, hq + hk)](
        q, k, cos, sin, qo, ko, s, hq, hk,
        *q.stride(), *k.stride(), cb, cos.stride(1), cos.stride(2), sb, sin.stride(1),
        sin.stride(2), half, BLOCK=max(triton.next_power_of_2(half), 16),
        num_warps=1, enable_fp_fusion=False,
    )  # fmt: skip
    return qo, ko


_rope_op = torch.library.custom_op("cbq::rope", mutates_args=())(_rope_impl)


@_rope_op.register_fake
def _(q, k, cos, sin):
    _check(q, k, cos, sin)
    return q.new_empty(q.shape), k.new_empty(k.shape)


def rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """RoPE of q (B, Hq, S, D) and k (B, Hk, S, D) with cos / sin (B or 1, S, D): (q_embed,
    k_embed), contiguous, equal bit for bit to transformers' eager ``apply_rotary_pos_emb``
    (see the module docstring)."""
    return _rope_op(q, k, cos, sin)
