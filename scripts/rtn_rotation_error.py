"""Per-layer output error of 4-bit per-channel RTN on SmolLM2-135M, unrotated, with the
RMSNorm scales folded into the next linears only, and folded + rotated (rotation.rotate_model):
||X (W_q - W)^T|| / ||X W^T|| on 512 WikiText-2 validation tokens, mean over the 30 blocks per
projection (docs/results/issue15/README.md, "RTN and the rotation").

    python scripts/rtn_rotation_error.py     # CPU, ~1 min; SmolLM2 from cbq's cache"""

import collections

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cbq_kernels.quant_math import dequantize_weight, quantize_weight
from cbq_ptq import rotation
from cbq_ptq.data import load_text
from cbq_ptq.models import arch_spec, blocks, smollm2_path


def errors(model, ids) -> dict[str, float]:
    inputs, hooks = {}, []

    def keep(name):
        return lambda mod, args: inputs.__setitem__(name, args[0].reshape(-1, args[0].shape[-1]))

    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and "lm_head" not in name:
            hooks.append(m.register_forward_pre_hook(keep(name)))
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    out = collections.defaultdict(list)
    for name, m in model.named_modules():
        if name in inputs:
            x, w = inputs[name], m.weight.detach().float()
            rot = rotation.of(m)
            if rot is not None:
                x = rot(x)
            q, s, z = quantize_weight(w, 4)
            err = (x @ (dequantize_weight(q, s, z, None) - w).t()).norm() / (x @ w.t()).norm()
            out[name.split(".")[-1]].append(float(err))
    return {k: round(sum(v) / len(v), 4) for k, v in out.items()}


def main() -> None:
    path = smollm2_path()
    tok = AutoTokenizer.from_pretrained(path)
    text = load_text("wikitext2", "calib")[:20000]  # the start of the validation split
    ids = tok(text, return_tensors="pt").input_ids[:, :512]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    print("unrotated       ", errors(model, ids))
    spec = arch_spec(model)
    folded = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        for block in blocks(folded):
            for norm, names in ((spec.attn_norm, spec.qkv), (spec.mlp_norm, spec.gate_up)):
                rotation._fold_norm(block.get_submodule(norm),
                                    [block.get_submodule(n) for n in names])  # fmt: skip
    print("norms folded    ", errors(folded, ids))
    with torch.no_grad():
        rotation.rotate_model(model, "hadamard", 0)
    print("folded + rotated", errors(model, ids))


if __name__ == "__main__":
    main()
