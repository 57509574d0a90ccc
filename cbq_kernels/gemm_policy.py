"""The dispatch policy of the GEMMs (:class:`GemmPolicy`): which kernel serves which M, its
thresholds from the benchmark tables. Frozen and passed in (``policy=``), never a module
global that callers patch."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class GemmPolicy:
    """Which kernel serves which M: passed to the GEMMs (:data:`DEFAULT_POLICY` otherwise).

    decode_max_m: M up to which the CUDA decode kernel runs (csrc/gemm_decode.cu) when the
    weight has its layout; cuda_decode=False keeps the Triton kernel there. small_m: M up to
    which the Triton kernel takes its decode configurations and split-K, and up to which a
    weight kept in the decode layout alone (prepare_weight's layout "auto" on a GPU) runs the
    CUDA decode kernel on 16-row slices (larger M expand that layout). expand_min_m: M from
    which the integer GEMMs expand the 4-bit weight (and int4 activations) to an int8 scratch
    copy before the K loop. wonly_cublas_min_m: M from which the weight-only GEMM dequantizes
    to a scratch bf16 / fp16 weight and calls cuBLAS. From the H200 table
    (benchmarks/results/h200/bench_gemm_7a9193f.csv, DECISIONS.md): at M >= 1024 expansion wins
    everywhere (1.2-1.9x over unpacking in the K loop), at M = 256 it ties on 70B gate/up and
    the in-loop kernel is 0.2-0.4x cuBLAS on the smaller layers; the expansion costs one pass
    over the weight (131 us for 28672 x 8192 at 2.7 TB/s), so 64 is where it starts to pay."""

    decode_max_m: int = 16
    cuda_decode: bool = True
    small_m: int = 63
    expand_min_m: int = 64
    wonly_cublas_min_m: int = 64
    # W4A4 per channel, bf16 out, no bias: from this M on, both operands are expanded to fp8
    # e4m3 (int4 codes and weight codes minus zero point are exact there, and the fp32 sums
    # below 2^24) and cuBLAS' fp8 GEMM runs them: 1.44-1.78x cuBLAS bf16 on the H200 at M >=
    # 2048 against 1.35-1.58x for the int8 path (benchmarks/results/h200/
    # bench_w4a4_fp8_053a7b8.txt, unit scales, exact). 0 (the default) switches it off: its
    # GPU test failed (e2455c7, f30d25d, 0d500ea, 7a9193f), at 7a9193f traced to the test's
    # reference (gemm_ref leaves ~1e-14 where the integer sum is 0; DECISIONS, "W4A4 prefill
    # on fp8"). The path takes the unit-scale fp32 product and scales it in a second pass
    # (launch_w4a4_fp8): 1.14-1.79x bf16 at M >= 2048 against 1.14-1.58x for the int8 path
    # (bench_gemm.csv at 7a9193f, `w4a4_fp8`); on from a measured M once the corrected test
    # passes on the GPU
    fp8_w4a4_min_m: int = 0
    # a weight kept in the decode layout alone, decode_max_m < M <= tiles_max_m: the Triton
    # kernel that reads that layout once for all M rows (gemm_decode.launch_triton) instead of
    # the CUDA kernel once per 16-row slice; 0 (the default until the H200 compares them at M
    # = 32, bench_gemm's *_tiles rows) keeps the slices. At most 64 (its row tile)
    tiles_max_m: int = 0
    # 16-row m-tiles per launch of the CUDA decode kernel where it runs M > 16 (a weight kept
    # in the decode layout alone, M <= small_m): 1 launches it per 16-row slice, each reading
    # the whole weight (M = 32 costs 2x M = 16: 70b gate/up W4A8 133 vs 67 us, bench_gemm.csv
    # at 7a9193f); 2 launches 32-row slices whose two m-tiles share each weight chunk
    # (csrc/gemm_decode.cu, MT = 2). 2 (the default) since bench_gemm timed both (H100,
    # b9bb17a, benchmarks/results/h100/bench_gemm_mt2_pdl_b9bb17a.md): at M = 32 every row was
    # faster with 2, 1.1-1.9x (70B gate/up W4A8 149 -> 93 us, W4A4 136 -> 73; 7B down W4A8
    # 38.5 -> 26.6); its GPU tests passed at f098880
    decode_mtiles: int = 2
    # launch the CUDA decode kernel with programmatic dependent launch (compute capability
    # 9.0): its weight prefetch (the cp.async ring and the group scales: nothing a kernel
    # writes) overlaps the previous kernel in the stream, and griddepcontrol.wait holds back
    # every read of x and write of the output until that kernel has finished. Aimed at the ~7
    # us floor of the small decode GEMMs (7B shapes: launch and first DRAM round trips,
    # DECISIONS "Decode variants of stop 27"), as vLLM and TensorRT-LLM chain their decode
    # kernels. True (the default) since bench_gemm timed it (H100, b9bb17a): at M = 1 every
    # row was faster with it, 7B shapes 9-16% (q/k/v/o W4A8 7.95 -> 6.84 us), 70B gate/up
    # 1-7.5%; M = 4 / 16 not timed (the overlap does not depend on M); bit-exact against the
    # plain launch eagerly and in graphs (its GPU test, f098880). A device below compute
    # capability 9.0 launches without it (csrc/gemm_decode.cu)
    decode_pdl: bool = True
    # the Triton kernel in front of a decode GEMM in a served step launched with programmatic
    # dependent launch too, letting the GEMM launch at its start (cbq_kernels.pdl): the
    # per-token activation quantizer of an integer GEMM (act_quant, from
    # cbq_kernels.gemm.linear) and, in a weight-only model, the RMSNorm kernel in front of
    # q / k / v and gate / up (cbq_ptq.serve.KernelRMSNorm; serve.set_policy hands it the
    # policy). The decode GEMM's weight prefetch (decode_pdl) then overlaps that kernel, where
    # today it waits for its grid to finish (a 7B W4A8 step: quantizer -> GEMM four times per
    # block; the SwiGLU quantizer right after the gate / up GEMM, which triggers after its K
    # loop). Bit-exact by construction (the kernel waits for its predecessor before any load;
    # the GEMM reads its output after its own griddepcontrol.wait, which returns when the
    # kernel has finished). Its GPU tests passed (H100, 2e7421f: bit-equal chains eagerly and
    # in a graph); False until bench_generate times it (`gpu_lease.sh OUT qpdl`)
    prologue_pdl: bool = False
    # from this M on, the int8 x int8 GEMM after expansion (per-channel weights, no split)
    # runs the persistent kernel with TMA descriptor loads (cbq_kernels.gemm_tma; the module
    # says why) instead of the pointer kernel: the same output bits (GPU tests passed, H100,
    # 2e7421f and 115b297). 1024: bench_gemm timed both at every prefill M on all 10 layer
    # shapes (H100; benchmarks/results/h100/bench_gemm.csv, rows w4a8_tma / w4a8_ptr,
    # w4a4_tma / w4a4_ptr): W4A8 faster with TMA on 10 of 10 shapes at M = 1024 (70b gate/up
    # 0.785 -> 0.562 ms, 70b down 0.667 -> 0.534, 7b down 0.118 -> 0.110) and at 2048, 4096,
    # 8192; W4A4 on 8 of 10 at 1024 (the 2 others 1.4% slower) and 29 of 30 above; at M = 256
    # 4 of 10 each, at 64 none. 0 switches it off
    tma_min_m: int = 1024
    # gluon_min_m <= M <= gluon_max_m: that int8 GEMM after expansion runs the Gluon kernel
    # instead (cbq_kernels.gemm_gluon.gemm_int8_gluon: its MMAs kept in flight, which
    # Triton's own int8 dots never are; the same epilogue, so the same bits: its GPU tests
    # passed, H100, f8d3562), where Gluon and a Hopper GPU are there (else the TMA / pointer
    # kernel as above). 1024..4096 from the served W4A8 timed both ways (H100, f8d3562,
    # benchmarks/results/h100/bench_gemm_prefill_served_gluon_2lvl_f8d3562_*.md, rows
    # w4a8_gluon against w4a8, 70b gate/up, 70b down, 7b gate/up): Gluon faster on 3 of 3 at
    # M = 1024 (5-9%) and 2048 (1-9%), 2 of 3 at 4096 (70b gate/up 1% slower), 1 of 3 at 8192
    # (7b gate/up 9% and 70b gate/up 3.5% slower). Session 14 timed M = 256 / 512 / 1024 on
    # seven shapes (H200, b006aa3, benchmarks/results/h200/bench_gemm_gluon_low_b006aa3.md):
    # whether Gluon wins there follows M x N (its tiles are 128 x 128 and larger, so a small
    # output leaves SMs idle): faster on every row with M x N >= 2^22 (M = 512: 70b gate/up
    # 415 -> 355 us, 70b down 394 -> 324, 70b q/o 114 -> 97, 13b gate/up 134 -> 128, 7b gate/up
    # 86 -> 83; M = 256 70b gate/up 295 -> 262); below 2^22 it won 3 rows (70b down M = 256
    # 292 -> 258, 7b and 13b gate/up at 256 by 6-11%) and lost all 5 others (7b down 74 -> 89
    # and 7b q/k/v/o 30 -> 37 at M = 512, 70b q/o 83 -> 99 at 256, 7b down and q/k/v/o at 256),
    # so gluon_min_m 256 with gluon_min_mn 2^22 (M x N at least that: no row lost). 0: off
    gluon_min_m: int = 256
    gluon_max_m: int = 4096
    gluon_min_mn: int = 1 << 22

    def __post_init__(self) -> None:
        for name in BOOL_FIELDS:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"GemmPolicy.{name} must be a bool, "
                                 f"got {getattr(self, name)!r}")  # fmt: skip
        if self.decode_mtiles not in (1, 2) or isinstance(self.decode_mtiles, bool):
            raise ValueError(f"GemmPolicy.decode_mtiles must be 1 or 2, "
                             f"got {self.decode_mtiles!r}")  # fmt: skip
        for name in INT_FIELDS:
            if name == "decode_mtiles":  # 1 or 2, checked above
                continue
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"GemmPolicy.{name} must be a non-negative int, got {v!r}")
        if self.decode_max_m > 16:
            raise ValueError(f"GemmPolicy.decode_max_m must be <= 16 (one MMA row tile), "
                             f"got {self.decode_max_m}")  # fmt: skip
        if self.gluon_min_m > self.gluon_max_m:
            raise ValueError(f"GemmPolicy.gluon_min_m ({self.gluon_min_m}) must be <= "
                             f"gluon_max_m ({self.gluon_max_m}); gluon_min_m=0 switches the "
                             f"Gluon kernel off")  # fmt: skip
        if self.tiles_max_m > 64:
            raise ValueError(f"GemmPolicy.tiles_max_m must be <= 64 (the kernel's row tile), "
                             f"got {self.tiles_max_m}")  # fmt: skip


# The fields by declared type (one list for the checks above and for the custom ops, which
# carry a policy as ints: cbq_kernels.gemm)
BOOL_FIELDS = tuple(f.name for f in dataclasses.fields(GemmPolicy) if f.type == "bool")
INT_FIELDS = tuple(f.name for f in dataclasses.fields(GemmPolicy) if f.type == "int")

DEFAULT_POLICY = GemmPolicy()
