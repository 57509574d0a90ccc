"""Compare RTN, block-wise reconstruction and CBQ (and ablations) on stories260K (CPU).

    python scripts/ptq_compare.py SETTING EPOCHS RUNS
    e.g. python scripts/ptq_compare.py W4A8 20 rtn,bw,cbq,cbq_nocfp

32 calibration windows of 256 tokens from the second half of tinystories-valid-prefix.txt
(seed 0); perplexity on the first 64 evaluation windows of 512 tokens, each starting with BOS.
Prints one line per run: setting, run, perplexity, seconds, and per window the loss before
and after training (hard rounding). Results: docs/results/stories260K_cpu.md.
"""

import copy
import sys
import time

from cbq_ptq.config import CBQConfig, parse_setting
from cbq_ptq.data import calibration_data
from cbq_ptq.evaluate import evaluate_perplexity
from cbq_ptq.models import load_model
from cbq_ptq.pipeline import quantize

base, tok = load_model("stories260K")
calib = calibration_data(tok, "tinystories", 32, 256, seed=0)  # from the file's second half


def ppl(m):
    return evaluate_perplexity(m, tok, "tinystories", 512, bos=True, max_windows=64)["ppl"]


S = parse_setting(sys.argv[1], ragged_groups=True)
E = int(sys.argv[2])
runs = {
    "rtn": CBQConfig(settings=S, cfp=False, lora_rounding=False, epochs=0, window=1, overlap=0),
    "bw": CBQConfig(settings=S, cfp=False, epochs=E, window=1, overlap=0),
    "cbq": CBQConfig(settings=S, epochs=E),
    "cbq_nocfp": CBQConfig(settings=S, epochs=E, cfp=False),
    "cbq_trunc": CBQConfig(settings=S, epochs=E, cfp_weights=True),
    "cbq_nolora": CBQConfig(settings=S, epochs=E, lora_rounding=False),
    "cbq_nooverlap": CBQConfig(settings=S, epochs=E, window=2, overlap=0),
    # the measured choices of DECISIONS.md (block-wise, W4A16 there)
    "bw_clip_only": CBQConfig(settings=S, cfp=False, lora_rounding=False, epochs=E, window=1,
                              overlap=0),
    "bw_svd_lr1e-3": CBQConfig(settings=S, cfp=False, epochs=E, window=1, overlap=0,
                               lora_init="svd", lr_lora=1e-3),
    "bw_svd": CBQConfig(settings=S, cfp=False, epochs=E, window=1, overlap=0, lora_init="svd"),
    "bw_lr1e-3": CBQConfig(settings=S, cfp=False, epochs=E, window=1, overlap=0, lr_lora=1e-3),
    "cfp_rtn": CBQConfig(settings=S, lora_rounding=False, epochs=0, window=1, overlap=0,
                         cfp_activations=True, cfp_weights=True),
}  # fmt: skip
for name in sys.argv[3].split(","):
    m = copy.deepcopy(base)
    t0 = time.time()
    m, log = quantize(m, runs[name], calib, progress=False)
    print(
        sys.argv[1],
        name,
        round(ppl(m), 3),
        f"{time.time() - t0:.1f}s",
        [(round(e["loss_before"], 4), round(e["loss_after"], 4)) for e in log],
        flush=True,
    )
