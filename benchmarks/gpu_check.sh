#!/usr/bin/env bash
# One call on a CUDA machine: build the CUDA module, run the GPU tests, time the GPU grids.
#
#   OUT=results_dir benchmarks/gpu_check.sh [op ...]     (ops: advantages linear_head logprob losses; default all)
#
# Uses the machine's own torch and Triton (no installs): the package is imported from the
# checkout, with its compiled modules built in place. Logs and result tables go under $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
ops=("$@")
[ ${#ops[@]} -eq 0 ] && ops=(advantages linear_head logprob losses)

echo "== build (nvcc, sm_90)"
STEPPO_FAST_CUDA=1 STEPPO_FAST_CUDA_ARCHS=90 python3 setup.py -q build_ext --inplace >"$OUT/build.log" 2>&1 \
  || { tail -30 "$OUT/build.log"; exit 1; }
python3 - <<'PY' || exit 1
import torch
from steppo_fast import _native
mod = _native.cuda_module()
assert mod is not None, _native.module_error("_C_cuda")
print("torch", torch.__version__, "| GPUs seen by _C_cuda:", mod.device_count(), "|", torch.cuda.get_device_name())
PY

echo "== GPU tests"
python3 -m pytest -q -x -p no:cacheprovider tests/test_advantages.py tests/test_ops.py tests/test_logprob.py tests/test_linear_head.py tests/test_losses.py \
  -k "cuda or triton or Triton" 2>&1 | tee "$OUT/tests.log" | tail -15
tests_rc=${PIPESTATUS[0]}

for op in "${ops[@]}"; do
  echo "== bench $op"
  python3 -m steppo_fast.cli bench --op "$op" --device cuda --out "$OUT" --no-progress 2>&1 | tee "$OUT/bench_$op.log" \
    | grep '^|' | tail -40
done

echo "== trainer on cuda (bf16 autocast; flash-attn 2 when installed)"
python3 -m steppo_fast.cli train --env lights --updates 20 --device cuda --no-progress --out "$OUT/train_lights" \
  --set save_every=20 2>&1 | tee "$OUT/train_lights.log" | tail -6
exit "$tests_rc"
