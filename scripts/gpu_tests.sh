#!/usr/bin/env bash
# The whole test suite, CPU and GPU tests, on a GPU machine: run it whenever a change touches the
# kernels, the engine or comm, and record the counts it prints with the change.
#
#   bash scripts/gpu_tests.sh [LOG] [pytest options...]     # from anywhere; LOG defaults to gpu-tests.log
#   JOBS=4 bash scripts/gpu_tests.sh ...                      # pytest-xdist workers (default 8; 0: serial)
#   SHARD=1/2 bash scripts/gpu_tests.sh ...; SHARD=2/2 ...    # the suite in 2 calls (each runs every 2nd test)
#
# On a 16-core H200 host run it as SHARD=1/2 then SHARD=2/2, alone on the host; together they run
# every test once (tests/conftest.py). 2026-12-02, JOBS=10: 167 s and 152 s, collection included,
# so both fit one 10-minute device call. Each test process gets OMP_NUM_THREADS = cores / JOBS (at
# least 1) unless set: torch's default (every core in every process) oversubscribed the host many
# times over, and at -n 14 the unsharded suite was not done after 558 s.
#
# CI (no GPU) skips every test marked `gpu`; here they run next to the CPU tests. The source tree is
# put first on PYTHONPATH, so nothing needs installing on the machine (its torch, Triton and pytest
# are used). pytest-xdist runs the tests in parallel when it is installed, else they run serially.
# Prints pytest's summary and the number of GPU tests; exits with pytest's status (non-zero on any
# failure, 2 when the machine has no usable GPU). Under `timeout -s INT` pytest still prints its summary
# (tee ignores the interrupt, so the log keeps it).
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LOG=${1:-gpu-tests.log}
shift $(( $# > 0 ? 1 : 0 ))
case "$LOG" in /*) ;; *) LOG="$PWD/$LOG" ;; esac
PY=${PYTHON:-python3}
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# never NVLink multicast on shared hosts (see the machine notes); harmless elsewhere
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

JOBS=${JOBS:-8}
case "$JOBS" in ''|*[!0-9]*) echo "gpu_tests.sh: JOBS must be a number of workers (0: serial), got '$JOBS'" >&2; exit 2 ;; esac
SHARD_ARGS=()
if [ -n "${SHARD:-}" ]; then
  if ! [[ "$SHARD" =~ ^[0-9]+/[0-9]+$ ]] || (( 10#${SHARD%/*} < 1 || 10#${SHARD%/*} > 10#${SHARD#*/} )); then
    echo "gpu_tests.sh: SHARD must be I/K with 1 <= I <= K, got '$SHARD'" >&2
    exit 2
  fi
  SHARD_ARGS=(--shard "$SHARD")
fi
THREADS=$(( $(nproc) / (10#$JOBS > 0 ? 10#$JOBS : 1) ))
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( THREADS > 0 ? THREADS : 1 ))}

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_tests.sh: no CUDA GPU visible to $PY (torch.cuda.is_available() is False); on a CPU machine run: python -m pytest -q" >&2
  exit 2
fi
"$PY" -c "import torch, triton; print(f'torch {torch.__version__}, triton {triton.__version__}, {torch.cuda.get_device_name()}')" \
  || echo "gpu_tests.sh: Triton is not importable: the Triton tests will be skipped" >&2

PARALLEL=()
if [ "$JOBS" != 0 ] && "$PY" -c "import xdist" 2>/dev/null; then
  PARALLEL=(-n "$JOBS")
elif [ "$JOBS" != 0 ]; then
  echo "gpu_tests.sh: pytest-xdist is not installed: running serially" >&2
fi

GPU_COUNT=$("$PY" -m pytest -q --collect-only -m gpu "${SHARD_ARGS[@]}" "$@" 2>/dev/null | tail -n 1)
"$PY" -m pytest -q "${PARALLEL[@]}" "${SHARD_ARGS[@]}" "$@" 2>&1 | tee -i "$LOG"
status=${PIPESTATUS[0]}
echo "gpu_tests.sh: ${SHARD:+shard $SHARD, }OMP_NUM_THREADS=$OMP_NUM_THREADS; GPU tests collected: ${GPU_COUNT:-unknown}; log: $LOG; pytest exit status $status"
exit "$status"
