#!/usr/bin/env bash
# On a CUDA machine: build cbq_kernels._C in place, run the whole test suite (the
# cuda-marked tests included), run the benchmarks, and write everything to one folder.
#   bash scripts/gpu_check.sh [OUT_DIR]       (default: gpu_results)
# CBQ_TESTS (default: tests) selects the tests, CBQ_BENCHES the benchmark scripts.
# CBQ_CUDA_ARCHS defaults to 90a here (Hopper) to keep the build short.
set -uo pipefail
out=${1:-gpu_results}
. "$(dirname "$0")/out_check.sh"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."

{
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,clocks.max.sm,clocks.max.mem \
    --format=csv
  python3 -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', \
torch.__version__, '| cuda', torch.version.cuda, '| triton', triton.__version__)"
  nvcc --version | tail -2
} > "$out/environment.txt" 2>&1
cat "$out/environment.txt"

echo "== build"
# The GPU image's default g++ (/opt/gcc, a wrapped GCC 13) builds modules whose C++ exceptions
# segfault (setup.py's smoke test catches that); its system g++ works.
if [ -x /usr/bin/g++ ]; then export CXX=/usr/bin/g++ CUDAHOSTCXX=/usr/bin/g++; fi
if ! CBQ_CUDA_ARCHS=${CBQ_CUDA_ARCHS:-90a} CBQ_REQUIRE_CUDA=1 \
    python3 setup.py build_ext --inplace > "$out/build.log" 2>&1; then
  tail -40 "$out/build.log"
  exit 1
fi
grep -E "nvcc|spill|warning" "$out/build.log" | tail -5

echo "== tests"
python3 -m pytest ${CBQ_TESTS:-tests} -q -p no:cacheprovider -rs 2>&1 | tee "$out/pytest.txt" | tail -15
rc_tests=${PIPESTATUS[0]}

echo "== benchmarks"
rc_bench=0
for bench in ${CBQ_BENCHES-packing fake_quant act_quant lora_round}; do
  python3 "benchmarks/bench_$bench.py" --out "$out" || rc_bench=1
done

echo "tests rc=$rc_tests bench rc=$rc_bench"
exit $(( rc_tests != 0 || rc_bench != 0 ))
