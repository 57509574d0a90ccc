"""Accuracy of a two-level weight format for grouped W4A8 (issue 13, item 2), against the
plain one, round-to-nearest, weights only (activations in full precision, so that the
difference is the format's):

* ``plain``: asymmetric 4-bit codes per group (64 by default, which divides SmolLM2's 576
  columns) with fp32 scales and zero points (today's format): w = s[n, g] (q - z[n, g]).
  The int8 GEMM must rescale every group's int32 partial by s[n, g] in fp32 inside the K
  loop (what serialises the MMA chain).
* ``two-level``: symmetric int8 per output channel first, w8 = round(w / s1[n]) with
  |w8| <= 119, then asymmetric 4-bit codes of w8 per group with an integer scale and zero
  point: w8 ~ s2[n, g] (q - z[n, g]), s2 in 1..16. s2 (q - z) is an integer in [-127, 127],
  so the GEMM multiplies int8 x int8 over the whole K and scales once by s1[n] s_x[m]. The
  range 119 keeps the rounded value inside int8 after the group step (QServe's "protective
  range"; read, not copied). The arithmetic is cbq_kernels.quant_math's
  quantize_weight_two_level (each group's range includes 0, as the plain quantizer's does).

Perplexity on the held-out tenth of the WikiText-2 calibration text (13 windows of 2048) and
the relative weight error per layer type. Run on the 2-core CPU:

    python scripts/two_level.py --out docs/results/issue13/two_level_smollm2_g64.json
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from cbq_kernels.quant_math import dequantize_weight, quantize_weight, quantize_weight_two_level
from cbq_ptq.evaluate import evaluate_perplexity
from cbq_ptq.models import load_model


def plain(w: torch.Tensor, group: int) -> torch.Tensor:
    codes, s, z = quantize_weight(w, 4, group)
    return dequantize_weight(codes, s, z, group, torch.float32)


def two_level(w: torch.Tensor, group: int) -> torch.Tensor:
    codes, s1, s2, z = quantize_weight_two_level(w, group)
    return dequantize_weight(codes, s1[:, None] * s2.float(), z.float(), group, torch.float32)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--group", type=int, default=64, help="must divide every K (SmolLM2: 576)")
    p.add_argument("--windows", type=int, default=None, help="held-out windows (default all)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(2)
    model, tok = load_model(args.model, dtype=torch.float32, device="cpu")
    result: dict = {"model": args.model, "group": args.group, "split": "heldout"}
    ev = {"split": "heldout", "max_windows": args.windows}
    t0 = time.time()
    result["fp32"] = evaluate_perplexity(model, tok, "wikitext2", **ev)["ppl"]
    for name, fn in (("plain", plain), ("two_level", two_level)):
        m = copy.deepcopy(model)
        err: dict[str, list[float]] = {}
        for lname, lin in m.named_modules():
            if isinstance(lin, torch.nn.Linear) and ".layers." in f".{lname}":
                w = lin.weight.data
                wq = fn(w, args.group)
                kind = lname.rsplit(".", 1)[-1]
                err.setdefault(kind, []).append(float((wq - w).norm() / w.norm()))
                lin.weight.data = wq.to(w.dtype)
        result[name] = {
            "ppl": evaluate_perplexity(m, tok, "wikitext2", **ev)["ppl"],
            "rel_weight_error": {k: sum(v) / len(v) for k, v in sorted(err.items())},
        }
        print(name, json.dumps(result[name]), flush=True)
    result["seconds"] = round(time.time() - t0, 1)
    result["torch"] = torch.__version__
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
