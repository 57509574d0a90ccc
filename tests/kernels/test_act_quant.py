"""Activation quantization (per token, int8 / packed int4, RMSNorm, CrossQuant) on CPU."""

import pytest
import torch

from cbq_kernels.act_quant import (
    act_quant,
    act_quant_ref,
    dequantize_act_ref,
    quant_kernel_fraction,
)
from cbq_kernels.packing import pack, unpack

SHAPES = ((1, 1), (3, 7), (5, 37), (13, 64), (4, 100), (2, 172), (67, 33))


def data(t, k, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, k, generator=g) * 2
    x[:, :: max(1, k // 5)] *= 20  # a few outlier channels, as in LLM activations
    return x.to(dtype)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_per_token_exact(shape, bits, dtype):
    x = data(*shape, dtype=dtype)
    codes, scales = act_quant(x, bits, clip_ratio=0.8)
    ref_codes, ref_scales = act_quant_ref(x, bits, 0.8)
    assert torch.equal(codes, ref_codes) and torch.equal(scales, ref_scales)
    if bits == 4:  # identical to pack() of the reference's (offset) codes
        q = unpack(codes, 4, shape[1])
        assert torch.equal(codes, pack(q, 4)) and int(q.max()) <= 15


@pytest.mark.parametrize("bits", [4, 8])
def test_codes_and_scales_follow_the_definition(bits):
    x = data(9, 40, seed=1)
    codes, s = act_quant(x, bits)
    p = 2 ** (bits - 1) - 1
    assert torch.allclose(s, x.abs().amax(1) / p, rtol=1e-6)
    y = dequantize_act_ref(codes, s, bits, 40)
    assert ((y - x).abs() <= s[:, None] / 2 * (1 + 1e-5)).all()  # ratio 1: nothing clipped


def test_pdl_is_ignored_off_a_hopper_gpu():
    """pdl=True (programmatic dependent launch) asks for nothing a CPU can do: the same codes
    through Triton's interpreter here, and no PDL-capable device reported."""
    from cbq_kernels.pdl import capable

    x = data(5, 37, seed=2)
    for bits in (4, 8):
        want = act_quant(x, bits, clip_ratio=0.9)
        got = act_quant(x, bits, clip_ratio=0.9, pdl=True)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert not capable(x.device)


def test_leading_dims_are_tokens():
    x = data(6, 24).reshape(2, 3, 24)
    codes, s = act_quant(x, 8)
    assert codes.shape == (6, 24) and s.shape == (6,)


@pytest.mark.parametrize("bits", [4, 8])
def test_fused_rmsnorm(bits):
    x = data(32, 96, seed=2)
    w = torch.rand(96, generator=torch.Generator().manual_seed(3)) + 0.5
    codes, s = act_quant(x, bits, norm_weight=w, norm_eps=1e-5)
    ref_codes, ref_s = act_quant_ref(x, bits, 1.0, w, 1e-5)
    torch.testing.assert_close(s, ref_s, rtol=1e-5, atol=0)
    # The sum of squares is accumulated in another order: a code may move by one level
    # for an element within an ulp of a rounding boundary, rarely.
    q, q_ref = (c if bits == 8 else unpack(c, 4, 96).to(torch.int16) for c in (codes, ref_codes))
    diff = (q.to(torch.int16) - q_ref.to(torch.int16)).abs()
    assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 1e-3


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("k", [96, 100])  # 100: codes written one by one (K % 4 != 0)
def test_fused_swiglu(bits, k):
    """glu: the kernel quantizes silu(gate) * up of a (T, 2K) gate | up input, against the
    reference and against the definition (torch's silu, then plain per-token quantization)."""
    x = data(32, 2 * k, seed=4) * 3
    codes, s = act_quant(x, bits, clip_ratio=0.9, glu=True)
    ref_codes, ref_s = act_quant_ref(x, bits, 0.9, glu=True)
    assert codes.shape == ref_codes.shape and s.shape == (32,)
    torch.testing.assert_close(s, ref_s, rtol=1e-6, atol=0)
    q, q_ref = (c if bits == 8 else unpack(c, 4, k).to(torch.int16) for c in (codes, ref_codes))
    diff = (q.to(torch.int16) - q_ref.to(torch.int16)).abs()
    assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 1e-3
    g, u = x.chunk(2, dim=1)
    y = torch.nn.functional.silu(g) * u
    def_codes, def_s = act_quant_ref(y, bits, 0.9)
    torch.testing.assert_close(ref_s, def_s, rtol=1e-6, atol=0)
    q_def = def_codes if bits == 8 else unpack(def_codes, 4, k).to(torch.int16)
    assert int((q_ref.to(torch.int16) - q_def.to(torch.int16)).abs().max()) <= 1


def test_swiglu_bad_input():
    with pytest.raises(ValueError, match="odd width 15"):
        act_quant(torch.zeros(2, 15), 8, glu=True)
    with pytest.raises(ValueError, match="glu and norm_weight do not combine"):
        act_quant(torch.zeros(2, 16), 8, glu=True, norm_weight=torch.ones(8))
    with pytest.raises(ValueError, match=r"channel_factor must have shape \(K,\) = \(8,\)"):
        act_quant(torch.zeros(2, 16), 8, glu=True, channel_factor=torch.ones(16), alpha=0.5)


def test_crossquant_never_clips_and_shrinks_the_kernel():
    x = data(64, 128, seed=4)
    alpha = 0.5
    c = x.abs().amax(0)  # per-channel maxima "from calibration"
    f = c.pow(1 - alpha)
    codes, s = act_quant(x, 8, channel_factor=f, alpha=alpha)
    ref_codes, ref_s = act_quant_ref(x, 8, 1.0, None, 1e-6, f, alpha)
    torch.testing.assert_close(s, ref_s, rtol=1e-5, atol=0)
    assert int((codes.to(torch.int16) - ref_codes.to(torch.int16)).abs().max()) <= 1
    assert int(codes.min()) >= -127  # |x| <= r^a c^(1-a): within range, never clipped
    y = dequantize_act_ref(codes, s, 8, 128, f)
    assert ((y - x).abs() <= (s[:, None] * f[None, :]) / 2 * 1.001).all()
    per_token = quant_kernel_fraction(x, 8)
    crossquant = quant_kernel_fraction(x, 8, channel_factor=f, alpha=alpha)
    assert crossquant < per_token  # the paper's claim, on data with outlier channels


def test_kernel_fraction_counts_zero_codes_of_nonzero_elements():
    x = torch.tensor([[100.0, 0.1, 0.0, -0.2, 50.0]])
    # s = 100/127: 0.1 and -0.2 quantize to 0 (2 of the 4 non-zero elements); 0.0 is ignored
    assert quant_kernel_fraction(x, 8) == 0.5
    assert quant_kernel_fraction(torch.zeros(2, 3), 8) == 0.0


def test_bad_input():
    x = data(4, 16)
    with pytest.raises(ValueError, match=r"bits must be 4 or 8.*got 6"):
        act_quant(x, 6)
    with pytest.raises(TypeError, match="x must be float32"):
        act_quant(x.to(torch.int32), 8)
    with pytest.raises(ValueError, match="x must be contiguous"):
        act_quant(torch.randn(16, 4).t(), 8)
    with pytest.raises(ValueError, match=r"clip_ratio must be in \(0, 1\]"):
        act_quant(x, 8, clip_ratio=1.5)
    with pytest.raises(ValueError, match=r"norm_weight must have shape \(K,\) = \(16,\)"):
        act_quant(x, 8, norm_weight=torch.ones(8))
    with pytest.raises(ValueError, match=r"CrossQuant .* needs channel_factor"):
        act_quant(x, 8, alpha=0.5)
    with pytest.raises(ValueError, match="channel_factor is on meta"):
        act_quant(x, 8, channel_factor=torch.ones(16, device="meta"), alpha=0.5)


def test_opcheck_and_compile():
    x, w = data(8, 40), torch.rand(40) + 0.5
    torch.library.opcheck(torch.ops.cbq.act_quant.default, (x, 4, 0.9, w, 1e-6, None, 1.0))
    torch.library.opcheck(torch.ops.cbq.act_quant.default,
                          (x, 8, 0.9, None, 1e-6, None, 1.0, True))  # glu: (8, 2 x 20)
    compiled = torch.compile(lambda x: act_quant(x, 8, clip_ratio=0.9), fullgraph=True)
    got, want = compiled(x), act_quant(x, 8, clip_ratio=0.9)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
