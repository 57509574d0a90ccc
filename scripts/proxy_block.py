"""Block-level proxy of the recipe on SmolLM2-135M (CPU, fp32): one window of two blocks,
trained with variants of CBQConfig, judged by the window loss with hard rounding on held-out
calibration windows (docs/results/smollm2_issue11/cpu_proxy, DECISIONS.md "Recipe").

    THREADS=1 python scripts/proxy_block.py SETTING FIRST_BLOCK '{"name": {config fields}}'

N (24) calibration windows of T (256) tokens of WikiText-2 (validation), the last 4 held
out (FIT=train: the starts' statistics from the other 20 only); the window's input is the
full-precision stream (blocks before it unquantized). ROTATE=
hadamard rotates the model first (as ``--rotate hadamard``); a variant's "act_quantizer" /
"crossquant_alpha" go to the setting, its other fields to CBQConfig. Prints
one JSON line per variant: held-out loss before / after (the kept state), hard and soft
losses at the end of training, the held-out MSE, which state was kept, seconds. A variant's
"harden_gptq": true keeps the end state and hardens it by GPTQ toward the soft-rounded
weights (cbq_ptq.reconstruct.harden_toward_soft; "harden_gptq": "fp": toward the full-precision
weights on the learned grid): "hard_gptq" is its held-out loss, "mse" too.
"""
import copy
import json
import os
import sys
import time

import torch

from cbq_ptq.config import CBQConfig, parse_setting
from cbq_ptq.data import calibration_data
from cbq_ptq.models import arch_spec, blocks, load_model
from cbq_ptq.pipeline import prepare_block
from cbq_ptq.qlinear import QLinear, qlinears
from cbq_ptq.reconstruct import _Window, train_window
from cbq_ptq.streams import capture_inputs, propagate

torch.set_num_threads(int(os.environ.get("THREADS", "2")))
setting, start_block = sys.argv[1], int(sys.argv[2])
variants = json.loads(sys.argv[3])
n, t = int(os.environ.get("N", "24")), int(os.environ.get("T", "256"))
model, tok = load_model("smollm2-135m")
if os.environ.get("ROTATE", "none") != "none":
    from cbq_ptq.rotation import rotate_model

    rotate_model(model, os.environ["ROTATE"], 0)
calib = calibration_data(tok, "wikitext2", n, t, 0)
layers = blocks(model)
x, kwargs = capture_inputs(model, calib)
with torch.no_grad():
    x = propagate(layers, range(0, start_block), x, kwargs, 8, fp=True)
idx = range(start_block, start_block + 2)
# FIT=train: the block's start (CFP statistics, GPTQ's moments) from the training windows
# only, so that the held-out loss judges a start that did not see them (default: all windows)
fit = n - 4 if os.environ.get("FIT", "all") == "train" else n
# DIRECT_FIXED=0: fixed-code layers through the LoRA-Rounding op on the CPU (timing comparison)
QLinear._direct_fixed = os.environ.get("DIRECT_FIXED", "1") != "0"


def act_search(block, xin, kwargs, cfg, grid):
    """Per QLinear of the block: the activation clipping ratio of ``grid`` that minimises the
    output error ||Q_a(x; r) W^T - x W^T||^2 (fp weight) on the first 8 windows' inputs; the
    learned logit starts there."""
    from cbq_kernels.quant_math import quantize_act
    from cbq_ptq.qlinear import clip_logit
    from cbq_ptq.streams import run_block

    seen, hooks = {}, []

    def keep(mod, args, out):
        seen.setdefault(mod, []).append(args[0].detach().flatten(0, -2))

    for q in qlinears([block]):
        hooks.append(q.register_forward_hook(keep))
    with torch.no_grad():
        for i in range(0, 8, 4):
            run_block(block, xin[i: i + 4], kwargs)
    for h in hooks:
        h.remove()
    out = {}
    for q, xs in seen.items():
        xx = torch.cat(xs).float()
        w = q.w_fp
        ref = xx @ w.t()
        errs = []
        for r in grid:
            c, st = quantize_act(xx, cfg.settings.a_bits, r)
            errs.append(float(((c * st) @ w.t() - ref).square().sum()))
        best = grid[min(range(len(grid)), key=errs.__getitem__)]
        q.act_logit.data.copy_(clip_logit(torch.tensor([best])))
        out[q.name] = best
    return out


for name, kw in variants.items():
    m = copy.deepcopy(model)
    ls = blocks(m)
    kw = dict(kw)
    sk = {f: kw.pop(f) for f in ("act_quantizer", "crossquant_alpha") if f in kw}
    t0 = time.time()
    search = kw.pop("act_search", None)  # experiment: a per-layer activation-clip search
    # experiment (issue 15, W4A8 soft-to-hard gap): after training, keep the end state and
    # give every layer codes by GPTQ toward its soft-rounded weight on its learned grid
    harden_gptq = kw.pop("harden_gptq", False)
    cfg = CBQConfig(settings=parse_setting(setting, **sk), holdout=4 / n, eval_points=0, **kw)
    chosen = {}
    for j in idx:
        xin = propagate(ls, range(start_block, j), x, kwargs, 8, fp=False)
        xref = None
        if cfg.gptq_target == "fp":
            xref = propagate(ls, range(start_block, j), x, kwargs, 8, fp=True)[:fit]
        prepare_block(m, j, xin[:fit], kwargs, cfg, xref)
        if search:
            chosen.update(act_search(ls[j], xin, kwargs, cfg, search))
    qls = qlinears(ls[j] for j in idx)
    y = propagate(ls, idx, x, kwargs, 8, fp=True)
    t1 = time.time()
    if harden_gptq:
        import cbq_ptq.reconstruct as rc

        restore, rc._restore = rc._restore, lambda params, saved: None  # the end state stays
        try:
            e = train_window(ls, idx, x, y, y, kwargs, qls, cfg, name, seed=0)
        finally:
            rc._restore = restore
        toward = harden_gptq if isinstance(harden_gptq, str) else "soft"
        rc.harden_toward_soft(ls, idx, x, kwargs, qls, cfg, torch.arange(n - 4), arch_spec(m),
                              toward)  # fmt: skip
        win = _Window(ls, idx, x, y, y, kwargs, cfg, qls)
        e["hard_gptq"] = win.evaluate(torch.arange(n - 4, n), "hard")
        e["kept"] = "end+gptq (forced)"
    else:
        e = train_window(ls, idx, x, y, y, kwargs, qls, cfg, name, seed=0)
    # also the held-out MSE with hard rounding (comparable across losses)
    cm = CBQConfig(settings=cfg.settings, loss="mse", fp_weight=0, holdout=4 / n)
    held = torch.arange(n - 4, n)
    mse = _Window(ls, idx, x, y, y, kwargs, cm, qls).evaluate(held, "hard")

    def r5(v):
        return None if v is None else round(v, 5)

    print(json.dumps({"v": name, "before": r5(e["loss_before"]), "after": r5(e["loss_after"]),
                      "hard_end": r5(e.get("hard_end")), "soft_end": r5(e.get("soft_end")),
                      "hard_gptq": r5(e.get("hard_gptq")),
                      "mse": r5(mse), "kept": e["kept"], "prep_s": round(t1 - t0, 1),
                      "act_ratio": r5(sum(float(q._act_ratio()) for q in qls) / len(qls)),
                      "searched": chosen or None,
                      "train_s": round(time.time() - t1, 1)}), flush=True)  # fmt: skip
