"""Perplexity with the protocol of shared/README.md."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from cbq_ptq.data import eval_windows, load_text, tokenize


@torch.no_grad()
def evaluate_perplexity(model, tokenizer, corpus: str = "wikitext2", seq_len: int = 2048,
                        bos: bool = False, max_windows: int | None = None,
                        batch_size: int = 1, split: str = "eval",
                        progress: bool = False) -> dict[str, float]:  # fmt: skip
    """exp(mean next-token NLL) over consecutive non-overlapping windows of ``seq_len`` tokens
    of the corpus's evaluation text (tokenized whole, no special tokens). ``bos``: every
    window starts with BOS (the stories260K reference). ``max_windows``: the first windows
    only (stated in every report that uses it). ``split`` 'heldout': the held-out tenth of
    the calibration text instead (cbq_ptq.data). ``progress``: a progress bar over the
    windows. Returns ppl, nll, windows, tokens."""
    ids = tokenize(tokenizer, load_text(corpus, split))
    windows = eval_windows(ids, seq_len, tokenizer.bos_token_id if bos else None, max_windows)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    steps = range(0, windows.shape[0], batch_size)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc=f"perplexity on {corpus}", unit="window", leave=False)
    for i in steps:
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


@torch.no_grad()
def kernel_proportions(model, tokenizer, corpus: str = "wikitext2", seq_len: int = 2048,
                       bos: bool = False, max_windows: int = 1) -> dict[str, float]:  # fmt: skip
    """The quantization-kernel proportion of every activation-quantized layer (METHOD.md
    section 6): the fraction of the non-zero input elements whose code is 0, with the
    layer's own quantizer (per-token or CrossQuant, learned clipping), over the first
    ``max_windows`` evaluation windows of the corpus. Empty with 16-bit activations."""
    from cbq_ptq.qlinear import QLinear

    ids = tokenize(tokenizer, load_text(corpus, "eval"))
    windows = eval_windows(ids, seq_len, tokenizer.bos_token_id if bos else None, max_windows)
    counts: dict[str, list[int]] = {}
    hooks = []

    def hook(module, args):
        codes = module.act_codes(args[0])
        if codes is None:
            return
        nonzero = args[0].reshape(codes.shape) != 0
        c = counts.setdefault(module.name, [0, 0])
        c[0] += int(((codes == 0) & nonzero).sum())
        c[1] += int(nonzero.sum())

    for name, m in model.named_modules():
        if isinstance(m, QLinear):
            m.name = m.name or name
            hooks.append(m.register_forward_pre_hook(hook))
    device = next(model.parameters()).device
    try:
        for i in range(windows.shape[0]):
            model(windows[i : i + 1].to(device))
    finally:
        for h in hooks:
            h.remove()
    return {name: zero / max(total, 1) for name, (zero, total) in counts.items()}
