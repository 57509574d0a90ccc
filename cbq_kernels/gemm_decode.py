"""The decode GEMM's prepared weight layout (csrc/gemm_decode.cu), its PyTorch emulation and
its launch.

For M <= 16 the CUDA kernel reads every weight byte once with 16-byte loads that already hold
the B fragments of its ``mma.sync.m16n8k16`` instructions, and converts two codes per
instruction with the magic-number trick (the kernel's header says why). This module owns the
layout:

* ``bits`` 4 (3-bit codes live in 4-bit containers) or 2; ``NSUB = 32 / bits`` subtiles of 8
  output channels per n-tile, ``TN = 8 * NSUB`` (64 or 128); K padded to a multiple of 16, N
  to a multiple of TN (padding: codes 0, scale 0, zero point 0).
* ``words``: int32 ``(N_pad / TN, K_pad / 16, 32, 4)``: n-tile, k-step, lane, word. Lane
  ``l = 4 g + t`` holds in word ``j``, pair ``p`` (``p < 16 / bits``) two codes, at bits
  ``bits * p`` (low) and ``16 + bits * p`` (high). Pair ``P = j * 16 / bits + p`` is subtile
  ``s = P // 2``, half ``h = P % 2``; its codes are ``W[n0 + 8 s + g, k0 + 8 h + 2 t]`` (low)
  and ``W[n0 + 8 s + g, k0 + 8 h + 2 t + 1]`` (high), n0 = TN * n-tile, k0 = 16 * k-step: the
  ``b0`` (h = 0) and ``b1`` (h = 1) registers of the MMA for column g of subtile s.
* ``scales``: fp32 ``(G, N_pad)``; ``zeros``: int32 ``(G, N_pad)`` (transposed: a thread
  reads the constants of its columns with one load per group).

:func:`emulate` computes the product the way the kernel does, from the PTX fragment layouts
of ``mma.m16n8k16`` (A row-major 16 x 16: a0 = rows g, columns 2t / 2t + 1, a1 = rows g + 8,
a2 / a3 = columns + 8; B 16 x 8: b0 = rows 2t / 2t + 1 of column g, b1 = rows + 8; C: c0 / c1
= row g, columns 2t / 2t + 1, c2 / c3 = row g + 8), written independently of
:func:`prepare_decode`'s indexing: the CPU tests check the layout against the instruction's
specification, the GPU tests check the kernel against :func:`cbq_kernels.gemm.gemm_ref`.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
from torch import Tensor

DECODE_MAX_M = 16  # one m16n8k16 row tile


def tile_n(bits: int) -> int:
    """Output channels per n-tile: 64 for 4-bit containers, 128 for 2-bit."""
    return 8 * (32 // (2 if bits == 2 else 4))


@dataclasses.dataclass(frozen=True)
class DecodeWeight:
    """A weight in the decode kernel's layout (module docstring)."""

    words: Tensor  # (N_pad / TN, K_pad / 16, 32, 4) int32
    scales: Tensor  # (G, N_pad) fp32
    zeros: Tensor  # (G, N_pad) int32
    # (N_pad / TN,) int32 zeros: the split-K semaphores (each launch leaves them zero). One
    # set per weight: launches of the same weight on two streams at once would share them.
    counters: Tensor
    bits: int  # container bits: 4 or 2
    n: int
    k: int
    group_size: int  # K when one group spans a row

    @property
    def n_pad(self) -> int:
        return self.scales.shape[1]


def _wrap_int32(v: Tensor) -> Tensor:
    """int64 values in [0, 2^32) as the int32 with the same bits."""
    return torch.where(v >= 2**31, v - 2**32, v).to(torch.int32)


def prepare_decode(codes: Tensor, scales: Tensor, zeros: Tensor, bits: int,
                   group_size: int | None) -> DecodeWeight:  # fmt: skip
    """The decode layout of a weight given by its unsigned codes (N, K), scales and integer
    zero points (N, G). ``bits``: 2, 3 or 4 (3 is stored in 4-bit containers)."""
    n, k = codes.shape
    cb = 2 if bits == 2 else 4
    tn, ppw, nsub = tile_n(cb), 16 // cb, 32 // cb
    n_pad, k_pad = -(-n // tn) * tn, -(-k // 16) * 16
    dev = codes.device
    nt, ks = n_pad // tn, k_pad // 16
    words = torch.empty((nt, ks, 32, 4), dtype=torch.int32, device=dev)
    shift = cb * torch.arange(ppw, device=dev, dtype=torch.int64)
    chunk = max(1, (1 << 24) // (tn * k_pad))  # n-tiles per pass: ~16M codes of int64 scratch
    for t0 in range(0, nt, chunk):
        t1 = min(nt, t0 + chunk)
        c = torch.zeros(((t1 - t0) * tn, k_pad), dtype=torch.int64, device=dev)
        rows = codes[t0 * tn : min(n, t1 * tn)]
        c[: rows.shape[0], :k] = rows.to(torch.int64)
        # n = n0 + 8 s + g and k = k0 + 8 h + 2 t + e  ->  (tile, k-step, g, t, s, h, e)
        c = c.view(t1 - t0, nsub, 8, ks, 2, 4, 2).permute(0, 3, 2, 5, 1, 4, 6)
        # pair P = 2 s + h = j * ppw + p
        c = c.reshape(t1 - t0, ks, 8, 4, 4, ppw, 2)
        word = ((c[..., 0] << shift) | (c[..., 1] << (shift + 16))).sum(-1)  # disjoint bits
        words[t0:t1] = _wrap_int32(word).reshape(t1 - t0, ks, 32, 4)
    gs = group_size if group_size is not None and scales.shape[1] > 1 else k
    groups = scales.shape[1]
    s_t = torch.zeros((groups, n_pad), dtype=torch.float32, device=dev)
    z_t = torch.zeros((groups, n_pad), dtype=torch.int32, device=dev)
    s_t[:, :n] = scales.float().t()
    z_t[:, :n] = zeros.to(torch.int32).t()
    counters = torch.zeros(nt, dtype=torch.int32, device=dev)
    return DecodeWeight(words, s_t.contiguous(), z_t.contiguous(), counters, cb, n, k, gs)


def _b_registers(dw: DecodeWeight) -> Tensor:
    """(NT, KS, 32 lanes, NSUB, 2 registers, 2 halves) codes as the kernel's lanes see them:
    register r of subtile s, half 0 / 1 = the low / high 16 bits of the converted pair."""
    ppw = 16 // dw.bits
    mask = (1 << dw.bits) - 1
    w = dw.words.to(torch.int64) & 0xFFFFFFFF  # (NT, KS, 32, 4)
    regs = []
    for j in range(4):
        for p in range(ppw):
            lo = (w[..., j] >> (dw.bits * p)) & mask
            hi = (w[..., j] >> (16 + dw.bits * p)) & mask
            regs.append(torch.stack([lo, hi], -1))  # pair j * ppw + p
    r = torch.stack(regs, 3)  # (NT, KS, 32, 2 * NSUB, 2)
    return r.reshape(*r.shape[:3], -1, 2, 2)  # pair P -> (subtile P // 2, register P % 2)


def emulate(x: Tensor, dw: DecodeWeight, x_scales: Tensor | None = None,
            debug: bool = False) -> Tensor:  # fmt: skip
    """The decode kernel's arithmetic in fp64 on any device, lane by lane from the PTX
    fragment layouts (module docstring): x (M <= 16, K) float (weight-only) or integer codes
    (signed; with ``x_scales`` (M,)). Returns (M, N) fp64, or with ``debug`` the exact
    integer sum ``x @ (q - z)^T``."""
    m, k = x.shape
    regs = _b_registers(dw)  # (NT, KS, 32, NSUB, 2, 2)
    nt, ks, _, nsub = regs.shape[:4]
    tn = 8 * nsub
    lane = torch.arange(32, device=x.device)
    g, t = lane // 4, lane % 4
    # B tile of each (n-tile, k-step, subtile): 16 x 8 from the 32 lanes' two registers
    b = torch.zeros((nt, ks, nsub, 16, 8), dtype=torch.float64, device=x.device)
    for r in range(2):  # b0: rows 2t, 2t + 1; b1: rows 2t + 8, 2t + 9; column g
        for half in range(2):
            b[:, :, :, 8 * r + 2 * t + half, g] = regs[:, :, lane, :, r, half].permute(
                0, 1, 3, 2).double()  # fmt: skip
    # subtract the zero point of each column's group (the kernel's exact bf16 subtraction)
    n_idx = torch.arange(dw.n_pad, device=x.device).view(nt, 1, nsub, 1, 8)
    gsteps = dw.group_size // 16 if dw.group_size < dw.k else ks
    k_group = (torch.arange(ks, device=x.device) // gsteps).view(1, ks, 1, 1, 1)
    z = dw.zeros.double()[k_group, n_idx]  # (nt, ks, nsub, 1, 8)
    s = dw.scales.double()[k_group, n_idx]
    w = b - z  # (nt, ks, nsub, 16, 8): rows k, columns n
    # A fragments: rows >= M and columns >= K are zero
    xp = torch.zeros((16, ks * 16), dtype=torch.float64, device=x.device)
    xp[:m, :k] = x.double()
    a = xp.view(16, ks, 16).permute(1, 0, 2)  # (ks, 16 rows, 16 k)
    # per k-step products, (nt, ks, nsub, 16 rows, 8 cols)
    prod = torch.einsum("jrk,ijskc->ijsrc", a, w)
    grouped = dw.group_size < dw.k
    if debug:
        total = prod.sum(1)
    elif grouped:  # scale per group (the kernel: inside the K loop)
        total = (prod * s).sum(1)
    else:
        total = prod.sum(1) * s[:, 0]  # per channel: once at the end
    out = total.permute(2, 0, 1, 3).reshape(16, nt * tn)[:m, : dw.n]
    if debug:
        return out.round().to(torch.int64)
    if x_scales is not None:
        out = out * x_scales.double()[:, None]
    return out


_A_MODES = {torch.bfloat16: 0, torch.float16: 1, torch.int8: 2, torch.int32: 3}
_OUT_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def available(device: torch.device) -> bool:
    """Whether the extension has the CUDA decode kernel for tensors on ``device``."""
    if device.type != "cuda":
        return False
    try:
        from cbq_kernels import _C  # type: ignore[attr-defined]
    except ImportError:
        return False
    return bool(_C.has_cuda()) and hasattr(_C, "gemm_decode_cuda")


@functools.cache
def _sm_count(index: int | None) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def default_splits(n_tiles: int, k_steps: int, device: torch.device) -> int:
    """K splits so that about 4 blocks of 4 warps per SM stream the weight (16 warps per SM
    keep ~32 KB of 16-byte loads in flight, the 4.8 TB/s x ~0.6 us latency / 132 SMs of an
    H200), with at least 4 k-steps per warp."""
    want = -(-4 * _sm_count(device.index) // max(n_tiles, 1))
    return max(1, min(want, k_steps // 16, 1024))


def launch(x: Tensor, x_scales: Tensor | None, dw: DecodeWeight, bias: Tensor | None,
           out_dtype: torch.dtype, debug: bool = False,
           splits: int | None = None) -> Tensor:  # fmt: skip
    """Run the CUDA decode kernel. x: (M <= 16, K) bf16 / fp16 activations, int8 codes, or
    packed int4 codes (M, ceil(K / 8)) int32 (offset 8); x_scales (M,) fp32 for the last two.
    The caller (cbq_kernels.gemm) has checked shapes, dtypes and devices."""
    from cbq_kernels import _C  # type: ignore[attr-defined]

    m = x.shape[0]
    a_mode = _A_MODES[x.dtype]
    k_steps = dw.words.shape[1]
    n_tiles = dw.words.shape[0]
    split = default_splits(n_tiles, k_steps, x.device) if splits is None else splits
    dev = x.device
    out = torch.empty((m, dw.n), dtype=torch.int32 if debug else out_dtype, device=dev)
    ws_f = ws_i = None
    if split > 1:
        ws_f = torch.empty((split, 16, dw.n_pad), dtype=torch.float32, device=dev)
        if a_mode >= 2:
            ws_i = torch.empty((split, 16, dw.n_pad), dtype=torch.int32, device=dev)
    bias_f = bias.float().contiguous() if bias is not None else None
    xs = x_scales.float().contiguous() if x_scales is not None else None
    ptr = lambda t: t.data_ptr() if t is not None else 0  # noqa: E731
    _C.gemm_decode_cuda(
        ptr(x), ptr(xs), a_mode, ptr(dw.words), ptr(dw.scales), ptr(dw.zeros), ptr(bias_f),
        ptr(out), ptr(ws_f), ptr(ws_i), ptr(dw.counters), m, dw.n, dw.k, dw.n_pad, x.shape[1],
        dw.bits, dw.group_size, split, _OUT_CODES.get(out_dtype, 2), debug, dev.index,
        torch.cuda.current_stream(dev).cuda_stream,
    )  # fmt: skip
    return out
