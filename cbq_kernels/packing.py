"""Packed int2 / int3-in-int4 / int4 / int8 storage: ``pack``, ``unpack``, ``dequantize``.

Each op has three parts, as everywhere in cbq_kernels:

* the kernels, in C++ (CPU) and CUDA, inside the extension ``cbq_kernels._C``;
* the public wrapper (``pack``, ``unpack``, ``dequantize``), registered with
  ``torch.library`` as ``cbq::pack`` etc. with fake implementations, so that
  ``torch.compile(fullgraph=True)`` traces them;
* a plain PyTorch reference (``pack_ref``, ``unpack_ref``, ``dequantize_ref``).

The layout is specified in :mod:`cbq_kernels.formats`. Every argument is validated in
Python before anything reaches the extension; errors name the argument, its shape, dtype
and device. Validation runs in the registered implementations themselves (real and fake),
so calling ``torch.ops.cbq.*`` directly is just as safe.
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import Tensor

from cbq_kernels import formats
from cbq_kernels._validate import FLOAT_DTYPES, check_tensor, describe
from cbq_kernels.formats import codes_per_word, container_bits, packed_words

__all__ = [
    "ExtensionNotBuiltError",
    "dequantize",
    "dequantize_ref",
    "pack",
    "pack_ref",
    "unpack",
    "unpack_ref",
]

_INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
# The dtype codes of the binding (cbq::DType in format.h).
_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


class ExtensionNotBuiltError(RuntimeError):
    """The compiled extension ``cbq_kernels._C`` is missing or lacks what a call needs."""


def _lib() -> ModuleType:
    try:
        from cbq_kernels import _C  # type: ignore[attr-defined]
    except ImportError as err:
        raise ExtensionNotBuiltError(
            "cbq_kernels._C is not built: install the package with `pip install .` "
            "(or `pip install -e .`), or build in place with "
            "`python setup.py build_ext --inplace`"
        ) from err
    return _C


def _lib_for(device: torch.device) -> ModuleType:
    lib = _lib()
    if device.type == "cuda" and not lib.has_cuda():
        raise ExtensionNotBuiltError(
            "cbq_kernels._C was built without CUDA kernels (no nvcc found, or CBQ_SKIP_CUDA=1);"
            " rebuild on a machine with nvcc to use CUDA tensors"
        )
    return lib


# ------------------------------------------------------------------------------ checks


def _check_same_device(first: Tensor, first_name: str, other: Tensor, name: str) -> None:
    if other.device != first.device:
        raise ValueError(
            f"{name} is on {other.device} but {first_name} is on {first.device}: "
            "all tensors of one call must be on the same device"
        )


def _check_int(value: object, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _check_packed(packed: object, bits: int, k: int) -> Tensor:
    packed = check_tensor(packed, "packed", (torch.int32,), 2)
    expected = packed_words(k, bits)
    if packed.shape[1] != expected:
        raise ValueError(
            f"packed has {packed.shape[1]} words per row but K={k} codes of {bits} bits need "
            f"{expected} ({codes_per_word(bits)} per int32 word); got packed {describe(packed)}"
        )
    return packed


def _check_pack_args(codes: object, bits: object) -> None:
    formats.check_bits(bits)
    check_tensor(codes, "codes", _INT_DTYPES, 2)


def _check_unpack_args(packed: object, bits: object, k: object) -> None:
    formats.check_bits(bits)
    _check_packed(packed, bits, _check_int(k, "k", 0))  # type: ignore[arg-type]


def _check_dequantize_args(
    packed: object,
    bits: object,
    k: object,
    scales: object,
    zeros: object,
    group_size: object,
    out_dtype: object,
) -> None:
    formats.check_bits(bits)
    k = _check_int(k, "k", 0)
    packed = _check_packed(packed, bits, k)  # type: ignore[arg-type]
    if group_size is not None:
        _check_int(group_size, "group_size", 1)
    if out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"out_dtype must be one of {FLOAT_DTYPES}, got {out_dtype}")
    expected = (packed.shape[0], formats.groups_per_row(k, group_size))  # type: ignore[arg-type]
    what = "per channel" if group_size is None else f"group_size={group_size}"
    for name, t, dtypes in (
        ("scales", scales, FLOAT_DTYPES),
        ("zeros", zeros, FLOAT_DTYPES + _INT_DTYPES),
    ):
        if t is None and name == "zeros":
            continue
        t = check_tensor(t, name, dtypes, 2)
        _check_same_device(packed, "packed", t, name)
        if tuple(t.shape) != expected:
            raise ValueError(
                f"{name} must have shape (N, groups) = {expected} for N={expected[0]} rows, "
                f"K={k}, {what}; got {describe(t)}"
            )


def _raise_out_of_range(codes: Tensor, bits: int) -> None:
    top = (1 << bits) - 1
    bad = codes.lt(0) | codes.gt(top)
    raise ValueError(
        f"codes hold {int(bad.sum())} values outside [0, {top}] for {bits}-bit codes "
        f"(min {int(codes.min())}, max {int(codes.max())}); got codes {describe(codes)}"
    )


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


# ------------------------------------------------------------------------------ ops


@torch.library.custom_op("cbq::pack", mutates_args=())
def _pack_op(codes: Tensor, bits: int) -> Tensor:
    _check_pack_args(codes, bits)
    if codes.dtype != torch.uint8:
        # Wider integer codes: checked here, then narrowed (the kernels read bytes).
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 1 << bits):
            _raise_out_of_range(codes, bits)
        codes = codes.to(torch.uint8)
    n, k = codes.shape
    packed = torch.empty((n, packed_words(k, bits)), dtype=torch.int32, device=codes.device)
    lib = _lib_for(codes.device)
    if codes.device.type == "cpu":
        bad = lib.pack_cpu(codes.data_ptr(), packed.data_ptr(), n, k, bits)
    else:
        flag = torch.zeros(1, dtype=torch.int32, device=codes.device)
        lib.pack_cuda(
            codes.data_ptr(), packed.data_ptr(), flag.data_ptr(), n, k, bits,
            codes.device.index, _stream(codes.device),
        )  # fmt: skip
        bad = int(flag.item())  # the kernel found codes >= 2**bits while packing
    if bad:
        _raise_out_of_range(codes, bits)
    return packed


@_pack_op.register_fake
def _(codes: Tensor, bits: int) -> Tensor:
    _check_pack_args(codes, bits)
    n, k = codes.shape
    return codes.new_empty((n, packed_words(k, bits)), dtype=torch.int32)


@torch.library.custom_op("cbq::unpack", mutates_args=())
def _unpack_op(packed: Tensor, bits: int, k: int) -> Tensor:
    _check_unpack_args(packed, bits, k)
    n = packed.shape[0]
    codes = torch.empty((n, k), dtype=torch.uint8, device=packed.device)
    lib = _lib_for(packed.device)
    if packed.device.type == "cpu":
        lib.unpack_cpu(packed.data_ptr(), codes.data_ptr(), n, k, bits)
    else:
        lib.unpack_cuda(
            packed.data_ptr(), codes.data_ptr(), n, k, bits,
            packed.device.index, _stream(packed.device),
        )  # fmt: skip
    return codes


@_unpack_op.register_fake
def _(packed: Tensor, bits: int, k: int) -> Tensor:
    _check_unpack_args(packed, bits, k)
    return packed.new_empty((packed.shape[0], k), dtype=torch.uint8)


@torch.library.custom_op("cbq::dequantize", mutates_args=())
def _dequantize_op(
    packed: Tensor,
    bits: int,
    k: int,
    scales: Tensor,
    zeros: Tensor | None,
    group_size: int | None,
    out_dtype: torch.dtype,
) -> Tensor:
    _check_dequantize_args(packed, bits, k, scales, zeros, group_size, out_dtype)
    n = packed.shape[0]
    out = torch.empty((n, k), dtype=out_dtype, device=packed.device)
    # The kernels read fp32 scales and zero points (a few per row: the copy is cheap).
    scales = scales.float().contiguous()
    zeros = None if zeros is None else zeros.float().contiguous()
    zeros_ptr = 0 if zeros is None else zeros.data_ptr()
    group = max(k, 1) if group_size is None else group_size
    args = (packed.data_ptr(), scales.data_ptr(), zeros_ptr, out.data_ptr(), n, k, bits, group)
    lib = _lib_for(packed.device)
    if packed.device.type == "cpu":
        lib.dequantize_cpu(*args, _DTYPE_CODE[out_dtype])
    else:
        lib.dequantize_cuda(
            *args, _DTYPE_CODE[out_dtype], packed.device.index, _stream(packed.device)
        )
    return out


@_dequantize_op.register_fake
def _(
    packed: Tensor,
    bits: int,
    k: int,
    scales: Tensor,
    zeros: Tensor | None,
    group_size: int | None,
    out_dtype: torch.dtype,
) -> Tensor:
    _check_dequantize_args(packed, bits, k, scales, zeros, group_size, out_dtype)
    return packed.new_empty((packed.shape[0], k), dtype=out_dtype)


# ------------------------------------------------------------------------------ public API


def pack(codes: Tensor, bits: int) -> Tensor:
    """Pack unsigned integer codes into int32 words (layout: :mod:`cbq_kernels.formats`).

    Args:
        codes: (N, K) contiguous integer tensor (uint8 preferred; wider integer dtypes are
            range-checked and narrowed), values in ``[0, 2**bits - 1]``, on cpu or cuda.
        bits: 2, 3 (stored in 4-bit containers), 4 or 8.

    Returns:
        (N, ceil(K / C)) int32 tensor on the same device, C = 32 // container_bits(bits).

    Raises:
        TypeError / ValueError naming the problem for any bad argument, including codes out
        of range (found by the kernel while packing; on cuda this synchronises the stream).
    """
    _check_pack_args(codes, bits)
    return _pack_op(codes, bits)


def unpack(packed: Tensor, bits: int, k: int) -> Tensor:
    """Inverse of :func:`pack`: (N, ceil(K / C)) int32 words -> (N, K) uint8 codes."""
    _check_unpack_args(packed, bits, k)
    return _unpack_op(packed, bits, k)


def dequantize(
    packed: Tensor,
    bits: int,
    k: int,
    scales: Tensor,
    zeros: Tensor | None = None,
    group_size: int | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
) -> Tensor:
    """Packed codes -> (N, K) ``(q - z) * s``, computed in fp32, rounded once to ``out_dtype``.

    Args:
        packed: (N, ceil(K / C)) int32, as produced by :func:`pack`.
        bits: bit width of the codes (2, 3, 4 or 8).
        k: the true K (number of codes per row before padding).
        scales: (N, G) float32/float16/bfloat16, G = 1 per channel (``group_size=None``)
            or ``ceil(K / group_size)``; the last group of a row may be shorter.
        zeros: (N, G) zero points, float or integer dtype; ``None`` means symmetric codes,
            ``z = 2**(bits-1)``.
        group_size: codes per group along K, or ``None`` for one group per row.
        out_dtype: torch.bfloat16, torch.float16 or torch.float32.
    """
    _check_dequantize_args(packed, bits, k, scales, zeros, group_size, out_dtype)
    return _dequantize_op(packed, bits, k, scales, zeros, group_size, out_dtype)


# ------------------------------------------------------------------------------ references


def _shifts(bits: int, device: torch.device) -> Tensor:
    return torch.arange(codes_per_word(bits), device=device, dtype=torch.int64) * container_bits(
        bits
    )


def pack_ref(codes: Tensor, bits: int) -> Tensor:
    """Plain PyTorch :func:`pack` (no argument checks)."""
    n, k = codes.shape
    per_word, words = codes_per_word(bits), packed_words(k, bits)
    padded = torch.zeros((n, words * per_word), dtype=torch.int64, device=codes.device)
    padded[:, :k] = codes.to(torch.int64)
    # The shifted codes occupy disjoint bits, so their sum is their bitwise or.
    packed = (padded.view(n, words, per_word) << _shifts(bits, codes.device)).sum(-1)
    return torch.where(packed >= 1 << 31, packed - (1 << 32), packed).to(torch.int32)


def unpack_ref(packed: Tensor, bits: int, k: int) -> Tensor:
    """Plain PyTorch :func:`unpack`."""
    n, words = packed.shape
    unsigned = packed.to(torch.int64) & 0xFFFFFFFF
    mask = (1 << container_bits(bits)) - 1
    codes = (unsigned.unsqueeze(-1) >> _shifts(bits, packed.device)) & mask
    return codes.reshape(n, words * codes_per_word(bits))[:, :k].to(torch.uint8)


def dequantize_ref(
    packed: Tensor,
    bits: int,
    k: int,
    scales: Tensor,
    zeros: Tensor | None = None,
    group_size: int | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
) -> Tensor:
    """Plain PyTorch :func:`dequantize`: fp32 ``(q - z) * s``, then one rounding."""
    q = unpack_ref(packed, bits, k).float()
    group = torch.arange(k, device=packed.device) // (group_size or max(k, 1))
    s = scales.float()[:, group]
    z = formats.default_zero_point(bits) if zeros is None else zeros.float()[:, group]
    return ((q - z) * s).to(out_dtype)
