"""cbq_kernels.rope on the GPU: bit for bit transformers' eager RoPE at Llama-2-7B's head shapes,
decode (one position) and prefill, and through a served model (serve.fuse_rope)."""

import pytest
import torch

from cbq_kernels.rope import rope, rope_ref
from tests.conftest import random_llama

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(("b", "s"), [(1, 1), (32, 1), (1, 2048), (4, 77)])
def test_equals_the_eager_formula_bit_for_bit(dtype, b, s):
    g = torch.Generator(device="cuda").manual_seed(b * 1000 + s)
    hq, hk, d = 32, 8, 128
    q = torch.randn(b, s, hq, d, generator=g, device="cuda").to(dtype).transpose(1, 2)
    k = torch.randn(b, s, hk, d, generator=g, device="cuda").to(dtype).transpose(1, 2)
    ang = torch.rand(b, s, d // 2, generator=g, device="cuda") * 3000
    ang = torch.cat([ang, ang], dim=-1)
    cos, sin = ang.cos().to(dtype), ang.sin().to(dtype)
    got, want = rope(q, k, cos, sin), rope_ref(q, k, cos, sin)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_a_served_model_with_the_kernel_computes_the_same_logits():
    from cbq_ptq.serve import fuse_rope, unfuse_rope

    model = random_llama(512, 1408, heads=8, vocab=1000, device="cuda", dtype=torch.bfloat16)
    ids = torch.randint(3, 1000, (2, 33), generator=torch.Generator().manual_seed(3)).cuda()
    with torch.no_grad():
        want = model(ids).logits
    try:
        assert fuse_rope(model) == 2
        with torch.no_grad():
            got = model(ids).logits
    finally:
        unfuse_rope(model)
    assert torch.equal(got, want)
