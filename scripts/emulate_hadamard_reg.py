"""NumPy check of the register Hadamard kernels' index plans on the CPU (no GPU needed).

Variant 1 (csrc/hadamard_quant_reg.cu), lane by lane: the sign masks of the staged row, the
+-1 A fragments rebuilt from sign bits (cbq/hadamard_common.cuh's layout), the MMA tiles
(H_m (x) H_f over the staged segments), the butterflies of H_pw on the accumulators as a lane
holds them (in-thread bits and two shuffle stages), the quantizer (1.5 2^23 rounding) and the
code buffer / 16-byte copy-out; compared with cbq_kernels.hadamard_quant.hadamard_act_quant_ref
(transform error, then codes and scale). Variant 2 (csrc/hadamard_quant_xch.cu): its
decomposition H_m per block b, H_64 per column half, then H_2 (x) H_f, against the transform.
The PTX fragment layouts (ldmatrix.trans, mma.m16n8k16) are taken as PTX documents them; the
GPU tests check the kernels themselves.

    python scripts/emulate_hadamard_reg.py 640 1536 4096 11008 12288 20480 28672
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cbq_kernels import hadamard
from cbq_kernels.hadamard_quant import _small_padded, hadamard_act_quant_ref
from cbq_kernels.packing import unpack


def shape(m, p):
    pw = min(p, 128)
    f = p // pw
    mq = m * f
    return pw, f, mq, -(-mq // 16)


def bit(q, r, high):  # hadamard_common.cuh: sign_bits_at
    return 1 << ((31 if high else 15) - r - 4 * q)


def pair(word, q, r):  # sign_pair, as (low, high) sign flags
    v = (word << (r + 4 * q)) & 0x80008000
    return bool(v & 0x8000), bool(v & 0x80000000)


def transform_v1(x, signs, m, p):
    """Variant 1's unscaled sums (m' x pw), lane by lane."""
    n = m * p
    pw, f, mq, tiles = shape(m, p)
    nt_count = pw // 8
    small = _small_padded(m, -(-m // 16) * 16, torch.device("cpu")).numpy()

    def neg(k, o):
        if k >= mq or o >= mq:
            return False
        return bool(small[k // f, o // f] < 0) ^ bool(bin((k % f) & (o % f)).count("1") & 1)

    st = np.zeros((tiles * 16, pw))
    for c in range(n // 8):  # the sign pass with the per-chunk masks
        w = sum(bit(0, k // 2, k & 1) for k in range(8) if signs[8 * c + k] < 0)
        for k in range(8):
            flip = pair(w, 0, k // 2)[k & 1]
            st[8 * c // pw, (8 * c) % pw + k] = -x[8 * c + k] if flip else x[8 * c + k]
    out = np.zeros((tiles * 16, pw))
    for tile in range(tiles):
        acc = np.zeros((32, nt_count, 4))
        for kt in range(tiles):
            a = np.zeros((16, 16))
            for lane in range(32):
                g, t = lane // 4, lane % 4
                word = 0
                for r in range(4):
                    o, k = tile * 16 + g + (r & 1) * 8, kt * 16 + 2 * t + (r >> 1) * 8
                    word |= bit(kt % 4, r, 0) if neg(k, o) else 0
                    word |= bit(kt % 4, r, 1) if neg(k + 1, o) else 0
                for r in range(4):
                    lo, hi = pair(word, kt % 4, r)
                    row, col = g + (r & 1) * 8, 2 * t + (r >> 1) * 8
                    a[row, col], a[row, col + 1] = (-1 if lo else 1), (-1 if hi else 1)
            d = a @ st[kt * 16 : (kt + 1) * 16]  # B: the staged k rows
            for lane in range(32):
                g, t = lane // 4, lane % 4
                for nt in range(nt_count):
                    for e in range(2):
                        acc[lane, nt, e] += d[g, 8 * nt + 2 * t + e]
                        acc[lane, nt, 2 + e] += d[g + 8, 8 * nt + 2 * t + e]
        for h in (0, 2):  # column bit 0, in-thread
            u, v = acc[:, :, h].copy(), acc[:, :, h + 1].copy()
            acc[:, :, h], acc[:, :, h + 1] = u + v, u - v
        hh = 1
        while hh < nt_count:  # column bits 3.., in-thread
            for nt in range(nt_count):
                if nt & hh == 0:
                    u, v = acc[:, nt].copy(), acc[:, nt + hh].copy()
                    acc[:, nt], acc[:, nt + hh] = u + v, u - v
            hh *= 2
        for sh in (1, 2):  # column bits 1-2: shuffles, fma(sgn, v, other)
            other = acc[np.arange(32) ^ sh].copy()
            acc = np.where(np.arange(32) & sh, -1.0, 1.0)[:, None, None] * acc + other
        for lane in range(32):
            g, t = lane // 4, lane % 4
            for nt in range(nt_count):
                for e in range(2):
                    out[tile * 16 + g, 8 * nt + 2 * t + e] = acc[lane, nt, e]
                    out[tile * 16 + g + 8, 8 * nt + 2 * t + e] = acc[lane, nt, 2 + e]
    return out[:mq]


def codes_v1(sums, n, pw, bits, ratio):
    """The quantizer in fp32 as the kernel computes it, through the code buffer."""
    f32 = np.float32
    inv, qmax = f32(1 / np.sqrt(n)), f32((1 << (bits - 1)) - 1)
    r = f32(f32(np.abs(sums).max()) * inv)
    s = max(f32(f32(f32(ratio) * r) / qmax), max(f32(r * f32(9.5367431640625e-07)), f32(1e-8)))
    u = np.clip(((sums.astype(f32) * inv).astype(f32) * f32(f32(1) / s)).astype(f32),
                -qmax - 1, qmax).astype(f32)  # fmt: skip
    t = (u + f32(12582912.0 if bits == 8 else 12582920.0)).astype(f32).view(np.uint32)
    seg = pw if bits == 8 else pw // 2
    pitch = seg + 16 + (16 if ((seg + 16) // 4) % 8 == 0 else 0)
    buf = np.zeros(sums.shape[0] * pitch, dtype=np.uint8)
    for o in range(sums.shape[0]):
        for j in range(0, pw, 2):
            c0, c1 = int(t[o, j]), int(t[o, j + 1])
            if bits == 8:
                buf[o * pitch + j], buf[o * pitch + j + 1] = c0 & 0xFF, c1 & 0xFF
            else:
                buf[o * pitch + j // 2] = (c0 & 0xF) | ((c1 & 0xF) << 4)
    row = np.zeros(n if bits == 8 else n // 2, dtype=np.uint8)
    for c in range(row.size // 16):
        src = (16 * c // seg) * pitch + (16 * c) % seg
        row[16 * c : 16 * c + 16] = buf[src : src + 16]
    return row, s


def transform_v2(x, signs, m, p):
    """Variant 2's decomposition: H_m per block b, H_64 per column half, H_2 (x) H_F."""
    f = p // 128
    xs = (x * signs).reshape(m, f, 128)
    hm = _small_padded(m, -(-m // 16) * 16, torch.device("cpu")).double().numpy()[:, :m]
    d = np.einsum("io,ibj->obj", hm, xs).reshape(m, f, 2, 64) @ hadamard_np(64)
    d = np.einsum("obhj,hk->obkj", d, hadamard_np(2))
    return np.einsum("obhj,bc->ochj", d, hadamard_np(f)).reshape(-1)


def hadamard_np(k):
    h = np.ones((1, 1))
    while h.shape[0] < k:
        h = np.block([[h, h], [h, -h]])
    return h


def main(widths: list[int]) -> None:
    for n in widths:
        m, p = hadamard.factor(n)
        x = (torch.randn(n, generator=torch.Generator().manual_seed(1)) * 2)
        x[5] *= 300
        x = x.to(torch.bfloat16).float()
        signs = hadamard.random_signs(n, 3)
        ref = hadamard.transform(x[None].double(), signs.double())[0].numpy()
        xd, sd = x.double().numpy(), signs.double().numpy()
        pw, _, mq, _ = shape(m, p)
        if pw >= 32 and mq <= 256:
            sums = transform_v1(xd, sd, m, p)
            err = np.abs(sums.reshape(-1) / np.sqrt(n) - ref).max()
            line = f"{n} = {m} x {p}: variant 1 transform max error {err:.1e}"
            for bits, ratio in ((8, 1.0), (4, 0.8)):
                got, _ = codes_v1(sums.astype(np.float32), n, pw, bits, ratio)
                want = hadamard_act_quant_ref(x[None], bits, signs, ratio)[0]
                if bits == 8:
                    diff = (torch.from_numpy(got.view(np.int8).copy()).long() - want[0].long())
                else:
                    words = torch.from_numpy(got.view(np.int32).copy())[None]
                    diff = unpack(words, 4, n).long() - unpack(want, 4, n).long()
                line += f"; int{bits} codes differing {int((diff != 0).sum())}"
            print(line, flush=True)
        if (p == 1024 and m <= 32) or (p == 2048 and m <= 16):
            err = np.abs(transform_v2(xd, sd, m, p) / np.sqrt(n) - ref).max()
            print(f"{n} = {m} x {p}: variant 2 decomposition max error {err:.1e}", flush=True)


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [640, 11008, 12288, 28672])
