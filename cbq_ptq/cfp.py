"""Coarse-to-fine outlier preprocessing (METHOD.md section 2).

Pure functions: :func:`detect_outliers` (coarse quantile/IQR stage, then the fine split that
maximises gap - lambda2 * spread), :func:`channel_factors` (activation outliers -> per-channel
factors), :func:`fold_block` (divide the activation channels by the factors and multiply the
consuming weight columns, an identity of the full-precision block), :func:`truncate_weights`
(per-row weight outliers clipped to the fine stage's threshold).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from cbq_ptq import distributed
from cbq_ptq.models import ArchSpec


@dataclasses.dataclass(frozen=True)
class Outliers:
    """mask: which values are outliers (same shape as the input); threshold: per row, the
    largest normal value (values above it are outliers; +inf where a row has none)."""

    mask: Tensor
    threshold: Tensor


def detect_outliers(values: Tensor, quantiles: tuple[float, float] = (0.25, 0.75),
                    lam: float = 1.5, lam2: float = 1.0) -> Outliers:  # fmt: skip
    """Outliers of each row of ``values`` (R, n) (or of a 1-D tensor), non-negative statistics.

    Coarse: candidates are the values above ``Q_hi + lam * (Q_hi - Q_lo)`` (the row's
    quantiles). Fine: with the row sorted descending v_0 >= v_1 >= ..., splitting after the top
    p candidates scores ``M(p) = (v_{p-1} - v_p) / v_p - lam2 * var(v_p.. / v_p)`` (gap and
    spread normalised by the normal set's maximum v_p, our choice); the p in 1..#candidates
    with the largest M wins. Rows without candidates have no outliers."""
    one_d = values.dim() == 1
    v = values.reshape(1, -1) if one_d else values
    if v.dim() != 2 or v.shape[1] < 2:
        raise ValueError(f"values must be (n,) or (rows, n) with n >= 2, got {tuple(values.shape)}")
    v = v.double()
    q = torch.quantile(v, torch.tensor(quantiles, dtype=v.dtype, device=v.device), dim=1)
    bound = q[1] + lam * (q[1] - q[0])  # (R,)
    n_cand = (v > bound[:, None]).sum(1)  # (R,)
    s, _ = torch.sort(v, dim=1, descending=True)
    n = s.shape[1]
    # Normal set for split p (p = 1..n-1): s[:, p:]; suffix sums give its mean and variance.
    suf1 = torch.flip(torch.cumsum(torch.flip(s, [1]), 1), [1])  # sum of s[:, p:]
    suf2 = torch.flip(torch.cumsum(torch.flip(s * s, [1]), 1), [1])
    p = torch.arange(1, n, device=v.device)
    cnt = (n - p).to(v.dtype)
    top_normal = s[:, 1:].clamp_min(torch.finfo(v.dtype).tiny)  # v_p
    mean = suf1[:, 1:] / cnt
    var = (suf2[:, 1:] / cnt - mean * mean).clamp_min(0.0)
    gap = (s[:, :-1] - s[:, 1:]) / top_normal
    score = gap - lam2 * var / (top_normal * top_normal)
    score = torch.where(p[None, :] <= n_cand[:, None], score, -torch.inf)
    best = torch.argmax(score, dim=1) + 1  # (R,) split after the top `best` values
    has = n_cand > 0
    threshold = torch.where(has, s.gather(1, best[:, None])[:, 0], torch.inf)
    mask = (v > threshold[:, None]) & has[:, None]
    if one_d:
        return Outliers(mask[0], threshold.to(values.dtype)[0])
    return Outliers(mask, threshold.to(values.dtype))


def channel_factors(maxima: Tensor, quantiles: tuple[float, float] = (0.25, 0.75),
                    lam: float = 1.5, lam2: float = 1.0, beta: float = 0.7) -> Tensor:  # fmt: skip
    """Per-channel activation factors f (K,) fp32: ``(m_k / m_normal)^beta`` for the outlier
    channels of the statistic ``maxima`` (max |X| per channel), 1 elsewhere."""
    out = detect_outliers(maxima.float(), quantiles, lam, lam2)
    f = torch.ones_like(maxima, dtype=torch.float32)
    if bool(out.mask.any()):
        f[out.mask] = (maxima.float()[out.mask] / out.threshold.float()) ** beta
    return f


def truncate_weights(w: Tensor, quantiles: tuple[float, float] = (0.25, 0.75),
                     lam: float = 1.5, lam2: float = 1.0) -> tuple[Tensor, int]:  # fmt: skip
    """Each row's outliers of |W| clipped (sign kept) to the row's fine-stage threshold;
    returns (new weight, number of values clipped)."""
    out = detect_outliers(w.detach().abs().float(), quantiles, lam, lam2)
    limit = out.threshold.to(w.dtype)[:, None]
    clipped = torch.where(out.mask, torch.sign(w) * limit, w)
    return clipped, int(out.mask.sum())


@torch.no_grad()
def fold_block(block: torch.nn.Module, spec: ArchSpec, factors: dict[str, Tensor],
               n_heads: int, n_kv_heads: int) -> None:  # fmt: skip
    """Apply activation factors in place, an identity of the full-precision block.

    factors: any of 'qkv' (K,), 'gate_up' (K,), 'o' (n_kv_heads * head_dim,) shared by the
    query heads of a group, 'down' (FFN,). The input of the consumers is divided by f (folded
    into the producer: a norm weight, or the output rows of v_proj / up_proj) and their weight
    columns are multiplied by f."""
    get = block.get_submodule
    if "qkv" in factors:
        f = factors["qkv"]
        _scale_norm(get(spec.attn_norm), 1 / f)
        for name in spec.qkv:
            _scale_columns(get(name), f)
    if "gate_up" in factors:
        f = factors["gate_up"]
        _scale_norm(get(spec.mlp_norm), 1 / f)
        for name in spec.gate_up:
            _scale_columns(get(name), f)
    if "o" in factors:
        f_kv = factors["o"]
        _scale_rows(get(spec.v), 1 / f_kv)
        head_dim = f_kv.numel() // n_kv_heads
        group = n_heads // n_kv_heads  # query heads per kv head
        f_q = f_kv.view(n_kv_heads, 1, head_dim).expand(n_kv_heads, group, head_dim).reshape(-1)
        _scale_columns(get(spec.o), f_q)
    if "down" in factors:
        f = factors["down"]
        _scale_rows(get(spec.up), 1 / f)
        _scale_columns(get(spec.down), f)


def o_input_to_kv(maxima: Tensor, n_heads: int, n_kv_heads: int) -> Tensor:
    """The o_proj input statistic (n_heads * head_dim,) reduced to the value channels that
    produce it (n_kv_heads * head_dim,): the max over the query heads of each group, since a
    factor on a value channel scales that channel in every query head of the group."""
    head_dim = maxima.numel() // n_heads
    group = n_heads // n_kv_heads
    return maxima.view(n_kv_heads, group, head_dim).amax(1).reshape(-1)


def _scale_norm(norm: torch.nn.Module, g: Tensor) -> None:
    weight = norm.weight  # type: ignore[union-attr]
    weight.mul_(g.to(weight.dtype))
    if getattr(norm, "bias", None) is not None:
        norm.bias.mul_(g.to(weight.dtype))  # type: ignore[union-attr,operator]


def _scale_columns(linear: torch.nn.Module, f: Tensor) -> None:
    linear.weight.mul_(f.to(linear.weight.dtype)[None, :])  # type: ignore[operator]


def _scale_rows(linear: torch.nn.Module, g: Tensor) -> None:
    linear.weight.mul_(g.to(linear.weight.dtype)[:, None])  # type: ignore[operator]
    if getattr(linear, "bias", None) is not None:
        linear.bias.mul_(g.to(linear.weight.dtype))  # type: ignore[operator]


@torch.no_grad()
def input_maxima(block: torch.nn.Module, names: tuple[str, ...], run) -> dict[str, Tensor]:
    """max |x| per input channel of each named linear of ``block`` over what ``run()`` feeds
    it (run: a callable that executes the block on the calibration inputs)."""
    stats: dict[str, Tensor] = {}
    hooks = []

    def hook(name):
        def pre(_module, args):
            m = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(0).float()
            stats[name] = torch.maximum(stats[name], m) if name in stats else m

        return pre

    for name in names:
        hooks.append(block.get_submodule(name).register_forward_pre_hook(hook(name)))
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    for name in names:  # data-parallel runs: the maximum over every rank's windows
        distributed.all_reduce_(stats[name], "max")
    return stats


def block_factors(stats: dict[str, Tensor], spec: ArchSpec, n_heads: int, n_kv_heads: int,
                  quantiles: tuple[float, float] = (0.25, 0.75), lam: float = 1.5,
                  lam2: float = 1.0, beta: float = 0.7) -> dict[str, Tensor]:  # fmt: skip
    """The activation factors of one block from its input maxima (see fold_block)."""
    args = (quantiles, lam, lam2, beta)
    return {
        "qkv": channel_factors(stats[spec.qkv[0]], *args),
        "gate_up": channel_factors(stats[spec.gate_up[0]], *args),
        "o": channel_factors(o_input_to_kv(stats[spec.o], n_heads, n_kv_heads), *args),
        "down": channel_factors(stats[spec.down], *args),
    }
