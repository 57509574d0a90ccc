"""Export to, and import from, the compressed-tensors format (the Hugging Face folder that
llm-compressor writes and that transformers, with the ``compressed-tensors`` package, and vLLM
load).

The mapping (compressed-tensors 0.20; one ``config_group`` per distinct scheme, targets
``["Linear"]`` when one scheme covers every quantized layer, else the layers' names; every
other ``nn.Linear`` in ``ignore``):

* weight-only settings (``W{2,3,4,6,8}A16``, per channel or per group): format
  ``pack-quantized``; per layer ``weight_packed`` (int32), ``weight_scale`` (N, G),
  ``weight_shape`` ([N, K]) and, when the weights are asymmetric, ``weight_zero_point``;
* integer activations (``W{b}A{4,6,8}``, per-token activations): format ``int-quantized``
  (the format compressed-tensors and vLLM read activation-quantized integer weights from);
  ``weight`` holds the signed codes in int8, ``input_activations`` is a dynamic, symmetric,
  per-token integer quantizer.

Codes: cbq stores unsigned codes ``q`` in ``0 .. 2^b - 1``, compressed-tensors signed ones
``q - 2^(b-1)``; zero points likewise (``z - 2^(b-1)``, packed along the output dimension).
Packed words: compressed-tensors 0.20 packs 32 codes into ``b`` words, code ``i`` at bits
``i*b``; for ``b`` in {2, 4, 8} that is cbq's layout word for word (the words are copied and
the tests check the bytes), 3- and 6-bit codes (cbq: 4- and 8-bit containers) are repacked.
Scales are written in the model's dtype (what llm-compressor writes and vLLM reads): in bf16
that rounds cbq's fp32 scales (relative 2^-9); fp32 exports are exact.

What the format cannot express, the export refuses with one error naming it: CrossQuant's
channel factors, the online Hadamard rotation of down_proj (compressed-tensors' transforms
build their own Hadamard matrices, not ours), and a learned activation clipping ratio (the
format's dynamic quantizer takes the token's maximum; ``drop_activation_clipping=True``
exports without it). Folded pieces (CFP factors, offline rotations) are in the weights and
need nothing. Activation grids differ by design: vLLM's int8 kernels divide the token maximum
by 127, as cbq does; compressed-tensors' own fake-quantized forward in transformers divides by
127.5 (``calculate_qparams``), so transformers' logits of an A8 export differ from cbq's at
rounding boundaries.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import torch

from cbq_kernels.formats import groups_per_row
from cbq_kernels.packing import pack, unpack  # the compiled ops (cbq::pack / cbq::unpack)
from cbq_ptq.config import QuantSettings
from cbq_ptq.io import read_safetensors, safetensors_files, storage_bits

FORMATS = ("compressed-tensors",)
CT_METHOD = "compressed-tensors"
PACKED, INT = "pack-quantized", "int-quantized"
_OURS = ("model.safetensors", "quant_config.json", "config.json", "model.safetensors.index.json")
_SHARD = "5GB"


def _ct():
    """The compressed-tensors package, or one clear error."""
    try:
        import compressed_tensors
    except ImportError:
        raise ImportError(
            "the compressed-tensors format needs the compressed-tensors package: "
            "pip install compressed-tensors"
        ) from None
    return compressed_tensors


def is_compressed_tensors(path: str | Path) -> bool:
    """True for a folder whose config.json declares compressed-tensors quantization (and that
    is not a cbq folder)."""
    src = Path(path)
    cfg = src / "config.json"
    if not cfg.is_file() or (src / "quant_config.json").is_file():
        return False
    try:
        q = json.loads(cfg.read_text()).get("quantization_config")
    except (ValueError, AttributeError):
        return False
    return isinstance(q, dict) and q.get("quant_method") == CT_METHOD


# --------------------------------------------------------------------------------- export


def _offset(bits: int) -> int:
    return 1 << (bits - 1)


def _integer_zeros(name: str, zeros: torch.Tensor, bits: int) -> torch.Tensor:
    """cbq's fp32 zero points as int32, checked: integers in the code range."""
    z = zeros.round()
    if not torch.equal(z, zeros) or z.min() < 0 or z.max() > (1 << bits) - 1:
        raise ValueError(
            f"layer {name}: zero points must be integers in 0..{(1 << bits) - 1} for "
            f"compressed-tensors (found {zeros.min().item():g}..{zeros.max().item():g})"
        )
    return z.to(torch.int32)


def _expressible(meta: dict, settings: QuantSettings, tensors: dict, drop_clip: bool) -> None:
    """Refuse, with the reason, what compressed-tensors cannot carry."""
    rot = meta.get("rotation")
    if rot and rot.get("online_down"):
        raise ValueError(
            "the model has an online Hadamard rotation on down_proj's input (cbq quantize "
            "--rotate); compressed-tensors' transforms cannot carry cbq's rotation matrix: "
            "quantize with --rotate none to export"
        )
    for name, info in meta["layers"].items():
        gs = info["group_size"]
        if gs is not None and int(info["in_features"]) % gs:
            raise ValueError(
                f"layer {name}: group_size {gs} does not divide in_features "
                f"{info['in_features']} (a ragged last group); compressed-tensors' groups "
                "must divide the row: quantize with a group size that divides every layer"
            )
        if f"{name}.channel_factor" in tensors:
            raise ValueError(
                f"layer {name} quantizes its activations with CrossQuant (channel factors), "
                "which compressed-tensors cannot express: quantize with --act-quantizer "
                "per_token to export"
            )
        ratio = tensors.get(f"{name}.act_ratio")
        if settings.a_bits < 16 and ratio is not None and float(ratio.reshape(-1)[0]) != 1.0:
            if not drop_clip:
                raise ValueError(
                    f"layer {name} clips its activations at {float(ratio.reshape(-1)[0]):.4f} "
                    "of the token maximum (learned); compressed-tensors' dynamic per-token "
                    "quantizer cannot express it: export with --drop-activation-clipping "
                    "(drop_activation_clipping=True) and measure the export with cbq eval"
                )


@dataclasses.dataclass(frozen=True)
class _Scheme:
    bits: int
    group_size: int | None
    symmetric: bool
    a_bits: int

    def to_ct(self, targets: list[str]):
        from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

        weights = QuantizationArgs(
            num_bits=self.bits, type="int", symmetric=self.symmetric,
            strategy="group" if self.group_size else "channel", group_size=self.group_size,
        )  # fmt: skip
        acts = None
        if self.a_bits < 16:
            acts = QuantizationArgs(num_bits=self.a_bits, type="int", symmetric=True,
                                    strategy="token", dynamic=True)  # fmt: skip
        return QuantizationScheme(targets=targets, weights=weights, input_activations=acts)


def _layer_tensors(name: str, info: dict, tensors: dict, scheme: _Scheme,
                   dtype: torch.dtype) -> dict[str, torch.Tensor]:  # fmt: skip
    """The compressed-tensors tensors of one quantized layer."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    bits, n, k = scheme.bits, int(info["out_features"]), int(info["in_features"])
    packed = tensors[f"{name}.packed"]
    zeros = _integer_zeros(name, tensors[f"{name}.zeros"], bits)
    off = _offset(bits)
    if scheme.symmetric and not bool((zeros == off).all()):
        raise ValueError(f"layer {name}: symmetric settings but zero points differ from {off}")
    out: dict[str, torch.Tensor] = {}
    if scheme.a_bits >= 16 and storage_bits(bits) == bits and 32 % bits == 0:
        out["weight_packed"] = packed.contiguous()  # the same words (module docstring)
    else:
        signed = (unpack(packed, storage_bits(bits), k).to(torch.int32) - off).to(torch.int8)
        if scheme.a_bits >= 16:
            out["weight_packed"] = pack_to_int32(signed, bits)
        else:
            out["weight"] = signed
    if scheme.a_bits >= 16:
        out["weight_shape"] = torch.tensor([n, k], dtype=torch.int64)
    out["weight_scale"] = tensors[f"{name}.scales"].to(dtype).contiguous()
    if not scheme.symmetric:
        zp = (zeros - off).to(torch.int8)
        out["weight_zero_point"] = pack_to_int32(zp, bits, packed_dim=0) if scheme.a_bits >= 16 \
            else zp.contiguous()  # fmt: skip
    if f"{name}.bias" in tensors:
        out["bias"] = tensors[f"{name}.bias"].to(dtype)
    return {f"{name}.{key}": value for key, value in out.items()}


def _linear_names(config) -> list[str]:
    """Every nn.Linear of the model the config describes (built on the meta device)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def _write_shards(tensors: dict[str, torch.Tensor], out: Path, max_shard_size: str) -> None:
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    split = split_torch_state_dict_into_shards(tensors, max_shard_size=max_shard_size)
    for filename, names in split.filename_to_tensors.items():
        save_file({n: tensors[n].contiguous() for n in names}, out / filename,
                  metadata={"format": "pt"})  # fmt: skip
        (out / filename).chmod(0o644)
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _model_dtype(config, dtype: torch.dtype | str | None) -> torch.dtype:
    if dtype is None:
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        dtype = dtype or torch.bfloat16
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        dtype = _DTYPES[dtype]
    if dtype not in _DTYPES.values():
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    return dtype


def export(src: str | Path, out: str | Path, fmt: str = "compressed-tensors",
           dtype: torch.dtype | str | None = None, drop_activation_clipping: bool = False,
           max_shard_size: str = _SHARD) -> Path:  # fmt: skip
    """Write the quantized model in folder ``src`` (written by ``cbq quantize`` / cbq_ptq.save,
    or a compressed-tensors folder) to ``out`` in ``fmt``: config.json with its
    ``quantization_config``, safetensors shards, tokenizer files. ``dtype``: of the
    unquantized tensors and the scales (default: the config's, bf16 when it has none)."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    ct = _ct()
    from compressed_tensors.quantization import QuantizationConfig
    from transformers import AutoConfig

    src, out = Path(src), Path(out)
    meta, tensors = read_any(src)
    settings = QuantSettings(**meta["settings"])
    _expressible(meta, settings, tensors, drop_activation_clipping)
    config = AutoConfig.from_pretrained(src)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    dtype = _model_dtype(config, dtype)
    if out.resolve() == src.resolve():
        raise ValueError(f"{out}: export into the folder it reads from")
    written: dict[str, torch.Tensor] = {}
    groups: dict[_Scheme, list[str]] = {}
    for name, info in meta["layers"].items():
        bits = int(info["bits"])
        scheme = _Scheme(bits, info["group_size"], settings.symmetric_weights, settings.a_bits)
        groups.setdefault(scheme, []).append(name)
        written.update(_layer_tensors(name, info, tensors, scheme, dtype))
    prefixes = tuple(f"{name}." for name in meta["layers"])
    for key, value in tensors.items():
        if not key.startswith(prefixes):
            written[key] = value.to(dtype) if value.is_floating_point() else value
    formats = {PACKED if s.a_bits >= 16 else INT for s in groups}
    if len(formats) > 1:
        raise ValueError("layers with and without quantized activations in one model: "
                         "compressed-tensors writes one format per model")  # fmt: skip
    one = len(groups) == 1
    qconfig = QuantizationConfig(
        config_groups={f"group_{i}": s.to_ct(["Linear"] if one else names)
                       for i, (s, names) in enumerate(groups.items())},
        format=formats.pop(), quantization_status="compressed",
        ignore=[n for n in _linear_names(config) if n not in meta["layers"]],
    ).to_dict()  # fmt: skip
    qconfig["version"] = ct.__version__
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("model*.safetensors*"):
        stale.unlink()
    _write_shards(written, out, max_shard_size)
    config.dtype = dtype
    config.save_pretrained(out)
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"] = qconfig
    # provenance, read back by the import (transformers keeps unknown config keys)
    cfg["cbq_source"] = {"base_model": meta.get("base_model"), "corpus": meta.get("corpus"),
                         "setting": settings.name}  # fmt: skip
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    for extra in sorted(src.iterdir()):  # tokenizer and generation files
        if extra.is_file() and extra.name not in _OURS and not extra.name.endswith(".safetensors"):
            shutil.copy2(extra, out / extra.name)
    return out


# --------------------------------------------------------------------------------- import


def _read_tensors(src: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for f in safetensors_files(src):
        tensors.update(read_safetensors(f))
    return tensors


def _ct_scheme(qcfg: dict, where: str) -> tuple[dict, dict | None, str]:
    """(weights, input_activations, format) of the one scheme of a compressed-tensors
    config, checked against what cbq runs."""
    fmt = qcfg.get("format")
    groups = qcfg.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise ValueError(f"{where}: quantization_config has no config_groups")
    schemes = []
    for gname, group in groups.items():
        if not isinstance(group, dict) or not isinstance(group.get("weights"), dict):
            raise ValueError(f"{where}: config group {gname!r} has no weights scheme")
        if group.get("output_activations"):
            raise ValueError(f"{where}: config group {gname!r} quantizes output activations, "
                             "which cbq does not run")  # fmt: skip
        g_fmt = group.get("format") or fmt
        key = (json.dumps(group["weights"], sort_keys=True),
               json.dumps(group.get("input_activations"), sort_keys=True), g_fmt)  # fmt: skip
        schemes.append(key)
    if len(set(schemes)) > 1:
        raise ValueError(f"{where}: {len(set(schemes))} different schemes in config_groups; "
                         "cbq imports models with one scheme")  # fmt: skip
    w, a, g_fmt = (json.loads(schemes[0][0]), json.loads(schemes[0][1]), schemes[0][2])
    if g_fmt not in (PACKED, INT):
        raise ValueError(f"{where}: format {g_fmt!r}; cbq imports {PACKED!r} and {INT!r}")
    if w.get("type", "int") != "int" or w.get("num_bits") not in (2, 3, 4, 6, 8):
        raise ValueError(f"{where}: weights {w.get('type')} {w.get('num_bits')}-bit; cbq "
                         "imports integer weights of 2, 3, 4, 6 or 8 bits")  # fmt: skip
    if w.get("strategy") not in ("channel", "group") or w.get("dynamic"):
        raise ValueError(f"{where}: weight strategy {w.get('strategy')!r}; cbq imports "
                         "static 'channel' and 'group' weights")  # fmt: skip
    if w.get("actorder") == "group":
        raise ValueError(f"{where}: activation-ordered groups (actorder 'group', weight_g_idx) "
                         "are not cbq's contiguous groups")  # fmt: skip
    if a is not None and (a.get("type", "int") != "int" or a.get("strategy") != "token"
                          or not a.get("dynamic") or not a.get("symmetric", True)
                          or a.get("num_bits") not in (4, 6, 8)):  # fmt: skip
        raise ValueError(f"{where}: input activations {a}; cbq runs dynamic symmetric "
                         "per-token integer activations of 4, 6 or 8 bits")  # fmt: skip
    return w, a, g_fmt


def read_config(src: str | Path) -> tuple[dict, dict, dict | None, str]:
    """(config.json, weights scheme, input-activations scheme, format) of a
    compressed-tensors folder, the scheme checked against what cbq imports: a read of the
    config alone (the CLI's check before anything is loaded)."""
    src = Path(src)
    cfg = json.loads((src / "config.json").read_text())
    w, a, fmt = _ct_scheme(cfg["quantization_config"], str(src / "config.json"))
    return cfg, w, a, fmt


def provenance(cfg: dict) -> dict:
    """base_model and corpus recorded by the export (config.json's cbq_source), else None."""
    source = cfg.get("cbq_source") if isinstance(cfg.get("cbq_source"), dict) else {}
    return {"base_model": source.get("base_model"), "corpus": source.get("corpus")}


def read_compressed_tensors(src: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """A compressed-tensors folder as cbq's (meta, tensors): the meta of quant_config.json
    and the tensors of model.safetensors (cbq_ptq.io), so that io.load builds it like a
    folder cbq wrote."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    _ct()
    src = Path(src)
    where = str(src / "config.json")
    cfg, w, a, fmt = read_config(src)
    bits, gs, sym = int(w["num_bits"]), w.get("group_size"), bool(w.get("symmetric", True))
    if w["strategy"] == "group" and (not isinstance(gs, int) or gs < 1):
        raise ValueError(f"{where}: group strategy with group_size {gs!r}")
    gs = gs if w["strategy"] == "group" else None
    a_bits = int(a["num_bits"]) if a is not None else 16
    raw = _read_tensors(src)
    store = "weight_packed" if fmt == PACKED else "weight"
    names = sorted(k[: -len(".weight_scale")] for k in raw if k.endswith(".weight_scale"))
    if not names:
        raise ValueError(f"{src}: no tensor named *.weight_scale: no quantized layer")
    off, layers, tensors = _offset(bits), {}, {}
    for name in names:

        def take(part: str, name: str = name) -> torch.Tensor:
            key = f"{name}.{part}"
            if key not in raw:
                raise ValueError(f"{src}: tensor {key} missing")
            return raw.pop(key)

        scale = take("weight_scale").float()
        if fmt == PACKED:
            shape = [int(v) for v in take("weight_shape").reshape(-1).tolist()]
            n, k = shape
            words = take(store)
            want = (n, math.ceil(k * bits / 32))
            if words.dtype != torch.int32 or tuple(words.shape) != want:
                raise ValueError(f"{src}: {name}.{store} is {words.dtype} "
                                 f"{tuple(words.shape)}, {bits}-bit codes of shape {shape} "
                                 f"need int32 {want}")  # fmt: skip
            signed = unpack_from_int32(words, bits, torch.Size([n, k]))
        else:
            signed = take(store)
            if signed.dtype != torch.int8 or signed.dim() != 2:
                raise ValueError(f"{src}: {name}.{store} is {signed.dtype} "
                                 f"{tuple(signed.shape)}, expected 2-d int8 codes")  # fmt: skip
            n, k = signed.shape
        groups = groups_per_row(k, gs)
        if tuple(scale.shape) != (n, groups):
            raise ValueError(f"{src}: {name}.weight_scale has shape {tuple(scale.shape)}, "
                             f"expected {(n, groups)}")  # fmt: skip
        codes = signed.to(torch.int32) + off
        if codes.min() < 0 or codes.max() > (1 << bits) - 1:
            raise ValueError(f"{src}: {name}: codes outside the {bits}-bit range")
        if sym:
            zeros = torch.full((n, groups), float(off))
        else:
            zp = take("weight_zero_point")
            if fmt == PACKED:
                zp = unpack_from_int32(zp, bits, torch.Size([n, groups]), packed_dim=0)
            if tuple(zp.shape) != (n, groups):
                raise ValueError(f"{src}: {name}.weight_zero_point has shape "
                                 f"{tuple(zp.shape)}, expected {(n, groups)}")  # fmt: skip
            zeros = zp.float() + off
        tensors[f"{name}.packed"] = pack(codes.to(torch.uint8), storage_bits(bits))
        tensors[f"{name}.scales"], tensors[f"{name}.zeros"] = scale.contiguous(), zeros
        tensors[f"{name}.act_ratio"] = torch.ones(1)
        if f"{name}.bias" in raw:
            tensors[f"{name}.bias"] = raw.pop(f"{name}.bias").float()
        strays = [key for key in raw if key.startswith(f"{name}.weight_")]
        if strays:
            raise ValueError(f"{src}: tensor {strays[0]} is not part of the {fmt} scheme cbq "
                             "reads")  # fmt: skip
        layers[name] = {"bits": bits, "group_size": gs, "in_features": k, "out_features": n}
    tensors.update(raw)
    ragged = gs is not None and any(info["in_features"] % gs for info in layers.values())
    settings = QuantSettings(w_bits=bits, group_size=gs, a_bits=a_bits, symmetric_weights=sym,
                             ragged_groups=ragged)  # fmt: skip
    from cbq_ptq.io import FORMAT, FORMAT_VERSION, PACK_FORMAT_VERSION

    meta = {"format": FORMAT, "format_version": FORMAT_VERSION,
            "pack_format_version": PACK_FORMAT_VERSION, "source": CT_METHOD,
            **provenance(cfg),
            "settings": dataclasses.asdict(settings), "layers": layers, "files": {}}  # fmt: skip
    return meta, tensors


def read_any(src: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(meta, tensors) of a cbq folder or a compressed-tensors folder, verified."""
    from cbq_ptq import io

    if is_compressed_tensors(src):
        meta, tensors = read_compressed_tensors(src)
    else:
        meta = io.read_meta(src)
        tensors = io._load_tensors(src, meta)
    io._check_layers(src, meta, tensors)
    return meta, tensors
