"""End-to-end proxy of the recipe on stories260K (CPU): variants of CBQConfig at one setting,
perplexity on the first 32 TinyStories windows of 512 tokens (BOS), 32 calibration windows
of 256 tokens (docs/results/smollm2_issue11/cpu_proxy/st1.txt).

    python scripts/proxy_stories.py SETTING '{"name": {config fields}}'
"""

import copy
import json
import sys
import time

import torch

from cbq_ptq.config import CBQConfig, parse_setting
from cbq_ptq.data import calibration_data
from cbq_ptq.evaluate import evaluate_perplexity
from cbq_ptq.models import load_model
from cbq_ptq.pipeline import quantize

torch.set_num_threads(1)
model, tok = load_model("stories260K")
calib = calibration_data(tok, "tinystories", 32, 256, 0)
ev = dict(corpus="tinystories", seq_len=512, bos=True, max_windows=32)
variants = json.loads(sys.argv[2])
for name, kw in variants.items():
    m = copy.deepcopy(model)
    cfg = CBQConfig(settings=parse_setting(sys.argv[1], ragged_groups=True), **kw)
    t = time.time()
    m, log = quantize(m, cfg, calib, progress=False)
    ppl = evaluate_perplexity(m, tok, **ev)["ppl"]
    print(json.dumps({"s": sys.argv[1], "v": name, "ppl": round(ppl, 3),
                      "sec": round(time.time() - t, 1), "kept": [e.get("kept") for e in log]}),
          flush=True)  # fmt: skip
