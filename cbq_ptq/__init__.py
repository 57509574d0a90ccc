"""cbq_ptq: the CBQ post-training quantization driver, on top of cbq_kernels.

Settings and method configuration (:mod:`cbq_ptq.config`), corpora and
token windows (:mod:`cbq_ptq.data`), the architecture registry and model loading
(:mod:`cbq_ptq.models`), coarse-to-fine preprocessing (:mod:`cbq_ptq.cfp`), the quantized
linear layer (:mod:`cbq_ptq.qlinear`), the window pipeline (:func:`quantize`), perplexity
(:func:`evaluate_perplexity`, :func:`kernel_proportions`), saving / loading (:func:`save`,
:func:`load`) and running a saved model with the inference GEMMs (:func:`use_kernels`).
"""

from cbq_ptq.config import CBQConfig, QuantSettings, parse_setting
from cbq_ptq.evaluate import evaluate_perplexity, kernel_proportions
from cbq_ptq.io import load, save
from cbq_ptq.pipeline import quantize
from cbq_ptq.serve import use_kernels

__all__ = [
    "CBQConfig",
    "QuantSettings",
    "evaluate_perplexity",
    "kernel_proportions",
    "load",
    "parse_setting",
    "quantize",
    "save",
    "use_kernels",
]
