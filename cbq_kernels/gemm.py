"""Inference GEMMs on quantized weights: W4A8 and W4A4 on int8 tensor cores, W4A16 / W3A16 /
W2A16 weight-only, with a decode (small M) path and a dispatcher.

Shapes: activations x (M, K), weight W (N, K) (``out_features, in_features``, as
``nn.Linear``), output (M, N) = x @ W^T.

Weights are stored in the canonical packed format of :mod:`cbq_kernels.formats` (rows of W
packed along K into int32 words, 8 codes of 4 bits or 16 of 2 bits per word, 3-bit codes in
4-bit containers). :func:`prepare_weight` checks them once and keeps the words transposed,
(K / C, N) with N contiguous, so that every weight-tile load is coalesced; it converts scales to
fp32 and zero points to int32 (default ``2**(b-1)``). By M, as a frozen :class:`GemmPolicy`
says (passed in; docs/DECISIONS.md and benchmarks/results/h200/README.md have the
measurements behind each threshold):

* M <= ``policy.decode_max_m`` (16) on a GPU, when the extension has it: the CUDA decode
  kernel (csrc/gemm_decode.cu, layout in :mod:`cbq_kernels.gemm_decode`): 16-byte loads that
  are the MMA's B fragments, two codes per instruction, bf16 / fp16 MMA (integer codes are
  exact in bf16).
* M <= ``policy.small_m`` otherwise (decode, Triton): one Triton kernel unpacks a
  (BLOCK_K, BLOCK_N) tile of codes in registers in the K loop, subtracts the zero point and
  multiplies on tensor cores, with split-K so that M = 1 still starts enough programs; the
  slices write fp32 partials summed in a fixed order (deterministic).
* M >= ``policy.expand_min_m``, integer GEMMs: the 4-bit codes (and int4 activations) are first
  expanded to an int8 scratch copy of ``q - z``, then the same kernel runs int8 x int8 with no
  unpacking in the K loop; from ``policy.tma_min_m`` (1024) a persistent kernel with TMA
  descriptor loads runs that product instead (per-channel weights;
  :mod:`cbq_kernels.gemm_tma`), and at ``policy.gluon_min_m`` .. ``gluon_max_m`` (256 ..
  4096) with M x N >= ``gluon_min_mn`` (2^22) the Gluon kernel that keeps its MMAs in flight
  (:mod:`cbq_kernels.gemm_gluon`; the same bits). A two-level grouped weight
  (prepare_weight's ``channel_scales``) expands to the int8 values ``s2 (q - z)`` and runs
  that per-channel product, scaled by ``s1``. W4A4 from ``policy.fp8_w4a4_min_m`` (off by
  default: GemmPolicy says why; per-channel weights, bf16 out, no bias, a GPU with fp8 tensor
  cores): both operands expanded to fp8 e4m3 (exact for these integers) and cuBLAS' fp8 GEMM
  (``torch._scaled_mm``, fp32 sums).
  Weight-only GEMMs from ``policy.wonly_cublas_min_m``: dequantize to a scratch bf16/fp16
  weight (Triton), then cuBLAS.

Arithmetic:

* integer path (W4A8, W4A4): ``w = q - z`` in [-15, 15] and the activation codes are int8
  (W4A8) or int4 unpacked to int8 (W4A4, codes from :func:`cbq_kernels.act_quant.act_quant`
  with ``bits=4``, offset 8); ``tl.dot`` multiplies int8 x int8 into int32 (Hopper has no int4
  tensor cores). Per-channel weights accumulate the whole K in int32 and scale once:
  ``out = acc * s_x[m] * s_w[n]``; grouped weights (BLOCK_K divides the group) scale each
  K tile's int32 product by ``s_w[n, g]`` into an fp32 accumulator.
* weight-only path (W4A16, W2A16): ``w = (q - z)`` is exact in bf16/fp16, the tile product
  runs on bf16/fp16 tensor cores with fp32 accumulation, and the scale is applied per K tile
  (grouped) or once in the epilogue (per-channel).

``debug=True`` returns the raw int32 accumulator ``x_codes @ (q - z)^T`` (whole K, no scales)
of the integer kernels, for exactness tests.

Triton's CPU interpreter computes bf16 arithmetic wrongly (KERNELS.md); there the weight-only
kernel multiplies in fp32 (``DOT_F32``). Integer ``tl.dot`` is exact in the interpreter.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from cbq_kernels import formats, gemm_decode
from cbq_kernels._validate import FLOAT_DTYPES, check_tensor, describe, use_triton
from cbq_kernels.gemm_policy import BOOL_FIELDS
from cbq_kernels.gemm_triton import (
    _A_FLOAT,
    _A_INT4,
    _A_INT8,
    DEFAULT_POLICY,
    OUT_DTYPES,
    GemmPolicy,
    _check_bias,
    _check_out_dtype,
    _gemm_kernel,
    _launch,
    expand_weight,
    fp8_available,
    launch_w4a4_fp8,
)
from cbq_kernels.gemm_weight import PreparedWeight, mark_static, prepare_weight
from cbq_kernels.quant_math import dequantize_weight

__all__ = [
    "DEFAULT_POLICY",
    "OUT_DTYPES",
    "GemmPolicy",
    "PreparedWeight",
    "gemm_ref",
    "gemm_w4a4",
    "gemm_w4a8",
    "gemm_wonly",
    "linear",
    "mark_static",
    "prepare_weight",
]


def _check_weight(weight: object, int_path: bool) -> PreparedWeight:
    if not isinstance(weight, PreparedWeight):
        raise TypeError(
            f"weight must be a PreparedWeight (see prepare_weight), got {type(weight).__name__}"
        )
    if int_path and weight.container_bits != 4:
        raise ValueError(
            f"the integer GEMMs take 3- or 4-bit weights (4-bit containers), got {weight.bits}"
        )
    return weight


def _check_act_scales(x_scales: object, m: int, device: torch.device) -> Tensor:
    check_tensor(x_scales, "x_scales", FLOAT_DTYPES, 1, "M")
    assert isinstance(x_scales, Tensor)
    if x_scales.shape[0] != m or x_scales.device != device:
        raise ValueError(f"x_scales must be (M,) = ({m},) on {device}, got {describe(x_scales)}")
    return x_scales.float()


def gemm_w4a8(x_codes: Tensor, x_scales: Tensor, weight: PreparedWeight,
              bias: Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16,
              debug: bool = False, split_k: int | None = None,
              policy: GemmPolicy | None = None) -> Tensor:  # fmt: skip
    """W4A8: int8 activation codes (M, K) with per-token scales (M,) times a 3/4-bit weight.

    Returns (M, N) ``out_dtype`` = ``(x_codes * s_x) @ ((q - z) * s_w)^T + bias``, or with
    ``debug=True`` the int32 accumulator ``x_codes @ (q - z)^T``. ``split_k`` forces the
    Triton kernel with that many K slices (tests, sweeps); ``policy``: which kernel serves
    which M (:data:`DEFAULT_POLICY`)."""
    policy = _check_policy(policy)
    weight = _check_weight(weight, True)
    check_tensor(x_codes, "x_codes", (torch.int8,), 2, "M, K")
    if x_codes.shape[1] != weight.k:
        raise ValueError(f"x_codes must have K = {weight.k} columns, got {describe(x_codes)}")
    xs = _check_act_scales(x_scales, x_codes.shape[0], x_codes.device)
    _check_bias(bias, weight.n, x_codes.device)
    _check_out_dtype(out_dtype)
    if _eager():
        return _w4a8(x_codes, xs, weight, bias, out_dtype, debug, split_k, policy)
    return torch.ops.cbq.gemm_w4a8(x_codes, xs, *_weight_args(weight, True), bias, out_dtype,
                                   debug, split_k, _policy_args(policy))  # fmt: skip


def _w4a8(x_codes: Tensor, xs: Tensor, weight: PreparedWeight, bias: Tensor | None,
          out_dtype: torch.dtype, debug: bool, split_k: int | None,
          policy: GemmPolicy) -> Tensor:  # fmt: skip
    if not use_triton(_gemm_kernel, x_codes.device):
        return _int_gemm_torch(x_codes.to(torch.int32), xs, weight, bias, out_dtype, debug)
    if _use_decode(weight, x_codes, split_k, policy):
        return _decode(x_codes, xs, weight, bias, out_dtype, debug, policy)
    return _launch(x_codes, xs, _A_INT8, weight, bias, out_dtype, debug, split_k, policy=policy)


def gemm_w4a4(x_packed: Tensor, x_scales: Tensor, weight: PreparedWeight,
              bias: Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16,
              debug: bool = False, split_k: int | None = None,
              policy: GemmPolicy | None = None) -> Tensor:  # fmt: skip
    """W4A4: packed int4 activation codes (M, ceil(K/8)) int32, as returned by
    ``act_quant(x, 4)`` (signed codes offset by 8), per-token scales (M,); else as
    :func:`gemm_w4a8`."""
    policy = _check_policy(policy)
    weight = _check_weight(weight, True)
    check_tensor(x_packed, "x_packed", (torch.int32,), 2, "M, ceil(K/8)")
    if x_packed.shape[1] != formats.packed_words(weight.k, 4):
        raise ValueError(
            f"x_packed must have {formats.packed_words(weight.k, 4)} words per row for K = "
            f"{weight.k}, got {describe(x_packed)}"
        )
    xs = _check_act_scales(x_scales, x_packed.shape[0], x_packed.device)
    _check_bias(bias, weight.n, x_packed.device)
    _check_out_dtype(out_dtype)
    if _eager():
        return _w4a4(x_packed, xs, weight, bias, out_dtype, debug, split_k, policy)
    return torch.ops.cbq.gemm_w4a4(x_packed, xs, *_weight_args(weight, True), bias, out_dtype,
                                   debug, split_k, _policy_args(policy))  # fmt: skip


def _w4a4(x_packed: Tensor, xs: Tensor, weight: PreparedWeight, bias: Tensor | None,
          out_dtype: torch.dtype, debug: bool, split_k: int | None,
          policy: GemmPolicy) -> Tensor:  # fmt: skip
    if not use_triton(_gemm_kernel, x_packed.device):
        from cbq_kernels.packing import unpack_ref

        codes = unpack_ref(x_packed, 4, weight.k).to(torch.int32) - 8
        return _int_gemm_torch(codes, xs, weight, bias, out_dtype, debug)
    if _use_decode(weight, x_packed, split_k, policy):
        return _decode(x_packed, xs, weight, bias, out_dtype, debug, policy)
    if (0 < policy.fp8_w4a4_min_m <= x_packed.shape[0] and not debug and bias is None
            and split_k is None and out_dtype == torch.bfloat16 and weight.groups == 1
            and weight.k < 139810 and fp8_available(x_packed.device)):  # fmt: skip
        return launch_w4a4_fp8(x_packed, xs, weight)
    return _launch(x_packed, xs, _A_INT4, weight, bias, out_dtype, debug, split_k, policy=policy)


def gemm_wonly(x: Tensor, weight: PreparedWeight, bias: Tensor | None = None,
               split_k: int | None = None,
               policy: GemmPolicy | None = None) -> Tensor:  # fmt: skip
    """Weight-only W4A16 / W3A16 / W2A16: x (M, K) bf16/fp16 (fp32 accepted) times the
    dequantized weight, dequantization in registers, fp32 accumulation; output x's dtype.
    ``split_k`` / ``policy`` as in :func:`gemm_w4a8`."""
    policy = _check_policy(policy)
    weight = _check_weight(weight, False)
    check_tensor(x, "x", FLOAT_DTYPES, 2, "M, K")
    if x.shape[1] != weight.k:
        raise ValueError(f"x must have K = {weight.k} columns, got {describe(x)}")
    _check_bias(bias, weight.n, x.device)
    if _eager():
        return _wonly(x, weight, bias, split_k, policy)
    return torch.ops.cbq.gemm_wonly(x, *_weight_args(weight), bias, split_k,
                                    _policy_args(policy))  # fmt: skip


def _wonly(x: Tensor, weight: PreparedWeight, bias: Tensor | None, split_k: int | None,
           policy: GemmPolicy) -> Tensor:  # fmt: skip
    if not use_triton(_gemm_kernel, x.device):
        out = x.float() @ weight.dequantize(torch.float32).t()
        return (out + bias.float() if bias is not None else out).to(x.dtype)
    if x.dtype != torch.float32 and _use_decode(weight, x, split_k, policy):
        return _decode(x, None, weight, bias, x.dtype, False, policy)
    big = x.shape[0] >= policy.wonly_cublas_min_m and x.dtype != torch.float32
    if split_k is None and (big or weight.words is None):
        # Compute-bound (or no canonical words for the Triton kernel): dequantize to a
        # scratch (N, K) weight in x's dtype, then cuBLAS.
        w = expand_weight(weight, x.dtype, scaled=True)
        return torch.nn.functional.linear(x, w, bias.to(x.dtype) if bias is not None else None)
    return _launch(x, None, _A_FLOAT, weight, bias, x.dtype, False, split_k, policy=policy)


# ------------------------------------------------------------------------------ ops
# The GEMMs as torch.library custom ops (opaque to torch.compile, with fake implementations
# for tracing): a PreparedWeight travels as its tensors and ints, the policy as a list.

# every field of the policy, in declaration order (a field added there travels too)
_POLICY_FIELDS = tuple(f.name for f in dataclasses.fields(GemmPolicy))


def _eager() -> bool:
    """Outside torch.compile the GEMMs call their implementations directly: the custom op's
    dispatch (the dispatcher, its autograd and dynamo-disable wrappers, rebuilding the weight
    and the policy from the op's arguments) took about a third of a small GEMM call's Python
    time (CPU, 1 x 64 x 64: W4A16 90.3 -> 60.4 us, W4A8 106.7 -> 73.0 us per call without it;
    benchmarks/results/cpu/gemm_call_981ad9b.md), paid per linear in
    every uncompiled forward (prefill, ``cbq eval --kernels``: the H200's eager 7B-shaped
    W4A16 decode step spent ~96 us per linear beyond bf16's); traced code still sees the
    registered ops."""
    return not torch.compiler.is_compiling()


def _policy_args(policy: GemmPolicy) -> list[int]:
    return [int(getattr(policy, f)) for f in _POLICY_FIELDS]


def _policy_from(args: list[int]) -> GemmPolicy:
    values = dict(zip(_POLICY_FIELDS, args, strict=True))
    for name in BOOL_FIELDS:
        values[name] = bool(values[name])
    return GemmPolicy(**values)


def _weight_args(w: PreparedWeight, two_level: bool = False) -> tuple:
    """A prepared weight as the ops' flat arguments (``two_level``: with its channel scales
    and steps last, what the integer ops take)."""
    d = w.decode
    return (w.words, w.scales, w.zeros, w.bits, w.k, w.group_size or 0,
            *((d.words, d.scales, d.zeros, d.counters, d.bits, d.group_size) if d is not None
              else (None, None, None, None, 0, 0)),
            *((w.channel_scales, w.steps) if two_level else ()))  # fmt: skip


def _weight_from(words: Tensor | None, scales: Tensor, zeros: Tensor, bits: int, k: int,
                 group_size: int, d_words: Tensor | None, d_scales: Tensor | None,
                 d_zeros: Tensor | None, d_counters: Tensor | None, d_bits: int,
                 d_group: int, channel_scales: Tensor | None = None,
                 steps: Tensor | None = None) -> PreparedWeight:  # fmt: skip
    dw = None
    if d_words is not None:
        assert d_scales is not None and d_zeros is not None and d_counters is not None
        dw = gemm_decode.DecodeWeight(d_words, d_scales, d_zeros, d_counters, d_bits,
                                      scales.shape[0], k, d_group)  # fmt: skip
    return PreparedWeight(words, scales, zeros, bits, k, group_size or None, dw, channel_scales,
                          steps)  # fmt: skip


def _integer_op(name: str, impl):
    """The custom op ``cbq::name`` of an integer GEMM (W4A8, W4A4: the same signature; x is
    int8 codes or packed int4 codes) running ``impl`` (:func:`_w4a8` / :func:`_w4a4`)."""

    def op(x: Tensor, x_scales: Tensor, words: Tensor | None, scales: Tensor, zeros: Tensor,
           bits: int, k: int, group_size: int, d_words: Tensor | None, d_scales: Tensor | None,
           d_zeros: Tensor | None, d_counters: Tensor | None, d_bits: int, d_group: int,
           channel_scales: Tensor | None, steps: Tensor | None, bias: Tensor | None,
           out_dtype: torch.dtype, debug: bool, split_k: int | None,
           policy: list[int]) -> Tensor:  # fmt: skip
        w = _weight_from(words, scales, zeros, bits, k, group_size, d_words, d_scales, d_zeros,
                         d_counters, d_bits, d_group, channel_scales, steps)  # fmt: skip
        return impl(x, x_scales, w, bias, out_dtype, debug, split_k, _policy_from(policy))

    custom = torch.library.custom_op(f"cbq::{name}", mutates_args=())(op)

    @custom.register_fake
    def _(x, x_scales, words, scales, *args):
        out_dtype, debug = args[13], args[14]
        return x.new_empty((x.shape[0], scales.shape[0]),
                           dtype=torch.int32 if debug else out_dtype)  # fmt: skip

    return custom


_gemm_w4a8_op = _integer_op("gemm_w4a8", _w4a8)
_gemm_w4a4_op = _integer_op("gemm_w4a4", _w4a4)


@torch.library.custom_op("cbq::gemm_wonly", mutates_args=())
def _gemm_wonly_op(x: Tensor, words: Tensor | None, scales: Tensor, zeros: Tensor, bits: int,
                   k: int, group_size: int, d_words: Tensor | None, d_scales: Tensor | None,
                   d_zeros: Tensor | None, d_counters: Tensor | None, d_bits: int,
                   d_group: int, bias: Tensor | None, split_k: int | None,
                   policy: list[int]) -> Tensor:  # fmt: skip
    w = _weight_from(words, scales, zeros, bits, k, group_size, d_words, d_scales, d_zeros,
                     d_counters, d_bits, d_group)  # fmt: skip
    return _wonly(x, w, bias, split_k, _policy_from(policy))


@_gemm_wonly_op.register_fake
def _(x, words, scales, *args):
    return x.new_empty((x.shape[0], scales.shape[0]))


@torch.library.custom_op("cbq::prepare_weight", mutates_args=())
def _prepare_weight_op(packed: Tensor, bits: int, k: int, scales: Tensor, zeros: Tensor | None,
                       group_size: int) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    w = prepare_weight(packed, bits, k, scales, zeros, group_size or None, layout="canonical")
    return w.words, w.scales.clone(), w.zeros  # fp32 scales would alias the input


@_prepare_weight_op.register_fake
def _(packed, bits, k, scales, zeros, group_size):
    n, groups = scales.shape
    return (packed.new_empty((packed.shape[1], n)),
            scales.new_empty((n, groups), dtype=torch.float32),
            packed.new_empty((n, groups)))  # fmt: skip


def _check_policy(policy: object) -> GemmPolicy:
    if policy is None:
        return DEFAULT_POLICY
    if not isinstance(policy, GemmPolicy):
        raise TypeError(f"policy must be a GemmPolicy or None, got {type(policy).__name__}")
    return policy


def _use_decode(weight: PreparedWeight, x: Tensor, split_k: int | None,
                policy: GemmPolicy) -> bool:  # fmt: skip
    """The CUDA decode kernel takes M <= policy.decode_max_m when the weight has its layout
    and no split-K was forced (tests and sweeps force the Triton kernel with split_k), and M
    up to policy.small_m (16-row slices) when that layout is the weight's only one (the
    Triton kernel there reads the canonical words). The kernel reads x with vector loads when
    its rows are aligned for them, element by element otherwise."""
    if not (policy.cuda_decode and weight.decode is not None and x.device.type == "cuda"
            and split_k is None and x.shape[0] >= 1):  # fmt: skip
        return False
    limit = policy.small_m if weight.words is None else policy.decode_max_m
    return x.shape[0] <= limit


def _decode(x: Tensor, xs: Tensor | None, weight: PreparedWeight, bias: Tensor | None,
            out_dtype: torch.dtype, debug: bool, policy: GemmPolicy) -> Tensor:  # fmt: skip
    """The decode-layout product (:func:`_use_decode` said yes): the CUDA kernel, or between
    policy.decode_max_m and policy.tiles_max_m rows the Triton kernel that reads the layout
    once for all rows."""
    if policy.decode_max_m < x.shape[0] <= policy.tiles_max_m and weight.words is None:
        return gemm_decode.launch_triton(x, xs, weight.decode, bias, out_dtype, debug)
    return gemm_decode.launch(x, xs, weight.decode, bias, out_dtype, debug,
                              mtiles=policy.decode_mtiles, pdl=policy.decode_pdl)  # fmt: skip


def _int_gemm_torch(codes: Tensor, xs: Tensor, weight: PreparedWeight, bias: Tensor | None,
                    out_dtype: torch.dtype, debug: bool) -> Tensor:  # fmt: skip
    """The integer GEMM in PyTorch (CPU without the interpreter); codes are signed int32.
    The scaled output is computed in fp32 from the dequantized weight (the CPU forward of a
    served model: one C++ pass over the packed words per call, then a BLAS GEMM)."""
    from cbq_kernels.packing import unpack_ref

    _check_bias(bias, weight.n, codes.device)
    _check_out_dtype(out_dtype)
    if not debug:  # fp32, the weight dequantized by the compiled cbq::dequantize (C++)
        out = (codes.float() * xs.float()[:, None]) @ weight.dequantize(torch.float32).t()
        return (out + bias.float() if bias is not None else out).to(out_dtype)
    q = unpack_ref(weight.packed, weight.bits, weight.k).to(torch.int64)
    gid = torch.arange(weight.k, device=codes.device) // (weight.group_size or weight.k)
    wq = q - weight.zeros.to(torch.int64)[:, gid]
    return (codes.to(torch.int64) @ wq.t()).to(torch.int32)


# ------------------------------------------------------------------------------ reference


def gemm_ref(x: Tensor, weight: PreparedWeight, x_scales: Tensor | None = None,
             act_bits: int | None = None, bias: Tensor | None = None,
             dtype: torch.dtype = torch.float64) -> Tensor:  # fmt: skip
    """Plain PyTorch product in ``dtype`` (fp64 by default: the exact value to compare with).

    ``act_bits`` None: x is a float activation (weight-only); 8: x is integer codes (int8, or
    signed int32); 4: x is packed int4 codes (offset 8); x_scales (M,) for the last two."""
    from cbq_kernels.packing import unpack_ref

    if act_bits is None:
        xa = x.to(dtype)
    else:
        codes = x if act_bits == 8 else unpack_ref(x, 4, weight.k).to(torch.int32) - 8
        xa = codes.to(dtype) * x_scales.to(dtype)[:, None]  # type: ignore[union-attr]
    q = unpack_ref(weight.packed, weight.bits, weight.k)
    w = dequantize_weight(q, weight.scales, weight.zeros, weight.group_size, dtype)
    out = xa @ w.t()
    return out + bias.to(dtype) if bias is not None else out


# ------------------------------------------------------------------------------ dispatcher


def linear(x: Tensor, weight: PreparedWeight, act_bits: int | None = None,
           bias: Tensor | None = None, policy: GemmPolicy | None = None,
           rotation_signs: Tensor | None = None, **act_kwargs) -> Tensor:  # fmt: skip
    """``y = x @ W^T + bias`` for x (..., K) bf16/fp16, the path chosen by (M, N, K):

    * ``act_bits=None``: weight-only GEMM (the decode kernels at small M; at large M,
      dequantize + cuBLAS from ``policy.wonly_cublas_min_m``, measured in
      benchmarks/results/h200/bench_gemm_7a9193f.csv).
    * ``act_bits`` 8 or 4: per-token activation quantization (:func:`act_quant`, keyword
      arguments passed on: ``norm_weight``, ``clip_ratio``, CrossQuant ``channel_factor`` /
      ``alpha``) then the W4A8 / W4A4 integer GEMM; with CrossQuant factors the quantized
      activations are dequantized (``q s_t f_k``) and multiplied by the weight-only GEMM
      (the factors are not folded into the weight's codes, so no integer product holds).
    * ``rotation_signs`` (K,): the input is first rotated online, x @ diag(signs) H_K /
      sqrt(K) (cbq_kernels.hadamard); with plain per-token quantization the rotation and the
      quantizer run as one kernel (:func:`cbq_kernels.hadamard_quant.hadamard_act_quant`).
    """
    from cbq_kernels.act_quant import act_quant

    if not isinstance(x, Tensor) or x.dim() < 1 or x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x must be a float tensor of shape (..., K), got {x!r:.80}")
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    fused = rotation_signs is not None and act_bits in (4, 8) and set(act_kwargs) <= {"clip_ratio"}
    if rotation_signs is not None and not fused:
        from cbq_kernels.hadamard import apply

        x2 = apply(x2, rotation_signs)
    if act_bits is None:
        y = gemm_wonly(x2, weight, bias, policy=policy)
    elif act_bits in (4, 8):
        if fused:
            from cbq_kernels.hadamard_quant import hadamard_act_quant

            codes, scales = hadamard_act_quant(x2, act_bits, rotation_signs, **act_kwargs)
        else:
            # GemmPolicy.prologue_pdl: the quantizer lets the decode GEMM launch at once (the
            # GEMM's weight prefetch overlaps it; it reads the codes after its
            # griddepcontrol.wait: cbq_kernels.pdl)
            codes, scales = act_quant(x2, act_bits, pdl=_check_policy(policy).prologue_pdl,
                                      **act_kwargs)  # fmt: skip
        factor = act_kwargs.get("channel_factor")
        if factor is not None:
            # CrossQuant: x ~= q * s_t * f_k, and f varies along K, so the integer product of
            # q with the weight's codes is not the layer's (that needs the weight quantized
            # as W diag(f), which calibration does not do): the activations are dequantized
            # (q s f, the fake-quantized model's values) and run through the weight-only GEMM
            from cbq_kernels.act_quant import dequantize_act_ref

            x_hat = dequantize_act_ref(codes, scales, act_bits, x2.shape[1], factor)
            y = gemm_wonly(x_hat.to(x.dtype), weight, bias, policy=policy)
        else:
            fn = gemm_w4a8 if act_bits == 8 else gemm_w4a4
            y = fn(codes, scales, weight, bias, out_dtype=x.dtype, policy=policy)
    else:
        raise ValueError(f"act_bits must be None, 4 or 8, got {act_bits!r}")
    return y.reshape(*x.shape[:-1], weight.n)
