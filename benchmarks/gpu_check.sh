#!/usr/bin/env bash
# GPU check of model.attention (issue 19), prepared for the first GPU machine:
# a 1B-shaped model (4 layers) in bf16 at seq 4096, 20 steps with
# attention=xla and attention=cudnn: tokens/s and MFU against the device's
# dense bf16 peak (H100/H200: 989 TFLOP/s), then the cost of the segment mask
# in the cuDNN call. Budget: under 8 minutes on a fresh machine, installs
# included (each phase has its own timeout).
#
#   bash benchmarks/gpu_check.sh            # on the GPU machine
#   bash benchmarks/gpu_check.sh --dry      # here: the driver on CPU, tiny
#   bash benchmarks/gpu_check.sh --layers=8 --batch=2   # driver flags pass on
#
# jax with a GPU backend: the machine's own if `import jax` already sees a
# GPU (the lent H200 image has jax with the CUDA 13 plugin and no network),
# else `pip install "jax[cuda13]==0.10.2"` (driver >= 580) or
# "jax[cuda12]==0.10.2" (the extras jax 0.10.2 has: cuda12, cuda13, and
# -local variants that use a system CUDA). llmlab runs from this checkout
# (PYTHONPATH): the driver needs only jax, flax, optax and numpy of llmlab's
# dependencies, so no `pip install -e .` (which would also pull grain,
# tensorboard, ... and, offline, fail). Wheels for anything missing can be
# put in .whl/ (see the note in the device README): they are installed
# with --no-index first.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

if [[ "${1:-}" == "--dry" ]]; then
  shift
  JAX_PLATFORMS=cpu exec timeout 600 "$PY" benchmarks/gpu_check.py --dry "$@"
fi

start=$SECONDS
if compgen -G ".whl/*.whl" >/dev/null; then
  timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-compile \
    --target /tmp/gpu_check_site .whl/*.whl
  export PYTHONPATH="$PYTHONPATH:/tmp/gpu_check_site"
fi
if ! timeout 120 "$PY" -c "import jax, sys; sys.exit(jax.default_backend() != 'gpu')"; then
  major=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -1 | cut -d. -f1)
  extra=cuda12
  if (( major >= 580 )); then extra=cuda13; fi
  echo "no GPU jax here: installing jax[$extra]==0.10.2"
  timeout 240 "$PY" -m pip install -q "jax[$extra]==0.10.2" "flax>=0.12,<0.13" "optax>=0.2.6,<0.3"
fi
for mod in flax optax; do
  "$PY" -c "import $mod" 2>/dev/null || timeout 120 "$PY" -m pip install -q "$mod"
done
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
echo "setup took $((SECONDS - start)) s"
timeout $((470 - (SECONDS - start))) "$PY" benchmarks/gpu_check.py "$@"
echo "gpu_check done in $((SECONDS - start)) s"
