"""Perplexity of saved quantized models on the held-out tenth of a calibration corpus (the
split recipes are chosen on, cbq_ptq.data, split 'heldout'), all its windows by default.

    python scripts/heldout_ppl.py OUT1/model OUT2/model [--corpus wikitext2] [--windows N]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cbq_ptq.evaluate import evaluate_perplexity
from cbq_ptq.io import load


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("models", nargs="+", help="folders written by cbq quantize (OUT/model)")
    p.add_argument("--corpus", default="wikitext2")
    p.add_argument("--windows", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=2048)
    args = p.parse_args()
    from transformers import AutoTokenizer

    for path in args.models:
        model, tok = load(path), AutoTokenizer.from_pretrained(path)
        r = evaluate_perplexity(model, tok, args.corpus, seq_len=args.seq_len,
                                max_windows=args.windows, split="heldout")  # fmt: skip
        print(f"{path}: held-out perplexity {r['ppl']:.3f} ({r['windows']} windows)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
