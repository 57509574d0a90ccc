"""Programmatic dependent launch (PDL) for the Triton kernels that run in front of the CUDA
decode GEMM in a served decode step (the activation quantizer; the RMSNorm of a weight-only
model): the one place that knows whether a device and this Triton take it, and how to launch.

A kernel that takes it has a ``GDC: tl.constexpr`` parameter and, when set, starts with
``prologue(GDC)``: ``gdc_wait`` (every write of the previous kernel in the stream is visible
before any load) then ``gdc_launch_dependents`` (the next kernel, if launched with PDL, may
launch now). The decode GEMM, launched with PDL (GemmPolicy.decode_pdl), then prefetches its
weight while this kernel runs and reads this kernel's output only after its own
``griddepcontrol.wait``, which returns when this grid has finished. Without the launch
attribute the two instructions return at once, so the results are the same bits either way.
Compute capability >= 9.0; Triton >= 3.3 (``launch_pdl``, ``tl.extra.cuda.gdc_*``).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - present in the Triton 3.6 / 3.9 builds here
    gdc_launch_dependents = gdc_wait = None

__all__ = ["capable", "launch", "prologue"]

# whether this Triton's launcher takes launch_pdl (False after a launch refused it)
_LAUNCH_PDL = gdc_wait is not None


@triton.jit
def prologue(GDC: tl.constexpr):
    """The first statement of a kernel that may be launched with PDL (module docstring)."""
    if GDC:
        gdc_wait()
        gdc_launch_dependents()


def capable(device: torch.device) -> bool:
    """Whether kernels on ``device`` can take PDL (a CUDA device of compute capability >= 9.0,
    a Triton with the griddepcontrol intrinsics)."""
    return device.type == "cuda" and gdc_wait is not None and _major(device.index) >= 9


@functools.cache
def _major(index: int | None) -> int:
    return torch.cuda.get_device_capability(index)[0]


def launch(kernel, grid, args: tuple, meta: dict, pdl: bool, device: torch.device) -> None:
    """``kernel[grid](*args, **meta, GDC=...)``, with PDL where ``pdl`` is asked for and the
    device takes it (a launcher without ``launch_pdl`` gets the instructions alone)."""
    global _LAUNCH_PDL
    gdc = bool(pdl) and capable(device)
    extra = {"launch_pdl": True} if gdc and _LAUNCH_PDL else {}
    try:
        kernel[grid](*args, **meta, GDC=gdc, **extra)
    except (TypeError, KeyError) as exc:
        if not extra or "launch_pdl" not in str(exc):
            raise
        _LAUNCH_PDL = False
        kernel[grid](*args, **meta, GDC=gdc)
