"""Text generation with a saved quantized model: :func:`generate` and ``cbq generate``.

The saved model is loaded (:func:`cbq_ptq.io.load`), its quantized layers are replaced by the
inference kernels (:func:`cbq_ptq.serve.use_kernels`: the W4A8 / W4A4 / weight-only GEMMs on a
GPU, their PyTorch paths on the CPU), and Hugging Face ``generate`` runs with a static KV
cache, greedy or sampling. Prompts are batched with left padding (decoder-only models continue
from the last position). Timings come from a streamer called once per generated position, the
device synchronised at each call: time to first token (the prefill of the batch) and decode
tokens per second (new tokens of the whole batch over the time after the first).
"""

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
                        kernels: bool = True):  # fmt: skip
    """(model, tokenizer, layer table) of a folder written by ``cbq quantize``: the kernels
    in place of the quantized layers when ``kernels``; bf16 on a GPU, fp32 on the CPU."""
    from transformers import AutoTokenizer

    from cbq_ptq.io import load
    from cbq_ptq.serve import kernel_table

    device = torch.device(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = load(path, device=str(device), kernels=dtype if kernels else None)
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


def graph_greedy(model, input_ids: torch.Tensor, new_tokens: int,
                 capture: bool | None = None) -> tuple[torch.Tensor, float, float]:
    """Greedy decoding of unpadded prompts (B, P) without ``generate``: the prefill, then
    every decode step (the model's forward on one token per row, the argmax, the next
    position) replayed from one CUDA graph captured once (``capture``; default: on a GPU),
    the host issuing only replays; returns (new token ids (B, new_tokens), seconds to the
    first token, seconds for the rest), like :func:`timed_generate`.

    Why: Hugging Face ``generate`` runs Python between steps (logits processors, stopping
    criteria, a device sync per step), which with CUDA graphs for the forward alone left a
    floor of a few ms per step on the H200 (bf16 7B-shaped batch 1: 6.63 ms per step, where
    its 13.5 GB of weights take ~2.8 ms at 4.8 TB/s; not profiled further). Not yet run on a
    GPU: bench_generate's CBQ_GEN_COMPILE=graph measures it beside generate(). The static KV
    cache is Hugging Face's; the step writes
    its token into an output buffer at index ``position - P``, so nothing in the graph
    depends on a Python value that changes between steps."""
    from transformers import StaticCache

    device = input_ids.device
    capture = device.type == "cuda" if capture is None else capture
    if capture and device.type != "cuda":
        raise ValueError(f"graph capture needs a CUDA device, got {device}")
    if new_tokens < 1:
        raise ValueError(f"new_tokens must be >= 1, got {new_tokens}")
    b, p = input_ids.shape
    cache = StaticCache(config=model.config, max_cache_len=p + new_tokens)
    out = torch.zeros((b, new_tokens), dtype=torch.long, device=device)

    def sync() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    t0 = sync()
    with torch.inference_mode():
        logits = model(input_ids=input_ids, past_key_values=cache, use_cache=True,
                       cache_position=torch.arange(p, device=device)).logits  # fmt: skip
        out[:, 0] = logits[:, -1].argmax(-1)
    t1 = sync()
    if new_tokens == 1:
        return out, t1 - t0, 0.0
    tok = out[:, :1].clone()  # the static inputs of the step
    pos = torch.full((1,), p, dtype=torch.long, device=device)

    def step() -> None:
        logits = model(input_ids=tok, past_key_values=cache, use_cache=True,
                       cache_position=pos, position_ids=pos.expand(b, 1)).logits  # fmt: skip
        nxt = logits[:, -1].argmax(-1)
        out.index_copy_(1, pos - (p - 1), nxt[:, None])
        tok.copy_(nxt[:, None])
        pos.add_(1)

    with torch.inference_mode():
        if not capture:
            for _ in range(new_tokens - 1):
                step()
            return out, t1 - t0, sync() - t1
        # the state that a step advances: our token and position, and the cache's own write
        # position (transformers' static layers keep a device tensor, cumulative_length, and
        # write there, not at cache_position: without its restore the replays wrote past the
        # cache's end, an index_copy_ out of bounds on the H200 at f30d25d)
        state = [tok, pos] + [layer.cumulative_length for layer in getattr(cache, "layers", ())
                              if isinstance(getattr(layer, "cumulative_length", None),
                                            torch.Tensor)]  # fmt: skip
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
        for now, before in zip(state, saved):  # the warm-up's positions are rewritten by replays
            now.copy_(before)
        t2 = sync()  # warm-up and capture (setup, once per call) are in neither time
        for _ in range(new_tokens - 1):
            graph.replay()
        return out, t1 - t0, sync() - t2


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
    options = {"do_sample": sample, "max_new_tokens": max_new_tokens, "use_cache": True,
               "cache_implementation": "static",
               "pad_token_id": tokenizer.pad_token_id}  # fmt: skip
    if sample:
        options.update(temperature=temperature, top_p=top_p)
    else:  # greedy: no sampling knobs (the model's generation_config may carry some)
        options.update(temperature=None, top_p=None, top_k=None)
    for i in range(0, len(prompts), batch_size):
        batch = tokenizer(prompts[i : i + batch_size], return_tensors="pt", padding=True,
                          add_special_tokens=False).to(device)  # fmt: skip
        torch.manual_seed(seed + i)
        ids, prefill, decode = timed_generate(model, batch, options)
        new = ids[:, batch["input_ids"].shape[1] :].tolist()
        positions = ids.shape[1] - batch["input_ids"].shape[1]
        out.prefill_seconds += prefill
        out.decode_seconds += decode
        out.decode_tokens += len(new) * max(0, positions - 1)  # every row runs every position
        for seq in new:
            if eos is not None and eos in seq:
                seq = seq[: seq.index(eos)]
            out.tokens.append(seq)
            out.texts.append(tokenizer.decode(seq, skip_special_tokens=True))
    return out
