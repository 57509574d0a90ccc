"""The result tables of issue 5: RTN, block-wise reconstruction, CBQ and ablations, one
process per run, several at a time on one GPU (a 135M model leaves it mostly idle).

    python scripts/ptq_table.py --results DIR [--mirror FILE] [--workers 6] [--jobs all]

Every run writes DIR/NAME.json (setting, method, configuration, calibration, WikiText-2 and
PTB perplexity on all windows unless --eval-windows, quantization seconds, per-window losses,
peak GPU memory, quantization-kernel proportion per layer); runs already in DIR are skipped,
so an interrupted table resumes. --mirror rewrites FILE (JSON lines, every finished run) after
each run. --deadline S: start no run after S seconds. Then `--summarize DIR` prints the
markdown tables of docs/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SETTINGS = ["W4A16", "W3A16g64", "W2A16g64", "W4A8", "W4A4"]
# method -> CBQConfig overrides (besides settings and epochs)
METHODS = {
    "rtn": {"cfp": False, "lora_rounding": False, "epochs": 0, "window": 1, "overlap": 0},
    "bw": {"cfp": False, "window": 1, "overlap": 0},
    "cbq": {},
    "cbq_nocfp": {"cfp": False},
    "cbq_nooverlap": {"window": 2, "overlap": 0},
    "cbq_nolora": {"lora_rounding": False},
    "cbq_crossquant": {},  # act_quantizer="crossquant" in the settings
}
ABLATIONS = {  # ablation -> settings it is run at
    "cbq_nocfp": ["W4A8", "W4A4"],  # CFP acts on activations only (weights: DECISIONS.md)
    "cbq_nooverlap": ["W2A16g64", "W4A4"],
    "cbq_nolora": ["W2A16g64", "W4A4"],
    "cbq_crossquant": ["W4A8", "W4A4"],
}


def all_jobs() -> list[str]:
    jobs = ["fp32", "bf16"]
    jobs += [f"{s}-{m}" for m in ("rtn", "cbq", "bw") for s in SETTINGS]
    jobs += [f"{s}-{m}" for m, ss in ABLATIONS.items() for s in ss]
    return jobs


def run_one(args, name: str) -> dict:
    import torch

    from cbq_ptq.config import CBQConfig, parse_setting
    from cbq_ptq.data import calibration_data
    from cbq_ptq.evaluate import evaluate_perplexity, kernel_proportions
    from cbq_ptq.models import load_model
    from cbq_ptq.pipeline import quantize

    torch.set_num_threads(2)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float32 if name == "fp32" else getattr(torch, args.dtype)
    model, tok = load_model(args.model, dtype=dtype, device=device)
    ev = {"seq_len": args.seq_len, "bos": args.bos, "max_windows": args.eval_windows}
    result: dict = {"name": name, "model": args.model, "dtype": str(dtype).split(".")[1]}
    if "-" in name:
        setting, method = name.split("-", 1)
        quantizer = "crossquant" if method == "cbq_crossquant" else "per_token"
        settings = parse_setting(setting, act_quantizer=quantizer, ragged_groups=True)
        overrides = {"epochs": args.epochs, **METHODS[method]}
        config = CBQConfig(settings=settings, batch_size=args.batch_size, **overrides)
        calib = calibration_data(tok, args.calib, args.n_calib, args.calib_len, seed=0)
        t0 = time.time()
        model, log = quantize(model, config, calib, progress=False)
        result.update(
            setting=setting, method=method, quantize_seconds=round(time.time() - t0, 1),
            calibration=[args.calib, args.n_calib, args.calib_len], config=repr(config),
            windows=[{k: e.get(k) for k in ("blocks", "loss_before", "loss_after", "seconds",
                                             "peak_gpu_mib", "cfp")} for e in log],
        )  # fmt: skip
        if settings.a_bits < 16:
            props = kernel_proportions(model, tok, args.corpus, max_windows=1, **{
                k: ev[k] for k in ("seq_len", "bos")})  # fmt: skip
            result["kernel_proportion"] = props
    result[args.corpus] = evaluate_perplexity(model, tok, args.corpus, **ev)
    if args.ptb:
        result["ptb"] = evaluate_perplexity(model, tok, "ptb", **ev)
    result["eval_windows"] = args.eval_windows or "all"
    if device == "cuda":
        result["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
        result["gpu"] = torch.cuda.get_device_name()
    result["torch"] = torch.__version__
    return result


def mirror(results: Path, target: str | None) -> None:
    if not target:
        return
    lines = [p.read_text().strip() for p in sorted(results.glob("*.json"))]
    tmp = Path(target + ".partial")
    tmp.write_text("".join(line + "\n" for line in lines))
    tmp.replace(target)


def summarize(results: Path, corpus: str) -> str:
    runs = {}
    for p in results.glob("*.json"):
        r = json.loads(p.read_text())
        runs[r["name"]] = r

    def ppl(name, key=corpus):
        r = runs.get(name)
        return f"{r[key]['ppl']:.2f}" if r and key in r else "-"

    out = [f"FP32 {ppl('fp32')} / BF16 {ppl('bf16')} ({corpus}); PTB FP32 {ppl('fp32', 'ptb')}",
           "", "| setting | RTN | block-wise (K=1, O=0) | CBQ (K=2, O=1) | PTB: RTN / BW / CBQ |",
           "|---|---|---|---|---|"]  # fmt: skip
    for s in SETTINGS:
        ptb = " / ".join(ppl(f"{s}-{m}", "ptb") for m in ("rtn", "bw", "cbq"))
        out.append(f"| {s} | {ppl(s + '-rtn')} | {ppl(s + '-bw')} | {ppl(s + '-cbq')} | {ptb} |")
    out += ["", "| ablation | setting | perplexity | CBQ |", "|---|---|---|---|"]
    for m, ss in ABLATIONS.items():
        for s in ss:
            out.append(f"| {m} | {s} | {ppl(f'{s}-{m}')} | {ppl(f'{s}-cbq')} |")
    out += ["", "| run | quantize s | peak GPU MiB | kernel proportion mean / max |",
            "|---|---|---|---|"]  # fmt: skip
    for name in sorted(runs):
        r = runs[name]
        kp = r.get("kernel_proportion")
        kps = f"{sum(kp.values()) / len(kp):.4f} / {max(kp.values()):.4f}" if kp else "-"
        out.append(f"| {name} | {r.get('quantize_seconds', '-')} | {r.get('peak_gpu_mib', '-')} "
                   f"| {kps} |")  # fmt: skip
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--results", default="ptq_table")
    p.add_argument("--mirror", default=None)
    p.add_argument("--workers", type=int, default=6)
    p.add_argument("--jobs", default="all", help="comma-separated run names, or all")
    p.add_argument("--deadline", type=float, default=None)
    p.add_argument("--n-calib", type=int, default=128)
    p.add_argument("--calib-len", type=int, default=2048)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--corpus", default="wikitext2")
    p.add_argument("--calib", default="wikitext2")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--bos", action="store_true")
    p.add_argument("--eval-windows", type=int, default=None)
    p.add_argument("--no-ptb", dest="ptb", action="store_false")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    p.add_argument("--summarize", action="store_true")
    args = p.parse_args()
    results = Path(args.results)
    if args.summarize:
        print(summarize(results, args.corpus))
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
    todo = [j for j in jobs if not (results / f"{j}.json").is_file()]
    print(f"{len(jobs) - len(todo)} runs already done, {len(todo)} to run", flush=True)
    t_start = time.time()
    running: dict[str, tuple[subprocess.Popen, float]] = {}
    base = [a for a in sys.argv[1:]]
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
    print(summarize(results, args.corpus))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
