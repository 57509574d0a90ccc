"""The decode GEMM's prepared weight layout (csrc/gemm_decode.cu), its PyTorch emulation and
its launch.

For M <= 16 the CUDA kernel reads every weight byte once with 16-byte loads that already hold
the B fragments of its MMAs for 8 output subtiles, converts codes with one shift and one LOP3
per pair (bf16 activations) or per 4 codes (integer activations), and moves the zero points out
of the inner loop through the row sums of x (the kernel's header says why, with the profile
that led there). This module owns the layout:

* containers: ``bits`` 4 (3-bit codes, and 2-bit codes whose groups are not multiples of 64,
  live in 4-bit containers) or 2. A chunk is ``CK`` values of K: 32 for 4-bit containers, 64
  for 2-bit; an n-tile is 64 output channels = 8 subtiles of 8. K is padded to a multiple of
  CK, N to a multiple of 64 (padding: codes 0, scale 0, zero point 0).
* ``words``: int32 ``(N_pad / 64, K_pad / CK, 2, 32, 4)``: n-tile, chunk, half h, lane,
  word j (two fully coalesced 512-byte warp loads per chunk). Lane ``l = 4 g + t``, word
  ``s = 4 h + j`` = subtile ``s``: the ``CK / 4`` codes of column
  ``n = n0 + 8 s + g`` at K positions ``k = kc + (CK / 4) t + i`` (kc = CK * chunk); code
  ``i = 2 j + e`` sits at bit ``bits * j + 16 * e``, so ``(word >> bits * j) & mask`` is the
  pair (i = 2j, 2j + 1): the same pair of K positions as the lane's j-th 32-bit register of
  bf16 activations (its 16-byte load of x[row, kc + (CK / 4) t :][: CK / 4]).
* ``scales``: fp32 ``(G, N_pad)``; ``zeros``: int32 ``(G, N_pad)``.

:func:`emulate` computes the product the way the kernel does, from the PTX fragment layouts
of ``mma.m16n8k16`` (bf16 / fp16 activations: A 16 x 16 row-major, a0 = row g, columns 2t /
2t + 1, a1 = row g + 8, a2 / a3 = columns + 8; B 16 x 8: b0 = rows 2t / 2t + 1 of column g,
b1 = rows + 8) and of ``mma.m16n8k32`` with s8 operands (integer codes: a0 = row g, bytes i ->
columns 4t + i, a1 = row g + 8, a2 / a3 = columns + 16; b0 = byte i -> row 4t + i of column g,
b1 = rows + 16), the byte permutes (``prmt``) and bit masks the kernel applies, written
independently of :func:`prepare_decode`'s indexing: the CPU tests check the layout against the
instructions' specification, the GPU tests check the kernel against
:func:`cbq_kernels.gemm.gemm_ref`. For M <= 8 the kernel swaps the MMA operands (y^T = W x^T:
the words 2j / 2j + 1 of a lane, columns 16 j + g / 16 j + 8 + g, are rows g / g + 8 of the A
fragment of n16-tile j; the activations are B): the same layout and the same products.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from cbq_kernels.fake_quant import _to_store  # bf16 rounding that the interpreter gets right

DECODE_MAX_M = 16  # one m16n8k16 row tile
TILE_N = 64  # output channels per n-tile (8 MMA subtiles of 8)
# the split-K model (default_splits): blocks resident per SM and the fixed cost of a wave in
# chunk-times (benchmarks/sweep_decode.py). M <= 8 runs the swapped-operand kernel (<= 105
# registers, 50 KB of shared memory per block: 4 blocks per SM; its best split at 1 x 28672
# x 8192 is S = 1, benchmarks/results/h200/sweep_decode_variants_1da67a5.txt), M = 9..16 the
# other one (<= 128 registers, __launch_bounds__(128, 4): 4 blocks, with integer and with
# 16-bit activations alike; the 16-bit ones had 3 before session 14, when they used 136-148
# registers: csrc/gemm_decode.cu, min_blocks and CBQ_DEC_BLOCKS)
BLOCKS_PER_SM = 4
BLOCKS_PER_SM_SWAP = 4
# M = 17..32 in one launch (two m-tiles, GemmPolicy.decode_mtiles = 2): 205-254 registers,
# __launch_bounds__(128, 2)
BLOCKS_PER_SM_MTILES = 2
SWAP_MAX_M = 8
WAVE_COST = 32
# M = 9..32 (the unswapped kernel): each split beyond the first adds SPLIT_ROW_COST chunk-times
# per row (its M x 64 partial sums written to the workspace and re-read by the n-tile's last
# block), and a chunk with integer activations (W4A8 / W4A4: one s8 MMA per 32 K) costs
# INT_CHUNK_COST of a 16-bit one (two bf16 MMAs and the row-sum MMA per 32 K). Fitted with
# benchmarks/fit_splits.py on H100 sweeps of the kernel with the four-column split-K epilogue
# and the integer-activation instances at 4 blocks per SM (benchmarks/results/h100/
# sweep_decode_epi_2483d26/fit.txt; 7B q/k/v/o and gate/up, 70B gate/up; W4A16 g128, W4A8,
# W2A16 g128; M = 1 / 16 / 32): every one of the 27 rows within 6.1% of its best split (mean
# 0.6%). That epilogue made the split reduction cheap enough that its per-row term fits to 0
# (with the one-column epilogue it was 0.75 on the H200 sweeps, sweep_decode_401f61a.txt); the
# integer-chunk term keeps 70B gate/up W4A8 at M = 16 on S = 1 (53.7 us; S = 2: 64.3). Fitted
# on three shapes: other shapes are checked by the next bench_gemm rows.
SPLIT_ROW_COST = 0.0
INT_CHUNK_COST = 0.25


def tile_n(bits: int) -> int:
    """Output channels per n-tile: 64 for every container."""
    return TILE_N


def chunk_k(container_bits: int) -> int:
    """K values per chunk (one lane's 8 words hold CK / 4 codes of each of 8 columns)."""
    return 64 if container_bits == 2 else 32


def container_bits(bits: int, group_size: int | None) -> int:
    """The decode layout's container: 2-bit codes in 2-bit containers when their groups are
    multiples of a 2-bit chunk (64) or span the row, else (and for 3 and 4 bits) 4-bit."""
    if bits == 2 and (group_size is None or group_size % chunk_k(2) == 0):
        return 2
    return 4


def layout_error(bits: int, k: int, group_size: int | None) -> str | None:
    """Why a weight cannot have the decode layout, or None."""
    cb = container_bits(bits, group_size)
    if group_size is not None and group_size < k and group_size % chunk_k(cb) != 0:
        return (f"the decode layout needs groups that are multiples of {chunk_k(cb)}, "
                f"got group_size={group_size}")  # fmt: skip
    return None


@dataclasses.dataclass(frozen=True)
class DecodeWeight:
    """A weight in the decode kernel's layout (module docstring)."""

    words: Tensor  # (N_pad / 64, K_pad / CK, 2, 32, 4) int32
    scales: Tensor  # (G, N_pad) fp32
    zeros: Tensor  # (G, N_pad) int32
    # (N_pad / 64,) int32 zeros: the split-K semaphores (each launch leaves them zero). One
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
    zero points (N, G). ``bits``: 2, 3 or 4."""
    n, k = codes.shape
    gs = group_size if group_size is not None and scales.shape[1] > 1 else k
    err = layout_error(bits, k, gs)
    if err:
        raise ValueError(err)
    cb = container_bits(bits, gs if gs < k else None)
    ck, ppw = chunk_k(cb), 16 // cb
    n_pad, k_pad = -(-n // TILE_N) * TILE_N, -(-k // ck) * ck
    dev = codes.device
    nt, kc = n_pad // TILE_N, k_pad // ck
    words = torch.empty((nt, kc, 2, 32, 4), dtype=torch.int32, device=dev)
    shift = cb * torch.arange(ppw, device=dev, dtype=torch.int64)
    chunk = max(1, (1 << 24) // (TILE_N * k_pad))  # n-tiles per pass: ~16M codes of scratch
    for t0 in range(0, nt, chunk):
        t1 = min(nt, t0 + chunk)
        c = torch.zeros(((t1 - t0) * TILE_N, k_pad), dtype=torch.int64, device=dev)
        rows = codes[t0 * TILE_N : min(n, t1 * TILE_N)]
        c[: rows.shape[0], :k] = rows.to(torch.int64)
        # n = n0 + 8 s + g, k = kc + (CK / 4) t + 2 j + e -> (tile, chunk, g, t, s, j, e)
        c = c.view(t1 - t0, 8, 8, kc, 4, ppw, 2).permute(0, 3, 2, 4, 1, 5, 6)
        word = ((c[..., 0] << shift) | (c[..., 1] << (shift + 16))).sum(-1)  # disjoint bits
        word = word.reshape(t1 - t0, kc, 32, 2, 4).permute(0, 1, 3, 2, 4)  # words 4h + j
        words[t0:t1] = _wrap_int32(word)
    groups = scales.shape[1]
    s_t = torch.zeros((groups, n_pad), dtype=torch.float32, device=dev)
    z_t = torch.zeros((groups, n_pad), dtype=torch.int32, device=dev)
    s_t[:, :n] = scales.float().t()
    z_t[:, :n] = zeros.to(torch.int32).t()
    counters = torch.zeros(nt, dtype=torch.int32, device=dev)
    return DecodeWeight(words, s_t.contiguous(), z_t.contiguous(), counters, cb, n, k, gs)


def unpack_codes(dw: DecodeWeight) -> Tensor:
    """(N, K) uint8 codes of a decode-layout weight: the inverse of :func:`prepare_decode`'s
    word order, written from the module docstring's layout (PyTorch; the reference of
    :func:`expand` and the source of the canonical words of a weight kept in this layout
    alone)."""
    nt, kc = dw.words.shape[:2]
    ck, ppw = chunk_k(dw.bits), 16 // dw.bits
    mask = (1 << dw.bits) - 1
    # int32: the arithmetic shift's sign bits land above the mask (shifts <= 30)
    w = dw.words.permute(0, 1, 3, 2, 4).reshape(nt, kc, 8, 4, 8)  # (h, lane, j) -> g, t, s
    j = torch.arange(ppw, device=w.device, dtype=torch.int32)
    e = torch.arange(2, device=w.device, dtype=torch.int32)
    shift = dw.bits * j.view(ppw, 1) + 16 * e.view(1, 2)  # code i = 2 j + e of a lane's row
    codes = ((w[..., None, None] >> shift) & mask).to(torch.uint8)  # (NT, KC, g, t, s, j, e)
    # n = 64 tile + 8 s + g, k = CK chunk + (CK / 4) t + 2 j + e
    codes = codes.permute(0, 4, 2, 1, 3, 5, 6).reshape(nt * TILE_N, kc * ck)
    return codes[: dw.n, : dw.k].contiguous()


@triton.jit
def _expand_decode_kernel(w_ptr, s_ptr, z_ptr, out_ptr, N, K, N_PAD, KC, GS,
                          BITS: tl.constexpr, SCALED: tl.constexpr,
                          BLOCK: tl.constexpr):  # fmt: skip
    """out (N, K) from the decode layout: codes - zero point (int8 or fp8), or with SCALED
    (codes - z) * s in out's float dtype (fp32 arithmetic, one rounding). A program takes
    BLOCK consecutive words; word w holds the CK / 4 codes of one column at consecutive K
    (module docstring), so each word becomes one contiguous run of its output row."""
    CK: tl.constexpr = 64 if BITS == 2 else 32
    PER: tl.constexpr = CK // 4
    w = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    word = tl.load(w_ptr + w)
    chunk = w // 256  # (tile, chunk) pairs of 256 words: h, lane = 4 g + t, j
    r = w % 256
    lane = (r // 4) % 32
    n = (chunk // KC) * 64 + 8 * (4 * (r // 128) + r % 4) + lane // 4
    k0 = (chunk % KC) * CK + PER * (lane % 4)
    i = tl.arange(0, PER)
    q = (word[:, None] >> (BITS * (i // 2) + 16 * (i % 2))[None, :]) & ((1 << BITS) - 1)
    g = k0 // GS
    mw = (n < N) & (k0 < K)  # the padding words: N to 64, K to CK (their groups may not exist)
    q -= tl.load(z_ptr + g * N_PAD + n, mask=mw, other=0)[:, None]
    k = k0[:, None] + i[None, :]
    mask = mw[:, None] & (k < K)
    ptrs = out_ptr + n[:, None] * K + k
    if SCALED:
        v = q.to(tl.float32) * tl.load(s_ptr + g * N_PAD + n, mask=mw, other=0.0)[:, None]
        tl.store(ptrs, _to_store(v, out_ptr), mask=mask)
    elif out_ptr.dtype.element_ty == tl.int8:
        tl.store(ptrs, q.to(tl.int8), mask=mask)
    else:  # fp8 e4m3: integers up to 16 are exact
        tl.store(ptrs, q.to(tl.float32).to(out_ptr.dtype.element_ty), mask=mask)


def expand(dw: DecodeWeight, dtype: torch.dtype = torch.int8, scaled: bool = False,
           scales: Tensor | None = None) -> Tensor:  # fmt: skip
    """(N, K) ``dtype`` from the decode layout (Triton): ``q - z`` (int8, or fp8 e4m3 where
    these integers are exact), or with ``scaled`` the dequantized ``(q - z) * s`` (int8 when
    these products are integers in int8: a two-level weight's steps as ``scales``). The
    expansion / dequantization pass of the integer GEMMs at large M, of the weight-only GEMM
    before cuBLAS and of W4A4 on fp8, for a weight kept in this layout alone. ``scales``: in
    place of dw.scales, laid out as they are ((G, N_pad), read from its first element)."""
    s = dw.scales if scales is None else scales
    if s.shape[0] != dw.scales.shape[0] or s.stride() != dw.scales.stride():
        raise ValueError(f"scales must be laid out as the decode layout's {tuple(dw.scales.shape)}"
                         f", got {tuple(s.shape)} strides {s.stride()}")  # fmt: skip
    out = torch.empty((dw.n, dw.k), dtype=dtype, device=dw.words.device)
    block = 64 if dw.words.device.type == "cpu" else 256
    total = dw.words.numel()  # a multiple of 256 (one tile-chunk), so of BLOCK
    _expand_decode_kernel[(total // block,)](dw.words, s, dw.zeros, out, dw.n, dw.k,
                                             dw.n_pad, dw.words.shape[1], dw.group_size,
                                             BITS=dw.bits, SCALED=scaled,
                                             BLOCK=block)  # fmt: skip
    return out


def _prmt(a: Tensor, b: Tensor, sel: int) -> Tensor:
    """PTX prmt.b32 (default mode) on int64 tensors of 32-bit values: byte i of the result is
    byte ((sel >> 4 i) & 7) of the 8 bytes (a, b)."""
    src = [(a >> (8 * i)) & 0xFF for i in range(4)] + [(b >> (8 * i)) & 0xFF for i in range(4)]
    out = torch.zeros_like(a)
    for i in range(4):
        out = out | (src[(sel >> (4 * i)) & 7] << (8 * i))
    return out


def _bytes(v: Tensor, signed: bool) -> list[Tensor]:
    """The four bytes of 32-bit values, as signed or unsigned integers."""
    out = []
    for i in range(4):
        b = (v >> (8 * i)) & 0xFF
        out.append(torch.where(b >= 128, b - 256, b) if signed else b)
    return out


def emulate(x: Tensor, dw: DecodeWeight, x_scales: Tensor | None = None,
            debug: bool = False, k: int | None = None) -> Tensor:  # fmt: skip
    """The decode kernel's arithmetic in fp64, lane by lane from the PTX fragment layouts
    (module docstring). ``x``: (M <= 16, K) float activations, int8 codes, or packed int4 codes
    (M, ceil(K / 8)) int32 (offset 8), as the kernel takes them; ``x_scales`` (M,) for the
    integer modes. Returns (M, N) fp64, or with ``debug`` the exact integer sum
    ``x_codes @ (q - z)^T`` (int64)."""
    m = x.shape[0]
    k = dw.k if k is None else k
    integer = x.dtype in (torch.int8, torch.int32)
    ck = chunk_k(dw.bits)
    nt, kc = dw.words.shape[:2]
    per = ck // 4  # K positions per lane and row
    dev = x.device
    w = dw.words.to(torch.int64) & 0xFFFFFFFF  # (NT, KC, 2, 32, 4) -> (NT, KC, 32, 8)
    w = w.permute(0, 1, 3, 2, 4).reshape(*w.shape[:2], 32, 8)
    lane = torch.arange(32, device=dev)
    g, t = lane // 4, lane % 4
    rows = torch.arange(16, device=dev).clamp(max=m - 1)  # rows >= M read row M - 1
    # the activations as the kernel's loads see them: (16, KC, 4 t, per) values at K
    # positions kc + per * t + i; positions >= K are 0 (int4: code 8)
    pos = (torch.arange(kc, device=dev).view(kc, 1, 1) * ck
           + per * torch.arange(4, device=dev).view(1, 4, 1)
           + torch.arange(per, device=dev).view(1, 1, per))  # fmt: skip
    valid = pos < k
    if x.dtype == torch.int32:  # packed int4, nibble i of word j = position 8 j + i
        words_x = x.to(torch.int64) & 0xFFFFFFFF
        wi = (pos // 8).clamp(max=words_x.shape[1] - 1)
        raw = (words_x[rows][:, wi] >> (4 * (pos % 8))) & 0xF
        raw = torch.where(valid, raw, torch.full_like(raw, 8))  # (16, KC, 4, per)
    else:
        xv = x.to(torch.float64 if not integer else torch.int64)
        raw = xv[rows][:, pos.clamp(max=k - 1)]
        raw = torch.where(valid, raw, torch.zeros_like(raw))
    tmp = torch.zeros((nt, kc, 8, 16, 8), dtype=torch.float64, device=dev)  # tile, chunk, s, r, c
    sumx = torch.zeros((kc, 16), dtype=torch.float64, device=dev)
    mask = (1 << dw.bits) - 1
    wl = w[:, :, lane]  # (NT, KC, 32 lanes, 8 words)
    if not integer:
        magic = 128.0  # the value is irrelevant in exact arithmetic; the algebra is the kernel's
        xr = raw[:, :, t]  # (16, KC, 32 lanes, per)
        for u in range(ck // 16):
            a = torch.zeros((kc, 16, 16), dtype=torch.float64, device=dev)  # chunk, row, slot
            b = torch.zeros((nt, kc, 8, 16, 8), dtype=torch.float64, device=dev)  # ., s, slot, col
            for e in range(2):
                # a0 / a1: register 2u (positions 4u + e) -> slot 2t + e; a2 / a3: register
                # 2u + 1 (positions 4u + 2 + e) -> slot 2t + 8 + e
                a[:, :, 2 * t + e] = xr[:, :, :, 4 * u + e].permute(1, 0, 2)
                a[:, :, 2 * t + 8 + e] = xr[:, :, :, 4 * u + 2 + e].permute(1, 0, 2)
                for r in range(2):  # b0 = pair 2u -> slot 2t + e, b1 = pair 2u + 1 -> + 8
                    code = (wl >> (dw.bits * (2 * u + r) + 16 * e)) & mask  # (NT, KC, 32, 8)
                    b[:, :, :, 2 * t + 8 * r + e, g] = magic + code.permute(0, 1, 3, 2).double()
            tmp += torch.einsum("crl,icslq->icsrq", a, b)
            sumx += a.sum(-1)
    else:
        magic = 0.0
        if x.dtype == torch.int8:  # the lane's 8 bytes as two words (positions 0..3, 4..7)
            ub = raw[:, :, t] & 0xFF  # (16, KC, 32, 8)
            lo = sum(ub[..., i] << (8 * i) for i in range(4))
            hi = sum(ub[..., 4 + i] << (8 * i) for i in range(4))
            a_lo, a_hi = _prmt(lo, hi, 0x5140), _prmt(lo, hi, 0x7362)
        else:  # one word of 8 codes: the kernel's int4 -> s8 conversion
            v = sum(raw[:, :, t][..., i] << (4 * i) for i in range(8))
            ev = (((v & 0x0F0F0F0F) + 0x78787878) ^ 0x80808080) & 0xFFFFFFFF
            ov = ((((v >> 4) & 0x0F0F0F0F) + 0x78787878) ^ 0x80808080) & 0xFFFFFFFF
            a_lo, a_hi = _prmt(ev, ov, 0x6420), _prmt(ev, ov, 0x7531)
        a = torch.zeros((kc, 16, 32), dtype=torch.float64, device=dev)
        b = torch.zeros((nt, kc, 8, 32, 8), dtype=torch.float64, device=dev)
        b_lo, b_hi = _bytes(wl & 0x0F0F0F0F, False), _bytes((wl >> 4) & 0x0F0F0F0F, False)
        for i, (lo_i, hi_i) in enumerate(zip(_bytes(a_lo, True), _bytes(a_hi, True), strict=True)):
            a[:, :, 4 * t + i] = lo_i.permute(1, 0, 2).double()  # a0 / a1: slots 4t + i
            a[:, :, 16 + 4 * t + i] = hi_i.permute(1, 0, 2).double()  # a2 / a3: + 16
            b[:, :, :, 4 * t + i, g] = b_lo[i].permute(0, 1, 3, 2).double()  # b0
            b[:, :, :, 16 + 4 * t + i, g] = b_hi[i].permute(0, 1, 3, 2).double()  # b1
        tmp += torch.einsum("crl,icslq->icsrq", a, b)
        sumx += a.sum(-1)
    # per segment (group): s (tmp - (magic + z) sumx); the kernel's flush
    gchunks = dw.group_size // ck if dw.group_size < dw.k else kc
    grp = torch.arange(kc, device=dev) // gchunks  # (KC,)
    n_idx = torch.arange(dw.n_pad, device=dev).view(nt, 1, 8, 1, 8)
    z = dw.zeros.double()[grp.view(1, kc, 1, 1, 1), n_idx]  # (NT, KC, 8, 1, 8)
    s = dw.scales.double()[grp.view(1, kc, 1, 1, 1), n_idx]
    d = tmp - (magic + z) * sumx.view(1, kc, 1, 16, 1)  # (NT, KC, 8, 16 rows, 8 cols)
    total = d.sum(1) if debug or (integer and dw.group_size >= dw.k) else (d * s).sum(1)
    out = total.permute(2, 0, 1, 3).reshape(16, nt * TILE_N)[:m, : dw.n]
    if debug:
        return out.round().to(torch.int64)
    if integer and dw.group_size >= dw.k:
        out = out * dw.scales.double()[0, : dw.n]
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


@functools.lru_cache(maxsize=4096)  # per layer shape and M: called on every launch
def default_splits(n_tiles: int, chunks: int, device: torch.device, m: int = 1,
                   int_act: bool = False) -> int:  # fmt: skip
    """K splits that minimise a makespan model of the grid: ``BLOCKS_PER_SM`` blocks fit an SM
    (``BLOCKS_PER_SM_SWAP`` for M <= 8; the kernels' register and shared-memory use), so
    ``n_tiles * S`` blocks run in ``ceil(n_tiles * S / (BLOCKS_PER_SM * SMs))`` waves of
    ``ceil(chunks / S)`` chunks each plus a fixed cost per wave (its first loads' latency),
    ``WAVE_COST`` chunk-times, fitted to the H200 sweep (benchmarks/results/h200/
    sweep_decode_*.txt: one full wave beats a wave and a tail); at least 2 chunks per warp.
    For M > 8 the split reduction's cost and the cheaper integer chunks (``int_act``: W4A8 /
    W4A4) enter too (SPLIT_ROW_COST, INT_CHUNK_COST)."""
    per_sm = (BLOCKS_PER_SM_SWAP if m <= SWAP_MAX_M else
              BLOCKS_PER_SM if m <= DECODE_MAX_M else
              BLOCKS_PER_SM_MTILES)  # fmt: skip
    slots = per_sm * _sm_count(device.index)
    unswapped = m > SWAP_MAX_M
    chunk_cost = INT_CHUNK_COST if unswapped and int_act else 1.0
    row_cost = SPLIT_ROW_COST * m if unswapped else 0.0
    best = (float("inf"), 1)
    for s in range(1, max(1, min(chunks // 8, 64)) + 1):
        waves = -(-n_tiles * s // slots)
        cost = waves * (-(-chunks // s) * chunk_cost + WAVE_COST) + (s - 1) * row_cost
        best = min(best, (cost, s))
    return best[1]


def launch(x: Tensor, x_scales: Tensor | None, dw: DecodeWeight, bias: Tensor | None,
           out_dtype: torch.dtype, debug: bool = False, splits: int | None = None,
           mtiles: int = 1, pdl: bool = False) -> Tensor:  # fmt: skip
    """Run the CUDA decode kernel. x: (M, K) bf16 / fp16 activations, int8 codes, or packed
    int4 codes (M, ceil(K / 8)) int32 (offset 8); x_scales (M,) fp32 for the last two. M > 16
    runs one launch per slice of 16 ``mtiles`` rows (each reads the whole weight: for a weight
    kept in this layout alone, up to GemmPolicy.small_m; ``mtiles`` = 2 needs an extension
    whose kernel takes 32 rows, ``_C.decode_max_m()``). The caller (cbq_kernels.gemm) has
    checked shapes, dtypes and devices; x must have unit stride along K (its row stride may
    be anything). ``pdl``: launched with programmatic dependent launch (compute capability
    9.0; ignored below): the kernel's weight prefetch may overlap the previous kernel in the
    stream (GemmPolicy.decode_pdl)."""
    from cbq_kernels import _C  # type: ignore[attr-defined]

    step = DECODE_MAX_M * mtiles
    if step > DECODE_MAX_M and step > getattr(_C, "decode_max_m", lambda: DECODE_MAX_M)():
        raise RuntimeError(f"the built extension's decode kernel takes at most {DECODE_MAX_M} "
                           f"rows per launch, not {step}: rebuild cbq_kernels._C")  # fmt: skip

    m = x.shape[0]
    a_mode = _A_MODES[x.dtype]
    int_act = x.dtype in (torch.int8, torch.int32)  # W4A8 / W4A4 codes
    chunks = dw.words.shape[1]
    n_tiles = dw.words.shape[0]
    dev = x.device
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty((m, dw.n), dtype=torch.int32 if debug else out_dtype, device=dev)
    bias_f = bias.float().contiguous() if bias is not None else None
    xs = x_scales.float().contiguous() if x_scales is not None else None
    ptr = lambda t: t.data_ptr() if t is not None else 0  # noqa: E731
    for r0 in range(0, m, step):
        rows = min(step, m - r0)
        split = (default_splits(n_tiles, chunks, dev, rows, int_act)
                 if splits is None else splits)  # fmt: skip
        ws = torch.empty((split, _C.decode_ws_rows(rows), dw.n_pad), dtype=torch.int32,
                         device=dev) if split > 1 else None  # fmt: skip
        _C.gemm_decode_cuda(
            ptr(x[r0:]), ptr(xs[r0:] if xs is not None else None), a_mode, ptr(dw.words),
            ptr(dw.scales), ptr(dw.zeros), ptr(bias_f), ptr(out[r0:]), ptr(ws),
            ptr(dw.counters), rows, dw.n, dw.k, dw.n_pad, x.stride(0), dw.bits, dw.group_size,
            split, _OUT_CODES.get(out_dtype, 2), debug, bool(pdl), dev.index,
            torch.cuda.current_stream(dev).cuda_stream,
        )  # fmt: skip
    return out


@triton.jit
def _tiles_kernel(x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, M, N, K, N_PAD, KC, GS, SX,
                  BITS: tl.constexpr, A_INT: tl.constexpr, GROUPED: tl.constexpr,
                  DEBUG: tl.constexpr, SPLIT: tl.constexpr, DOT_F32: tl.constexpr,
                  BLOCK_M: tl.constexpr):  # fmt: skip
    """Partial products of x (M <= BLOCK_M, K) with a decode-layout weight, one n-tile (64
    columns) and one K split per program, into out (SPLIT, M, N) fp32 (int32 with DEBUG, or
    for integer activations with per-channel scales: the caller scales). The 256 words of a
    (tile, chunk) load as (t, n') with n' = 32 h + 4 g + j (column n = 32 h + 8 j + g): each
    word unpacks to the CK / 4 codes at k = (CK / 4) t + i, so the (t, i) axes merge into K in
    order and only the columns are permuted (undone at the store)."""
    CK: tl.constexpr = 64 if BITS == 2 else 32
    PER: tl.constexpr = CK // 4
    MASK: tl.constexpr = (1 << BITS) - 1
    tile = tl.program_id(0)
    split = tl.program_id(1)
    rm = tl.arange(0, BLOCK_M)
    mm = rm < M
    jn = tl.arange(0, 64)
    n = tile * 64 + (jn // 32) * 32 + (jn % 4) * 8 + (jn // 4) % 8
    mn = n < N
    woff = (jn // 32) * 128 + ((jn // 4) % 8) * 16 + jn % 4
    t = tl.arange(0, 4)
    i = tl.arange(0, PER)
    shift = BITS * (i // 2) + 16 * (i % 2)
    kk = tl.arange(0, CK)
    acc = tl.zeros((BLOCK_M, 64), tl.float32)
    acc_i = tl.zeros((BLOCK_M, 64), tl.int32)
    for c in range(split, KC, SPLIT):
        base = (tile.to(tl.int64) * KC + c) * 256
        words = tl.load(w_ptr + base + t[:, None] * 4 + woff[None, :])  # (4, 64)
        q = (words[:, None, :] >> shift[None, :, None]) & MASK  # (4, PER, 64)
        q = tl.reshape(q, (CK, 64))
        g = (c * CK) // GS
        wq = q - tl.load(z_ptr + g * N_PAD + n, mask=mn, other=0)[None, :]
        k = c * CK + kk
        a = tl.load(x_ptr + rm[:, None].to(tl.int64) * SX + k[None, :],
                    mask=mm[:, None] & (k < K)[None, :], other=0)  # fmt: skip
        if A_INT:
            part = tl.dot(a, wq.to(tl.int8), out_dtype=tl.int32)
            if GROUPED and not DEBUG:
                acc += part.to(tl.float32) * tl.load(s_ptr + g * N_PAD + n, mask=mn,
                                                     other=0.0)[None, :]  # fmt: skip
            else:
                acc_i += part
        else:
            if DOT_F32:
                part = tl.dot(a.to(tl.float32), wq.to(tl.float32), input_precision="ieee")
            else:
                part = tl.dot(a, wq.to(a.dtype))
            acc += part * tl.load(s_ptr + g * N_PAD + n, mask=mn, other=0.0)[None, :]
    ptrs = out_ptr + split.to(tl.int64) * M * N + rm[:, None].to(tl.int64) * N + n[None, :]
    mo = mm[:, None] & mn[None, :]
    if A_INT and (DEBUG or not GROUPED):
        tl.store(ptrs, acc_i, mask=mo)
    else:
        tl.store(ptrs, acc, mask=mo)


def launch_triton(x: Tensor, x_scales: Tensor | None, dw: DecodeWeight, bias: Tensor | None,
                  out_dtype: torch.dtype, debug: bool = False,
                  splits: int | None = None) -> Tensor:  # fmt: skip
    """The product of x (M <= 64, K) with a decode-layout weight by a Triton kernel that reads
    the weight once for all M rows (:func:`launch` reads it once per 16-row slice): float
    activations (weight-only), int8 codes, or packed int4 codes (expanded to int8 first);
    x_scales (M,) for the integer ones; ``debug``: the int32 accumulator x_codes @ (q - z)^T.
    K splits write fp32 / int32 partials summed in a fixed order (deterministic)."""
    from cbq_kernels.gemm_triton import _expand

    m = x.shape[0]
    dev = x.device
    if x.dtype == torch.int32:  # packed int4 codes, offset 8
        x = _expand(x, m, dw.k, 4, x.shape[1], 1, None, dw.k, z_const=8)
    a_int = x.dtype == torch.int8
    if x.stride(-1) != 1:
        x = x.contiguous()
    nt, kc = dw.words.shape[:2]
    grouped = dw.group_size < dw.k
    if splits is None:  # about 4 programs per SM, at least 2 chunks each
        sms = _sm_count(dev.index) if dev.type == "cuda" else 1
        splits = 1
        while nt * splits < 4 * sms and kc // (splits * 2) >= 2:
            splits *= 2
    int_out = a_int and (debug or not grouped)
    part = torch.empty((splits, m, dw.n), dtype=torch.int32 if int_out else torch.float32,
                       device=dev)  # fmt: skip
    block_m = max(16, triton.next_power_of_2(m))
    _tiles_kernel[(nt, splits)](x, dw.words, dw.scales, dw.zeros, part, m, dw.n, dw.k, dw.n_pad,
                                kc, dw.group_size, x.stride(0), BITS=dw.bits, A_INT=a_int,
                                GROUPED=grouped, DEBUG=debug, SPLIT=splits,
                                DOT_F32=dev.type == "cpu" or x.dtype == torch.float32,
                                BLOCK_M=block_m)  # fmt: skip
    total = part.sum(0) if splits > 1 else part[0]
    if debug:
        return total.to(torch.int32)
    y = total.float()
    if a_int:
        if not grouped:
            y = y * dw.scales[0, : dw.n][None, :]
        y = y * x_scales.float()[:, None]
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)
