#!/usr/bin/env bash
# The first GPU run (issue 25 part B), one prepared script for the `device` tool: install the
# carried wheels, run the CUDA tests, bench 125M and 350M (seq 2048, bf16, ZeRO-1, compile on and
# off, plain loops for rope and bifocal), then as much of the gpu-125m study as the time allows.
# Everything that must come back is written under $OUT (at most 8 files).
#
# Here, once:  ../shared/device-kit/fetch-wheels .device-wheels
#              mkdir -p .device-data && cp ../shared/corpora/{nl_large_mixed,code_large_python}.jsonl.gz .device-data/
# Device call: run(command="bash benchmarks/gpu/first_light.sh STEP", carry=[".device-wheels", ".device-data"])
#   STEP: tests | bench-125m | bench-350m | study (each fits one 10-minute call; the study resumes over calls)
set -uo pipefail
step=${1:-tests}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
log="$OUT/$step.log"
exec > >(tee -a "$log") 2>&1
python3 -m pip install -q --no-index --find-links .device-wheels deepspeed datasets pydantic \
  && python3 -m pip install -q --no-deps -e . || { echo "install failed"; exit 1; }
# configs/data/large.yaml reads ../shared/corpora (relative to the checkout): point it at the carried copy.
[ -d .device-data ] && mkdir -p ../shared && ln -sfn "$PWD/.device-data" ../shared/corpora
python3 -m bifocal env
nvidia-smi --query-gpu=name,memory.total --format=csv
case $step in
  tests)
    timeout 420 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_fast_path.py -x ;;
  bench-125m|bench-350m)
    # Micro-batches from `bifocal estimate --config gpu/125m|350m --set model.max_seq_len=2048
    # train.micro_batch=... --device h100-80gb --gpus 1` (docs/performance.md: 8 fits every scheme).
    S="--set model.max_seq_len=2048 train.micro_batch=8 deepspeed.precision=bf16 deepspeed.zero_stage=1"
    size=${step#bench-}
    for _ in 1; do
      for compile in false true; do
        timeout 250 python3 -m bifocal bench --config gpu/$size $S --set train.compile=$compile \
          --plain rope,bifocal --steps 10 --block 5 --warmup 3 --out "$OUT/bench-$size-compile-$compile" --overwrite
      done
    done
    tar czf "$OUT/$step.tgz" -C "$OUT" $(cd "$OUT" && ls -d bench-*/) && rm -rf "$OUT"/bench-*/ ;;
  study)
    # Resumable: finished runs and results are reused; a call that runs out of time resumes next call.
    timeout 560 python3 -m bifocal study extrapolation --preset gpu-125m --out runs/study-gpu-125m
    tar czf "$OUT/study.tgz" runs/study-gpu-125m/report.md runs/study-gpu-125m/report.json \
      runs/study-gpu-125m/*.png runs/study-gpu-125m/results 2>/dev/null ;;
  *) echo "unknown step $step (tests, bench-125m, bench-350m, study)"; exit 2 ;;
esac
