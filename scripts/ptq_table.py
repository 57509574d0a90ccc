"""The SmolLM2-135M result table of issue 11: RTN, GPTQ, block-wise reconstruction and CBQ at
every setting, ablations and recipe variants, one process per run, several at a time on one
GPU (a 135M model leaves it mostly idle).

    python scripts/ptq_table.py --results DIR [--mirror FILE] [--workers 12] [--jobs all]
    python scripts/ptq_table.py --results DIR --csv docs/results/smollm2_wikitext2.csv
    python scripts/ptq_table.py --results DIR --summarize

A job is SETTING-METHOD, e.g. W3A16g64-cbq, W2A16g32-gptq, W4A16-cbq_nolora. Methods:
rtn, gptq, bw (block-wise: K = 1, O = 0, no CFP, CBQ's recipe otherwise), cbq (the default
recipe of cbq_ptq.config.recipe), and the ablations and variants of VARIANTS (each a change
of the default recipe). Every run writes DIR/NAME.json: its configuration, WikiText-2 and
PTB test perplexity on all windows (unless --eval-windows), the perplexity on the held-out
tenth of the calibration text (what recipes are chosen on), quantization seconds, the
per-window log, peak GPU memory, GPU, commit. Runs already in DIR are skipped, so an
interrupted table resumes; --mirror rewrites FILE (JSON lines) after each run; --deadline S
starts no run after S seconds.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cbq_ptq.config import LORA_RECIPE  # noqa: E402  (plain dataclasses: no torch import)

SETTINGS = ["W4A16", "W4A16g64", "W3A16g64", "W2A16g64", "W2A16g32", "W4A8", "W6A6", "W8A8"]
BASE = {  # method -> CBQConfig fields replacing the recipe's
    "rtn": {"epochs": 0, "steps": None, "cfp": False, "lora_rounding": False, "window": 1,
            "overlap": 0},
    "gptq": {"method": "gptq", "cfp": False, "window": 1, "overlap": 0},
    "bw": {"cfp": False, "window": 1, "overlap": 0},
    "cbq": {},
    # GPTQ toward the full-precision model's outputs (CBQConfig.gptq_target 'fp', GPTAQ's
    # asymmetric objective) instead of the weight on the quantized stream
    "gptqfp": {"method": "gptq", "cfp": False, "window": 1, "overlap": 0, "gptq_target": "fp"},
}  # fmt: skip
UNTRAINED = ("rtn", "gptq", "gptqfp")  # the baselines: per-token activations, no training
VARIANTS = {  # ablations / recipe variants: changes of the default CBQ recipe
    "cbq_rtninit": {"init": "rtn"},
    "cbq_nolora": {"lora_rounding": False, "init": "rtn"},  # clipping alone (issue 11's probe)
    "cbq_soft": {"round_mode": "soft"},
    "cbq_ste": {"round_mode": "ste"},
    "cbq_temp": {"round_temp": (1.0, 0.1)},
    "cbq_mse": {"loss": "mse"},
    "cbq_kl": {"kl_weight": 1.0},
    "cbq_fp1": {"fp_weight": 1.0},
    "cbq_steps2x": {"steps": "2x"},
    "cbq_lr2x": {"lr": "2x", "lr_lora": "2x"},
    "cbq_lrhalf": {"lr": "0.5x", "lr_lora": "0.5x"},
    "cbq_lrquarter": {"lr": "0.25x", "lr_lora": "0.25x"},
    # the held-out loss checked every 8 of 128 steps (the recipe: 32, 64, 96, 128): rotated W4A8
    # windows kept their step-32 state (2d9c58b), so finer checks may keep a better one
    "cbq_evalfine": {"eval_points": 15},
    "cbq_nocfp": {"cfp": False},
    # the activation clipping ratio's start (learned from there): 1.0 barely moves (< 0.5% in
    # 128 steps); the rotated A4 recipe starts at 0.8 (config.rotated_recipe)
    "cbq_aclip100": {"act_clip": 1.0},
    "cbq_aclip90": {"act_clip": 0.9},
    "cbq_aclip70": {"act_clip": 0.7},
    "cbq_nooverlap": {"window": 2, "overlap": 0},
    # the recipe keeps the GPTQ codes and trains the steps (config.recipe, from the CPU proxy
    # docs/results/issue15/cpu_proxy/rounding_base.txt); LoRA-Rounding back on, with the
    # base fixed in step units (the default lora_base) and re-derived from the step (the
    # recipe up to 5441745), and the fixed-code recipe at twice the clipping rate
    "cbq_lora": {**LORA_RECIPE},
    "cbq_lorastep": {**LORA_RECIPE, "lora_base": "step"},
    "cbq_codes_lr2x": {"lr": "2x"},
    # the fixed-code recipe at the learning rate the block proxy preferred (the default from
    # 268d4d3 until the end-to-end CPU run disagreed: config.recipe)
    "cbq_codes_lr02": {"lr": 2e-2},
    "cbq_gptqfp": {"gptq_target": "fp"},  # the start: GPTQ toward the fp outputs
    "cbq_crossquant": {},  # activations forced to CrossQuant (config_for)
    "cbq_pertoken": {},  # activations forced to per token (config_for)
}
CSV_FIELDS = ["setting", "method", "act_quantizer", "rotate", "init", "rounding", "steps", "epochs",
              "ppl_wikitext2", "ppl_ptb", "ppl_heldout", "windows", "windows_kept_start",
              "quantize_seconds", "gpu", "commit", "job"]  # fmt: skip


def config_for(name: str):
    """(settings, CBQConfig) of a job name."""
    from cbq_ptq.config import (
        CBQConfig,
        default_act_quantizer,
        parse_setting,
        recipe,
        rotated_recipe,
    )

    setting, method = name.split("-", 1)
    rotate = method.endswith("_rotate")  # e.g. cbq_rotate, rtn_rotate: Hadamard rotation first
    if rotate:
        method = method[: -len("_rotate")]
    # the baselines quantize activations per token (the usual reference); CBQ and its variants
    # take the CLI's default (CrossQuant where activations are quantized, from 8c3a96f's
    # held-out table; per token on a rotated model, from e2455c7's); cbq_pertoken /
    # cbq_crossquant force one or the other
    a_bits = parse_setting(setting).a_bits
    quantizer = default_act_quantizer(a_bits, "cuda", rotated=rotate)
    if method in (*UNTRAINED, "bw", "cbq_pertoken"):
        quantizer = "per_token"
    elif method == "cbq_crossquant":
        quantizer = "crossquant"
    settings = parse_setting(setting, act_quantizer=quantizer, ragged_groups=True)
    fields = recipe(settings, "cuda")
    if rotate and method not in UNTRAINED:  # the CLI's rotated recipe (CBQ runs, as
        fields.update(rotated_recipe(settings))  # `cbq quantize`); a variant's changes after it
    default = CBQConfig(settings=settings, **fields)
    changes = BASE.get(method, VARIANTS.get(method))
    if changes is None:
        raise ValueError(f"unknown method {method!r} in job {name!r}")
    for key, value in changes.items():
        if isinstance(value, str) and value.endswith("x"):  # a multiple of the default
            value = float(value[:-1]) * getattr(default, key)
            value = int(value) if key == "steps" else value
        fields[key] = value
    if rotate:
        fields["rotate"] = "hadamard"
    return settings, CBQConfig(settings=settings, **fields)


def run_one(args, name: str) -> dict:
    import dataclasses

    import torch

    from cbq_ptq.data import calibration_data
    from cbq_ptq.evaluate import evaluate_perplexity, kernel_proportions
    from cbq_ptq.models import load_model
    from cbq_ptq.pipeline import quantize

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_num_threads(1 if device == "cuda" else 2)  # one core per run beside the others
    dtype = torch.float32 if name == "fp32" else getattr(torch, args.dtype)
    model, tok = load_model(args.model, dtype=dtype, device=device)
    ev = {"seq_len": args.seq_len, "bos": args.bos, "max_windows": args.eval_windows}
    result: dict = {"name": name, "model": args.model, "dtype": str(dtype).split(".")[1]}
    if "-" in name:
        settings, config = config_for(name)
        calib = calibration_data(tok, args.calib, args.n_calib, args.calib_len, seed=0)
        t0 = time.time()
        model, log = quantize(model, config, calib, progress=False)
        result.update(
            setting=name.split("-", 1)[0], method=name.split("-", 1)[1],
            quantize_seconds=round(time.time() - t0, 1),
            calibration=[args.calib, args.n_calib, args.calib_len],
            config=json.loads(json.dumps(dataclasses.asdict(config), default=str)),
            windows=log,
        )  # fmt: skip
        if settings.a_bits < 16:
            result["kernel_proportion"] = kernel_proportions(
                model, tok, args.corpus, max_windows=1, seq_len=ev["seq_len"], bos=ev["bos"])
    result[args.corpus] = evaluate_perplexity(model, tok, args.corpus, **ev)
    result["heldout"] = evaluate_perplexity(model, tok, args.calib, split="heldout", **ev)
    if args.ptb:
        result["ptb"] = evaluate_perplexity(model, tok, "ptb", **ev)
    result["eval_windows"] = args.eval_windows or "all"
    if device == "cuda":
        result["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
        result["gpu"] = torch.cuda.get_device_name()
    result["torch"] = torch.__version__
    result["commit"] = os.environ.get("CBQ_COMMIT", "unknown")
    return result


def load_runs(*sources: Path) -> dict[str, dict]:
    """Runs by name from result folders (NAME.json) and JSON-lines files, in order: a later
    source's run replaces an earlier one of the same name, which stays as NAME@COMMIT when
    it came from another commit (so older ablations keep their rows, marked by commit)."""
    runs: dict[str, dict] = {}
    for src in sources:
        src = Path(src)
        if src.is_dir():
            found = [json.loads(p.read_text()) for p in sorted(src.glob("*.json"))]
        else:
            found = [json.loads(line) for line in src.read_text().splitlines() if line.strip()]
        for r in found:
            old = runs.get(r["name"])
            if old is not None and old.get("commit") != r.get("commit"):
                runs[f"{r['name']}@{old.get('commit')}"] = old
            runs[r["name"]] = r
    return runs


def mirror(results: Path, target: str | None) -> None:
    if not target:
        return
    lines = [p.read_text().strip() for p in sorted(results.glob("*.json"))]
    tmp = Path(target + ".partial")
    tmp.write_text("".join(line + "\n" for line in lines))
    tmp.replace(target)


def _act_quantizer(r: dict) -> str:
    settings = r.get("config", {}).get("settings", {})
    return settings.get("act_quantizer", "") if settings.get("a_bits", 16) < 16 else ""


def _rounding(cfg: dict) -> str:
    """The rounding column: LoRA-Rounding's mode, the start's fixed codes (a GPTQ start
    without LoRA-Rounding) or round-to-nearest; '+base' where the candidates stay fixed in
    step units (lora_base 'start')."""
    if cfg.get("lora_rounding"):
        label = "lora-" + cfg.get("round_mode", "soft")
    else:
        label = "fixed" if cfg.get("init") == "gptq" else "nearest"
    return label + ("+base" if cfg.get("lora_base") == "start" and label != "nearest" else "")


def csv_rows(runs: dict[str, dict], corpus: str = "wikitext2") -> list[dict]:
    rows = []
    def ppl(r: dict, key: str):
        return round(r[key]["ppl"], 3) if key in r else ""

    for name, r in sorted(runs.items()):
        cfg = r.get("config", {})
        method = r.get("method")
        trains = method is not None and method.removesuffix("_rotate") not in UNTRAINED
        rows.append({
            "setting": r.get("setting", "FP"), "method": r.get("method", name),
            "act_quantizer": _act_quantizer(r),
            "rotate": "" if cfg.get("rotate", "none") == "none" else cfg["rotate"],
            "init": cfg.get("init", "") if trains else "",
            "rounding": _rounding(cfg) if trains else "",
            "windows_kept_start": sum(e.get("kept") == "start" for e in r.get("windows") or [])
            if trains else "",
            "steps": cfg.get("steps") if trains and cfg.get("steps") is not None else "",
            "epochs": cfg.get("epochs", "") if trains and cfg.get("steps") is None else "",
            "ppl_wikitext2": ppl(r, corpus), "ppl_ptb": ppl(r, "ptb"),
            "ppl_heldout": ppl(r, "heldout"),
            "windows": r.get(corpus, {}).get("windows", ""),
            "quantize_seconds": r.get("quantize_seconds", ""), "gpu": r.get("gpu", "cpu"),
            "commit": r.get("commit", ""), "job": name,
        })  # fmt: skip
    return rows


def write_csv(runs: dict[str, dict], path: str) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, CSV_FIELDS)
        w.writeheader()
        w.writerows(csv_rows(runs))


def summarize(runs: dict[str, dict], corpus: str = "wikitext2") -> str:
    def ppl(name, key=corpus):
        r = runs.get(name)
        return f"{r[key]['ppl']:.2f}" if r and key in r else "-"

    out = [f"FP32 {ppl('fp32')} / BF16 {ppl('bf16')} ({corpus}); PTB {ppl('bf16', 'ptb')}; "
           f"held-out {ppl('bf16', 'heldout')}", "",
           "| setting | RTN | GPTQ | block-wise | CBQ | held-out: RTN / GPTQ / BW / CBQ |",
           "|---|---|---|---|---|---|"]  # fmt: skip
    for s in SETTINGS:
        held = " / ".join(ppl(f"{s}-{m}", "heldout") for m in ("rtn", "gptq", "bw", "cbq"))
        out.append(f"| {s} | {ppl(s + '-rtn')} | {ppl(s + '-gptq')} | {ppl(s + '-bw')} | "
                   f"{ppl(s + '-cbq')} | {held} |")  # fmt: skip
    extra = sorted(n for n in runs if "-" in n and n.split("-", 1)[1] in VARIANTS)
    if extra:
        out += ["", "| run | WikiText-2 | held-out | PTB | CBQ default: WikiText-2 / held-out |",
                "|---|---|---|---|---|"]  # fmt: skip
        for n in extra:
            s = n.split("-", 1)[0]
            out.append(f"| {n} | {ppl(n)} | {ppl(n, 'heldout')} | {ppl(n, 'ptb')} | "
                       f"{ppl(s + '-cbq')} / {ppl(s + '-cbq', 'heldout')} |")  # fmt: skip
    out += ["", "| run | quantize s | peak GPU MiB | windows kept start / total |",
            "|---|---|---|---|"]  # fmt: skip
    for name in sorted(runs):
        r = runs[name]
        wins = r.get("windows") or []
        kept = sum(1 for e in wins if e.get("kept") == "start")
        trained = sum(1 for e in wins if "kept" in e)
        out.append(f"| {name} | {r.get('quantize_seconds', '-')} | {r.get('peak_gpu_mib', '-')} "
                   f"| {kept} / {trained} |")  # fmt: skip
    return "\n".join(out)


def all_jobs() -> list[str]:
    jobs = ["fp32", "bf16"]
    jobs += [f"{s}-{m}" for m in ("rtn", "gptq", "cbq", "bw") for s in SETTINGS]
    return jobs


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--results", default=["ptq_table"], nargs="+",
                   help="result folder; with --csv / --summarize also JSON-lines files, "
                   "read in order (later runs replace earlier ones of the same name)")
    p.add_argument("--mirror", default=None)
    p.add_argument("--workers", type=int, default=6)
    p.add_argument("--jobs", default="all", help="comma-separated run names, or all")
    p.add_argument("--deadline", type=float, default=None)
    p.add_argument("--n-calib", type=int, default=128)
    p.add_argument("--calib-len", type=int, default=2048)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--corpus", default="wikitext2")
    p.add_argument("--calib", default="wikitext2")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--bos", action="store_true")
    p.add_argument("--eval-windows", type=int, default=None)
    p.add_argument("--no-ptb", dest="ptb", action="store_false")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    p.add_argument("--summarize", action="store_true")
    p.add_argument("--csv", default=None, help="write the CSV of every run in --results")
    args = p.parse_args()
    results = Path(args.results[0])
    if args.summarize or args.csv:
        runs = load_runs(*args.results)
        if args.csv:
            write_csv(runs, args.csv)
        print(summarize(runs, args.corpus))
        return 0
    if args.one:
        r = run_one(args, args.one)
        tmp = results / f"{args.one}.json.partial"
        tmp.write_text(json.dumps(r))
        tmp.replace(results / f"{args.one}.json")
        return 0

    from cbq_ptq.models import resolve

    resolve(args.model)  # download / convert once, before the workers start
    results.mkdir(parents=True, exist_ok=True)
    jobs = all_jobs() if args.jobs == "all" else args.jobs.split(",")
    for j in jobs:
        if "-" in j:
            config_for(j)  # a misspelt job fails here, not after the others ran
    todo = [j for j in jobs if not (results / f"{j}.json").is_file()]
    print(f"{len(jobs) - len(todo)} runs already done, {len(todo)} to run", flush=True)
    t_start = time.time()
    running: dict[str, tuple[subprocess.Popen, float]] = {}
    base = list(sys.argv[1:])
    failed = []
    while todo or running:
        late = args.deadline is not None and time.time() - t_start > args.deadline
        while todo and len(running) < args.workers and not late:
            name = todo.pop(0)
            log = (results / f"{name}.log").open("w")
            cmd = [sys.executable, __file__, *base, "--one", name]
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            running[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                              env=env), time.time())  # fmt: skip
        if late and todo:
            print(f"deadline: not starting {todo}", flush=True)
            todo = []
        for name, (proc, t0) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[name]
            ok = proc.returncode == 0
            print(f"{name}: {'done' if ok else f'FAILED rc={proc.returncode}'} in "
                  f"{time.time() - t0:.0f} s", flush=True)  # fmt: skip
            if not ok:
                failed.append(name)
                print((results / f"{name}.log").read_text()[-3000:], flush=True)
            mirror(results, args.mirror)
        time.sleep(0.5)
    print(summarize(load_runs(results), args.corpus))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
