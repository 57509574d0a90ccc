"""How often a model's greedy continuations survive a change of batch size: the prompts of
scripts/check_generate.py generated one at a time and eight at a time (left padding: only the
rounding of the reductions differs), and the count of prompts whose first TOKENS tokens are
equal. The noise floor of issue 14's greedy check (kernels against the fake-quantized model):
a quantized model whose activation codes flip at rounding boundaries can lose it where the
unquantized model keeps it.

    python scripts/batch_consistency.py smollm2-135m            # the unquantized model
    python scripts/batch_consistency.py OUT/model               # a saved model, fake-quantized
    python scripts/batch_consistency.py OUT/model --kernels     # ... or through the kernels
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cbq_ptq.generate import generate, load_for_generation
from scripts.check_generate import first_difference, prompts


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("model", help="a saved folder (cbq quantize) or a model name")
    p.add_argument("--kernels", action="store_true", help="a saved model through the kernels")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--tokens", type=int, default=16)
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    if (Path(args.model) / "quant_config.json").is_file():
        model, tok, _ = load_for_generation(args.model, args.device, kernels=args.kernels,
                                            dtype=dtype)  # fmt: skip
    else:
        from cbq_ptq.models import load_model

        model, tok = load_model(args.model, dtype=dtype, device=args.device)
    texts = prompts(args.prompts)
    runs = {b: generate(model, tok, texts, max_new_tokens=args.tokens, batch_size=b).tokens
            for b in (1, 8)}  # fmt: skip
    first = [first_difference(a, b, args.tokens) for a, b in zip(runs[1], runs[8],
                                                                  strict=True)]  # fmt: skip
    print(json.dumps({"model": args.model, "kernels": args.kernels, "device": args.device,
                      "dtype": args.dtype, "prompts": len(texts), "tokens": args.tokens,
                      "equal_batch1_vs_batch8": sum(f == args.tokens for f in first),
                      "first_difference": sorted(f for f in first if f < args.tokens)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
