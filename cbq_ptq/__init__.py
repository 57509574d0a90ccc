"""cbq_ptq: the CBQ post-training quantization driver, on top of cbq_kernels.

Settings and method configuration (:mod:`cbq_ptq.config`), corpora and
token windows (:mod:`cbq_ptq.data`), the architecture registry and model loading
(:mod:`cbq_ptq.models`), coarse-to-fine preprocessing (:mod:`cbq_ptq.cfp`), the quantized
linear layer (:mod:`cbq_ptq.qlinear`), GPTQ and the starts (:mod:`cbq_ptq.gptq`), one window's
reconstruction (:mod:`cbq_ptq.reconstruct`), the window loop (:func:`quantize`), perplexity
(:func:`evaluate_perplexity`, :func:`kernel_proportions`), saving / loading (:func:`save`,
:func:`load`), export to compressed-tensors (:func:`export`) and running a saved model with
the inference GEMMs (:func:`use_kernels`); generation with them: :mod:`cbq_ptq.generate`
(:func:`load_for_generation`, ``cbq_ptq.generate.generate``, and :class:`DecodeSession`, which
keeps a shape's cache and captured graphs across calls).

The names below are imported on first use (``cbq --help`` should not wait for torch).
"""

from __future__ import annotations

import importlib

_WHERE = {
    "CBQConfig": "cbq_ptq.config",
    "DecodeSession": "cbq_ptq.generate",
    "QuantSettings": "cbq_ptq.config",
    "parse_setting": "cbq_ptq.config",
    "evaluate_perplexity": "cbq_ptq.evaluate",
    "export": "cbq_ptq.interop",
    "kernel_proportions": "cbq_ptq.evaluate",
    "load": "cbq_ptq.io",
    "load_for_generation": "cbq_ptq.generate",
    "save": "cbq_ptq.io",
    "quantize": "cbq_ptq.pipeline",
    "use_kernels": "cbq_ptq.serve",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'cbq_ptq' has no attribute {name!r}")
