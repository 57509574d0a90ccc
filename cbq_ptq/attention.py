"""The decode step's attention of grouped-query models without copying the KV cache.

transformers' SDPA attention (``sdpa_attention_forward``, 5.17 on the GPU machine) gives a
grouped-query layer (``num_key_value_groups`` g > 1: Llama-2-70B's 64 query / 8 key-value
heads, Llama-3, Mistral, Qwen, SmolLM2's 9 / 3) its keys and values repeated to every query
head (``repeat_kv``) whenever an attention mask is passed, which a static KV cache always
does: each decode step writes and reads a g-times copy of the whole cache of every layer. For
the Llama-2-70B shape at batch 1 and 2304 cache positions that is 75 MB written and read per
layer and step against the 9.4 MB the attention needs (the copy grows with batch and
context).

With one new token per sequence the g query heads of a key-value head are g rows that attend
to the same keys under the same mask, so they can be one (g, D) query of that head:
``q (B, Hkv * g, 1, D) -> (B, Hkv, g, D)`` with the (B, 1, 1, L) mask broadcast over the g
rows; the output is reshaped back. Each row's softmax and weighted sum are those of the
repeated form (the same function; the SDPA backend may order its sums differently, so the
values agree to rounding, not bit for bit). transformers 5.25 does the same in eager code
(``pack_gqa``); :func:`pack_gqa_decode` brings it to the version we serve with, for the
attention layers of one model.
"""

from __future__ import annotations

import torch
from torch import Tensor

_FLAG = "_cbq_gqa_decode"


def _takes(module, query: Tensor, key: Tensor, value: Tensor, attention_mask, kwargs) -> bool:
    """Whether this call is a decode step that the packed form computes (a module of a model
    given to :func:`pack_gqa_decode`, one query position, groups > 1, a (B, 1, 1, L) mask, no
    dropout, bias, soft-capping or attention weights asked for); anything else goes to
    transformers' own function."""
    groups = getattr(module, "num_key_value_groups", 1)
    return (getattr(module, _FLAG, False) and isinstance(groups, int) and groups > 1
            and query.dim() == 4 and key.dim() == 4 and query.shape[2] == 1
            and query.shape[1] == key.shape[1] * groups and key.shape[-1] == value.shape[-1]
            and isinstance(attention_mask, Tensor) and attention_mask.dim() == 4
            and attention_mask.shape[1] == 1 and attention_mask.shape[2] == 1
            and not kwargs.get("dropout") and kwargs.get("position_bias") is None
            and kwargs.get("softcap") is None and not kwargs.get("output_attentions")
            and not getattr(module, "training", False))  # fmt: skip


def decode_attention(query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor,
                     scaling: float | None) -> Tensor:  # fmt: skip
    """SDPA of one query position per sequence with the query heads of each key-value head as
    rows of one query: query (B, H, 1, D), key / value (B, Hkv, L, D), mask (B, 1, 1, L);
    returns (B, 1, H, D), as transformers' SDPA attention returns its output (transposed,
    contiguous)."""
    b, h, _, d = query.shape
    hk = key.shape[1]
    g = h // hk
    q = query.reshape(b, hk, g, d)
    mask = attention_mask.expand(attention_mask.shape[0], 1, g, attention_mask.shape[-1])
    out = torch.nn.functional.scaled_dot_product_attention(q, key, value, attn_mask=mask,
                                                           scale=scaling)  # fmt: skip
    return out.reshape(b, h, 1, value.shape[-1]).transpose(1, 2).contiguous()


def _attention_layers(model: torch.nn.Module) -> list:
    return [m for m in model.modules()
            if isinstance(getattr(m, "num_key_value_groups", None), int)
            and hasattr(m, "layer_idx")]  # fmt: skip


def pack_gqa_decode(model: torch.nn.Module) -> int:
    """Route the decode steps of ``model``'s grouped-query attention layers through
    :func:`decode_attention` (module docstring); returns how many layers now use it (0 for a
    model without grouped-query layers, or whose attention is not transformers' "sdpa").
    transformers looks its attention function up by name in a process-wide registry, so
    "sdpa" is wrapped there once; the wrapper takes only the layers marked here and hands
    every other call, of this model or another, to the original function."""
    from transformers import AttentionInterface

    if getattr(getattr(model, "config", None), "_attn_implementation", None) != "sdpa":
        return 0
    layers = [m for m in _attention_layers(model) if m.num_key_value_groups > 1]
    if not layers:
        return 0
    original = AttentionInterface._global_mapping["sdpa"]
    if not getattr(original, "_cbq_packed", False):

        def attention(module, query, key, value, attention_mask, *args, _original=original,
                      **kwargs):  # fmt: skip
            if not args and _takes(module, query, key, value, attention_mask, kwargs):
                return decode_attention(query, key, value, attention_mask,
                                        kwargs.get("scaling")), None  # fmt: skip
            return _original(module, query, key, value, attention_mask, *args, **kwargs)

        attention._cbq_packed = True
        attention._cbq_original = original
        AttentionInterface.register("sdpa", attention)
    for m in layers:
        setattr(m, _FLAG, True)
    return len(layers)


def unpack_gqa_decode(model: torch.nn.Module) -> None:
    """Undo :func:`pack_gqa_decode` for ``model``'s layers (the registry's wrapper stays; it
    passes unmarked layers through)."""
    for m in _attention_layers(model):
        if hasattr(m, _FLAG):
            delattr(m, _FLAG)
