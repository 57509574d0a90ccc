"""GPU tests of act_quant at 8192 tokens x 4096 (same contracts as on CPU)."""

import pytest
import torch

from cbq_kernels.act_quant import act_quant, act_quant_ref
from cbq_kernels.packing import unpack

pytestmark = pytest.mark.cuda


def data(t=8192, k=4096, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(t, k, generator=g, device="cuda") * 2
    x[:, ::97] *= 30
    return x.to(torch.bfloat16)


@pytest.mark.parametrize("bits", [4, 8])
def test_per_token_exact(bits):
    x = data()
    codes, s = act_quant(x, bits, clip_ratio=0.9)
    ref_codes, ref_s = act_quant_ref(x, bits, 0.9)
    assert torch.equal(codes, ref_codes) and torch.equal(s, ref_s)
    cpu_codes, cpu_s = act_quant(x[:64].cpu(), bits, clip_ratio=0.9)
    assert torch.equal(codes[:64].cpu(), cpu_codes) and torch.equal(s[:64].cpu(), cpu_s)


@pytest.mark.parametrize("bits", [4, 8])
def test_rmsnorm_and_crossquant_within_one_level(bits):
    x = data(seed=1)
    w = torch.rand(4096, device="cuda") + 0.5
    f = x.float().abs().amax(0).pow(0.5)
    for kwargs in ({"norm_weight": w}, {"channel_factor": f, "alpha": 0.5}):
        codes, s = act_quant(x, bits, **kwargs)
        ref = act_quant_ref(x, bits, 1.0, kwargs.get("norm_weight"), 1e-6,
                            kwargs.get("channel_factor"), kwargs.get("alpha", 1.0))  # fmt: skip
        torch.testing.assert_close(s, ref[1], rtol=1e-5, atol=0)
        q, q_ref = (c if bits == 8 else unpack(c, 4, 4096) for c in (codes, ref[0]))
        diff = (q.to(torch.int16) - q_ref.to(torch.int16)).abs()
        assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 1e-3


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("k", [11008, 1376])  # Llama-2-7B's FFN width; 1376: K % 4 == 0, not % 8
def test_swiglu_within_one_level(bits, k):
    """glu: silu(gate) * up of a bf16 gate | up output (the down projection's input), against
    the fp32 reference: the kernel's exp is not torch's, so a code within an ulp of a rounding
    boundary may move by one level; scales within 1e-5."""
    g = torch.Generator(device="cuda").manual_seed(7)
    x = (torch.randn(96, 2 * k, generator=g, device="cuda") * 2).to(torch.bfloat16)
    codes, s = act_quant(x, bits, clip_ratio=0.9, glu=True)
    ref_codes, ref_s = act_quant_ref(x, bits, 0.9, glu=True)
    torch.testing.assert_close(s, ref_s, rtol=1e-5, atol=0)
    q, q_ref = (c if bits == 8 else unpack(c, 4, k) for c in (codes, ref_codes))
    diff = (q.to(torch.int16) - q_ref.to(torch.int16)).abs()
    assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 1e-3


@pytest.mark.parametrize("glu", [False, True])
def test_pdl_launch_gives_the_same_bits(glu):
    """act_quant(pdl=True) (programmatic dependent launch, griddepcontrol in the kernel; a
    plain launch below compute capability 9.0) equals the plain launch bit for bit."""
    x = data(t=64, k=8192 if glu else 4096, seed=3)
    w = None if glu else torch.rand(4096, device="cuda") + 0.5
    for bits in (4, 8):
        want = act_quant(x, bits, norm_weight=w, glu=glu)
        got = act_quant(x, bits, norm_weight=w, glu=glu, pdl=True)
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
