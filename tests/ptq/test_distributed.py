"""Data-parallel calibration (cbq_ptq.distributed) on the CPU: two processes (gloo) on
stories260K give the hardened codes of one process with the same global batches and seed, up
to the order of floating-point reductions (the test states how many codes differ)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cbq_ptq import distributed
from cbq_ptq.config import CBQConfig, parse_setting
from cbq_ptq.data import calibration_windows
from cbq_ptq.models import SHARED_MODELS, load_model
from cbq_ptq.pipeline import quantize
from cbq_ptq.qlinear import QLinear
from tests.conftest import need_shared


def _config() -> CBQConfig:
    # W4A8 per token: CFP maxima, GPTQ second moments, activation clipping and LoRA-Rounding
    # all pass through a reduction
    settings = parse_setting("W4A8", ragged_groups=True, act_quantizer="per_token")
    return CBQConfig(settings=settings, steps=6, batch_size=4, window=2, overlap=1, seed=3)


def _ids() -> torch.Tensor:
    tokens = torch.randint(3, 512, (8192,), generator=torch.Generator().manual_seed(0))
    return calibration_windows(tokens, 12, 32, seed=1)


def _codes(model) -> dict[str, torch.Tensor]:
    return {n: m.codes.clone() for n, m in model.named_modules() if isinstance(m, QLinear)}


def _worker(rank: int, world: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        model, _ = load_model("stories260K")
        q, log = quantize(model, _config(), _ids(), progress=False)
        torch.save({"codes": _codes(q), "log": log, "rank": rank}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_single_process_helpers_are_identities():
    assert distributed.world() == (0, 1)
    ids = torch.arange(6)
    assert torch.equal(distributed.shard(ids), ids)
    rows, glob = distributed.local_rows(torch.tensor([4, 1]))
    assert torch.equal(rows, torch.tensor([4, 1])) and torch.equal(glob, rows)
    t = torch.ones(3)
    assert distributed.all_reduce_(t) is t and torch.equal(t, torch.ones(3))


def test_stratified_batches_take_one_window_of_each_class_per_step():
    idx = torch.arange(10)
    batches = distributed.stratified_batches(idx, 4, 7, seed=0)
    assert all(sorted((b % 4).tolist()) == [0, 1, 2, 3] for b in batches)
    # a class's windows all come once before any comes twice
    firsts = [int(b[b % 4 == 0][0]) for b in batches[:3]]
    assert sorted(firsts) == [0, 4, 8]
    assert torch.equal(torch.stack(batches),
                       torch.stack(distributed.stratified_batches(idx, 4, 7, seed=0)))


@pytest.mark.slow
def test_two_processes_give_the_codes_of_one(tmp_path):
    need_shared(SHARED_MODELS / "stories260K" / "config.json")
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_worker, args=(2, init, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    model, _ = load_model("stories260K")
    one, log = quantize(copy.deepcopy(model), _config(), _ids(), progress=False)
    want = _codes(one)
    assert set(r0["codes"]) == set(want) == set(r1["codes"])
    total = sum(c.numel() for c in want.values())
    differ = sum(int((r0["codes"][n] != want[n]).sum()) for n in want)
    # the ranks apply the same all-reduced updates: bit-identical models
    assert all(torch.equal(r0["codes"][n], r1["codes"][n]) for n in want)
    # The first window sees the same data and starts (statistics reduced exactly: maxima,
    # fp64 second moments); its training differs from one process only in the order of the
    # gradient sums (~1e-7 relative), so its log agrees to that precision ...
    a, b = r0["log"][0], log[0]
    assert a["kept"] == b["kept"] and a["ranks"] == 2 and b["ranks"] == 1
    for key in ("loss_before", "loss_after"):
        assert a[key] == pytest.approx(b[key], rel=1e-5), key
    # The soft loss at the end of the window's 6 AdamW steps follows the training trajectory,
    # where Adam's normalised first steps enlarge last-bit gradient differences: within
    # 1e-5 relative with the packages of the 2026-12-02 CI run, 1.0e-3 with torch 2.13.0 CPU,
    # transformers 5.24 / 5.25 and Triton 3.9 (0.0144539 against 0.0144689, the same at
    # f7a84d8 and here: the packages changed, not the code), so it is held to 1e-2
    assert a["soft_end"] == pytest.approx(b["soft_end"], rel=1e-2)
    # ... but later windows start from those last-bit differences: a hard-rounded code that
    # flips changes the next block's statistics and the cascade grows. Measured (2 processes
    # against 1, this configuration): 6.2% of the codes differ, the last window's held-out
    # loss within a few percent. Equal quality, not equal codes, is what holds.
    print(f"codes differing between 2 processes and 1: {differ} of {total}")
    assert differ <= 0.15 * total, f"{differ} of {total} codes differ"
    assert r0["log"][-1]["loss_after"] == pytest.approx(log[-1]["loss_after"], rel=0.15)


@pytest.mark.slow
@pytest.mark.parametrize("stream", [False, True])
def test_torchrun_quantize_writes_once(tmp_path, stream):
    """`torchrun --nproc-per-node 2 -m cbq_ptq.cli quantize` on the CPU (gloo): rank 0 writes
    the model, the summary and the log; each rank checkpoints its share."""
    import subprocess
    import sys

    need_shared(SHARED_MODELS / "stories260K" / "config.json")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "2", "-m", "cbq_ptq.cli", "quantize", "--model", "stories260K", "--setting", "W4A16",
           "--corpus", "tinystories", "--n-calib", "4", "--calib-len", "32", "--steps", "2",
           "--batch-size", "2", "--eval-windows", "1", "--also", "", "--out", str(out),
           "--device", "cpu", *(["--stream"] if stream else [])]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.count("W4A16 (CBQ): perplexity") == 1  # rank 0 alone evaluates
    assert (out / "model" / "quant_config.json").is_file()
    entries = (out / "windows.jsonl").read_text().splitlines()
    assert len(entries) == 4 and all(json.loads(e)["ranks"] == 2 for e in entries)
    if stream:  # block-streamed and data-parallel: rank 0's shards are the artefact
        meta = json.loads((out / "model" / "quant_config.json").read_text())
        assert len(meta["files"]) == 6 and all(
            json.loads(e)["blocks_resident"] <= 2 for e in entries)  # fmt: skip
