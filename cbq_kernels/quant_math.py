"""The quantizer arithmetic, written once (METHOD.md sections 1 and 6).

Every other module calls these functions: the fake-quantization, LoRA-Rounding and
activation kernels' PyTorch references and their CPU paths, the GEMMs' references, the PTQ
driver's layers (training, hardening, GPTQ, saving) and the kernel-proportion report. The
Triton kernels repeat the same formulas in ``tl`` and are tested bit for bit against these.

Weights (asymmetric, integer zero point; or symmetric, signed codes stored with an offset of
``2^(b-1)``), per *segment* = a row or a group of ``group_size`` columns of a row (the last
group may be shorter), with clipping factors ``fmax``, ``fmin`` in (0, 1]::

    s = max((fmax*vmax - fmin*vmin) / (2^b - 1), floor),    z = round(-fmin*vmin / s)
    q = clamp(round(w * (1/s)) + z, 0, 2^b - 1),              w_hat = s * (q - z)

    symmetric: s = max(fmax * max(|vmax|, |vmin|) / (2^(b-1) - 1), floor),  z = 2^(b-1)

``floor = max(2^-20 * max(|vmax|, |vmin|), 1e-8)`` keeps ``|w / s| <= 2^20`` (where the
kernels' rounding trick is exact) and quantizes a constant segment to itself.

Activations (per token, symmetric, dynamic), with ``r_t = max_k |x_tk|``::

    s_t = max(ratio * r_t / (2^(b-1) - 1), floor(r_t))
    q = clamp(round(x * (1/s_t)), -2^(b-1), 2^(b-1) - 1)

and for CrossQuant, with the channel factor ``f_k = c_k^(1-alpha)`` folded into the weights,
``s_t`` from ``r_t^alpha`` and ``q = clamp(round((x * (1/f_k)) * (1/s_t)), ...)``.

Divisions: ``x * (1/s)`` with ``1/s`` correctly rounded once per segment (a tensor divided by
a tensor: on CUDA, PyTorch divides by a Python scalar through an inexact reciprocal), as the
kernels do with ``div_rn``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "EPS",
    "EPS_REL",
    "act_step",
    "clip_factors",
    "dequantize_weight",
    "fake_quant_act",
    "qrange",
    "quantize_act",
    "quantize_weight",
    "quantize_weight_two_level",
    "reciprocal",
    "round_codes",
    "round_ste",
    "segment_index",
    "segment_reduce",
    "step_floor",
    "weight_params",
]

EPS = 1e-8
EPS_REL = 2.0**-20


def qrange(bits: int, symmetric: bool) -> tuple[float, float]:
    """(lowest, highest) integer code: signed for symmetric, 0..2^b-1 for asymmetric."""
    if symmetric:
        return float(-(1 << (bits - 1))), float((1 << (bits - 1)) - 1)
    return 0.0, float((1 << bits) - 1)


def segment_index(k: int, group_size: int | None, device: torch.device | str = "cpu",
                  ) -> tuple[Tensor, int]:  # fmt: skip
    """(segment of every column (K,), segments per row)."""
    gs = k if group_size is None else group_size
    return torch.arange(k, device=device) // max(gs, 1), (-(-k // gs) if k else 0)


def segment_reduce(x: Tensor, group_size: int | None, op: str) -> Tensor:
    """(N, K) -> (N, G): ``op`` ('amax', 'amin' or 'sum') over each segment (the last one may
    be shorter). Reshapes instead of scatters: a scatter into one element per row serialised
    on atomics and took 83% of the GPU time of a Llama-2-7B calibration step (H100 profile)."""
    n, k = x.shape
    if k == 0:
        return x.new_empty((n, 0))
    gs = k if group_size is None else max(min(group_size, k), 1)
    full = k // gs
    parts = []
    if full:
        parts.append(getattr(x[:, : full * gs].reshape(n, full, gs), op)(-1))
    if k % gs:
        parts.append(getattr(x[:, full * gs :], op)(-1, keepdim=True))
    return torch.cat(parts, 1) if len(parts) > 1 else parts[0]


def reciprocal(s: Tensor) -> Tensor:
    """1 / s correctly rounded (a tensor divided by a tensor, as the kernels' ``div_rn``)."""
    return torch.ones_like(s) / s


def round_ste(t: Tensor) -> Tensor:
    """round(t) in value, identity in gradient (exact: t + (round(t) - t) == round(t))."""
    return t + (torch.round(t) - t).detach()


def step_floor(vabs: Tensor) -> Tensor:
    """The smallest step allowed for a segment whose largest magnitude is ``vabs``."""
    return (vabs * EPS_REL).clamp_min(EPS)


def clip_factors(clip_max_logit: Tensor | None, clip_min_logit: Tensor | None,
                 ) -> tuple[Tensor | None, Tensor | None]:  # fmt: skip
    """Learnable clipping factors ``sigmoid(logit)`` (None stays None: no clipping)."""
    fmax = None if clip_max_logit is None else torch.sigmoid(clip_max_logit)
    fmin = None if clip_min_logit is None else torch.sigmoid(clip_min_logit)
    return fmax, fmin


def _per_segment(f: Tensor | None, n: int, groups: int, dtype: torch.dtype) -> Tensor | float:
    if f is None:
        return 1.0
    f = f.to(dtype)
    return f.reshape(1, 1).expand(n, groups) if f.numel() == 1 else f.reshape(n, groups)


def weight_params(x: Tensor, group_size: int | None, bits: int, symmetric: bool = False,
                  fmax: Tensor | None = None, fmin: Tensor | None = None):  # fmt: skip
    """Per-segment (vmax, vmin, s_free, s, z, zt), each (N, G), and the column -> segment
    index, in x's float dtype (fp32, or fp64 for gradcheck). ``s_free``: the step is above
    its floor (only then does it depend on the factors); ``zt``: the unrounded zero point;
    ``z`` rounds straight-through (differentiable in the factors). Symmetric: z = zt = 0
    (the signed codes' offset 2^(b-1) is added by :func:`quantize_weight`)."""
    n, k = x.shape
    gid, groups = segment_index(k, group_size, x.device)
    xs = x.detach()  # the statistics are constants for the gradients
    vmax, vmin = segment_reduce(xs, group_size, "amax"), segment_reduce(xs, group_size, "amin")
    fa, fb = _per_segment(fmax, n, groups, x.dtype), _per_segment(fmin, n, groups, x.dtype)
    qhi = torch.full_like(vmax, qrange(bits, symmetric)[1])
    vabs = torch.maximum(vmax.abs(), vmin.abs())
    floor = step_floor(vabs)
    if symmetric:
        raw = fa * vabs / qhi
        s = torch.where(raw > floor, raw, floor)
        zt = torch.zeros_like(s)
        z = zt
    else:
        lo = fb * vmin
        raw = (fa * vmax - lo) / qhi
        s = torch.where(raw > floor, raw, floor)
        zt = -lo / s
        z = round_ste(zt)
    return vmax, vmin, raw > floor, s, z, zt, gid


def round_codes(u: Tensor, z: Tensor | float, qlo: Tensor | float,
                qhi: Tensor | float) -> Tensor:  # fmt: skip
    """Integer codes ``clamp(round(u) + z, qlo, qhi)`` of ``u = w * (1/s)`` (fp32 integers);
    the bounds scalars or tensors broadcast against u (per-group ranges)."""
    return (torch.round(u) + z).clamp(qlo, qhi)


def quantize_weight(w: Tensor, bits: int, group_size: int | None = None,
                    symmetric: bool = False, fmax: Tensor | None = None,
                    fmin: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """Round-to-nearest codes of the storage format: (codes (N, K) uint8 in 0..2^b-1,
    scales (N, G) fp32, zero points (N, G) fp32) with ``w_hat = s * (codes - z)``; for
    symmetric weights the codes carry the offset z = 2^(b-1)."""
    with torch.no_grad():
        w32 = w.detach().float()
        _, _, _, s, z, _, gid = weight_params(w32, group_size, bits, symmetric,
                                              None if fmax is None else fmax.detach(),
                                              None if fmin is None else fmin.detach())  # fmt: skip
        qlo, qhi = qrange(bits, symmetric)
        q = round_codes(w32 * reciprocal(s)[:, gid], z[:, gid], qlo, qhi)
        if symmetric:
            offset = float(1 << (bits - 1))
            q, z = q + offset, torch.full_like(s, offset)
        return q.to(torch.uint8), s.float(), z.float()


def dequantize_weight(codes: Tensor, scales: Tensor, zeros: Tensor, group_size: int | None,
                      dtype: torch.dtype = torch.float32) -> Tensor:  # fmt: skip
    """(N, K) ``(q - z) * s`` per segment, computed in ``dtype`` (fp32; fp64 for exact
    references)."""
    gid, _ = segment_index(codes.shape[1], group_size, codes.device)
    return (codes.to(dtype) - zeros.to(dtype)[:, gid]) * scales.to(dtype)[:, gid]


def quantize_weight_two_level(w: Tensor, group_size: int = 64, protect: int = 119
                              ) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """The two-level format for grouped W4A8 (the weight gemm_gluon's TWO_LEVEL kernel reads;
    DECISIONS, "Grouped W4A8: a two-level format"): symmetric int8 per output channel first,
    ``w8 = round(w / s1)`` with ``s1 = max|w| / protect``, then asymmetric 4-bit codes of w8
    per group of ``group_size`` with an integer step ``s2`` in 1..16 and zero point ``z`` in
    0..15 (the range of each group includes 0, as the plain quantizer's does)::

        w_hat = s1 * s2 * (q - z),   |s2 (q - z)| <= protect + s2 / 2 <= 127

    so the int8 GEMM multiplies whole K rows by the int8 values s2 (q - z) and scales once per
    channel by s1 (protect 119: the rounded value stays in int8; QServe's "protective range",
    read, not copied). The canonical storage of the result is the grouped format with scales
    ``s1 * s2`` and zero points z. Returns (codes (N, K) uint8, s1 (N,) fp32, s2 (N, G) int32,
    z (N, G) int32); K must be a multiple of ``group_size``."""
    w8, s1, s2, z = two_level_grid(w, group_size, protect)
    with torch.no_grad():
        n, k = w8.shape
        g = w8.view(n, k // group_size, group_size)
        q = torch.clamp(torch.round(g / s2[..., None]) + z[..., None], 0, 15)
        return (q.view(n, k).to(torch.uint8), s1, s2.to(torch.int32), z.to(torch.int32))


def two_level_grid(w: Tensor, group_size: int, protect: int = 119, clip: Tensor | None = None
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """The two-level format's grid for ``w`` (N, K) (:func:`quantize_weight_two_level`'s
    arithmetic, which also GPTQ's two-level form quantizes on: cbq_ptq.gptq.gptq_two_level):
    (w8 (N, K) the int8 values round(w / s1) as fp32, s1 (N,) fp32, s2 (N, G) fp32 integer
    steps 1..16, z (N, G) fp32 integer zero points 0..15). ``clip`` (N, G): factors in (0, 1]
    that shrink each group's int8 range before its step is chosen (a clipping search's
    result, cbq_ptq.gptq.search_clip_two_level; None: 1)."""
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if w.dim() != 2 or w.shape[1] % group_size:
        raise ValueError(f"the two-level format needs (N, K) weights with K a multiple of "
                         f"group_size={group_size}, got {tuple(w.shape)}")  # fmt: skip
    if not 1 <= protect <= 119:
        raise ValueError(f"protect must be in 1..119 (|s2 (q - z)| <= 127), got {protect}")
    with torch.no_grad():
        w32 = w.detach().float()
        n, k = w32.shape
        s1 = (w32.abs().amax(1) / protect).clamp_min(1e-12)
        w8 = torch.round(w32 * reciprocal(s1)[:, None]).clamp(-protect, protect)
        g = w8.view(n, k // group_size, group_size)
        lo = g.amin(-1).clamp(max=0.0)
        hi = g.amax(-1).clamp(min=0.0)
        if clip is not None:
            lo, hi = lo * clip, hi * clip
        s2 = torch.ceil((hi - lo) / 15).clamp(1, 16)  # 15 steps of s2 cover the range
        z = torch.round(-lo / s2).clamp(0, 15)
        return w8, s1, s2, z


def two_level_code_bounds(s2: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
    """Per (row, group) code range (lo, hi) (fp32) on a two-level grid that keeps the int8
    value s2 (q - z) inside [-127, 127] (what the served GEMM multiplies) as well as q in
    0..15: round-to-nearest codes stay inside it by construction; codes that error feedback
    moves (GPTQ) are clamped to it."""
    reach = torch.floor(127.0 / s2)
    return (z - reach).clamp(min=0.0), (z + reach).clamp(max=15.0)


def act_step(r: Tensor, bits: int, ratio: Tensor | float = 1.0) -> Tensor:
    """Per-token step from the token maxima ``r`` (any shape, fp32): ``max(ratio * r / P,
    floor(r))``, P = 2^(b-1) - 1. ``ratio`` a float or a tensor (learnable clipping)."""
    p = torch.full_like(r, float((1 << (bits - 1)) - 1))
    raw = ratio * r / p
    floor = step_floor(r)
    return torch.where(raw > floor, raw, floor)


def quantize_act(x: Tensor, bits: int, ratio: Tensor | float = 1.0,
                 channel_factor: Tensor | None = None, alpha: float = 1.0,
                 ste: bool = False) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Per-token (or CrossQuant) activation quantization of x (..., K) flattened to (T, K):
    (signed codes (T, K) as fp32 integers, step s_t (T, 1)), with
    ``x ~= codes * s_t * f_k`` (f = ``channel_factor``, CrossQuant's c^(1-alpha), else 1)::

        r_t = max_k |x_tk|,  s_t = act_step(r_t^alpha, bits, ratio),
        codes = clamp(round((x * (1/f)) * (1/s_t)), -2^(b-1), 2^(b-1) - 1)

    (the arithmetic of the act_quant kernel). ``ste``: round straight-through, so that the
    dequantized ``codes * s_t * f`` is differentiable in x and in ``ratio`` (LSQ)."""
    xf = x.reshape(-1, x.shape[-1]).float()
    qlo, qhi = qrange(bits, True)
    r = xf.detach().abs().amax(-1, keepdim=True)  # statistics are constants for the gradients
    if alpha != 1.0:
        r = torch.where(r > 0, r.pow(alpha), 0.0)
    s = act_step(r, bits, ratio)
    y = xf if channel_factor is None else xf * reciprocal(channel_factor.float())[None, :]
    u = y * reciprocal(s)
    q = round_ste(u) if ste else torch.round(u)
    return q.clamp(qlo, qhi), s


def fake_quant_act(x: Tensor, bits: int, ratio: Tensor | float = 1.0,
                   channel_factor: Tensor | None = None, alpha: float = 1.0) -> Tensor:
    """``codes * s_t * f`` of :func:`quantize_act` in x's shape and dtype, straight-through
    (round as identity, zero gradient where clamped, LSQ gradient for ``ratio``)."""
    q, s = quantize_act(x, bits, ratio, channel_factor, alpha, ste=True)
    y = q * s
    if channel_factor is not None:
        y = y * channel_factor.float()[None, :]
    return y.reshape(x.shape).to(x.dtype)
