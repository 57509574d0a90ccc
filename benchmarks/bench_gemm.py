"""Quantized GEMMs against cuBLAS bf16, torch._int_mm (int8) and torch._scaled_mm (fp8), at
Llama-2 7B / 13B / 70B linear-layer shapes and M in {1, 4, 16, 32, 64, 256, 1024, 2048, 4096,
8192}.

Providers: cublas_bf16 (F.linear, bf16 weight), int_mm (int8 x int8 -> int32; M <= 16 is
padded to 32 rows, its minimum), scaled_mm (fp8 e4m3 x e4m3 -> bf16, unit scales), and the
cbq kernels: w4a8 (4-bit per-channel weight, int8 activation codes), w4a8_g128, w4a4
(packed int4 activation codes), w4a16_g128 and w2a16_g128 (weight-only, bf16 activations),
each as its public function dispatches it on a weight prepared as a served model holds it
(prepare_weight's layout "auto": the decode layout alone when the extension has the kernel;
M <= 16: the CUDA decode kernel of csrc/gemm_decode.cu with programmatic dependent launch,
M <= 63 the same kernel on 32-row launches of two m-tiles, larger M expanded from that
layout: the default GemmPolicy); the Triton kernels on the canonical words (a second weight,
layout "both") as *_triton rows (M <= 63: the Triton decode kernel); at 16 < M <= 63 also
*_mt1 rows (GemmPolicy(decode_mtiles=1): 16-row slices, each reading the whole weight, the
default before b9bb17a's H100 run; *_mt2 in the tables before it were today's default); at
M <= 16 also *_nopdl rows (GemmPolicy(decode_pdl=False): the plain launch, the default
before; *_pdl before it were today's default). The timed graph replays the GEMM back to
back, so the PDL overlap measured is that between consecutive GEMMs,
more than a decode step with other kernels between them gets; the *_tiles rows of
bench_gemm.csv at 7a9193f, a Triton kernel reading the decode layout once for all rows, lost
to the slices: 70b gate/up M = 32 W4A8 0.218 vs 0.133 ms);
int4pack_mm: PyTorch's own W4A16 g128 kernel (torch._weight_int4pack_mm), a peer; a
"copy" row: the device-to-device copy bandwidth of the same run (what the decode rows'
GB/s are judged against). At M in {256, 1024, 4096} also the other side of
the dispatch thresholds (EXPAND_MIN_M, WONLY_CUBLAS_MIN_M): w4a8_inloop (codes unpacked in the
K loop, no int8 expansion) and w4a16_g128_inloop (the Triton kernel, no dequantize + cuBLAS);
at M >= 256 w4a4_fp8 (W4A4 on fp8 tensor cores: GemmPolicy.fp8_w4a4_min_m, off by default).
At M >= 64 on Hopper, experimental kernels not in the dispatch: *_tma / *_ptr (the int8 GEMM
after expansion, TMA or pointer kernel), w4a8_split (gemm_tma4: split-nibble weight, no
expansion), w4a4_split8 (the same with W4A4 codes as fp8: not exact, a speed reading only),
and the Gluon kernels of gemm_gluon: w4a8_split_gluon (split-nibble weight, int8 MMAs in
flight, zero points after the K loop, the row sums of x included), w4a8_2lvl_gluon (its two-
level grouped form, groups of 64 with integer scales: against w4a8_g128), int8_gluon / int8_tma
(the int8 GEMM alone on an int8 weight, Gluon against the TMA kernel), and w4a8_gluon /
w4a4_gluon (the served call with GemmPolicy.gluon_min_m: expansion, then the Gluon kernel);
w4a8_g64_2lvl (/ _gluon) and w4a8_g128_2lvl: W4A8 in the two-level grouped format
(prepare_weight's channel_scales; groups of 64 / 128), served.
Times are CUDA-graph replays (``do_bench_cudagraph``): the GPU time, without the Python
launch cost, as a served model replays its decode step.
Activation quantization is not included in the kernel times (it is a separate, fused-with-
RMSNorm op, benchmarked in bench_act_quant.py). TFLOP/s counts 2*M*N*K; GB/s counts the
activation, the (packed) weight with its scales, and the output.

    python benchmarks/bench_gemm.py --out benchmarks/results/h100
    python benchmarks/summarize_gemm.py benchmarks/results/h100/bench_gemm.csv   (targets, plot)
    CBQ_BENCH_QUICK=1 ...   (70B gate/up, M in {1, 16, 4096}: a smoke run)
    CBQ_BENCH_MS=1,4096 CBQ_BENCH_KERNELS=w4a8,w4a16_g128 CBQ_BENCH_SHAPES=7b_down ... (subsets)
    CBQ_BENCH_COLD=1 ...      (L2-cold decode rows: see below)

L2 residency. The timed graph calls the GEMM back to back on one weight, so a weight smaller
than the L2 (50 MB on the H100 and H200) is read from L2 after the first call: at 16 x 4096 x
4096 cuBLAS bf16 (a 32 MB weight) measured 3.68 TB/s on an H100 whose 1 GiB read runs at 3.06
(bench_gemm_decode_2483d26_m16_32.md), and every 4-bit 7B weight (8-23 MB) fits, while the bf16
gate/up and down weights (90 MB) do not. In a served model each layer's weight is read once per
step, after ~3.5 GB of other weights: from HBM. ``CBQ_BENCH_COLD=1`` times the decode providers
(cublas_bf16, scaled_mm, int4pack_mm and the served w4a8, w4a8_g128, w4a4, w4a16_g128,
w2a16_g128) with each call on the next of ``ceil(4 x L2 / weight bytes)`` copies of its weight
(the graph captures the calls in turn), so each reads its weight from HBM as a model's step
does; M defaults to 1, 4, 16, 32 there. The activations stay hot, as in a model.
"""

# ruff: noqa: B023 - every closure below is timed at once, inside its loop iteration

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import Environment, Table, Timing, cli, write_report
from cbq_kernels import formats, gemm_gluon
from cbq_kernels.act_quant import act_quant
from cbq_kernels.gemm import GemmPolicy, gemm_w4a4, gemm_w4a8, gemm_wonly, prepare_weight
from cbq_kernels.gemm_tma import gemm_int8_tma
from cbq_kernels.gemm_tma4 import gemm_w4a8_split, split_nibbles
from cbq_kernels.gemm_triton import _A_FLOAT, _A_INT8, _launch, _split_k, fp8_available
from cbq_kernels.packing import pack_ref as pack  # no compiled extension needed
from cbq_kernels.packing import unpack_ref
from cbq_kernels.testing import LLAMA_LINEAR_SHAPES

MS = (1, 4, 16, 32, 64, 256, 1024, 2048, 4096, 8192)
SLICES = GemmPolicy(decode_mtiles=1)  # the *_mt1 rows: 16-row launches at 16 < M <= 63
NO_PDL = GemmPolicy(decode_pdl=False)  # the *_nopdl rows: the plain launch, M <= 16
FP8_W4A4 = GemmPolicy(fp8_w4a4_min_m=1)  # the w4a4_fp8 rows (M >= 256)
# the *_tma rows: the int8 GEMM after expansion with TMA (M >= 64)
TMA = GemmPolicy(tma_min_m=1, gluon_min_m=0)
POINTER = GemmPolicy(tma_min_m=0, gluon_min_m=0)  # the *_ptr rows: the pointer kernel there
# the *_gluon rows: the served call with the Gluon int8 kernel there at every M
# (GemmPolicy.gluon_min_m / gluon_max_m / gluon_min_mn; the default takes it at M = 256..4096
# where M x N >= 2^22)
GLUON = GemmPolicy(gluon_min_m=1, gluon_max_m=1 << 30, gluon_min_mn=0)


def weight(n, k, bits, group_size, g, canonical=True):
    """The served form (layout "auto") and the canonical words for the Triton rows (None
    without ``canonical``)."""
    codes = torch.randint(0, 1 << bits, (n, k), generator=g, device="cuda", dtype=torch.uint8)
    groups = 1 if group_size is None else -(-k // group_size)
    scales = torch.rand(n, groups, generator=g, device="cuda") * 0.01 + 0.001
    zeros = torch.randint(0, 1 << bits, (n, groups), generator=g, device="cuda").float()
    packed = pack(codes, bits)
    return (prepare_weight(packed, bits, k, scales, zeros, group_size),
            prepare_weight(packed, bits, k, scales, zeros, group_size, layout="canonical")
            if canonical else None)  # fmt: skip


def two_level_weight(n, k, g, group=64):
    """A served W4A8 weight in the two-level grouped format (groups of ``group``: integer
    steps s2 in 1..8, so |s2 (q - z)| <= 120; prepare_weight's channel_scales)."""
    codes = torch.randint(0, 16, (n, k), generator=g, device="cuda", dtype=torch.uint8)
    s1 = torch.rand(n, generator=g, device="cuda") * 0.001 + 0.0001
    s2 = torch.randint(1, 9, (n, k // group), generator=g, device="cuda").float()
    zeros = torch.randint(0, 16, (n, k // group), generator=g, device="cuda").float()
    return prepare_weight(pack(codes, 4), 4, k, s1[:, None] * s2, zeros, group,
                          channel_scales=s1)  # fmt: skip


def bf16_weight(n, k, g):
    """A random (N, K) bf16 weight (cuBLAS's operand; its fp8 copy is scaled_mm's)."""
    return (torch.randn(n, k, generator=g, device="cuda") * 0.02).to(torch.bfloat16)


def int4pack_weight(n, k, g):
    """PyTorch's int4 weight-only operands: (N, K / 2) uint8 nibbles converted to its layout,
    and g128 bf16 scales / zeros (K / 128, N, 2)."""
    wi = torch.randint(0, 16, (n, k), generator=g, device="cuda", dtype=torch.int32)
    packed = torch._convert_weight_to_int4pack(((wi[:, ::2] << 4) | wi[:, 1::2]).to(torch.uint8), 8)
    return packed, torch.rand(k // 128, n, 2, generator=g, device="cuda").to(torch.bfloat16)


COLD = os.environ.get("CBQ_BENCH_COLD") == "1"


def cold_copies(nbytes: int, l2_bytes: int) -> int:
    """How many copies of an ``nbytes`` weight the L2-cold rows cycle through: enough that the
    others' reads, 4 x the L2, evict a copy before its next call."""
    return max(1, -(-4 * l2_bytes // nbytes))


class Cycle:
    """``fn(c)`` for the copies ``c`` in turn, one per call: the timed graph captures its calls
    one after the other, so consecutive replayed calls read different copies."""

    def __init__(self, fn, copies) -> None:
        self.fn, self.copies, self.calls = fn, list(copies), 0

    def __call__(self):
        c = self.copies[self.calls % len(self.copies)]
        self.calls += 1
        return self.fn(c)


def wbytes(w) -> int:
    """The bytes one GEMM reads: one layout's codes, fp32 scales and int32 zero points."""
    return w.n * formats.packed_words(w.k, w.bits) * 4 + w.scales.numel() * 8


def timed(fn):
    from triton.testing import do_bench_cudagraph

    fn()  # autotune and compile outside the graph
    torch.cuda.synchronize()
    p50, p20, p80 = do_bench_cudagraph(fn, rep=25, quantiles=[0.5, 0.2, 0.8])
    return Timing(p50, p20, p80)


def copy_bandwidth(table) -> float:
    """GB/s of a 1 GiB device-to-device copy (read + write), added to the table as a row."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    t = timed(lambda: dst.copy_(src))
    gbps = 2 * src.numel() / t.p50_ms / 1e6
    table.add("copy", "torch_copy", "1GiB", "u8", t, nbytes=2 * src.numel(), copy_gbps=gbps)
    # a read-only stream for reference: a copy's reads and writes share the bus, so a decode
    # kernel that only reads can exceed "1.0" of the copy rate (cuBLAS bf16 at M = 1 did:
    # 4.26 TB/s against a 2.77 TB/s copy on the H200)
    big = src.view(torch.bfloat16)
    t = timed(lambda: big.sum(dtype=torch.float32))
    table.add("read", "torch_sum", "1GiB", "bf16", t, nbytes=src.numel(), copy_gbps=gbps)
    return gbps


def main() -> None:
    out = cli(__doc__)
    quick = bool(os.environ.get("CBQ_BENCH_QUICK"))
    torch.manual_seed(0)
    g = torch.Generator(device="cuda").manual_seed(0)
    table = Table(Environment.detect())
    shapes = [(f"{model}_{layer}", n, k) for model, layers in LLAMA_LINEAR_SHAPES.items()
              for layer, (n, k) in layers.items()]  # fmt: skip
    ms = MS
    if quick:
        shapes = [s for s in shapes if s[0] == "70b_gate_up"]
        ms = (1, 16, 4096)
    if os.environ.get("CBQ_BENCH_SHAPES"):  # e.g. 70b_gate_up,7b_down
        shapes = [s for s in shapes if s[0] in os.environ["CBQ_BENCH_SHAPES"].split(",")]
    if COLD:
        ms = (1, 4, 16, 32)
    if os.environ.get("CBQ_BENCH_MS"):
        ms = tuple(int(v) for v in os.environ["CBQ_BENCH_MS"].split(","))
    only = os.environ.get("CBQ_BENCH_KERNELS", "").split(",")
    notes = []
    copy_gbps = copy_bandwidth(table)
    if COLD:
        l2 = torch.cuda.get_device_properties(0).L2_cache_size
        notes.append(f"- L2-cold (CBQ_BENCH_COLD=1): each provider cycles over ceil(4 x "
                     f"{l2 / 2**20:.0f} MiB L2 / its weight's bytes) copies of its weight, one "
                     "per call (counts per shape below)")  # fmt: skip
        for name, n, k in shapes:
            cold_shape(table, name, n, k, ms, g, l2, copy_gbps, only, notes)
            report(table, out, notes)
        return
    for name, n, k in shapes:
        w_bf16 = bf16_weight(n, k, g)
        w_i8_t = torch.randint(-127, 128, (n, k), generator=g, device="cuda",
                               dtype=torch.int8).t()  # fmt: skip
        w_f8_t = w_bf16.to(torch.float8_e4m3fn).t()
        (w4, w4c), (w4g, w4gc), (w2g, w2gc) = (weight(n, k, 4, None, g),
                                               weight(n, k, 4, 128, g), weight(n, k, 2, 128, g))
        w2l, w2l128 = two_level_weight(n, k, g), two_level_weight(n, k, g, 128)
        one = torch.ones((), device="cuda")
        # the split-nibble weight of cbq_kernels.gemm_tma4 (experimental: the prefill W4A8
        # without the expansion pass), per-channel scales and zero points
        split4 = split_nibbles(torch.randint(0, 16, (n, k), generator=g, device="cuda",
                                             dtype=torch.uint8))  # fmt: skip
        z4 = torch.randint(0, 16, (n,), generator=g, device="cuda", dtype=torch.uint8)
        ws4 = torch.rand(n, generator=g, device="cuda") * 0.01 + 0.001
        int4pack = None
        try:  # PyTorch's int4 weight-only kernel
            int4pack = int4pack_weight(n, k, g)
        except (RuntimeError, AttributeError, TypeError) as exc:
            notes.append(f"- int4pack_mm {name}: not run ({str(exc).splitlines()[0][:80]})")
        for m in ms:
            shape = f"{m}x{n}x{k}"
            flops = 2 * m * n * k
            x = (torch.randn(m, k, generator=g, device="cuda")).to(torch.bfloat16)
            xq8, xs8 = act_quant(x, 8)
            xq4, xs4 = act_quant(x, 4)
            out_b = m * n * 2
            base = timed(lambda x=x: F.linear(x, w_bf16))
            table.add(name, "cublas_bf16", shape, "bf16", base, flops=flops,
                      nbytes=m * k * 2 + n * k * 2 + out_b)  # fmt: skip
            mp = max(m, 32)
            xi = xq8 if m >= 32 else torch.zeros(mp, k, dtype=torch.int8, device="cuda")
            t = timed(lambda xi=xi: torch._int_mm(xi, w_i8_t))
            table.add(name, "int_mm", shape, "int8", t, flops=flops, nbytes=mp * k + n * k +
                      mp * n * 4, baseline=base, baseline_name="cublas_bf16")  # fmt: skip
            xf8 = x.to(torch.float8_e4m3fn)
            try:
                t = timed(
                    lambda xf8=xf8: torch._scaled_mm(
                        xf8, w_f8_t, one, one, out_dtype=torch.bfloat16
                    )
                )
                table.add(name, "scaled_mm", shape, "fp8", t, flops=flops,
                          nbytes=m * k + n * k + out_b, baseline=base,
                          baseline_name="cublas_bf16")  # fmt: skip
            except RuntimeError as exc:
                notes.append(f"- scaled_mm {shape}: not run ({str(exc).splitlines()[0][:80]})")

            def rows(suffix, a, ag, a2, **kw):
                """The four GEMM rows on weights a (4-bit), ag (4-bit g128), a2 (2-bit g128)
                with keyword arguments kw; bytes counted for one layout either way."""
                return (
                    (f"w4a8{suffix}", lambda: gemm_w4a8(xq8, xs8, a, **kw), m * k + wbytes(w4)),
                    (f"w4a4{suffix}", lambda: gemm_w4a4(xq4, xs4, a, **kw),
                     m * k // 2 + wbytes(w4)),
                    (f"w4a16_g128{suffix}", lambda: gemm_wonly(x, ag, **kw),
                     m * k * 2 + wbytes(w4g)),
                    (f"w2a16_g128{suffix}", lambda: gemm_wonly(x, a2, **kw),
                     m * k * 2 + wbytes(w2g)),
                )  # fmt: skip

            served = rows("", w4, w4g, w2g)
            cases = (served[0],
                     ("w4a8_g128", lambda: gemm_w4a8(xq8, xs8, w4g), m * k + wbytes(w4g)),
                     # two-level grouped W4A8 (groups of 64): at prefill the per-channel
                     # int8 product after expansion, with the Gluon kernel too
                     ("w4a8_g64_2lvl", lambda: gemm_w4a8(xq8, xs8, w2l), m * k + wbytes(w2l)),
                     ("w4a8_g128_2lvl", lambda: gemm_w4a8(xq8, xs8, w2l128),
                      m * k + wbytes(w2l128)),
                     *served[1:])  # fmt: skip
            if int4pack is not None:
                cases += (
                    (
                        "int4pack_mm",
                        lambda: torch._weight_int4pack_mm(x, int4pack[0], 128, int4pack[1]),
                        m * k * 2 + n * k // 2 + n * k // 32,
                    ),
                )
            if m <= 16:  # without programmatic dependent launch (the default has it: each
                # timed graph replays the GEMM back to back, so the next launch's weight
                # prefetch overlaps this one's tail)
                cases += rows("_nopdl", w4, w4g, w2g, policy=NO_PDL)
            if 16 < m <= 63:  # 16-row slices vs the default's two m-tiles per launch
                cases += rows("_mt1", w4, w4g, w2g, policy=SLICES)
            if m <= 63:  # the Triton decode kernel on the canonical words
                cases += rows("_triton", w4c, w4gc, w2gc, split_k=_split_k(m, n, k, x.device))
            if m in (256, 1024, 4096):  # the other side of the dispatch thresholds
                cases += (
                    ("w4a8_inloop", lambda: _launch(xq8, xs8.float(), _A_INT8, w4c, None,
                                                    torch.bfloat16, False, None, None, False),
                     m * k + wbytes(w4)),
                    ("w4a16_g128_inloop", lambda: _launch(x, None, _A_FLOAT, w4gc, None,
                                                          torch.bfloat16, False, None),
                     m * k * 2 + wbytes(w4g)),
                )  # fmt: skip
            if m >= 64 and torch.cuda.get_device_capability()[0] >= 9:  # the persistent
                # TMA kernel after expansion (the default from GemmPolicy.tma_min_m = 1024)
                # and the pointer kernel it replaced there
                cases += (("w4a8_tma", lambda: gemm_w4a8(xq8, xs8, w4, policy=TMA),
                           m * k + wbytes(w4)),
                          ("w4a4_tma", lambda: gemm_w4a4(xq4, xs4, w4, policy=TMA),
                           m * k // 2 + wbytes(w4)),
                          ("w4a8_ptr", lambda: gemm_w4a8(xq8, xs8, w4, policy=POINTER),
                           m * k + wbytes(w4)),
                          ("w4a4_ptr", lambda: gemm_w4a4(xq4, xs4, w4, policy=POINTER),
                           m * k // 2 + wbytes(w4)),
                          ("w4a8_split", lambda: gemm_w4a8_split(xq8, xs8, split4, k, z4, ws4),
                           m * k + split4.numel() + n * 5))  # fmt: skip
                if gemm_gluon.available(xq8):  # the served call with the Gluon int8 kernel
                    cases += (("w4a8_gluon", lambda: gemm_w4a8(xq8, xs8, w4, policy=GLUON),
                               m * k + wbytes(w4)),
                              ("w4a4_gluon", lambda: gemm_w4a4(xq4, xs4, w4, policy=GLUON),
                               m * k // 2 + wbytes(w4)),
                              ("w4a8_g64_2lvl_gluon", lambda: gemm_w4a8(xq8, xs8, w2l,
                                                                        policy=GLUON),
                               m * k + wbytes(w2l)))  # fmt: skip
                if gemm_gluon.available(xq8):  # the int8 GEMM alone on an int8 weight: the
                    # Gluon kernel (MMAs in flight) against the TMA kernel (each waited on)
                    w_i8 = w_i8_t.t()
                    gp2 = gemm_gluon.two_level_params(
                        torch.randint(1, 9, (n, k // 64), device="cuda", dtype=torch.int32),
                        torch.randint(0, 16, (n, k // 64), device="cuda", dtype=torch.int32))
                    cases += (("w4a8_split_gluon", lambda: gemm_gluon.gemm_w4a8_split_gluon(
                                   xq8, xs8, split4, k, z4, ws4), m * k + split4.numel() + n * 5),
                              # grouped W4A8 in the two-level format (groups of 64, integer
                              # group scales): against the served w4a8_g128
                              ("w4a8_2lvl_gluon", lambda: gemm_gluon.gemm_w4a8_split_gluon(
                                   xq8, xs8, split4, k, None, ws4, group_params=gp2),
                               m * k + split4.numel() + gp2.numel() + n * 4),
                              ("int8_gluon", lambda w_i8=w_i8: gemm_gluon.gemm_int8_gluon(
                                   xq8, xs8, w_i8, ws4, None, torch.bfloat16), m * k + n * k),
                              ("int8_tma", lambda w_i8=w_i8: gemm_int8_tma(
                                   xq8, xs8, w_i8, ws4, None, torch.bfloat16), m * k + n * k))
                # W4A4 through it with the codes as fp8 e4m3 (fp8 MMAs the compiler keeps in
                # flight; the activation quantizer would write e4m3: converted outside here)
                x48 = (unpack_ref(xq4, 4, k).float() - 8).to(torch.float8_e4m3fn)
                cases += (("w4a4_split8", lambda x48=x48: gemm_w4a8_split(x48, xs4, split4, k, z4,
                                                                         ws4),
                           m * k + split4.numel() + n * 5),)  # fmt: skip
            if m >= 256 and fp8_available(x.device):  # W4A4 on fp8 tensor cores (off by
                # default: GemmPolicy.fp8_w4a4_min_m), exact product then the scaling pass
                cases += (("w4a4_fp8", lambda: gemm_w4a4(xq4, xs4, w4, policy=FP8_W4A4),
                           m * k // 2 + wbytes(w4)),)  # fmt: skip
            for prov, fn, nbytes in cases:
                if only != [""] and prov not in only:
                    continue
                t = timed(fn)
                table.add(name, prov, shape, "int4" if "a16" not in prov else "bf16", t,
                          flops=flops, nbytes=nbytes + out_b, baseline=base,
                          baseline_name="cublas_bf16", copy_gbps=copy_gbps)  # fmt: skip
            print(f"{name} M={m} done", flush=True)
        report(table, out, notes)  # after every shape: a run cut short keeps its rows
    report(table, out, notes)


def cold_shape(table, name, n, k, ms, g, l2, copy_gbps, only, notes) -> None:
    """The decode providers of one shape with each call reading the next copy of its weight
    (CBQ_BENCH_COLD=1; the module docstring says why)."""

    def copies(make, nbytes):
        return [make() for _ in range(cold_copies(nbytes, l2))]

    bf16s = copies(lambda: bf16_weight(n, k, g), n * k * 2)
    f8s = copies(lambda: bf16_weight(n, k, g).to(torch.float8_e4m3fn).t(), n * k)
    quant = {}  # (bits, group size) -> copies of the served weight
    for bits, gs in ((4, None), (4, 128), (2, 128)):
        first = weight(n, k, bits, gs, g, canonical=False)[0]
        more = cold_copies(wbytes(first), l2) - 1
        quant[bits, gs] = [first, *(weight(n, k, bits, gs, g, canonical=False)[0]
                                    for _ in range(more))]  # fmt: skip

    int4packs = []
    try:
        int4packs = copies(lambda: int4pack_weight(n, k, g), n * k // 2)
    except (RuntimeError, AttributeError, TypeError) as exc:
        notes.append(f"- int4pack_mm {name}: not run ({str(exc).splitlines()[0][:80]})")
    notes.append(f"- {name} copies: bf16 {len(bf16s)}, fp8 {len(f8s)}, "
                 + ", ".join(f"{b}-bit g{gs or 'channel'} {len(c)}" for (b, gs), c in quant.items())
                 + f", int4pack {len(int4packs)}")  # fmt: skip
    one = torch.ones((), device="cuda")
    for m in ms:
        shape = f"{m}x{n}x{k}"
        flops, out_b = 2 * m * n * k, m * n * 2
        x = torch.randn(m, k, generator=g, device="cuda").to(torch.bfloat16)
        xq8, xs8 = act_quant(x, 8)
        xq4, xs4 = act_quant(x, 4)
        xf8 = x.to(torch.float8_e4m3fn)
        base = timed(Cycle(lambda w: F.linear(x, w), bf16s))
        table.add(name, "cublas_bf16", shape, "bf16", base, flops=flops,
                  nbytes=m * k * 2 + n * k * 2 + out_b, copy_gbps=copy_gbps)  # fmt: skip
        w4, w4g, w2g = quant[4, None], quant[4, 128], quant[2, 128]
        cases = [
            ("scaled_mm", lambda w: torch._scaled_mm(xf8, w, one, one, out_dtype=torch.bfloat16),
             f8s, m * k + n * k),
            ("w4a8", lambda w: gemm_w4a8(xq8, xs8, w), w4, m * k + wbytes(w4[0])),
            ("w4a8_g128", lambda w: gemm_w4a8(xq8, xs8, w), w4g, m * k + wbytes(w4g[0])),
            ("w4a4", lambda w: gemm_w4a4(xq4, xs4, w), w4, m * k // 2 + wbytes(w4[0])),
            ("w4a16_g128", lambda w: gemm_wonly(x, w), w4g, m * k * 2 + wbytes(w4g[0])),
            ("w2a16_g128", lambda w: gemm_wonly(x, w), w2g, m * k * 2 + wbytes(w2g[0])),
        ]  # fmt: skip
        if int4packs:
            cases.append(("int4pack_mm", lambda w: torch._weight_int4pack_mm(x, w[0], 128, w[1]),
                          int4packs, m * k * 2 + n * k // 2 + n * k // 32))  # fmt: skip
        for prov, fn, ws, nbytes in cases:
            if only != [""] and prov not in only:
                continue
            try:
                t = timed(Cycle(fn, ws))
            except RuntimeError as exc:  # e.g. fp8 where the GPU has none
                notes.append(f"- {prov} {shape}: not run ({str(exc).splitlines()[0][:80]})")
                continue
            table.add(name, prov, shape, "int4" if "a16" not in prov else "bf16", t,
                      flops=flops, nbytes=nbytes + out_b, baseline=base,
                      baseline_name="cublas_bf16", copy_gbps=copy_gbps)  # fmt: skip
        print(f"{name} M={m} cold done", flush=True)


def report(table, out, notes) -> None:
    columns = ("op", "provider", "shape", "p50_ms", "tflops", "gbps", "frac_copy_bw", "speedup")
    head = ["speedup: cuBLAS bf16 time / this time, same M, N, K, same process. Times: "
            "CUDA-graph replays (GPU time), median (p20, p80 in the CSV)."]  # fmt: skip
    write_report(table, out, "bench_gemm", "Quantized GEMMs", "benchmarks/bench_gemm.py", columns,
                 head + notes)  # fmt: skip


if __name__ == "__main__":
    main()
