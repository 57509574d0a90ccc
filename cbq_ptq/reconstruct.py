"""One window's reconstruction (METHOD.md sections 3-4): the loss and the training loop.

For a window of blocks with quantized-stream input X_q and targets Y_hom = FP(X_q), Y_fp =
FP(X_fp), training minimises over the window's quantization parameters (clipping logits,
LoRA-Rounding factors, activation clipping logits)::

    D(Q(X_q), Y_hom) + fp_weight * D(Q(X_q), Y_fp) + round_reg * R

with Q the window quantized with soft LoRA-Rounding and D the distance of :func:`distance`.
The calibration windows are split: a held-out part (``CBQConfig.holdout``) measures the loss
with *hard* rounding (what hardening fixes) before training, at ``eval_points`` points during
it and after it; the best of these states is kept, so a window never ends worse than it
started. The log says which state was kept, and the loss with soft and with hard rounding at
the end of training (their gap is what hardening costs).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from cbq_ptq import distributed
from cbq_ptq.config import CBQConfig
from cbq_ptq.qlinear import QLinear, quantized
from cbq_ptq.streams import run_block


def distance(pred: Tensor, target: Tensor, loss: str = "rel", kl_weight: float = 0.0) -> Tensor:
    """D(pred, target), fp32, averaged over tokens. 'mse': mean squared error; 'rel': per
    token the mean squared error divided by the target token's mean square (a relative
    error). kl_weight: plus KL(softmax(target) || softmax(pred)) over the hidden dimension of
    each token (METHOD.md section 3)."""
    a, b = pred.float(), target.float()
    if loss == "mse":
        d = F.mse_loss(a, b)
    elif loss == "rel":
        err = (a - b).pow(2).mean(-1)
        ref = b.pow(2).mean(-1)
        d = (err / (ref + 1e-12)).mean()
    else:
        raise ValueError(f"loss must be 'rel' or 'mse', got {loss!r}")
    if kl_weight:
        log_pa = F.log_softmax(a, -1).reshape(-1, a.shape[-1])
        log_pb = F.log_softmax(b, -1).reshape(-1, b.shape[-1])
        d = d + kl_weight * F.kl_div(log_pa, log_pb, log_target=True, reduction="batchmean")
    return d


def lr_factor(step: int, steps: int, config: CBQConfig) -> float:
    """Linear warm-up over ``warmup`` of the steps, then cosine decay to 0 (or constant)."""
    warm = int(config.warmup * steps)
    if step < warm:
        return (step + 1) / warm
    if config.schedule == "constant":
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * (step - warm) / max(steps - warm, 1)))


def beta_at(step: int, steps: int, config: CBQConfig) -> tuple[float, bool]:
    """(regulariser exponent, regulariser on?): off during the first ``round_warmup`` of the
    steps, then the exponent decays linearly from round_beta[0] to round_beta[1]."""
    warm = int(config.round_warmup * steps)
    b0, b1 = config.round_beta
    if step < warm:
        return b0, False
    rel = (step - warm) / max(steps - warm - 1, 1)
    return b0 + (b1 - b0) * min(rel, 1.0), True


def temperature_at(step: int, steps: int, config: CBQConfig) -> float:
    """The rounding relaxation's temperature: geometric from round_temp[0] to round_temp[1]
    over the steps (1 throughout by default: METHOD.md's h(V))."""
    t0, t1 = config.round_temp
    return t0 * (t1 / t0) ** (step / max(steps - 1, 1))


class _Window:
    """The window's blocks, data and loss, on the blocks' device."""

    def __init__(self, layers, idx: range, xq: Tensor, y_hom: Tensor, y_fp: Tensor,
                 kwargs: dict, config: CBQConfig, qls: list[QLinear]) -> None:  # fmt: skip
        self.layers, self.idx, self.kwargs, self.config, self.qls = layers, idx, kwargs, config, qls
        self.xq, self.y_hom, self.y_fp = xq, y_hom, y_fp
        self.device = qls[0].w_fp.device if qls else xq.device

    def loss(self, sl) -> Tensor:
        """The window loss of the calibration windows ``sl`` with the layers as the caller's
        :func:`quantized` scope set them."""
        c = self.config
        h = self.xq[sl].to(self.device, non_blocking=True)
        for j in self.idx:
            h = run_block(self.layers[j], h, self.kwargs)
        loss = distance(h, self.y_hom[sl].to(self.device, non_blocking=True), c.loss, c.kl_weight)
        if c.fp_weight:
            target = self.y_fp[sl].to(self.device, non_blocking=True)
            loss = loss + c.fp_weight * distance(h, target, c.loss, c.kl_weight)
        return loss

    @torch.no_grad()
    def evaluate(self, index: Tensor, rounding: str = "hard", temperature: float = 1.0) -> float:
        """Mean window loss over the calibration windows ``index`` (global indices; each rank
        scores its own and the sums are reduced), hard or soft rounding."""
        rows, _ = distributed.local_rows(index)
        batch, total = self.config.batch_size, 0.0
        with quantized(self.qls, rounding=rounding, temperature=temperature):
            for i in range(0, rows.numel(), batch):
                sl = rows[i : i + batch]
                total += float(self.loss(sl)) * sl.numel()
        total, count = distributed.reduce_sum([total, float(rows.numel())], self.device)
        return total / max(count, 1)


def _snapshot(params: list[Tensor]) -> list[Tensor]:
    return [p.detach().clone() for p in params]


def _restore(params: list[Tensor], saved: list[Tensor]) -> None:
    with torch.no_grad():
        for p, v in zip(params, saved, strict=True):
            p.copy_(v)


def train_window(layers, idx: range, xq: Tensor, y_hom: Tensor, y_fp: Tensor, kwargs: dict,
                 qls: list[QLinear], config: CBQConfig, label: str, seed: int = 0,
                 progress=None, n_total: int | None = None) -> dict:  # fmt: skip
    """Train the window's quantization parameters (module docstring); returns the log entry:
    held-out losses with hard rounding before and after (the kept state), which state was
    kept, the soft and hard held-out losses at the end of training, the steps taken.
    ``n_total``: the number of calibration windows over all ranks (data-parallel runs: xq
    and the targets hold this rank's share, cbq_ptq.distributed)."""
    win = _Window(layers, idx, xq, y_hom, y_fp, kwargs, config, qls)
    n = xq.shape[0] if n_total is None else n_total
    n_hold = config.split(n)
    train_idx = torch.arange(n - n_hold)
    held = torch.arange(n - n_hold, n) if n_hold else train_idx  # no split: judged on training
    groups: dict[str, list] = {"clip": [], "lora": [], "act": []}
    seen: set[int] = set()  # a parameter shared by layers (act_clip_shared) is trained once
    for q in qls:
        for kind, params in q.learned().items():
            for p in params:
                if id(p) not in seen:
                    seen.add(id(p))
                    groups[kind].append(p)
    params = [p for ps in groups.values() for p in ps]
    before = win.evaluate(held, "hard")
    if not math.isfinite(before):
        raise FloatingPointError(f"non-finite loss ({before}) in window {label} before "
                                 "training: nothing of this window was written")  # fmt: skip
    entry: dict = {"loss_before": before, "holdout_windows": int(n_hold)}
    steps = config.num_steps(train_idx.numel())
    if not params or steps == 0:
        entry.update(loss_after=before, kept="start", steps=0)
        return entry
    lrs = {"clip": config.lr, "lora": config.lr_lora, "act": config.lr}
    param_groups = [{"params": p, "lr": lrs[k], "base_lr": lrs[k]} for k, p in groups.items() if p]
    opt = torch.optim.AdamW(param_groups, weight_decay=0.0)
    best, best_state, kept = before, _snapshot(params), "start"
    checks = {round(steps * (i + 1) / (config.eval_points + 1)) for i in range(config.eval_points)}
    batches = distributed.stratified_batches(train_idx, config.batch_size, steps, seed)
    world = distributed.world()[1]
    bad = torch.zeros((), dtype=torch.bool, device=win.device)
    history = []
    for step in range(steps):
        # this rank's part of the global batch, weighted by its share of it (the gradients
        # are summed over the ranks: one process's gradient of the whole batch)
        rows, _ = distributed.local_rows(batches[step])
        share = rows.numel() / batches[step].numel()
        f = lr_factor(step, steps, config)
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * f
        beta, reg_on = beta_at(step, steps, config)
        temp = temperature_at(step, steps, config)
        with quantized(qls, rounding=config.round_mode, beta=beta, temperature=temp) as reg:
            loss = win.loss(rows) * share if rows.numel() else torch.zeros((), device=win.device)
            if reg_on and config.round_reg:
                loss = loss + (config.round_reg / world) * reg
        opt.zero_grad(set_to_none=True)
        if loss.requires_grad:
            loss.backward()
        distributed.all_reduce_grads(params)
        opt.step()
        bad |= ~torch.isfinite(loss.detach())
        if world > 1:
            bad = distributed.all_reduce_(bad.to(torch.int32), "max").bool()
        if progress is not None and step % 16 == 0:
            progress.set_postfix(window=label, step=step, loss=f"{loss.item():.4g}")
        if step + 1 in checks or step + 1 == steps:
            current = math.inf if bool(bad) else win.evaluate(held, "hard")
            current = current if math.isfinite(current) else math.inf
            history.append([step + 1, current])
            if current < best:
                best, best_state = current, _snapshot(params)
                kept = "end" if step + 1 == steps else f"step {step + 1}"
    if not bool(bad):
        entry["soft_end"] = win.evaluate(held, "soft", temperature_at(steps - 1, steps, config))
    entry["hard_end"] = history[-1][1] if math.isfinite(history[-1][1]) else None
    _restore(params, best_state)
    curve = [[s, v if math.isfinite(v) else None] for s, v in history]
    entry.update(loss_after=best, kept=kept, steps=steps, holdout_curve=curve,
                 diverged=bool(bad) or not math.isfinite(history[-1][1]))  # fmt: skip
    return entry


@torch.no_grad()
def harden_toward_soft(layers, idx: range, xq: Tensor, kwargs: dict, qls: list[QLinear],
                       config: CBQConfig, rows: Tensor, spec,
                       toward: str = "soft") -> int:  # fmt: skip
    """Hard codes for trained layers by GPTQ toward their soft-rounded weights (experiment of
    issue 15's W4A8 soft-to-hard gap): group by group in execution order (each block's
    ``spec.groups``, cbq_ptq.models.ArchSpec), the inputs of the
    calibration windows ``rows`` through the window (layers given codes already compute with
    them, the others with soft rounding) give each layer's Hessian, and
    :func:`cbq_ptq.gptq.gptq_to_grid` finds codes on the layer's learned grid whose output
    stays near the soft weight's. The codes are set on the layers (QLinear.set_codes; harden
    keeps them). ``toward="fp"``: the full-precision weight as the target instead (GPTQ on
    the learned grid). Returns the number of layers given codes."""
    if toward not in ("soft", "fp"):
        raise ValueError(f"toward must be 'soft' or 'fp', got {toward!r}")
    from cbq_ptq import gptq

    device = qls[0].w_fp.device if qls else xq.device
    batch = config.batch_size

    def run(sl_rows):
        for i in range(0, sl_rows.numel(), batch):
            h = xq[sl_rows[i : i + batch]].to(device)
            for j in idx:
                h = run_block(layers[j], h, kwargs)

    groups = [[layers[j].get_submodule(name) for name in names]
              for j in idx for names in spec.groups]  # fmt: skip
    done = 0
    for group in groups:
        with gptq.record_inputs({q.name or str(id(q)): q for q in group}, full=True) as stats, \
                quantized(qls, rounding="soft"):  # fmt: skip
            run(rows)
        for q in group:
            st = stats[q.name or str(id(q))]
            st.reduce()
            target = q.weight_hat("soft")[0] if toward == "soft" else q.w
            s, z = q.quant_params()
            codes = gptq.gptq_to_grid(target.float(), st.value, s, z, q.settings.w_bits, q.gs,
                                      config.gptq_act_order, config.gptq_damp,
                                      config.gptq_block)  # fmt: skip
            q.set_codes(codes, s, z)
            done += 1
    return done
