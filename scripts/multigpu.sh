#!/usr/bin/env bash
# The multi-GPU runs on one host (issues 10, 11 and 21): the comm benchmark and the training-step
# benchmark of halfbyte's engine and of FSDP2 (plain, and with halfbyte's collectives) side by side,
# over NVLink and over NCCL's TCP sockets on loopback (our stand-in for an inter-node Ethernet
# link), plus the one-GPU step profile that `scripts/multigpu_report.py` takes as compute input.
#
#   bash scripts/multigpu.sh OUT_DIR [GPUS_PER_NODE]      # every visible GPU; default: one node
#   TRANSPORTS="onegpu nvlink" bash scripts/multigpu.sh OUT_DIR   # some passes only
#   python scripts/multigpu_report.py OUT_DIR             # measured vs simulated, overlap, targets
#
# Passes (TRANSPORTS, default "onegpu nvlink tcp"), each one command list that fits a device call
# of < 10 minutes on 2 H200s at 350m and 1.3b (issue 21: run "onegpu nvlink" in one call, "tcp" in
# the next). Files: train-1gpu-350m-1.3b.json (onegpu; the name the report reads whatever MODELS
# are), comm-<N>gpu-<pass>.json, train-<N>gpu-<pass>.json (rows of both engines: halfbyte
# baseline / zeropp / sdp4bit, fsdp2 plain / baseline / zeropp / sdp4bit, each with its overlap
# efficiency), and <name>.log beside each.
#
# NCCL's transport switches are process-wide, so in the TCP pass every link, intra-node ones too,
# goes over sockets: with GPUS_PER_NODE < GPUs that pass is pessimistic for two-level presets.
# CPU_WORKERS=N runs the same commands on N local gloo CPU processes instead (no GPU, no torchrun:
# what the CPU test of this script does, with small MODELS/SEQ/STEPS).
set -euo pipefail
OUT=${1:?usage: bash scripts/multigpu.sh OUT_DIR [GPUS_PER_NODE]}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
MODELS=${MODELS:-350m,1.3b}
SEQ=${SEQ:-2048}
MICRO=${MICRO:-4}
STEPS=${STEPS:-10}
WARMUP=${WARMUP:-3}
COMM_ARGS=${COMM_ARGS:-}  # e.g. "--sizes 64K,1M --iters 2" for a quick run
if [ -n "${CPU_WORKERS:-}" ]; then
  N=$CPU_WORKERS
  many="python -m halfbyte"
  spread="--workers $N"
  one="python -m halfbyte"
else
  N=$(nvidia-smi -L | wc -l)
  many="torchrun --standalone --nproc_per_node=$N -m halfbyte"
  spread=""
  one="env CUDA_VISIBLE_DEVICES=0 python -m halfbyte"
fi
L=${2:-$N}
PRESETS=baseline,zeropp,sdp4bit
[ "$L" -lt "$N" ] && PRESETS=$PRESETS,tlq-hs  # two-level gradients need >= 2 (emulated) nodes
train="bench train --models $MODELS --micro-batch $MICRO --seq-len $SEQ --steps $STEPS --warmup $WARMUP"

step() {  # step NAME COMMAND...: run it, keep its output beside its JSON
  echo "== $1: ${*:2}"
  "${@:2}" 2>&1 | tee "$OUT/$1.log"
}

for pass in ${TRANSPORTS:-onegpu nvlink tcp}; do
  case $pass in
    onegpu)  # a world of one: the compute input of the report (baseline, and sdp4bit's codec)
      step train-1gpu $one $train --presets baseline,sdp4bit --out "$OUT/train-1gpu-350m-1.3b.json" ;;
    nvlink|tcp)
      if [ "$pass" = tcp ]; then
        export NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1 NCCL_SOCKET_IFNAME=lo
      else
        unset NCCL_P2P_DISABLE NCCL_SHM_DISABLE NCCL_SOCKET_IFNAME
      fi
      # shellcheck disable=SC2086  # the argument lists split on purpose
      step "comm-${N}gpu-$pass" $many bench comm $spread --gpus-per-node "$L" $COMM_ARGS \
          --out "$OUT/comm-${N}gpu-$pass.json"
      # shellcheck disable=SC2086
      step "train-${N}gpu-$pass" $many $train $spread --gpus-per-node "$L" --engine halfbyte,fsdp2 \
          --presets "plain,$PRESETS" --out "$OUT/train-${N}gpu-$pass.json" ;;
    *) echo "unknown pass $pass: use onegpu, nvlink, tcp" >&2; exit 2 ;;
  esac
done
