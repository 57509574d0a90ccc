"""GPTQ (Frantar et al., 2022) and the clipping search: a Hessian-aware baseline and start.

Per linear layer, with H = E[x x^T] over the layer's calibration inputs (in the model quantized
so far), GPTQ quantizes the weight one input column at a time and spreads each column's
rounding error over the columns not yet quantized, weighted by the inverse Hessian, so that
the layer's output error ``(W - W_hat) H (W - W_hat)^T`` stays small.

Our choices (docs/DECISIONS.md, "GPTQ"):

* **Static groups.** The steps and zero points of every group come from the original weight
  (with the searched clipping factors) before the column loop: the groups of the packed
  format are contiguous columns, and with act-order the columns are visited in another
  order, so the quantizer of a group cannot be formed from the error-updated columns as they
  arrive.
* **act-order** (columns by decreasing H_kk) on by default, **dampening** 1% of the mean
  diagonal (doubled until the Cholesky factorisation succeeds), blocks of 128 columns (lazy
  batch updates).
* **Clipping search** (:func:`search_clip`): per row / group, the factor of a grid in
  [0.3, 1] (applied to both the maximum and the minimum) with the smallest weight error
  ``sum_k H_kk (w_k - w_hat_k)^2``; it sets GPTQ's quantizer and is CBQ's clipping start.
* True-sequential order inside a block (q/k/v, then o, then gate/up, then down): each group
  sees the inputs produced by the groups quantized before it (:func:`init_block`).

Every code and step comes from :mod:`cbq_kernels.quant_math`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from cbq_kernels.quant_math import (
    qrange,
    reciprocal,
    round_codes,
    segment_index,
    segment_reduce,
    two_level_code_bounds,
    two_level_grid,
    weight_params,
)
from cbq_ptq import distributed

CLIP_GRID = torch.linspace(1.0, 0.3, 71).tolist()  # factors 1.00, 0.99, ..., 0.30


class InputStats:
    """Accumulates the second moments of a layer's inputs: the diagonal E[x_k^2] (K,) or the
    whole E[x x^T] (K, K) over every token seen, summed in fp64 and returned in fp32. fp64
    because the sum's order must not matter: a data-parallel run adds the ranks' partial sums
    (cbq_ptq.distributed), and with fp32 sums the last-bit differences flipped GPTQ's rounding
    (measured on stories260K, 2 processes against 1: 6.3% of the codes differed with fp32
    sums, none with fp64)."""

    def __init__(self, k: int, full: bool, device: torch.device, cross: bool = False) -> None:
        self.full = full
        self.sum = torch.zeros((k, k) if full else (k,), device=device, dtype=torch.float64)
        self.cross = torch.zeros((k, k), device=device, dtype=torch.float64) if cross else None
        self.count = 0
        self.calls = 0

    def add(self, x: Tensor, ref: Tensor | None = None) -> None:
        x2 = x.detach().reshape(-1, x.shape[-1]).double()
        if self.full:
            self.sum.addmm_(x2.t(), x2)
        else:
            self.sum += (x2 * x2).sum(0)
        if self.cross is not None:
            if ref is None or ref.shape != x2.shape:
                raise ValueError("the reference run must send the same batches as the recorded "
                                 f"one: input {tuple(x2.shape)}, reference "
                                 f"{None if ref is None else tuple(ref.shape)}")  # fmt: skip
            self.cross.addmm_(x2.t(), ref.double() - x2)
        self.count += x2.shape[0]
        self.calls += 1

    def reduce(self) -> None:
        """Sum the moments and token counts over the ranks (data-parallel runs)."""
        if distributed.world()[1] > 1:
            distributed.all_reduce_(self.sum)
            if self.cross is not None:
                distributed.all_reduce_(self.cross)
            self.count = int(distributed.reduce_sum([float(self.count)], self.sum.device)[0])

    @property
    def value(self) -> Tensor:
        return (self.sum / max(self.count, 1)).float()

    @property
    def cross_value(self) -> Tensor:
        """E[x (x_ref - x)^T] (K, K) (with reference inputs)."""
        return (self.cross / max(self.count, 1)).float()

    @property
    def diag(self) -> Tensor:
        v = self.value
        return v.diagonal() if self.full else v


@contextlib.contextmanager
def record_inputs(modules: dict[str, torch.nn.Module], full: bool, quantized: bool = False,
                  refs: dict[str, list[Tensor]] | None = None
                  ) -> Iterator[dict[str, InputStats]]:  # fmt: skip
    """Within the scope, every forward of the given QLinears adds its input to their stats:
    as it arrives, or ``quantized`` as the layer multiplies it (its activation quantizer's
    output); with ``refs`` (per layer, one reference input per call, in call order) also
    the cross moment E[x (x_ref - x)^T]."""
    stats = {}
    hooks = []
    for name, m in modules.items():
        stats[name] = InputStats(m.in_features, full, m.w_fp.device,
                                 cross=refs is not None)  # fmt: skip

        def hook(_m, args, s=stats[name], r=None if refs is None else refs[name]):
            x = _m.act_hat(args[0]) if quantized else args[0]
            s.add(x, None if r is None else r[s.calls])

        hooks.append(m.register_forward_pre_hook(hook))
    try:
        yield stats
    finally:
        for h in hooks:
            h.remove()


def _factors(p: Tensor, symmetric: bool) -> tuple[Tensor, Tensor | None]:
    return p, (None if symmetric else p)


@torch.no_grad()
def search_clip(w: Tensor, diag: Tensor, bits: int, group_size: int | None,
                symmetric: bool = False, grid: list[float] | None = None,
                rows_per_step: int = 4096) -> Tensor:  # fmt: skip
    """Per row / group clipping factor (N, G) from ``grid`` (default CLIP_GRID) that minimises
    ``sum_k diag_k (w_k - Q(w_k))^2`` over the segment, with Q round-to-nearest."""
    grid = grid or CLIP_GRID
    n, k = w.shape
    gid, groups = segment_index(k, group_size, w.device)
    d = diag.float().clamp_min(0)[None, :]
    qlo, qhi = qrange(bits, symmetric)
    best = torch.ones(n, groups, device=w.device)
    for r0 in range(0, n, rows_per_step):
        wr = w[r0 : r0 + rows_per_step].float()
        best_err = None
        for f in grid:
            p = torch.full((wr.shape[0], groups), f, device=w.device)
            _, _, _, s, z, _, _ = weight_params(wr, group_size, bits, symmetric,
                                                *_factors(p, symmetric))  # fmt: skip
            se, ze = s[:, gid], z[:, gid]
            q = round_codes(wr * reciprocal(s)[:, gid], ze, qlo, qhi)
            err = segment_reduce(d * (wr - (q - ze) * se) ** 2, group_size, "sum")
            if best_err is None:
                best_err = err
                continue
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best[r0 : r0 + rows_per_step] = torch.where(better, f, best[r0 : r0 + rows_per_step])
    return best


@torch.no_grad()
def search_clip_two_level(w: Tensor, diag: Tensor, group_size: int,
                          grid: list[float] | None = None) -> Tensor:  # fmt: skip
    """:func:`search_clip` for the two-level grid (quant_math.two_level_grid): the factor
    (N, G) per group that minimises ``sum_k diag_k (w_k - Q(w_k))^2`` over the group, with Q
    round-to-nearest on the grid whose group ranges the factor shrinks (s1 stays the row's)."""
    grid = grid or CLIP_GRID
    n, k = w.shape
    groups = k // group_size
    d = diag.float().clamp_min(0).view(1, groups, group_size)
    wg = w.detach().float().view(n, groups, group_size)
    best = torch.ones(n, groups, device=w.device)
    best_err = None
    for f in grid:
        _, s1, s2, z = two_level_grid(w, group_size,
                                      clip=torch.full((n, groups), f, device=w.device))
        s = (s1[:, None] * s2)[..., None]
        lo, hi = two_level_code_bounds(s2, z)
        q = round_codes(wg / s, z[..., None], lo[..., None], hi[..., None])
        err = (d * (wg - (q - z[..., None]) * s) ** 2).sum(-1)
        if best_err is None:
            best_err = err
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, f, best)
    return best


@torch.no_grad()
def gptq(w: Tensor, hessian: Tensor, bits: int, group_size: int | None,
         symmetric: bool = False, clip: Tensor | None = None, act_order: bool = True,
         damp: float = 0.01, block: int = 128,
         target: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """GPTQ of w (N, K) with H (K, K): (codes (N, K) uint8 in the storage range, scales (N, G),
    zeros (N, G)); static groups from w with clipping factors ``clip`` (N, G) (None: 1). A
    ``target`` (N, K) is quantized on w's grid instead of w (:func:`asymmetric_target`)."""
    k = w.shape[1]
    if w.dim() != 2 or tuple(hessian.shape) != (k, k):
        raise ValueError(f"gptq: w must be (N, K) and the Hessian (K, K); got w "
                         f"{tuple(w.shape)}, Hessian {tuple(hessian.shape)}")  # fmt: skip
    if clip is not None and tuple(clip.shape) != (w.shape[0], segment_index(k, group_size)[1]):
        raise ValueError(f"gptq: clip must be (N, groups) = "
                         f"{(w.shape[0], segment_index(k, group_size)[1])}, got "
                         f"{tuple(clip.shape)}")  # fmt: skip
    factors = _factors(clip.float(), symmetric) if clip is not None else (None, None)
    _, _, _, s, z, _, gid = weight_params(w.detach().float(), group_size, bits, symmetric,
                                          *factors)  # fmt: skip
    codes = _columns(w if target is None else target, hessian, s, z, gid, bits, symmetric,
                     act_order, damp, block)  # fmt: skip
    if symmetric:
        offset = float(1 << (bits - 1))
        return (codes + offset).to(torch.uint8), s, torch.full_like(s, offset)
    return codes.to(torch.uint8), s, z


@torch.no_grad()
def gptq_to_grid(target: Tensor, hessian: Tensor, scales: Tensor, zeros: Tensor, bits: int,
                 group_size: int | None, act_order: bool = True, damp: float = 0.01,
                 block: int = 128) -> Tensor:  # fmt: skip
    """GPTQ's column loop toward ``target`` (N, K) on a given asymmetric grid (scales, zeros
    (N, G)): codes (N, K) uint8 whose weight ``(q - z) s`` keeps ``(target - W_hat) H (target -
    W_hat)^T`` small. The hardening of trained soft rounding (CBQConfig.hardening = 'gptq'):
    the target is the soft-rounded weight, the grid the learned one."""
    k = target.shape[1]
    if target.dim() != 2 or tuple(hessian.shape) != (k, k):
        raise ValueError(f"gptq_to_grid: target must be (N, K) and the Hessian (K, K); got "
                         f"{tuple(target.shape)}, {tuple(hessian.shape)}")  # fmt: skip
    gid = segment_index(k, group_size, target.device)[0]
    codes = _columns(target, hessian, scales.float(), zeros.float(), gid, bits, False,
                     act_order, damp, block)  # fmt: skip
    return codes.to(torch.uint8)


@torch.no_grad()
def gptq_two_level(w: Tensor, hessian: Tensor, group_size: int, act_order: bool = True,
                   damp: float = 0.01, block: int = 128, target: Tensor | None = None,
                   clip: Tensor | None = None
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """GPTQ on the two-level grid (QuantSettings.two_level; cbq_kernels.quant_math.
    two_level_grid: s1 per row, integer steps s2 and zero points z per group, the grid
    round-to-nearest uses), with each code kept where s2 (q - z) stays in int8
    (two_level_code_bounds): (codes (N, K) uint8, s1 (N,), s2 (N, G), z (N, G)), the
    weight s1 s2 (q - z). ``clip`` (N, G): factors on each group's int8 range
    (:func:`search_clip_two_level`; None: the full range). ``target`` as in :func:`gptq`."""
    k = w.shape[1]
    if w.dim() != 2 or tuple(hessian.shape) != (k, k):
        raise ValueError(f"gptq_two_level: w must be (N, K) and the Hessian (K, K); got w "
                         f"{tuple(w.shape)}, Hessian {tuple(hessian.shape)}")  # fmt: skip
    _, s1, s2, z = two_level_grid(w, group_size, clip=clip)
    gid = segment_index(k, group_size, w.device)[0]
    codes = _columns(w if target is None else target, hessian, s1[:, None] * s2, z, gid, 4,
                     False, act_order, damp, block,
                     bounds=two_level_code_bounds(s2, z))  # fmt: skip
    return codes.to(torch.uint8), s1, s2, z


def _columns(w: Tensor, hessian: Tensor, s: Tensor, z: Tensor, gid: Tensor, bits: int,
             symmetric: bool, act_order: bool, damp: float, block: int,
             bounds: tuple[Tensor, Tensor] | None = None) -> Tensor:  # fmt: skip
    """The column loop (module docstring) on the static grid (s, z) (N, G): codes (N, K) as
    floats in the quantizer's range (signed when symmetric), or inside ``bounds`` (lo, hi)
    (N, G) per row and group."""
    k = w.shape[1]
    W = w.detach().float().clone()
    H = hessian.detach().float().clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    inv_s = reciprocal(s)
    qlo, qhi = qrange(bits, symmetric)
    perm = torch.argsort(H.diagonal(), descending=True) if act_order else torch.arange(k)
    perm = perm.to(W.device)
    W, H, col_group = W[:, perm], H[perm][:, perm], gid[perm].tolist()
    hinv = _inverse_cholesky(H, damp)
    Q = torch.zeros_like(W)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        W1 = W[:, i1:i2].clone()
        E1 = torch.zeros_like(W1)
        Hi = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            g = col_group[i1 + i]
            col = W1[:, i]
            lo, hi = (qlo, qhi) if bounds is None else (bounds[0][:, g], bounds[1][:, g])
            q = round_codes(col * inv_s[:, g], z[:, g], lo, hi)
            err = (col - (q - z[:, g]) * s[:, g]) / Hi[i, i]
            W1[:, i:] -= err[:, None] * Hi[i, i:][None, :]
            E1[:, i] = err
            Q[:, i1 + i] = q
        W[:, i2:] -= E1 @ hinv[i1:i2, i2:]
    codes = torch.empty_like(Q)
    codes[:, perm] = Q
    return codes


def _inverse_cholesky(H: Tensor, damp: float) -> Tensor:
    """Upper Cholesky factor of H^-1 after adding ``damp * mean(diag H)`` to the diagonal;
    the dampening doubles until the factorisation succeeds (a singular H: few tokens)."""
    k = H.shape[0]
    mean = H.diagonal().mean()
    eye = torch.eye(k, device=H.device)
    d = damp or 1e-6
    for _ in range(12):
        L, info = torch.linalg.cholesky_ex(H + d * mean * eye)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0:
                return U
        d *= 2
    raise FloatingPointError("GPTQ: the Hessian is not positive definite even with 4096x "
                             "the dampening (too few calibration tokens for this layer?)")


def init_block(groups: list[list[tuple[str, torch.nn.Module]]], run: Callable[[], None],
               mode: str, act_order: bool = True, damp: float = 0.01, block: int = 128,
               target: str = "quantized",
               run_ref: Callable[[], None] | None = None) -> dict[str, dict]:  # fmt: skip
    """Initialise a block's QLinears group by group (true-sequential): ``run()`` sends the
    block's calibration inputs through it; each group's inputs are recorded with the groups
    before it already initialised. ``mode``: 'search' (clipping factors only) or 'gptq'
    (clipping factors, then GPTQ codes). ``target`` (CBQConfig.gptq_target): 'quantized' (H
    of the inputs as recorded), 'act' (H of the activation-quantized inputs, what the layer
    multiplies) or 'fp' (that H, and GPTQ toward :func:`asymmetric_target`: the reference
    inputs come from ``run_ref()``, the same batches in the same order through the block in
    full precision, default ``run``). Returns per layer what was done (for the log)."""
    info: dict[str, dict] = {}
    every = [m for group in groups for _, m in group]
    for group in groups:
        refs = None
        if mode == "gptq" and target == "fp":  # a reference pass per group, not one per block:
            # only this group's inputs are held (SmolLM2, 128 x 2048 bf16 tokens, by count: 0.8 GB
            # against 1.7 GB for all of a block's at once), for 3 more full-precision passes
            refs = _reference_inputs(dict(group), every, run_ref or run)
        with record_inputs(dict(group), full=mode == "gptq",
                           quantized=mode == "gptq" and target != "quantized",
                           refs=refs) as stats:  # fmt: skip
            run()
        for st in stats.values():
            st.reduce()
        for name, q in group:
            st = q.settings
            if not torch.isfinite(stats[name].sum).all():
                raise FloatingPointError(f"non-finite inputs reach layer {q.name or name}")
            if st.two_level:  # the format's grid, its group ranges clipped (gptq_two_level)
                clip = search_clip_two_level(q.w, stats[name].diag, q.gs)
            else:
                clip = search_clip(q.w, stats[name].diag, st.w_bits, q.gs,
                                   st.symmetric_weights)  # fmt: skip
            entry = {"clip_mean": round(float(clip.mean()), 4)}
            if mode == "gptq":
                goal = None
                if refs is not None:
                    goal = asymmetric_target(q.w, stats[name].value, stats[name].cross_value,
                                             damp)  # fmt: skip
                    entry["target_shift"] = round(float((goal - q.w).norm() / q.w.norm()), 5)
                if st.two_level:
                    codes, s1, s2, z = gptq_two_level(q.w, stats[name].value, q.gs, act_order,
                                                      damp, block, target=goal,
                                                      clip=clip)  # fmt: skip
                    q.set_codes(codes, s1[:, None] * s2, z)
                    q.channel_scales = s1
                else:
                    codes, _, _ = gptq(q.w, stats[name].value, st.w_bits, q.gs,
                                       st.symmetric_weights, clip, act_order, damp, block,
                                       target=goal)  # fmt: skip
                    q.start_from(codes, clip)
            elif not st.two_level:  # (two-level layers are never trained: CBQConfig)
                q.set_clip_factors(clip)
            info[name] = entry
    return info


def _reference_inputs(modules: dict[str, torch.nn.Module], every: list[torch.nn.Module],
                      run: Callable[[], None]) -> dict[str, list[Tensor]]:  # fmt: skip
    """Each layer's inputs (one (tokens, K) tensor per call) while ``run()`` sends the
    reference batches through the block with all its layers in full precision."""
    from cbq_ptq.qlinear import full_precision

    refs: dict[str, list[Tensor]] = {name: [] for name in modules}
    hooks = [m.register_forward_pre_hook(
        lambda _m, args, r=refs[name]: r.append(args[0].detach().reshape(-1, args[0].shape[-1])))
        for name, m in modules.items()]  # fmt: skip
    try:
        with full_precision(every), torch.no_grad():
            run()
    finally:
        for h in hooks:
            h.remove()
    return refs


@torch.no_grad()
def asymmetric_target(w: Tensor, hessian: Tensor, cross: Tensor, damp: float) -> Tensor:
    """The weight W' (N, K) whose output on the layer's inputs x best matches ``W x_ref``: the
    minimiser of ``E||W x_ref - Q x||^2`` over Q is W' = W + W D^T H^-1 with H = E[x x^T] and
    D = E[x (x_ref - x)^T] (``cross``), and the objective is a constant plus ``(W' - Q) H (W'
    - Q)^T``, GPTQ's. H gets GPTQ's dampening (``damp`` times its mean diagonal), which
    shrinks the correction along directions the inputs hardly visit; W' = W when x = x_ref."""
    H = hessian.double()
    lam = max(damp, 1e-6) * float(H.diagonal().mean().clamp_min(1e-12))
    H = H + lam * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    corr = torch.linalg.solve(H, cross.double() @ w.detach().double().t())  # (K, N)
    return (w.detach().double() + corr.t()).to(w.dtype)
