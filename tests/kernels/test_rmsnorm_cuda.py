"""GPU tests of cbq_kernels.rmsnorm at served shapes (same contract as on CPU: transformers'
LlamaRMSNorm to two bf16 / fp16 units in the last place, rarely: cbq_kernels.rmsnorm says
why; at 2e7421f this test asked for one and the H100 showed two at 32 x 8192 and 8192 x
4096)."""

import pytest
import torch

from cbq_kernels.rmsnorm import rms_norm
from tests.kernels.test_rmsnorm import ulps

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("t", "k"), [(1, 4096), (32, 8192), (8192, 4096), (7, 576)])
def test_equals_the_eager_norm_to_two_ulps(dtype, t, k):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    g = torch.Generator(device="cuda").manual_seed(k)
    x = (torch.randn(t, k, generator=g, device="cuda") * 3).to(dtype)
    norm = LlamaRMSNorm(k, eps=1e-5).to("cuda", dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(k, generator=g, device="cuda") + 0.5)
        want = norm(x)
    got = rms_norm(x, norm.weight, 1e-5)
    diff = ulps(got, want)
    assert int(diff.max()) <= 2 and float((diff > 0).float().mean()) <= 0.02


def test_pdl_launch_gives_the_same_bits():
    """rms_norm(pdl=True) (programmatic dependent launch; a plain launch below compute
    capability 9.0) equals the plain launch bit for bit."""
    g = torch.Generator(device="cuda").manual_seed(5)
    x = (torch.randn(16, 8192, generator=g, device="cuda") * 3).to(torch.bfloat16)
    w = (torch.rand(8192, generator=g, device="cuda") + 0.5).to(torch.bfloat16)
    assert torch.equal(rms_norm(x, w, 1e-5, pdl=True), rms_norm(x, w, 1e-5))
