#!/usr/bin/env bash
# On a CUDA machine: build the extension (the CUDA decode GEMM lives there), the GEMM GPU tests
# and the GEMM benchmark.
#   bash scripts/gpu_gemm.sh OUT_DIR [build|sanitize|hsanitize|hadamard|hncu|decode|sweep|ncu|pncu|tests|
#                                     fp8|bench|generate|serve]...   (default: build decode tests bench)
# sanitize: the decode kernel's small-shape tests under compute-sanitizer (memcheck, racecheck);
# hsanitize: the same for the CUDA Hadamard kernel; hadamard: the Hadamard GPU tests, then
# benchmarks/bench_hadamard.py.
# decode: tests/kernels/test_gemm_decode_cuda.py; tests: tests/kernels/test_gemm_cuda.py;
# generate: benchmarks/bench_generate.py (CBQ_GEN_* select models, batches, prompts).
# CBQ_BENCH_MS picks the M values of the benchmark (see benchmarks/bench_gemm.py); the
# benchmark's CSV/markdown land in OUT_DIR (join the parts' CSVs, then benchmarks/summarize_gemm.py).
# The device copy's git metadata can be older than the tree it runs: write the commit first
# (git rev-parse --short=12 HEAD > .cbq_commit, ignored) and carry it; the CSVs record it.
set -uo pipefail
out=${1:?usage: gpu_gemm.sh OUT_DIR [tests|bench]...}
. "$(dirname "$0")/out_check.sh"
shift
steps=${*:-build decode tests bench}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
if [ -z "${CBQ_COMMIT:-}" ] && [ -f .cbq_commit ]; then export CBQ_COMMIT=$(cat .cbq_commit); fi
rc=0
for step in $steps; do
  case $step in
    build)  # the system g++: the image's default one builds modules whose exceptions segfault
      if [ -x /usr/bin/g++ ]; then export CXX=/usr/bin/g++ CUDAHOSTCXX=/usr/bin/g++; fi
      CBQ_CUDA_ARCHS=${CBQ_CUDA_ARCHS:-90a} CBQ_REQUIRE_CUDA=1 python3 setup.py build_ext \
        --inplace > "$out/build.log" 2>&1 || { tail -30 "$out/build.log"; exit 1; }
      grep -E "spill|warning" "$out/build.log" | tail -5 ;;
    sanitize)  # out-of-bounds accesses and shared-memory races, on small shapes (slow), and
      # the two-m-tile kernel with K splits (its 32-row workspace and reduction)
      m2=tests/kernels/test_gemm_decode_cuda.py::test_two_m_tiles_equal_two_launches
      for tool in memcheck racecheck; do
        compute-sanitizer --tool $tool --error-exitcode 3 python3 -m pytest -q -p no:cacheprovider \
          tests/kernels/test_gemm_decode_cuda.py -k "shape3" -x 2>&1 \
          | tee "$out/sanitize_$tool.txt" | tail -4
        rc=$(( rc || PIPESTATUS[0] ))
        compute-sanitizer --tool $tool --error-exitcode 3 python3 -m pytest -q -p no:cacheprovider \
          "$m2[3-4-128-a0-24]" "$m2[3-4-128-8-32]" -x 2>&1 \
          | tee -a "$out/sanitize_$tool.txt" | tail -4
        rc=$(( rc || PIPESTATUS[0] ))
      done ;;
    hadamard)
      python3 -m pytest -q -p no:cacheprovider tests/kernels/test_hadamard_quant_cuda.py 2>&1 \
        | tee "$out/pytest_hadamard.txt" | tail -6
      rc=$(( rc || PIPESTATUS[0] ))
      python3 benchmarks/bench_hadamard.py --out "$out" 2>&1 | tail -30 ;;
    hsanitize)  # the same for the CUDA Hadamard kernel: one block per row, and blocks that
      # loop over rows with the next one copied ahead (333 rows > the SMs)
      t=tests/kernels/test_hadamard_quant_cuda.py::test_the_cuda_kernel_matches_the_reference
      for tool in memcheck racecheck; do
        compute-sanitizer --tool $tool --error-exitcode 3 python3 -m pytest -q -p no:cacheprovider \
          "$t[3-dtype0-True-28672]" "$t[333-dtype0-True-11008]" "$t[333-dtype2-False-11008]" \
          "$t[3-dtype4-False-20480]" -x 2>&1 \
          | tee "$out/hsanitize_$tool.txt" | tail -4
        rc=$(( rc || PIPESTATUS[0] ))
        r=tests/kernels/test_hadamard_quant_cuda.py::test_the_register_kernel_matches_the_reference
        compute-sanitizer --tool $tool --error-exitcode 3 python3 -m pytest -q -p no:cacheprovider \
          "$r[333-dtype0-28672-1]" "$r[333-dtype0-28672-2]" "$r[333-dtype0-11008-1]" \
          "$r[333-dtype0-11008-3]" "$r[3-dtype1-12288-2]" "$r[333-dtype0-640-1]" \
          -x 2>&1 | tee -a "$out/hsanitize_$tool.txt" | tail -4
        rc=$(( rc || PIPESTATUS[0] ))
      done ;;
    hncu)  # Nsight Compute on both CUDA Hadamard kernels, 8192 x 28672 and 8192 x 11008 int8
      ncu -k regex:hadamard_quant -c 8 --section SpeedOfLight --section MemoryWorkloadAnalysis \
        --section WarpStateStats --section Occupancy --section LaunchStats \
        --section ComputeWorkloadAnalysis --section SchedulerStats --section InstructionStats \
        python3 scripts/ncu_hadamard.py > "$out/ncu_hadamard.txt" 2>&1
      rc=$(( rc || $? )); grep -E "hadamard_quant|DRAM Throughput|Duration|Executed Ipc|Registers Per|Achieved Occupancy" "$out/ncu_hadamard.txt" | head -40 ;;
    decode)
      python3 -m pytest tests/kernels/test_gemm_decode_cuda.py -q -p no:cacheprovider 2>&1 \
        | tee "$out/pytest_gemm_decode.txt" | tail -15
      rc=$(( rc || PIPESTATUS[0] )) ;;
    sweep)  # grids of the CUDA decode kernel (CBQ_SWEEP_SHAPES: names or NxK)
      python3 benchmarks/sweep_decode.py --ms ${CBQ_SWEEP_MS:-1} \
        ${CBQ_SWEEP_SHAPES:+--shapes $CBQ_SWEEP_SHAPES} 2>&1 | tee "$out/sweep_decode.txt" | tail -25
      rc=$(( rc || PIPESTATUS[0] )) ;;
    ncu)  # Nsight Compute on the decode kernel at 1 x 28672 x 8192 (W4A16 g128, W4A8, W2A16 g128,
      # W4A4: one launch each; scripts/ncu_decode.py)
      ncu -k regex:decode_kernel -c 4 --section SpeedOfLight --section MemoryWorkloadAnalysis \
        --section WarpStateStats --section Occupancy --section LaunchStats \
        python3 scripts/ncu_decode.py > "$out/ncu_decode.txt" 2>&1
      rc=$(( rc || $? )); grep -E "decode_kernel|DRAM Throughput|Memory Throughput|Duration|Achieved Occupancy|Registers Per" "$out/ncu_decode.txt" | head -40 ;;
    pncu)  # Nsight Compute on the prefill path at 2048 x 28672 x 8192 (CBQ_PNCU_SHAPE: M N K):
      # cuBLAS bf16, fp8, then every kernel of the served W4A8 / W4A8 g128 / W4A16 g128 / W4A4
      # calls (expansion + GEMM; scripts/ncu_prefill.py), with NVTX names
      ncu --profile-from-start off --nvtx --section SpeedOfLight \
        --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis --section LaunchStats \
        --section Occupancy python3 scripts/ncu_prefill.py ${CBQ_PNCU_SHAPE:-2048 28672 8192} \
        > "$out/ncu_prefill.txt" 2>&1
      rc=$(( rc || $? )); grep -E "^  [A-Za-z_].*\(|Duration|DRAM Throughput|Compute \(SM\) Throughput|Issue Slots Busy" "$out/ncu_prefill.txt" | head -60 ;;
    fp8)  # W4A4 on fp8: the GPU test, then rowwise vs unit-scale exactness (scripts/fp8_rowwise_check.py)
      python3 -m pytest tests/kernels/test_gemm_cuda.py -q -p no:cacheprovider -k fp8 2>&1 \
        | tee "$out/pytest_fp8.txt" | tail -4
      rc=$(( rc || PIPESTATUS[0] ))
      python3 scripts/fp8_rowwise_check.py 2>&1 | tee "$out/fp8_rowwise.txt"
      rc=$(( rc || PIPESTATUS[0] )) ;;
    tests)
      python3 -m pytest tests/kernels/test_gemm_cuda.py -q -p no:cacheprovider -x 2>&1 \
        | tee "$out/pytest_gemm.txt" | tail -15
      rc=$(( rc || PIPESTATUS[0] )) ;;
    generate)
      python3 benchmarks/bench_generate.py --out "$out" 2>&1 | tail -5
      rc=$(( rc || PIPESTATUS[0] )) ;;
    serve)  # the served model's GPU tests: kernels vs fake-quantized logits, the captured
      # decode loop (eager / captured / compiled step), fused projections, the Hadamard op
      python3 -m pytest -q -p no:cacheprovider -rs tests/ptq/test_serve_cuda.py \
        tests/kernels/test_hadamard_quant_cuda.py 2>&1 | tee "$out/pytest_serve.txt" | tail -15
      rc=$(( rc || PIPESTATUS[0] )) ;;
    bench)
      python3 benchmarks/bench_gemm.py --out "$out" 2>&1 | grep -v "done$" | tail -3
      rc=$(( rc || PIPESTATUS[0] )) ;;
    *) echo "unknown step $step"; exit 2 ;;
  esac
done
exit $rc
