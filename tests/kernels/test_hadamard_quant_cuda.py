"""GPU tests of the online Hadamard + per-token quantization (same contracts as on CPU) at
real widths: SmolLM2's down_proj input 1536 (the fused kernel), a power of two (bit-exact),
Llama-2's 11008 (the composition: transform, then act_quant)."""

import pytest
import torch

from cbq_kernels import hadamard
from cbq_kernels.hadamard_quant import _fits, hadamard_act_quant, hadamard_act_quant_ref
from cbq_kernels.packing import unpack

pytestmark = pytest.mark.cuda


def data(t, n, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(t, n, generator=g, device="cuda") * 2
    x[:, 5] *= 300.0  # a massive-activation channel
    return x.to(torch.bfloat16)


def levels(codes, bits, n):
    return codes.long() if bits == 8 else unpack(codes, 4, n).long()


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("n", [4096, 1536, 11008])
def test_matches_the_reference(n, bits):
    x = data(2048, n, seed=n)
    signs = hadamard.random_signs(n, 3).cuda()
    codes, scales = hadamard_act_quant(x, bits, signs, clip_ratio=0.9)
    want_codes, want_scales = hadamard_act_quant_ref(x, bits, signs, 0.9)
    if n == 4096:  # a power of two: the same additions, bit for bit
        assert torch.equal(codes, want_codes) and torch.equal(scales, want_scales)
        return
    assert _fits(n) == (n == 1536)
    torch.testing.assert_close(scales, want_scales, rtol=1e-6, atol=0)
    diff = (levels(codes, bits, n) - levels(want_codes, bits, n)).abs()
    assert int(diff.max()) <= 1 and int((diff > 0).sum()) <= diff.numel() // 1000
