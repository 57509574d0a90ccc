"""The online Hadamard transform fused with per-token quantization (cbq_kernels.hadamard_quant)
against its reference (the transform in fp32, then act_quant_ref), through Triton's
interpreter on CPU."""

import pytest
import torch

from cbq_kernels import hadamard
from cbq_kernels.hadamard_quant import hadamard_act_quant, hadamard_act_quant_ref
from cbq_kernels.packing import unpack


def data(t, n, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, n, generator=g)
    x[:, 3] *= 200.0  # a massive-activation channel: what the rotation spreads out
    return x.to(dtype)


@pytest.mark.parametrize("n", [16, 64, 256])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_power_of_two_widths_are_bit_exact(n, bits, dtype):
    x = data(5, n, seed=n, dtype=dtype)
    signs = hadamard.random_signs(n, seed=1)
    codes, scales = hadamard_act_quant(x, bits, signs, clip_ratio=0.9)
    want_codes, want_scales = hadamard_act_quant_ref(x, bits, signs, 0.9)
    assert torch.equal(codes, want_codes) and torch.equal(scales, want_scales)


@pytest.mark.parametrize(("n", "bits"), [(192, 8), (192, 4), (320, 8), (576, 4)])  # m = 12, 20, 36
def test_widths_with_a_small_factor_differ_by_at_most_one_level_rarely(n, bits):
    x = data(6, n, seed=n)
    signs = hadamard.random_signs(n, seed=2)
    codes, scales = hadamard_act_quant(x, bits, signs)
    want_codes, want_scales = hadamard_act_quant_ref(x, bits, signs)
    torch.testing.assert_close(scales, want_scales, rtol=1e-6, atol=0)
    q = codes.long() if bits == 8 else unpack(codes, 4, n).long()
    qw = want_codes.long() if bits == 8 else unpack(want_codes, 4, n).long()
    diff = (q - qw).abs()
    assert int(diff.max()) <= 1 and int((diff > 0).sum()) <= max(2, q.numel() // 500)


def test_the_rotation_spreads_an_outlier_channel():
    """Per-token int4 of x: the outlier channel leaves almost every other channel at code 0;
    after the rotation few codes are 0 (the quantization-kernel proportion of METHOD.md)."""
    from cbq_kernels.act_quant import act_quant_ref

    x = data(8, 256, seed=3)
    q_raw = unpack(act_quant_ref(x, 4)[0], 4, 256).long() - 8
    codes, _ = hadamard_act_quant(x, 4, hadamard.random_signs(256, seed=4))
    q_rot = unpack(codes, 4, 256).long() - 8
    assert float((q_raw == 0).float().mean()) > 0.9
    assert float((q_rot == 0).float().mean()) < 0.2


def test_bad_inputs_are_refused():
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match=r"signs must be a tensor of shape \(64,\)"):
        hadamard_act_quant(x, 8, torch.ones(32))
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        hadamard_act_quant(x, 3, torch.ones(64))
    with pytest.raises(ValueError, match="size 172"):
        hadamard_act_quant(torch.randn(2, 172), 8, torch.ones(172))


def test_registered_op_passes_opcheck():
    from cbq_kernels.hadamard_quant import _op

    x = data(3, 64, seed=9)
    torch.library.opcheck(_op, (x, 8, hadamard.random_signs(64, 0), 1.0))
    torch.library.opcheck(_op, (x, 4, hadamard.random_signs(64, 0), 0.5))
