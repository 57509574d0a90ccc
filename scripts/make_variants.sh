#!/usr/bin/env bash
# Rebuild the decode-kernel variant folders that scripts/gpu_variants.sh swaps in (.carry/vN,
# git-ignored, so a fresh checkout has none) from their branches:
#   v9     decode-tma     one cp.async.bulk per 1 KB weight chunk on an mbarrier per ring slot
#   v9d16  decode-tma     the same with a 16-deep ring (CBQ_DEC_DEPTH 16)
#   v8d16  main           the committed kernel with a 16-deep ring
#   vmt4   decode-swapmt  the swapped-operand kernel for every M <= 32 (1, 2 or 4 8-row tiles)
#   vxpf   decode-xpf     the committed kernel with chunk c + 1's activations loaded during chunk c
#   vepi   decode-epilogue the committed kernel with a vectorised split-K epilogue (4 columns per
#                         thread, the partials loaded 8 at a time before they are added)
#   bash scripts/make_variants.sh        # then: bash scripts/gpu_variants.sh OUT "v9 vmt4"
#   (vxpf: bash scripts/gpu_variants.sh OUT vxpf --ms 1,16 --shapes 70b_gate_up,7b_gate_up,13b_qkvo;
#    vepi: bash scripts/gpu_variants.sh OUT vepi --ms 1,16,32 --shapes 7b_qkvo,7b_gate_up,70b_gate_up)
set -euo pipefail
cd "$(dirname "$0")/.."
files="csrc/gemm_decode.cu csrc/bindings.cpp cbq_kernels/gemm_decode.py tests/kernels/test_gemm_decode_cuda.py"
take() {  # take DIR BRANCH [DEPTH]: the branch's files that differ from main, depth patched
  local dir=.carry/$1 branch=$2 depth=${3:-}
  rm -rf "$dir"; mkdir -p "$dir"
  for f in $files; do
    if [ "$branch" != main ] && git diff --quiet main "$branch" -- "$f"; then continue; fi
    [ "$branch" = main ] && [ "$f" != csrc/gemm_decode.cu ] && continue
    git show "$branch:$f" > "$dir/$(basename "$f")"
  done
  if [ -n "$depth" ]; then
    sed -i "s/^#define CBQ_DEC_DEPTH 8$/#define CBQ_DEC_DEPTH $depth/" "$dir/gemm_decode.cu"
    grep -q "^#define CBQ_DEC_DEPTH $depth$" "$dir/gemm_decode.cu"
  fi
  echo "$dir: $(ls "$dir" | tr '\n' ' ')"
}
take v9 decode-tma
take v9d16 decode-tma 16
take v8d16 main 16
take vmt4 decode-swapmt
take vxpf decode-xpf
take vepi decode-epilogue
