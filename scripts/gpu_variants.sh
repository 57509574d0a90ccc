#!/usr/bin/env bash
# Decode-kernel variants on the GPU in one call: for each folder .carry/vN holding a
# gemm_decode.cu (a branch's csrc/gemm_decode.cu), build it, run the decode GPU tests and the
# split-K sweep; the committed kernel first ("main"), then each variant, then main is rebuilt.
#   bash scripts/gpu_variants.sh OUT_DIR "v4 v5" [sweep args]
set -uo pipefail
out=${1:?usage: gpu_variants.sh OUT_DIR VARIANTS [sweep args]}; variants=$2; shift 2
sweep=${*:---ms 1 --shapes 7b_down,70b_gate_up}
cd "$(dirname "$0")/.."
mkdir -p "$out"; cp csrc/gemm_decode.cu "$out/main.cu"
for v in main $variants; do
  [ "$v" = main ] || cp ".carry/$v/gemm_decode.cu" csrc/gemm_decode.cu
  bash scripts/gpu_gemm.sh "$out/$v" build > "$out/$v.log" 2>&1 || { echo "$v: build failed"; continue; }
  if [ "$v" != main ]; then
    timeout ${CBQ_DECODE_TEST_S:-60} python3 -m pytest -q -p no:cacheprovider -x \
      tests/kernels/test_gemm_decode_cuda.py 2>&1 | tail -2 | tee "$out/$v/pytest.txt"
  fi
  python3 benchmarks/sweep_decode.py $sweep > "$out/$v/sweep.txt" 2>&1
  echo "== $v"; awk -F'|' '{print $1 "|" $3}' "$out/$v/sweep.txt"
done
cp "$out/main.cu" csrc/gemm_decode.cu
bash scripts/gpu_gemm.sh "$out/main_rebuilt" build > /dev/null 2>&1; echo "main rebuilt: $?"
# one archive: the device returns a limited number of files per call (the sweeps of v7 / v8
# at 1da67a5 did not come back)
tar czf "$out.tgz" -C "$out" . && rm -rf "$out" && mkdir -p "$out" && mv "$out.tgz" "$out/variants.tgz"
