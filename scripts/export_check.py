"""Issue 16's GPU check: a SmolLM2-135M CBQ model (folder written by `cbq quantize`) exported
to compressed-tensors, loaded by transformers (with the compressed-tensors package) and scored
with the same protocol and code as `cbq eval` (cbq_ptq.evaluate.evaluate_perplexity, all
WikiText-2 test windows by default); the same for `cbq eval` of the original folder
(fake-quantized layers, and the kernels). One JSON line per model.

    python scripts/export_check.py CBQ_FOLDER EXPORT_FOLDER [--windows N] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cbq_ptq.evaluate import evaluate_perplexity
from cbq_ptq.io import load


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("cbq")
    ap.add_argument("export")
    ap.add_argument("--windows", type=int, default=None, help="test windows (default: all)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.cbq)
    meta = json.loads((Path(args.cbq) / "quant_config.json").read_text())
    ev = {"corpus": "wikitext2", "seq_len": 2048, "bos": False, "max_windows": args.windows}
    rows = []

    def score(tag, model):
        t0 = time.time()
        r = evaluate_perplexity(model, tok, **ev)
        rows.append(
            {
                "model": tag,
                "setting": meta["settings"],
                "ppl": r["ppl"],
                "windows": r["windows"],
                "seconds": round(time.time() - t0, 1),
            }
        )
        print(json.dumps(rows[-1]), flush=True)

    score("cbq eval (fake-quantized, bf16)", load(args.cbq, device="cuda").to(torch.bfloat16))
    hf = AutoModelForCausalLM.from_pretrained(args.export, dtype=torch.bfloat16).cuda().eval()
    score("transformers + compressed-tensors (export)", hf)
    del hf
    score(
        "cbq eval of the export (import, bf16)", load(args.export, device="cuda").to(torch.bfloat16)
    )
    if args.out:
        with open(args.out, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
