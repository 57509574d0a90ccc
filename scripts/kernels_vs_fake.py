"""The served model's kernel path against its fake-quantized model on one window: the largest
logit difference, the argmax agreement and, per decoder sub-module (attention, MLP, norms),
the largest output difference against the output's magnitude, to find the first layer
that departs (docs/results/issue14/README.md: the CrossQuant model of 2d9c58b).

    python scripts/kernels_vs_fake.py SAVED_MODEL [--device cpu] [--dtype float32] [--tokens 256]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cbq_ptq.data import load_text
from cbq_ptq.generate import load_for_generation


def outputs(model, store: dict) -> None:
    """Record the output of every sub-module of each decoder block (model.layers.I.NAME)."""
    for name, module in model.named_modules():
        parts = name.split(".")
        if len(parts) == 4 and parts[1] == "layers":
            module.register_forward_hook(
                lambda m, i, o, name=name: store.__setitem__(
                    name, (o[0] if isinstance(o, tuple) else o).detach().float().cpu()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--tokens", type=int, default=256)
    args = p.parse_args()
    kern, tok, table = load_for_generation(args.model, args.device,
                                           dtype=getattr(torch, args.dtype))  # fmt: skip
    fake, _, _ = load_for_generation(args.model, args.device, kernels=False,
                                     dtype=getattr(torch, args.dtype))  # the same dtype
    print("kernel layers:", sorted(set(table.values())))
    ids = tok(load_text("wikitext2")[:20000], return_tensors="pt")["input_ids"]
    ids = ids[:, : args.tokens].to(args.device)
    got, want = {}, {}
    outputs(kern, got)
    outputs(fake, want)
    with torch.no_grad():
        a = kern(ids).logits.float().cpu()
        b = fake(ids).logits.float().cpu()
    print(f"logits: max difference {float((a - b).abs().max()):.4g}, argmax agreement "
          f"{float((a.argmax(-1) == b.argmax(-1)).float().mean()):.4f}")  # fmt: skip
    for name, w in want.items():
        if name in got:
            print(f"{name}: {float((got[name] - w).abs().max()):.4g} of {float(w.abs().max()):.4g}")


if __name__ == "__main__":
    main()
