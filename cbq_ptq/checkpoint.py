"""Checkpoint and resume of a quantization run, window by window.

After every window the finalized blocks are written once each (``block_NNNN.pt``), then
``state.pt`` (both streams, the blocks still in training, the log and a fingerprint of the
configuration, the calibration tokens and the model's shapes), each through a ``.partial``
file renamed into place, so an interrupted write never leaves a half file behind. A
checkpoint with another fingerprint is refused. The files are pickled modules: resume with
the same software versions.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import torch
from torch import Tensor

from cbq_ptq.config import CBQConfig


def fingerprint(model, config: CBQConfig, calib_ids: Tensor) -> str:
    """What a checkpoint must agree with to be resumed: the configuration, the calibration
    token windows and the model (name, shapes)."""
    h = hashlib.sha256()
    h.update(json.dumps(dataclasses.asdict(config), sort_keys=True, default=str).encode())
    h.update(calib_ids.to(torch.int64).cpu().numpy().tobytes())
    h.update(str(getattr(model.config, "_name_or_path", "")).encode())
    h.update(str([tuple(p.shape) for p in model.parameters()]).encode())
    return h.hexdigest()


def save_atomic(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".partial")
    torch.save(obj, tmp)
    tmp.replace(path)


def save(ckpt: Path, layers, finalized_now: range, state: dict) -> None:
    """Write the blocks finalized in this window, then the run's state (see module doc)."""
    ckpt.mkdir(parents=True, exist_ok=True)
    for j in finalized_now:
        save_atomic(layers[j], ckpt / f"block_{j:04d}.pt")
    save_atomic(state, ckpt / "state.pt")


def load(ckpt: Path | None, expected: str, layers, device: torch.device,
         streamed: bool = False) -> dict | None:  # fmt: skip
    """The saved state (its finalized and open blocks put back into ``layers``), or None
    when there is no checkpoint; a checkpoint of another run is an error. ``streamed``: the
    finalized blocks were written to the artefact (cbq_ptq.io.ShardWriter), not here: they
    stay where they are (on the meta device)."""
    if ckpt is None or not (ckpt / "state.pt").is_file():
        return None
    state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=False)
    if state["fingerprint"] != expected:
        raise ValueError(
            f"checkpoint {ckpt} was written for another model, configuration or set of "
            "calibration windows: remove it, choose another folder, or run `cbq quantize` "
            "with --restart to discard it"
        )
    for j in [] if streamed else state["finalized"]:
        layers[j] = torch.load(ckpt / f"block_{j:04d}.pt", map_location=device, weights_only=False)
    for j, block in state["open"].items():
        layers[j] = block.to(device)
    return state
