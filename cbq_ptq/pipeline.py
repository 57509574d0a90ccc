"""The CBQ pipeline (METHOD.md sections 2-4): the window loop.

RTN (no training, no CFP), GPTQ (``method='gptq'``), block-wise reconstruction (``window=1,
overlap=0``) and every ablation are this loop with other :class:`CBQConfig` values. The
method's parts live beside it: the streams (:mod:`cbq_ptq.streams`), CFP
(:mod:`cbq_ptq.cfp`), the starts (:mod:`cbq_ptq.gptq`), one window's training
(:mod:`cbq_ptq.reconstruct`) and checkpoints (:mod:`cbq_ptq.checkpoint`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from torch import Tensor

from cbq_ptq import cfp, checkpoint, distributed, gptq, rotation
from cbq_ptq.blockstream import block_prefix
from cbq_ptq.config import CBQConfig, window_schedule
from cbq_ptq.models import arch_spec, blocks
from cbq_ptq.qlinear import QLinear, qlinears
from cbq_ptq.reconstruct import train_window
from cbq_ptq.serve import replace_module
from cbq_ptq.streams import capture_inputs, propagate, run_block, stream_bytes

__all__ = ["prepare_block", "quantize"]


@torch.no_grad()
def prepare_block(model, j: int, x_in: Tensor, kwargs: dict, config: CBQConfig,
                  x_ref: Tensor | None = None) -> dict:  # fmt: skip
    """Block j before its first window: CFP (statistics from the full-precision block on its
    quantized-stream input ``x_in``), its linears replaced by QLinears, and their start
    (round-to-nearest with searched clipping, or GPTQ). ``x_ref``: the block's
    full-precision-stream input, the reference of ``gptq_target='fp'`` (default x_in).
    Returns what was done (for the log)."""
    spec = arch_spec(model)
    block = blocks(model)[j]
    cfg = model.config
    n_heads = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    settings = config.settings
    info: dict = {"block": j}
    batch = config.batch_size
    device = next(block.parameters()).device

    def run(x_in=x_in):
        for i in range(0, x_in.shape[0], batch):
            run_block(block, x_in[i : i + batch].to(device, non_blocking=True), kwargs)

    if x_ref is not None and x_ref.shape != x_in.shape:
        raise ValueError(f"x_ref must have x_in's shape {tuple(x_in.shape)}, got "
                         f"{tuple(x_ref.shape)}")  # fmt: skip

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
        if rotation.of(block.get_submodule(spec.down)) is not None:
            # the online rotation sits between up_proj and down_proj: a per-channel factor
            # cannot pass through it (the other factors act in the rotated bases, an identity)
            factors.pop("down")
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
    train = config.trains
    for name in spec.linears:
        parent_name, _, leaf = name.rpartition(".")
        parent = block.get_submodule(parent_name) if parent_name else block
        q = QLinear(getattr(parent, leaf), settings, name=f"{j}.{name}", train=train,
                    lora=config.lora_rounding, lora_rank=config.lora_rank,
                    learn_clipping=config.learn_clipping, truncated=truncated.get(name),
                    lora_init=config.lora_init, lora_margin=config.lora_margin,
                    lora_base=config.lora_base,
                    act_clip=config.act_clip if settings.a_bits < 16 else 1.0)  # fmt: skip
        if channel_max is not None:
            alpha = settings.crossquant_alpha
            q.channel_factor = channel_max[name].clamp_min(1e-6).pow(1 - alpha)
        q.to(device)
        replace_module(block, name, q)
    if config.act_clip_shared:
        for names in spec.groups:
            first = block.get_submodule(names[0])
            for name in names[1:]:
                block.get_submodule(name).share_act_clip(first)
    start = _start_mode(config)
    if start is not None:
        groups = [[(n, block.get_submodule(n)) for n in names]
                  for names in spec.groups]  # fmt: skip
        t0 = time.perf_counter()
        layers_info = gptq.init_block(
            groups, run, start, config.gptq_act_order, config.gptq_damp, config.gptq_block,
            config.gptq_target, None if x_ref is None else (lambda: run(x_ref)))
        info["start"] = start
        info["start_seconds"] = round(time.perf_counter() - t0, 3)
        info["clip_mean"] = round(sum(v["clip_mean"] for v in layers_info.values())
                                  / len(layers_info), 4)  # fmt: skip
        shifts = [v["target_shift"] for v in layers_info.values() if "target_shift" in v]
        if shifts:  # gptq_target 'fp': how far the fitted weights W' moved from W, relative
            info["target_shift_max"] = max(shifts)
    return info


def _start_mode(config: CBQConfig) -> str | None:
    """'gptq', 'search' (clipping only) or None (round-to-nearest with min-max clipping). A
    configuration without training (epochs = steps = 0) is round-to-nearest whatever its init:
    only method='gptq' gives GPTQ without training."""
    if config.method == "gptq" or (config.init == "gptq" and config.trains):
        if config.settings.symmetric_weights:
            raise ValueError("GPTQ starts are implemented for asymmetric weights (zero points)")
        return "gptq"
    if config.trains and config.learn_clipping and config.clip_init == "search":
        return "search"
    return None


def check_calibration(model, config, calib_ids) -> None:
    """Clear errors for a configuration or calibration tokens that cannot be used."""
    if not isinstance(config, CBQConfig):
        raise TypeError(f"config must be a cbq_ptq.CBQConfig, got {type(config).__name__}")
    if not isinstance(calib_ids, Tensor):
        raise TypeError(f"calib_ids must be a tensor of token ids, got {type(calib_ids).__name__}")
    if calib_ids.is_floating_point() or calib_ids.is_complex() or calib_ids.dtype == torch.bool:
        raise TypeError(f"calib_ids must hold integer token ids, got dtype {calib_ids.dtype}")
    if calib_ids.dim() != 2 or calib_ids.shape[0] < 1 or calib_ids.shape[1] < 2:
        raise ValueError("calib_ids must be (windows >= 1, tokens >= 2), got shape "
                         f"{tuple(calib_ids.shape)}")  # fmt: skip
    vocab = getattr(model.config, "vocab_size", None)
    lo, hi = int(calib_ids.min()), int(calib_ids.max())
    if lo < 0 or (vocab is not None and hi >= vocab):
        raise ValueError(f"calib_ids must be token ids in [0, {vocab}), got values in [{lo}, {hi}]")


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


def quantize(model, config: CBQConfig, calib_ids: Tensor, log_path: str | Path | None = None,
             progress: bool = True, checkpoint_dir: str | Path | None = None,
             offload: bool | None = None, writer=None):  # fmt: skip
    """Quantize ``model`` in place with CBQ (or RTN / GPTQ / block-wise, per ``config``) on
    the calibration windows ``calib_ids`` (N, T); returns the model, whose linears are
    hardened :class:`QLinear` layers, and the per-window log.

    ``checkpoint_dir``: after every window the run is checkpointed there
    (:mod:`cbq_ptq.checkpoint`); a later call with the same model, configuration and
    calibration windows resumes after the last finished window and gives the same result as
    an uninterrupted run (a different one is refused).

    ``offload``: keep the streams X_fp / X_q and the window targets in CPU memory and move
    mini-batches to the GPU (None: when the four (N, T, H) tensors need more than half of
    the free GPU memory).

    Under an initialised torch.distributed process group the ranks share the calibration
    windows (:mod:`cbq_ptq.distributed`): every rank calls this with the same arguments and
    ends with the same model; rank 0 writes the log (and should save), each rank checkpoints
    its share of the streams in ``checkpoint_dir/rankR``.

    A block-streamed model (:func:`cbq_ptq.blockstream.load_streamed`) gets each block's weights
    when the block's first window starts; with ``writer`` (a :class:`cbq_ptq.io.ShardWriter`)
    each finalized block is written to the artefact and goes back to the meta device (finish
    the artefact with ``writer.finish(model, ...)``), without one it moves to CPU memory."""
    arch_spec(model)
    check_calibration(model, config, calib_ids)
    distributed.check_batch(config.batch_size)
    rank, world = distributed.world()
    stream = getattr(model, "_cbq_stream", None)
    if stream is not None and config.rotate != "none":
        raise ValueError("a block-streamed model is quantized without rotation (rotate='none'): "
                         "the rotations fold into every block at once")  # fmt: skip
    n_total, calib_ids_all = calib_ids.shape[0], calib_ids
    calib_ids = distributed.shard(calib_ids)  # this rank's windows
    main = rank == 0
    if not main:
        log_path, progress = None, False
    if config.rotate != "none" and not rotation.is_rotated(model):
        rotation.rotate_model(model, config.rotate, config.seed)
    torch.manual_seed(config.seed)
    layers = blocks(model)
    schedule = window_schedule(len(layers), config.window, config.overlap)
    use_cache, model.config.use_cache = model.config.use_cache, False  # restored at the end
    device = next(model.parameters()).device
    if offload is None:
        offload = device.type == "cuda" and (
            stream_bytes(calib_ids, model) > 0.5 * torch.cuda.mem_get_info(device)[0]
        )
    store = torch.device("cpu") if offload else device
    batch = config.batch_size
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if ckpt is not None and world > 1:
        ckpt = ckpt / f"rank{rank}"
    fingerprint = checkpoint.fingerprint(model, config, calib_ids_all) if ckpt is not None else ""
    x_fp, kwargs = capture_inputs(model, calib_ids, store)  # kwargs needed when resuming too
    state = checkpoint.load(ckpt, fingerprint, layers, device, streamed=writer is not None)
    if state is not None and writer is not None:
        writer.restore(state.get("writer"))  # the shards written before
    if state is None:
        x_q, log, finalized, first = x_fp.clone(), [], [], 0
    else:
        x_fp, x_q = state["x_fp"].to(store), state["x_q"].to(store)
        log, finalized, first = state["log"], list(state["finalized"]), state["window"] + 1
        if log_path is not None:  # the log file says what the checkpoint holds, no more
            Path(log_path).write_text("".join(json.dumps(e) + "\n" for e in log))
    prepared = set(finalized) | (set(state["open"]) if state else set())
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
                if stream is not None and any(p.is_meta for p in layers[j].parameters()):
                    stream.materialize(layers[j], block_prefix(model, j))
                if j not in prepared:
                    x_in = propagate(layers, range(start, j), x_q, kwargs, batch, fp=False)
                    x_ref = None
                    if config.gptq_target == "fp" and _start_mode(config) == "gptq":
                        x_ref = propagate(layers, range(start, j), x_fp, kwargs, batch, fp=True)
                    try:
                        entry["cfp"].append(prepare_block(model, j, x_in, kwargs, config, x_ref))
                    except FloatingPointError as exc:
                        raise FloatingPointError(f"{exc} in window {label}: nothing of this "
                                                 "window was written") from exc
                    del x_in, x_ref
                    prepared.add(j)
            lap("prepare")
            idx = range(start, end)
            qls = qlinears(layers[j] for j in idx)
            if config.trains:
                y_hom = propagate(layers, idx, x_q, kwargs, batch, fp=True)
                y_fp = propagate(layers, idx, x_fp, kwargs, batch, fp=True)
                lap("targets")
                trained = train_window(layers, idx, x_q, y_hom, y_fp, kwargs, qls, config, label,
                                       seed=config.seed + start, progress=bar,
                                       n_total=n_total)  # fmt: skip
                entry.update(trained)
                del y_hom, y_fp
                lap("train")
            leave_end = schedule[wi + 1][0] if wi + 1 < len(schedule) else end
            for j in range(start, leave_end):
                for q in qlinears([layers[j]]):
                    q.harden()
                x_q = propagate(layers, range(j, j + 1), x_q, kwargs, batch, fp=False)
                x_fp = propagate(layers, range(j, j + 1), x_fp, kwargs, batch, fp=True)
                for q in qlinears([layers[j]]):
                    q.release_full_precision()
                finalized.append(j)
                if writer is not None:  # into the artefact, then out of memory
                    writer.write(layers[j], block_prefix(model, j), f"block-{j:05d}.safetensors")
                    layers[j].to("meta")
                elif stream is not None:
                    layers[j].to("cpu")
            lap("finalize")
            entry.update(seconds=round(time.time() - t0, 3), offload=bool(offload), ranks=world,
                         finalized=list(range(start, leave_end)), phase_seconds=phases)  # fmt: skip
            if device.type == "cuda":
                entry["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
            if stream is not None:  # blocks with weights on the device at the window's end
                entry["blocks_resident"] = sum(
                    any(p.device == device for p in b.parameters()) for b in layers)
            log.append(entry)
            if ckpt is not None:
                open_blocks = {j: layers[j] for j in sorted(prepared) if j not in finalized}
                state = {"fingerprint": fingerprint, "window": wi, "finalized": finalized,
                         "open": open_blocks, "x_fp": x_fp, "x_q": x_q, "log": log,
                         "writer": writer.state() if writer is not None else None}  # fmt: skip
                # written blocks are in the artefact's shards, not in the checkpoint
                done = range(0) if writer is not None else range(start, leave_end)
                checkpoint.save(ckpt, layers, done, state)
            if log_path is not None:
                with Path(log_path).open("a") as f:
                    f.write(json.dumps(entry) + "\n")
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    model.config.use_cache = use_cache  # the saved model generates with its KV cache
    return model, log
