#!/usr/bin/env bash
# Launch r1mega under torchrun, single node or multi-node with c10d rendezvous.
#
#   launch/torchrun.sh CONFIG.yaml [key=value ...]                 # one node, all local GPUs
#   NNODES=4 NODE_RANK=$i MASTER_ADDR=host0 launch/torchrun.sh CONFIG.yaml parallel.tensor=8
#
# Hyperparameters belong in CONFIG and overrides, never here. Environment knobs (launch only):
#   R1MEGA_CMD     train | sft | generate ... (default train)
#   NPROC_PER_NODE ranks per node (default: number of GPUs, or 2 on a CPU-only machine)
#   NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, RDZV_ID   multi-node rendezvous
#   MAX_RESTARTS   torchrun --max-restarts; the trainer resumes from the last checkpoint
set -euo pipefail
[ $# -ge 1 ] || { sed -n 2,13p "$0"; exit 2; }
if [ -z "${NPROC_PER_NODE:-}" ]; then
  NPROC_PER_NODE=$(python -c 'import torch; print(torch.cuda.device_count() or 2)')
fi
NNODES=${NNODES:-1}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
args=(--nnodes "$NNODES" --nproc-per-node "$NPROC_PER_NODE" --max-restarts "${MAX_RESTARTS:-0}")
if [ "$NNODES" -gt 1 ]; then
  args+=(--rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "${RDZV_ID:-r1mega}")
else
  args+=(--standalone)
fi
if [ "${MAX_RESTARTS:-0}" != 0 ]; then
  # A restarted round must not meet the last round's keys: torchrun's agent shares one TCP store
  # across rounds, where the new ranks can read the dead rank 0's address ("Gloo connectFullMesh
  # failed ... Connection refused" on restart). With the store not shared, each round's rank 0
  # hosts a fresh one.
  export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
fi
# r1mega.parallel.torchrun is torchrun whose failure report is one line (the failing rank has
# already said why); R1MEGA_DEBUG=1 keeps the full report.
exec python -m r1mega.parallel.torchrun "${args[@]}" -m r1mega.cli "${R1MEGA_CMD:-train}" "$@"
