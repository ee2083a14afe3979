#!/usr/bin/env bash
# GPU checks in one command (one CUDA GPU, under 10 minutes):
#   1. the gpu-marked tests (tests/gpu): Triton kernels vs the step loop on CUDA, bf16, no host
#      syncs, 1-bit spike storage, Spikformer on the GPU;
#   2. a 1-GPU bf16 training run of spikformer_tiny through Ray Train (NCCL process group)
#      and DeepSpeed, on the digits demo config;
#   3. `asnn-dist bench neurons --device cuda`: Triton kernel vs torch ops vs step loop, with
#      the memory bandwidth it achieves against --peak-gbs (default H200: 4800 GB/s).
# Every stage runs even if an earlier one failed; the exit code is non-zero if any failed.
# Usage: bash tests/gpu/run_gpu_checks.sh   (env: PYTHON=.venv/bin/python, PEAK_GBS=4800,
#        GPU_CHECKS_WORKDIR=<folder for the training run>, default a fresh temporary folder)
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
PEAK_GBS=${PEAK_GBS:-4800}
failed=()

stage() {  # stage NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    echo
    echo "=== ${name} (limit ${limit}s) ==="
    local start=$SECONDS
    timeout --kill-after=10 "${limit}" "$@"
    local rc=$?
    echo "=== ${name}: rc=${rc}, $((SECONDS - start))s ==="
    [ "${rc}" -eq 0 ] || failed+=("${name}")
}

if ! "${PY}" - <<'EOF'
import sys
import torch
print("torch", torch.__version__, "CUDA", torch.version.cuda, "devices", torch.cuda.device_count())
try:
    import triton
    print("triton", triton.__version__)
except Exception as err:  # noqa: BLE001
    print("triton not importable:", err)
if not torch.cuda.is_available():
    sys.exit("no CUDA device (torch.cuda.is_available() is False): nothing to check here")
print("GPU:", torch.cuda.get_device_name(0))
EOF
then
    exit 1
fi
WORK=${GPU_CHECKS_WORKDIR:-$(mktemp -d -t asnn-gpu-checks.XXXXXX)}

stage "gpu tests" 240 "${PY}" -m pytest -m gpu tests/gpu -q -p no:cacheprovider -rs

stage "1-GPU bf16 train (spikformer_tiny, Ray Train + NCCL)" 240 "${PY}" -m asnn_dist.cli train \
    configs/demo/digits-lenet-hybrid.yaml --set model.name=spikformer_tiny run.num_workers=1 \
    run.use_gpu=true engine.precision=bf16 optim.epochs=3 "workdir=${WORK}" \
    tracking.registered_model=null run.progress=false

stage "bench neurons --device cuda (float32)" 60 "${PY}" -m asnn_dist.cli bench neurons --device cuda \
    --steps 8 --repeats 10 --peak-gbs "${PEAK_GBS}"
stage "bench neurons --device cuda (bfloat16)" 45 "${PY}" -m asnn_dist.cli bench neurons --device cuda \
    --steps 8 --repeats 10 --peak-gbs "${PEAK_GBS}" --dtype bfloat16

echo
if [ "${#failed[@]}" -eq 0 ]; then
    echo "GPU checks: all stages passed (training run in ${WORK})"
else
    echo "GPU checks: FAILED stages: ${failed[*]} (training run in ${WORK})"
    exit 1
fi
