"""Saving and loading a quantized model (METHOD.md section 5).

A folder with:

* ``config.json`` (and the tokenizer files when given): the Hugging Face model config;
* ``quant_config.json``: ``{"format": "cbq.quantized", "format_version": 1, "settings": ...,
  "layers": {name: {bits, group_size, in_features, out_features, a_bits, act_quantizer,
  crossquant_alpha}}}``;
* ``model.safetensors``: every non-quantized tensor of the model (embeddings, norms with the
  CFP factors folded in, LM head) under its usual name, and per quantized linear ``NAME.packed``
  (int32, the canonical packed format of cbq_kernels.formats), ``NAME.scales`` (fp32 (N, G)),
  ``NAME.zeros`` (fp32 (N, G)), ``NAME.act_ratio``, and where present ``NAME.bias`` and
  ``NAME.channel_factor`` (CrossQuant).

:func:`load` rebuilds the model from its config and puts hardened :class:`QLinear` layers in
place of the quantized linears: it reproduces the logits of the model that was saved.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from cbq_kernels.formats import FORMAT_VERSION as PACK_FORMAT_VERSION
from cbq_kernels.packing import pack_ref, unpack_ref
from cbq_ptq.config import QuantSettings
from cbq_ptq.qlinear import QLinear

FORMAT = "cbq.quantized"
FORMAT_VERSION = 1


def save(model, path: str | Path, tokenizer=None, base_model: str | None = None) -> Path:
    """Write the quantized ``model`` (every QLinear hardened) to the folder ``path``;
    ``base_model``: the name it was quantized from (recorded in quant_config.json)."""
    from safetensors.torch import save_file

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    qlinears = {name: m for name, m in model.named_modules() if isinstance(m, QLinear)}
    if not qlinears:
        raise ValueError("model has no quantized layers (run cbq_ptq.quantize first)")
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, dict] = {}
    settings = None
    for name, q in qlinears.items():
        if q.codes is None:
            raise ValueError(f"layer {name} is not hardened: finish quantization before saving")
        settings = q.settings
        bits = q.settings.w_bits
        tensors[f"{name}.packed"] = pack_ref(q.codes.cpu(), bits).contiguous()
        tensors[f"{name}.scales"] = q.scales.float().cpu().contiguous()
        tensors[f"{name}.zeros"] = q.zeros.float().cpu().contiguous()
        tensors[f"{name}.act_ratio"] = q.act_ratio.float().cpu().contiguous()
        if q.bias is not None:
            tensors[f"{name}.bias"] = q.bias.float().cpu().contiguous()
        if q.channel_factor is not None:
            tensors[f"{name}.channel_factor"] = q.channel_factor.float().cpu().contiguous()
        layers[name] = {"bits": bits, "group_size": q.gs, "in_features": q.in_features,
                        "out_features": q.out_features}  # fmt: skip
    prefixes = tuple(f"{name}." for name in qlinears)
    seen: dict[int, str] = {}
    for key, value in model.state_dict().items():
        if key.startswith(prefixes):
            continue
        if value.data_ptr() in seen:  # tied weights: stored once, tied again on load
            continue
        seen[value.data_ptr()] = key
        tensors[key] = value.detach().cpu().contiguous()
    save_file(tensors, out / "model.safetensors", metadata={"format": FORMAT})
    model.config.save_pretrained(out)
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION,
            "pack_format_version": PACK_FORMAT_VERSION,
            "base_model": base_model, "settings": dataclasses.asdict(settings),
            "layers": layers}  # fmt: skip
    (out / "quant_config.json").write_text(json.dumps(meta, indent=1))
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def load(path: str | Path, device: str | None = None):
    """The model saved by :func:`save` (hardened QLinear layers), in eval mode."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    src = Path(path)
    meta_path = src / "quant_config.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path} not found: not a folder written by cbq_ptq.save")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{meta_path}: format {meta.get('format')!r} version {meta.get('format_version')!r}"
            f", this cbq_ptq reads {FORMAT!r} version {FORMAT_VERSION}"
        )
    settings = QuantSettings(**meta["settings"])
    config = AutoConfig.from_pretrained(src)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_file(src / "model.safetensors")
    for name, info in meta["layers"].items():
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        n, k = info["out_features"], info["in_features"]
        has_bias = f"{name}.bias" in tensors
        q = QLinear(torch.nn.Linear(k, n, bias=has_bias), settings, name=name, lora=False,
                    learn_clipping=False, train=False)  # fmt: skip
        q.gs = info["group_size"]
        q.codes = unpack_ref(tensors.pop(f"{name}.packed"), info["bits"], k).to(torch.uint8)
        q.scales = tensors.pop(f"{name}.scales")
        q.zeros = tensors.pop(f"{name}.zeros")
        q.act_ratio = tensors.pop(f"{name}.act_ratio")
        q.bias = tensors.pop(f"{name}.bias", None)
        q.channel_factor = tensors.pop(f"{name}.channel_factor", None)
        q.w_fp = q.w = torch.empty(0)  # the full-precision weights are not part of the artefact
        setattr(parent, leaf, q)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    prefixes = tuple(f"{name}." for name in meta["layers"])
    missing = [m for m in missing if not m.startswith(prefixes)]
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()  # the LM head was stored once, as the embedding
        missing = [m for m in missing if m != "lm_head.weight"]
    if unexpected or missing:
        raise ValueError(f"{src}: unexpected tensors {unexpected[:5]}, missing {missing[:5]}")
    model.eval()
    if device is not None:
        model.to(device)
    return model
