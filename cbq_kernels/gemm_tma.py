"""The prefill int8 x int8 GEMM with tensor-memory-accelerator loads (Hopper), for the
integer path after expansion (:func:`cbq_kernels.gemm_triton._launch`, M >=
``GemmPolicy.expand_min_m``): activation codes (M, K) int8 and the expanded weight ``q - z``
(N, K) int8, both K-contiguous, per-channel scales, out = ``(acc * s_w[n]) * s_x[m]`` (+ bias)
rounded once: the same two fp32 products in the same order as the pointer kernel's epilogue
(:func:`cbq_kernels.gemm_triton._gemm_kernel`), so the two give the same bits on an exact int32
sum.

Why a second kernel for the same product: on the H200 (7a9193f) the pointer kernel's int8
GEMM ran 70b gate/up at M = 8192 in 3.82 ms, ~1010 int8 TOPS, half of the tensor cores' 1979;
cuBLAS' fp8 GEMM on the same shape ran 3.04 ms (~1270). The issue's prefill targets (>= 1.7x
bf16, >= 0.95x fp8) need ~1200. Triton's Hopper matmuls that reach cuBLAS (its persistent
matmul tutorial) load tiles with TMA descriptors into swizzled shared memory (one instruction
per tile, no address arithmetic in the registers) and loop over tiles in a persistent grid
(one program per SM, the next tile's loads issued while this one's epilogue runs). This kernel
does both; GemmPolicy.tma_min_m switches it on from a measured M.

TMA needs 16-byte aligned bases and row strides: K % 16 == 0 (:func:`takes`)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from cbq_kernels.autotune import AUTOTUNE_CACHE, tune_bench
from cbq_kernels.fake_quant import _to_store  # bf16 rounding that the interpreter gets right

try:  # the host-side descriptor (Triton >= 3.4)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton: the pointer kernel serves
    TensorDescriptor = None


def takes(x: Tensor, w: Tensor) -> bool:
    """Whether the TMA kernel can run this product: int8 operands, K-contiguous, 16-byte rows
    and bases, on a GPU with TMA (compute capability 9.0) or in Triton's interpreter."""
    if TensorDescriptor is None or x.dtype != torch.int8 or w.dtype != torch.int8:
        return False
    return tma_operand(x) and tma_operand(w) and tma_device(x.device)


def tma_operand(t: Tensor) -> bool:
    """A 2-D operand a TMA descriptor can address: contiguous 1-byte rows of a multiple of 16
    bytes from a 16-byte aligned base."""
    return t.shape[1] % 16 == 0 and t.is_contiguous() and t.data_ptr() % 16 == 0


def tma_device(device: torch.device) -> bool:
    """A GPU with TMA (compute capability >= 9.0), or the CPU (Triton's interpreter)."""
    return device.type != "cuda" or torch.cuda.get_device_capability(device)[0] >= 9


@triton.jit
def grouped_tile(tile, num_m, num_n, GROUP_M: tl.constexpr):
    """(row tile, column tile) of linear tile index ``tile`` in grouped order: GROUP_M row
    tiles run over all column tiles before the next group, so they share each weight tile
    in L2 (the pointer kernel's and both TMA kernels' ordering)."""
    in_group = GROUP_M * num_n
    first_m = (tile // in_group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (tile % in_group) % size_m, (tile % in_group) // size_m


def _set_blocks(nargs):
    """The descriptors' block shapes follow the configuration being run (autotuner pre-hook)."""
    nargs["a_desc"].block_shape = [nargs["BLOCK_M"], nargs["BLOCK_K"]]
    nargs["b_desc"].block_shape = [nargs["BLOCK_N"], nargs["BLOCK_K"]]


def _cfg(bm: int, bn: int, bk: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                         num_warps=warps, num_stages=stages, pre_hook=_set_blocks)  # fmt: skip


# Triton's persistent-matmul tutorial's Hopper configurations for 1-byte operands (128-byte
# K rows: the 128-byte swizzle), and the pointer kernel's best expanded tile (128 x 256 x 128).
_CONFIGS = [
    _cfg(128, 256, 128, 8, 3), _cfg(128, 128, 128, 8, 4), _cfg(256, 128, 128, 8, 3),
    _cfg(128, 256, 64, 8, 4), _cfg(128, 128, 64, 4, 4), _cfg(64, 128, 128, 4, 4),
]  # fmt: skip


@triton.jit
def _int8_tma_kernel(a_desc, b_desc, xs_ptr, ws_ptr, bias_ptr, out_ptr, M, N, K,
                     HAS_BIAS: tl.constexpr, DEBUG: tl.constexpr, NUM_PROGRAMS: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     GROUP_M: tl.constexpr):  # fmt: skip
    """Persistent: program p runs tiles p, p + NUM_PROGRAMS, ... in grouped order (GROUP_M
    row tiles share each column tile's weight in L2). Tiles past M / N / K are zero-filled by
    the TMA loads, so the int32 sums are exact over the true K. DEBUG: out_ptr is int32, the
    raw sums (the exactness tests)."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    for tile in tl.range(tl.program_id(0), num_m * num_n, NUM_PROGRAMS):
        pm, pn = grouped_tile(tile, num_m, num_n, GROUP_M)
        off_m = pm * BLOCK_M
        off_n = pn * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.int32)
        for kt in range(k_tiles):
            a = a_desc.load([off_m, kt * BLOCK_K])
            b = b_desc.load([off_n, kt * BLOCK_K])
            acc = tl.dot(a, b.T, acc, out_dtype=tl.int32)
        rm = (off_m + tl.arange(0, BLOCK_M)).to(tl.int64)
        rn = (off_n + tl.arange(0, BLOCK_N)).to(tl.int64)
        mm, mn = rm < M, rn < N
        mo = mm[:, None] & mn[None, :]
        if DEBUG:
            tl.store(out_ptr + rm[:, None] * N + rn[None, :], acc, mask=mo)
        else:
            out = acc.to(tl.float32) * tl.load(ws_ptr + rn, mask=mn, other=0.0)[None, :]
            out = out * tl.load(xs_ptr + rm, mask=mm, other=0.0)[:, None]
            if HAS_BIAS:
                out += tl.load(bias_ptr + rn, mask=mn, other=0.0).to(tl.float32)[None, :]
            tl.store(out_ptr + rm[:, None] * N + rn[None, :], _to_store(out, out_ptr), mask=mo)


@triton.jit
def _int8_tma_entry(a_desc, b_desc, xs_ptr, ws_ptr, bias_ptr, out_ptr, M, N, K, M_BUCKET,
                    HAS_BIAS: tl.constexpr, DEBUG: tl.constexpr, NUM_PROGRAMS: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    GROUP_M: tl.constexpr):  # fmt: skip
    """The kernel with an M bucket argument, the autotuning key (tuning once per bucket)."""
    _int8_tma_kernel(a_desc, b_desc, xs_ptr, ws_ptr, bias_ptr, out_ptr, M, N, K, HAS_BIAS,
                     DEBUG, NUM_PROGRAMS, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)  # fmt: skip


_int8_tma_tuned = triton.autotune(configs=_CONFIGS, key=["M_BUCKET", "N", "K"],
                                  do_bench=tune_bench,
                                  **AUTOTUNE_CACHE)(_int8_tma_entry)  # fmt: skip

# The interpreter (CPU tests) runs one small fixed configuration.
_CPU_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}


def gemm_int8_tma(x: Tensor, xs: Tensor, w: Tensor, ws: Tensor, bias: Tensor | None,
                  out_dtype: torch.dtype, config: dict | None = None,
                  debug: bool = False) -> Tensor:  # fmt: skip
    """(M, N) = ((x @ w^T) * ws[n]) * xs[m] (+ bias) in ``out_dtype``: x (M, K) int8 codes,
    w (N, K) int8, xs (M,) and ws (N,) fp32 (``debug``: the int32 sums x @ w^T). The caller
    checks shapes and :func:`takes`. ``config`` (BLOCK_M / N / K, GROUP_M, num_warps,
    num_stages) bypasses the autotuner (the sweep and the GPU tests of every configuration)."""
    m, k = x.shape
    n = w.shape[0]
    out = torch.empty((m, n), dtype=torch.int32 if debug else out_dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    xs, ws = xs.float().contiguous(), ws.float().contiguous()
    bias_arg = bias if bias is not None else ws
    if x.device.type == "cpu" or config is not None:
        meta = dict(config if config is not None else _CPU_CONFIG)
        warps = {"num_warps": meta.pop("num_warps")} if "num_warps" in meta else {}
        stages = {"num_stages": meta.pop("num_stages")} if "num_stages" in meta else {}
        a = TensorDescriptor.from_tensor(x, [meta["BLOCK_M"], meta["BLOCK_K"]])
        b = TensorDescriptor.from_tensor(w, [meta["BLOCK_N"], meta["BLOCK_K"]])
        tiles = triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"])
        programs = min(tiles, _programs(x.device))
        _int8_tma_kernel[(programs,)](a, b, xs, ws, bias_arg, out, m, n, k,
                                      HAS_BIAS=bias is not None, DEBUG=debug,
                                      NUM_PROGRAMS=programs, **meta, **warps,
                                      **stages)  # fmt: skip
        return out
    # the descriptors' block shapes are set per configuration by the autotuner's pre-hook
    a = TensorDescriptor.from_tensor(x, [128, 128])
    b = TensorDescriptor.from_tensor(w, [128, 128])
    programs = _programs(x.device)  # programs past the last tile run no tile
    _int8_tma_tuned[(programs,)](a, b, xs, ws, bias_arg, out, m, n, k,
                                 min(triton.next_power_of_2(m), 8192),
                                 HAS_BIAS=bias is not None, DEBUG=debug,
                                 NUM_PROGRAMS=programs)  # fmt: skip
    return out


def _programs(device: torch.device) -> int:
    """One program per SM on a GPU; 4 in the interpreter (enough to test the tile loop)."""
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count
