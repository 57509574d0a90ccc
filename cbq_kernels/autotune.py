"""What the Triton GEMMs' autotuners share: the timing run per configuration and the on-disk
cache of their choices."""

from __future__ import annotations

import inspect

import triton

# Triton >= 3.3 can keep the autotuner's choice on disk (keyed by the kernel and the tuning
# key), so that a new process does not re-time every configuration.
AUTOTUNE_CACHE = (
    {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters
    else {}
)  # fmt: skip


def tune_bench(kernel_call, quantiles):
    """Short timing runs for the autotuner (the default 25/100 ms per config makes a first
    call at a new shape take seconds; the configurations it picks among differ by more than
    the noise of 10 ms of runs)."""
    return triton.testing.do_bench(kernel_call, warmup=2, rep=10, quantiles=quantiles)
