"""Generation speed of quantized models (issue 14): time to first token (the prefill of the
batch) and decode tokens per second, for bf16 and the W4A16 (g128), W4A8, W4A4 and W2A16 (g128)
kernels and W4A4 with the online Hadamard rotation of the down_proj inputs (W4A4rot), batch in
{1, 8, 32}, prompts of 512 and 2048 tokens, 256 new tokens (greedy, static KV cache, Hugging
Face generate), peak GPU memory per row; each model and setting measured in a fresh process
(one run of the script drives them).

Models: ``llama2-7b`` (Llama-2-7B's shapes, random weights, round-to-nearest: speed does not
depend on the weights' values), ``llama2-70b-8l`` (Llama-2-70B's shapes with 8 of its 80
blocks; the ``x80`` column scales the whole per-step time by 80 / 8, the embedding and LM
head included: a slightly pessimistic projection), and saved model folders (``--saved
DIR [DIR ...]``, e.g. SmolLM2-135M quantized by CBQ with ``cbq quantize`` at several
settings), each at its own setting beside their bf16 base (measured once).

    python benchmarks/bench_generate.py --out benchmarks/results/h200
    CBQ_GEN_MODELS=llama2-7b CBQ_GEN_BATCHES=1,32 CBQ_GEN_PROMPTS=512 CBQ_GEN_NEW=64 ...
    CBQ_GEN_SETTINGS=bf16,W4A16g128 ...   (a subset of the settings: a table in parts)
    CBQ_GEN_COMPILE=off ...   (transformers' own torch.compile of the decode step with a static
                               cache, its CUDA graphs included, is on by default: "auto")
    CBQ_GEN_COMPILE=graph ... (greedy without generate(): each decode step replayed from one
                               CUDA graph captured by cbq_ptq.generate.decode_loop)
    CBQ_GEN_COMPILE=graph-compiled ... (the same, the step's forward through torch.compile)
    CBQ_GEN_PREFILL=graph ... (with graph / graph-compiled: the prefill captured too, after the
                               warm-up call, and replayed in the timed one: DecodeSession's
                               capture_prefill; the prefill column says which)
    CBQ_GEN_FUSE=3 (default) ... (what load_for_generation does: q / k / v and gate / up as
                               one GEMM each, serve.fuse_projections; the RMSNorm in front of
                               each group inside its activation quantizer, serve.fuse_norms;
                               each MLP's SwiGLU inside the down projection's activation
                               quantizer, serve.fuse_swiglu; the last two W4A8 / W4A4 only; the
                               fused column counts groups + norms + MLPs). CBQ_GEN_FUSE=2: no
                               SwiGLU; 1: the projections alone; 0: nothing fused
    CBQ_GEN_ROPE=1 (default) ... (every setting, bf16 too: the attention's RoPE in one kernel
                               per layer, serve.fuse_rope, bit-exact; the rope column says
                               which; 0: transformers' eager RoPE)
    CBQ_GEN_GQA=1 (default) ... (every setting, bf16 too: a grouped-query model's decode steps
                               without transformers' repeated KV cache,
                               cbq_ptq.attention.pack_gqa_decode; the gqa column says where it
                               applied; 0: transformers' own)
    CBQ_GEN_NORM=1 (default) ... (every setting, bf16 too: the RMSNorms no activation
                               quantizer took in one kernel each, serve.fuse_rms_norms; the norm
                               column says which; 0: transformers' eager norms)
    CBQ_GEN_POLICY='{"decode_pdl": false}' ... (the quantized settings' GEMMs under this
                               cbq_kernels.gemm.GemmPolicy, cbq_ptq.serve.set_policy; the
                               policy column says which; default: the default dispatch)
    CBQ_GEN_PROFILE=DIR ...   (also the GPU time of every kernel in one eager prefill and one
                               eager decode step of the first batch / prompt, a markdown
                               table per setting in DIR: where a step's time goes)
    python benchmarks/bench_generate.py --tiny --out /tmp/gen   (a CPU smoke run, 2 blocks)
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

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import Environment
from cbq_ptq.attention import pack_gqa_decode
from cbq_ptq.config import parse_setting
from cbq_ptq.generate import DecodeSession, decode_loop, timed_generate
from cbq_ptq.serve import (
    fuse_norms,
    fuse_projections,
    fuse_rms_norms,
    fuse_rope,
    fuse_swiglu,
    rtn_kernels,
    set_policy,
)

# W4A4rot: W4A4 with the online Hadamard rotation of every down_proj input (issue 15's R4,
# fused with the activation quantizer); R1 / R2 fold into the weights offline and cost
# nothing here, so only R4 is attached (the weights' values do not change the speed)
SETTINGS = ("bf16", "W4A16g128", "W4A8", "W4A4", "W2A16g128", "W4A4rot")
SHAPES = {  # hidden, intermediate, heads, kv heads, blocks built, blocks of the real model
    "llama2-7b": (4096, 11008, 32, 32, 32, 32),
    "llama2-70b-8l": (8192, 28672, 64, 8, 8, 80),
    "tiny": (256, 688, 4, 4, 2, 2),
}
FIELDS = ["model", "setting", "batch", "prompt", "new_tokens", "ttft_ms", "decode_tok_s",
          "decode_ms_per_step", "speedup_vs_bf16", "decode_tok_s_x80", "peak_gib", "weight_gib",
          "weights",
          "compile", "prefill", "fused", "rope", "gqa", "norm", "policy", "gpu", "torch",
          "commit"]  # fmt: skip
COMPILE = os.environ.get("CBQ_GEN_COMPILE", "auto")
COMPILE_MODES = ("auto", "off", "graph", "graph-compiled")
PREFILL = os.environ.get("CBQ_GEN_PREFILL", "eager")
PREFILL_MODES = ("eager", "graph")
FUSE_LEVEL = os.environ.get("CBQ_GEN_FUSE", "3")  # 0, 1 (projections), 2 (+ norms), 3 (+ SwiGLU)
FUSE, FUSE_NORMS, FUSE_SWIGLU = (FUSE_LEVEL in ("1", "2", "3"), FUSE_LEVEL in ("2", "3"),
                                  FUSE_LEVEL == "3")  # fmt: skip
ROPE = os.environ.get("CBQ_GEN_ROPE", "1") == "1"  # serve.fuse_rope, every setting (bf16 too)
# cbq_ptq.attention.pack_gqa_decode, every setting (bf16 too): grouped-query decode steps
# without transformers 5.17's repeated KV cache (the 70B shape's 8 key-value heads; the 7B
# shape has none)
GQA = os.environ.get("CBQ_GEN_GQA", "1") == "1"
# serve.fuse_rms_norms, every setting (bf16 too): the RMSNorms no quantizer took in one kernel
NORM = os.environ.get("CBQ_GEN_NORM", "1") == "1"
PROFILE = os.environ.get("CBQ_GEN_PROFILE")
POLICY = os.environ.get("CBQ_GEN_POLICY", "")


def _policy():
    """The GemmPolicy of CBQ_GEN_POLICY (JSON of its fields), or None."""
    if not POLICY:
        return None
    from cbq_kernels.gemm import GemmPolicy

    return GemmPolicy(**json.loads(POLICY))


def build(shape: str, device: torch.device, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, inter, heads, kv, blocks, _ = SHAPES[shape]
    config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads,
                         num_key_value_heads=kv, num_hidden_layers=blocks, vocab_size=32000,
                         max_position_embeddings=4096, use_cache=True)  # fmt: skip
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    return model.eval()


def env_list(name: str, default: tuple[int, ...]) -> tuple[int, ...]:
    value = os.environ.get(name)
    return tuple(int(v) for v in value.split(",")) if value else default


def env_names(p: argparse.ArgumentParser, name: str, default: list[str],
              known: list[str]) -> list[str]:  # fmt: skip
    """A comma-separated list of names from the environment ("none": empty); an unknown name
    is a one-line error naming the known ones."""
    names = [v for v in os.environ.get(name, ",".join(default)).split(",") if v and v != "none"]
    bad = sorted(set(names) - set(known))
    if bad:
        p.error(f"unknown {name} {bad}; known: {known} or none")
    return names


def prompt_ids(model, batch: int, prompt: int, device: torch.device) -> torch.Tensor:
    """(batch, prompt) seeded random token ids: the prompts of every measurement."""
    g = torch.Generator(device="cpu").manual_seed(0)
    vocab = model.config.vocab_size
    return torch.randint(min(3, vocab - 1), vocab, (batch, prompt), generator=g).to(device)


def measure(model, batch: int, prompt: int, new: int, device: torch.device) -> dict:
    ids = prompt_ids(model, batch, prompt, device)
    options = {"do_sample": False, "max_new_tokens": new, "min_new_tokens": new,
               "use_cache": True, "cache_implementation": "static", "pad_token_id": 0,
               "temperature": None, "top_p": None, "top_k": None,
               "disable_compile": COMPILE == "off"}  # fmt: skip
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    # warm-up with the very options of the timed run: the static cache's length is prompt +
    # new tokens, and a compiled decode step is specialised to it (a 2-token warm-up left the
    # compilation inside the timed run: 456 ms per step for bf16 7B on the H200, 053a7b8)
    if COMPILE in ("graph", "graph-compiled"):  # the manual loop: one captured decode step
        # one session for both calls: with CBQ_GEN_PREFILL=graph the warm-up call captures
        # the prefill at its end and the timed call replays it (the step's capture is outside
        # both times either way)
        session = DecodeSession(model, compile=COMPILE != "graph",
                                capture_prefill=PREFILL == "graph")  # fmt: skip
        run = lambda: session.run(ids, new)  # noqa: E731
    else:
        run = lambda: timed_generate(model, inputs, options)  # noqa: E731
    run()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _, prefill, decode = run()
    steps = new - 1
    return {"ttft_ms": round(prefill * 1e3, 2),
            "decode_tok_s": round(batch * steps / decode, 1) if decode > 0 else "",
            "decode_ms_per_step": round(decode / steps * 1e3, 3) if steps else "",
            "peak_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
            if device.type == "cuda" else "", "compile": COMPILE,
            "prefill": PREFILL if COMPILE in ("graph", "graph-compiled") else "eager"}  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--saved", nargs="+", default=None, metavar="DIR",
                   help="folders written by cbq quantize from one base model (its bf16 rows "
                        "once, then each folder's)")  # fmt: skip
    p.add_argument("--tiny", action="store_true", help="CPU smoke run on a 2-block model")
    p.add_argument("--child", nargs=2, metavar=("MODEL", "SETTING"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if COMPILE not in COMPILE_MODES:
        p.error(f"unknown CBQ_GEN_COMPILE {COMPILE!r}; known: {list(COMPILE_MODES)}")
    if PREFILL not in PREFILL_MODES:
        p.error(f"unknown CBQ_GEN_PREFILL {PREFILL!r}; known: {list(PREFILL_MODES)}")
    if PREFILL == "graph" and (args.tiny or COMPILE not in ("graph", "graph-compiled")):
        p.error("CBQ_GEN_PREFILL=graph needs CBQ_GEN_COMPILE=graph or graph-compiled on a GPU")
    device = torch.device("cpu" if args.tiny else "cuda")
    env = Environment.detect()
    batches = env_list("CBQ_GEN_BATCHES", (1, 2) if args.tiny else (1, 8, 32))
    prompts = env_list("CBQ_GEN_PROMPTS", (16,) if args.tiny else (512, 2048))
    new = env_list("CBQ_GEN_NEW", (4,) if args.tiny else (256,))[0]
    if args.child:
        shape, setting = args.child
        rows = (_saved_rows(args.saved[0], setting, batches, prompts, new, device, env)
                if shape == "saved" else
                _measure_setting(shape, setting, batches, prompts, new, device, env))  # fmt: skip
        for row in rows:
            print(CHILD_ROW + json.dumps(row), flush=True)
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    # CBQ_GEN_MODELS=none: only the --saved model
    models = ["tiny"] if args.tiny else env_names(p, "CBQ_GEN_MODELS",
                                                  ["llama2-7b", "llama2-70b-8l"], sorted(SHAPES))
    # CBQ_GEN_SETTINGS: a subset, so that a table too long for one call of the lent GPU (10
    # minutes: the 7B run at 1da67a5 did 3 settings x 2 batches) runs in parts; bf16 first
    # where the speed-up column is wanted
    settings = env_names(p, "CBQ_GEN_SETTINGS", list(SETTINGS), list(SETTINGS))
    rows: list[dict] = []
    path = args.out / "bench_generate.csv"
    for shape in models:
        blocks, real = SHAPES[shape][4], SHAPES[shape][5]
        base: dict[tuple[int, int], dict] = {}
        for setting in settings:
            # one process per model and setting: in one process, a quantized model measured
            # after the bf16 one decoded in 12.09 ms per step against 6.13 ms alone (7B-shaped
            # W4A16 g128, batch 1, H200, e2455c7: the compiled generate step and its CUDA
            # graphs of the earlier model stay in the process)
            for r in _child_rows(args, shape, setting):
                key = (r["batch"], r["prompt"])
                if setting == "bf16":
                    base[key] = r
                ref = base.get(key)
                if ref and r["decode_tok_s"] and ref["decode_tok_s"]:
                    r["speedup_vs_bf16"] = round(r["decode_tok_s"] / ref["decode_tok_s"], 2)
                if real != blocks and r["decode_ms_per_step"]:
                    per_step = r["decode_ms_per_step"] * real / blocks
                    r["decode_tok_s_x80"] = round(r["batch"] * 1e3 / per_step, 1)
                rows.append(r)
                print(json.dumps(r), flush=True)
                _write(rows, path)
    if args.saved:
        base = {}
        for i, saved in enumerate(["base", *args.saved]):  # the bf16 base once, then each
            label = "bf16" if i == 0 else "quantized"
            for r in _child_rows(args, "saved", label, args.saved[0] if i == 0 else saved):
                key = (r["batch"], r["prompt"])
                if i == 0:
                    base[key] = r
                elif base.get(key, {}).get("decode_tok_s") and r["decode_tok_s"]:
                    r["speedup_vs_bf16"] = round(r["decode_tok_s"] / base[key]["decode_tok_s"], 2)
                rows.append(r)
                print(json.dumps(r), flush=True)
            _write(rows, path)
    print(f"wrote {path}")
    return 0


CHILD_ROW = "CBQ_GEN_ROW "


def _child_rows(args, shape: str, setting: str, saved: str | None = None) -> list[dict]:
    """The rows of one model and setting (of the saved folder ``saved``), measured in a fresh
    Python process (the CBQ_GEN_* environment passes through); a failed child is reported and
    yields no rows."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", shape, setting]
    if args.tiny:
        cmd.append("--tiny")
    if saved:
        cmd += ["--saved", str(saved)]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    rows = [json.loads(line[len(CHILD_ROW):]) for line in proc.stdout.splitlines()
            if line.startswith(CHILD_ROW)]  # fmt: skip
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        print(f"{shape} {setting}: the measuring process failed (rc {proc.returncode}): "
              + " | ".join(tail), file=sys.stderr, flush=True)  # fmt: skip
    print(f"{shape} {setting}: {len(rows)} rows in {time.time() - t0:.0f} s", flush=True)
    return rows


def _measure_setting(shape: str, setting: str, batches, prompts, new: int,
                     device: torch.device, env) -> list[dict]:  # fmt: skip
    """Build the model, quantize it (RTN) unless bf16, measure every batch and prompt."""
    from cbq_ptq.models import arch_spec, blocks
    from cbq_ptq.rotation import OnlineRotation, attach

    dtype = torch.float32 if shape == "tiny" else torch.bfloat16
    model = build(shape, device, dtype)
    down = arch_spec(model).down
    rotated = setting.endswith("rot")
    if rotated:
        for block in blocks(model):
            attach(block.get_submodule(down), OnlineRotation(
                "hadamard", block.get_submodule(down).in_features, 2))  # fmt: skip
    fused = 0
    if setting != "bf16":
        rtn_kernels(model, parse_setting(setting.removesuffix("rot")), dtype)
        if FUSE:  # q / k / v and gate / up as one GEMM each (serve.fuse_projections)
            fused = fuse_projections(model)
        if FUSE_NORMS:  # and their norms inside the activation quantizer (serve.fuse_norms)
            fused += fuse_norms(model)
        if FUSE_SWIGLU:  # and the SwiGLU inside down_proj's quantizer (serve.fuse_swiglu)
            fused += fuse_swiglu(model)
    if ROPE:  # the RoPE kernel: the same bit-exact function for bf16 and quantized rows
        fuse_rope(model)
    gqa = pack_gqa_decode(model) if GQA else 0
    norms = fuse_rms_norms(model) if NORM else 0
    if setting != "bf16":  # the GEMMs' dispatch, and PDL in front of them (prologue_pdl)
        set_policy(model, _policy())
    if rotated and not all("rotation_signs" in getattr(b.get_submodule(down), "act_kwargs", {})
                           for b in blocks(model)):  # fmt: skip
        raise RuntimeError("the online rotation did not reach the down_proj kernels")
    weights = sum(t.numel() * t.element_size() for t in model.parameters())
    weights += sum(_kernel_bytes(m) for m in model.modules())
    fields = {"model": shape, "setting": setting, "weight_gib": round(weights / 2**30, 3),
              "weights": "random, RTN", "fused": fused, "rope": int(ROPE), "gqa": int(gqa > 0),
              "norm": int(norms > 0),
              "policy": POLICY if setting != "bf16" else ""}  # fmt: skip
    return _rows(model, fields, batches, prompts, new, device, env)


def _rows(model, fields: dict, batches, prompts, new: int, device, env) -> list[dict]:
    """Measure ``model`` at every batch and prompt: one row each, ``fields`` included."""
    rows = []
    for batch in batches:
        for prompt in prompts:
            r = measure(model, batch, prompt, new, device)
            if PROFILE and not rows:
                name = f"profile_{fields['model']}_{fields['setting']}_b{batch}_p{prompt}.md"
                profile_step(model, batch, prompt, r, Path(PROFILE) / name)
            rows.append({**fields, "batch": batch, "prompt": prompt, "new_tokens": new, **r,
                         "speedup_vs_bf16": "", "decode_tok_s_x80": "", "gpu": env.gpu,
                         "torch": env.torch, "commit": env.commit})  # fmt: skip
    return rows


# a kernel's kind from its name (first match): the profile's summary lines. Attention first:
# cuDNN's SDPA kernels are named "..._sdpa_sm80_flash_fprop_wmma_...", which the GEMM words
# would catch (the H200 profiles of bbe9d36 counted their 455 us per step as GEMM)
KINDS = (
    ("attention", ("flash", "attention", "fmha", "sdpa", "softmax")),
    ("gemm", ("gemm", "matmul", "cutlass", "sm90_", "xmma", "cublas", "nvjet", "mma", "_mm_",
              "aten::mm", "addmm", "decode", "dequantize")),  # the CPU path's weight unpack
    ("act quant / rotation", ("quant", "hadamard", "crossquant")),
)


def _kind(name: str) -> str:
    low = name.lower()
    return next((k for k, keys in KINDS if any(w in low for w in keys)), "other")


def _kernel_times(fn) -> dict[str, float]:
    """Microseconds per kernel name over one call of ``fn`` (GPU time of the CUDA kernels,
    copies and memsets; on the CPU, the self time of the operators)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    times: dict[str, float] = {}
    for e in prof.key_averages():
        if cuda and e.device_type == DeviceType.CUDA:
            t = e.self_device_time_total or e.device_time_total
        elif not cuda and e.device_type == DeviceType.CPU:
            t = e.self_cpu_time_total
        else:
            continue
        times[e.key] = times.get(e.key, 0.0) + t
    return times


def profile_step(model, batch: int, prompt: int, row: dict, path: Path, steps: int = 8) -> None:
    """Per-kernel times of one eager prefill and one eager decode step (the difference of a
    run of ``steps`` + 1 tokens and of a run of 1 token, over ``steps``), written to ``path``
    beside the row's measured (captured / compiled) times: the kernels' sum against the
    measured step says how much of a step is kernels and which."""
    ids = prompt_ids(model, batch, prompt, next(model.parameters()).device)
    decode_loop(model, ids, steps + 1, capture=False)  # warm-up (autotuning) off the profile
    first = _kernel_times(lambda: decode_loop(model, ids, 1, capture=False))
    full = _kernel_times(lambda: decode_loop(model, ids, steps + 1, capture=False))
    names = sorted(set(first) | set(full))
    per_step = {n: max(full.get(n, 0.0) - first.get(n, 0.0), 0.0) / steps for n in names}
    kinds: dict[str, list[float]] = {}
    for n in names:
        k = kinds.setdefault(_kind(n), [0.0, 0.0])
        k[0] += first.get(n, 0.0)
        k[1] += per_step[n]
    lines = [f"# Kernel times: {path.stem}", "",
             f"Measured row: time to first token {row['ttft_ms']} ms, decode "
             f"{row['decode_ms_per_step']} ms per step ({row['compile']}). Below: one eager "
             f"prefill and one eager decode step (mean of {steps}), GPU time per kernel "
             f"(torch.profiler).", "",
             "| kind | prefill ms | decode us per step |", "|---|---|---|"]  # fmt: skip
    for k, (pre, dec) in sorted(kinds.items(), key=lambda kv: -kv[1][1]):
        lines.append(f"| {k} | {pre / 1e3:.3f} | {dec:.1f} |")
    lines.append(f"| **sum** | {sum(first.values()) / 1e3:.3f} | {sum(per_step.values()):.1f} |")
    lines += ["", "| kernel | kind | prefill ms | decode us per step |", "|---|---|---|---|"]
    top = sorted(names, key=lambda n: -(per_step[n] + first.get(n, 0.0) / 100))[:40]
    for n in top:
        short = n if len(n) <= 100 else n[:97] + "..."
        lines.append(f"| `{short.replace('|', '/')}` | {_kind(n)} | "
                     f"{first.get(n, 0.0) / 1e3:.3f} | {per_step[n]:.1f} |")  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}", flush=True)


def _kernel_bytes(module) -> int:
    w = getattr(module, "weight", None)
    if w is None or isinstance(w, torch.Tensor):
        return 0
    return w.nbytes


def _saved_rows(saved, label: str, batches, prompts, new, device, env) -> list[dict]:
    """Rows of a saved model (``label`` "quantized") or of its bf16 base (``"bf16"``)."""
    from cbq_ptq.generate import load_for_generation, serving_fusions
    from cbq_ptq.io import read_meta
    from cbq_ptq.models import load_model

    meta = read_meta(Path(saved))
    s = meta["settings"]
    setting = f"W{s['w_bits']}A{s['a_bits']}" + (f"g{s['group_size']}" if s["group_size"] else "")
    if label == "bf16":
        if not meta.get("base_model"):
            raise SystemExit(f"{saved} does not name its base model (quant_config.json "
                             f"'base_model'): no bf16 row")  # fmt: skip
        model, _ = load_model(meta["base_model"], dtype=torch.bfloat16, device=str(device))
        # what load_for_generation gives the saved model beside it (at 9252d9d the base ran
        # without the RoPE kernel that its quantized rows had)
        serving_fusions(model, device)
    else:
        model, _, _ = load_for_generation(saved, device)
    # the model column names the base model (a saved folder is often just "model")
    name = Path(str(meta.get("base_model") or saved)).name
    fused = sum(type(m).__name__ in ("_FusedGroup", "FoldedNorm", "SwiGLUMLP")
                for m in model.modules())  # what load_for_generation fused (as the 7B rows count)
    fields = {"model": name, "setting": label if label == "bf16" else setting, "fused": fused,
              "rope": int(device.type == "cuda"),  # load_for_generation's default
              "gqa": int(any(getattr(m, "_cbq_gqa_decode", False) for m in model.modules())),
              "norm": int(any(type(m).__name__ == "KernelRMSNorm" for m in model.modules())),
              "weights": _method(Path(saved)) if label != "bf16" else "bf16"}  # fmt: skip
    return _rows(model, fields, batches, prompts, new, device, env)


def _method(saved: Path) -> str:
    """How a saved model was quantized: the method (and a ``--steps`` other than the recipe's)
    of the summary.json that ``cbq quantize`` writes beside its model folder ("saved" where
    there is none)."""
    try:
        summary = json.loads((saved.parent / "summary.json").read_text())
    except (OSError, ValueError):
        return "saved"
    steps = (summary.get("config") or {}).get("steps")
    return str(summary.get("method", "saved")) + (f", {steps} steps per window" if steps else "")


def _write(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


if __name__ == "__main__":
    sys.exit(main())
