"""Argument checks shared by the ops (one wording for every tensor error), and the choice
between a Triton kernel and the PyTorch formulas for a device."""

from __future__ import annotations

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def describe(t: Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def check_float(t: object, name: str, like: Tensor | None = None, like_name: str = "") -> None:
    """t must be a float32 / float16 / bfloat16 tensor (any shape or strides), on the device of
    ``like`` (named ``like_name``) when given; raises TypeError / ValueError."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    if like is not None and t.device != like.device:
        raise ValueError(f"{name} is on {t.device} but {like_name} is on {like.device}")


def check_tensor(
    t: object, name: str, dtypes: tuple[torch.dtype, ...], ndim: int, layout: str = ""
) -> Tensor:
    """t must be a contiguous cpu/cuda (or meta, for tracing) tensor of one of `dtypes` with
    `ndim` dimensions (`layout` names them in the message); raises TypeError / ValueError."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        if dtypes == FLOAT_DTYPES:
            raise TypeError(f"{name} must be float32, float16 or bfloat16, got {describe(t)}")
        allowed = ", ".join(str(d) for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({allowed}), got {describe(t)}")
    if t.dim() != ndim:
        dims = f" ({layout})" if layout else ""
        raise ValueError(f"{name} must be {ndim}-D{dims}, got {describe(t)}")
    if t.device.type not in ("cpu", "cuda", "meta"):
        raise ValueError(f"{name}: only cpu and cuda tensors are supported, got {describe(t)}")
    if not t.is_contiguous():
        raise ValueError(
            f"{name} must be contiguous (call .contiguous() first), got {describe(t)} "
            f"with strides {t.stride()}"
        )
    return t


# Whether CPU tensors take Triton's interpreter when it is on. Only tests turn it off
# (cbq_kernels.testing.pytorch_paths_on_cpu): the generation front end's CPU tests run what a
# CPU user runs, the PyTorch formulas, which the kernels' own tests compare with the kernels;
# through the interpreter a 5-token generation took 79 s of CI's 18 minutes.
_INTERPRET_ON_CPU = [True]


def use_triton(kernel: object, device: torch.device) -> bool:
    """Whether a Triton kernel runs for tensors on `device`: always on cuda; on cpu only
    through Triton's interpreter (TRITON_INTERPRET=1 when the kernel module was imported,
    which makes triton.jit return interpreter functions). Otherwise the op runs its
    PyTorch formulas."""
    return device.type != "cpu" or (_INTERPRET_ON_CPU[0]
                                    and type(kernel).__name__ == "InterpretedFunction")
