#!/usr/bin/env bash
# The GPU checks of a session that is lent one, as one prepared command run in the repository
# root on the device machine (its own Python with torch; no venv travels):
#
#   bash bench/gpu_check.sh                  # gpu tests, then every benchmark section
#   bash bench/gpu_check.sh train distill    # gpu tests, then only these sections
#   bash bench/gpu_check.sh parallel scaling # K runs together; the cost curves
#
# Writes the benchmark JSON (bench/<gpu>.json, merged with sections measured before) and the
# logs into $OUT when set (the device tool brings $OUT back), else into bench/. Copy the JSON
# into bench/ here and commit it. Each step is time-boxed so the whole fits a 10-minute call.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench}
py=${PYTHON:-python3}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
sections=("$@")
[ ${#sections[@]} -gt 0 ] || sections=(train distill eval probes landscape tickets curvature
                                       parallel)

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
$py -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" \
  | tee -a "$out/gpu.txt"

# The CUDA-only tests (bf16 autocast, channels_last, vmap on CUDA, kthvalue on the device).
timeout 180 $py -m pytest -q -p no:cacheprovider -m gpu tests 2>&1 | tee "$out/gpu-tests.log"

# The benchmark, one section per call so a slow one cannot starve the others. curvature
# times Hessian-vector products (jvp vs double backward, fp32 and bf16) and the top-5
# eigenvalues of ResNet18 on 10k images (the goal: < 60 s on one H100); `bash
# bench/gpu_check.sh curvature` measures it alone. parallel trains K = 1..16 ResNet20 and
# ResNet18 runs together and in turn (the goal: 8 ResNet20 children >= 4x the runs/hour).
# `scaling` (never by default: give it by name) draws the cost curves at full sizes
# instead: time and peak memory of each hot path as its work grows (scaling-<gpu>.png).
for section in "${sections[@]}"; do
  limit=300
  [ "$section" = curvature ] && limit=420  # the eigensolve alone may take minutes if slow
  if [ "$section" = scaling ]; then
    timeout 420 $py -m runs.bench --device cuda --scaling --out "$out" 2>&1 \
      | tee -a "$out/bench.log"
    continue
  fi
  timeout $limit $py -m runs.bench --device cuda --sections "$section" --out "$out" 2>&1 \
    | tee -a "$out/bench.log"
done
