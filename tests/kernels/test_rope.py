"""cbq_kernels.rope against transformers' eager RoPE: bit for bit (CPU, Triton's interpreter)."""

import pytest
import torch

from cbq_kernels.rope import rope, rope_ref


def qkv(b=2, hq=4, hk=2, s=5, d=64, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    # q / k as the attention makes them: (B, S, H, D) projections viewed, then transposed
    q = (torch.randn(b, s, hq, d, generator=g) * 3).to(dtype).transpose(1, 2)
    k = (torch.randn(b, s, hk, d, generator=g) * 3).to(dtype).transpose(1, 2)
    pos = (torch.arange(s, dtype=torch.float32)[None, :, None]
           + 1000 * torch.arange(b)[:, None, None])  # fmt: skip
    inv = 1.0 / 10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    ang = torch.cat([pos * inv, pos * inv], dim=-1)
    return q, k, ang.cos().to(dtype), ang.sin().to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(2, 4, 2, 5, 64), (1, 8, 8, 1, 128), (3, 2, 1, 7, 40)])
def test_equals_the_eager_formula_bit_for_bit(dtype, shape):
    b, hq, hk, s, d = shape
    q, k, cos, sin = qkv(b, hq, hk, s, d, dtype)
    got = rope(q, k, cos, sin)
    want = rope_ref(q, k, cos, sin)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype and g.is_contiguous()
        assert torch.equal(g, w)


def test_equals_transformers_apply_rotary_pos_emb_and_broadcasts_a_batch_of_one():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    q, k, cos, sin = qkv(b=3, s=6)
    cos, sin = cos[:1], sin[:1]  # one position row for every sequence (a batch of 1)
    got = rope(q, k, cos, sin)
    want = apply_rotary_pos_emb(q, k, cos, sin)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_bad_input():
    q, k, cos, sin = qkv()
    with pytest.raises(ValueError, match="head_dim must be even"):
        rope(q[..., :63], k[..., :63], cos[..., :63], sin[..., :63])
    with pytest.raises(ValueError, match=r"cos must be \(batch or 1, seq, head_dim\)"):
        rope(q, k, cos[:, :2], sin)
    with pytest.raises(ValueError, match="does not match q"):
        rope(q, k[:, :, :2], cos, sin)
    with pytest.raises(TypeError, match="q and k must have one dtype"):
        rope(q, k.float(), cos, sin)
    with pytest.raises(TypeError, match="sin must be float32"):
        rope(q, k, cos, sin.to(torch.int32))


def test_opcheck():
    q, k, cos, sin = qkv(s=3)
    torch.library.opcheck(torch.ops.cbq.rope.default, (q, k, cos, sin))
