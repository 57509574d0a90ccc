"""Text generation with a saved quantized model: :func:`generate` and ``cbq generate``.

The saved model is loaded (:func:`cbq_ptq.io.load`), its quantized layers are replaced by the
inference kernels (:func:`cbq_ptq.serve.use_kernels`: the W4A8 / W4A4 / weight-only GEMMs on a
GPU, their PyTorch paths on the CPU), and :func:`decode_loop` generates with Hugging Face's
static KV cache, greedy or sampling, each decode step replayed from one captured CUDA graph on
a GPU (faster than ``generate``'s compiled step on the H200: see :func:`decode_loop`). Prompts
are batched with left padding (decoder-only models continue from the last position). Timings:
time to first token (the prefill of the batch) and decode tokens per second (new tokens of the
whole batch over the time after the first). :func:`timed_generate` times Hugging Face's
``generate`` (bench_generate's ``auto`` / ``off`` modes)."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch


@dataclasses.dataclass
class Generation:
    """What :func:`generate` returns: the continuations (text and token ids, prompts not
    included, padding and what follows an end-of-sequence token removed) and the timings."""

    texts: list[str]
    tokens: list[list[int]]
    prefill_seconds: float  # first token of every batch, summed
    decode_seconds: float  # the remaining positions, summed
    decode_tokens: int  # positions after the first, times the rows of their batch

    @property
    def decode_tokens_per_second(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds > 0 else 0.0


class _Clock:
    """A ``generate`` streamer that only takes the time: put() is called with the prompt,
    then once per generated position."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.times = device, []

    def put(self, value) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def load_for_generation(path: str | Path, device: str | torch.device = "cpu",
                        kernels: bool = True, dtype: torch.dtype | None = None,
                        fuse: bool = True):  # fmt: skip
    """(model, tokenizer, layer table) of a folder written by ``cbq quantize``: the kernels
    in place of the quantized layers when ``kernels``; ``dtype`` default: bf16 on a GPU, fp32
    on the CPU. ``fuse``: a block's q / k / v kernels run as one GEMM, and gate / up as
    another, where they share their activation quantizer (:func:`cbq_ptq.serve.
    fuse_projections`; H200, 7B-shaped, captured step: 5.50 -> 5.01 ms at batch 1 for W4A16
    g128, 14.08 -> 11.95 at batch 32; benchmarks/results/h200/bench_generate_bbe9d36.md).
    ``cbq eval --kernels`` loads through here too, so it scores the forward that generates."""
    from transformers import AutoTokenizer

    from cbq_ptq.io import load
    from cbq_ptq.serve import fuse_projections, kernel_table

    device = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"dtype must be bfloat16, float16 or float32, got {dtype}")
    model = load(path, device=str(device), kernels=dtype if kernels else None)
    if kernels and fuse:
        fuse_projections(model)
    table = kernel_table(model) if kernels else {}
    model.to(dtype)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer, table


def timed_generate(model, inputs: dict, options: dict) -> tuple[torch.Tensor, float, float]:
    """``model.generate(**inputs, **options)`` timed: (ids, seconds to the first generated
    position, seconds from it to the last)."""
    device = next(model.parameters()).device
    clock = _Clock(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        ids = model.generate(**inputs, streamer=clock, **options)
    if len(clock.times) < 2:  # [prompt, first position, ...]
        return ids, 0.0, 0.0
    return ids, clock.times[1] - t0, clock.times[-1] - clock.times[1]


def _next_token(logits: torch.Tensor, sample: bool, temperature: float,
                top_p: float) -> torch.Tensor:  # fmt: skip
    """(B,) next tokens from (B, V) logits: the argmax, or a draw from the softmax at
    ``temperature`` restricted to the smallest set of most likely tokens whose probability
    reaches ``top_p`` (nucleus sampling; the default generator: seed it with
    torch.manual_seed). Shape-static and free of host syncs, so it can be captured."""
    if not sample:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_p, order = probs.sort(dim=-1, descending=True)
    if top_p < 1.0:  # drop a token when the tokens before it reach top_p (the first stays)
        sorted_p = sorted_p.masked_fill(sorted_p.cumsum(-1) - sorted_p >= top_p, 0.0)
    pick = torch.multinomial(sorted_p, 1)  # multinomial renormalises the kept mass
    return order.gather(-1, pick)[:, 0]


def decode_loop(model, input_ids: torch.Tensor, new_tokens: int,
                attention_mask: torch.Tensor | None = None, sample: bool = False,
                temperature: float = 1.0, top_p: float = 1.0, capture: bool | None = None,
                compile: bool = False) -> tuple[torch.Tensor, float, float]:  # fmt: skip
    """Generate ``new_tokens`` tokens after left-padded prompts (B, P) (``attention_mask``: 1
    for a token, 0 for padding; default: no padding) with a static KV cache: the prefill,
    then every decode step (the model's forward on one token per row, the next token, the
    next positions) replayed from one CUDA graph captured once (``capture``; default: on a
    GPU), the host issuing only replays. Greedy, or sampling (:func:`_next_token`). Returns
    (new token ids (B, new_tokens), seconds to the first token, seconds for the rest); every
    row runs all ``new_tokens`` positions (the caller cuts at an end-of-sequence token).

    Why not Hugging Face ``generate``: it runs Python between steps (logits processors,
    stopping criteria, a device sync per step); measured on the H200 (f6e29c6, 7B-shaped, batch
    1, benchmarks/results/h200/bench_generate_f6e29c6.md) this loop took 7.16 ms per bf16 step
    against 7.36 for generate's compiled step (CUDA graphs of the forward), and 5.50 against
    10.02 ms for the W4A16 g128 kernels. The static KV cache is Hugging Face's; every input of
    the step is a tensor updated in place (token, cache position, per-row positions), and
    the mask covers all P + new_tokens positions from the start (the causal mask hides the
    later ones), so nothing captured depends on a Python value that changes between steps.

    ``compile``: the step's forward through ``torch.compile(model, dynamic=False)`` (its
    norms, rotary and elementwise ops fused by inductor; the GEMMs stay the registered cbq
    ops), compiled in the warm-up and captured like the eager one: the ~2 ms of small
    elementwise kernels of every 7B step (profiled at bbe9d36) is what it aims at. Measured on
    the H200 (bbe9d36, 7B-shaped, batch 1): 5.05 against 7.03 ms per bf16 step, 3.49 against
    5.50 for W4A16 g128; off by default because the compilation takes about a minute per
    model and batch shape. Not yet measured with fused projections
    (:func:`cbq_ptq.serve.fuse_projections`)."""
    from transformers import StaticCache

    device = input_ids.device
    capture = device.type == "cuda" if capture is None else capture
    if capture and device.type != "cuda":
        raise ValueError(f"graph capture needs a CUDA device, got {device}")
    if isinstance(new_tokens, bool) or not isinstance(new_tokens, int) or new_tokens < 1:
        raise ValueError(f"new_tokens must be an int >= 1, got {new_tokens!r}")
    b, p = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask must have the shape of input_ids {(b, p)}, got "
                         f"{tuple(attention_mask.shape)}")  # fmt: skip
    mask = torch.cat([attention_mask.long(), attention_mask.new_ones((b, new_tokens)).long()],
                     dim=1)  # fmt: skip
    positions = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)  # as generate() counts
    cache = StaticCache(config=model.config, max_cache_len=p + new_tokens)
    out = torch.zeros((b, new_tokens), dtype=torch.long, device=device)

    def sync() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    t_start = sync()
    with torch.inference_mode():
        logits = model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                       past_key_values=cache, use_cache=True,
                       cache_position=torch.arange(p, device=device)).logits  # fmt: skip
        out[:, 0] = _next_token(logits[:, -1], sample, temperature, top_p)
    t_first = sync()
    if new_tokens == 1:
        return out, t_first - t_start, 0.0
    tok = out[:, :1].clone()  # the static inputs of the step
    pos = torch.full((1,), p, dtype=torch.long, device=device)
    row_pos = positions[:, -1:] + 1

    forward = torch.compile(model, dynamic=False) if compile else model

    def step() -> None:
        logits = forward(input_ids=tok, attention_mask=mask, position_ids=row_pos,
                       past_key_values=cache, use_cache=True, cache_position=pos).logits
        nxt = _next_token(logits[:, -1], sample, temperature, top_p)
        out.index_copy_(1, pos - (p - 1), nxt[:, None])
        tok.copy_(nxt[:, None])
        pos.add_(1)
        row_pos.add_(1)

    with torch.inference_mode():
        if not capture:
            for _ in range(new_tokens - 1):
                step()
            return out, t_first - t_start, sync() - t_first
        # the state that a step advances: our token and positions, and the cache's own write
        # position (transformers' static layers keep a device tensor, cumulative_length, and
        # write there, not at cache_position: without its restore the replays wrote past the
        # cache's end, an index_copy_ out of bounds on the H200 at f30d25d)
        state = [tok, pos, row_pos] + [
            layer.cumulative_length for layer in getattr(cache, "layers", ())
            if isinstance(getattr(layer, "cumulative_length", None), torch.Tensor)]  # fmt: skip
        saved = [t.clone() for t in state]
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up (allocations, autotuning) off the graph
            for _ in range(2):
                step()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        for now, before in zip(state, saved, strict=True):  # replays rewrite the warm-up's
            now.copy_(before)
        t_replay = sync()  # warm-up and capture (setup, once per call) are in neither time
        for _ in range(new_tokens - 1):
            graph.replay()
        return out, t_first - t_start, sync() - t_replay


def generate(model, tokenizer, prompts: str | list[str], max_new_tokens: int = 32,
             batch_size: int = 8, sample: bool = False, temperature: float = 1.0,
             top_p: float = 1.0, seed: int = 0) -> Generation:  # fmt: skip
    """Continue every prompt by up to ``max_new_tokens`` tokens, ``batch_size`` prompts at a
    time: greedy, or sampling at ``temperature`` / ``top_p`` (seeded: the same call gives the
    same text)."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise ValueError("prompts must be one or more non-empty strings")
    for name, value in (("max_new_tokens", max_new_tokens), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if sample and not (temperature > 0 and 0 < top_p <= 1):
        raise ValueError(f"sampling needs temperature > 0 and top_p in (0, 1], got "
                         f"{temperature} and {top_p}")  # fmt: skip
    device = next(model.parameters()).device
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    eos = tokenizer.eos_token_id
    out = Generation([], [], 0.0, 0.0, 0)
    for i in range(0, len(prompts), batch_size):
        batch = tokenizer(prompts[i : i + batch_size], return_tensors="pt", padding=True,
                          add_special_tokens=False).to(device)  # fmt: skip
        torch.manual_seed(seed + i)
        new_ids, prefill, decode = decode_loop(
            model, batch["input_ids"], max_new_tokens, batch["attention_mask"], sample,
            temperature, top_p)  # fmt: skip
        new = new_ids.tolist()
        out.prefill_seconds += prefill
        out.decode_seconds += decode
        out.decode_tokens += len(new) * (max_new_tokens - 1)  # every row runs every position
        for seq in new:
            if eos is not None and eos in seq:
                seq = seq[: seq.index(eos)]
            out.tokens.append(seq)
            out.texts.append(tokenizer.decode(seq, skip_special_tokens=True))
    return out
