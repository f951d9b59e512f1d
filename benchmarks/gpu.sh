#!/usr/bin/env bash
# The GPU step benchmark, for an offline machine with one H200-class GPU whose `python3`
# already has torch (CUDA), jax with its CUDA plugin, optax and numpy (docs/benchmarks.md).
# No venv is built there: the backends that its python3 can import are measured, the others
# (TensorFlow, Objax) are listed as not measured.
#
#   bash benchmarks/gpu.sh prepare   # here, with the registry: the pure-Python wheels it brings
#   bash benchmarks/gpu.sh           # there (under 8 minutes): results JSON + table
#   .venv/bin/python benchmarks/steps.py --render benchmarks/results/steps-<gpu>.json
#                                    # here, after copying the JSON back: the docs table
#
# Settings: ResNet-18 width 64 at 64 px, batch 256 and batch 1024 as virtual batches of
# physical chunks of 256, DP (C=1, sigma=1) vs non-private steps interleaved in one process.
set -euo pipefail
cd "$(dirname "$0")/.."
wheels=benchmarks/wheels
if [ "${1:-}" = prepare ]; then
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d "$wheels" \
    opacus==1.6.0 dp-accounting==0.6.0 opt_einsum==3.4.0
  exit 0
fi
py=${PYTHON:-python3}
out=${OUT:-benchmarks/results}
mkdir -p "$out"
site=$(mktemp -d)
# Bring only what is missing: never shadow the machine's own torch or jax.
for spec in opacus:opacus dp_accounting:dp-accounting opt_einsum:opt_einsum; do
  module=${spec%%:*}; dist=${spec#*:}
  if ! "$py" -c "import $module" 2>/dev/null; then
    wheel=$(ls "$wheels"/"${dist//-/_}"-*.whl 2>/dev/null | head -1)
    [ -n "$wheel" ] || { echo "gpu.sh: no $dist wheel in $wheels; run 'bash benchmarks/gpu.sh prepare' first" >&2; exit 2; }
    "$py" -m pip install --quiet --no-index --no-deps --target "$site" "$wheel"
  fi
done
export PYTHONPATH=$PWD/src:$site${PYTHONPATH:+:$PYTHONPATH}
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # jax takes memory as it needs it, as in a run
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
"$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" || true
"$py" -c "import jax; print('jax', jax.__version__, jax.devices())" || true
pythons=()
for b in reference opacus jax tfprivacy objax; do pythons+=(--python "$b=$py"); done
# Each torch/jax backend's default (Book-Keeping) beside the mode it replaced (reference and
# jax vmap, opacus hooks): issue 20's GPU before/after in one run, 12 workers; jax's conv on a
# GPU is XLA's; tfprivacy and objax: one row each to say "not measured".
modes='{"reference": [{}, {"mode": "vmap"}],
  "opacus": [{}, {"grad_sample_mode": "hooks"}],
  "jax": [{}, {"mode": "vmap"}], "tfprivacy": [{}], "objax": [{}]}'
"$py" benchmarks/steps.py "${pythons[@]}" --backends reference,opacus,jax,tfprivacy,objax \
  --width 64 --image-size 64 --batch-size 256 1024 --physical 256 \
  --steps 6 --warmup 2 --poisson-steps 4 --n-train 50000 --threads 16 --reps 1 --timeout 200 \
  --modes "$modes" --no-write --out "$out/steps-gpu.json" ||
  echo "gpu.sh: some rows failed or were not measured; the table says which and why"
