#!/usr/bin/env bash
# Start or stop NVIDIA's Multi-Process Service on the GPU machine, for studies that run several
# small training runs side by side (scripts/convergence_study.py, scripts/local_updates_study.py):
# under MPS their kernels share the GPU at once instead of time-slicing, 6 runs of the 21M study
# model finished in 327-333 s against 374 s without it (docs/gpu_runbook.md).
#
#   source scripts/mps.sh start   # exports CUDA_MPS_PIPE_DIRECTORY when MPS works, prints MPS=on/off
#   ...                           # the runs
#   source scripts/mps.sh stop
#
# Sourced, so the started runs see the pipe directory. Without nvidia-cuda-mps-control, or if a
# CUDA process cannot start under it, MPS stays off and the runs time-slice as before.
case "${1:-}" in
  start)
    export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
    mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
    MPS=off
    if command -v nvidia-cuda-mps-control >/dev/null && nvidia-cuda-mps-control -d \
      && timeout 60 python3 -c "import torch; torch.ones(4, device='cuda').sum().item()"; then
      MPS=on
    else
      echo quit | nvidia-cuda-mps-control 2>/dev/null
      unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
    fi
    echo "MPS=$MPS"
    ;;
  stop)
    if [ "${MPS:-off}" = on ]; then echo quit | nvidia-cuda-mps-control; fi
    unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
    MPS=off
    ;;
  *)
    echo "usage: source scripts/mps.sh start|stop" >&2
    return 2 2>/dev/null || exit 2
    ;;
esac
