"""The calibration streams (METHOD.md section 3): the first block's inputs, captured once, and
their propagation through blocks in full precision (X_fp) or as quantized so far (X_q)."""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from cbq_ptq.models import blocks
from cbq_ptq.qlinear import full_precision, qlinears


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


def run_block(block, x: Tensor, kwargs: dict) -> Tensor:
    out = block(x, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def block_device(layers, idx) -> torch.device | None:
    """The device of the first block of idx (None for no block): its norms' weights."""
    return next(layers[idx[0]].parameters()).device if len(idx) else None


@torch.no_grad()
def propagate(layers, idx: range, x: Tensor, kwargs: dict, batch: int, fp: bool) -> Tensor:
    """x through blocks idx in mini-batches on the blocks' device, in full precision (``fp``)
    or as quantized now (hard rounding, or the hardened codes); the result stays where x is
    (GPU, or CPU memory when offloaded)."""
    device = block_device(layers, idx) or x.device
    scope = (full_precision(qlinears(layers[j] for j in idx)) if fp
             else contextlib.nullcontext())  # fmt: skip
    outs = []
    with scope:
        for i in range(0, x.shape[0], batch):
            h = x[i : i + batch].to(device, non_blocking=True)
            for j in idx:
                h = run_block(layers[j], h, kwargs)
            outs.append(h.to(x.device))
    return torch.cat(outs, 0)


def stream_bytes(calib_ids: Tensor, model) -> int:
    """Bytes of the four (N, T, H) tensors the pipeline keeps: X_fp, X_q and the targets."""
    elem = next(model.parameters()).element_size()
    return 4 * calib_ids.numel() * model.config.hidden_size * elem
