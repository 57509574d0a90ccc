"""Perplexity with the protocol of shared/README.md."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from cbq_ptq.data import eval_windows, load_text, tokenize


@torch.no_grad()
def evaluate_perplexity(model, tokenizer, corpus: str = "wikitext2", seq_len: int = 2048,
                        bos: bool = False, max_windows: int | None = None,
                        batch_size: int = 1) -> dict[str, float]:  # fmt: skip
    """exp(mean next-token NLL) over consecutive non-overlapping windows of ``seq_len`` tokens
    of the corpus's evaluation text (tokenized whole, no special tokens). ``bos``: every
    window starts with BOS (the stories260K reference). ``max_windows``: the first windows
    only (stated in every report that uses it). Returns ppl, nll, windows, tokens."""
    ids = tokenize(tokenizer, load_text(corpus, "eval"))
    windows = eval_windows(ids, seq_len, tokenizer.bos_token_id if bos else None, max_windows)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, windows.shape[0], batch_size):
        batch = windows[i : i + batch_size].to(device)
        logits = model(batch).logits.float()
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                              batch[:, 1:].reshape(-1), reduction="sum")  # fmt: skip
        if not torch.isfinite(nll):
            raise FloatingPointError(f"non-finite loss in evaluation window {i}")
        total += float(nll)
        count += batch[:, 1:].numel()
    nll_mean = total / count
    return {"ppl": math.exp(nll_mean), "nll": nll_mean, "windows": windows.shape[0],
            "tokens": count}  # fmt: skip
