#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one run (one GPU is enough; a second adds the TP 2 cases):
# the MFU benchmark (gpt2-medium, bf16-mixed, one process: plain Lightning and MegatronTPStrategy at
# TP 1, with the vocab-parallel loss and with gathered logits), the cuda-marked tests, the loss alone (bench_loss.py), then the MFU benchmark compiled
# (COMPILE=blocks, the default: every block; COMPILE=model: the whole model) and that once more for the
# strategy at TP 1 with its loss unfused (loss_fusion=False). BENCH_FLAGS is added to
# all MFU runs (e.g. "--precision bf16-true --batch 16").
#   bash benchmarks/gpu_checks.sh [OUTDIR]     (default benchmarks/results/gpu)
# Writes OUTDIR/log.txt, OUTDIR/{eager,compiled,compiled_unfused}/results.{json,md} and OUTDIR/loss/loss.{json,md}.
# Needs the project importable (installed, or run from the repository root: PYTHONPATH is set to it).
set -u
OUTDIR=${1:-benchmarks/results/gpu}
mkdir -p "$OUTDIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 WANDB_MODE=offline
PY=${PYTHON:-python3}
LOG="$OUTDIR/log.txt"
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  $PY -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__, torch.cuda.get_device_name())"
  bench() {  # $1: out folder, rest: extra flags
    local out=$1; shift
    timeout "${BENCH_TIMEOUT:-240}" $PY benchmarks/bench_tp.py --preset gpt2-medium --variants single lightning_tp_tp1 lightning_tp_tp1_gather \
      --steps 12 --warmup 4 --comm-steps 1 --repeats 1 --timeout 200 --out "$OUTDIR/$out" ${BENCH_FLAGS:-} "$@"
    echo "bench $out exit $?"
    rm -f "$OUTDIR/$out/results.png"
  }
  echo "== eager MFU"; bench eager
  echo "== cuda tests"
  xdist=$($PY -c "import xdist" 2>/dev/null && echo "-n 4")  # the tests' processes side by side where pytest-xdist is
  timeout "${TEST_TIMEOUT:-300}" $PY -m pytest tests/test_cuda.py -q -rA -p no:cacheprovider $xdist
  echo "cuda tests exit $?"
  echo "== the loss alone (gpt2-medium's logits: where the TP 1 gap's loss share is)"
  timeout "${LOSS_TIMEOUT:-240}" $PY benchmarks/bench_loss.py --tokens 8192 --compiled --out "$OUTDIR/loss"
  echo "bench_loss exit $?"
  echo "== compiled MFU"; bench compiled --compile "${COMPILE:-blocks}"
  echo "== compiled MFU, the strategy at TP 1 with its loss unfused (loss_fusion=False; fused above, the CUDA default)"
  bench compiled_unfused --compile "${COMPILE:-blocks}" --variants lightning_tp_tp1 --loss-fusion off
  date -u
} 2>&1 | tee "$LOG"
