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
