"""Saving and loading a quantized model (METHOD.md section 5).

A folder with:

* ``config.json`` (and the tokenizer files when given): the Hugging Face model config;
* ``quant_config.json``: ``{"format": "cbq.quantized", "format_version": 1,
  "pack_format_version": 1, "settings": ..., "layers": {name: {bits, group_size, in_features,
  out_features}}, "files": {"model.safetensors": sha256}, "base_model", "corpus"}``, and for
  a rotated model ``"rotation": {kind, seed, online_down}`` (cbq_ptq.rotation: the folded
  rotations are in the weights, :func:`load` re-attaches the online one of down_proj);
* ``model.safetensors``: every non-quantized tensor of the model (embeddings, norms with the
  CFP factors folded in, LM head) under its usual name, and per quantized linear ``NAME.packed``
  (int32, the canonical packed format of cbq_kernels.formats), ``NAME.scales`` (fp32 (N, G)),
  ``NAME.zeros`` (fp32 (N, G)), ``NAME.act_ratio``, and where present ``NAME.bias``,
  ``NAME.channel_factor`` (CrossQuant) and ``NAME.channel_scales`` (fp32 (N,), a two-level
  weight's s1: its scales are s1 times integer steps; QuantSettings.two_level).

:func:`load` verifies the folder before it builds anything (the sha256 of every tensor file
against the one recorded at save time, then the recorded bits, group size and shapes against
the tensors, each mismatch named), rebuilds the model from its config and puts hardened
:class:`QLinear` layers in place of the quantized linears: it reproduces the logits of the
model that was saved.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from cbq_kernels.formats import FORMAT_VERSION as PACK_FORMAT_VERSION
from cbq_kernels.formats import groups_per_row, packed_words
from cbq_kernels.packing import pack, unpack  # the compiled ops (cbq::pack / cbq::unpack)
from cbq_ptq import rotation
from cbq_ptq.config import QuantSettings
from cbq_ptq.models import sha256_file
from cbq_ptq.qlinear import QLinear

FORMAT = "cbq.quantized"
FORMAT_VERSION = 1


def storage_bits(bits: int) -> int:
    """The packed format's container for ``bits``-bit codes: 6-bit codes are stored as 8-bit
    (the format packs 2, 3-in-4, 4 and 8)."""
    return 8 if bits == 6 else bits


def _layer_tensors(name: str, q: QLinear) -> tuple[dict[str, torch.Tensor], dict]:
    """What the artefact holds of one hardened QLinear: its tensors and its meta entry."""
    if q.codes is None:
        raise ValueError(f"layer {name} is not hardened: finish quantization before saving")
    bits = q.settings.w_bits
    t = {f"{name}.packed": pack(q.codes.cpu().contiguous(), storage_bits(bits)).contiguous(),
         f"{name}.scales": q.scales.float().cpu().contiguous(),
         f"{name}.zeros": q.zeros.float().cpu().contiguous(),
         f"{name}.act_ratio": q.act_ratio.float().cpu().contiguous()}  # fmt: skip
    if q.bias is not None:
        t[f"{name}.bias"] = q.bias.float().cpu().contiguous()
    if q.channel_factor is not None:
        t[f"{name}.channel_factor"] = q.channel_factor.float().cpu().contiguous()
    if q.channel_scales is not None:
        t[f"{name}.channel_scales"] = q.channel_scales.float().cpu().contiguous()
    info = {"bits": bits, "group_size": q.gs, "in_features": q.in_features,
            "out_features": q.out_features}  # fmt: skip
    return t, info


class ShardWriter:
    """Writes a quantized model as it is finalized: :meth:`write` puts a module's tensors
    (its hardened QLinears and its other parameters and buffers) into a shard of their own,
    :meth:`finish` the rest of the model, config.json, quant_config.json (every shard with its
    sha256) and the tokenizer. Block-streamed quantization (cbq_ptq.blockstream) writes each block
    when its window is finalized; :func:`save` writes a whole model through the same code."""

    def __init__(self, path: str | Path, state: dict | None = None) -> None:
        self.out = Path(path)
        self.out.mkdir(parents=True, exist_ok=True)
        self.restore(state)

    def restore(self, state: dict | None) -> None:
        """Continue from :meth:`state` (a resumed run: the shards written before)."""
        state = state or {}
        self.files: dict[str, str] = dict(state.get("files", {}))
        self.layers: dict[str, dict] = dict(state.get("layers", {}))
        self.written: set[str] = set(state.get("written", []))  # tensor names in shards
        self.settings: dict | None = state.get("settings")

    def state(self) -> dict:
        """What a checkpoint keeps to resume writing."""
        return {"files": self.files, "layers": self.layers, "written": sorted(self.written),
                "settings": self.settings}  # fmt: skip

    def _tensors(self, module, prefix: str, seen: dict[int, str]) -> dict[str, torch.Tensor]:
        qls = {n: m for n, m in module.named_modules() if isinstance(m, QLinear)}
        tensors: dict[str, torch.Tensor] = {}
        for n, q in qls.items():
            if f"{prefix}{n}.packed" in self.written:  # in a block's shard already
                continue
            t, info = _layer_tensors(f"{prefix}{n}", q)
            tensors.update(t)
            self.layers[f"{prefix}{n}"] = info
            self.settings = dataclasses.asdict(q.settings)
        owned = tuple(f"{n}." for n in qls)
        for key, value in module.state_dict().items():
            if key.startswith(owned) or value.is_meta or f"{prefix}{key}" in self.written:
                continue
            if value.data_ptr() in seen:  # tied weights: stored once, tied again on load
                continue
            seen[value.data_ptr()] = key
            tensors[f"{prefix}{key}"] = value.detach().cpu().contiguous()
        return tensors

    def write(self, module, prefix: str, filename: str) -> None:
        """``module``'s tensors (named ``prefix`` + their names) into ``filename``."""
        from safetensors.torch import save_file

        tensors = self._tensors(module, prefix, {})
        tmp = self.out / (filename + ".partial")
        save_file(tensors, tmp, metadata={"format": FORMAT})
        tmp.chmod(0o644)  # safetensors writes 0600
        tmp.replace(self.out / filename)
        self.files[filename] = sha256_file(self.out / filename)
        self.written.update(tensors)

    def finish(self, model, tokenizer=None, base_model: str | None = None,
               corpus: str | None = None, filename: str = "model.safetensors") -> Path:  # fmt: skip
        """The model's tensors not written yet, then the metadata (module docstring)."""
        self.write(model, "", filename)
        if not self.layers:
            raise ValueError("model has no quantized layers (run cbq_ptq.quantize first)")
        model.config.save_pretrained(self.out)
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION,
                "pack_format_version": PACK_FORMAT_VERSION,
                "base_model": base_model, "corpus": corpus, "settings": self.settings,
                "layers": self.layers, "files": self.files}  # fmt: skip
        info = getattr(model, "_cbq_rotation", None)
        if info is not None:  # the folded rotations are in the weights; load re-attaches R4
            meta["rotation"] = info.to_json()
        (self.out / "quant_config.json").write_text(json.dumps(meta, indent=1))
        if tokenizer is not None:
            tokenizer.save_pretrained(self.out)
        return self.out


def save(model, path: str | Path, tokenizer=None, base_model: str | None = None,
         corpus: str | None = None) -> Path:  # fmt: skip
    """Write the quantized ``model`` (every QLinear hardened) to the folder ``path``;
    ``base_model``: the name it was quantized from, ``corpus``: the corpus it was evaluated
    on (both recorded in quant_config.json; `cbq eval` evaluates on that corpus)."""
    if not any(isinstance(m, QLinear) for m in model.modules()):
        raise ValueError("model has no quantized layers (run cbq_ptq.quantize first)")
    return ShardWriter(path).finish(model, tokenizer, base_model, corpus)


def _kernel_layer(model, name: str, info: dict, settings: QuantSettings, tensors: dict,
                  dtype: torch.dtype, device: str | None) -> bool:  # fmt: skip
    """Put a KernelLinear at ``name`` from the file's tensors (popped); False when the GEMMs
    do not take the setting (the caller builds a fake-quantized QLinear)."""
    from cbq_ptq.serve import KernelLinear, activation_kwargs, kind_error, replace_module

    if kind_error(settings, info["group_size"]) is not None:
        return False
    dev = torch.device(device or "cpu")
    take = lambda key: tensors.pop(f"{name}.{key}", None)  # noqa: E731
    packed, scales, zeros = take("packed"), take("scales"), take("zeros")
    bias, ratio, factor = take("bias"), take("act_ratio"), take("channel_factor")
    s1 = take("channel_scales")
    act = activation_kwargs(settings, ratio, factor.to(dev) if factor is not None else None)
    bias = bias.to(dev) if bias is not None else None
    layer = KernelLinear.from_packed(name, packed.to(dev), info["bits"], info["in_features"],
                                     scales.to(dev), zeros.to(dev), settings,
                                     info["group_size"], bias, act, dtype,
                                     s1.to(dev) if s1 is not None else None)  # fmt: skip
    replace_module(model, name, layer)
    return True


def _materialize_buffers(model, config) -> None:
    """Rebuild the modules whose tensors are computed at construction and not saved (the
    rotary embedding's inv_freq), which the meta-device build left empty; then no tensor may
    be left on the meta device."""
    for name, module in list(model.named_modules()):
        if any(b.is_meta for b in module.buffers(recurse=False)) and hasattr(module, "inv_freq"):
            parent_name, _, leaf = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, leaf, type(module)(config=config))
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ValueError(f"loading left tensors without values: {left[:5]}")


def load(path: str | Path, device: str | None = None, kernels: torch.dtype | None = None):
    """The model saved by :func:`save` (hardened QLinear layers), in eval mode. ``kernels``
    (a compute dtype): the layers the inference GEMMs take are built as
    :class:`cbq_ptq.serve.KernelLinear` straight from the file's packed words (no unpacked
    codes, no full-precision weight), on ``device``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from cbq_ptq.interop import read_any

    src = Path(path)
    meta, tensors = read_any(src)  # a cbq folder, or a compressed-tensors one (cbq_ptq.interop)
    settings = QuantSettings(**meta["settings"])
    config = AutoConfig.from_pretrained(src)
    if hasattr(config, "quantization_config"):  # built here from the tensors, not by transformers
        del config.quantization_config
    # Built on the meta device (no random initialisation, no memory), then filled from the
    # file: the peak host memory is the file's tensors, not a full-precision model.
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    for name, info in meta["layers"].items():
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        n, k = info["out_features"], info["in_features"]
        has_bias = f"{name}.bias" in tensors
        if kernels is not None and _kernel_layer(model, name, info, settings, tensors, kernels,
                                                 device):  # fmt: skip
            continue
        q = QLinear(torch.nn.Linear(k, n, bias=has_bias, device="meta"), settings, name=name,
                    lora=False, learn_clipping=False, train=False)  # fmt: skip
        q.gs = info["group_size"]
        q.codes = unpack(tensors.pop(f"{name}.packed"), storage_bits(info["bits"]),
                             k).to(torch.uint8)  # fmt: skip
        q.scales = tensors.pop(f"{name}.scales")
        q.zeros = tensors.pop(f"{name}.zeros")
        q.act_ratio = tensors.pop(f"{name}.act_ratio")
        q.bias = tensors.pop(f"{name}.bias", None)
        q.channel_factor = tensors.pop(f"{name}.channel_factor", None)
        q.channel_scales = tensors.pop(f"{name}.channel_scales", None)
        q.w_fp = q.w = torch.empty(0)  # the full-precision weights are not part of the artefact
        setattr(parent, leaf, q)
    missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    prefixes = tuple(f"{name}." for name in meta["layers"])
    missing = [m for m in missing if not m.startswith(prefixes)]
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()  # the LM head was stored once, as the embedding
        missing = [m for m in missing if m != "lm_head.weight"]
    if unexpected or missing:
        raise ValueError(f"{src}: unexpected tensors {unexpected[:5]}, missing {missing[:5]}")
    _materialize_buffers(model, config)
    if meta.get("rotation") is not None:
        rotation.reattach(model, rotation.RotationInfo.from_json(meta["rotation"]))
    model.eval()
    if device is not None:
        model.to(device)
    return model


def read_meta(src: Path) -> dict:
    """quant_config.json of a saved model, checked: format, versions and fields."""
    meta_path = src / "quant_config.json"
    if not src.is_dir():
        raise FileNotFoundError(f"{src} is not a folder (a folder written by cbq_ptq.save)")
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path} not found: not a folder written by cbq_ptq.save")
    try:
        meta = json.loads(meta_path.read_text())
    except ValueError as exc:
        raise ValueError(f"{meta_path}: not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{meta_path}: expected a JSON object, got {type(meta).__name__}")
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{meta_path}: format {meta.get('format')!r} version {meta.get('format_version')!r}"
            f", this cbq_ptq reads {FORMAT!r} version {FORMAT_VERSION}"
        )
    if meta.get("rotation") is not None:
        try:
            rotation.RotationInfo.from_json(meta["rotation"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{meta_path}: rotation: {exc}") from None
    if meta.get("pack_format_version") != PACK_FORMAT_VERSION:
        raise ValueError(f"{meta_path}: pack_format_version {meta.get('pack_format_version')!r}, "
                         f"this cbq_kernels packs version {PACK_FORMAT_VERSION}")  # fmt: skip
    for key in ("settings", "layers"):
        if not isinstance(meta.get(key), dict):
            raise ValueError(f"{meta_path}: field {key!r} missing or not an object")
    try:
        QuantSettings(**meta["settings"])
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{meta_path}: settings: {exc}") from None
    return meta


def safetensors_files(src: Path) -> list[Path]:
    """The safetensors files of a Hugging Face folder: those of
    model.safetensors.index.json, else every *.safetensors; a missing one is named."""
    index = src / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{index}: not a safetensors index ({exc})") from None
        files = [src / f for f in sorted(set(weight_map.values()))]
    else:
        files = sorted(src.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{src}: no .safetensors file")
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"{f} (named in {index.name}) not found")
    return files


def read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    """Every tensor of one safetensors file; a damaged file is one error naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(file)
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{file}: not a readable safetensors file ({exc})") from None


def _load_tensors(src: Path, meta: dict) -> dict[str, torch.Tensor]:
    """Every tensor file of quant_config.json (model.safetensors, and the block shards of a
    block-streamed run), each after its sha256 is checked against the recorded one."""
    files = meta.get("files") or {"model.safetensors": None}
    tensors: dict[str, torch.Tensor] = {}
    for name, recorded in files.items():
        file = src / name
        if not file.is_file():
            raise FileNotFoundError(f"{file} not found")
        if recorded is not None and sha256_file(file) != recorded:
            raise ValueError(f"{file}: sha256 differs from the one recorded in "
                             "quant_config.json at save time: the file is truncated or was "
                             "modified")  # fmt: skip
        tensors.update(read_safetensors(file))
    return tensors


def _check_layers(src: Path, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Every quantized layer's recorded bits, group size and shape against its tensors."""
    for name, info in meta["layers"].items():
        where = f"{src / 'quant_config.json'}: layer {name}"
        try:
            bits, gs = int(info["bits"]), info["group_size"]
            n, k = int(info["out_features"]), int(info["in_features"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{where}: field {exc} missing or not a number") from None
        if bits not in (2, 3, 4, 6, 8):
            raise ValueError(f"{where}: bits {bits} is not a stored width (2, 3, 4, 6, 8)")
        if gs is not None and (not isinstance(gs, int) or gs < 1):
            raise ValueError(f"{where}: group_size {gs!r} is neither null nor a positive int")
        groups = groups_per_row(k, gs)
        expect = {"packed": (n, packed_words(k, storage_bits(bits))), "scales": (n, groups),
                  "zeros": (n, groups)}  # fmt: skip
        if f"{name}.channel_scales" in tensors:
            expect["channel_scales"] = (n,)
        for part, shape in expect.items():
            key = f"{name}.{part}"
            if key not in tensors:
                raise ValueError(f"{where}: tensor {key} missing from model.safetensors")
            if tuple(tensors[key].shape) != shape:
                raise ValueError(
                    f"{where}: {part} has shape {tuple(tensors[key].shape)}, but bits={bits}, "
                    f"group_size={gs}, in_features={k}, out_features={n} give {shape}"
                )
