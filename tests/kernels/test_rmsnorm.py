"""cbq_kernels.rmsnorm against transformers' eager RMSNorm (CPU, Triton's interpreter)."""

import pytest
import torch

from cbq_kernels.rmsnorm import rms_norm, rms_norm_ref, rms_norm_takes


def data(t=5, k=576, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, k, generator=g) * 3
    x[:, ::37] *= 20  # outlier channels, as in a residual stream
    w = torch.rand(k, generator=g) + 0.5
    return x.to(dtype), w.to(dtype)


def ulps(a, b):
    """Distance in units in the last place of the dtype (same-sign finite values)."""
    bits = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}
    ia, ib = a.view(bits[a.dtype]).long(), b.view(bits[b.dtype]).long()
    return (ia - ib).abs()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(5, 576), (3, 4096), (1, 100), (2, 3, 64)])
def test_equals_the_eager_formula_to_two_ulps(dtype, shape):
    """Against transformers' own LlamaRMSNorm: the roundings are eager's, the sum of squares
    is reduced in another order, so the normalized value may be one unit in the last place
    off, and a bf16 / fp16 output two after the weight product (cbq_kernels.rmsnorm says
    why; rarely)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    x, w = data(shape[-2] if len(shape) == 2 else shape[0] * shape[1], shape[-1], dtype)
    x = x.reshape(shape)
    norm = LlamaRMSNorm(shape[-1], eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(w)
        want = norm(x)
    got = rms_norm(x, w, 1e-5)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert torch.equal(rms_norm_ref(x, w, 1e-5), want)
    if dtype == torch.float32:  # no rounding to hide the order of the sums: a few fp32 ulps
        torch.testing.assert_close(got, want, rtol=2e-6, atol=0)
        return
    diff = ulps(got, want)
    assert int(diff.max()) <= 2 and float((diff > 0).float().mean()) <= 0.02


def test_checks_its_arguments():
    x, w = data()
    with pytest.raises(TypeError, match="weight must have x's dtype"):
        rms_norm(x, w.float())
    with pytest.raises(ValueError, match=r"weight must be \(K,\) for x \(\.\.\., K\)"):
        rms_norm(x, w[:-1])
    with pytest.raises(ValueError, match="eps must be > 0"):
        rms_norm(x, w, 0.0)
    assert rms_norm_takes(x, w, 1e-6) and not rms_norm_takes(x, w.float(), 1e-6)


def test_opcheck():
    x, w = data(3, 64)
    torch.library.opcheck(torch.ops.cbq.rms_norm.default, (x, w, 1e-6))
