"""Export to and import from compressed-tensors (cbq_ptq.interop): transformers' load of the
export against cbq_ptq.load of the original, the words against ours, export -> import ->
export as a fixed point, and the errors."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch

from cbq_kernels.testing import TOLERANCES
from cbq_ptq.config import CBQConfig, parse_setting
from cbq_ptq.data import calibration_windows
from cbq_ptq.interop import export, is_compressed_tensors
from cbq_ptq.io import load, save
from cbq_ptq.models import SHARED_MODELS, load_model
from cbq_ptq.pipeline import quantize
from tests.conftest import need_shared

RTOL, ATOL = TOLERANCES[torch.float32]


def ids(vocab: int, n: int = 2, t: int = 32) -> torch.Tensor:
    tokens = torch.randint(3, vocab, (4096,), generator=torch.Generator().manual_seed(0))
    return calibration_windows(tokens, n, t, seed=1)


@pytest.fixture(scope="module")
def stories():
    need_shared(SHARED_MODELS / "stories260K" / "config.json")
    return load_model("stories260K")


@pytest.fixture(scope="module")
def smollm2_shaped():
    """SmolLM2-135M's widths (576 / 1536, 9 heads, 3 KV heads, tied embeddings) with random
    weights, 1 block and a 512-token vocabulary (the widths are what the groups see)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                         num_key_value_heads=3, num_hidden_layers=1, vocab_size=512,
                         tie_word_embeddings=True, max_position_embeddings=256)  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval(), None


def _quantized(model_tok, setting: str, tmp_path, symmetric: bool = True, **cfg):
    model, tok = model_tok
    x = ids(model.config.vocab_size)
    settings = parse_setting(setting, symmetric_weights=symmetric)
    config = CBQConfig(settings=settings, epochs=0, lora_rounding=False, cfp=False, **cfg)
    q, _ = quantize(copy.deepcopy(model), config, x, progress=False)
    path = save(q, tmp_path / "cbq", tok, base_model="test")
    return path, x


def _logits(model, x):
    with torch.no_grad():
        return model(x).logits


def _hf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


CASES = [("stories", "W4A16"), ("stories", "W3A16"), ("stories", "W2A16"),
         ("stories", "W8A16"), ("smollm2", "W4A16g64"), ("smollm2", "W3A16g64"),
         ("smollm2", "W2A16g64")]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize(("which", "setting"), CASES)
def test_transformers_loads_the_export_with_the_same_logits(which, setting, request, tmp_path):
    """Symmetric weight-only exports (pack-quantized): transformers' logits = cbq's, fp32."""
    model = request.getfixturevalue("stories" if which == "stories" else "smollm2_shaped")
    src, x = _quantized(model, setting, tmp_path)
    out = export(src, tmp_path / "ct", dtype="float32")
    assert is_compressed_tensors(out)
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qcfg["format"] == "pack-quantized" and qcfg["ignore"] == ["lm_head"]
    want = _logits(load(src), x)
    torch.testing.assert_close(_logits(_hf(out), x), want, rtol=RTOL, atol=ATOL * 10)
    # imported back into cbq: the same model, bit for bit
    assert torch.equal(_logits(load(out), x), want)


@pytest.mark.slow
@pytest.mark.parametrize("setting", ["W8A8", "W4A8"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_integer_activation_exports_load_in_transformers(stories, setting, symmetric, tmp_path):
    """int-quantized: transformers' decompressed weights equal cbq's exactly; its logits
    differ only by its activation grid (token max / 127.5 where cbq and vLLM use 127)."""
    from compressed_tensors.quantization.lifecycle.forward import dequantize

    src, x = _quantized(stories, setting, tmp_path, symmetric)
    out = export(src, tmp_path / "ct", dtype="float32")
    ours, hf = load(src), _hf(out)
    for name, q in ours.named_modules():
        if getattr(q, "codes", None) is not None:
            m = hf.get_submodule(name)  # int8 codes, dequantized by the format's own function
            weight = dequantize(m.weight, m.weight_scale, getattr(m, "weight_zero_point", None),
                                m.quantization_scheme.weights)  # fmt: skip
            torch.testing.assert_close(weight, q.dequantized(), rtol=RTOL, atol=ATOL)
    want, got = _logits(ours, x), _logits(hf, x)
    assert (got - want).abs().max() <= 0.05 * want.abs().max()
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9
    assert torch.equal(_logits(load(out), x), want)  # the import runs cbq's quantizer


@pytest.mark.slow
@pytest.mark.parametrize(("which", "setting"), [("stories", "W4A16"), ("smollm2", "W4A16g64"),
                                                ("smollm2", "W2A16g64")])  # fmt: skip
def test_asymmetric_exports_decompress_to_our_weights(which, setting, request, tmp_path):
    """Asymmetric pack-quantized (packed zero points): compressed-tensors' own decompressor
    reads our tensors back to cbq's dequantized weights, and cbq's import is exact.
    (transformers 5.24 with compressed-tensors 0.20.1 cannot load any asymmetric
    pack-quantized folder, compressed-tensors' own included: docs/DECISIONS.md.)"""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from safetensors.torch import load_file

    model = request.getfixturevalue("stories" if which == "stories" else "smollm2_shaped")
    src, x = _quantized(model, setting, tmp_path, symmetric=False)
    out = export(src, tmp_path / "ct", dtype="float32")
    group = json.loads((out / "config.json").read_text())["quantization_config"]
    scheme = QuantizationScheme.model_validate(group["config_groups"]["group_0"])
    assert scheme.weights.symmetric is False
    tensors = load_file(out / "model.safetensors")
    ours = load(src)
    checked = 0
    for name, q in ours.named_modules():
        if getattr(q, "codes", None) is None:
            continue
        local = {k[len(name) + 1 :]: v for k, v in tensors.items() if k.startswith(f"{name}.")}
        assert set(local) == {"weight_packed", "weight_scale", "weight_shape", "weight_zero_point"}
        weight = PackedQuantizationCompressor.decompress(local, scheme)["weight"]
        torch.testing.assert_close(weight, q.dequantized(), rtol=RTOL, atol=ATOL)
        checked += 1
    assert checked == len(json.loads((src / "quant_config.json").read_text())["layers"])
    assert torch.equal(_logits(load(out), x), _logits(ours, x))


@pytest.mark.slow
@pytest.mark.parametrize("setting", ["W4A16", "W2A16", "W8A16"])
def test_packed_words_are_ours_byte_for_byte(stories, setting, tmp_path):
    from safetensors.torch import load_file

    src, _ = _quantized(stories, setting, tmp_path)
    out = export(src, tmp_path / "ct")
    theirs, ours = load_file(out / "model.safetensors"), load_file(src / "model.safetensors")
    names = json.loads((src / "quant_config.json").read_text())["layers"]
    for name in names:
        a, b = theirs[f"{name}.weight_packed"], ours[f"{name}.packed"]
        assert a.dtype == b.dtype == torch.int32 and a.numpy().tobytes() == b.numpy().tobytes()


@pytest.mark.slow
@pytest.mark.parametrize(("setting", "symmetric"), [("W4A16", False), ("W3A16", True),
                                                    ("W8A8", False)])  # fmt: skip
def test_export_import_export_is_a_fixed_point(stories, setting, symmetric, tmp_path):
    src, _ = _quantized(stories, setting, tmp_path, symmetric)
    first = export(src, tmp_path / "a")
    second = export(first, tmp_path / "b")
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in second.iterdir())
    assert "tokenizer.json" in names
    for n in names:
        assert (first / n).read_bytes() == (second / n).read_bytes(), n


@pytest.fixture(scope="module")
def exported(stories, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("exported")
    src, _ = _quantized(stories, "W4A16", tmp, symmetric=False)
    return export(src, tmp / "ct")


def _copy(exported, tmp_path):
    dst = tmp_path / "ct"
    shutil.copytree(exported, dst)
    return dst


def _edit_config(path, fn):
    cfg = json.loads((path / "config.json").read_text())
    fn(cfg["quantization_config"])
    (path / "config.json").write_text(json.dumps(cfg))


def test_a_truncated_shard_is_named(exported, tmp_path):
    dst = _copy(exported, tmp_path)
    data = (dst / "model.safetensors").read_bytes()
    (dst / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors: not a readable safetensors"):
        load(dst)


def test_an_unknown_scheme_is_named(exported, tmp_path):
    dst = _copy(exported, tmp_path)
    _edit_config(dst, lambda q: q.update(format="nvfp4-pack-quantized"))
    with pytest.raises(ValueError, match="format 'nvfp4-pack-quantized'"):
        load(dst)
    dst2 = _copy(exported, tmp_path / "2")
    _edit_config(dst2, lambda q: q["config_groups"]["group_0"]["weights"].update(type="float"))
    with pytest.raises(ValueError, match="weights float 4-bit"):
        load(dst2)


def test_a_missing_tensor_is_named(exported, tmp_path):
    from safetensors.torch import load_file, save_file

    dst = _copy(exported, tmp_path)
    tensors = load_file(dst / "model.safetensors")
    del tensors["model.layers.0.mlp.down_proj.weight_zero_point"]
    save_file(tensors, dst / "model.safetensors")
    with pytest.raises(ValueError, match=r"down_proj\.weight_zero_point missing"):
        load(dst)


def test_what_the_format_cannot_express_is_refused(stories, tmp_path):
    # CrossQuant's channel factors
    model, tok = stories
    x = ids(model.config.vocab_size)
    settings = parse_setting("W4A8", act_quantizer="crossquant")
    q, _ = quantize(copy.deepcopy(model), CBQConfig(settings=settings, epochs=0,
                    lora_rounding=False), x, progress=False)  # fmt: skip
    path = save(q, tmp_path / "cq", tok)
    with pytest.raises(ValueError, match="CrossQuant"):
        export(path, tmp_path / "out")
    # a learned activation clipping ratio, unless dropped on request
    src, _ = _quantized(stories, "W8A8", tmp_path / "clip")
    meta = json.loads((src / "quant_config.json").read_text())
    from safetensors.torch import load_file, save_file

    from cbq_ptq.models import sha256_file

    tensors = load_file(src / "model.safetensors")
    name = next(iter(meta["layers"]))
    tensors[f"{name}.act_ratio"] = torch.tensor([0.9])
    save_file(tensors, src / "model.safetensors")
    meta["files"]["model.safetensors"] = sha256_file(src / "model.safetensors")
    (src / "quant_config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"clips its activations at 0\.9000"):
        export(src, tmp_path / "out2")
    assert is_compressed_tensors(export(src, tmp_path / "out3", drop_activation_clipping=True))


def test_ragged_groups_are_refused(stories, tmp_path):
    """stories260K's FFN width 172 is not a multiple of 32."""
    model, tok = stories
    settings = parse_setting("W4A16g32", ragged_groups=True)
    q, _ = quantize(copy.deepcopy(model), CBQConfig(settings=settings, epochs=0,
                    lora_rounding=False, cfp=False), ids(512), progress=False)  # fmt: skip
    path = save(q, tmp_path / "r", tok)
    with pytest.raises(ValueError, match="group_size 32 does not divide in_features 172"):
        export(path, tmp_path / "out")


@pytest.mark.slow
def test_cli_quantize_export_eval(stories, tmp_path, capsys):
    """`cbq quantize --symmetric-weights`, `cbq export`, then `cbq eval` of the export gives
    the perplexity of the original (the import is exact); bad arguments are one line."""
    from cbq_ptq.cli import main

    run = tmp_path / "run"
    assert main(["quantize", "--model", "stories260K", "--setting", "W4A16",
                 "--symmetric-weights", "--method", "rtn", "--corpus", "tinystories",
                 "--n-calib", "2", "--calib-len", "32", "--eval-windows", "2", "--also", "",
                 "--out", str(run), "--device", "cpu"]) == 0  # fmt: skip
    meta = json.loads((run / "model" / "quant_config.json").read_text())
    assert meta["settings"]["symmetric_weights"] is True
    assert main(["export", str(run / "model"), str(tmp_path / "ct")]) == 0
    assert "wrote" in capsys.readouterr().out
    ppls = []
    for model in (run / "model", tmp_path / "ct"):
        assert main(["eval", str(model), "--eval-windows", "2", "--device", "cpu",
                     "--also", ""]) == 0  # fmt: skip
        line = capsys.readouterr().out.strip().splitlines()[-1]
        assert "on tinystories" in line  # the corpus recorded at quantization travels along
        ppls.append(float(line.split("perplexity ")[1].split()[0]))
    assert ppls[0] == ppls[1]
    assert main(["generate", str(tmp_path / "ct"), "--prompt", "Once upon a time",
                 "--max-new-tokens", "4", "--device", "cpu"]) == 0  # fmt: skip
    assert capsys.readouterr().out.startswith("Once upon a time")
    assert main(["export", str(tmp_path / "nothing"), str(tmp_path / "o")]) == 2
    assert "not a folder written by cbq quantize" in capsys.readouterr().err
    assert main(["export", str(run / "model"), str(run / "model")]) == 2
    assert "the same folder" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["W4A16", "W8A8"])
def test_a_folder_written_by_compressed_tensors_itself_runs_in_cbq(stories, scheme, tmp_path):
    """Another producer of the same schemes: compressed-tensors' own ModelCompressor (what
    llm-compressor calls) quantizes stories260K per channel; cbq_ptq.load of its folder
    gives transformers' logits (W4A16) / the same dequantized weights (W8A8)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        apply_quantization_config,
    )

    model, tok = copy.deepcopy(stories[0]), stories[1]
    bits = int(scheme[1])
    acts = None if scheme.endswith("A16") else QuantizationArgs(
        num_bits=8, type="int", strategy="token", dynamic=True, symmetric=True)  # fmt: skip
    qscheme = QuantizationScheme(targets=["Linear"], input_activations=acts,
                                 weights=QuantizationArgs(num_bits=bits, type="int",
                                                          symmetric=True, strategy="channel"))
    apply_quantization_config(model, QuantizationConfig(
        config_groups={"group_0": qscheme}, ignore=["lm_head"],
        quantization_status="frozen"))  # fmt: skip
    qmax = (1 << (bits - 1)) - 1
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "weight_scale"):
                m.weight_scale.copy_(m.weight.abs().amax(1, keepdim=True) / qmax)
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    model.save_pretrained(tmp_path / "ct")
    compressor.update_config(tmp_path / "ct")
    tok.save_pretrained(tmp_path / "ct")
    assert is_compressed_tensors(tmp_path / "ct")
    ours, hf = load(tmp_path / "ct"), _hf(tmp_path / "ct")
    x = ids(512)
    if scheme == "W4A16":
        torch.testing.assert_close(_logits(ours, x), _logits(hf, x), rtol=RTOL, atol=ATOL * 10)
    from compressed_tensors.quantization.lifecycle.forward import dequantize

    for name, q in ours.named_modules():
        if getattr(q, "codes", None) is not None and scheme == "W8A8":
            m = hf.get_submodule(name)
            want = dequantize(m.weight, m.weight_scale, None, m.quantization_scheme.weights)
            torch.testing.assert_close(q.dequantized(), want, rtol=RTOL, atol=ATOL)


@pytest.mark.slow
def test_sharded_exports_are_read_back(stories, tmp_path):
    """max_shard_size small enough to split the model: an index and several shards, which
    transformers and cbq read back to the same logits."""
    from cbq_ptq.interop import export as export_

    src, x = _quantized(stories, "W4A16", tmp_path)
    out = export_(src, tmp_path / "ct", dtype="float32", max_shard_size="100KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    want = _logits(load(src), x)
    torch.testing.assert_close(_logits(_hf(out), x), want, rtol=RTOL, atol=ATOL * 10)
    assert torch.equal(_logits(load(out), x), want)
    (out / sorted(set(index["weight_map"].values()))[0]).unlink()
    with pytest.raises(FileNotFoundError, match=r"named in model\.safetensors\.index\.json"):
        load(out)
