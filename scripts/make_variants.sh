#!/usr/bin/env bash
# Rebuild the decode-kernel variant folders that scripts/gpu_variants.sh swaps in (.carry/vN,
# git-ignored, so a fresh checkout has none). Every variant is main's csrc/gemm_decode.cu with one
# compile-time switch changed (branches do not survive from one session's checkout to the next,
# so a variant lives on main behind its macro, off by default, until it is timed):
#   v8d16  CBQ_DEC_DEPTH 16   a 16-deep weight ring per warp (8 by default)
#   vepi0  CBQ_DEC_EPI 0      the one-column split-K epilogue (main has the four-column one since
#                             the H100 sweep of 2483d26, benchmarks/results/h100/sweep_decode_epi_2483d26)
# The TMA (decode-tma), swapped-operand M <= 32 (decode-swapmt) and activation-prefetch
# (decode-xpf) variants were branches; their timings are in DECISIONS.md, their code is gone.
#   bash scripts/make_variants.sh
#   bash scripts/gpu_variants.sh OUT vepi0 --ms 1,16,32 --shapes 7b_qkvo,7b_gate_up,70b_gate_up
set -euo pipefail
cd "$(dirname "$0")/.."
variant() {  # variant DIR MACRO VALUE: main's kernel with "#define MACRO VALUE"
  local dir=.carry/$1 macro=$2 value=$3
  rm -rf "$dir"; mkdir -p "$dir"
  cp csrc/gemm_decode.cu "$dir/"
  sed -i "s/^#define $macro [0-9]*$/#define $macro $value/" "$dir/gemm_decode.cu"
  grep -q "^#define $macro $value$" "$dir/gemm_decode.cu" || { echo "$dir: no #define $macro"; exit 1; }
  echo "$dir: gemm_decode.cu with $macro $value"
}
variant v8d16 CBQ_DEC_DEPTH 16
variant vepi0 CBQ_DEC_EPI 0
