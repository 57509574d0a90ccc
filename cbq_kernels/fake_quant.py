"""Fused fake-quantization (quantize -> dequantize) with straight-through gradients.

One Triton kernel pair serves weights and activations. The data is cut into *segments*, each
with its own scale: a segment is one row (per-channel weights, per-token activations) or one
group of ``group_size`` consecutive elements of a row (the last group may be shorter). For a
segment with maximum ``vmax`` and minimum ``vmin`` and clipping factors ``fmax``, ``fmin``
(``sigmoid`` of learnable logits; 1 when not learned), following METHOD.md section 1 and
:mod:`cbq_kernels.quant_math` (the one written form of this arithmetic, which the PyTorch
paths below call):

asymmetric (weights, integer zero point), ``Q = 2**b - 1``::

    s = max((fmax*vmax - fmin*vmin) / Q, floor),  z = round(-fmin*vmin / s)
    q = clamp(round(x / s) + z, 0, Q),          y = (q - z) * s

symmetric (weights optionally; activations always), ``P = 2**(b-1) - 1``::

    s = max(fmax * max(|vmax|, |vmin|) / P, floor),  q = clamp(round(x / s), -P-1, P),  y = q * s

with ``floor = max(2**-20 * max(|vmax|, |vmin|), 1e-8)``.

Gradients (straight-through estimator, ``round`` treated as identity; the statistics
vmax/vmin are treated as constants, i.e. no gradient flows through the arg-max element):

* ``dx = dy`` where ``q`` was not clamped, 0 where it was;
* ``ds = sum(dy * (round(x/s) - x/s))`` over unclamped elements plus
  ``sum(dy * (q_c - z + zt))`` over clamped ones (``zt = -fmin*vmin/s``, the unrounded zero
  point, whose dependence on s is the LSQ term of the zero point);
* the zero point adds ``sum(dy)`` over clamped elements to ``d(fmin*vmin)``;
* chained to the factors: ``dfmax = vmax * ds/Q``, ``dfmin = vmin * (-ds/Q + sum_clamped dy)``
  (asymmetric) and ``dfmax = max|v| * ds / P`` (symmetric).

Forward and backward each read the data once from DRAM (the second sweep over a segment, after
its statistics, hits L2), compute in fp32 whatever the storage dtype (Triton's CPU
interpreter gets bf16 arithmetic wrong, see KERNELS.md), and round to nearest even with the
``(x + 1.5*2**23) - 1.5*2**23`` trick, which matches ``torch.round``. ``x / s`` is computed
as ``x * (1/s)`` with the reciprocal correctly rounded once per segment (IEEE ``div_rn``),
in the reference too; with FMA contraction off, the forward pass equals the PyTorch
reference bit for bit on CPU and GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from cbq_kernels._validate import FLOAT_DTYPES, check_tensor, describe, use_triton
from cbq_kernels.formats import groups_per_row
from cbq_kernels.quant_math import (
    clip_factors,
    qrange,
    reciprocal,
    round_codes,
    round_ste,
    segment_reduce,
    weight_params,
)

__all__ = [
    "clip_factors",
    "fake_quant",
    "fake_quant_act",
    "fake_quant_act_ref",
    "fake_quant_ref",
    "fake_quant_weight",
    "fake_quant_weight_ref",
]

# Factor modes (constexpr): no learned clipping, one factor per segment, one for all.
_NO_FACTOR, _PER_SEGMENT, _SHARED = 0, 1, 2


# ------------------------------------------------------------------------------ kernels


@triton.jit
def _segment_view(seg, n_seg, K, G, GS):
    """Start offset (int64) and length of each segment id in `seg`, and its validity."""
    ok = seg < n_seg
    row = seg // G
    grp = seg - row * G
    start = row.to(tl.int64) * K + grp * GS
    length = tl.minimum(GS, K - grp * GS)
    return ok, start, length


@triton.jit
def _tile_view(ok, start, length, e0, BLOCK_E: tl.constexpr):
    e = e0 + tl.arange(0, BLOCK_E)
    m = ok[:, None] & (e[None, :] < length[:, None])
    return m, start[:, None] + e[None, :]


@triton.jit
def _stats_loop(x_ptr, ok, start, length, GS, BLOCK_S: tl.constexpr, BLOCK_E: tl.constexpr):
    """Segment max and min over a loop of tiles; elementwise accumulators, one reduction."""
    acc_max = tl.full((BLOCK_S, BLOCK_E), float("-inf"), tl.float32)
    acc_min = tl.full((BLOCK_S, BLOCK_E), float("inf"), tl.float32)
    for e0 in range(0, GS, BLOCK_E):
        m, offs = _tile_view(ok, start, length, e0, BLOCK_E)
        x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
        acc_max = tl.maximum(acc_max, tl.where(m, x, float("-inf")))
        acc_min = tl.minimum(acc_min, tl.where(m, x, float("inf")))
    return tl.max(acc_max, axis=1), tl.min(acc_min, axis=1)


@triton.jit
def _segment_params(vmax, vmin, fmax_ptr, fmin_ptr, seg, ok, QHI, SYM: tl.constexpr,
                    FACTOR: tl.constexpr, BLOCK_S: tl.constexpr):  # fmt: skip
    """Step s, its reciprocal, zero point z (and its unrounded value zt) from the stats."""
    vmax = tl.where(ok, vmax, 0.0)
    vmin = tl.where(ok, vmin, 0.0)
    if FACTOR == 1:
        fmax = tl.load(fmax_ptr + seg, mask=ok, other=1.0)
        fmin = tl.load(fmin_ptr + seg, mask=ok, other=1.0)
    elif FACTOR == 2:
        fmax = tl.load(fmax_ptr + seg * 0)
        fmin = tl.load(fmin_ptr + seg * 0)
    else:
        fmax = tl.full((BLOCK_S,), 1.0, tl.float32)
        fmin = tl.full((BLOCK_S,), 1.0, tl.float32)
    vabs = tl.maximum(tl.abs(vmax), tl.abs(vmin))
    floor = tl.maximum(vabs * 9.5367431640625e-07, 1e-8)  # EPS_REL = 2**-20, EPS
    if SYM:
        raw = tl.math.div_rn(fmax * vabs, QHI)
        s = tl.maximum(raw, floor)
        zt = tl.zeros((BLOCK_S,), tl.float32)
        z = zt
    else:
        lo = fmin * vmin
        raw = tl.math.div_rn(fmax * vmax - lo, QHI)
        s = tl.maximum(raw, floor)
        zt = tl.math.div_rn(-lo, s)
        z = (zt + 12582912.0) - 12582912.0  # |zt| <= 2**20: exact round half to even
    inv_s = tl.math.div_rn(tl.full((BLOCK_S,), 1.0, tl.float32), s)
    return vmax, vmin, s, inv_s, z, zt, raw > floor


@triton.jit
def _to_store(y, ptr):
    """y (fp32) in the element type of ptr, rounded to nearest even. For bf16 the rounding is
    done here on the bits, because Triton's CPU interpreter truncates fp32 -> bf16; the
    result is then exactly representable and the conversion exact everywhere."""
    if ptr.dtype.element_ty == tl.bfloat16:
        b = y.to(tl.uint32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
        y = b.to(tl.float32, bitcast=True)
    return y.to(ptr.dtype.element_ty)


@triton.jit
def _quantize(x, inv_s, z, QLO, QHI):
    u = x * inv_s[:, None]  # |u| <= 2**20 (1 + 2**-23) thanks to the floor on s
    r = (u + 12582912.0) - 12582912.0
    v = r + z[:, None]
    q = tl.minimum(tl.maximum(v, QLO), QHI)
    return u, r, v, q


@triton.jit
def _fwd_tile(x, m, offs, y_ptr, s, inv_s, z, QLO, QHI):
    _u, _r, _v, q = _quantize(x, inv_s, z, QLO, QHI)
    y = (q - z[:, None]) * s[:, None]
    tl.store(y_ptr + offs, _to_store(y, y_ptr), mask=m)


@triton.jit
def _bwd_tile(x, m, offs, dy_ptr, dx_ptr, inv_s, z, zt, QLO, QHI, acc_s, acc_z):
    """Stores dx of a tile; adds its elementwise terms of dL/ds and of the clamped sum."""
    dy = tl.load(dy_ptr + offs, mask=m, other=0.0).to(tl.float32)
    u, r, v, q = _quantize(x, inv_s, z, QLO, QHI)
    inside = (v >= QLO) & (v <= QHI)
    tl.store(dx_ptr + offs, tl.where(inside, dy, 0.0).to(dx_ptr.dtype.element_ty), mask=m)
    ds = tl.where(inside, r - u, q - z[:, None] + zt[:, None])
    return acc_s + dy * ds, acc_z + tl.where(inside, 0.0, dy)


@triton.jit
def _fake_quant_fwd_kernel(x_ptr, y_ptr, fmax_ptr, fmin_ptr, n_seg, K, G, GS, QLO, QHI,
                           SYM: tl.constexpr, FACTOR: tl.constexpr, BLOCK_S: tl.constexpr,
                           BLOCK_E: tl.constexpr, ONE_TILE: tl.constexpr):  # fmt: skip
    seg = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    ok, start, length = _segment_view(seg, n_seg, K, G, GS)
    if ONE_TILE:  # the segment fits in one tile: read x once, keep it in registers
        m, offs = _tile_view(ok, start, length, 0, BLOCK_E)
        x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
        vmax = tl.max(tl.where(m, x, float("-inf")), axis=1)
        vmin = tl.min(tl.where(m, x, float("inf")), axis=1)
        # Distinct names: Triton rejects a name (such as `_`) whose type changes in a loop.
        _a, _b, s, inv_s, z, _zt, _free = _segment_params(
            vmax, vmin, fmax_ptr, fmin_ptr, seg, ok, QHI, SYM, FACTOR, BLOCK_S
        )
        _fwd_tile(x, m, offs, y_ptr, s, inv_s, z, QLO, QHI)
    else:
        vmax, vmin = _stats_loop(x_ptr, ok, start, length, GS, BLOCK_S, BLOCK_E)
        _c, _d, s, inv_s, z, _zt2, _free2 = _segment_params(
            vmax, vmin, fmax_ptr, fmin_ptr, seg, ok, QHI, SYM, FACTOR, BLOCK_S
        )
        for e0 in range(0, GS, BLOCK_E):  # second sweep: the segment's data is in L2
            m2, offs2 = _tile_view(ok, start, length, e0, BLOCK_E)
            x2 = tl.load(x_ptr + offs2, mask=m2, other=0.0).to(tl.float32)
            _fwd_tile(x2, m2, offs2, y_ptr, s, inv_s, z, QLO, QHI)


@triton.jit
def _fake_quant_bwd_kernel(x_ptr, dy_ptr, dx_ptr, fmax_ptr, fmin_ptr, dfmax_ptr, dfmin_ptr,
                           n_seg, K, G, GS, QLO, QHI, SYM: tl.constexpr, FACTOR: tl.constexpr,
                           BLOCK_S: tl.constexpr, BLOCK_E: tl.constexpr,
                           ONE_TILE: tl.constexpr):  # fmt: skip
    seg = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    ok, start, length = _segment_view(seg, n_seg, K, G, GS)
    acc_s = tl.zeros((BLOCK_S, BLOCK_E), tl.float32)  # elementwise terms of dL/ds
    acc_z = tl.zeros((BLOCK_S, BLOCK_E), tl.float32)  # dy over clamped elements
    if ONE_TILE:
        m, offs = _tile_view(ok, start, length, 0, BLOCK_E)
        x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
        vmax = tl.max(tl.where(m, x, float("-inf")), axis=1)
        vmin = tl.min(tl.where(m, x, float("inf")), axis=1)
        vmax, vmin, _s1, inv_s, z, zt, s_free = _segment_params(
            vmax, vmin, fmax_ptr, fmin_ptr, seg, ok, QHI, SYM, FACTOR, BLOCK_S
        )
        acc_s, acc_z = _bwd_tile(x, m, offs, dy_ptr, dx_ptr, inv_s, z, zt, QLO, QHI, acc_s,
                                 acc_z)  # fmt: skip
    else:
        vmax, vmin = _stats_loop(x_ptr, ok, start, length, GS, BLOCK_S, BLOCK_E)
        vmax, vmin, _s, inv_s, z, zt, s_free = _segment_params(
            vmax, vmin, fmax_ptr, fmin_ptr, seg, ok, QHI, SYM, FACTOR, BLOCK_S
        )
        for e0 in range(0, GS, BLOCK_E):
            m2, offs2 = _tile_view(ok, start, length, e0, BLOCK_E)
            x2 = tl.load(x_ptr + offs2, mask=m2, other=0.0).to(tl.float32)
            acc_s, acc_z = _bwd_tile(x2, m2, offs2, dy_ptr, dx_ptr, inv_s, z, zt, QLO, QHI,
                                     acc_s, acc_z)  # fmt: skip
    if FACTOR != 0:
        g_s = tl.sum(acc_s, axis=1)
        g_z = tl.sum(acc_z, axis=1)
        g_s = tl.where(s_free, g_s, 0.0)  # s at its floor: no gradient reaches the factors
        if SYM:
            dfmax = g_s * tl.math.div_rn(tl.maximum(tl.abs(vmax), tl.abs(vmin)), QHI)
            dfmin = tl.zeros((BLOCK_S,), tl.float32)
        else:
            d_hi = tl.math.div_rn(g_s, QHI)
            dfmax = d_hi * vmax
            dfmin = (g_z - d_hi) * vmin
        tl.store(dfmax_ptr + seg, dfmax, mask=ok)
        tl.store(dfmin_ptr + seg, dfmin, mask=ok)


# ------------------------------------------------------------------------------ launch


def _grid_config(group: int) -> tuple[int, int, int, bool]:
    """(BLOCK_S, BLOCK_E, num_warps, ONE_TILE), from the sweep of benchmarks/tune_fake_quant.py
    on the H100 (results/h100/tune_fake_quant.txt): about 2K elements per program and 4 warps
    beat larger tiles; a segment of up to 4096 elements is one tile (read from DRAM once,
    kept in registers), a longer one is swept twice in tiles of 2048."""
    full = triton.next_power_of_2(max(group, 1))
    if full <= 4096:
        block_s = max(1, 2048 // full)
        return block_s, full, max(4, block_s * full // 512), True
    return 1, 2048, 4, False


def _factor_mode(fmax: Tensor | None) -> int:
    if fmax is None:
        return _NO_FACTOR
    return _SHARED if fmax.numel() == 1 else _PER_SEGMENT


class _Plan:
    """Segment layout and launch configuration shared by the forward and backward launches."""

    def __init__(self, x2d: Tensor, group_size: int | None, bits: int, symmetric: bool,
                 fmax: Tensor | None) -> None:  # fmt: skip
        n, self.k = x2d.shape
        self.gs = self.k if group_size is None else group_size
        self.groups = -(-self.k // self.gs) if self.k else 0
        self.n_seg = n * self.groups
        self.qlo, self.qhi = qrange(bits, symmetric)
        self.symmetric = symmetric
        self.mode = _factor_mode(fmax)
        self.block_s, self.block_e, self.warps, self.one_tile = _grid_config(self.gs)
        self.grid = (triton.cdiv(self.n_seg, self.block_s),)

    def scalars(self) -> tuple[int, int, int, int, float, float]:
        return self.n_seg, self.k, self.groups, self.gs, self.qlo, self.qhi

    def meta(self) -> dict[str, object]:
        return {
            "SYM": self.symmetric, "FACTOR": self.mode, "BLOCK_S": self.block_s,
            "BLOCK_E": self.block_e, "ONE_TILE": self.one_tile, "num_warps": self.warps,
            "enable_fp_fusion": False,
        }  # fmt: skip


def _launch_fwd(plan: _Plan, x: Tensor, y: Tensor, fmax: Tensor | None,
                fmin: Tensor | None) -> None:  # fmt: skip
    if plan.n_seg:
        # Without factors the pointers are never read; any tensor will do.
        fa = x if fmax is None else fmax
        fb = fa if fmin is None else fmin
        _fake_quant_fwd_kernel[plan.grid](x, y, fa, fb, *plan.scalars(), **plan.meta())


def _launch_bwd(plan: _Plan, x: Tensor, dy: Tensor, dx: Tensor, fmax: Tensor | None,
                fmin: Tensor | None, dfmax: Tensor, dfmin: Tensor) -> None:  # fmt: skip
    if plan.n_seg:
        fa = x if fmax is None else fmax
        fb = fa if fmin is None else fmin
        _fake_quant_bwd_kernel[plan.grid](
            x, dy, dx, fa, fb, dfmax, dfmin, *plan.scalars(), **plan.meta()
        )


# ------------------------------------------------------------------------------ torch math
# The same formulas in PyTorch, segment by segment: the CPU implementation when Triton's
# interpreter is off, and the explicit form of the kernels' contract.


def _fake_quant_torch(x: Tensor, bits: int, group_size: int | None, fmax: Tensor | None,
                      fmin: Tensor | None, symmetric: bool) -> Tensor:  # fmt: skip
    x32 = x.float()
    _, _, _, s, z, _, gid = weight_params(x32, group_size, bits, symmetric, fmax, fmin)
    qlo, qhi = qrange(bits, symmetric)
    s_e, z_e = s[:, gid], z[:, gid]
    q = round_codes(x32 * reciprocal(s)[:, gid], z_e, qlo, qhi)
    return ((q - z_e) * s_e).to(x.dtype)


def _fake_quant_backward_torch(dy: Tensor, x: Tensor, bits: int, group_size: int | None,
                               fmax: Tensor | None, fmin: Tensor | None,
                               symmetric: bool) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    x32, dy32 = x.float(), dy.float()
    vmax, vmin, s_free, s, z, zt, gid = weight_params(x32, group_size, bits, symmetric, fmax,
                                                      fmin)  # fmt: skip
    qlo, qhi = qrange(bits, symmetric)
    z_e = z[:, gid]
    u = x32 * reciprocal(s)[:, gid]
    r = torch.round(u)
    v = r + z_e
    q = v.clamp(qlo, qhi)
    inside = (v >= qlo) & (v <= qhi)
    dx = torch.where(inside, dy32, 0.0).to(x.dtype)
    ds = torch.where(inside, r - u, q - z_e + zt[:, gid])
    g_s = segment_reduce(dy32 * ds, group_size, "sum")
    g_z = segment_reduce(torch.where(inside, 0.0, dy32), group_size, "sum")
    g_s = torch.where(s_free, g_s, 0.0)
    if symmetric:
        dfmax = g_s * (torch.maximum(vmax.abs(), vmin.abs()) / qhi)
        dfmin = torch.zeros_like(dfmax)
    else:
        d_hi = g_s / qhi
        dfmax, dfmin = d_hi * vmax, (g_z - d_hi) * vmin
    return dx, dfmax.reshape(-1), dfmin.reshape(-1)


# ------------------------------------------------------------------------------ checks


def _check(x: object, bits: object, group_size: object, fmax: object, fmin: object,
           symmetric: object, min_bits: int = 2) -> None:  # fmt: skip
    check_tensor(x, "x", FLOAT_DTYPES, 2, "rows, K")
    assert isinstance(x, Tensor)
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise TypeError(f"bits must be an int, got {type(bits).__name__}")
    if not min_bits <= bits <= 8:
        raise ValueError(f"bits must be in [{min_bits}, 8], got {bits}")
    if group_size is not None:
        if isinstance(group_size, bool) or not isinstance(group_size, int):
            raise TypeError(f"group_size must be an int or None, got {type(group_size).__name__}")
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
    if not isinstance(symmetric, bool):
        raise TypeError(f"symmetric must be a bool, got {type(symmetric).__name__}")
    n, k = x.shape
    groups = groups_per_row(k, group_size)
    for name, f in (("max factor", fmax), ("min factor", fmin)):
        if f is None:
            continue
        if not isinstance(f, Tensor) or f.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be a float tensor, got {f!r:.80}")
        if f.device != x.device:
            raise ValueError(f"{name} is on {f.device} but x is on {x.device}")
        if f.numel() != 1 and tuple(f.shape) != (n, groups):
            raise ValueError(
                f"{name} must have one element (shared) or shape (rows, groups) = "
                f"{(n, groups)} for x of {describe(x)} and group_size={group_size}; "
                f"got shape {tuple(f.shape)}"
            )
    if symmetric and fmin is not None:
        raise ValueError("a min factor is meaningless for symmetric quantization: pass None")


def _factors(fmax: Tensor | None, fmin: Tensor | None, symmetric: bool):
    """fp32 contiguous factors; with one of the pair given (asymmetric), the other is 1."""
    if fmax is None and fmin is None:
        return None, None
    if symmetric:
        return fmax.float().contiguous(), None  # type: ignore[union-attr]
    if fmax is None:
        assert fmin is not None
        fmax = torch.ones_like(fmin, dtype=torch.float32)
    if fmin is None:
        fmin = torch.ones_like(fmax, dtype=torch.float32)
    fa, fb = fmax.float(), fmin.float()
    return fa.contiguous(), fb.contiguous()


# ------------------------------------------------------------------------------ ops


def _fake_quant_impl(x: Tensor, bits: int, group_size: int | None = None,
                     fmax: Tensor | None = None, fmin: Tensor | None = None,
                     symmetric: bool = False) -> Tensor:  # fmt: skip
    _check(x, bits, group_size, fmax, fmin, symmetric)
    fa, fb = _factors(fmax, fmin, symmetric)
    if not use_triton(_fake_quant_fwd_kernel, x.device):
        return _fake_quant_torch(x, bits, group_size, fa, fb, symmetric)
    y = torch.empty_like(x)
    plan = _Plan(x, group_size, bits, symmetric, fa)
    _launch_fwd(plan, x, y, fa, fb)
    return y


def _fake_quant_backward_impl(dy: Tensor, x: Tensor, bits: int, group_size: int | None,
                              fmax: Tensor | None, fmin: Tensor | None,
                              symmetric: bool) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    _check(x, bits, group_size, fmax, fmin, symmetric)
    if dy.shape != x.shape or dy.dtype != x.dtype or dy.device != x.device:
        raise ValueError(f"dy must match x: got {dy.shape} {dy.dtype} vs {x.shape} {x.dtype}")
    dy = dy.contiguous()
    fa, fb = _factors(fmax, fmin, symmetric)
    if not use_triton(_fake_quant_fwd_kernel, x.device):
        return _fake_quant_backward_torch(dy, x, bits, group_size, fa, fb, symmetric)
    plan = _Plan(x, group_size, bits, symmetric, fa)
    dx = torch.empty_like(x)
    # With factors the kernel writes every segment's gradient; without, they are zero.
    alloc = torch.zeros if fa is None else torch.empty
    dfmax = alloc(plan.n_seg, dtype=torch.float32, device=x.device)
    dfmin = alloc(plan.n_seg, dtype=torch.float32, device=x.device)
    _launch_bwd(plan, x, dy, dx, fa, fb, dfmax, dfmin)
    return dx, dfmax, dfmin


_fake_quant_op = torch.library.custom_op("cbq::fake_quant", mutates_args=())(_fake_quant_impl)


@_fake_quant_op.register_fake
def _(x, bits, group_size=None, fmax=None, fmin=None, symmetric=False):
    _check(x, bits, group_size, fmax, fmin, symmetric)
    return torch.empty_like(x)


@torch.library.custom_op("cbq::fake_quant_backward", mutates_args=())
def fake_quant_backward(
    dy: Tensor,
    x: Tensor,
    bits: int,
    group_size: int | None,
    fmax: Tensor | None,
    fmin: Tensor | None,
    symmetric: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of :func:`fake_quant`: (dx like x, dfmax and dfmin per segment, fp32 (N*G,))."""
    return _fake_quant_backward_impl(dy, x, bits, group_size, fmax, fmin, symmetric)


@fake_quant_backward.register_fake
def _(dy, x, bits, group_size, fmax, fmin, symmetric):
    _check(x, bits, group_size, fmax, fmin, symmetric)
    groups = groups_per_row(x.shape[1], group_size)
    n_seg = x.shape[0] * groups
    return (torch.empty_like(x), x.new_empty(n_seg, dtype=torch.float32),
            x.new_empty(n_seg, dtype=torch.float32))  # fmt: skip


def _setup_context(ctx, inputs, output):
    x, bits, group_size, fmax, fmin, symmetric = inputs
    ctx.save_for_backward(x, fmax, fmin)
    ctx.config = (bits, group_size, symmetric)


def _factor_grad(partial: Tensor, f: Tensor | None) -> Tensor | None:
    if f is None:
        return None
    total = partial.sum() if f.numel() == 1 else partial
    return total.reshape(f.shape).to(f.dtype)


def _backward(ctx, dy):
    x, fmax, fmin = ctx.saved_tensors
    bits, group_size, symmetric = ctx.config
    dx, dfmax, dfmin = fake_quant_backward(dy, x, bits, group_size, fmax, fmin, symmetric)
    return dx, None, None, _factor_grad(dfmax, fmax), _factor_grad(dfmin, fmin), None


_fake_quant_op.register_autograd(_backward, setup_context=_setup_context)


def fake_quant(
    x: Tensor,
    bits: int,
    group_size: int | None = None,
    fmax: Tensor | None = None,
    fmin: Tensor | None = None,
    symmetric: bool = False,
) -> Tensor:
    """Fake-quantize x (rows, K) per row or per group of K; differentiable (STE).

    Args:
        x: (N, K) float32/float16/bfloat16, contiguous.
        bits: 2..8.
        group_size: elements per group along K (the last one may be shorter), None per row.
        fmax, fmin: clipping factors in (0, 1] (the sigmoid of the learnable logits), fp32,
            shape (N, G) or one element shared by all segments; None means 1 (min-max).
            ``fmin`` only for asymmetric quantization.
        symmetric: signed codes, ``y = s * clamp(round(x/s), -2**(b-1), 2**(b-1)-1)``.

    Returns:
        (N, K) tensor of x's dtype (the op ``torch.ops.cbq.fake_quant``).
    """
    return _fake_quant_op(x, bits, group_size, fmax, fmin, symmetric)


# ------------------------------------------------------------------------------ public API


def fake_quant_weight(
    w: Tensor,
    bits: int,
    group_size: int | None = None,
    clip_max_logit: Tensor | None = None,
    clip_min_logit: Tensor | None = None,
    symmetric: bool = False,
) -> Tensor:
    """Fake-quantized weight (N, K), per output channel or per group of K (METHOD.md 1).

    The learnable clipping bounds are ``sigmoid(clip_max_logit) * max`` and
    ``sigmoid(clip_min_logit) * min`` per row or group; logits of shape (N, G) or one
    element; None means plain min-max. Gradients reach ``w`` (straight-through, zero where
    clamped) and both logits.
    """
    fmax, fmin = clip_factors(clip_max_logit, clip_min_logit)
    return fake_quant(w, bits, group_size, fmax, fmin, symmetric)


def fake_quant_act(x: Tensor, bits: int, clip_logit: Tensor | None = None) -> Tensor:
    """Per-token symmetric fake-quantized activation (..., K), bits 4..8 (METHOD.md 1).

    ``s_t = sigmoid(clip_logit) * max_k |x_tk| / (2**(b-1) - 1)``, one learnable clipping
    ratio (a one-element logit) per layer input; None means ratio 1.
    """
    if isinstance(bits, int) and not isinstance(bits, bool) and not 4 <= bits <= 8:
        raise ValueError(f"activation bits must be in [4, 8], got {bits}")
    if clip_logit is not None and clip_logit.numel() != 1:
        raise ValueError(f"clip_logit must have one element, got shape {tuple(clip_logit.shape)}")
    if not isinstance(x, Tensor) or x.dim() < 1:
        raise ValueError("x must be a tensor of shape (..., K)")
    ratio = None if clip_logit is None else torch.sigmoid(clip_logit)
    y = fake_quant(x.reshape(-1, x.shape[-1]), bits, None, ratio, None, True)
    return y.reshape(x.shape)


# ------------------------------------------------------------------------------ references


def fake_quant_ref(
    x: Tensor,
    bits: int,
    group_size: int | None = None,
    fmax: Tensor | None = None,
    fmin: Tensor | None = None,
    symmetric: bool = False,
) -> Tensor:
    """Plain PyTorch :func:`fake_quant`, differentiable by autograd (round straight-through).

    Computes in fp32, or in fp64 for fp64 input (gradcheck)."""
    x32 = x if x.dtype == torch.float64 else x.float()
    _, _, _, s, z, _, gid = weight_params(x32, group_size, bits, symmetric, fmax, fmin)
    qlo, qhi = qrange(bits, symmetric)
    s_e, z_e = s[:, gid], z[:, gid]
    q = (round_ste(x32 * reciprocal(s)[:, gid]) + z_e).clamp(qlo, qhi)
    return ((q - z_e) * s_e).to(x.dtype)


def fake_quant_weight_ref(w, bits, group_size=None, clip_max_logit=None, clip_min_logit=None,
                          symmetric=False):  # fmt: skip
    """Plain PyTorch :func:`fake_quant_weight`."""
    fmax, fmin = clip_factors(clip_max_logit, clip_min_logit)
    return fake_quant_ref(w, bits, group_size, fmax, fmin, symmetric)


def fake_quant_act_ref(x: Tensor, bits: int, clip_logit: Tensor | None = None) -> Tensor:
    """Plain PyTorch :func:`fake_quant_act`."""
    ratio = None if clip_logit is None else torch.sigmoid(clip_logit)
    y = fake_quant_ref(x.reshape(-1, x.shape[-1]), bits, None, ratio, None, True)
    return y.reshape(x.shape)
