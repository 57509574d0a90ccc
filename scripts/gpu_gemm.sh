#!/usr/bin/env bash
# On a CUDA machine: the GEMM GPU tests and the GEMM benchmark (no compiled extension needed).
#   bash scripts/gpu_gemm.sh OUT_DIR [tests|bench]...      (default: tests bench)
# CBQ_BENCH_MS picks the M values of the benchmark (see benchmarks/bench_gemm.py); the
# benchmark's CSV/markdown land in OUT_DIR (merge parts with benchmarks/summarize_gemm.py).
set -uo pipefail
out=${1:?usage: gpu_gemm.sh OUT_DIR [tests|bench]...}
shift
steps=${*:-tests bench}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
rc=0
for step in $steps; do
  case $step in
    tests)
      python3 -m pytest tests/kernels/test_gemm_cuda.py -q -p no:cacheprovider -x 2>&1 \
        | tee "$out/pytest_gemm.txt" | tail -15
      rc=$(( rc || PIPESTATUS[0] )) ;;
    bench)
      python3 benchmarks/bench_gemm.py --out "$out" 2>&1 | grep -v "done$" | tail -3
      rc=$(( rc || PIPESTATUS[0] )) ;;
    *) echo "unknown step $step"; exit 2 ;;
  esac
done
exit $rc
