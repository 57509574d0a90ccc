#!/usr/bin/env bash
# One lease's GPU work in three calls (the machine goes back after ~30 s idle, so the calls
# follow each other at once; the SmolLM2 GGUF travels in two halves, one per call):
#   bash scripts/gpu_lease.sh OUT alone   # carry .carry/{a,whl,shared,vxpf} .cbq_commit:
#       GGUF first half; build; Nsight Compute on the Hadamard kernels; the decode variants
#       of CBQ_VARIANTS beside main; bench_generate on the 7B shape (timings with the GPU to themselves)
#   bash scripts/gpu_lease.sh OUT table   # carry .carry/{b,whl,shared} .cbq_commit:
#       second half, the PTQ table runs (CBQ_JOBS_A; the whole CUDA test suite too where
#       CBQ_GPU_TESTS=1) in the background, compute-sanitizer on the Hadamard kernels, the new
#       served-model GPU tests, then wait
#   bash scripts/gpu_lease.sh OUT gemm    # carry .carry/{a,shared} .cbq_commit: GGUF first half;
#       build; the decode kernel's GPU tests; bench_gemm at the decode M (served policy rows,
#       every shape; CBQ_BENCH_MS overrides) with the GPU to itself; call `table` right after
#   bash scripts/gpu_lease.sh OUT wait    # wait for the table, collect
#   bash scripts/gpu_lease.sh OUT one     # carry .carry/shared .cbq_commit: all but the table,
#       in one call (when the machine is scarce: no second call needed)
#   bash scripts/gpu_lease.sh OUT pending # carry .carry/shared .cbq_commit: the GPU tests and
#       GEMM timings of what main holds untested (the stage's comment lists them); then
#   bash scripts/gpu_lease.sh OUT pending_gen   # carry .cbq_commit: bench_generate with the
#       norms fused, + SwiGLU (fuse_swiglu), + the RoPE kernel (fuse_rope)
#   bash scripts/gpu_lease.sh OUT epi     # carry .carry/shared .cbq_commit: the four-column
#       split-K epilogue's tests and timings, bench_generate at the defaults (batch 1 and 32)
#   bash scripts/gpu_lease.sh OUT cold    # carry .cbq_commit: bench_gemm's decode rows with
#       L2-cold weights (CBQ_BENCH_COLD=1) and hot beside them, M = 1 / 16
#   bash scripts/gpu_lease.sh OUT t13a / t13b / t14s / qpdl / check14 / compiled / solo / split /
#       s12 / abw / gtable / blk / pol / s15 / xpf / fin:
#       issue 13's table in two parts, issue 14's SmolLM2 rows and checks, GemmPolicy.
#       prologue_pdl and the RMSNorm kernel, issue 14's greedy check with the reference's own
#       agreement and the 70B rows, the compiled step, one bounded call for scarce machines
#       (each stage's comment: its carry)
# Everything under OUT ends in one archive (the device returns at most 8 files a call).
set -uo pipefail
out=${1:?usage: gpu_lease.sh OUT alone|gemm|table|wait|one|pending|pending_gen|epi|cold|t13a|t13b|t14s|qpdl|check14|compiled|solo|split|s12|abw|gtable|blk|pol|s15|xpf|fin}; stage=${2:?usage: gpu_lease.sh OUT alone|gemm|table|wait|one|pending|pending_gen|epi|cold|t13a|t13b|t14s|qpdl|check14|compiled|solo|split|s12|abw|gtable|blk|pol|s15|xpf|fin}
. "$(dirname "$0")/out_check.sh"
mkdir -p "$out"; cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
served=w4a8,w4a8_g128,w4a4,w4a16_g128,w2a16_g128,int4pack_mm  # bench_gemm's served kernels + peer
pack() { tar czf /tmp/lease_$stage.tgz -C "$out" . && rm -rf "${out:?}"/* && mv /tmp/lease_$stage.tgz "$out/"; ls -la "$out"; }
environment() {  # the carried data, the commit, and GPU / versions into $out/environment.txt
  export CBQ_MODELS_DIR=$PWD/.carry/shared/models CBQ_DATA_DIR=$PWD/.carry/shared/data
  [ -f .cbq_commit ] && export CBQ_COMMIT=$(cat .cbq_commit)
  { nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem --format=csv,noheader
    python3 -c "import sys, torch, triton, transformers; print('python', sys.version.split()[0], \
'| torch', torch.__version__, '| triton', triton.__version__, '| transformers', transformers.__version__)"
    echo "commit ${CBQ_COMMIT:-unknown}"; } | tee "$out/environment.txt"
}
gen7b() {  # bench_generate, 7B-shaped, batch 1, prompt 2048: captured step and prefill, fused
  # projections, their norms and the SwiGLU (CBQ_GEN_FUSE=3, bench_generate's default; 2: no
  # SwiGLU, 1: projections only), the RoPE kernel (CBQ_GEN_ROPE, default 1); at most CBQ_GEN_S
  # (else $1) seconds
  CBQ_GEN_MODELS=llama2-7b CBQ_GEN_BATCHES=${CBQ_GEN_BATCHES:-1} CBQ_GEN_PROMPTS=2048 CBQ_GEN_NEW=64 \
    CBQ_GEN_COMPILE=graph CBQ_GEN_PREFILL=graph CBQ_GEN_FUSE=${CBQ_GEN_FUSE:-3} \
    CBQ_GEN_SETTINGS=${CBQ_GEN_SETTINGS:-bf16,W4A8,W4A4,W4A16g128} timeout ${CBQ_GEN_S:-$1} \
    python3 benchmarks/bench_generate.py --out "$out/gen" 2>&1 | grep -v Warning | cut -c1-240 | tail -8
}
split_kernels() {  # the experimental prefill kernels (cbq_kernels.gemm_gluon: the W4A8
  # split-nibble kernel with MMAs in flight, W4A8 per channel and two-level grouped,
  # int8 GEMM; cbq_kernels.gemm_tma4), written without a GPU (2026-12-06): build, their GPU
  # tests (every configuration exact, the int8 TMA kernel's bits; the Gluon ones first, at
  # most CBQ_SPLIT_TEST_S = 240 s), then bench_gemm at M = $1 on shapes $2, kernels
  # CBQ_SPLIT_KERNELS (default: the served W4A8 / W4A8 g128 / W4A4 beside the Gluon ones; cuBLAS
  # bf16 / fp8 in every row) until the call has run $3 s (at least 60 s of it)
  # CBQ_SPLIT_TESTS: the tests instead (pytest node ids)
  # CBQ_SPLIT_BUILD=0: no CUDA extension (the Gluon kernels do not need it; the served rows
  # then run from the canonical layout); CBQ_SPLIT_TMA4=0: not gemm_tma4's test (six
  # autotuner configurations, two forms: the slowest to compile)
  mkdir -p "$out/g"
  [ "${CBQ_SPLIT_BUILD:-1}" = 1 ] && bash scripts/gpu_gemm.sh "$out/g" build
  tests=${CBQ_SPLIT_TESTS:-"tests/kernels/test_gemm_cuda.py::test_gluon_split_kernel_every_config
    tests/kernels/test_gemm_cuda.py::test_gluon_two_level_kernel_every_config
    tests/kernels/test_gemm_cuda.py::test_gluon_int8_kernel_every_config"}
  [ "${CBQ_SPLIT_TMA4:-1}" = 1 ] && \
    tests="$tests tests/kernels/test_gemm_cuda.py::test_split_nibble_kernel_every_config"
  timeout ${CBQ_SPLIT_TEST_S:-240} python3 -m pytest -q -p no:cacheprovider $tests 2>&1 \
    | tee "$out/g/pytest_split.txt" | tail -3
  CBQ_BENCH_MS=$1 CBQ_BENCH_SHAPES=$2 \
    CBQ_BENCH_KERNELS=${CBQ_SPLIT_KERNELS:-w4a8,w4a8_split_gluon,w4a8_2lvl_gluon,w4a8_g128,w4a16_g128,w4a4,int8_gluon} \
    timeout $(( $3 - SECONDS > 60 ? $3 - SECONDS : 60 )) python3 benchmarks/bench_gemm.py \
    --out "$out/split" 2>&1 | grep -v "done$" | tail -2
}
copy_tree() {  # DIR: a copy of this tree's sources, tests and benchmarks, without the built
  # extension (for a variant built beside this tree)
  rm -rf "$1"; mkdir -p "$1"
  cp -r cbq_kernels csrc benchmarks tests setup.py CMakeLists.txt pyproject.toml README.md .cbq_commit "$1"/
  rm -f "$1"/cbq_kernels/_C*.so
}
build_tree() {  # DIR NAME: build DIR's extension (system g++, sm_90a) into $out/NAME_build.log;
  # the caller runs it in the background beside gpu_gemm.sh's build of this tree, then waits
  (cd "$1" && CXX=/usr/bin/g++ CUDAHOSTCXX=/usr/bin/g++ CBQ_CUDA_ARCHS=90a CBQ_REQUIRE_CUDA=1 \
    python3 setup.py build_ext --inplace > "$out/$2_build.log" 2>&1 || tail -5 "$out/$2_build.log")
}
gemm_suite() {  # SECONDS: the exact-int32 GPU tests of every GEMM (the whole of
  # test_gemm_decode_cuda.py and test_gemm_cuda.py: every kernel and autotuner configuration)
  timeout $1 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_gemm_decode_cuda.py \
    tests/kernels/test_gemm_cuda.py 2>&1 | tee "$out/g/pytest_gemm.txt" | tail -3
}
policy_rows() {  # the served W4A8 / W4A4 at M = CBQ_BENCH_MS (256 .. 2048) beside the TMA and
  # Gluon kernels and the two-level rows, every shape, until CBQ_STAGE_S ($1) seconds
  CBQ_BENCH_MS=${CBQ_BENCH_MS:-256,512,1024,2048} CBQ_BENCH_KERNELS=w4a8,w4a4,w4a8_gluon,w4a8_tma,w4a8_g128_2lvl \
    timeout $(( ${CBQ_STAGE_S:-$1} - SECONDS > 30 ? ${CBQ_STAGE_S:-$1} - SECONDS : 30 )) \
    python3 benchmarks/bench_gemm.py --out "$out/policy" 2>&1 | grep -v "done$" | tail -2
}
case $stage in
  alone)
    CBQ_TEST_SECONDS=0 bash scripts/gpu_ptq.sh "$out/p" gguf-a > /dev/null 2>&1
    cat "$out/p/environment.txt"
    bash scripts/gpu_gemm.sh "$out/g" build hncu
    if [ -n "${CBQ_VARIANTS:-}" ]; then  # e.g. "vepi vxpf" (carry .carry/vepi .carry/vxpf)
      timeout ${CBQ_VARIANTS_S:-300} bash scripts/gpu_variants.sh "$out/v" "$CBQ_VARIANTS" \
        --ms 1,16,32 --shapes 7b_qkvo,7b_gate_up,70b_gate_up 2>&1 | tail -30
    fi
    gen7b 170
    pack ;;
  table)
    mkdir -p "$out/g"
    CBQ_GPU_TESTS=${CBQ_GPU_TESTS:-0} bash scripts/gpu_ptq.sh "$out/p" start 2>&1 | tail -15
    while pgrep -f "setup.py build_ext" > /dev/null; do sleep 5; done
    [ "${CBQ_HSANITIZE:-1}" = 1 ] && bash scripts/gpu_gemm.sh "$out/g" hsanitize
    # the served model's GPU tests written since the last lease (DecodeSession, captured
    # prefill, compiled + fused step)
    timeout 200 python3 -m pytest -q -p no:cacheprovider -rs tests/ptq/test_serve_cuda.py \
      2>&1 | tee "$out/g/pytest_serve.txt" | tail -6
    bash scripts/gpu_ptq.sh "$out/p" wait ${CBQ_WAIT_S:-300} 2>&1 | tail -25
    pack ;;
  one)  # everything but the PTQ table in one call (no GGUF): build, Nsight Compute on the
    # Hadamard kernels, the served-model GPU tests, compute-sanitizer, bench_generate
    environment
    bash scripts/gpu_gemm.sh "$out/g" build hncu
    timeout 200 python3 -m pytest -q -p no:cacheprovider -rs tests/ptq/test_serve_cuda.py \
      2>&1 | tee "$out/g/pytest_serve.txt" | tail -6
    # the decode kernel's untimed policies: two m-tiles at M = 32 (batch 32), PDL at M = 1
    CBQ_BENCH_MS=1,32 CBQ_BENCH_SHAPES=7b_qkvo,7b_gate_up,7b_down,70b_gate_up timeout 150 \
      python3 benchmarks/bench_gemm.py --out "$out/gemm" 2>&1 | grep -v "done$" | tail -3
    gen7b 150
    timeout 120 bash scripts/gpu_gemm.sh "$out/g" hsanitize
    pack ;;
  gemm)  # the decode kernel alone on the GPU: its tests, then its benchmark rows
    CBQ_TEST_SECONDS=0 bash scripts/gpu_ptq.sh "$out/p" gguf-a > /dev/null 2>&1
    cat "$out/p/environment.txt"
    [ -f .cbq_commit ] && export CBQ_COMMIT=$(cat .cbq_commit)
    bash scripts/gpu_gemm.sh "$out/g" build
    timeout ${CBQ_DECODE_TEST_S:-150} python3 -m pytest -q -p no:cacheprovider \
      tests/kernels/test_gemm_decode_cuda.py 2>&1 | tee "$out/g/pytest_decode.txt" | tail -4
    CBQ_BENCH_MS=${CBQ_BENCH_MS:-1,4,16,32} \
      CBQ_BENCH_KERNELS=w4a8,w4a8_g128,w4a4,w4a16_g128,w2a16_g128,int4pack_mm \
      timeout ${CBQ_BENCH_S:-210} python3 benchmarks/bench_gemm.py --out "$out/gemm" 2>&1 \
      | grep -v "done$" | tail -3
    # K splits at M = 16 / 32 (default_splits' model; the decode-epilogue variant's cost is
    # the split reduction: scripts/gpu_variants.sh compares the two)
    timeout ${CBQ_SWEEP_S:-60} python3 benchmarks/sweep_decode.py --ms 16,32 \
      --shapes 7b_qkvo,7b_gate_up,70b_gate_up > "$out/g/sweep_decode.txt" 2>&1
    tail -20 "$out/g/sweep_decode.txt"
    pack ;;
  wait)
    bash scripts/gpu_ptq.sh "$out/p" wait ${CBQ_WAIT_S:-540} 2>&1 | tail -40
    pack ;;
  pending)  # carry .carry/shared .cbq_commit: what main holds untested on a GPU (2026-12-06):
    # the Hadamard op's API routing (register kernels by default since 4e981ab) and the rotated
    # pipeline; the SwiGLU quantizer and fuse_swiglu; the RoPE kernel and fuse_rope; the split
    # model's M = 16 / 32 picks (bench_gemm rows on every shape); then call pending_gen
    environment
    bash scripts/gpu_gemm.sh "$out/g" build
    timeout 300 python3 -m pytest -q -p no:cacheprovider -rs tests/kernels/test_hadamard_quant_cuda.py \
      tests/kernels/test_act_quant_cuda.py tests/kernels/test_rope_cuda.py \
      "tests/ptq/test_pipeline_cuda.py::test_rotation_on_the_gpu_keeps_the_logits_and_quantizes" \
      tests/ptq/test_serve_cuda.py 2>&1 | tee "$out/g/pytest_pending.txt" | tail -4
    CBQ_BENCH_MS=16,32 CBQ_BENCH_KERNELS=w4a8,w4a4,w4a16_g128,w2a16_g128 timeout 90 \
      python3 benchmarks/bench_gemm.py --out "$out/gemm" 2>&1 | grep -v "done$" | tail -2
    pack ;;
  pending_gen)  # right after `pending` (the build is still there; a fresh machine rebuilds):
    # the norms alone, + SwiGLU, + RoPE kernel (bf16 too), each in its own processes
    [ -f .cbq_commit ] && export CBQ_COMMIT=$(cat .cbq_commit)
    bash scripts/gpu_gemm.sh "$out/g" build
    for f in 2 3; do CBQ_GEN_ROPE=0 CBQ_GEN_FUSE=$f CBQ_GEN_SETTINGS=bf16,W4A8,W4A4 gen7b 120; mv "$out/gen" "$out/gen_f$f"; done
    CBQ_GEN_ROPE=1 CBQ_GEN_FUSE=3 CBQ_GEN_SETTINGS=bf16,W4A8,W4A4 gen7b 120; mv "$out/gen" "$out/gen_f3_rope"
    pack ;;
  epi)  # carry .carry/shared .cbq_commit: the decode kernel with the four-column split-K
    # epilogue (CBQ_DEC_EPI 1) and the refitted split model: its GPU tests, the 70B gate/up
    # split sweep at M = 16 (S = 1 must match the one-column kernel's 52.7 us), bench_gemm at
    # M = 16 / 32, then bench_generate at load_for_generation's defaults, batch 1 and 32
    environment
    bash scripts/gpu_gemm.sh "$out/g" build
    timeout 90 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_gemm_decode_cuda.py \
      2>&1 | tee "$out/g/pytest_decode.txt" | tail -2
    timeout 60 python3 benchmarks/sweep_decode.py --ms 16 --shapes 70b_gate_up,7b_qkvo \
      > "$out/g/sweep_decode.txt" 2>&1; tail -8 "$out/g/sweep_decode.txt"
    CBQ_BENCH_MS=16,32 CBQ_BENCH_KERNELS=w4a8,w4a4,w4a16_g128,w2a16_g128 timeout 100 \
      python3 benchmarks/bench_gemm.py --out "$out/gemm" 2>&1 | grep -v "done$" | tail -2
    CBQ_GEN_SETTINGS=bf16,W4A8,W4A4,W4A16g128,W2A16g128 gen7b 130; mv "$out/gen" "$out/gen_b1"
    CBQ_GEN_BATCHES=32 CBQ_GEN_SETTINGS=bf16,W4A8,W4A4,W4A16g128,W2A16g128 gen7b 170
    mv "$out/gen" "$out/gen_b32"
    pack ;;
  cold)  # carry .cbq_commit: bench_gemm's decode rows with L2-cold weights
    # (CBQ_BENCH_COLD=1; the hot rows of the same shapes beside them), every shape, M = 1 / 16
    [ -f .cbq_commit ] && export CBQ_COMMIT=$(cat .cbq_commit)
    bash scripts/gpu_gemm.sh "$out/g" build
    CBQ_BENCH_COLD=1 CBQ_BENCH_MS=${CBQ_BENCH_MS:-1,16} timeout 240 \
      python3 benchmarks/bench_gemm.py --out "$out/cold" 2>&1 | grep -v "done$" | tail -2
    CBQ_BENCH_MS=${CBQ_BENCH_MS:-1,16} \
      CBQ_BENCH_KERNELS=w4a8,w4a8_g128,w4a4,w4a16_g128,w2a16_g128,int4pack_mm,scaled_mm \
      timeout 240 python3 benchmarks/bench_gemm.py --out "$out/hot" 2>&1 | grep -v "done$" | tail -2
    pack ;;
  t13a)  # carry .carry/{a,shared,whl} .cbq_commit: issue 13's table, part 1, and the GGUF's
    # first half (kept in /tmp for t14s, the next call): build; the exact-int32 GPU tests of
    # every GEMM (the CUDA decode kernel; the Triton kernels at every autotuner
    # configuration); Nsight Compute on the decode kernel at 1 x 28672 x 8192; bench_gemm at
    # the decode M on every shape (served kernels and peers) with the GPU to itself
    environment
    cp .carry/a/gguf.part.aa /tmp/
    bash scripts/gpu_gemm.sh "$out/g" build
    gemm_suite 280
    timeout 100 bash scripts/gpu_gemm.sh "$out/g" ncu
    CBQ_BENCH_MS=1,4,16,32 CBQ_BENCH_KERNELS=$served timeout ${CBQ_BENCH_S:-220} \
      python3 benchmarks/bench_gemm.py --out "$out/decode" 2>&1 | grep -v "done$" | tail -2
    pack ;;
  t13b)  # carry .cbq_commit: issue 13's table, part 2: Nsight Compute on the prefill path
    # (2048 x 28672 x 8192: cuBLAS bf16, fp8, the served W4A8 / W4A8 g128 / W4A16 g128 / W4A4
    # calls' kernels), then bench_gemm at the prefill M (64 .. 8192) on every shape, served
    # kernels and peers (the build of an earlier stage when warm); with .carry/a carried, the
    # GGUF's first half is kept in /tmp for `check14` right after
    environment
    cp .carry/a/gguf.part.aa /tmp/ 2>/dev/null
    bash scripts/gpu_gemm.sh "$out/g" build
    # the TMA kernel's GPU test first (exact at each configuration; the served call's bits)
    # (CBQ_T13B_K="" runs the whole file: every Triton kernel at every autotuner configuration)
    timeout ${CBQ_T13B_TEST_S:-150} python3 -m pytest -q -p no:cacheprovider \
      tests/kernels/test_gemm_cuda.py -k "${CBQ_T13B_K-tma}" 2>&1 | tee "$out/g/pytest_tma.txt" \
      | tail -3
    [ "${CBQ_PNCU:-1}" = 1 ] && timeout 120 bash scripts/gpu_gemm.sh "$out/g" pncu
    CBQ_BENCH_MS=${CBQ_BENCH_MS:-64,256,1024,2048,4096,8192} \
      CBQ_BENCH_KERNELS=$served,w4a8_inloop,w4a4_fp8,w4a8_tma,w4a4_tma,w4a8_ptr,w4a4_ptr,w4a8_split,w4a4_split8,int8_gluon,int8_tma \
      timeout ${CBQ_BENCH_S:-540} python3 benchmarks/bench_gemm.py --out "$out/prefill" 2>&1 \
      | grep -v "done$" | tail -2
    pack ;;
  t14s)  # carry .carry/{b,shared,whl} .cbq_commit, right after t13a (the GGUF's first half in
    # /tmp): issue 14 on SmolLM2-135M quantized by CBQ (CBQ_GEN_STEPS optimizer steps per
    # window, a short schedule: the served model's structure is the full recipe's, its
    # activation quantizer and rotation included), the four settings side by side; then its
    # generation speed, the correctness checks (scripts/check_generate.py) and the served
    # model's GPU tests at the GPU defaults (SwiGLU and RoPE fused)
    environment
    d=/tmp/cbqcache/smollm2-135m; mkdir -p $d
    cat /tmp/gguf.part.aa .carry/b/gguf.part.ab > $d/SmolLM2-135M-Instruct.Q4_1.gguf || exit 3
    export CBQ_CACHE=/tmp/cbqcache
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .carry/whl/*.whl && export PYTHONPATH=/tmp/site
    bash scripts/gpu_gemm.sh "$out/g" build
    python3 -c "from cbq_ptq.models import resolve; print(resolve('smollm2-135m'))" 2>&1 | tail -1
    sets=${CBQ_GEN_SMOL:-W4A8 W4A4 W4A16g64 W2A16g64}
    for s in $sets; do
      python3 -m cbq_ptq.cli quantize --model smollm2-135m --setting $s --method cbq \
        --steps ${CBQ_GEN_STEPS:-16} --eval-windows 8 --out /tmp/smol/$s \
        > "$out/quantize_$s.log" 2>&1 < /dev/null &
    done
    # the served model's GPU tests meanwhile (correctness only: nothing here is timed)
    timeout 200 python3 -m pytest -q -p no:cacheprovider -rs tests/ptq/test_serve_cuda.py \
      2>&1 | tee "$out/pytest_serve.txt" | tail -3
    wait; for s in $sets; do tail -n 1 "$out/quantize_$s.log"; done
    # generation speed with the GPU to itself: the bf16 base once, then each setting
    CBQ_GEN_MODELS=none CBQ_GEN_BATCHES=1,8,32 CBQ_GEN_PROMPTS=512,2048 CBQ_GEN_NEW=256 \
      CBQ_GEN_COMPILE=graph CBQ_GEN_PREFILL=graph timeout ${CBQ_GEN_S:-270} \
      python3 benchmarks/bench_generate.py --saved $(for s in $sets; do echo /tmp/smol/$s/model; done) \
      --out "$out/gen_smol" 2>&1 | grep -v Warning | grep -v "^{" | cut -c1-200 | tail -6
    for c in "W4A16g64 bfloat16" "W4A16g64 float32" "W4A8 bfloat16"; do
      set -- $c
      timeout 100 python3 scripts/check_generate.py /tmp/smol/$1/model --dtype $2 \
        --out "$out/check_generate_$1_$2.json" 2>&1 | grep -v Warning | tail -3
    done
    pack ;;
  qpdl)  # carry .carry/{a,shared} .cbq_commit: GemmPolicy.prologue_pdl (the activation
    # quantizer / RMSNorm kernel launched with PDL, triggering the decode GEMM at its start)
    # and the RMSNorm kernel: their GPU tests, then bench_generate at batch 1 at the defaults
    # (with a per-kernel profile) and with prologue_pdl (each
    # setting in its own process); the GGUF's first half kept in /tmp for `check14`
    environment
    cp .carry/a/gguf.part.aa /tmp/ 2>/dev/null
    bash scripts/gpu_gemm.sh "$out/g" build
    timeout 150 python3 -m pytest -q -p no:cacheprovider \
      "tests/kernels/test_act_quant_cuda.py::test_pdl_launch_gives_the_same_bits" \
      "tests/kernels/test_gemm_decode_cuda.py::test_prologue_launched_with_pdl_gives_the_same_bits" \
      tests/kernels/test_rmsnorm_cuda.py 2>&1 | tee "$out/g/pytest_qpdl.txt" | tail -2
    g() { CBQ_GEN_MODELS=llama2-7b CBQ_GEN_BATCHES=${CBQ_GEN_BATCHES:-1} CBQ_GEN_PROMPTS=512,2048 \
      CBQ_GEN_NEW=256 CBQ_GEN_PREFILL=graph timeout $1 python3 benchmarks/bench_generate.py \
      --out "$out/$2" 2>&1 | grep -v Warning | grep -v "^{" | cut -c1-200 | tail -3; }
    # the defaults (the RMSNorm kernel for every setting now), with a per-kernel profile; with
    # prologue_pdl (session 8's 9252d9d rows, same GPU kind, are the ones without the norm
    # kernel)
    CBQ_GEN_PROFILE="$out/profile" CBQ_GEN_COMPILE=graph \
      CBQ_GEN_SETTINGS=bf16,W4A8,W4A4,W4A16g128 g 220 gen_plain
    CBQ_GEN_COMPILE=graph CBQ_GEN_POLICY='{"prologue_pdl": true}' \
      CBQ_GEN_SETTINGS=W4A8,W4A4,W4A16g128 g 140 gen_qpdl
    pack ;;
  solo)  # carry .cbq_commit: one call when machines are scarce, bounded by CBQ_STAGE_S
    # seconds (2026-12-06, session 10's list): split_kernels on 70b and 7b gate/up at M = 1024,
    # 2048, 8192 in about half the call; then bench_generate at batch 1 with
    # GemmPolicy.prologue_pdl against the defaults in what is left
    stage_s=${CBQ_STAGE_S:-550}
    environment
    split_kernels 1024,2048,8192 ${CBQ_BENCH_SHAPES:-70b_gate_up,7b_gate_up} $(( stage_s / 2 ))
    left=$(( stage_s - 15 - SECONDS ))
    if [ $left -gt 90 ]; then
      for pol in '{}' '{"prologue_pdl": true}'; do
        CBQ_GEN_MODELS=llama2-7b CBQ_GEN_BATCHES=1 CBQ_GEN_PROMPTS=512 CBQ_GEN_NEW=128 \
          CBQ_GEN_PREFILL=graph CBQ_GEN_COMPILE=graph CBQ_GEN_POLICY="$pol" \
          CBQ_GEN_SETTINGS=W4A8 timeout $(( left / 2 )) python3 benchmarks/bench_generate.py \
          --out "$out/gen_pdl_$([ "$pol" = '{}' ] && echo off || echo on)" 2>&1 \
          | grep -v Warning | grep -v "^{" | cut -c1-200 | tail -2
      done
    fi
    pack ;;
  s12)  # carry .cbq_commit (2026-12-06, session 12, when the decode layout had scale words,
    # since reverted): the decode GPU tests (at most CBQ_DECODE_TEST_S = 100 s), bench_gemm's
    # grouped decode rows at M = 1, 4, 16 on the 70B and 7B shapes (at most CBQ_BENCH_S = 130
    # s), then split_kernels on the build already made, the call bounded by CBQ_STAGE_S (540)
    environment
    bash scripts/gpu_gemm.sh "$out/g" build
    timeout ${CBQ_DECODE_TEST_S:-100} python3 -m pytest -q -p no:cacheprovider -x \
      tests/kernels/test_gemm_decode_cuda.py 2>&1 | tee "$out/g/pytest_decode.txt" | tail -4
    CBQ_BENCH_MS=1,4,16 CBQ_BENCH_SHAPES=70b_gate_up,70b_down,70b_q_o,7b_gate_up,7b_qkvo \
      CBQ_BENCH_KERNELS=w4a16_g128,w2a16_g128,w4a8_g128,w4a8,int4pack_mm \
      timeout ${CBQ_BENCH_S:-130} python3 benchmarks/bench_gemm.py --out "$out/gemm" 2>&1 \
      | grep -v "done$" | tail -3
    CBQ_SPLIT_BUILD=0 split_kernels ${CBQ_BENCH_MS2:-2048,8192} \
      ${CBQ_BENCH_SHAPES2:-70b_gate_up,7b_gate_up,70b_down} ${CBQ_STAGE_S:-540}
    pack ;;
  abw)  # carry .cbq_commit .carry/old (git archive of an older commit: cbq_kernels csrc
    # setup.py CMakeLists.txt benchmarks pyproject.toml, and its .cbq_commit): the grouped
    # decode rows of this tree against the old one's on one machine, new / old / new (both
    # builds first, in parallel; benchmarks/compare_runs.py reads the three CSVs). Session 12:
    # the scale words (branch scale-words) against 68dd228
    environment
    build_tree .carry/old old &
    bash scripts/gpu_gemm.sh "$out/g" build
    wait
    for run in new1 old new2; do
      dir=.; [ $run = old ] && dir=.carry/old
      (cd $dir && CBQ_COMMIT=$(cat .cbq_commit) CBQ_BENCH_MS=1,4 \
        CBQ_BENCH_SHAPES=${CBQ_AB_SHAPES:-70b_gate_up,70b_down,7b_gate_up,70b_q_o} \
        CBQ_BENCH_KERNELS=w4a16_g128,w2a16_g128,w4a8_g128,w4a8 timeout 100 \
        python3 benchmarks/bench_gemm.py --out "$out/ab_$run" 2>&1 | grep -v "done$" | tail -1)
    done
    pack ;;
  gtable)  # carry .cbq_commit: the served W4A8 / W4A4 with the Gluon int8 kernel after
    # expansion (GemmPolicy.gluon_min_m, rows *_gluon) beside the TMA path, the served
    # two-level grouped W4A8 (w4a8_g64_2lvl*, against w4a8_g128) and the Gluon
    # prefill kernels over eight of the prefill table's eleven layer shapes at M = 1024 / 2048
    # / 8192 (tma_min_m is 1024), what a dispatch policy per shape needs (DECISIONS, "The
    # Gluon prefill kernels measured"), after the Gluon tests; the call bounded by
    # CBQ_STAGE_S (540) seconds
    environment
    t=tests/kernels/test_gemm_cuda.py
    CBQ_SPLIT_TMA4=0 CBQ_SPLIT_TEST_S=${CBQ_SPLIT_TEST_S:-150} \
      CBQ_SPLIT_TESTS="$t::test_gluon_int8_kernel_every_config $t::test_gluon_served_call_equals_the_tma_path
        $t::test_two_level_weight_served_at_every_m $t::test_gluon_split_kernel_every_config
        $t::test_gluon_two_level_kernel_every_config" \
      CBQ_SPLIT_KERNELS=${CBQ_SPLIT_KERNELS:-w4a8,w4a8_gluon,w4a4,w4a4_gluon,w4a8_split_gluon,w4a8_g128,w4a8_g64_2lvl,w4a8_g64_2lvl_gluon,w4a8_2lvl_gluon} \
      split_kernels ${CBQ_BENCH_MS:-1024,2048,8192} \
      ${CBQ_BENCH_SHAPES:-70b_gate_up,70b_down,7b_gate_up,7b_down,70b_q_o,13b_gate_up,7b_qkvo,70b_kv} \
      ${CBQ_STAGE_S:-540}
    pack ;;
  split)  # carry .cbq_commit: split_kernels at M = 256 .. 8192 on the 70B and 7B shapes, the
    # call bounded by CBQ_STAGE_S (540) seconds
    environment
    split_kernels ${CBQ_BENCH_MS:-256,1024,2048,4096,8192} \
      ${CBQ_BENCH_SHAPES:-70b_gate_up,70b_down,70b_q_o,7b_gate_up,7b_down,7b_qkvo} \
      ${CBQ_STAGE_S:-540}
    pack ;;
  compiled)  # carry .cbq_commit: the captured compiled step (torch.compile of the forward,
    # then captured) against the captured eager step of qpdl, batch 1 (issue 14: measure
    # both, keep the faster)
    environment
    bash scripts/gpu_gemm.sh "$out/g" build
    CBQ_GEN_MODELS=llama2-7b CBQ_GEN_BATCHES=1 CBQ_GEN_PROMPTS=512,2048 CBQ_GEN_NEW=256 \
      CBQ_GEN_PREFILL=graph CBQ_GEN_COMPILE=graph-compiled CBQ_GEN_SETTINGS=bf16,W4A8,W4A16g128 \
      timeout 540 python3 benchmarks/bench_generate.py --out "$out/gen_compiled" 2>&1 \
      | grep -v Warning | grep -v "^{" | cut -c1-200 | tail -4
    pack ;;
  check14)  # carry .carry/{b,shared,whl} .cbq_commit, right after qpdl or t13b (the GGUF's
    # first half in /tmp): issue 14's greedy check on a W4A8 SmolLM2 (round-to-nearest with the recipe's
    # activation quantizer and rotation: the check compares the kernels with the same model
    # fake-quantized, whatever the method) with the reference's own GPU-vs-CPU agreement
    # beside it and the served-model GPU tests, then the 70B-shaped rows (packed grouped-query
    # decode attention against the repeated KV cache first)
    environment
    d=/tmp/cbqcache/smollm2-135m; mkdir -p $d
    [ -f $d/SmolLM2-135M-Instruct.Q4_1.gguf ] || cat /tmp/gguf.part.aa .carry/b/gguf.part.ab \
      > $d/SmolLM2-135M-Instruct.Q4_1.gguf || exit 3
    export CBQ_CACHE=/tmp/cbqcache
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .carry/whl/*.whl && export PYTHONPATH=/tmp/site
    bash scripts/gpu_gemm.sh "$out/g" build
    # the served-model GPU tests at the new defaults (packed GQA attention, RMSNorm kernel)
    # beside the check (nothing here is timed)
    # and the GPU tests of the RMSNorm kernel and of GemmPolicy.prologue_pdl
    [ -n "${CBQ_CHECK_ONLY:-}" ] || timeout 300 python3 -m pytest -q -p no:cacheprovider -rs \
      tests/ptq/test_serve_cuda.py tests/kernels/test_rmsnorm_cuda.py \
      "tests/kernels/test_act_quant_cuda.py::test_pdl_launch_gives_the_same_bits" \
      "tests/kernels/test_gemm_decode_cuda.py::test_prologue_launched_with_pdl_gives_the_same_bits" \
      > "$out/pytest_serve.txt" 2>&1 &
    # per-token activations (CBQ_CHECK_ACT, default per_token): the W4A8 integer GEMM; the GPU
    # recipe's auto picks CrossQuant, which is served through the W4A16 kernel (115b297's run)
    python3 -m cbq_ptq.cli quantize --model smollm2-135m --setting W4A8 --method rtn \
      --act-quantizer ${CBQ_CHECK_ACT:-per_token} --eval-windows 8 --out /tmp/rtn_W4A8 \
      > "$out/quantize_rtn_W4A8.log" 2>&1
    tail -n 1 "$out/quantize_rtn_W4A8.log"
    # the kernels' model in bf16 (as served) and in fp32 (the reference's dtype: what is left
    # is the kernels' own rounding and the reductions' order)
    for dt in float32 bfloat16; do
      timeout 170 python3 scripts/check_generate.py /tmp/rtn_W4A8/model --dtype $dt \
        --out "$out/check_generate_rtn_W4A8_$dt.json" 2>&1 | grep -v Warning | tail -3
    done
    wait; tail -n 2 "$out/pytest_serve.txt" 2>/dev/null
    # the packed grouped-query decode attention (cbq_ptq.attention, default) against
    # transformers' repeated KV cache, then the 70B-shaped rows at the defaults
    # (in what is left of the call's ~560 s, so that the archive is written)
    left=$(( ${CBQ_STAGE_S:-560} - SECONDS )); [ $left -gt 60 ] || { pack; exit 0; }
    CBQ_GEN_GQA=0 CBQ_GEN_MODELS=llama2-70b-8l CBQ_GEN_BATCHES=1 CBQ_GEN_PROMPTS=2048 \
      CBQ_GEN_NEW=256 CBQ_GEN_COMPILE=graph CBQ_GEN_PREFILL=graph CBQ_GEN_SETTINGS=bf16,W4A8 \
      timeout $(( left < 240 ? left / 3 : 80 )) python3 benchmarks/bench_generate.py --out "$out/gen70_repeat" 2>&1 \
      | grep -v Warning | grep -v "^{" | cut -c1-200 | tail -3
    CBQ_GEN_MODELS=llama2-70b-8l CBQ_GEN_BATCHES=1,8,32 CBQ_GEN_PROMPTS=2048 CBQ_GEN_NEW=256 \
      CBQ_GEN_COMPILE=graph CBQ_GEN_PREFILL=graph CBQ_GEN_SETTINGS=bf16,W4A8,W4A16g128 \
      timeout $(( ${CBQ_STAGE_S:-560} - SECONDS )) python3 benchmarks/bench_generate.py \
      --out "$out/gen70" 2>&1 \
      | grep -v Warning | grep -v "^{" | cut -c1-200 | tail -4
    pack ;;
  blk)  # carry .cbq_commit (session 14): the decode kernel's 16-bit-activation instances
    # bounded to 4 blocks per SM (CBQ_DEC_BLOCKS 4, this tree) against 3 (a copy of this tree
    # with the macro and gemm_decode.BLOCKS_PER_SM at 3, built beside it): the decode GPU tests,
    # sweep_decode at M = CBQ_BLK_MS (16) new / old / new, then bench_gemm's decode rows (M =
    # 1, 4, 16, the served kernels and peers, every shape) until CBQ_STAGE_S (560) seconds.
    # (BLOCKS_PER_SM now covers the integer instances too, so the old copy's split model
    # counts 3 for them as well: only the sweep's 'default' column differs from b006aa3's run)
    environment
    old=/tmp/blk3; copy_tree $old
    sed -i 's/^#define CBQ_DEC_BLOCKS 4$/#define CBQ_DEC_BLOCKS 3/' $old/csrc/gemm_decode.cu
    sed -i 's/^BLOCKS_PER_SM = 4$/BLOCKS_PER_SM = 3/' $old/cbq_kernels/gemm_decode.py
    grep -q "^#define CBQ_DEC_BLOCKS 3$" $old/csrc/gemm_decode.cu && \
      grep -q "^BLOCKS_PER_SM = 3$" $old/cbq_kernels/gemm_decode.py || { echo "blk: no macro"; exit 2; }
    build_tree $old old &
    bash scripts/gpu_gemm.sh "$out/g" build
    wait; echo "builds done at ${SECONDS}s"
    timeout ${CBQ_DECODE_TEST_S:-100} python3 -m pytest -q -p no:cacheprovider -x \
      tests/kernels/test_gemm_decode_cuda.py 2>&1 | tee "$out/g/pytest_decode.txt" | tail -3
    for run in new1 old new2; do
      dir=.; [ $run = old ] && dir=$old
      (cd $dir && timeout 150 python3 benchmarks/sweep_decode.py --ms ${CBQ_BLK_MS:-16} \
        --shapes ${CBQ_BLK_SHAPES:-70b_gate_up,70b_down,70b_q_o,7b_gate_up,7b_qkvo,13b_gate_up} \
        > "$out/sweep_$run.txt" 2>&1)
      echo "== $run (${SECONDS}s)"; awk -F'|' '{print $1 "|" $3}' "$out/sweep_$run.txt"
    done
    CBQ_BENCH_MS=${CBQ_BENCH_MS:-1,4,16} CBQ_BENCH_KERNELS=$served \
      timeout $(( ${CBQ_STAGE_S:-560} - SECONDS > 30 ? ${CBQ_STAGE_S:-560} - SECONDS : 30 )) \
      python3 benchmarks/bench_gemm.py --out "$out/decode" 2>&1 | grep -v "done$" | tail -2
    pack ;;
  pol)  # carry .cbq_commit (session 14, not yet run): what main holds untested on a GPU:
    # GemmPolicy.gluon_min_m 256 / gluon_min_mn 2^22 (the served rows at M = 256 .. 2048 with
    # the default policy beside w4a8_gluon / w4a8_tma), the Gluon GPU tests that now pin
    # gluon_min_mn=0 and check the kernel ran, and the two-level served test
    environment
    bash scripts/gpu_gemm.sh "$out/g" build
    t=tests/kernels/test_gemm_cuda.py
    timeout 150 python3 -m pytest -q -p no:cacheprovider $t::test_gluon_served_call_equals_the_tma_path \
      $t::test_two_level_weight_served_at_every_m 2>&1 | tee "$out/g/pytest_policy.txt" | tail -3
    policy_rows 540
    pack ;;
  s15)  # carry .cbq_commit (session 15): build; Nsight Compute's full set on the decode kernel
    # at 1 x 28672 x 8192 (W4A16 g128, W4A8, W2A16 g128, W4A4) with the warp-stall samples
    # per SASS instruction (the report, its details and its source page); the exact-int32 GPU
    # tests of every GEMM (the whole of test_gemm_decode_cuda.py and test_gemm_cuda.py: every
    # kernel and autotuner configuration, the Gluon kernels and the two-level served test);
    # then pol's policy rows until CBQ_STAGE_S (560) seconds
    environment
    bash scripts/gpu_gemm.sh "$out/g" build
    timeout 150 ncu -k regex:decode_kernel -c 4 --set full --import-source no \
      -o "$out/g/ncu_decode_full" python3 scripts/ncu_decode.py > "$out/g/ncu_full.log" 2>&1
    tail -2 "$out/g/ncu_full.log"
    ncu -i "$out/g/ncu_decode_full.ncu-rep" > "$out/g/ncu_decode_full.txt" 2>&1
    ncu -i "$out/g/ncu_decode_full.ncu-rep" --page source --csv --print-source sass \
      > "$out/g/ncu_decode_sass.csv" 2>&1; wc -c "$out/g/ncu_decode_sass.csv"
    grep -E "decode_kernel|Duration|DRAM Throughput|Issue Slots Busy|Executed Ipc A|Warp Cycles Per Issued" \
      "$out/g/ncu_decode_full.txt" | head -30
    gemm_suite 300
    policy_rows 560
    pack ;;
  xpf)  # carry .cbq_commit (session 15): the activation register ring of the swapped decode
    # instances (M <= 8; csrc/gemm_decode.cu, CBQ_DEC_XPF) against this tree, in copies with
    # one macro set each (CBQ_XPF_VARIANTS, "MACRO=VALUE ..."; default: the ring off for the
    # integer instances, and on (4) for the bf16 / fp16 ones), built beside it in parallel:
    # their decode GPU tests, then sweep_decode at M = CBQ_XPF_MS (1,8), main / variants / main
    environment
    variants=${CBQ_XPF_VARIANTS:-CBQ_DEC_XPF=0 CBQ_DEC_XPF_FLOAT=4}
    for v in $variants; do
      d=/tmp/$v; copy_tree $d
      sed -i "s/^#define ${v%%=*} [0-9]*$/#define ${v%%=*} ${v#*=}/" $d/csrc/gemm_decode.cu
      grep -q "^#define ${v%%=*} ${v#*=}$" $d/csrc/gemm_decode.cu || { echo "xpf: no macro ${v%%=*}"; exit 2; }
      build_tree $d $v &
    done
    bash scripts/gpu_gemm.sh "$out/g" build
    wait; echo "builds done at ${SECONDS}s"
    for v in $variants; do
      (cd /tmp/$v && timeout ${CBQ_DECODE_TEST_S:-150} python3 -m pytest -q -p no:cacheprovider -x \
        tests/kernels/test_gemm_decode_cuda.py > "$out/pytest_decode_$v.txt" 2>&1) &
    done
    wait; for v in $variants; do tail -n 1 "$out/pytest_decode_$v.txt"; done; echo "tests done at ${SECONDS}s"
    for run in main1 $variants main2; do
      dir=.; case $run in main*) ;; *) dir=/tmp/$run ;; esac
      (cd $dir && timeout 120 python3 benchmarks/sweep_decode.py --ms ${CBQ_XPF_MS:-1,8} \
        --shapes ${CBQ_XPF_SHAPES:-70b_gate_up,70b_down,7b_gate_up,7b_qkvo} > "$out/sweep_$run.txt" 2>&1)
      echo "== $run (${SECONDS}s)"; awk -F'|' '{print $1 "|" $3}' "$out/sweep_$run.txt"
    done
    pack ;;
  fin)  # carry .cbq_commit (session 15): what closes a session that changed the decode kernel:
    # build; no decode-kernel load above griddepcontrol.wait (scripts/check_pdl_order.py); the
    # exact-int32 GPU tests of every GEMM (the whole of test_gemm_decode_cuda.py
    # and test_gemm_cuda.py); then bench_gemm's decode rows (M = CBQ_BENCH_MS, default 1, 4,
    # 16; served kernels and peers; every shape) until CBQ_STAGE_S (560) seconds
    environment
    bash scripts/gpu_gemm.sh "$out/g" build
    PATH=$PATH:/usr/local/cuda/bin python3 scripts/check_pdl_order.py 2>&1 | tee "$out/g/pdl_order.txt" | tail -4
    gemm_suite 300
    CBQ_BENCH_MS=${CBQ_BENCH_MS:-1,4,16} CBQ_BENCH_KERNELS=$served \
      timeout $(( ${CBQ_STAGE_S:-560} - SECONDS > 30 ? ${CBQ_STAGE_S:-560} - SECONDS : 30 )) \
      python3 benchmarks/bench_gemm.py --out "$out/decode" 2>&1 | grep -v "done$" | tail -2
    pack ;;
  *) echo "gpu_lease.sh: unknown stage '$stage' (alone, gemm, table, wait, one, pending, pending_gen, epi, cold, t13a, t13b, t14s, qpdl, check14, compiled, solo, split, s12, abw, gtable, blk, pol, s15, xpf or fin)"; exit 2 ;;
esac
