"""LoRA-Rounding (METHOD.md section 4): learned low-rank rounding, fused forward and backward.

For a weight W (N, K) with per-segment step s and integer zero point z (a segment is a row, or a
group of ``group_size`` columns of a row), and rounding logits V = V0 + A B (A: (N, r),
B: (r, K); V0 an optional frozen (N, K) start, as the frozen weight of a LoRA adapter)::

    h(V) = clamp(sigmoid(V) * (zeta - gamma) + gamma, 0, 1),   zeta = 1.1, gamma = -0.1
    q = clamp(floor(W / s) + h(V) + z, 0, 2^b - 1),              W_hat = s * (q - z)
    R = sum over all weights of (1 - |2 h(V) - 1|^beta)          (the rounding regulariser)

Design:

* ``s`` and ``z`` are inputs. They depend only on the (constant) min/max statistics of W and
  the clipping logits, so :func:`lora_round_params` computes them in PyTorch on (N, G)
  tensors, differentiably (``z`` rounds straight-through); the kernels return dL/ds and dL/dz
  per segment and autograd chains the clipping.
* The forward kernel works on (BLOCK_N, BLOCK_K) tiles: the tile of A B is computed in
  registers (``tl.dot`` over the rank, padded to 16), never stored, plus the V0 tile when
  given; it writes W_hat and one partial sum of R per tile. Memory beyond the output and V0:
  O(tiles).
* The backward pass recomputes V per tile in two kernels, with deterministic accumulation:
  row blocks loop over K (dA, and dL/ds, dL/dz per segment), column blocks loop over N (dB).
  dL/dV = dy * s * h'(V) where q was not clamped, plus the regulariser's
  ``dR * d(1 - |2h-1|^beta)/dV``. Gradients of ``floor`` follow the straight-through rule:
  ``dW_hat/ds = floor(W/s) + h - W/s`` unclamped, ``q_c - z`` clamped; ``dW_hat/dz = -s``
  clamped, 0 otherwise. W receives no gradient (it is frozen during reconstruction).
* :func:`harden` gives the final integer codes with ``h = 1[V >= 0]``, in PyTorch, a few
  rows at a time (it runs once per layer).

Arithmetic is fp32 inside. Unlike fake-quantization, W_hat is continuous in V and the kernels
use ``tl.dot`` and Triton's sigmoid, so results match the reference to rounding error, not bit
for bit; the hardened codes are exact.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from cbq_kernels._validate import FLOAT_DTYPES, use_triton
from cbq_kernels.formats import groups_per_row
from cbq_kernels.quant_math import (
    clip_factors,
    reciprocal,
    segment_index,
    segment_reduce,
    weight_params,
)

__all__ = [
    "harden",
    "harden_ref",
    "lora_round",
    "lora_round_init",
    "lora_round_params",
    "lora_round_ref",
    "start_logits",
]

ZETA, GAMMA = 1.1, -0.1


# ------------------------------------------------------------------------------ kernels


@triton.jit
def _tile(w_ptr, a_ptr, b_ptr, s_ptr, z_ptr, v0_ptr, rows, k0, N, K, R, G, GS,
          R_PAD: tl.constexpr, BLOCK_K: tl.constexpr, HAS_V0: tl.constexpr,
          HARD_FWD: tl.constexpr):  # fmt: skip
    """Loads the tile (rows, k0 : k0 + BLOCK_K) and computes V = V0 + A B, h and the shared
    quantities. BLOCK_K divides the segment length, so each tile row lies in one segment: s
    and z are loaded once per row."""
    cols = k0 + tl.arange(0, BLOCK_K)
    mr, mc = rows < N, cols < K
    m = mr[:, None] & mc[None, :]
    rr = tl.arange(0, R_PAD)
    a = tl.load(a_ptr + rows[:, None] * R + rr[None, :], mask=mr[:, None] & (rr[None, :] < R),
                other=0.0).to(tl.float32)  # fmt: skip
    b = tl.load(b_ptr + rr[:, None] * K + cols[None, :], mask=(rr[:, None] < R) & mc[None, :],
                other=0.0).to(tl.float32)  # fmt: skip
    v = tl.dot(a, b, input_precision="ieee")
    if HAS_V0:
        v += tl.load(v0_ptr + rows[:, None].to(tl.int64) * K + cols[None, :], mask=m,
                     other=0.0).to(tl.float32)  # fmt: skip
    seg = rows.to(tl.int64) * G + k0 // GS
    s = tl.load(s_ptr + seg, mask=mr, other=1.0)
    z = tl.load(z_ptr + seg, mask=mr, other=0.0)
    w = tl.load(w_ptr + rows[:, None].to(tl.int64) * K + cols[None, :], mask=m,
                other=0.0).to(tl.float32)  # fmt: skip
    u = w * tl.math.div_rn(tl.full(s.shape, 1.0, tl.float32), s)[:, None]  # W * (1/s)
    fl = tl.floor(u)
    sig = tl.sigmoid(v)
    h_raw = sig * 1.2 - 0.1  # zeta - gamma = 1.2, gamma = -0.1
    h = tl.minimum(tl.maximum(h_raw, 0.0), 1.0)
    if HARD_FWD:  # straight-through: the forward value is hard, the gradient h's
        hf = tl.where(v >= 0, 1.0, 0.0)
    else:
        hf = h
    return m, cols, a, b, s, z, u, fl, sig, h_raw, h, hf


@triton.jit
def _reg_terms(h, beta):
    """1 - |2h - 1|^beta and its derivative with respect to h."""
    t = tl.abs(2.0 * h - 1.0)
    lg = tl.log2(tl.maximum(t, 1e-30))  # both where-branches are evaluated: avoid log2(0)
    p = tl.where(t > 0, tl.exp2(beta * lg), 0.0)
    pm1 = tl.where(t > 0, tl.exp2((beta - 1.0) * lg), 0.0)
    sign = tl.where(2.0 * h - 1.0 >= 0, 1.0, -1.0)
    return 1.0 - p, -beta * pm1 * sign * 2.0


@triton.jit
def _grad_v(dy_ptr, rows, cols, m, K, s, z, fl, sig, h_raw, h, hf, QMAX, beta, d_reg):
    """dL/dV of a tile (d_reg: the incoming gradient of the regulariser, a scalar)."""
    dy = tl.load(dy_ptr + rows[:, None].to(tl.int64) * K + cols[None, :], mask=m,
                 other=0.0).to(tl.float32)  # fmt: skip
    t = fl + hf + z[:, None]
    inside = (t >= 0.0) & (t <= QMAX)
    dh_dv = tl.where((h_raw > 0.0) & (h_raw < 1.0), sig * (1.0 - sig) * 1.2, 0.0)
    _, dreg_dh = _reg_terms(h, beta)
    g_v = (tl.where(inside, dy * s[:, None], 0.0) + d_reg * dreg_dh) * dh_dv
    return tl.where(m, g_v, 0.0), dy, t, inside


@triton.jit
def _lora_round_fwd_kernel(w_ptr, a_ptr, b_ptr, s_ptr, z_ptr, v0_ptr, y_ptr, reg_ptr, N, K, R,
                           G, GS, QMAX, beta, R_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_K: tl.constexpr, HAS_V0: tl.constexpr,
                           HARD_FWD: tl.constexpr):  # fmt: skip
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m, cols, _a, _b, s, z, _u, fl, _sig, _h_raw, h, hf = _tile(
        w_ptr, a_ptr, b_ptr, s_ptr, z_ptr, v0_ptr, rows, pid_k * BLOCK_K, N, K, R, G, GS, R_PAD,
        BLOCK_K, HAS_V0, HARD_FWD,
    )
    q = tl.minimum(tl.maximum(fl + hf + z[:, None], 0.0), QMAX)
    y = s[:, None] * (q - z[:, None])
    tl.store(y_ptr + rows[:, None].to(tl.int64) * K + cols[None, :],
             y.to(y_ptr.dtype.element_ty), mask=m)  # fmt: skip
    reg, _dreg = _reg_terms(h, beta)
    tl.store(reg_ptr + pid_n * tl.num_programs(1) + pid_k, tl.sum(tl.where(m, reg, 0.0)))


@triton.jit
def _lora_round_bwd_rows_kernel(w_ptr, a_ptr, b_ptr, s_ptr, z_ptr, v0_ptr, dy_ptr, da_ptr,
                                ds_ptr, dz_ptr, N, K, R, G, GS, QMAX, beta, dreg_ptr,
                                TILES_PER_SPLIT, R_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                                BLOCK_K: tl.constexpr, HAS_V0: tl.constexpr,
                                HARD_FWD: tl.constexpr):  # fmt: skip
    """Row block x chunk of K (grid: row blocks, splits): partial dA (split, N, r) and partial
    dL/ds, dL/dz (split, N, G), summed by the caller; every partial has one writer."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(1)
    mr = rows < N
    d_reg = tl.load(dreg_ptr)
    k_begin = split * TILES_PER_SPLIT * BLOCK_K
    k_end = tl.minimum(K, k_begin + TILES_PER_SPLIT * BLOCK_K)
    da = tl.zeros((BLOCK_N, R_PAD), tl.float32)
    acc_s = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    acc_z = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    part = split.to(tl.int64) * N * G
    for k0 in range(k_begin, k_end, BLOCK_K):
        m, cols, _a, b, s, z, u, fl, sig, h_raw, h, hf = _tile(
            w_ptr, a_ptr, b_ptr, s_ptr, z_ptr, v0_ptr, rows, k0, N, K, R, G, GS, R_PAD, BLOCK_K,
            HAS_V0, HARD_FWD,
        )
        g_v, dy, t, inside = _grad_v(dy_ptr, rows, cols, m, K, s, z, fl, sig, h_raw, h, hf,
                                     QMAX, beta, d_reg)  # fmt: skip
        da += tl.dot(g_v, tl.trans(b), input_precision="ieee")
        q = tl.minimum(tl.maximum(t, 0.0), QMAX)
        acc_s += tl.where(m, dy * tl.where(inside, fl + hf - u, q - z[:, None]), 0.0)
        acc_z += tl.where(m & ~inside, -dy * s[:, None], 0.0)
        nxt = k0 + BLOCK_K
        if (nxt % GS == 0) | (nxt >= k_end):  # the segment ends here (or the chunk does)
            seg = part + rows.to(tl.int64) * G + k0 // GS
            tl.store(ds_ptr + seg, tl.sum(acc_s, axis=1), mask=mr)
            tl.store(dz_ptr + seg, tl.sum(acc_z, axis=1), mask=mr)
            acc_s = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
            acc_z = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    rr = tl.arange(0, R_PAD)
    tl.store(da_ptr + split.to(tl.int64) * N * R + rows[:, None] * R + rr[None, :], da,
             mask=mr[:, None] & (rr[None, :] < R))  # fmt: skip


@triton.jit
def _lora_round_bwd_cols_kernel(w_ptr, a_ptr, b_ptr, s_ptr, z_ptr, v0_ptr, dy_ptr, db_ptr, N, K,
                                R, G, GS, QMAX, beta, dreg_ptr, TILES_PER_SPLIT,
                                R_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                                HAS_V0: tl.constexpr, HARD_FWD: tl.constexpr):  # fmt: skip
    """Column block x chunk of N (grid: column blocks, splits): partial dB (split, r, K)."""
    k0 = tl.program_id(0) * BLOCK_K
    split = tl.program_id(1)
    d_reg = tl.load(dreg_ptr)
    n_begin = split * TILES_PER_SPLIT * BLOCK_N
    n_end = tl.minimum(N, n_begin + TILES_PER_SPLIT * BLOCK_N)
    db = tl.zeros((R_PAD, BLOCK_K), tl.float32)
    for n0 in range(n_begin, n_end, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        m, cols, a, _b, s, z, _u, fl, sig, h_raw, h, hf = _tile(
            w_ptr, a_ptr, b_ptr, s_ptr, z_ptr, v0_ptr, rows, k0, N, K, R, G, GS, R_PAD, BLOCK_K,
            HAS_V0, HARD_FWD,
        )
        g_v, _dy, _t, _inside = _grad_v(dy_ptr, rows, cols, m, K, s, z, fl, sig, h_raw, h, hf,
                                        QMAX, beta, d_reg)  # fmt: skip
        db += tl.dot(tl.trans(a), g_v, input_precision="ieee")
    rr = tl.arange(0, R_PAD)
    cols = k0 + tl.arange(0, BLOCK_K)
    tl.store(db_ptr + split.to(tl.int64) * R * K + rr[:, None] * K + cols[None, :], db,
             mask=(rr[:, None] < R) & (cols[None, :] < K))  # fmt: skip


# ------------------------------------------------------------------------------ launch


def _blocks(k: int, group_size: int | None) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_K); BLOCK_K divides the group size so a tile row has one segment."""
    block_k = 64
    if group_size is not None:
        block_k = min(64, group_size & -group_size)  # largest power of 2 dividing it
    return 32, block_k


def _splits(blocks: int, tiles: int, device: torch.device) -> tuple[int, int]:
    """(splits, tiles per split) so that blocks x splits programs fill the GPU about 4 times
    over: the backward kernels loop over the other dimension, and one program per row (or
    column) block leaves most SMs idle (128 programs for N = 4096). The partial sums take
    splits x (N or K) x r floats, at most ~4 x SMs x BLOCK x r: O((N + K) r) still."""
    if device.type == "cuda":
        target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 4
    splits = max(1, min(tiles, -(-target // max(blocks, 1))))
    per = -(-tiles // splits)
    return -(-tiles // per), per


def _check(w, a, b, scales, zeros, bits, group_size, beta, v0=None) -> None:
    tensors = {"w": w, "a": a, "b": b, "scales": scales, "zeros": zeros}
    if v0 is not None:
        tensors["v0"] = v0
    for name, t in tensors.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be a float tensor, got dtype {t.dtype}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
        if t.device != w.device:
            raise ValueError(f"{name} is on {t.device} but w is on {w.device}")
    if w.device.type not in ("cpu", "cuda", "meta"):
        raise ValueError(f"only cpu and cuda tensors are supported, got {w.device}")
    if not w.is_contiguous():
        raise ValueError(f"w must be contiguous, got strides {w.stride()}")
    n, k = w.shape
    r = a.shape[1]
    if v0 is not None and (v0.shape != w.shape or not v0.is_contiguous()):
        raise ValueError(f"v0 must be a contiguous tensor of w's shape {tuple(w.shape)}, got "
                         f"shape {tuple(v0.shape)}, strides {v0.stride()}")  # fmt: skip
    if a.shape[0] != n or tuple(b.shape) != (r, k):
        raise ValueError(
            f"a must be (N, r) and b (r, K) for w of shape {(n, k)}: got a {tuple(a.shape)}, "
            f"b {tuple(b.shape)}"
        )
    if not 1 <= r <= 64:
        raise ValueError(f"rank r = {r} must be in [1, 64]")
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an int in [2, 8], got {bits!r}")
    if group_size is not None:
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 16:
            raise ValueError(f"group_size must be None or an int >= 16, got {group_size!r}")
        if group_size % 16:
            raise ValueError(f"group_size must be a multiple of 16, got {group_size}")
    groups = groups_per_row(k, group_size)
    for name, t in (("scales", scales), ("zeros", zeros)):
        if tuple(t.shape) != (n, groups):
            raise ValueError(
                f"{name} must have shape (N, groups) = {(n, groups)}, got {tuple(t.shape)}"
            )
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")


class _Launch:
    def __init__(self, w: Tensor, r: int, group_size: int | None, bits: int) -> None:
        self.n, self.k = w.shape
        self.r = r
        self.gs = self.k if group_size is None else group_size
        self.g = groups_per_row(self.k, group_size)
        self.qmax = float((1 << bits) - 1)
        self.r_pad = max(16, triton.next_power_of_2(r))
        self.block_n, self.block_k = _blocks(self.k, group_size)
        self.tiles = (triton.cdiv(self.n, self.block_n), triton.cdiv(self.k, self.block_k))

    def consts(self) -> dict[str, int]:
        return {"R_PAD": self.r_pad, "BLOCK_N": self.block_n, "BLOCK_K": self.block_k}


def _prep(a: Tensor, b: Tensor, scales: Tensor, zeros: Tensor):
    return (a.float().contiguous(), b.float().contiguous(), scales.float().contiguous(),
            zeros.float().contiguous())  # fmt: skip


# ------------------------------------------------------------------------------ ops


def _lora_round_impl(
    w: Tensor, a: Tensor, b: Tensor, scales: Tensor, zeros: Tensor, bits: int,
    group_size: int | None, beta: float, v0: Tensor | None = None, ste: bool = False,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    _check(w, a, b, scales, zeros, bits, group_size, beta, v0)
    if not use_triton(_lora_round_fwd_kernel, w.device):
        with torch.no_grad():
            y, reg = lora_round_ref(w, a, b, scales, zeros, bits, group_size, beta, v0, ste)
        return y, reg.float()
    a, b, scales, zeros = _prep(a, b, scales, zeros)
    p = _Launch(w, a.shape[1], group_size, bits)
    y = torch.empty_like(w)
    partial = torch.zeros(p.tiles[0] * p.tiles[1], dtype=torch.float32, device=w.device)
    if w.numel():
        _lora_round_fwd_kernel[p.tiles](w, a, b, scales, zeros, _v0_arg(v0, w), y, partial,
                                        p.n, p.k, p.r, p.g, p.gs, p.qmax, float(beta),
                                        HAS_V0=v0 is not None, HARD_FWD=bool(ste),
                                        **p.consts())  # fmt: skip
    return y, partial.sum()


_lora_round_op = torch.library.custom_op("cbq::lora_round", mutates_args=())(_lora_round_impl)


@_lora_round_op.register_fake
def _(w, a, b, scales, zeros, bits, group_size, beta, v0=None, ste=False):
    _check(w, a, b, scales, zeros, bits, group_size, beta, v0)
    return torch.empty_like(w), w.new_empty((), dtype=torch.float32)


def _v0_arg(v0: Tensor | None, w: Tensor) -> Tensor:
    """The V0 pointer (never read without V0: any tensor will do)."""
    return w if v0 is None else v0


def _lora_round_backward_impl(
    dy: Tensor, d_reg: Tensor, w: Tensor, a: Tensor, b: Tensor, scales: Tensor, zeros: Tensor,
    bits: int, group_size: int | None, beta: float, v0: Tensor | None = None, ste: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """(dA (N, r), dB (r, K), dL/ds (N, G), dL/dz (N, G)), all fp32."""
    _check(w, a, b, scales, zeros, bits, group_size, beta, v0)
    if dy.shape != w.shape or d_reg.numel() != 1:
        raise ValueError(f"dy must be {tuple(w.shape)} and d_reg one element: got "
                         f"{tuple(dy.shape)}, {tuple(d_reg.shape)}")  # fmt: skip
    if not use_triton(_lora_round_fwd_kernel, w.device):
        return _backward_torch(dy, d_reg, w, a, b, scales, zeros, bits, group_size, beta, v0,
                               ste)  # fmt: skip
    a, b, scales, zeros = _prep(a, b, scales, zeros)
    dy = dy.contiguous()
    p = _Launch(w, a.shape[1], group_size, bits)
    if not w.numel():
        return torch.zeros_like(a), torch.zeros_like(b), torch.zeros_like(scales), \
            torch.zeros_like(zeros)  # fmt: skip
    split_k, per_k = _splits(p.tiles[0], p.tiles[1], w.device)
    split_n, per_n = _splits(p.tiles[1], p.tiles[0], w.device)
    da = torch.empty((split_k, *a.shape), dtype=torch.float32, device=w.device)
    db = torch.empty((split_n, *b.shape), dtype=torch.float32, device=w.device)
    # Segments a split does not reach keep their zero.
    ds = torch.zeros((split_k, *scales.shape), dtype=torch.float32, device=w.device)
    dz = torch.zeros((split_k, *zeros.shape), dtype=torch.float32, device=w.device)
    args = (w, a, b, scales, zeros, _v0_arg(v0, w), dy)
    scalars = (p.n, p.k, p.r, p.g, p.gs, p.qmax, float(beta), d_reg.float().reshape(()))
    meta = {"HAS_V0": v0 is not None, "HARD_FWD": bool(ste), **p.consts()}
    _lora_round_bwd_rows_kernel[(p.tiles[0], split_k)](*args, da, ds, dz, *scalars, per_k,
                                                       **meta)  # fmt: skip
    _lora_round_bwd_cols_kernel[(p.tiles[1], split_n)](*args, db, *scalars, per_n, **meta)
    return da.sum(0), db.sum(0), ds.sum(0), dz.sum(0)


_lora_round_backward_op = torch.library.custom_op("cbq::lora_round_backward", mutates_args=())(
    _lora_round_backward_impl
)


@_lora_round_backward_op.register_fake
def _(dy, d_reg, w, a, b, scales, zeros, bits, group_size, beta, v0=None, ste=False):
    _check(w, a, b, scales, zeros, bits, group_size, beta, v0)
    return tuple(t.new_empty(t.shape, dtype=torch.float32) for t in (a, b, scales, zeros))


def _backward_torch(dy, d_reg, w, a, b, scales, zeros, bits, group_size, beta, v0=None,
                    ste=False):  # fmt: skip
    """The kernels' backward formulas in PyTorch (CPU without Triton's interpreter; autograd
    is not available inside a custom op's implementation)."""
    k = w.shape[1]
    gid = segment_index(k, group_size, w.device)[0]
    a, b = a.float(), b.float()
    s, z = scales.float()[:, gid], zeros.float()[:, gid]
    v = _logits(a, b, v0)
    sig = torch.sigmoid(v)
    h_raw = sig * (ZETA - GAMMA) + GAMMA
    h = h_raw.clamp(0, 1)
    hf = (v >= 0).float() if ste else h  # the forward value of h
    u = w.float() * reciprocal(scales.float())[:, gid]
    fl = torch.floor(u)
    t = fl + hf + z
    qmax = (1 << bits) - 1
    inside = (t >= 0) & (t <= qmax)
    dy = dy.float()
    dh_dv = torch.where((h_raw > 0) & (h_raw < 1), sig * (1 - sig) * (ZETA - GAMMA), 0.0)
    c = 2 * h - 1
    dreg_dh = -beta * c.abs().pow(beta - 1) * torch.where(c >= 0, 1.0, -1.0) * 2
    g_v = (torch.where(inside, dy * s, 0.0) + d_reg.float() * dreg_dh) * dh_dv
    ds = segment_reduce(dy * torch.where(inside, fl + hf - u, t.clamp(0, qmax) - z), group_size,
                         "sum")  # fmt: skip
    dz = segment_reduce(dy * torch.where(inside, 0.0, -s), group_size, "sum")
    return g_v @ b.t(), a.t() @ g_v, ds, dz


def _setup_context(ctx, inputs, output):
    w, a, b, scales, zeros, bits, group_size, beta, v0, ste = inputs
    ctx.save_for_backward(w, a, b, scales, zeros, v0)
    ctx.config = (bits, group_size, beta, ste)
    ctx.dtypes = (a.dtype, b.dtype, scales.dtype, zeros.dtype)


def _backward(ctx, dy, d_reg):
    w, a, b, scales, zeros, v0 = ctx.saved_tensors
    bits, group_size, beta, ste = ctx.config
    if dy is None:
        dy = torch.zeros_like(w)
    if d_reg is None:  # the regulariser was not used: a tensor, never a Python float (tracing)
        d_reg = torch.zeros((), dtype=torch.float32, device=w.device)
    grads = _lora_round_backward_op(dy, d_reg, w, a, b, scales, zeros, bits, group_size, beta,
                                    v0, ste)  # fmt: skip
    da, db, ds, dz = (g.to(dt) for g, dt in zip(grads, ctx.dtypes, strict=True))
    return None, da, db, ds, dz, None, None, None, None, None


_lora_round_op.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------ public API


def lora_round_params(
    w: Tensor,
    bits: int,
    group_size: int | None = None,
    clip_max_logit: Tensor | None = None,
    clip_min_logit: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-segment step ``s`` and zero point ``z`` (N, G) fp32 of the asymmetric quantizer of
    METHOD.md section 1, differentiable in the clipping logits (``z`` straight-through)."""
    fmax, fmin = clip_factors(clip_max_logit, clip_min_logit)
    _, _, _, s, z, _, _ = weight_params(w.float(), group_size, bits, False, fmax, fmin)
    return s, z


def lora_round(
    w: Tensor,
    a: Tensor,
    b: Tensor,
    scales: Tensor,
    zeros: Tensor,
    bits: int,
    group_size: int | None = None,
    beta: float = 2.0,
    v0: Tensor | None = None,
    ste: bool = False,
) -> tuple[Tensor, Tensor]:
    """LoRA-Rounded weight and rounding regulariser (module docstring).

    Args:
        w: (N, K) weight, fp32/fp16/bf16, contiguous (frozen: no gradient).
        a: (N, r) and b: (r, K) rounding factors, r <= 64.
        scales, zeros: (N, G) step and zero point, e.g. from :func:`lora_round_params`.
        bits: 2..8. group_size: None (per row) or a multiple of 16.
        beta: regulariser exponent (annealed from 20 to 2 by the caller).
        v0: optional fixed (N, K) logits added to A B (the frozen full-rank start of the
            rounding, see :func:`start_logits`), any float dtype, contiguous; no gradient.
        ste: straight-through rounding: the forward value uses the hard ``1[V >= 0]`` (the
            codes hardening fixes), the gradients are those of h(V) (the regulariser too).

    Returns:
        (W_hat (N, K) in w's dtype, R: fp32 scalar).
    """
    return _lora_round_op(w, a, b, scales, zeros, bits, group_size, float(beta), v0, bool(ste))


def lora_round_init(w: Tensor, scales: Tensor, group_size: int | None, rank: int,
                    zero: bool = False) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Initial (A, B): a rank-r truncated SVD of the logits V* for which h(V*) equals the
    fractional part of W/s (training starts near round-to-nearest), or zeros-and-small
    (h = 0.5) with ``zero=True``. fp32."""
    n, k = w.shape
    if zero:
        return torch.zeros(n, rank, device=w.device), torch.randn(rank, k, device=w.device) * 1e-3
    gid = segment_index(k, group_size, w.device)[0]
    u = w.float() * reciprocal(scales.float())[:, gid]
    frac = (u - torch.floor(u)).clamp(0.01, 0.99)
    target = torch.logit((frac - GAMMA) / (ZETA - GAMMA))
    left, sv, right = torch.linalg.svd(target, full_matrices=False)
    root = sv[:rank].sqrt()
    return left[:, :rank] * root, root[:, None] * right[:rank]


def start_logits(start_up: Tensor, margin: float, dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """V0 for a start whose codes are known: ``+margin`` where the start takes floor + 1,
    ``-margin`` where it takes floor. With V = V0 + A B and A B = 0 the hardened codes are the
    start's, and h(V0) = sigmoid(+-margin) * 1.2 - 0.1 (0.957 / 0.043 for margin 2): the soft
    weight starts within 0.043 steps of the hard one, and both neighbours stay reachable."""
    return torch.where(start_up, margin, -margin).to(dtype).contiguous()


def harden(w: Tensor, a: Tensor, b: Tensor, scales: Tensor, zeros: Tensor, bits: int,
           group_size: int | None = None, rows_per_step: int = 1024,
           v0: Tensor | None = None) -> Tensor:  # fmt: skip
    """Final integer codes (N, K) uint8: ``clamp(floor(W/s) + 1[V0 + AB >= 0] + z, 0,
    2^b - 1)``, computed ``rows_per_step`` rows at a time."""
    _check(w, a, b, scales, zeros, bits, group_size, 1.0, v0)
    out = torch.empty(w.shape, dtype=torch.uint8, device=w.device)
    for r0 in range(0, w.shape[0], rows_per_step):
        sl = slice(r0, r0 + rows_per_step)
        out[sl] = harden_ref(w[sl], a[sl], b, scales[sl], zeros[sl], bits, group_size,
                             None if v0 is None else v0[sl])  # fmt: skip
    return out


# ------------------------------------------------------------------------------ references


def _logits(a: Tensor, b: Tensor, v0: Tensor | None, dtype: torch.dtype = torch.float32):
    v = a.to(dtype) @ b.to(dtype)
    return v if v0 is None else v + v0.to(dtype)


def lora_round_ref(w, a, b, scales, zeros, bits, group_size=None, beta=2.0, v0=None, ste=False):
    """Plain PyTorch :func:`lora_round`, differentiable by autograd (floor straight-through;
    with ``ste`` the forward h is 1[V >= 0] and its gradient h(V)'s)."""
    k = w.shape[1]
    cd = torch.float64 if w.dtype == torch.float64 else torch.float32  # fp64 for gradcheck
    gid = segment_index(k, group_size, w.device)[0]
    s, z = scales.to(cd)[:, gid], zeros.to(cd)[:, gid]
    v = _logits(a, b, v0, cd)
    h = (torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)
    hf = h + ((v >= 0).to(cd) - h).detach() if ste else h
    u = w.to(cd) * reciprocal(scales.to(cd))[:, gid]
    fl = u + (torch.floor(u) - u).detach()
    q = (fl + hf + z).clamp(0, (1 << bits) - 1)
    reg = (1 - (2 * h - 1).abs().pow(beta)).sum()
    return (s * (q - z)).to(w.dtype), reg


def harden_ref(w, a, b, scales, zeros, bits, group_size=None, v0=None):
    """Plain PyTorch :func:`harden`."""
    k = w.shape[1]
    gid = segment_index(k, group_size, w.device)[0]
    z = zeros.float()[:, gid]
    up = (_logits(a, b, v0) >= 0).float()
    q = torch.floor(w.float() * reciprocal(scales.float())[:, gid]) + up + z
    q = q.clamp(0, (1 << bits) - 1)
    return q.to(torch.uint8)
