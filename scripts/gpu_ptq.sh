#!/usr/bin/env bash
# PTQ runs on the lent GPU machine, from the repo root there, in one lease:
#   bash scripts/gpu_ptq.sh OUT gguf-a      # keep the first half of the SmolLM2 GGUF in /tmp,
#                                           # then the GPU tests of the calibration path
#   bash scripts/gpu_ptq.sh OUT start [ptq_table.py args]   # second half, model, then the
#                                           # table runs in the background (setsid), returns
#   bash scripts/gpu_ptq.sh OUT wait SECONDS  # wait (at most SECONDS) and copy what finished
#   bash scripts/gpu_ptq.sh OUT final JOB   # after the table: JOB alone on the GPU (its seconds
#                                           # are the 'one run alone' time), then the 7B cost
#   bash scripts/gpu_ptq.sh OUT check       # GPU tests of cbq_ptq, then the calibration cost
#   bash scripts/gpu_ptq.sh OUT cli         # the README's commands on stories260K
#   bash scripts/gpu_ptq.sh OUT gencheck    # issue 14's checks on the CBQ_GENMODEL models
# Inputs travel in the ignored folder .carry: shared/{models,data} (copies of ../shared),
# whl/ (the gguf wheel, which the GPU image lacks), a/ and b/ (the GGUF split with
# `split -b 47m`, one half per call: a call carries at most 64 MiB).
set -uo pipefail
out=$1; stage=$2; shift 2
. "$(dirname "$0")/out_check.sh"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 CBQ_MODELS_DIR=$PWD/.carry/shared/models CBQ_DATA_DIR=$PWD/.carry/shared/data
[ -z "${CBQ_COMMIT:-}" ] && [ -f .cbq_commit ] && CBQ_COMMIT=$(cat .cbq_commit)  # as gpu_gemm.sh
export CBQ_CACHE=/tmp/cbqcache CBQ_COMMIT=${CBQ_COMMIT:-unknown}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .carry/whl/*.whl && export PYTHONPATH=/tmp/site
{
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  python3 -c "import sys, torch, triton, transformers; print('python', sys.version.split()[0], \
'| torch', torch.__version__, '| triton', triton.__version__, '| transformers', transformers.__version__)"
  echo "commit $CBQ_COMMIT"
} > "$out/environment.txt" 2>&1
cat "$out/environment.txt"
table=/tmp/ptq_table
case $stage in
  gguf-a)
    cp .carry/a/gguf.part.aa /tmp/ && ls -la /tmp/gguf.part.aa
    [ "${CBQ_TEST_SECONDS:-240}" = 0 ] || timeout ${CBQ_TEST_SECONDS:-240} python3 -m pytest -q -p no:cacheprovider -x \
      tests/kernels/test_lora_round_cuda.py tests/kernels/test_act_quant_cuda.py \
      tests/kernels/test_fake_quant_cuda.py tests/ptq/test_pipeline_cuda.py \
      tests/ptq/test_serve_cuda.py 2>&1 | tee "$out/pytest_gpu.txt" | tail -8 ;;
  final)  # a run alone (nothing else on the GPU), then one 7B-shaped window
    python3 scripts/ptq_table.py --results /tmp/alone --jobs "$1" --workers 1 2>&1 | tail -3
    for f in /tmp/alone/*.json; do cat "$f"; echo; done > "$out/alone.jsonl"
    python3 scripts/ptq_cost.py --shape llama2-7b --n 128 --t 2048 --out "$out/cost.jsonl" \
      2>&1 | tail -4
    cp $table/pytest_gpu.txt "$out/" 2>/dev/null; ls -la "$out" ;;
  check)
    timeout 300 python3 -m pytest tests/ptq -q -p no:cacheprovider 2>&1 | tee "$out/pytest_ptq.txt" | tail -8
    [ "${CBQ_COST:-1}" = 1 ] || exit 0
    for args in "--shape smollm2-135m" "--shape llama2-7b"; do
      python3 scripts/ptq_cost.py $args --n 128 --t 2048 --out "$out/cost.jsonl" 2>&1 | tail -3
    done ;;
  cli)  # the README's commands on stories260K, then the saved model through the GEMMs
    python3 -m cbq_ptq.cli quantize --model stories260K --setting W4A8 --ragged-groups \
      --corpus tinystories --n-calib 32 --calib-len 256 --eval-windows 64 \
      --out /tmp/cli_out 2>&1 | grep -v "it/s\]" | tee "$out/cli.txt"
    python3 -m cbq_ptq.cli eval /tmp/cli_out/model --corpus tinystories --eval-windows 64 \
      --kernels 2>&1 | tee -a "$out/cli.txt"
    cp /tmp/cli_out/summary.json "$out/cli_summary.json" ;;
  start)
    d=$CBQ_CACHE/smollm2-135m; mkdir -p "$d"
    if [ ! -f "$d/hf/config.json" ]; then
      [ -f /tmp/gguf.part.aa ] || { echo "first half missing: run gguf-a first (warm machine)"; exit 3; }
      cat /tmp/gguf.part.aa .carry/b/gguf.part.ab > "$d/SmolLM2-135M-Instruct.Q4_1.gguf"
      sha256sum "$d/SmolLM2-135M-Instruct.Q4_1.gguf"
    fi
    python3 -c "from cbq_ptq.models import resolve; print(resolve('smollm2-135m'))" 2>&1 | tail -1
    mkdir -p $table
    # two drivers share the GPU: the jobs of CBQ_JOBS_A (CBQ_WORKERS_A at a time, the long
    # training runs, started before CBQ_DEADLINE_A seconds) and of CBQ_JOBS_B (the cheap ones)
    setsid nohup python3 scripts/ptq_table.py --results $table --mirror $table/all_a.jsonl \
      --jobs "$CBQ_JOBS_A" --workers ${CBQ_WORKERS_A:-12} --deadline ${CBQ_DEADLINE_A:-600} "$@" \
      > $table/driver_a.log 2>&1 < /dev/null &
    if [ -n "${CBQ_JOBS_B:-}" ]; then
      setsid nohup python3 scripts/ptq_table.py --results $table --mirror $table/all_b.jsonl \
        --jobs "$CBQ_JOBS_B" --workers ${CBQ_WORKERS_B:-3} "$@" \
        > $table/driver_b.log 2>&1 < /dev/null &
    fi
    if [ "${CBQ_GPU_TESTS:-1}" = 1 ]; then  # build + every cuda test beside the table runs
      ( export CXX=/usr/bin/g++ CUDAHOSTCXX=/usr/bin/g++
        CBQ_CUDA_ARCHS=90a CBQ_REQUIRE_CUDA=1 python3 setup.py build_ext --inplace \
          > $table/build.log 2>&1 || { tail -30 $table/build.log; exit 1; }
        timeout ${CBQ_TEST_SECONDS:-900} python3 -m pytest -q -p no:cacheprovider -m cuda -rs \
          tests ) > $table/pytest_gpu.txt 2>&1 < /dev/null &
    fi
    if [ -n "${CBQ_EXPORT:-}" ]; then  # issue 16: e.g. CBQ_EXPORT="W4A16 W8A8" (the wheels of
      # compressed-tensors and its dependencies travel in .carry/whl2)
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site2 .carry/whl2/*.whl
      export PYTHONPATH=/tmp/site2:/tmp/site
      for s in $CBQ_EXPORT; do  # one background run per setting
        extra=""; [ "${s#*A}" != 16 ] && extra="--act-quantizer per_token"
        ( python3 -m cbq_ptq.cli quantize --model smollm2-135m --setting $s --symmetric-weights \
            --rotate none $extra --eval-windows 8 --out /tmp/export_$s > $table/export_$s.log 2>&1
          python3 -m cbq_ptq.cli export /tmp/export_$s/model /tmp/ct_$s --drop-activation-clipping \
            >> $table/export_$s.log 2>&1
          python3 scripts/export_check.py /tmp/export_$s/model /tmp/ct_$s \
            --out $table/export_check_$s.jsonl >> $table/export_$s.log 2>&1
        ) > /dev/null 2>&1 < /dev/null &
      done
    fi
    if [ -n "${CBQ_GENMODEL:-}" ]; then  # issue 14: a model to generate with (gencheck); the
      # checks compare the kernels with the fake-quantized model, whatever the method: GPTQ
      # (~1.5 min) by default, CBQ_GENMETHOD=cbq for the full recipe (~7 min)
      for s in $CBQ_GENMODEL; do
        python3 -m cbq_ptq.cli quantize --model smollm2-135m --setting $s --eval-windows 8 \
          --method ${CBQ_GENMETHOD:-gptq} --out /tmp/gen_$s > $table/genmodel_$s.log 2>&1 < /dev/null &
      done
    fi
    sleep 60; cat $table/driver_*.log; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv
    tail -n 3 $table/*.log | head -60 ;;
  gencheck)  # issue 14 on the models of CBQ_GENMODEL (start; e.g. "W4A16 W4A8": weight-only
    # kernels have no activation codes to flip): greedy continuations, teacher-forced
    # agreement and the perplexity through generate's model (scripts/check_generate.py),
    # then generation speed
    for s in ${CBQ_GENMODEL:-W4A8}; do
      tail -3 $table/genmodel_$s.log
      python3 scripts/check_generate.py /tmp/gen_$s/model --out "$out/check_generate_$s.json" \
        2>&1 | grep -v Warning | tail -12
      if [ -n "${CBQ_GENCHECK_FP32:-}" ]; then  # the kernels' model in fp32 too (2d9c58b: the
        # bf16 W4A16 model agreed with the fp32 reference in 16 of 32 continuations)
        python3 scripts/check_generate.py /tmp/gen_$s/model --dtype float32 \
          --out "$out/check_generate_${s}_fp32.json" 2>&1 | grep -v Warning | tail -4
      fi
      # the captured loop (what cbq generate runs): the default "auto" mode compiles
      # generate()'s step for each setting (~2 min), which the 200-s call of bbe9d36 cut short
      CBQ_GEN_MODELS=none CBQ_GEN_BATCHES=${CBQ_GEN_BATCHES:-1,8} CBQ_GEN_PROMPTS=512 \
        CBQ_GEN_COMPILE=${CBQ_GEN_COMPILE:-graph} \
        CBQ_GEN_NEW=${CBQ_GEN_NEW:-128} python3 benchmarks/bench_generate.py --saved \
        /tmp/gen_$s/model --out "$out/gen_$s" 2>&1 | grep -v Warning | cut -c1-300 | tail -6
    done ;;
  wait)
    limit=${1:-540}; t0=$(date +%s)
    while pgrep -f "scripts/ptq_table.py|export_check|cbq_ptq.cli" > /dev/null && [ $(( $(date +%s) - t0 )) -lt "$limit" ]; do
      sleep 10
    done
    nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader
    cat $table/driver_*.log | grep -v "^|" | tail -40
    tail -5 $table/pytest_gpu.txt 2>/dev/null; cp $table/pytest_gpu.txt "$out/" 2>/dev/null
    cp $table/export_* "$out/" 2>/dev/null; cat $table/export_check_*.jsonl 2>/dev/null
    for f in $table/*.json; do cat "$f"; echo; done > "$out/table.jsonl" 2>/dev/null
    tar czf "$out/logs.tgz" -C $table . 2>/dev/null; ls -la "$out" ;;
esac
