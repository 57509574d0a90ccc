"""The CBQ reconstruction pipeline (METHOD.md sections 2-4): capture the first block's inputs,
keep the full-precision and quantized streams, slide overlapping windows, train, harden.

RTN (``epochs=0``, no CFP, no LoRA-Rounding), block-wise reconstruction (``window=1,
overlap=0``) and every ablation are this pipeline with other :class:`CBQConfig` values.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from cbq_ptq import cfp
from cbq_ptq.config import CBQConfig, window_schedule
from cbq_ptq.models import arch_spec, blocks
from cbq_ptq.qlinear import QLinear


class _Stop(Exception):
    pass


@torch.no_grad()
def capture_inputs(model, ids: Tensor, store: torch.device | None = None) -> tuple[Tensor, dict]:
    """Hidden states entering the first block for each calibration window (N, T, H), kept on
    ``store`` (default: the model's device), and the block's keyword arguments (position
    embeddings, mask), captured with batch 1 so that they broadcast over any batch."""
    first = blocks(model)[0]
    states: list[Tensor] = []
    kwargs_seen: list[dict] = []

    def pre(_module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        states.append(hidden.detach().to(store or hidden.device))
        kwargs_seen.append(kwargs)
        raise _Stop

    handle = first.register_forward_pre_hook(pre, with_kwargs=True)
    device = next(model.parameters()).device
    try:
        for i in range(ids.shape[0]):
            try:
                model(ids[i : i + 1].to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    dropped = ("hidden_states", "past_key_values", "past_key_value", "use_cache")
    kwargs = {k: v for k, v in kwargs_seen[0].items() if k not in dropped}
    kwargs["use_cache"] = False
    return torch.cat(states, 0), kwargs


def _run_block(block, x: Tensor, kwargs: dict) -> Tensor:
    out = block(x, **kwargs)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def _propagate(layers, idx: range, x: Tensor, kwargs: dict, batch: int, mode: str) -> Tensor:
    """x through blocks idx (QLinears in ``mode``: 'fp' or 'quant'), in mini-batches on the
    blocks' device; the result stays where x is (GPU, or CPU memory when offloaded)."""
    device = next(layers[idx[0]].parameters()).device if len(idx) else x.device
    outs = []
    for i in range(0, x.shape[0], batch):
        h = x[i : i + batch].to(device, non_blocking=True)
        for j in idx:
            _set_mode(layers[j], mode)
            h = _run_block(layers[j], h, kwargs)
            _set_mode(layers[j], "quant")
        outs.append(h.to(x.device))
    return torch.cat(outs, 0)


def _set_mode(block, mode: str) -> None:
    for m in block.modules():
        if isinstance(m, QLinear):
            m.mode = mode


def _qlinears(layers, idx) -> list[QLinear]:
    return [m for j in idx for m in layers[j].modules() if isinstance(m, QLinear)]


def distance(a: Tensor, b: Tensor, kl_weight: float) -> Tensor:
    """MSE(a, b) + kl_weight * KL(softmax(b) || softmax(a)), softmax over the hidden dim of
    each token, fp32, means over tokens (METHOD.md section 3)."""
    a32, b32 = a.float(), b.float()
    loss = F.mse_loss(a32, b32)
    if kl_weight:
        log_pa = F.log_softmax(a32, -1).reshape(-1, a32.shape[-1])
        log_pb = F.log_softmax(b32, -1).reshape(-1, b32.shape[-1])
        loss = loss + kl_weight * F.kl_div(log_pa, log_pb, log_target=True, reduction="batchmean")
    return loss


@torch.no_grad()
def _prepare_block(model, j: int, x_in: Tensor, kwargs: dict, config: CBQConfig) -> dict:
    """CFP for block j (statistics from the full-precision block on its quantized-stream
    input), then its linears become QLinears. Returns what was done (for the log)."""
    spec = arch_spec(model)
    block = blocks(model)[j]
    cfg = model.config
    n_heads = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    settings = config.settings
    info: dict = {"block": j}
    batch = config.batch_size

    device = next(block.parameters()).device

    def run():
        for i in range(0, x_in.shape[0], batch):
            _run_block(block, x_in[i : i + batch].to(device, non_blocking=True), kwargs)

    truncated: dict[str, Tensor] = {}
    scale_acts = config.cfp_activations
    if scale_acts is None:
        scale_acts = settings.a_bits < 16
    if config.cfp and scale_acts:
        stats = cfp.input_maxima(block, spec.linears, run)
        factors = cfp.block_factors(
            stats, spec, n_heads, n_kv, config.cfp_quantiles, config.cfp_lambda,
            config.cfp_lambda2, config.cfp_beta,
        )  # fmt: skip
        info["cfp_channels"] = {k: int((f != 1).sum()) for k, f in factors.items()}
        cfp.fold_block(block, spec, factors, n_heads, n_kv)
    if config.cfp and config.cfp_weights:
        clipped = 0
        for name in spec.linears:
            w = block.get_submodule(name).weight
            truncated[name], count = cfp.truncate_weights(
                w.float(), config.cfp_quantiles, config.cfp_lambda, config.cfp_lambda2
            )
            clipped += count
        info["cfp_weights_clipped"] = clipped
    channel_max = None
    if settings.a_bits < 16 and settings.act_quantizer == "crossquant":
        channel_max = cfp.input_maxima(block, spec.linears, run)
    train = config.epochs > 0
    for name in spec.linears:
        parent_name, _, leaf = name.rpartition(".")
        parent = block.get_submodule(parent_name) if parent_name else block
        q = QLinear(getattr(parent, leaf), settings, name=f"{j}.{name}",
                    lora=config.lora_rounding and train, lora_rank=config.lora_rank,
                    learn_clipping=config.learn_clipping and train, train=train,
                    truncated=truncated.get(name), lora_init=config.lora_init)  # fmt: skip
        if channel_max is not None:
            alpha = settings.crossquant_alpha
            q.channel_factor = channel_max[name].clamp_min(1e-6).pow(1 - alpha)
        q.to(device)
        setattr(parent, leaf, q)
    return info


def _train_window(layers, idx: range, xq: Tensor, y_hom: Tensor, y_fp: Tensor, kwargs: dict,
                  config: CBQConfig, label: str, progress) -> tuple[float, float]:  # fmt: skip
    """Train the window's quantization parameters; returns the window loss before and after,
    both with the rounding that hardening would fix (h = 1[AB >= 0])."""
    qls = _qlinears(layers, idx)
    groups: dict[str, list] = {"clip": [], "lora": [], "act": []}
    for q in qls:
        for kind, params in q.learned().items():
            groups[kind] += params
    lrs = {"clip": config.lr, "lora": config.lr_lora, "act": config.lr}
    param_groups = [{"params": p, "lr": lrs[k]} for k, p in groups.items() if p]
    n, batch = xq.shape[0], config.batch_size

    device = next(layers[idx[0]].parameters()).device

    def window_loss(sl, with_reg: bool) -> Tensor:
        h = xq[sl].to(device, non_blocking=True)
        for j in idx:
            h = _run_block(layers[j], h, kwargs)
        loss = distance(h, y_hom[sl].to(device, non_blocking=True), config.kl_weight)
        if config.fp_weight:
            target = y_fp[sl].to(device, non_blocking=True)
            loss = loss + config.fp_weight * distance(h, target, config.kl_weight)
        if with_reg:
            # R per weight (the sum over a matrix divided by its size; our choice, so that
            # round_reg does not depend on layer sizes), averaged over the window's layers
            reg = sum(q.last_reg / q.w.numel() for q in qls) / max(len(qls), 1)
            loss = loss + config.round_reg * reg
        return loss

    def full_loss() -> float:
        with torch.no_grad():
            total = sum(float(window_loss(slice(i, i + batch), False)) * min(batch, n - i)
                        for i in range(0, n, batch))  # fmt: skip
        return total / n

    def hard_loss() -> float:
        for q in qls:
            q.hard = True
        try:
            return full_loss()
        finally:
            for q in qls:
                q.hard = False

    before = hard_loss()
    if not param_groups or config.epochs == 0:
        return before, before
    opt = torch.optim.AdamW(param_groups, weight_decay=0.0)
    g = torch.Generator().manual_seed(config.seed)
    steps = config.epochs * math.ceil(n / batch)
    warm = int(0.2 * steps)
    step = 0
    for epoch in range(config.epochs):
        order = torch.randperm(n, generator=g)
        for i in range(0, n, batch):
            rel = max(0.0, (step - warm) / max(steps - warm, 1))
            beta = 20.0 - (20.0 - 2.0) * rel  # annealed from 20 to 2 after the warm-up
            for q in qls:
                q.beta = beta
            sl = order[i : i + batch]
            loss = window_loss(sl, step >= warm)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"non-finite loss ({loss.item()}) in window {label}, epoch {epoch}, step "
                    f"{step}: nothing of this window was written"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if progress is not None:
                progress.set_postfix(window=label, epoch=epoch, loss=f"{loss.item():.4g}")
    return before, hard_loss()


class _Lap:
    """Seconds of each phase of a window (synchronising the GPU), for the log."""

    def __init__(self, device: torch.device, phases: dict[str, float]) -> None:
        self.device, self.phases, self.t = device, phases, time.perf_counter()

    def __call__(self, name: str) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.phases[name] = round(now - self.t, 3)
        self.t = now


def _fingerprint(model, config: CBQConfig, calib_ids: Tensor) -> str:
    """What a checkpoint must agree with to be resumed: the configuration, the calibration
    token windows and the model (name, shapes)."""
    import dataclasses
    import hashlib

    h = hashlib.sha256()
    h.update(json.dumps(dataclasses.asdict(config), sort_keys=True, default=str).encode())
    h.update(calib_ids.to(torch.int64).cpu().numpy().tobytes())
    h.update(str(getattr(model.config, "_name_or_path", "")).encode())
    h.update(str([tuple(p.shape) for p in model.parameters()]).encode())
    return h.hexdigest()


def _save_atomic(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".partial")
    torch.save(obj, tmp)
    tmp.replace(path)


def _stream_bytes(calib_ids: Tensor, model) -> int:
    """Bytes of the four (N, T, H) tensors the pipeline keeps: X_fp, X_q and the targets."""
    elem = next(model.parameters()).element_size()
    return 4 * calib_ids.numel() * model.config.hidden_size * elem


def quantize(model, config: CBQConfig, calib_ids: Tensor, log_path: str | Path | None = None,
             progress: bool = True, checkpoint_dir: str | Path | None = None,
             offload: bool | None = None):  # fmt: skip
    """Quantize ``model`` in place with CBQ (or RTN / block-wise, per ``config``) on the
    calibration windows ``calib_ids`` (N, T); returns the model, whose linears are hardened
    :class:`QLinear` layers, and the per-window log.

    ``checkpoint_dir``: after every window the finalized blocks (once each), the blocks still
    in training, both streams and the log are written there; a later call with the same
    model, configuration and calibration windows resumes after the last finished window and
    gives the same result as an uninterrupted run (a different one is refused). The files
    are pickled modules: resume with the same software versions.

    ``offload``: keep the streams X_fp / X_q and the window targets in CPU memory and move
    mini-batches to the GPU (None: when the four (N, T, H) tensors need more than half of
    the free GPU memory)."""
    arch_spec(model)
    torch.manual_seed(config.seed)
    layers = blocks(model)
    n_blocks = len(layers)
    schedule = window_schedule(n_blocks, config.window, config.overlap)
    model.config.use_cache = False
    device = next(model.parameters()).device
    if offload is None:
        offload = device.type == "cuda" and (
            _stream_bytes(calib_ids, model) > 0.5 * torch.cuda.mem_get_info(device)[0]
        )
    store = torch.device("cpu") if offload else device
    batch = config.batch_size
    prepared: set[int] = set()
    log: list[dict] = []
    finalized: list[int] = []
    first = 0
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
    fingerprint = _fingerprint(model, config, calib_ids) if ckpt is not None else ""
    x_fp, kwargs = capture_inputs(model, calib_ids, store)  # kwargs needed when resuming too
    if ckpt is None or not (ckpt / "state.pt").is_file():
        x_q = x_fp.clone()
    else:
        state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=False)
        if state["fingerprint"] != fingerprint:
            raise ValueError(
                f"checkpoint {ckpt} was written for another model, configuration or set of "
                "calibration windows: remove it or choose another folder"
            )
        for j in state["finalized"]:
            layers[j] = torch.load(ckpt / f"block_{j:04d}.pt", map_location=device,
                                   weights_only=False)  # fmt: skip
        for j, block in state["open"].items():
            layers[j] = block.to(device)
        finalized = list(state["finalized"])
        prepared = set(finalized) | set(state["open"])
        x_fp, x_q = state["x_fp"].to(store), state["x_q"].to(store)
        log = state["log"]
        first = state["window"] + 1
        if log_path is not None:  # the log file says what the checkpoint holds, no more
            Path(log_path).write_text("".join(json.dumps(e) + "\n" for e in log))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(schedule), initial=first, desc="CBQ windows", unit="window")
    try:
        for wi in range(first, len(schedule)):
            start, end = schedule[wi]
            t0 = time.time()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            phases: dict[str, float] = {}
            lap = _Lap(device, phases)
            label = f"{wi + 1}/{len(schedule)} (blocks {start}-{end - 1})"
            entry: dict = {"window": wi, "blocks": [start, end - 1], "cfp": []}
            for j in range(start, end):
                if j not in prepared:
                    x_in = _propagate(layers, range(start, j), x_q, kwargs, batch, "quant")
                    entry["cfp"].append(_prepare_block(model, j, x_in, kwargs, config))
                    del x_in
                    prepared.add(j)
            lap("prepare")
            idx = range(start, end)
            y_hom = _propagate(layers, idx, x_q, kwargs, batch, "fp")
            y_fp = _propagate(layers, idx, x_fp, kwargs, batch, "fp")
            lap("targets")
            before, after = _train_window(layers, idx, x_q, y_hom, y_fp, kwargs, config, label,
                                          bar)  # fmt: skip
            del y_hom, y_fp
            lap("train")
            leave_end = schedule[wi + 1][0] if wi + 1 < len(schedule) else end
            for j in range(start, leave_end):
                for q in _qlinears(layers, [j]):
                    q.harden()
                x_q = _propagate(layers, range(j, j + 1), x_q, kwargs, batch, "quant")
                x_fp = _propagate(layers, range(j, j + 1), x_fp, kwargs, batch, "fp")
                finalized.append(j)
            lap("finalize")
            entry.update(loss_before=before, loss_after=after, seconds=round(time.time() - t0, 3),
                         finalized=list(range(start, leave_end)), offload=bool(offload),
                         phase_seconds=phases)  # fmt: skip
            if device.type == "cuda":
                entry["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
            log.append(entry)
            if ckpt is not None:
                ckpt.mkdir(parents=True, exist_ok=True)
                for j in range(start, leave_end):
                    _save_atomic(layers[j], ckpt / f"block_{j:04d}.pt")
                open_blocks = {j: layers[j] for j in sorted(prepared) if j not in finalized}
                _save_atomic({"fingerprint": fingerprint, "window": wi, "finalized": finalized,
                              "open": open_blocks, "x_fp": x_fp, "x_q": x_q, "log": log},
                             ckpt / "state.pt")  # fmt: skip
            if log_path is not None:
                with Path(log_path).open("a") as f:
                    f.write(json.dumps(entry) + "\n")
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return model, log
