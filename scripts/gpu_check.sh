#!/usr/bin/env bash
# Every check that needs a GPU, in one run (sized for < 10 minutes on an H100/H200), for the day a
# GPU is lent (the device tool: `run` with `bash scripts/gpu_check.sh`, timeout_s 600).
#   1. environment: GPU, driver, torch / transformers / triton as installed there;
#   2. the CUDA tests: Triton decode attention and W4A16 against their references on the GPU
#      (bf16 included), generate through the kernels, the device-placement tests, the streamed
#      GPTQ run with --device cuda against the CPU run;
#   3. scripts/bench_attention.py (grid + end-to-end) and scripts/bench_w4a16.py, side by side
#      with fp16 SDPA / dense matmul in the same run.
# Results go to $OUT (the device tool's folder that comes back) or ./gpu-check; the exit status
# is non-zero when any step failed. Each step has its own time limit so one hang cannot eat the
# whole lease.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-check}"
mkdir -p "$out"
export QUANTSINK_CACHE="${QUANTSINK_CACHE:-/tmp/quantsink-cache}" PYTHONUNBUFFERED=1
status=0

step() {  # step NAME SECONDS CMD...: run CMD with a time limit, its output to $out/NAME.txt
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" >"$out/$name.txt" 2>&1
  local rc=$?
  echo "$name: exit $rc in $((SECONDS - t0)) s" | tee -a "$out/summary.txt"
  [ "$rc" -eq 0 ] || status=1
}

step env 60 bash -c 'nvidia-smi; python -c "import torch, transformers, triton; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, torch.cuda.get_device_name()); print(\"transformers\", transformers.__version__, \"triton\", triton.__version__)"'
step install 120 pip install --no-deps --no-build-isolation -e .
step tests 240 python -m pytest -q -rs -p no:cacheprovider \
  tests/test_kernels_decode_attention.py tests/test_kernels_w4a16.py tests/test_kernels_generate.py \
  tests/test_weights_device.py tests/test_quantize_stream.py
step bench_w4a16 60 python scripts/bench_w4a16.py
step bench_attention 150 python scripts/bench_attention.py --doc "$out/attention.md" --e2e-steps 10
cat "$out/summary.txt"
exit "$status"
