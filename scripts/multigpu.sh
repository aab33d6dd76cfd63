#!/usr/bin/env bash
# The multi-GPU runs of issues 10 (2 GPUs) and 11 (4 GPUs as 2 emulated nodes x 2), on one host:
# the comm benchmark and the training-step benchmark per preset, over NVLink and over NCCL's TCP
# sockets on loopback (our stand-in for an inter-node Ethernet link, ~2.9 GB/s on 2 H200s).
#
#   bash scripts/multigpu.sh OUT_DIR [GPUS_PER_NODE]      # every visible GPU; default: one node
#   TRANSPORTS=tcp bash scripts/multigpu.sh OUT_DIR       # one pass only (each pass fits a device call)
#
# NCCL's transport switches are process-wide, so in the TCP pass every link, intra-node ones too,
# goes over sockets: with GPUS_PER_NODE < GPUs that pass is pessimistic for two-level presets.
set -euo pipefail
OUT=${1:?usage: bash scripts/multigpu.sh OUT_DIR [GPUS_PER_NODE]}
N=$(nvidia-smi -L | wc -l)
L=${2:-$N}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
PRESETS=baseline,zeropp,sdp4bit
[ "$L" -lt "$N" ] && PRESETS=$PRESETS,tlq-hs  # two-level gradients need >= 2 (emulated) nodes

for transport in ${TRANSPORTS:-nvlink tcp}; do
  if [ "$transport" = tcp ]; then
    export NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1 NCCL_SOCKET_IFNAME=lo
  fi
  run="torchrun --standalone --nproc_per_node=$N -m halfbyte"
  echo "== $transport: bench comm"
  $run bench comm --gpus-per-node "$L" --out "$OUT/comm-${N}gpu-$transport.json"
  echo "== $transport: bench train"
  $run bench train --models 350m,1.3b --presets "$PRESETS" --micro-batch 4 --seq-len 2048 \
      --steps 10 --warmup 3 --gpus-per-node "$L" --out "$OUT/train-${N}gpu-$transport.json"
done
