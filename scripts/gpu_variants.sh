#!/usr/bin/env bash
# Decode-kernel variants on the GPU in one call: for each folder .carry/vN, build the variant,
# run the decode GPU tests and the split-K sweep; the committed kernel first ("main"), then each
# variant, then main is restored and rebuilt. A variant folder holds its branch's
# gemm_decode.cu and, where the branch changed them, bindings.cpp, gemm_decode.py and
# test_gemm_decode_cuda.py; each replaces its file for that variant.
#   bash scripts/gpu_variants.sh OUT_DIR "v9 vmt4" [sweep args]
set -uo pipefail
out=${1:?usage: gpu_variants.sh OUT_DIR VARIANTS [sweep args]}; variants=$2; shift 2
. "$(dirname "$0")/out_check.sh"
sweep=${*:---ms 1 --shapes 7b_down,70b_gate_up}
cd "$(dirname "$0")/.."
files="csrc/gemm_decode.cu csrc/bindings.cpp cbq_kernels/gemm_decode.py tests/kernels/test_gemm_decode_cuda.py"
mkdir -p "$out/main_files"; for f in $files; do cp "$f" "$out/main_files/"; done
restore() { for f in $files; do cp "$out/main_files/$(basename "$f")" "$f"; done; }
for v in main $variants; do
  restore
  if [ "$v" != main ]; then
    for f in $files; do [ -f ".carry/$v/$(basename "$f")" ] && cp ".carry/$v/$(basename "$f")" "$f"; done
  fi
  bash scripts/gpu_gemm.sh "$out/$v" build > "$out/$v.log" 2>&1 || { echo "$v: build failed"; tail -5 "$out/$v/build.log"; continue; }
  if [ "$v" != main ] || [ -n "${CBQ_TEST_MAIN:-}" ]; then
    timeout ${CBQ_DECODE_TEST_S:-60} python3 -m pytest -q -p no:cacheprovider -x \
      tests/kernels/test_gemm_decode_cuda.py 2>&1 | tail -2 | tee "$out/$v/pytest.txt"
  fi
  python3 benchmarks/sweep_decode.py $sweep > "$out/$v/sweep.txt" 2>&1
  echo "== $v"; awk -F'|' '{print $1 "|" $3 "|" $4}' "$out/$v/sweep.txt"
done
restore
bash scripts/gpu_gemm.sh "$out/main_rebuilt" build > /dev/null 2>&1; echo "main rebuilt: $?"
# one archive: the device returns at most 8 files per call
tar czf "$out.tgz" -C "$out" . && rm -rf "$out" && mkdir -p "$out" && mv "$out.tgz" "$out/variants.tgz"
