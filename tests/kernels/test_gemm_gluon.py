"""The Gluon int8 GEMM (cbq_kernels.gemm_gluon) and the W4A4 form of gemm_tma4, compiled for
sm_90 without a GPU: their MMAs stay in flight (an asynchronous wgmma waited on only down to
one outstanding), which is why they exist (Triton's own int8 dots are waited on one by one:
scripts/wgmma_async_check.py). Their numerics are the GPU tests' (test_gemm_cuda.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cbq_kernels import gemm_gluon

pytestmark = pytest.mark.skipif(gemm_gluon.gluon is None, reason="this Triton has no Gluon")


_INT8_GLUON_WAITS = """
import json, sys
from cbq_kernels import gemm_gluon, sm90_aot
ptx = sm90_aot.compile_int8_gluon(gemm_gluon.CONFIGS[int(sys.argv[1])]).asm["ptx"]
print(json.dumps(["wgmma.mma_async.sync.aligned" in ptx and ".s32.s8.s8" in ptx,
                  sorted(set(sm90_aot.wgmma_waits(ptx)))]))
"""


def _compile_in_subprocess(script: str, arg: str) -> list:
    """Run a compile script in a process of its own (the tests run Triton's interpreter,
    whose state leaks into an in-process compile: an in-process compile of the int8 kernel
    failed inside the interpreter's patched operators after other tests had run interpreted
    kernels) and return its last line, parsed as JSON."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", script, arg], env=env, capture_output=True,
                       text=True, timeout=300, cwd=Path(__file__).resolve().parents[2])  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("config", [0, 1])
def test_gluon_kernel_keeps_one_mma_in_flight(config):
    """The Gluon int8 GEMM: int8 wgmma, one MMA left in flight in the K loop."""
    wgmma_int8, waits = _compile_in_subprocess(_INT8_GLUON_WAITS, str(config))
    assert wgmma_int8 and waits == [0, 1], waits  # 1 in the K loop, 0 after it


_SPLIT_WAITS = """
import json, sys
from cbq_kernels import gemm_tma4, sm90_aot
k = sm90_aot.compile_tma4(gemm_tma4.CONFIGS[0], sys.argv[1] == "1")
print(json.dumps(sorted(set(sm90_aot.ttgir_pendings(k.asm["ttgir"])))))
"""


@pytest.mark.parametrize("fp8", [False, True])
def test_split_nibble_kernel_waits(fp8):
    """gemm_tma4: the fp8 form's MMAs stay in flight; the int8 form's are each waited on
    (Triton's pipeliner: no async dot without an fp32 accumulator). If the int8 half fails,
    Triton has lifted that rule: time gemm_tma again. Compiled in a process of its own (the
    tests run Triton's interpreter, which cannot compile)."""
    waits = _compile_in_subprocess(_SPLIT_WAITS, "1" if fp8 else "0")
    assert (max(waits) >= 1) == fp8, waits


def test_available_only_on_hopper_int8():
    x = torch.zeros(4, 32, dtype=torch.int8)
    assert not gemm_gluon.available(x)  # CPU
    with pytest.raises(ValueError, match="needs Triton's Gluon, a Hopper GPU and int8 x"):
        gemm_gluon.gemm_int8_gluon(x, torch.ones(4), x, torch.ones(4), None, torch.bfloat16)


_SPLIT_GLUON_WAITS = """
import json, sys
from cbq_kernels import gemm_gluon, sm90_aot
mode = int(sys.argv[1])
ptx = sm90_aot.compile_split_gluon(gemm_gluon.SPLIT_CONFIGS[1], mode).asm["ptx"]
_regs, _spill, serialised = sm90_aot.ptxas_report(ptx)  # the ptxas this Triton compiles with
print(json.dumps([bool(serialised), ".s32.s8.s8" in ptx, sorted(set(sm90_aot.wgmma_waits(ptx)))]))
"""


@pytest.mark.parametrize("mode", [0, 1])
def test_split_kernel_keeps_two_mmas_in_flight(mode):
    """The split-nibble kernel in its two forms (W4A8 per channel, two-level): its int8
    MMAs, the wait in the K loop leaves
    each step's two in flight, and the ptxas Triton bundles keeps them so (ptxas serialises
    wgmma it cannot prove safe, whatever the PTX's waits; it did for register A operands and
    for group parameters loaded from global memory in the loop). Compiled in a process of
    its own: the tests run Triton's interpreter, whose functions the compiler refuses."""
    serialised, mma, waits = _compile_in_subprocess(_SPLIT_GLUON_WAITS, str(mode))
    assert mma and waits == [0, 2], (mma, waits)  # 2 in the K loop, 0 after it
    assert not serialised, "ptxas serialised the wgmma (each MMA waited on)"


def test_two_level_params_layout():
    """16 bytes per row and K step: s2 and (256 - s2 z) mod 256 of group t (the low half of
    the split row) and of group G / 2 + t (the high half), then zeros; bad ranges refused."""
    s2 = torch.tensor([[1, 2, 3, 16], [5, 6, 7, 8]])
    z = torch.tensor([[0, 15, 1, 2], [3, 4, 5, 6]])
    p = gemm_gluon.two_level_params(s2, z)
    assert p.shape == (2, 32) and p.dtype == torch.uint8
    steps = p.view(2, 2, 16)
    for n in range(2):
        for t in range(2):
            lo, hi = t, 2 + t
            want = [s2[n, lo], (256 - s2[n, lo] * z[n, lo]) % 256,
                    s2[n, hi], (256 - s2[n, hi] * z[n, hi]) % 256]  # fmt: skip
            assert steps[n, t, :4].tolist() == [int(v) for v in want]
            assert not steps[n, t, 4:].any()
    # the kernel's bytewise add: (q s2 + (256 - s2 z)) mod 256 is s2 (q - z) as a signed byte
    q = torch.arange(16)
    for sv, zv in ((1, 0), (8, 15), (16, 7), (5, 3)):
        got = ((q * sv + (256 - sv * zv) % 256) % 256).to(torch.uint8).view(torch.int8)
        ok = (q - zv).abs() * sv <= 127
        assert torch.equal(got[ok].long(), (sv * (q - zv))[ok])
    with pytest.raises(ValueError, match=r"1\.\.16"):
        gemm_gluon.two_level_params(s2 * 0, z)
    with pytest.raises(ValueError, match="G even"):
        gemm_gluon.two_level_params(s2[:, :3], z[:, :3])
