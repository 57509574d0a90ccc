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
                        fuse: bool = True, fuse_norms: bool = True,
                        fuse_swiglu: bool | None = None,
                        fuse_rope: bool | None = None, pack_gqa: bool = True,
                        fuse_rms: bool | None = None):  # fmt: skip
    """(model, tokenizer, layer table) of a folder written by ``cbq quantize``: the kernels
    in place of the quantized layers when ``kernels``; ``dtype`` default: bf16 on a GPU, fp32
    on the CPU. ``fuse``: a block's q / k / v kernels run as one GEMM, and gate / up as
    another, where they share their activation quantizer (:func:`cbq_ptq.serve.
    fuse_projections`; H200, 7B-shaped, captured step: 5.50 -> 5.01 ms at batch 1 for W4A16
    g128, 14.08 -> 11.95 at batch 32; benchmarks/results/h200/bench_generate_bbe9d36.md).
    ``cbq eval --kernels`` loads through here too, so it scores the forward that generates.
    ``fuse_norms`` (with ``fuse``): the RMSNorms in front of fused groups with quantized
    activations run inside their activation quantizer (:func:`cbq_ptq.serve.fuse_norms`;
    H200, 7B-shaped, captured step, prompt 2048: W4A8 5.23 -> 4.43 ms at batch 1, 15.85 ->
    14.37 at batch 32, time to first token 59.9 -> 53.3 ms;
    benchmarks/results/h200/bench_generate_401f61a_norms.md). ``fuse_swiglu`` (with ``fuse``):
    the SwiGLU of each MLP runs inside the down projection's activation quantizer
    (:func:`cbq_ptq.serve.fuse_swiglu`). ``fuse_rope``: the attention's RoPE in one kernel per
    layer, bit-exact (:func:`cbq_ptq.serve.fuse_rope`; process-wide for the architecture).
    H100, 7B-shaped, captured step, batch 1, prompt 2048 (benchmarks/results/h100/
    bench_generate_2483d26_fusions.md): W4A8 decode step 4.77 -> 4.76 ms and time to first token
    54.3 -> 52.4 ms with the SwiGLU fused; then 4.76 -> 4.12 ms and 52.4 -> 48.9 ms with the
    RoPE kernel (bf16 8.70 -> 8.00 ms). Both default (None) to on for a CUDA device and off on
    the CPU: there the RoPE op is transformers' own formula and the SwiGLU quantizer the same
    PyTorch arithmetic as the unfused path, so they only add a wrapper (and, under Triton's
    interpreter in the tests, cost minutes per generation). ``pack_gqa``: a grouped-query
    model's decode steps attend with the query heads of each key-value head packed as one
    query instead of transformers 5.17's repeated KV cache (:func:`cbq_ptq.attention.
    pack_gqa_decode`; the same function, values equal to rounding), on every device.
    ``fuse_rms`` (default: on for a CUDA device): the RMSNorms that no quantizer took (every
    norm of a weight-only model, the final norm) in one kernel each (:func:`cbq_ptq.serve.
    fuse_rms_norms`; outputs may move by up to two units in the last place of the dtype)."""
    from transformers import AutoTokenizer

    from cbq_ptq.io import load
    from cbq_ptq.serve import fuse_norms as fuse_norms_fn
    from cbq_ptq.serve import fuse_projections, kernel_table
    from cbq_ptq.serve import fuse_swiglu as fuse_swiglu_fn

    device = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"dtype must be bfloat16, float16 or float32, got {dtype}")
    fuse_swiglu = device.type == "cuda" if fuse_swiglu is None else fuse_swiglu
    model = load(path, device=str(device), kernels=dtype if kernels else None)
    if kernels and fuse:
        fuse_projections(model)
        if fuse_norms:
            fuse_norms_fn(model)
        if fuse_swiglu:
            fuse_swiglu_fn(model)
    serving_fusions(model, device, fuse_rope, pack_gqa, fuse_rms)
    table = kernel_table(model) if kernels else {}
    model.to(dtype)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer, table


def serving_fusions(model, device: torch.device, fuse_rope: bool | None = None,
                    pack_gqa: bool = True, fuse_rms: bool | None = None) -> None:  # fmt: skip
    """The served step's fusions that are not quantization, so that a bf16 model takes them as
    well (bench_generate's bf16 base of a saved model): the RoPE kernel (``fuse_rope``), the
    packed grouped-query decode attention (``pack_gqa``) and the RMSNorm kernel
    (``fuse_rms``); None: on for a CUDA device, off on the CPU (:func:`load_for_generation`
    says why). Run after the quantizers' fusions: the norms that :func:`cbq_ptq.serve.
    fuse_norms` folded are no RMSNorm modules any more."""
    from cbq_ptq.attention import pack_gqa_decode
    from cbq_ptq.serve import fuse_rms_norms
    from cbq_ptq.serve import fuse_rope as fuse_rope_fn

    on_gpu = torch.device(device).type == "cuda"
    fuse_rope = on_gpu if fuse_rope is None else fuse_rope
    fuse_rms = on_gpu if fuse_rms is None else fuse_rms
    if fuse_rope:
        fuse_rope_fn(model)
    if pack_gqa:
        pack_gqa_decode(model)
    if fuse_rms:
        fuse_rms_norms(model)


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
    One call of a fresh :class:`DecodeSession` (which keeps the cache and the graphs for
    later calls of the same shape).

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
    return DecodeSession(model, capture=capture, compile=compile).run(
        input_ids, new_tokens, attention_mask, sample, temperature, top_p)


def _static_lengths(cache) -> list[torch.Tensor]:
    """The write positions that transformers' static cache layers keep as device tensors
    (``cumulative_length``: the layers write there, not at ``cache_position``), which a
    prefill must find at zero and a decode step advances."""
    return [layer.cumulative_length for layer in getattr(cache, "layers", ())
            if isinstance(getattr(layer, "cumulative_length", None), torch.Tensor)]  # fmt: skip


class _Shape:
    """The buffers of one generation shape (batch, prompt length, new tokens, sampling): the
    static KV cache, the prompt, mask and positions the prefill reads, the token and positions
    a step reads and advances, the output, and the graphs captured for them."""

    def __init__(self, model, key: tuple, input_ids: torch.Tensor, new_tokens: int) -> None:
        from transformers import StaticCache

        b, p = input_ids.shape
        device = input_ids.device
        self.key, self.p = key, p
        self.cache = StaticCache(config=model.config, max_cache_len=p + new_tokens)
        self.ids = torch.zeros((b, p), dtype=torch.long, device=device)
        self.mask = torch.ones((b, p + new_tokens), dtype=torch.long, device=device)
        self.positions = torch.zeros((b, p), dtype=torch.long, device=device)
        self.cache_position = torch.arange(p, device=device)
        self.out = torch.zeros((b, new_tokens), dtype=torch.long, device=device)
        self.tok = torch.zeros((b, 1), dtype=torch.long, device=device)
        self.pos = torch.full((1,), p, dtype=torch.long, device=device)
        self.row_pos = torch.zeros((b, 1), dtype=torch.long, device=device)
        self.lengths: list[torch.Tensor] = []  # known after the first prefill (lazy cache)
        self.step_graph: torch.cuda.CUDAGraph | None = None
        self.prefill_graph: torch.cuda.CUDAGraph | None = None

    def load(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        """This call's prompt into the buffers (in place: the captured graphs read them)."""
        self.ids.copy_(input_ids)
        self.mask[:, : self.p].copy_(attention_mask)
        self.positions.copy_((attention_mask.long().cumsum(-1) - 1).clamp_min(0))


class DecodeSession:
    """:func:`decode_loop` that keeps, between calls, the last shape's static KV cache, its
    buffers and its captured CUDA graphs (the decode step; with ``capture_prefill`` the
    prefill too): a later call of the same shape (batch, prompt length, new tokens, sampling
    options) copies its prompt into the buffers and replays, instead of building a cache and
    capturing the step again. Another shape replaces them (one shape is kept: a 7B cache of
    batch 32 x 2304 positions is ~38 GB).

    ``capture_prefill`` (a GPU, ``capture`` on): after a call's tokens are taken, the prefill
    of that shape is captured too (one more prefill on a side stream, then the capture), so
    that later calls of the shape replay it: the eager prefill of a W4A8 7B-shaped model
    launches three kernels per linear layer from Python and was host-bound on the H200 (kernel
    sum 64.5 ms, time to first token 95.1 ms at batch 1, prompt 2048: bench_generate_bbe9d36.md).
    Serving engines capture the prompt phase for a list of token counts for this reason
    (TensorRT-LLM's piecewise CUDA graphs, vLLM's captured sizes). Off by default: a one-off
    call (``cbq generate``) pays the extra prefill and never replays it.

    Reuse is exact: a replayed prefill overwrites cache positions 0..P-1 and resets the write
    positions; the positions after P hold the previous call's keys and values until a step
    overwrites them, and until then the causal mask gives them weight exp(-inf) = 0 (the
    CPU test holds a reused session's tokens equal to a fresh one's)."""

    def __init__(self, model, capture: bool | None = None, compile: bool = False,
                 capture_prefill: bool = False) -> None:  # fmt: skip
        self.model = model
        self.capture, self.compile, self.capture_prefill = capture, compile, capture_prefill
        self._shape: _Shape | None = None
        self._forward = None
        self._keep: dict | None = None
        self._cache_name = "past_key_values"

    def _forward_names(self) -> tuple[dict, str]:
        """(``logits_to_keep=1`` where the model takes it, as Hugging Face's generate passes
        it: the prefill needs the last position's logits only, not (B, P, vocab); the name of
        the cache argument: ``cache`` where the forward has it, transformers >= 5.25, whose
        ``past_key_values`` warns of its removal on every call, else ``past_key_values``)."""
        if self._keep is None:
            import inspect

            params = inspect.signature(self.model.forward).parameters
            self._keep = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
            self._cache_name = "cache" if "cache" in params else "past_key_values"
        return self._keep, self._cache_name

    def run(self, input_ids: torch.Tensor, new_tokens: int,
            attention_mask: torch.Tensor | None = None, sample: bool = False,
            temperature: float = 1.0,
            top_p: float = 1.0) -> tuple[torch.Tensor, float, float]:  # fmt: skip
        """As :func:`decode_loop`; the returned ids are a copy (the buffers are reused)."""
        device = input_ids.device
        capture = device.type == "cuda" if self.capture is None else self.capture
        if capture and device.type != "cuda":
            raise ValueError(f"graph capture needs a CUDA device, got {device}")
        if self.capture_prefill and not capture:
            raise ValueError(f"capture_prefill needs graph capture (a CUDA device and capture "
                             f"not False), got device {device}, capture={self.capture}")
        if isinstance(new_tokens, bool) or not isinstance(new_tokens, int) or new_tokens < 1:
            raise ValueError(f"new_tokens must be an int >= 1, got {new_tokens!r}")
        b, p = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask must have the shape of input_ids {(b, p)}, got "
                             f"{tuple(attention_mask.shape)}")  # fmt: skip
        context = getattr(self.model.config, "max_position_embeddings", None)
        if isinstance(context, int) and p + new_tokens > context:
            raise ValueError(f"the prompt ({p} tokens, padded to the batch's longest) and "
                             f"{new_tokens} new tokens exceed the model's context of {context} "
                             f"positions (max_position_embeddings): ask for at most "
                             f"{max(context - p, 0)} new tokens or shorten the prompt")  # fmt: skip
        key = (b, p, new_tokens, device, bool(sample), float(temperature), float(top_p),
               capture)  # fmt: skip
        if self._shape is None or self._shape.key != key:
            self._shape = None  # the old cache and graphs go first
            self._shape = _Shape(self.model, key, input_ids, new_tokens)
        st = self._shape
        keep, cache_name = self._forward_names()

        def prefill() -> None:
            for length in st.lengths:  # the cache's write positions back to 0
                length.zero_()
            logits = self.model(input_ids=st.ids, attention_mask=st.mask,
                                position_ids=st.positions, use_cache=True,
                                cache_position=st.cache_position,
                                **{cache_name: st.cache}, **keep).logits  # fmt: skip
            nxt = _next_token(logits[:, -1], sample, temperature, top_p)
            st.out[:, 0] = nxt
            st.tok.copy_(nxt[:, None])
            st.pos.fill_(p)
            st.row_pos.copy_(st.positions[:, -1:] + 1)

        if self.compile and self._forward is None:
            self._forward = torch.compile(self.model, dynamic=False)
        forward = self._forward if self.compile else self.model

        def step() -> None:
            logits = forward(input_ids=st.tok, attention_mask=st.mask, position_ids=st.row_pos,
                             use_cache=True, cache_position=st.pos,
                             **{cache_name: st.cache}).logits  # fmt: skip
            nxt = _next_token(logits[:, -1], sample, temperature, top_p)
            st.out.index_copy_(1, st.pos - (p - 1), nxt[:, None])
            st.tok.copy_(nxt[:, None])
            st.pos.add_(1)
            st.row_pos.add_(1)

        def sync() -> float:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return time.perf_counter()

        with torch.inference_mode():
            t_start = sync()
            st.load(input_ids, attention_mask)
            if st.prefill_graph is not None:
                st.prefill_graph.replay()
            else:
                prefill()
                if not st.lengths:
                    st.lengths = _static_lengths(st.cache)
            t_first = sync()
            if new_tokens == 1:
                rest = 0.0
            elif not capture:
                for _ in range(new_tokens - 1):
                    step()
                rest = sync() - t_first
            else:
                if st.step_graph is None:
                    st.step_graph = self._capture(step, st, device)
                t_replay = sync()  # warm-up and capture (once per shape) are in neither time
                for _ in range(new_tokens - 1):
                    st.step_graph.replay()
                rest = sync() - t_replay
            out = st.out.clone()
            if capture and self.capture_prefill and st.prefill_graph is None:
                st.prefill_graph = self._capture(prefill, st, device, warmups=1)
        return out, t_first - t_start, rest

    @staticmethod
    def _capture(fn, st: _Shape, device: torch.device, warmups: int = 2) -> torch.cuda.CUDAGraph:
        """``fn`` captured in a CUDA graph after ``warmups`` runs on a side stream (allocations
        and autotuning off the graph); the state that the runs advance (the step's token and
        positions and the cache's write positions: without their restore the replays wrote past
        the cache's end, an index_copy_ out of bounds on the H200 at f30d25d; and the CUDA
        random generator, so sampled tokens do not depend on whether this call captured) is
        put back."""
        state = [st.tok, st.pos, st.row_pos, st.out, *st.lengths]
        saved = [t.clone() for t in state]
        # the sampler's random stream too: without it the warm-ups' draws moved the generator
        # on, so a call that captured drew other tokens than a later call of the same seed
        # that replayed (H100, b9bb17a: test_a_session_with_a_captured_prefill failed there)
        rng = torch.cuda.get_rng_state(device)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(warmups):
                fn()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        for now, before in zip(state, saved, strict=True):
            now.copy_(before)
        torch.cuda.set_rng_state(rng, device)
        return graph


def chat_prompts(tokenizer, prompts: list[str]) -> list[str]:
    """Each prompt as one user turn in the tokenizer's chat template, ending where the
    assistant's answer starts (``add_generation_prompt``)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("chat: the model's tokenizer has no chat template (not an "
                         "instruction-tuned model?); give the prompts without --chat")  # fmt: skip
    return [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                          add_generation_prompt=True) for p in prompts]  # fmt: skip


def generate(model, tokenizer, prompts: str | list[str], max_new_tokens: int = 32,
             batch_size: int = 8, sample: bool = False, temperature: float = 1.0,
             top_p: float = 1.0, seed: int = 0, chat: bool = False) -> Generation:  # fmt: skip
    """Continue every prompt by up to ``max_new_tokens`` tokens, ``batch_size`` prompts at a
    time: greedy, or sampling at ``temperature`` / ``top_p`` (seeded: the same call gives the
    same text). ``chat``: each prompt is a user turn in the model's chat template
    (:func:`chat_prompts`), the continuation the assistant's answer."""
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
    if chat:
        prompts = chat_prompts(tokenizer, prompts)
    device = next(model.parameters()).device
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    eos = tokenizer.eos_token_id
    out = Generation([], [], 0.0, 0.0, 0)
    session = DecodeSession(model)  # batches of one shape reuse its cache and captured step
    for i in range(0, len(prompts), batch_size):
        batch = tokenizer(prompts[i : i + batch_size], return_tensors="pt", padding=True,
                          add_special_tokens=False).to(device)  # fmt: skip
        torch.manual_seed(seed + i)
        new_ids, prefill, decode = session.run(
            batch["input_ids"], max_new_tokens, batch["attention_mask"], sample, temperature,
            top_p)  # fmt: skip
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
