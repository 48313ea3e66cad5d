#!/usr/bin/env bash
# The one command for a borrowed GPU machine (issue 17): the worker's GPU checks and the GPU/CPU benchmark.
#   bash hack/gpu_device_run.sh          (from the repository root; carry .whl along)
# That machine has torch/transformers/peft but not the worker's pure dependencies (pydantic, structlog, minio,
# redis, ...): they travel as wheels in .whl/ (git-ignored; how to fill it is in the worker README) and go to
# /tmp/site. No network is needed. Every step has a timeout; the whole run stays under 6 minutes. Tables go
# to stdout and, when $OUT is set, to $OUT/gpu_tables.txt.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SITE=${GPU_RUN_SITE:-/tmp/site}
TABLES=${OUT:+$OUT/gpu_tables.txt}
TABLES=${TABLES:-/dev/null}
started=$(date +%s)

if ls .whl/*.whl >/dev/null 2>&1; then
  timeout 60 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
    || echo "pip install of .whl failed (rc $?)"
fi
export PYTHONPATH="$SITE:$PWD/operator${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false

{
  echo "== gpu_device_run $(date -u +%FT%TZ) on $(hostname)"
  timeout 20 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || echo "nvidia-smi: none"
  timeout 60 "$PY" -c "import torch, transformers, peft; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available(), '| transformers', transformers.__version__, '| peft', peft.__version__)" 2>&1
  # Fail fast on a missing dependency instead of inside every check.
  timeout 60 "$PY" -c "import gpujob.worker.runtime, gpujob.worker.cli, gpujob.worker.tasks.lora, gpujob.worker.tasks.voice; print('worker imports ok')" 2>&1 \
    || { echo "worker imports FAILED: the wheels in .whl do not cover this machine"; exit 3; }
} 2>&1 | tee "$TABLES"
[ "${PIPESTATUS[0]}" -eq 0 ] || exit 3

echo | tee -a "$TABLES"
timeout -k 10 210 "$PY" hack/gpu_check.py 2>&1 | tee -a "$TABLES"
check_rc=${PIPESTATUS[0]}
echo "(gpu_check exit $check_rc after $(( $(date +%s) - started ))s)" | tee -a "$TABLES"

echo | tee -a "$TABLES"
left=$(( 340 - ($(date +%s) - started) )); [ "$left" -gt 60 ] || left=60
timeout -k 10 "$left" "$PY" hack/bench_gpu.py --cpu-seconds 40 2>&1 | tee -a "$TABLES"
bench_rc=${PIPESTATUS[0]}
echo "(bench_gpu exit $bench_rc; whole run $(( $(date +%s) - started ))s)" | tee -a "$TABLES"
[ "$check_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
