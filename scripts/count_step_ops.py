"""Count the operators of one decode step of a small Llama-style model on the CPU, as a GPU
step would launch them: every aten operator that is not a view (nor a cast or copy that
returns its input), and each cbq GEMM as its one registered op. The numbers of
docs/DECISIONS.md, "Issue 14's table on the H100 at 9252d9d" (~14 operators per block for
W4A8 with the default fusions, ~40 for bf16, ~36 per step outside the blocks) come from
this script; it counts, it does not time (the GPU profile is bench_generate's
CBQ_GEN_PROFILE).

    python scripts/count_step_ops.py bf16
    python scripts/count_step_ops.py W4A8
"""

from __future__ import annotations

import collections
import inspect
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cbq_kernels.gemm as gemm
from cbq_ptq.config import parse_setting
from cbq_ptq.serve import (
    fuse_norms,
    fuse_projections,
    fuse_rope,
    fuse_swiglu,
    rtn_kernels,
)

VIEWS = {"view", "_unsafe_view", "t", "transpose", "unsqueeze", "squeeze", "expand", "slice",
         "select", "permute", "reshape", "alias", "as_strided", "detach", "_reshape_alias",
         "split", "split_with_sizes", "unbind", "lift_fresh", "empty", "chunk",
         "narrow"}  # fmt: skip
SAME = {"to", "_to_copy", "contiguous", "clone"}


class Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func.overloadpacket)
        leaf = name.split(".")[-1]
        if leaf in VIEWS:
            return out
        if (leaf in SAME and isinstance(out, torch.Tensor) and args
                and isinstance(args[0], torch.Tensor) and out.data_ptr() == args[0].data_ptr()):
            return out  # returned its input: no kernel
        self.ops[name] += 1
        return out


def count(setting: str, blocks: int) -> collections.Counter:
    from transformers import LlamaConfig, LlamaForCausalLM, StaticCache

    cfg = LlamaConfig(hidden_size=256, intermediate_size=768, num_attention_heads=4,
                      num_key_value_heads=4, num_hidden_layers=blocks, vocab_size=1000,
                      max_position_embeddings=256)  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval().to(torch.bfloat16)
    if setting != "bf16":
        rtn_kernels(model, parse_setting(setting), torch.bfloat16)
        fuse_projections(model)
        fuse_norms(model)
        fuse_swiglu(model)
    fuse_rope(model)
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    ids = torch.randint(3, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
    cache = StaticCache(config=cfg, max_cache_len=32)
    with torch.inference_mode():
        model(input_ids=ids, use_cache=True, cache_position=torch.arange(16), **{name: cache})
        with Count() as counter:
            model(input_ids=ids[:, -1:], attention_mask=torch.ones(1, 32, dtype=torch.long),
                  position_ids=torch.tensor([[16]]), use_cache=True,
                  cache_position=torch.tensor([16]), **{name: cache})  # fmt: skip
    return counter.ops


def main() -> int:
    setting = sys.argv[1] if len(sys.argv) > 1 else "W4A8"
    gemm._eager = lambda: False  # the GEMMs through their registered ops: one kernel each
    one, two = count(setting, 1), count(setting, 2)
    per_block = two - one
    print(f"{setting}: {sum(per_block.values())} operators per block, "
          f"{sum(one.values()) - sum(per_block.values())} per step outside the blocks")
    for op, n in per_block.most_common():
        print(f"  {n:3d} {op} (per block)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
