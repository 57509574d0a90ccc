"""Block-streamed quantization (cbq_ptq.blockstream + io.ShardWriter) on stories260K: the
same artefact as the in-memory run, written block by block, with only the current window's
blocks holding weights; an interrupted streamed run resumes to the same artefact."""

from __future__ import annotations

import json

import pytest
import torch

from cbq_ptq.blockstream import load_streamed
from cbq_ptq.config import CBQConfig, parse_setting
from cbq_ptq.data import calibration_windows
from cbq_ptq.io import ShardWriter, load, save
from cbq_ptq.models import SHARED_MODELS, load_model
from cbq_ptq.pipeline import quantize
from tests.conftest import need_shared


def _config() -> CBQConfig:
    settings = parse_setting("W4A8", ragged_groups=True, act_quantizer="per_token")
    return CBQConfig(settings=settings, steps=3, batch_size=2, window=2, overlap=1, seed=1)


def _ids() -> torch.Tensor:
    tokens = torch.randint(3, 512, (4096,), generator=torch.Generator().manual_seed(0))
    return calibration_windows(tokens, 4, 32, seed=1)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    need_shared(SHARED_MODELS / "stories260K" / "config.json")
    model, tok = load_model("stories260K")
    q, log = quantize(model, _config(), _ids(), progress=False)
    out = save(q, tmp_path_factory.mktemp("ref") / "model", tok)
    return out, log


def _tensors(folder):
    meta = json.loads((folder / "quant_config.json").read_text())
    from safetensors.torch import load_file

    t = {}
    for f in meta["files"]:
        t.update(load_file(folder / f))
    return meta, t


@pytest.mark.slow
def test_streamed_run_writes_the_artefact_of_the_in_memory_run(reference, tmp_path):
    ref_dir, ref_log = reference
    model, tok = load_streamed("stories260K", dtype=torch.float32, device="cpu")
    blocks = model.model.layers
    assert all(p.is_meta for b in blocks for p in b.parameters())  # nothing read yet
    writer = ShardWriter(tmp_path / "model")
    q, log = quantize(model, _config(), _ids(), progress=False, writer=writer)
    out = writer.finish(q, tok)
    # each window ends with its open blocks only (window size 2, overlap 1: one carried)
    assert [e["blocks_resident"] for e in log] == [1, 1, 1, 0]
    assert all(p.is_meta for b in blocks for p in b.parameters())
    meta, got = _tensors(out)
    ref_meta, want = _tensors(ref_dir)
    assert sorted(meta["files"]) == [f"block-{j:05d}.safetensors" for j in range(5)] + [
        "model.safetensors"]  # fmt: skip
    assert meta["layers"] == ref_meta["layers"] and meta["settings"] == ref_meta["settings"]
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    x = _ids()[:2]
    with torch.no_grad():
        assert torch.equal(load(out)(x).logits, load(ref_dir)(x).logits)
    assert [e["loss_after"] for e in log] == [e["loss_after"] for e in ref_log]


@pytest.mark.slow
def test_interrupted_streamed_run_resumes(reference, tmp_path, monkeypatch):
    import cbq_ptq.pipeline as pipeline

    ref_dir, _ = reference
    calls = {"n": 0}
    real = pipeline.train_window

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "train_window", flaky)
    model, tok = load_streamed("stories260K", dtype=torch.float32, device="cpu")
    with pytest.raises(KeyboardInterrupt):
        quantize(model, _config(), _ids(), progress=False, checkpoint_dir=tmp_path / "ckpt",
                 writer=ShardWriter(tmp_path / "model"))  # fmt: skip
    monkeypatch.setattr(pipeline, "train_window", real)
    model, tok = load_streamed("stories260K", dtype=torch.float32, device="cpu")
    writer = ShardWriter(tmp_path / "model")
    q, _ = quantize(model, _config(), _ids(), progress=False, checkpoint_dir=tmp_path / "ckpt",
                    writer=writer)  # fmt: skip
    out = writer.finish(q, tok)
    _, got = _tensors(out)
    _, want = _tensors(ref_dir)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_streaming_refuses_rotation():
    need_shared(SHARED_MODELS / "stories260K" / "config.json")
    model, _ = load_streamed("stories260K", dtype=torch.float32, device="cpu")
    import dataclasses

    config = dataclasses.replace(_config(), rotate="hadamard")
    with pytest.raises(ValueError, match="without rotation"):
        quantize(model, config, _ids(), progress=False)


@pytest.mark.slow
def test_cli_stream_gives_the_model_of_the_in_memory_run(tmp_path, capsys):
    from cbq_ptq.cli import main

    need_shared(SHARED_MODELS / "stories260K" / "config.json")
    common = ["quantize", "--model", "stories260K", "--setting", "W4A16", "--corpus",
              "tinystories", "--n-calib", "4", "--calib-len", "32", "--steps", "2",
              "--batch-size", "2", "--eval-windows", "1", "--also", "",
              "--device", "cpu"]  # fmt: skip
    ppl = []
    for extra, name in (([], "a"), (["--stream"], "b")):
        assert main([*common, *extra, "--out", str(tmp_path / name)]) == 0
        line = [x for x in capsys.readouterr().out.splitlines() if "(CBQ): perplexity" in x]
        ppl.append(line[-1].split("perplexity ")[1].split()[0])
    assert ppl[0] == ppl[1]
    meta = json.loads((tmp_path / "b" / "model" / "quant_config.json").read_text())
    assert len(meta["files"]) == 6  # five block shards and the rest
    assert main([*common, "--stream", "--rotate", "random", "--out", str(tmp_path / "c")]) == 2
    assert "not rotated" in capsys.readouterr().err
