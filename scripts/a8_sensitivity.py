"""How far a model with 8-bit activations agrees with itself under a change of rounding, on
the CPU in fp32 (issue 14's greedy check: 30 of 32 continuations equal for 16 tokens):

* ``unfused_vs_reference``: the served model's PyTorch path with the RMSNorms left where they
  are (``fuse_norms=False``) against the fake-quantized reference: the same arithmetic, so the
  same bits (the floor a correct implementation reaches when it rounds as the reference does);
* ``fused_norms_vs_reference``: the same with the RMSNorms moved into the activation
  quantizer (the served default: ``x * (1 / sqrt(ms + eps))`` in place of transformers'
  ``x * rsqrt(mean + eps)``, a few units in the last place of fp32): the only difference;
* ``reference_batch1_vs_batch8``: the reference one prompt at a time against eight at a time;
* ``codes``: on the first ``--tokens-direct`` tokens of WikiText-2, the activation codes of
  every attention-norm quantizer from the two norm formulas on the same inputs (the direct
  flips, before any propagation) and the normed values' largest difference in fp32 units;
* ``ppl_wikitext2_first_N_windows``: the WikiText-2 perplexity of the first 2048-token window
  through the reference, the unfused and the fused served model (``--ppl-windows``).

    python scripts/a8_sensitivity.py OUT/model [--out result.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from check_generate import first_difference, prompts

from cbq_kernels.act_quant import act_quant_ref, rms_norm_fp32
from cbq_kernels.rmsnorm import rms_norm_ref
from cbq_ptq.data import load_text
from cbq_ptq.evaluate import evaluate_perplexity
from cbq_ptq.generate import generate, load_for_generation


def direct_flips(model, tokenizer, tokens: int) -> dict:
    ids = tokenizer(load_text("wikitext2")[: 12 * tokens], return_tensors="pt")["input_ids"]
    ids = ids[:, :tokens]
    seen = []
    hooks = [
        layer.input_layernorm.register_forward_hook(
            lambda mod, inp, out: seen.append((inp[0][0], mod))
        )
        for layer in model.model.layers
    ]
    with torch.inference_mode():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    total = differ = 0
    worst = 0.0
    for x, norm in seen:
        weight = norm.weight.detach()
        eager = rms_norm_ref(x, weight, norm.variance_epsilon)
        q_eager, _ = act_quant_ref(eager, 8)
        q_fused, _ = act_quant_ref(x, 8, norm_weight=weight, norm_eps=norm.variance_epsilon)
        fused = rms_norm_fp32(x.float(), weight, norm.variance_epsilon)
        rel = (eager - fused).abs() / eager.abs().clamp_min(1e-30)
        worst = max(worst, float(rel.max()) / torch.finfo(torch.float32).eps)
        total += q_eager.numel()
        differ += int((q_eager != q_fused).sum())
    return {"tokens": int(ids.shape[1]), "quantizers": len(seen), "codes": total,
            "differing": differ, "normed_max_relative_in_eps": round(worst, 2)}  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("model")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--tokens-direct", type=int, default=2048)
    p.add_argument("--ppl-windows", type=int, default=1)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    texts = prompts(args.prompts)
    ref, tok, _ = load_for_generation(args.model, "cpu", kernels=False)
    want = generate(ref, tok, texts, max_new_tokens=args.tokens, batch_size=8)
    alone = generate(ref, tok, texts, max_new_tokens=args.tokens, batch_size=1)

    def equal(a, b) -> int:
        return sum(first_difference(x, y, args.tokens) == args.tokens
                   for x, y in zip(a.tokens, b.tokens, strict=True))  # fmt: skip

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=Path(__file__).parent).stdout.strip()  # fmt: skip
    result = {"model": args.model, "commit": commit, "prompts": len(texts),
              "tokens": args.tokens, "dtype": "float32", "device": "cpu",
              "torch": torch.__version__}  # fmt: skip
    def ppl(model) -> float:
        return round(evaluate_perplexity(model, tok, "wikitext2", seq_len=2048, bos=False,
                                         max_windows=args.ppl_windows)["ppl"], 4)  # fmt: skip

    ppls = {"reference": ppl(ref)}
    for key, fuse_norms in (("unfused_vs_reference", False), ("fused_norms_vs_reference", True)):
        served, _, _ = load_for_generation(args.model, "cpu", fuse_norms=fuse_norms)
        result[key] = equal(generate(served, tok, texts, max_new_tokens=args.tokens,
                                     batch_size=8), want)  # fmt: skip
        ppls["fused_norms" if fuse_norms else "unfused"] = ppl(served)
    result[f"ppl_wikitext2_first_{args.ppl_windows}_windows"] = ppls
    result["reference_batch1_vs_batch8"] = equal(alone, want)
    result["codes"] = direct_flips(ref, tok, args.tokens_direct)
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
