"""How far serve.fuse_norms moves the logits of a random 2-block Llama on the GPU, against the
rounding noise of the activation quantizer (the table in
benchmarks/results/h200/bench_generate_401f61a_norms.md):

    python scripts/diag_fuse_norms.py        # on a GPU, from the repository root

Per setting and row count: max / mean |difference| relative to the reference's max / mean
|logit| for fused vs unfused, unfused vs the bf16 (unquantized) model, fused vs bf16, and
fused vs unfused with every norm weight 1 (then only the bf16 rounding of the normed values
differs between the two)."""

import copy

import torch

from cbq_ptq.config import parse_setting
from cbq_ptq.serve import fuse_norms, fuse_projections, rtn_kernels
from tests.conftest import random_llama


def rel_max(a, b):
    return float((a - b).abs().max() / b.abs().max())


def rel_mean(a, b):
    return float((a - b).abs().mean() / b.abs().mean())


def main() -> None:
    for setting in ("W4A8", "W4A4"):
        ref = random_llama(512, 1408, heads=8, vocab=1000, device="cuda", dtype=torch.bfloat16)
        g = torch.Generator(device="cuda").manual_seed(5)
        ones = copy.deepcopy(ref)
        for a, b in zip(ref.model.layers, ones.model.layers, strict=True):
            for name in ("input_layernorm", "post_attention_layernorm"):
                w = getattr(a, name).weight
                w.data = (torch.rand(w.shape, generator=g, device="cuda") + 0.5).to(w.dtype)
                getattr(b, name).weight.data.fill_(1)
        model = copy.deepcopy(ref)
        for m in (model, ones):
            rtn_kernels(m, parse_setting(setting), torch.bfloat16)
            fuse_projections(m)
        fused, fused_ones = copy.deepcopy(model), copy.deepcopy(ones)
        fuse_norms(fused)
        fuse_norms(fused_ones)
        for rows in (1, 2, 16, 48):
            ids = torch.randint(3, 1000, (2, rows), generator=torch.Generator().manual_seed(rows))
            with torch.no_grad():
                r, u, f, o, fo = (m(ids.cuda()).logits.float()
                                  for m in (ref, model, fused, ones, fused_ones))  # fmt: skip
            print(f"{setting} rows={rows}: fused-unfused {rel_max(f, u):.3f}/{rel_mean(f, u):.3f}"
                  f" | unfused-bf16 {rel_max(u, r):.3f}/{rel_mean(u, r):.3f}"
                  f" | fused-bf16 {rel_max(f, r):.3f}/{rel_mean(f, r):.3f}"
                  f" | norm weights 1: fused-unfused {rel_max(fo, o):.3f}/{rel_mean(fo, o):.3f}",
                  flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
