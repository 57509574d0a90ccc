"""The online rotation of a layer input fused with its per-token activation quantizer:
``codes, scales = act_quant(x @ R, bits)`` with ``R = diag(signs) H_n / sqrt(n)`` (a
randomised Hadamard matrix, cbq_kernels.hadamard), in one pass over x (issue 15: R4 on the
down_proj input of a rotated model).

H_n = H_m (x) H_p (n = m p, p = 2^j, m = 1, a Paley or a Williamson order;
cbq_kernels.hadamard.factor),
and H_p = H_p1 (x) H_p2 (Sylvester's matrices, p1 = 1 or 2^floor(j/2), p2 the rest). A
program holds R rows, each as an (m_pad, p1, p2) tile, and contracts one axis at a time on
the tensor cores: ``tl.dot`` of the tile, reshaped to (rows, 16..128), with the +-1 factor
(p2, then p1 after a permute, then the small factor m). The butterflies of the reference
(log2 p passes, each a reshape and permute of the tile) ran at 10% of the copy bandwidth
at 8192 x 1536 on the H200 (benchmarks/results/h200/bench_hadamard_ed30008.md).

Precision: each operand is an fp16 pair, hi = fp16(a) and lo = fp16(a - hi) (22 significant
bits), and the products with +-1 are exact, summed in fp32 by the MMA. A row is scaled by a
power of two first so that |x| < 1/4 and no partial sum leaves fp16's range (n <= 32768);
the scaling is undone exactly at the end. A bf16 input takes one fp16 part for its first
product (one MMA, not two): exact except where an element falls below fp16's normal range
after the scaling (2^-14, against a row maximum of at least 2^-3), an error of at most 2^-25
against a quantization step of at least 2^-3 / 127. The per-token quantization of
:mod:`cbq_kernels.act_quant` (same step, same rounding) then writes int8 codes or packed int4
words and the fp32 scale.

Exactness against the reference (:func:`hadamard_act_quant_ref`, the fp32 butterflies then
:func:`cbq_kernels.act_quant.act_quant_ref`): the MMA adds the terms in another order (and
the lo parts carry 2^-22 of each value), so a scale can differ in its last bits and a code
by one level where x R lies within ~1e-6 of a rounding boundary (the tests bound how many).
Widths the tile does not take (m_pad > 64, p < 16, m_pad p > 32768: e.g. 11008 = 172 x 64)
run the composition: the transform as matrix products, then act_quant.

Wide widths with a small factor (n >= ``_CUDA_MIN_N``: Llama-2's 11008 = 172 x 64 and 28672 =
28 x 1024) run a CUDA kernel when the extension has it (16-bit inputs: the register kernels, below;
CBQ_HADAMARD_CUDA=smem the shared-memory one, 0 the Triton composition, for comparison).
The shared-memory kernel of csrc/hadamard_quant.cu: a row per thread block in shared
memory, the small factor on the tensor cores (16-bit inputs; the CUDA cores for fp32 ones),
radix-32 butterflies, the same quantizer arithmetic and the same contract as this module's
kernel (one level, in rare elements; scales to their last bits). The Triton tile spills at
those widths (255 registers and 700-1552 bytes per thread) and ran at 4.7% (28672) of the
copy bandwidth, the composition at 3.2% (11008; benchmarks/results/h200/
bench_hadamard_3a9aa0a.md); the CUDA kernel at 12.1% (11008) and 18.5% (28672), 3.8x the
composition and 3.9x the tile (H200, bench_hadamard_7a9193f.md, where its ncu reading says
what limits it).
"""

from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from cbq_kernels import hadamard
from cbq_kernels._validate import FLOAT_DTYPES, check_tensor, use_triton
from cbq_kernels.act_quant import _act_step, _round_store_rows, act_quant_ref
from cbq_kernels.formats import packed_words

__all__ = ["hadamard_act_quant", "hadamard_act_quant_ref"]

_MAX_TILE = 32768  # m_pad x p elements of one row in a program (28672 = 28 x 1024 fits)
_MAX_M_PAD = 64  # the small factor's tile (m padded) for tl.dot
_MAX_FACTOR = 128  # largest Sylvester factor of one tl.dot


@triton.jit
def _dot_pair(a, h, TWO: tl.constexpr):
    """a @ h for fp32 a (|a| in fp16's range) and an fp16 +-1 matrix h: a as fp16 hi + lo
    (one part when TWO is false: a is exact in fp16), exact products summed in fp32."""
    hi = a.to(tl.float16)
    acc = tl.dot(hi, h, out_dtype=tl.float32)
    if TWO:
        acc = tl.dot((a - hi.to(tl.float32)).to(tl.float16), h, acc)
    return acc


@triton.jit
def _sylvester_tile(h_ptr, F: tl.constexpr):
    i = tl.arange(0, F)
    return tl.load(h_ptr + i[:, None] * F + i[None, :])


@triton.jit
def _small_tile(a_ptr, M, MP: tl.constexpr):
    """The m x m small factor A as an (MP, MP) tile, zero beyond m."""
    i = tl.arange(0, MP)
    return tl.load(a_ptr + i[:, None] * M + i[None, :], mask=(i[:, None] < M) & (i[None, :] < M),
                   other=0.0)  # fmt: skip


@triton.jit
def _hadamard_quant_kernel(x_ptr, sg_ptr, a_ptr, h1_ptr, h2_ptr, q_ptr, s_ptr, T, N, M, ratio,
                           P, inv_sqrt_n, BITS: tl.constexpr, R: tl.constexpr,
                           MP: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr,
                           EXACT_IN: tl.constexpr, PER_WORD: tl.constexpr):  # fmt: skip
    W: tl.constexpr = MP * P1 * P2
    rows = tl.program_id(0).to(tl.int64) * R + tl.arange(0, R)
    col = tl.arange(0, W)  # i * p + j1 * p2 + j2: block i of the small factor, element j
    live = col < N  # i < m
    row_ok = rows < T
    m = row_ok[:, None] & live[None, :]
    x = tl.load(x_ptr + rows[:, None] * N + col[None, :], mask=m, other=0.0).to(tl.float32)
    x = x * tl.load(sg_ptr + col, mask=live, other=0.0)[None, :]
    # a power of two e per row with |x e| < 1/4: every partial sum (at most n terms) stays
    # inside fp16's range; e = 2^-(E + 3) for max |x| in [2^E, 2^(E + 1)), built from the bits
    ebits = (tl.max(tl.abs(x), axis=1).to(tl.int32, bitcast=True) >> 23) & 0xFF
    e = (tl.minimum(tl.maximum(251 - ebits, 1), 254) << 23).to(tl.float32, bitcast=True)
    y = tl.reshape(x * e[:, None], (R * MP * P1, P2))
    y = _dot_pair(y, _sylvester_tile(h2_ptr, P2), not EXACT_IN)  # contract j2
    if P1 > 1:  # contract j1: (R, MP, P1, P2) -> (R, MP, P2, P1)
        y = tl.permute(tl.reshape(y, (R * MP, P1, P2)), (0, 2, 1))
        y = _dot_pair(tl.reshape(y, (R * MP * P2, P1)), _sylvester_tile(h1_ptr, P1), True)
        y = tl.reshape(y, (R, MP, P2, P1))
        if MP > 1:  # contract i (A^T X; rows / columns >= m of A are zero)
            y = tl.reshape(tl.permute(y, (0, 2, 3, 1)), (R * P2 * P1, MP))
            a = _small_tile(a_ptr, M, MP)
            y = tl.permute(tl.reshape(_dot_pair(y, a, True), (R, P2, P1, MP)), (0, 3, 2, 1))
        else:
            y = tl.permute(y, (0, 1, 3, 2))
    elif MP > 1:
        y = tl.reshape(tl.permute(tl.reshape(y, (R, MP, P2)), (0, 2, 1)), (R * P2, MP))
        a = _small_tile(a_ptr, M, MP)
        y = tl.permute(tl.reshape(_dot_pair(y, a, True), (R, P2, MP)), (0, 2, 1))
    y = tl.reshape(y, (R, W)) * (inv_sqrt_n / e)[:, None]
    # the per-token quantizer of cbq_kernels.act_quant (plain: no factors, alpha = 1)
    s = _act_step(tl.max(tl.abs(y), axis=1), ratio, P)
    tl.store(s_ptr + rows, s, mask=row_ok)
    _round_store_rows(y * tl.math.div_rn(1.0, s)[:, None], m, rows, row_ok, N, P, q_ptr, BITS,
                 PER_WORD, W)


def _check(x, bits, signs, clip_ratio) -> None:
    check_tensor(x, "x", FLOAT_DTYPES, 2, "tokens, N")
    n = x.shape[1]
    if isinstance(n, int):  # (a symbolic width under torch.compile is checked when it runs)
        hadamard.factor(n)  # a clear error for a width without a construction
    if bits not in (4, 8) or isinstance(bits, bool):
        raise ValueError(f"bits must be 4 or 8 (int8 codes or packed int4), got {bits!r}")
    if not 0.0 < clip_ratio <= 1.0:
        raise ValueError(f"clip_ratio must be in (0, 1], got {clip_ratio}")
    if not isinstance(signs, Tensor) or tuple(signs.shape) != (n,):
        raise ValueError(f"signs must be a tensor of shape ({n},), got {signs!r:.60}")
    if signs.device != x.device:
        raise ValueError(f"signs is on {signs.device} but x is on {x.device}")


def _tile(n: int) -> tuple[int, int, int] | None:
    """(m_pad, p1, p2) of the fused kernel's row tile for width n, or None where the kernel
    does not take n (then the transform, then act_quant)."""
    m, p = hadamard.factor(n)
    m_pad = 1 if m == 1 else max(16, triton.next_power_of_2(m))
    j = p.bit_length() - 1
    p1, p2 = (1, p) if j <= 7 else (1 << (j // 2), 1 << (j - j // 2))
    if m_pad > _MAX_M_PAD or p2 < 16 or p2 > _MAX_FACTOR or m_pad * p > _MAX_TILE:
        return None
    return m_pad, p1, p2


def _fits(n: int) -> bool:
    """Whether the fused kernel takes width n (else: the transform, then act_quant)."""
    return _tile(n) is not None


def _launch(x: Tensor, bits: int, signs: Tensor, clip_ratio: float, rows: int | None = None,
            warps: int | None = None) -> tuple[Tensor, Tensor]:  # fmt: skip
    """The fused kernel on (T, N) x; rows per program and warps default to :func:`_config`
    (the benchmark passes others to sweep them)."""
    t, n = x.shape
    m, _ = hadamard.factor(n)
    tile = _tile(n)
    assert tile is not None and n % 4 == 0
    m_pad, p1, p2 = tile
    d_rows, d_warps = _config(m_pad * p1 * p2)
    rows, warps = rows or d_rows, warps or d_warps
    if m_pad > 1 and warps > _MAX_WARPS_SMALL_FACTOR:
        raise ValueError(f"{warps} warps with a small Hadamard factor (width {n}, m = {m}) "
                         f"give wrong codes; at most {_MAX_WARPS_SMALL_FACTOR}")  # fmt: skip
    shape = (t, n) if bits == 8 else (t, packed_words(n, 4))
    codes = torch.empty(shape, dtype=torch.int8 if bits == 8 else torch.int32, device=x.device)
    scales = torch.empty(t, dtype=torch.float32, device=x.device)
    if t:
        dev, f16 = x.device, torch.float16
        small = hadamard._small_tensor(m, dev, f16) if m > 1 else signs
        h1 = hadamard._sylvester_tensor(p1, dev, f16)
        h2 = hadamard._sylvester_tensor(p2, dev, f16)
        out = codes.view(torch.int32) if bits == 8 else codes
        _hadamard_quant_kernel[(triton.cdiv(t, rows),)](
            x.contiguous(), signs.float().contiguous(), small, h1, h2, out, scales, t, n, m,
            float(clip_ratio), float((1 << (bits - 1)) - 1), 1.0 / math.sqrt(n),
            BITS=bits, R=rows, MP=m_pad, P1=p1, P2=p2, EXACT_IN=x.dtype == torch.bfloat16,
            PER_WORD=4 if bits == 8 else 8, num_warps=warps, enable_fp_fusion=False,
        )  # fmt: skip
    return codes, scales


def _config(tile: int) -> tuple[int, int]:
    """(rows per program, warps) for a row tile of `tile` elements. From the H200 sweep of
    benchmarks/bench_hadamard.py (2d9c58b, int8, 8192 rows): 1536 (tile 2048) R = 2 or 4 with
    4 warps 0.057 ms (R = 4 with 8 warps 0.165); 4096 R = 1 with 4 warps 0.088 ms (R = 2
    0.098, 8 warps 0.151); 28672 (tile 32768) R = 1 with 8 warps 3.62 ms, 16 warps 3.79."""
    rows = max(1, min(16, 4096 // tile))
    return rows, 4 if rows * tile <= 8192 else 8


def launch_configs(n: int) -> list[tuple[int, int]]:
    """The (rows per program, warps) configurations that benchmarks/bench_hadamard.py sweeps
    for width n (a fused width) and the GPU test checks: 2048 to 32768 elements per program
    (one row always), 4 or 8 warps up to 8192 elements, 8 or 16 above (8 only with a small
    factor: see :data:`_MAX_WARPS_SMALL_FACTOR`)."""
    m_pad, p1, p2 = _tile(n)
    configs = []
    for rows in (1, 2, 4, 8, 16):
        elems = rows * m_pad * p1 * p2
        if rows > 1 and not 2048 <= elems <= 32768:
            continue
        warps = (4, 8) if elems <= 8192 else (8, 16)
        configs += [(rows, w) for w in warps if m_pad == 1 or w <= _MAX_WARPS_SMALL_FACTOR]
    return configs


# With a small factor (m_pad > 1), 16 warps give wrong codes under Triton 3.6 on the H200: at
# 28672 (tile 32 x 32 x 32, one row per program) 1,300,380 of 1,835,008 int8 codes off, by up
# to 255 levels, while the scales were right (relative error 2.2e-6) and 8 warps gave 126 codes
# one level off (scripts/hadamard_configs.py, 0d500ea; first seen at 2d9c58b). Power-of-two
# widths passed at 16 warps (4096 with 4 and 8 rows per program, test_launch_configs). The
# default configuration never asks for more than 8 warps; _launch refuses 16 here.
_MAX_WARPS_SMALL_FACTOR = 8


# The CUDA kernel (csrc/hadamard_quant.cu) for widths from this one, when the small factor is
# > 1: the widths where the Triton tile spills or does not fit (28672, 11008); below, the
# Triton kernel (1536, 4096: no spills, 22-32% of the copy bandwidth at 2d9c58b)
_CUDA_MIN_N = 8192
_CUDA_MAX_N = 32768  # one row in a block's shared memory (fp32)
_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # cbq::DType
# The API routes those widths to the CUDA kernels unless CBQ_HADAMARD_CUDA=0 (the Triton
# composition). 16-bit inputs go to the register kernels (csrc/hadamard_quant_reg.cu,
# hadamard_quant_xch.cu; variant 0, REG_VARIANTS) where they take the shape, others (fp32)
# to the shared-memory kernel (csrc/hadamard_quant.cu); CBQ_HADAMARD_CUDA=smem keeps every
# input on the shared-memory kernel. The register kernels are the default since b9bb17a:
# their GPU tests passed (all variants, widths, dtypes and row counts, H200 at f098880),
# compute-sanitizer's memcheck and racecheck found 0 errors and 0 hazards in them (H100 at
# b9bb17a, benchmarks/results/h100/hsanitize_b9bb17a.txt), and they are 1.6-1.8x the
# shared-memory kernel (8192 rows, int8: H200 f098880 28672 0.565 vs 0.911 ms, 11008 0.333
# vs 0.553; H100 b9bb17a under ncu 0.642 vs 1.11 ms, 0.388 vs 0.681). The shared-memory
# kernel served by default from 7a9193f (its GPU tests and sanitizer runs on the H200).
_CUDA_ENV = "CBQ_HADAMARD_CUDA"
_REG = "reg"  # the default (any value but "0" and "smem")
_SMEM = "smem"


def _cuda_built() -> bool:
    try:
        from cbq_kernels import _C  # type: ignore[attr-defined]
    except ImportError:
        return False
    return bool(_C.has_cuda()) and hasattr(_C, "hadamard_quant_reg_cuda")


def _cuda_shape(n: int) -> tuple[int, int, int] | None:
    """(m, mp, p) of the CUDA kernel's launch for width n, or None where it is not routed
    there: n = m p, mp = m rounded up to 16 (the small factor's padded columns). Whether the
    kernel takes the shape on a device is the extension's answer (:func:`_use_cuda`)."""
    m, p = hadamard.factor(n)
    if m == 1 or p < 32 or not _CUDA_MIN_N <= n <= _CUDA_MAX_N:
        return None
    return m, -(-m // 16) * 16, p


@functools.lru_cache(maxsize=64)
def _small_padded(m: int, mp: int, device: torch.device) -> Tensor:
    """H_m as an (m, mp) fp32 tensor, columns >= m zero (the CUDA kernel's small factor)."""
    out = torch.zeros((m, mp), dtype=torch.float32)
    out[:, :m] = torch.from_numpy(hadamard._small(m)).float()
    return out.to(device)


def _mma_default(x: Tensor) -> bool:
    """The small factor on the tensor cores for 16-bit inputs (exact operands), on the CUDA
    cores for fp32 ones."""
    return x.dtype != torch.float32


def _use_cuda(x: Tensor, mma: bool | None = None) -> bool:
    """Whether the CUDA kernel runs this x: a GPU tensor, the kernel built, a routed width,
    16-byte aligned rows, and the extension's answer for the shape, dtype and path (-1: not
    taken, e.g. fp32 on the tensor cores) within this device's shared memory."""
    if not x.is_cuda or not _cuda_built():
        return False
    shape = _cuda_shape(x.shape[1])
    if shape is None or x.data_ptr() % 16:
        return False
    from cbq_kernels import _C  # type: ignore[attr-defined]

    mma = _mma_default(x) if mma is None else mma
    m, mp, p = shape
    return _smem_fits(x, _C.hadamard_quant_smem_bytes(x.shape[1], m, mp, p,
                                                      _DTYPE_CODES[x.dtype], mma))


def _smem_fits(x: Tensor, need: int) -> bool:
    """Whether a CUDA kernel's launch query (``need`` bytes of shared memory, -1: not taken)
    fits x's device."""
    props = torch.cuda.get_device_properties(x.device)
    return 0 <= need <= getattr(props, "shared_memory_per_block_optin", 0)


# The register kernels' variants (csrc/include/cbq/ops.h): 1 grows the tensor-core factor to
# m p / min(p, 128) (csrc/hadamard_quant_reg.cu), 3 the same with two m-tiles per warp (p <=
# 64), 2 splits the power-of-two factor across warps (csrc/hadamard_quant_xch.cu: p = 1024
# with m <= 32, p = 2048 with m <= 16), 0 takes 2, else 3, where they apply (DECISIONS: why)
REG_VARIANTS = (0, 1, 2, 3)


def reg_smem_bytes(n: int, bits: int, dtype: torch.dtype, variant: int = 0) -> int:
    """Shared memory of the register kernel's launch at width n (-1: the variant does not take
    n: fp32 input; variant 1: p < 32 or m p / min(p, 128) > 256; variant 3: the same or p >
    64; variant 2: other than p = 1024 with m <= 32 or p = 2048 with m <= 16). Host code of the
    extension: answers on a machine without a GPU too."""
    from cbq_kernels import _C  # type: ignore[attr-defined]

    if variant not in REG_VARIANTS:
        raise ValueError(f"variant must be one of {REG_VARIANTS}, got {variant!r}")
    m, p = hadamard.factor(n)
    if dtype not in _DTYPE_CODES:
        return -1
    return int(_C.hadamard_quant_reg_smem_bytes(n, m, p, bits, _DTYPE_CODES[dtype], variant))


def _reg_takes(x: Tensor, bits: int, variant: int = 0) -> bool:
    """Whether the register kernel can run this x at all: a GPU tensor, the kernel built,
    16-byte aligned rows, and the extension's answer for the width, bits and dtype within
    this device's shared memory (any width: the benchmark times it at 1536 and 4096 too)."""
    if not x.is_cuda or not _cuda_built() or x.data_ptr() % 16:
        return False
    return _smem_fits(x, reg_smem_bytes(x.shape[1], bits, x.dtype, variant))


def _use_cuda_reg(x: Tensor, bits: int) -> bool:
    """Whether the API runs the register kernel on this x (unless CBQ_HADAMARD_CUDA is 0 or
    smem): the widths it routes to CUDA (:func:`_cuda_shape`), 16-bit inputs."""
    return _cuda_shape(x.shape[1]) is not None and _reg_takes(x, bits)


def _api_kernel(x: Tensor, bits: int) -> str | None:
    """Which CUDA kernel the API runs on this contiguous x under CBQ_HADAMARD_CUDA: "reg"
    (the register kernels), "smem" (the shared-memory kernel) or None (Triton or the
    composition). The one place of that choice: the op and bench_hadamard ask it."""
    if not x.is_cuda:
        return None
    env = os.environ.get(_CUDA_ENV, _REG)
    if env not in ("0", _SMEM) and _use_cuda_reg(x, bits):
        return _REG
    if env != "0" and _use_cuda(x):
        return _SMEM
    return None


def _launch_cuda(x: Tensor, bits: int, signs: Tensor, clip_ratio: float,
                 mma: bool | None = None, reg: bool = False,
                 variant: int = 0) -> tuple[Tensor, Tensor]:  # fmt: skip
    """The CUDA kernel on contiguous (T, N) x (the caller checked :func:`_use_cuda`, or
    :func:`_reg_takes` with ``reg``); ``mma`` picks where the small factor runs (default:
    :func:`_mma_default`); ``reg`` runs a register kernel instead (``variant``:
    :data:`REG_VARIANTS`)."""
    from cbq_kernels import _C  # type: ignore[attr-defined]

    t, n = x.shape
    m, p = hadamard.factor(n)
    mp = -(-m // 16) * 16
    mma = _mma_default(x) if mma is None else mma
    shape = (t, n) if bits == 8 else (t, packed_words(n, 4))
    codes = torch.empty(shape, dtype=torch.int8 if bits == 8 else torch.int32, device=x.device)
    scales = torch.empty(t, dtype=torch.float32, device=x.device)
    sg = signs.float().contiguous()
    small = _small_padded(m, mp, x.device)
    ptrs = (x.data_ptr(), sg.data_ptr(), small.data_ptr(), codes.data_ptr(), scales.data_ptr())
    tail = (float(clip_ratio), 1.0 / math.sqrt(n), x.device.index,
            torch.cuda.current_stream(x.device).cuda_stream)  # fmt: skip
    if reg:
        _C.hadamard_quant_reg_cuda(*ptrs, t, n, m, mp, p, bits, _DTYPE_CODES[x.dtype], variant,
                                   *tail)  # fmt: skip
    else:
        _C.hadamard_quant_cuda(*ptrs, t, n, m, mp, p, bits, _DTYPE_CODES[x.dtype], mma, *tail)
    return codes, scales


def _impl(x: Tensor, bits: int, signs: Tensor, clip_ratio: float) -> tuple[Tensor, Tensor]:
    _check(x, bits, signs, clip_ratio)
    n = x.shape[1]
    if x.is_cuda:
        x = x.contiguous()
        kernel = _api_kernel(x, bits)
        if kernel is not None:
            return _launch_cuda(x, bits, signs, clip_ratio, reg=kernel == _REG)
    if not use_triton(_hadamard_quant_kernel, x.device) or not _fits(n) or n % 4:
        if x.device.type != "cpu":  # the composition of the two kernels on the GPU
            from cbq_kernels.act_quant import act_quant

            return act_quant(hadamard.apply(x.float(), signs), bits, clip_ratio=clip_ratio)
        return hadamard_act_quant_ref(x, bits, signs, clip_ratio)
    return _launch(x, bits, signs, clip_ratio)


_op = torch.library.custom_op("cbq::hadamard_act_quant", mutates_args=())(_impl)


@_op.register_fake
def _(x, bits, signs, clip_ratio):
    _check(x, bits, signs, clip_ratio)
    t, n = x.shape
    shape = (t, n) if bits == 8 else (t, packed_words(n, 4))
    return (x.new_empty(shape, dtype=torch.int8 if bits == 8 else torch.int32),
            x.new_empty(t, dtype=torch.float32))  # fmt: skip


def hadamard_act_quant(x: Tensor, bits: int, signs: Tensor,
                       clip_ratio: float | Tensor = 1.0) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Per-token quantization of ``x @ diag(signs) H_n / sqrt(n)`` (module docstring).

    Args:
        x: (..., N) float32/float16/bfloat16; leading dims are tokens.
        bits: 8 (int8 codes) or 4 (packed int4 codes, offset 8).
        signs: (N,) +-1 (:func:`cbq_kernels.hadamard.random_signs`).
        clip_ratio: clipping ratio in (0, 1].

    Returns:
        (codes, scales) as :func:`cbq_kernels.act_quant.act_quant` gives them for x @ R.
    """
    if isinstance(clip_ratio, Tensor):
        clip_ratio = float(clip_ratio)
    if not isinstance(x, Tensor) or x.dim() < 1:
        raise TypeError("x must be a tensor of shape (..., N)")
    return _op(x.reshape(-1, x.shape[-1]), bits, signs, float(clip_ratio))


def hadamard_act_quant_ref(x: Tensor, bits: int, signs: Tensor,
                           clip_ratio: float = 1.0) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Plain PyTorch: the transform in fp32, then the per-token quantizer's reference."""
    return act_quant_ref(hadamard.transform(x.float(), signs), bits, clip_ratio)
