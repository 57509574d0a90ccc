"""Command line: ``cbq quantize`` and ``cbq eval``.

    cbq quantize                      # smollm2-135m to W4A8, before/after perplexity, saved
    cbq quantize --model stories260K --setting W2A16g32 --ragged-groups --corpus tinystories
    cbq eval OUT_DIR                  # perplexity of a saved quantized model (or any model)

Flags map to the fields of QuantSettings / CBQConfig, on top of the setting's recipe
(cbq_ptq.config.recipe). Without a GPU the defaults are smaller (fewer and shorter calibration
windows, 16 steps per window, the first evaluation windows only) so that the default run
finishes in minutes on a laptop CPU; every report states what it used.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from cbq_ptq.config import CBQConfig, parse_setting, recipe
from cbq_ptq.data import calibration_data
from cbq_ptq.evaluate import evaluate_perplexity, kernel_proportions

# (calibration windows, tokens per window, evaluation windows) by device; the training recipe
# (steps, learning rates, start...) comes from cbq_ptq.config.recipe(setting, device)
GPU_DEFAULTS = (128, 2048, None)
CPU_DEFAULTS = (16, 256, 4)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--corpus", default="wikitext2", help="evaluation corpus (name or file)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="evaluation window (default 2048; 512 for stories260K)")  # fmt: skip
    p.add_argument("--eval-windows", type=int, default=-1,
                   help="first N windows only (default: all on a GPU, 4 on CPU)")  # fmt: skip
    p.add_argument("--bos", action="store_true", help="start every evaluation window with BOS")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="model dtype (default: bfloat16 on cuda, float32 on cpu)")  # fmt: skip
    p.add_argument("--also", default="ptb",
                   help="more evaluation corpora, comma-separated ('' for none)")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="cbq", description=__doc__, formatter_class=fmt)
    sub = parser.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quantize", help="quantize a causal LM with CBQ and evaluate it")
    q.add_argument("--model", default="smollm2-135m", help="alias, folder or hub id")
    q.add_argument("--setting", default="W4A8", help="W4A16, W3A16g64, W2A16g64, W4A8, W4A4...")
    q.add_argument("--act-quantizer", default="per_token", choices=["per_token", "crossquant"])
    q.add_argument("--crossquant-alpha", type=float, default=0.15)
    q.add_argument("--ragged-groups", action="store_true",
                   help="allow a shorter last group where groups do not divide")  # fmt: skip
    q.add_argument("--calib", default=None, help="calibration corpus (default: --corpus)")
    q.add_argument("--n-calib", type=int, default=None, help="calibration windows")
    q.add_argument("--calib-len", type=int, default=None, help="tokens per calibration window")
    q.add_argument("--method", choices=["cbq", "gptq", "rtn"], default="cbq",
                   help="cbq (default), or the baselines gptq and rtn (round-to-nearest)")
    q.add_argument("--init", choices=["rtn", "gptq"], default=None,
                   help="where CBQ's rounding and clipping start (default: by setting)")
    q.add_argument("--steps", type=int, default=None,
                   help="optimizer steps per window (default: by setting and device)")  # fmt: skip
    q.add_argument("--epochs", type=int, default=None,
                   help="epochs per window instead of --steps (0: no training)")  # fmt: skip
    q.add_argument("--lr", type=float, default=None, help="clipping learning rate")
    q.add_argument("--lr-lora", type=float, default=None, help="LoRA-Rounding learning rate")
    q.add_argument("--loss", choices=["rel", "mse"], default=None,
                   help="window loss: per-token relative error (default) or MSE")  # fmt: skip
    q.add_argument("--window", type=int, default=2, help="blocks per window (K)")
    q.add_argument("--overlap", type=int, default=1, help="blocks shared by windows (O)")
    q.add_argument("--batch-size", type=int, default=None)
    q.add_argument("--no-cfp", action="store_true", help="switch off coarse-to-fine preprocessing")
    q.add_argument("--no-lora", action="store_true", help="round-to-nearest (STE) instead")
    q.add_argument("--lora-rank", type=int, default=None)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--out", default="cbq-out", help="folder for the quantized model and logs")
    q.add_argument("--restart", action="store_true",
                   help="discard OUT/checkpoint instead of resuming from it")  # fmt: skip
    q.add_argument("--offload", choices=["auto", "yes", "no"], default="auto",
                   help="keep the calibration streams in CPU memory")  # fmt: skip
    _common(q)
    e = sub.add_parser("eval", help="perplexity of a saved quantized model, or of any model")
    e.add_argument("model", help="folder written by `cbq quantize`, alias, folder or hub id")
    e.add_argument("--kernels", action="store_true",
                   help="run a quantized model with the inference GEMMs (bf16 on GPU)")  # fmt: skip
    _common(e)
    return parser


def _device(arg: str | None) -> str:
    return arg or ("cuda" if torch.cuda.is_available() else "cpu")


def _eval_args(args, model_name: str, device: str) -> dict:
    seq_len = args.seq_len or (512 if model_name == "stories260K" else 2048)
    windows = args.eval_windows
    if windows == -1:
        windows = (GPU_DEFAULTS if device == "cuda" else CPU_DEFAULTS)[2]
    bos = args.bos or model_name == "stories260K"
    return {"corpus": args.corpus, "seq_len": seq_len, "bos": bos, "max_windows": windows}


def _report(tag: str, result: dict, eval_args: dict) -> str:
    subset = (f"first {result['windows']} windows" if eval_args["max_windows"] else
              f"all {result['windows']} windows")  # fmt: skip
    return (f"{tag}: perplexity {result['ppl']:.3f} on {eval_args['corpus']} ({subset} of "
            f"{eval_args['seq_len']} tokens)")  # fmt: skip


def _dtype(args, device: str) -> torch.dtype:
    return getattr(torch, args.dtype or ("bfloat16" if device == "cuda" else "float32"))


def _evaluate_all(model, tok, args, eval_args: dict, tag: str) -> dict:
    """Perplexity on --corpus and on every --also corpus, printed; {corpus: result}."""
    results = {}
    corpora = [eval_args["corpus"]] + [c for c in args.also.split(",") if c]
    for corpus in dict.fromkeys(corpora):
        ea = {**eval_args, "corpus": corpus}
        results[corpus] = evaluate_perplexity(model, tok, **ea)
        print(_report(tag, results[corpus], ea), flush=True)
    return results


def build_config(args, settings, device: str) -> CBQConfig:
    """CBQConfig of a `cbq quantize` command: the setting's default recipe
    (cbq_ptq.config.recipe), then the method, then every flag given explicitly."""
    fields = recipe(settings, device)
    if args.method == "rtn":
        fields.update(epochs=0, steps=None, cfp=False, lora_rounding=False, window=1, overlap=0)
    elif args.method == "gptq":
        fields.update(method="gptq", cfp=False, window=1, overlap=0)
    else:
        fields.update(window=args.window, overlap=args.overlap)
    flags = {"init": args.init, "lr": args.lr, "lr_lora": args.lr_lora, "loss": args.loss,
             "batch_size": args.batch_size, "lora_rank": args.lora_rank, "seed": args.seed}
    fields.update({k: v for k, v in flags.items() if v is not None})
    if args.epochs is not None:  # epochs replace the recipe's steps
        fields.update(epochs=args.epochs, steps=None)
    if args.steps is not None:
        fields["steps"] = args.steps
    if args.no_cfp:
        fields["cfp"] = False
    if args.no_lora:
        fields["lora_rounding"] = False
    return CBQConfig(settings=settings, **fields)


def method_label(config: CBQConfig) -> str:
    if config.method == "gptq":
        return "GPTQ"
    if not config.trains:
        return "RTN"
    return "CBQ" if config.window > 1 else "block-wise reconstruction"


def cmd_quantize(args) -> int:
    from cbq_ptq.io import save
    from cbq_ptq.models import load_model
    from cbq_ptq.pipeline import quantize

    device = _device(args.device)
    n_cal, t_cal, _ = GPU_DEFAULTS if device == "cuda" else CPU_DEFAULTS
    settings = parse_setting(args.setting, act_quantizer=args.act_quantizer,
                             crossquant_alpha=args.crossquant_alpha,
                             ragged_groups=args.ragged_groups)  # fmt: skip
    config = build_config(args, settings, device)
    dtype = _dtype(args, device)
    model, tok = load_model(args.model, dtype=dtype, device=device)
    eval_args = _eval_args(args, args.model, device)
    dname = str(dtype).removeprefix("torch.")
    before = _evaluate_all(model, tok, args, eval_args, f"{args.model} {dname}")
    calib_corpus = args.calib or args.corpus
    calib = calibration_data(tok, calib_corpus, args.n_calib or n_cal, args.calib_len or t_cal,
                             args.seed)  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "checkpoint"
    if args.restart and ckpt.exists():
        shutil.rmtree(ckpt)
    if (ckpt / "state.pt").is_file():
        print(f"resuming from {ckpt} (--restart to start again)", flush=True)
    offload = {"auto": None, "yes": True, "no": False}[args.offload]
    t0 = time.time()
    model, _ = quantize(model, config, calib, log_path=out / "windows.jsonl",
                        checkpoint_dir=ckpt, offload=offload)  # fmt: skip
    seconds = time.time() - t0
    method = method_label(config)
    after = _evaluate_all(model, tok, args, eval_args, f"{args.model} {settings.name} ({method})")
    kernel = {}
    if settings.a_bits < 16:
        kernel = kernel_proportions(model, tok, eval_args["corpus"], eval_args["seq_len"],
                                    eval_args["bos"], max_windows=1)  # fmt: skip
        values = list(kernel.values())
        worst = max(kernel, key=kernel.get)
        print(f"quantization kernel (activations quantized to 0, first {eval_args['corpus']} "
              f"window): mean {sum(values) / len(values):.2%} over {len(values)} layers, max "
              f"{kernel[worst]:.2%} ({worst}); per layer in {out / 'summary.json'}")  # fmt: skip
    save(model, out / "model", tok, base_model=args.model)
    summary = {"model": args.model, "setting": settings.name, "method": method, "device": device,
               "dtype": dname,
               "calibration": {"corpus": calib_corpus, "windows": calib.shape[0],
                               "tokens": calib.shape[1], "seed": args.seed},
               "config": {k: v for k, v in vars(args).items() if k != "func"},
               "cbq_config": dataclasses.asdict(config),
               "ppl_before": before, "ppl_after": after, "quantize_seconds": round(seconds, 1),
               "evaluation": eval_args, "kernel_proportion": kernel}  # fmt: skip
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    shutil.rmtree(ckpt, ignore_errors=True)  # the saved model is complete: nothing to resume
    print(f"saved to {out / 'model'} (quantization took {seconds:.0f} s; log {out}/windows.jsonl)")
    return 0


def cmd_eval(args) -> int:
    from cbq_ptq.io import load
    from cbq_ptq.models import load_model

    device = _device(args.device)
    path = Path(args.model)
    if (path / "quant_config.json").is_file():
        from transformers import AutoTokenizer

        model, tok = load(path, device=device), AutoTokenizer.from_pretrained(path)
        if args.kernels:
            from cbq_ptq.serve import use_kernels

            table = use_kernels(model, torch.bfloat16 if device == "cuda" else torch.float32)
            kinds: dict[str, int] = {}
            for v in table.values():
                kinds[v] = kinds.get(v, 0) + 1
            print("layers: " + "; ".join(f"{n} x {k}" for k, n in sorted(kinds.items())))
        name = json.loads((path / "quant_config.json").read_text()).get("base_model") or ""
    else:
        model, tok = load_model(args.model, dtype=_dtype(args, device), device=device)
        name = args.model
    eval_args = _eval_args(args, name, device)
    _evaluate_all(model, tok, args, eval_args, args.model)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return cmd_quantize(args) if args.command == "quantize" else cmd_eval(args)
    except (ValueError, FileNotFoundError, FloatingPointError, RuntimeError) as exc:
        print(f"cbq {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
