"""cbq_kernels.quant_math, the one written form of the quantizer arithmetic: the kernels'
references, hardening and the activation quantizers all compute what it computes."""

import pytest
import torch

from cbq_kernels.act_quant import act_quant_ref
from cbq_kernels.fake_quant import fake_quant_ref
from cbq_kernels.quant_math import (
    act_step,
    dequantize_weight,
    fake_quant_act,
    quantize_act,
    quantize_weight,
    quantize_weight_two_level,
)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize(("bits", "group_size"), [(4, None), (3, 16), (2, 32), (8, 7)])
def test_codes_dequantize_to_the_fake_quantized_weight(bits, group_size, symmetric):
    """quantize_weight's codes, dequantized, are fake_quant's forward bit for bit (with
    clipping factors), so hardening reproduces what training computed."""
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(6, 48, generator=g) * 0.05
    groups = 1 if group_size is None else -(-48 // group_size)
    fmax = torch.rand(6, groups, generator=g) * 0.3 + 0.7
    fmin = None if symmetric else torch.rand(6, groups, generator=g) * 0.3 + 0.7
    codes, s, z = quantize_weight(w, bits, group_size, symmetric, fmax, fmin)
    assert codes.dtype == torch.uint8 and int(codes.max()) < (1 << bits)
    if symmetric:
        assert torch.equal(z, torch.full_like(s, float(1 << (bits - 1))))
    want = fake_quant_ref(w, bits, group_size, fmax, fmin, symmetric)
    assert torch.equal(dequantize_weight(codes, s, z, group_size), want)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("cross", [False, True])
def test_activation_codes_are_the_act_quant_reference(bits, cross):
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(5, 40, generator=g) * 3
    factor = torch.rand(40, generator=g) + 0.5 if cross else None
    alpha = 0.3 if cross else 1.0
    q, s = quantize_act(x, bits, 0.9, factor, alpha)
    codes, scales = act_quant_ref(x, bits, 0.9, channel_factor=factor, alpha=alpha)
    from cbq_kernels.packing import unpack_ref

    ref = codes.float() if bits == 8 else unpack_ref(codes, 4, 40).float() - 8
    assert torch.equal(q, ref)
    assert torch.equal(s.reshape(-1), scales)


def test_fake_quant_act_matches_fake_quant_per_token_and_is_differentiable():
    x = torch.randn(7, 16, generator=torch.Generator().manual_seed(1))
    ratio = torch.tensor(0.8, requires_grad=True)
    y = fake_quant_act(x, 4, ratio)
    want = fake_quant_ref(x, 4, None, ratio.detach().reshape(1), None, True)
    assert torch.equal(y, want)
    y.sum().backward()
    assert ratio.grad is not None and torch.isfinite(ratio.grad)


def test_step_floor_of_a_zero_token():
    """An all-zero token gets the floor step 1e-8 (codes 0), not a division by zero."""
    s = act_step(torch.zeros(2, 1), 8)
    assert torch.equal(s, torch.full((2, 1), 1e-8))
    q, _ = quantize_act(torch.zeros(2, 4), 8)
    assert torch.equal(q, torch.zeros(2, 4))


def test_two_level_codes_fit_the_int8_gemm_and_bound_the_error():
    """quantize_weight_two_level: codes and zero points in 0..15, integer steps in 1..16,
    s2 (q - z) inside int8 for every group (random rows, a row of outliers, all-positive and
    all-negative groups, a zero row); the error per weight at most s1 (1/2 + s2/2) (int8
    rounding, then the group's); the canonical grouped form (scales s1 s2) dequantizes to it;
    gemm_gluon's parameter packing takes the steps and zero points as they are."""
    from cbq_kernels.gemm_gluon import two_level_params

    g = torch.Generator().manual_seed(41)
    w = torch.randn(12, 256, generator=g)
    w[1, 7] = 40.0  # an outlier: the rest of its row uses few int8 levels
    w[2, :64] = w[2, :64].abs() + 0.5  # groups that do not straddle 0
    w[3, 64:128] = -w[3, 64:128].abs() - 0.5
    w[4] = 0.0
    codes, s1, s2, z = quantize_weight_two_level(w, 64)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 15
    assert s2.dtype == torch.int32 and int(s2.min()) >= 1 and int(s2.max()) <= 16
    assert int(z.min()) >= 0 and int(z.max()) <= 15
    gid = torch.arange(256) // 64
    w8q = s2[:, gid] * (codes.to(torch.int32) - z[:, gid])
    assert int(w8q.abs().max()) <= 127
    w_hat = s1[:, None] * w8q.float()
    bound = s1[:, None] * (0.5 + s2[:, gid].float() / 2) * (1 + 1e-6)
    assert bool(((w_hat - w).abs() <= bound).all())
    assert torch.equal(w_hat[4], torch.zeros(256))
    canon = dequantize_weight(codes, s1[:, None] * s2.float(), z.float(), 64)
    torch.testing.assert_close(canon, w_hat, rtol=2**-23, atol=0)
    assert two_level_params(s2, z).shape == (12, 256 // 8)
    with pytest.raises(ValueError, match="multiple of group_size=64"):
        quantize_weight_two_level(torch.randn(3, 100), 64)
