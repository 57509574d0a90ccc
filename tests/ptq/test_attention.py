"""cbq_ptq.attention: the decode step's grouped-query attention without the repeated KV cache
(CPU, a 2-block random Llama with 4 query and 2 / 1 key-value heads)."""

import pytest
import torch

import cbq_ptq.attention as attention
from cbq_ptq.attention import decode_attention, pack_gqa_decode, unpack_gqa_decode
from cbq_ptq.generate import decode_loop
from tests.conftest import random_llama


def test_packed_decode_attention_equals_the_repeated_form():
    g = torch.Generator().manual_seed(0)
    b, hk, groups, length, d = 3, 2, 4, 37, 16
    q = torch.randn(b, hk * groups, 1, d, generator=g)
    k, v = torch.randn(b, hk, length, d, generator=g), torch.randn(b, hk, length, d, generator=g)
    mask = torch.rand(b, 1, 1, length, generator=g) > 0.3
    mask[..., 0] = True  # every row attends somewhere
    want = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1), attn_mask=mask,
        scale=0.3).transpose(1, 2)  # fmt: skip
    got = decode_attention(q, k, v, mask, 0.3)
    assert got.shape == (b, 1, hk * groups, d) and got.is_contiguous()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kv_heads", [2, 1])
def test_a_packed_model_decodes_the_same_tokens(kv_heads, monkeypatch):
    """The decode loop of a grouped-query model gives the same greedy tokens and, step by step,
    the same logits to rounding with the packed attention as with transformers' own; the
    packed function takes every decode step of every layer and nothing else (the prefill, and
    the calls of a model that was not packed, go to transformers' function)."""
    model = random_llama(heads=4, kv_heads=kv_heads)
    other = random_llama(heads=4, kv_heads=kv_heads)
    ids = torch.randint(3, 300, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding: the mask is not all ones
    with torch.inference_mode():
        want_tokens, _, _ = decode_loop(model, ids, 6, mask, capture=False)
        want_logits = model(input_ids=ids, attention_mask=mask).logits
    calls = []
    real = attention.decode_attention
    monkeypatch.setattr(attention, "decode_attention",
                        lambda *a: calls.append(a[0].shape) or real(*a))  # fmt: skip
    assert pack_gqa_decode(model) == 2
    with torch.inference_mode():
        got_tokens, _, _ = decode_loop(model, ids, 6, mask, capture=False)
        got_logits = model(input_ids=ids, attention_mask=mask).logits  # a prefill: not packed
        decode_loop(other, ids, 3, mask, capture=False)  # not packed: transformers' function
    assert torch.equal(got_tokens, want_tokens)
    assert torch.equal(got_logits, want_logits)
    assert len(calls) == 2 * 5 and all(s == (2, 4, 1, 16) for s in calls)  # 2 layers x 5 steps
    unpack_gqa_decode(model)
    calls.clear()
    with torch.inference_mode():
        decode_loop(model, ids, 3, mask, capture=False)
    assert not calls


def test_models_without_grouped_query_heads_are_left_alone():
    model = random_llama(heads=4, kv_heads=4)
    assert pack_gqa_decode(model) == 0
    eager = random_llama(heads=4, kv_heads=2)
    eager.config._attn_implementation = "eager"
    assert pack_gqa_decode(eager) == 0
